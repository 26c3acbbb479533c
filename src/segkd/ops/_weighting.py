"""Channel weights and the weighted reduction of per-channel KL terms: the PyTorch finalize step.

:func:`segkd.ops.weighted_channel_kl` runs in two steps: per-row statistics (``_torch_backend`` or
``_triton_backend``), then this finalize step, which turns the ``(N * C,)`` KL values into the
loss and the per-row coefficients ``coef[r] = d loss / d kl[r]`` that the backward pass needs.
The Triton backend has its own finalize kernel (``_triton_weighting``); this module is the
reference it is tested against, and the finalize of every other device.

Weightings (``mode``):

* ``"uniform"``: ``w = 1`` (CWD);
* ``"hwd"``: HWD's weights from the per-channel divergence (the ``sqdist`` of ``channel_kl``);
* ``"given"``: weights passed in by the caller, ``(N * C,)``, detached.

No argument is validated here; :mod:`segkd.ops.weighted_kl` and :mod:`segkd.losses.hwd` do that.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["MODES", "REDUCTIONS", "finalize", "hwd_curve", "hwd_weights"]

MODES = ("uniform", "hwd", "given")
REDUCTIONS = ("mean", "sum", "none")


def weight_dtype(device: torch.device) -> torch.dtype:
    """The dtype of HWD's weight arithmetic: fp64 wherever the device has it (an ``(N, C)`` side computation)."""
    return torch.float32 if device.type == "mps" else torch.float64


def curve_limit(dtype: torch.dtype) -> float:
    """Largest ``|x ln beta|`` fed to ``expm1`` in ``dtype``: beyond it the curve saturates instead of overflowing."""
    return 700.0 if dtype == torch.float64 else 80.0


def hwd_curve(x: Tensor, beta: float) -> Tensor:
    """``(1 - beta^x) / (1 - beta)`` as ``expm1(x ln beta) / expm1(ln beta)``, saturating; ``x`` at ``beta == 1``."""
    if beta == 1.0:
        return x.clone()
    log_beta = math.log(beta)
    limit = curve_limit(x.dtype)
    g = torch.expm1((x * log_beta).clamp(-limit, limit)) / math.expm1(log_beta)
    # With beta within ~1e-10 of 1 and a huge |x|, the division can still overflow; +-inf would
    # make the softmax of the weights NaN, so saturate at the largest finite value instead.
    largest = torch.finfo(g.dtype).max
    return g.clamp_(-largest, largest)


def hwd_weights(divergence: Tensor, mu: float, beta: float) -> Tensor:
    """HWD weights ``C * softmax_c(g(z + mu))`` of ``(N, C)`` divergences, in ``divergence``'s dtype.

    ``z`` is the divergence standardised over the channels of each image (unbiased std); where the
    std is zero or undefined (all divergences equal, ``C == 1``) ``z = 0`` and the weights are ones.
    """
    channels = divergence.shape[1]
    d = divergence.detach().to(weight_dtype(divergence.device))
    if channels == 1:
        z = torch.zeros_like(d)
    else:
        # Shifting by the first channel first makes "all equal" give exact zeros, whatever rounding
        # the mean would otherwise introduce.
        centred = d - d[:, :1]
        centred = centred - centred.mean(dim=1, keepdim=True)
        std = centred.square().sum(dim=1, keepdim=True).div(channels - 1).sqrt()
        degenerate = ~(std > 0) | ~torch.isfinite(std)
        z = centred / torch.where(degenerate, torch.ones_like(std), std)
        z = torch.where(degenerate | ~torch.isfinite(z), torch.zeros_like(z), z)
    g = hwd_curve(z + mu, beta)
    weights = channels * torch.softmax(g, dim=1)
    return weights.to(divergence.dtype)


def finalize(
    kl: Tensor,
    aux: Tensor | None,
    channels: int,
    mode: str,
    mu: float,
    beta: float,
    scale: float,
    reduction: str,
) -> tuple[Tensor, Tensor]:
    """The loss ``reduce(scale * w * kl)`` and ``coef = d loss / d kl``, from ``(R,)`` rows, ``R = N * C``.

    ``aux`` is the ``(R,)`` divergence for ``mode="hwd"``, the ``(R,)`` weights for ``"given"``,
    ``None`` for ``"uniform"``. The loss is a scalar, or ``(N, C)`` for ``reduction="none"``;
    ``coef`` is ``(R,)``; both in ``kl``'s dtype.
    """
    num_rows = kl.shape[0]
    if mode == "uniform":
        coef = torch.full_like(kl, scale)
    else:
        assert aux is not None  # guaranteed by the caller; not user input
        if mode == "hwd":
            weights = hwd_weights(aux.view(-1, channels), mu, beta).view(-1).to(kl.dtype)
        else:
            weights = aux.to(kl.dtype)
        coef = weights * scale
    terms = coef * kl
    if reduction == "none":
        return terms.view(-1, channels), coef
    if reduction == "mean":
        return terms.sum() / num_rows, coef / num_rows
    return terms.sum(), coef
