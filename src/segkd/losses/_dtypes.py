"""The dtype the losses compute in: fp32 for half inputs, fp64 kept."""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """Return fp64 if any tensor is fp64, else fp32 (the accumulation dtype for fp32 and half inputs)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
