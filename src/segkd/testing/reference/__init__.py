"""Float64 formula implementations of segkd's losses, independent of the optimised code.

Each function is written straight from its paper's formula in float64, without importing
:mod:`segkd.ops` or :mod:`segkd.losses`, so that it can serve as a second opinion: segkd's own
tests compare every loss against these, and users porting a method can do the same.
They favour clarity over speed and memory; use them on small inputs.
"""

from segkd.testing.reference.channel_kl import channel_kl_reference, spatial_softmax_reference
from segkd.testing.reference.cirkd import (
    cirkd_memory_kl_reference,
    cirkd_minibatch_loss_reference,
    cirkd_pixel_kd_reference,
)
from segkd.testing.reference.cwd import cwd_loss_reference
from segkd.testing.reference.dist import dist_loss_reference, pearson_correlation_reference
from segkd.testing.reference.hwd import (
    hwd_curve_reference,
    hwd_loss_reference,
    hwd_weights_from_divergence_reference,
    hwd_weights_reference,
)
from segkd.testing.reference.ifvd import ifvd_loss_reference, ifvd_similarity_reference
from segkd.testing.reference.mgd import conv2d_reference, mgd_loss_reference
from segkd.testing.reference.skd import (
    pixel_kd_loss_reference,
    skd_discriminator_hinge_loss_reference,
    skd_generator_hinge_loss_reference,
    skd_pairwise_loss_reference,
)

__all__ = [
    "cirkd_memory_kl_reference",
    "cirkd_minibatch_loss_reference",
    "cirkd_pixel_kd_reference",
    "channel_kl_reference",
    "cwd_loss_reference",
    "hwd_curve_reference",
    "hwd_loss_reference",
    "hwd_weights_from_divergence_reference",
    "hwd_weights_reference",
    "spatial_softmax_reference",
    "conv2d_reference",
    "ifvd_loss_reference",
    "ifvd_similarity_reference",
    "mgd_loss_reference",
    "dist_loss_reference",
    "pearson_correlation_reference",
    "pixel_kd_loss_reference",
    "skd_discriminator_hinge_loss_reference",
    "skd_generator_hinge_loss_reference",
    "skd_pairwise_loss_reference",
]
