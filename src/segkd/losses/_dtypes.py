"""The dtypes the losses compute in: fp32 for half inputs, fp64 kept; a module's layers set their own."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """Return fp64 if any tensor is fp64, else fp32 (the accumulation dtype for fp32 and half inputs)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _autocast_enabled(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))  # type: ignore[call-arg, unused-ignore]
    except TypeError:  # torch < 2.4: no device argument
        if device_type == "cpu":
            return bool(torch.is_autocast_cpu_enabled())
        return bool(torch.is_autocast_enabled())


def to_layer_dtype(value: Tensor, layers: nn.Module) -> Tensor:
    """``value`` in the dtype of the floating parameters of ``layers``, outside autocast.

    The trainable layers of a loss (MGD's generator, CIRKD's projection head, SKD's discriminator)
    compute in their own dtype, as any ``nn.Module`` after ``.to(dtype)``: an fp16 student fed to
    fp32 layers is cast up (and an fp64 one down), and its gradient comes back in its own dtype.
    Under autocast ``value`` is returned unchanged: autocast chooses each layer's dtype itself.
    """
    dtype = next((p.dtype for p in layers.parameters() if p.is_floating_point()), None)
    if dtype is None or value.dtype == dtype or _autocast_enabled(value.device.type):
        return value
    return value.to(dtype)
