"""Distillation losses, one module per method."""

from segkd.losses.adversarial import SKDDiscriminator, skd_discriminator_hinge_loss, skd_generator_hinge_loss
from segkd.losses.cirkd import CIRKDLoss, CIRKDMemoryLoss, CIRKDMiniBatchLoss, cirkd_memory_kl, cirkd_minibatch_loss
from segkd.losses.cwd import CWDLoss, cwd_loss
from segkd.losses.dist import DISTLoss, dist_loss
from segkd.losses.hwd import HWDLoss, hwd_loss, hwd_weights
from segkd.losses.ifvd import IFVDLoss, ifvd_loss
from segkd.losses.kd import KDLoss, pixel_kd_loss
from segkd.losses.mgd import MGDLoss, mgd_loss
from segkd.losses.skd import SKDLoss, skd_pairwise_loss

__all__ = [
    "CIRKDLoss",
    "CIRKDMemoryLoss",
    "CIRKDMiniBatchLoss",
    "cirkd_memory_kl",
    "cirkd_minibatch_loss",
    "CWDLoss",
    "DISTLoss",
    "HWDLoss",
    "IFVDLoss",
    "KDLoss",
    "MGDLoss",
    "SKDDiscriminator",
    "SKDLoss",
    "cwd_loss",
    "dist_loss",
    "hwd_loss",
    "hwd_weights",
    "ifvd_loss",
    "mgd_loss",
    "pixel_kd_loss",
    "skd_discriminator_hinge_loss",
    "skd_generator_hinge_loss",
    "skd_pairwise_loss",
]
