"""Functional forms of every segkd loss (the modules in :mod:`segkd` store settings and call these)."""

from segkd.losses.adversarial import skd_discriminator_hinge_loss, skd_generator_hinge_loss
from segkd.losses.cirkd import cirkd_memory_kl, cirkd_minibatch_loss
from segkd.losses.cwd import cwd_loss
from segkd.losses.dist import dist_loss
from segkd.losses.hwd import hwd_loss, hwd_weights, hwd_weights_from_divergence
from segkd.losses.ifvd import ifvd_loss
from segkd.losses.kd import pixel_kd_loss
from segkd.losses.mgd import mgd_loss, mgd_mask
from segkd.losses.skd import skd_pairwise_loss
from segkd.ops.channel_kl import channel_kl
from segkd.ops.weighted_kl import weighted_channel_kl

__all__ = [
    "channel_kl",
    "cirkd_memory_kl",
    "cirkd_minibatch_loss",
    "cwd_loss",
    "dist_loss",
    "pixel_kd_loss",
    "skd_discriminator_hinge_loss",
    "skd_generator_hinge_loss",
    "skd_pairwise_loss",
    "hwd_loss",
    "hwd_weights",
    "hwd_weights_from_divergence",
    "ifvd_loss",
    "mgd_loss",
    "mgd_mask",
    "weighted_channel_kl",
]
