"""segkd: knowledge-distillation losses for semantic segmentation."""

from segkd import functional, ops
from segkd.losses import CWDLoss, HWDLoss, IFVDLoss, MGDLoss

__version__ = "0.1.0"

__all__ = ["CWDLoss", "HWDLoss", "IFVDLoss", "MGDLoss", "__version__", "functional", "ops"]
