"""segkd: knowledge-distillation losses for semantic segmentation."""

from segkd import functional, ops
from segkd.losses import (
    CIRKDLoss,
    CIRKDMemoryLoss,
    CIRKDMiniBatchLoss,
    CWDLoss,
    DISTLoss,
    HWDLoss,
    IFVDLoss,
    KDLoss,
    MGDLoss,
    SKDDiscriminator,
    SKDLoss,
)

__version__ = "0.1.0"

__all__ = [
    "CIRKDLoss",
    "CIRKDMemoryLoss",
    "CIRKDMiniBatchLoss",
    "CWDLoss",
    "DISTLoss",
    "HWDLoss",
    "IFVDLoss",
    "KDLoss",
    "MGDLoss",
    "SKDDiscriminator",
    "SKDLoss",
    "__version__",
    "functional",
    "ops",
]
