"""Structured knowledge distillation (SKD), Liu et al., TPAMI 2020: pair-wise, pixel-wise and holistic terms."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segkd import _checks
from segkd.losses._dtypes import compute_dtype
from segkd.losses._reduction import reduce_terms
from segkd.losses._vectors import unit_vectors
from segkd.losses.adversarial import (
    PREPROCESS_MODES,
    Preprocess,
    SKDDiscriminator,
    skd_discriminator_hinge_loss,
    skd_generator_hinge_loss,
)
from segkd.losses.kd import KDLoss, pixel_kd_loss

__all__ = [
    "PREPROCESS_MODES",
    "KDLoss",
    "SKDDiscriminator",
    "SKDLoss",
    "pixel_kd_loss",
    "skd_discriminator_hinge_loss",
    "skd_generator_hinge_loss",
    "skd_pairwise_loss",
]

Reduction = Literal["mean", "sum", "none"]


# --------------------------------------------------------------------------------------------------
# Pair-wise term
# --------------------------------------------------------------------------------------------------


def _pairwise_similarity(feat: Tensor, pool: int) -> Tensor:
    """Max-pool (ceil mode), L2-normalise over channels, return the ``(N, hw, hw)`` cosine similarities."""
    if pool > 1:
        feat = F.max_pool2d(feat, kernel_size=pool, stride=pool, padding=0, ceil_mode=True)
    unit = unit_vectors(feat.flatten(2))  # (N, C, hw); a zero vector stays zero, with no gradient
    # In the input's compute dtype (fp32 for half inputs) also under autocast, which would run bmm in half.
    with torch.autocast(device_type=unit.device.type, enabled=False):
        return torch.bmm(unit.transpose(1, 2), unit)


def skd_pairwise_loss(
    student_feat: Tensor, teacher_feat: Tensor, pool: int = 2, reduction: Reduction = "mean"
) -> Tensor:
    r"""SKD pair-wise loss: match the pixel-to-pixel cosine-similarity matrices of two feature maps.

    Each feature map is max-pooled with a ``pool x pool`` window and stride (``ceil_mode=True``, so
    a ragged border forms its own cell), each of the ``hw`` remaining positions is L2-normalised
    along channels, and the similarity matrix of each image is compared:

    .. math::

        \hat f_i = \frac{f_i}{\max(\lVert f_i \rVert_2, 10^{-12})}, \qquad
        A[n]_{ij} = \hat f_{n,i}^{\top} \hat f_{n,j}, \qquad
        L = \frac{1}{N\,(hw)^2} \sum_{n=1}^{N} \sum_{i,j=1}^{hw} \left(A_S[n]_{ij} - A_T[n]_{ij}\right)^2 .

    Reference: Y. Liu, C. Shu, J. Wang, C. Shen, "Structured Knowledge Distillation for Dense
    Prediction", TPAMI 2020. The fixed 2 x 2 pooling and the plain mean follow the CIRKD
    re-implementation (github.com/winycg/CIRKD) that HWD's comparison uses; the original SKD script
    instead pools with a window of half the feature map (``--pool-scale 0.5``, so a 2 x 2 grid of
    cells) and does not back-propagate through the norm.

    The teacher is detached inside: it never receives a gradient. Student and teacher may have
    different channel counts: only the ``hw x hw`` matrices are compared.

    **Memory**: two ``(N, hw, hw)`` matrices with ``hw = ceil(H / pool) * ceil(W / pool)``, in fp32;
    a 64 x 128 feature map at ``pool=2`` gives ``hw = 2048``, i.e. 16 MiB per image and matrix.
    A pooled position whose feature vector is exactly zero (e.g. after a ReLU) normalises to zero
    (similarity 0 with everything) and passes no gradient, where ``F.normalize`` would pass ``1e12``
    times the upstream gradient (inf for fp16 features); every other student gradient is bounded by
    ``8 / (N hw |f_i|)`` per element for ``"mean"``. The similarities are computed in fp32 (fp64 for
    fp64 inputs) also under ``torch.autocast``.

    Args:
        student_feat: student feature map.
        teacher_feat: teacher feature map; same ``N, H, W`` and device, any channel count.
        pool: pooling window and stride, an int >= 1 (1 = no pooling). Default 2.
        reduction: ``"mean"`` averages the ``N * hw * hw`` squared differences (the formula);
            ``"sum"`` adds them; ``"none"`` returns them as ``(N, hw, hw)``.

    Shape:
        - student_feat: ``(N, C_S, H, W)``; teacher_feat: ``(N, C_T, H, W)``.
        - output: scalar, or ``(N, hw, hw)`` with ``reduction="none"``.

    Returns:
        The loss, in fp32 (fp64 for fp64 inputs).

    Raises:
        TypeError: non-tensor or integer inputs, non-int ``pool``.
        ValueError: not 4-D, ``N, H, W`` or devices differ, empty input, ``pool < 1``, unknown ``reduction``.

    Example:
        >>> import torch
        >>> from segkd.losses.skd import skd_pairwise_loss
        >>> _ = torch.manual_seed(0)
        >>> student = torch.randn(2, 8, 16, 16, requires_grad=True)
        >>> teacher = torch.randn(2, 32, 16, 16)
        >>> loss = skd_pairwise_loss(student, teacher, pool=2)
        >>> round(loss.item(), 4)
        0.0322
        >>> loss.backward()
        >>> skd_pairwise_loss(student, teacher, reduction="none").shape
        torch.Size([2, 64, 64])
    """
    reduction = _checks.check_reduction(reduction)  # type: ignore[assignment]
    pool = _checks.check_positive_int(pool, "pool")
    _checks.check_student_teacher_features(student_feat, teacher_feat, "student_feat", "teacher_feat")
    dtype = compute_dtype(student_feat)
    sim_s = _pairwise_similarity(student_feat.to(dtype), pool)
    sim_t = _pairwise_similarity(teacher_feat.detach().to(dtype), pool)
    return reduce_terms((sim_s - sim_t).square(), reduction)


# --------------------------------------------------------------------------------------------------
# The bundle
# --------------------------------------------------------------------------------------------------


class SKDLoss(nn.Module):
    r"""Structured knowledge distillation: pair-wise + pixel-wise + holistic (adversarial) terms.

    .. math::

        L_{student} = \lambda_{pa} L_{pa}(f_S, f_T) + \lambda_{pi} L_{pi}(z_S, z_T)
                      + \lambda_{adv} L_G\left(D(z_S)\right), \qquad
        L_{D} = \lambda_{d} \, L_{hinge}\left(D(z_T), D(z_S)\right)

    with :func:`skd_pairwise_loss` on features, :func:`pixel_kd_loss` on logits, and the
    :class:`SKDDiscriminator` ``D`` trained by :func:`skd_discriminator_hinge_loss` while the
    student is trained with :func:`skd_generator_hinge_loss`. The defaults are the weights of the
    CIRKD re-implementation that HWD's comparison uses: pair-wise 10, pixel-wise 1, adversarial
    0.001, discriminator 0.1 (the original SKD script: pixel-wise 10, pair-wise 0.5 with
    half-map pooling, discriminator 0.1).

    Reference: Y. Liu, C. Shu, J. Wang, C. Shen, "Structured Knowledge Distillation for Dense
    Prediction", TPAMI 2020.

    **forward** ``(student_logits, teacher_logits, student_feat, teacher_feat, labels=None)``
    returns ``(loss, terms)``: ``loss`` is :math:`L_{student}` (add it to the task loss; the teacher
    never receives a gradient, but the discriminator's parameters do, see below) and ``terms`` is a
    dict of the **unweighted**, detached ``"pairwise"``, ``"pixel"`` and ``"adversarial"`` values
    for logging. A term whose weight is 0 is not computed (no discriminator pass, no ``hw x hw``
    matrices) and reported as 0. ``labels`` only mask the pixel-wise term.
    **discriminator_loss** ``(student_logits, teacher_logits)`` returns :math:`L_D`, computed from
    detached logits.

    **Trainable parts**: ``self.discriminator`` (an :class:`SKDDiscriminator`); its parameters and
    buffers are in ``state_dict()`` (save them to resume), and they are the only parameters of this
    module. They **must be given to their own optimizer**, not the student's: the student's
    ``loss.backward()`` also leaves gradients in the discriminator, so zero the discriminator's
    gradients before its own backward, as below. The training step:

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from segkd.losses.skd import SKDLoss
        >>> _ = torch.manual_seed(0)
        >>> backbone, head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)  # a toy student, 4 classes
        >>> skd = SKDLoss(num_classes=4, conv_dim=8)  # conv_dim=64 in the paper; 8 keeps the example small
        >>> opt_student = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=0.01)
        >>> opt_disc = torch.optim.Adam(skd.discriminator.parameters(), lr=4e-4, betas=(0.9, 0.99))
        >>> images = torch.randn(2, 3, 64, 64)
        >>> teacher_feat, teacher_logits = torch.randn(2, 16, 64, 64), torch.randn(2, 4, 64, 64)
        >>> student_feat = backbone(images)
        >>> student_logits = head(student_feat)
        >>> # 1) student step: the distillation loss (plus the task loss in real training)
        >>> loss, terms = skd(student_logits, teacher_logits, student_feat, teacher_feat)
        >>> opt_student.zero_grad()
        >>> loss.backward()
        >>> opt_student.step()
        >>> # 2) discriminator step, with its own optimizer (zero_grad clears what step 1 left)
        >>> d_loss = skd.discriminator_loss(student_logits, teacher_logits)
        >>> opt_disc.zero_grad()
        >>> d_loss.backward()
        >>> opt_disc.step()
        >>> {name: round(value.item(), 4) for name, value in terms.items()}
        {'pairwise': 0.0375, 'pixel': 0.3224, 'adversarial': -0.0796}
        >>> round(loss.item(), 4), round(d_loss.item(), 4)
        (0.697, 0.1991)

    Args:
        num_classes: number of classes (the logits' channels), for the discriminator.
        pairwise_weight: :math:`\lambda_{pa}`, >= 0 (default 10).
        pixel_weight: :math:`\lambda_{pi}`, >= 0 (default 1).
        adversarial_weight: :math:`\lambda_{adv}`, >= 0 (default 0.001).
        discriminator_weight: :math:`\lambda_d`, >= 0 (default 0.1).
        pool: pooling window of the pair-wise term (default 2).
        tau: temperature of the pixel-wise term (default 1).
        ignore_index: label value ignored by the pixel-wise term (default 255).
        conv_dim: width of the discriminator (default 64).
        preprocess: the discriminator's input pre-processing (default ``"batchnorm"``).
        spectral_norm: spectral normalisation in the discriminator (default True).

    Shape:
        - student_logits, teacher_logits: ``(N, C, H, W)`` with ``C = num_classes`` and
          ``H, W >= 64`` when ``adversarial_weight`` or ``discriminator_weight`` is non-zero.
        - student_feat: ``(N, C_S, h, w)``; teacher_feat: ``(N, C_T, h, w)``.
        - labels (optional): ``(N, H, W)``.
        - output: ``(scalar, dict of scalars)``; ``discriminator_loss``: scalar.

    Raises:
        TypeError, ValueError: as the functions above, for the arguments and inputs.
    """

    TERMS = ("pairwise", "pixel", "adversarial")

    def __init__(
        self,
        num_classes: int,
        pairwise_weight: float = 10.0,
        pixel_weight: float = 1.0,
        adversarial_weight: float = 0.001,
        discriminator_weight: float = 0.1,
        *,
        pool: int = 2,
        tau: float = 1.0,
        ignore_index: int = 255,
        conv_dim: int = 64,
        preprocess: Preprocess = "batchnorm",
        spectral_norm: bool = True,
    ) -> None:
        super().__init__()
        self.pairwise_weight = _checks.check_non_negative(pairwise_weight, "pairwise_weight")
        self.pixel_weight = _checks.check_non_negative(pixel_weight, "pixel_weight")
        self.adversarial_weight = _checks.check_non_negative(adversarial_weight, "adversarial_weight")
        self.discriminator_weight = _checks.check_non_negative(discriminator_weight, "discriminator_weight")
        self.pool = _checks.check_positive_int(pool, "pool")
        self.tau = _checks.check_temperature(tau)
        self.ignore_index = _checks.check_int(ignore_index, "ignore_index")
        self.discriminator = SKDDiscriminator(num_classes, conv_dim, preprocess, spectral_norm)

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        student_feat: Tensor,
        teacher_feat: Tensor,
        labels: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Return the student's weighted SKD loss and the unweighted, detached terms."""
        _checks.check_student_teacher_logits(student_logits, teacher_logits, min_dims=4)
        _checks.check_exact_dims(student_logits, "student_logits", 4, "(N, C, H, W)")
        _checks.check_channels(student_logits, "student_logits", self.discriminator.num_classes, "num_classes")
        dtype = compute_dtype(student_logits)
        zero = student_logits.new_zeros((), dtype=dtype)
        pairwise = pixel = adversarial = zero
        if self.pairwise_weight != 0:
            pairwise = skd_pairwise_loss(student_feat, teacher_feat, self.pool)
        if self.pixel_weight != 0:
            pixel = pixel_kd_loss(student_logits, teacher_logits, self.tau, labels, self.ignore_index)
        if self.adversarial_weight != 0:
            adversarial = skd_generator_hinge_loss(self.discriminator(student_logits)).to(dtype)
        loss = self.pairwise_weight * pairwise + self.pixel_weight * pixel + self.adversarial_weight * adversarial
        terms = {"pairwise": pairwise.detach(), "pixel": pixel.detach(), "adversarial": adversarial.detach()}
        return loss, terms

    def discriminator_loss(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """Return ``discriminator_weight`` times the hinge loss of the discriminator on detached logits.

        Back-propagate it into the discriminator's own optimizer; it gives no gradient to the
        student or the teacher. With ``discriminator_weight == 0`` it is a zero tensor.
        """
        _checks.check_student_teacher_logits(student_logits, teacher_logits, min_dims=4)
        _checks.check_exact_dims(student_logits, "student_logits", 4, "(N, C, H, W)")
        _checks.check_channels(student_logits, "student_logits", self.discriminator.num_classes, "num_classes")
        if self.discriminator_weight == 0:
            return student_logits.new_zeros((), dtype=compute_dtype(student_logits))
        real = self.discriminator(teacher_logits.detach())
        fake = self.discriminator(student_logits.detach())
        return self.discriminator_weight * skd_discriminator_hinge_loss(real, fake)

    def extra_repr(self) -> str:
        return (
            f"pairwise_weight={self.pairwise_weight}, pixel_weight={self.pixel_weight}, "
            f"adversarial_weight={self.adversarial_weight}, discriminator_weight={self.discriminator_weight}, "
            f"pool={self.pool}, tau={self.tau}, ignore_index={self.ignore_index}"
        )
