"""Unit vectors whose exactly-zero inputs pass no gradient (shared by SKD's and CIRKD's similarities)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def unit_vectors(x: Tensor) -> Tensor:
    """``F.normalize(x, dim=1)``, except that an exactly zero vector (it stays zero) passes no gradient.

    ``F.normalize`` gives a zero vector ``1 / eps = 1e12`` times the upstream gradient: inf once cast
    back to fp16 (autocast), and NaN in any layer behind it. ``torch.where`` routes no gradient to the
    detached copy kept at the zero vectors instead.
    """
    unit = F.normalize(x, p=2.0, dim=1)
    return torch.where((x == 0).all(dim=1, keepdim=True), unit.detach(), unit)
