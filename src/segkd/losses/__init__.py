"""Distillation losses, one module per method."""

from segkd.losses.cwd import CWDLoss, cwd_loss
from segkd.losses.hwd import HWDLoss, hwd_loss, hwd_weights

__all__ = ["CWDLoss", "HWDLoss", "cwd_loss", "hwd_loss", "hwd_weights"]
