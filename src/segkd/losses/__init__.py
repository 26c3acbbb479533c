"""Distillation losses, one module per method."""

from segkd.losses.cwd import CWDLoss, cwd_loss
from segkd.losses.hwd import HWDLoss, hwd_loss, hwd_weights
from segkd.losses.ifvd import IFVDLoss, ifvd_loss
from segkd.losses.mgd import MGDLoss, mgd_loss

__all__ = ["CWDLoss", "HWDLoss", "IFVDLoss", "MGDLoss", "cwd_loss", "hwd_loss", "hwd_weights", "ifvd_loss", "mgd_loss"]
