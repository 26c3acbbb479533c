"""Structured knowledge distillation (SKD), Liu et al., TPAMI 2020: pair-wise, pixel-wise and holistic terms."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from segkd import _checks
from segkd.losses._reduction import reduce_terms
from segkd.losses._vectors import unit_vectors

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
Preprocess = Literal["batchnorm", "tanh", "none"]
PREPROCESS_MODES = ("batchnorm", "tanh", "none")


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


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
    dtype = _compute_dtype(student_feat)
    sim_s = _pairwise_similarity(student_feat.to(dtype), pool)
    sim_t = _pairwise_similarity(teacher_feat.detach().to(dtype), pool)
    return reduce_terms((sim_s - sim_t).square(), reduction)


# --------------------------------------------------------------------------------------------------
# Pixel-wise term
# --------------------------------------------------------------------------------------------------


def pixel_kd_loss(
    student: Tensor,
    teacher: Tensor,
    tau: float = 1.0,
    labels: Tensor | None = None,
    ignore_index: int = 255,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""Pixel-wise distillation: the KL divergence between class distributions at every pixel.

    .. math::

        p[n, :, h, w] = \mathrm{softmax}_c\left(z[n, :, h, w] / \tau\right), \qquad
        L = \frac{\tau^2}{|K|} \sum_{(n, h, w) \in K}
            \mathrm{KL}\left(p_T[n, :, h, w] \,\|\, p_S[n, :, h, w]\right),

    where :math:`K` is the set of kept pixels: all ``N * H * W`` pixels without ``labels``, else
    those whose label is not ``ignore_index``. **All pixels ignored**: the loss is 0 (finite, zero
    gradient), not NaN.

    Reference: Y. Liu, C. Shu, J. Wang, C. Shen, "Structured Knowledge Distillation for Dense
    Prediction", TPAMI 2020. This is the CIRKD form (``F.kl_div(..., reduction="batchmean")`` over
    the ``N * H * W`` pixels, times :math:`\tau^2`); the original SKD code uses the cross-entropy
    :math:`-\sum p_T \log p_S` (the same gradient: it differs by the teacher's entropy) summed over
    the batch and divided by ``H * W`` only, at :math:`\tau = 1`.

    The teacher is detached inside: it never receives a gradient.

    Args:
        student: student logits.
        teacher: teacher logits, same shape and device.
        tau: temperature, > 0. Default 1 (SKD and CIRKD).
        labels: optional integer label map; pixels equal to ``ignore_index`` are left out.
        ignore_index: label value to ignore. Default 255.
        reduction: ``"mean"`` divides by the number of kept pixels (the formula); ``"sum"`` adds the
            kept terms; ``"none"`` returns the ``(N, H, W)`` map of ``tau^2 * KL`` with ignored
            pixels set to 0.

    Shape:
        - student, teacher: ``(N, C, H, W)``.
        - labels: ``(N, H, W)``, integer dtype.
        - output: scalar, or ``(N, H, W)`` with ``reduction="none"``.

    Returns:
        The loss, in fp32 (fp64 for fp64 inputs).

    Raises:
        TypeError: non-tensor or integer logits, labels not an integer tensor, non-int ``ignore_index``.
        ValueError: shapes or devices differ, logits not 4-D, labels not ``(N, H, W)`` of the logits,
            ``tau <= 0``, unknown ``reduction``.

    Example:
        >>> import torch
        >>> from segkd.losses.skd import pixel_kd_loss
        >>> _ = torch.manual_seed(0)
        >>> student = torch.randn(2, 4, 8, 8, requires_grad=True)
        >>> teacher = torch.randn(2, 4, 8, 8)
        >>> round(pixel_kd_loss(student, teacher).item(), 4)
        0.6564
        >>> labels = torch.randint(0, 4, (2, 8, 8))
        >>> labels[:, :4] = 255
        >>> round(pixel_kd_loss(student, teacher, labels=labels).item(), 4)
        0.5894
        >>> pixel_kd_loss(student, teacher, labels=torch.full((2, 8, 8), 255)).item()
        0.0
    """
    reduction = _checks.check_reduction(reduction)  # type: ignore[assignment]
    tau = _checks.check_positive(tau, "tau")
    _checks.check_student_teacher_logits(student, teacher, min_dims=4)
    _checks.check_exact_dims(student, "student", 4, "(N, C, H, W)")
    n, _, h, w = student.shape
    kept: Tensor | None = None
    if labels is not None:
        _checks.check_int(ignore_index, "ignore_index")
        _checks.check_labels(labels, batch_size=n)
        _checks.check_labels_shape(labels, (n, h, w))
        _checks.check_same_device(student, labels, "student", "labels")
        kept = labels != ignore_index
    dtype = _compute_dtype(student)
    log_p_s = torch.log_softmax(student.to(dtype) / tau, dim=1)
    log_p_t = torch.log_softmax(teacher.detach().to(dtype) / tau, dim=1)
    # log_softmax of finite logits is finite, so an underflowed p_T gives 0 * finite = 0, never NaN.
    # KL >= 0, but for near-equal pixels rounding can leave ~-1e-7: clamp it, as channel_kl does.
    terms = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).clamp_min(0) * (tau * tau)  # (N, H, W)
    if kept is None:
        return reduce_terms(terms, reduction)
    terms = torch.where(kept, terms, torch.zeros_like(terms))
    if reduction == "mean":
        return terms.sum() / kept.sum().clamp_min(1).to(terms.dtype)
    return reduce_terms(terms, reduction)


class KDLoss(nn.Module):
    r"""Pixel-wise KL distillation as a module; see :func:`segkd.functional.pixel_kd_loss`.

    Has no trainable parameters. SKD and CIRKD use ``tau = 1`` at weight 1.

    Args:
        tau: temperature, > 0.
        ignore_index: label value to ignore when ``labels`` are passed.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Shape:
        - student, teacher: ``(N, C, H, W)`` logits; labels (optional): ``(N, H, W)``.
        - output: scalar, or ``(N, H, W)`` with ``reduction="none"``.

    Example:
        >>> import torch
        >>> from segkd.losses.skd import KDLoss
        >>> _ = torch.manual_seed(0)
        >>> criterion = KDLoss(tau=1.0)
        >>> student, teacher = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
        >>> round(criterion(student, teacher).item(), 4)
        0.6564
    """

    def __init__(self, tau: float = 1.0, ignore_index: int = 255, reduction: Reduction = "mean") -> None:
        super().__init__()
        self.tau = _checks.check_positive(tau, "tau")
        self.ignore_index = _checks.check_int(ignore_index, "ignore_index")
        self.reduction: Reduction = _checks.check_reduction(reduction)  # type: ignore[assignment]

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor | None = None) -> Tensor:
        """Return the pixel-wise KD loss of ``student`` logits towards ``teacher`` logits."""
        return pixel_kd_loss(student, teacher, self.tau, labels, self.ignore_index, self.reduction)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, ignore_index={self.ignore_index}, reduction={self.reduction!r}"


# --------------------------------------------------------------------------------------------------
# Holistic (adversarial) term
# --------------------------------------------------------------------------------------------------


class _SelfAttention(nn.Module):
    """SAGAN self-attention: ``x + gamma * attention(x)``, with ``gamma`` initialised to 0."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        inner = max(channels // 8, 1)
        self.query = nn.Conv2d(channels, inner, kernel_size=1)
        self.key = nn.Conv2d(channels, inner, kernel_size=1)
        self.value = nn.Conv2d(channels, channels, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        query = self.query(x).flatten(2)  # (N, C', hw)
        key = self.key(x).flatten(2)  # (N, C', hw)
        attention = torch.softmax(torch.bmm(query.transpose(1, 2), key), dim=-1)  # (N, hw_query, hw_key)
        value = self.value(x).flatten(2)  # (N, C, hw)
        out = torch.bmm(value, attention.transpose(1, 2)).reshape(n, c, h, w)
        return x + self.gamma * out


class SKDDiscriminator(nn.Module):
    r"""The SKD holistic-distillation discriminator: a small SAGAN-style critic on segmentation logits.

    It scores a whole map of logits (real: the teacher's; fake: the student's) so that the student
    learns to produce maps the critic cannot tell from the teacher's. Architecture, as in the SKD
    and CIRKD code:

    .. math::

        x \to \mathrm{pre}(x) \to [\mathrm{SN\,conv}_{4\times4/2},\ \mathrm{LeakyReLU}_{0.1}]^{3}
        \to \mathrm{SelfAttn} \to \mathrm{SN\,conv}_{4\times4/2},\ \mathrm{LeakyReLU}_{0.1}
        \to \mathrm{SelfAttn} \to \mathrm{conv}_{4\times4} \to \text{scores},

    with widths ``conv_dim * (1, 2, 4, 8)``, spectral normalisation (SN, one power iteration) on the
    four stride-2 convolutions, SAGAN self-attention blocks whose residual gate ``gamma`` starts at 0,
    and ``pre`` a ``BatchNorm2d`` over the classes (the ``preprocess_GAN_mode=1`` the CIRKD script
    uses). Each stride-2 convolution halves the map and the last needs 4 x 4, so the logits must be
    at least 64 x 64; the scores have shape ``(N, 1, H // 16 - 3, W // 16 - 3)``.

    Reference: Y. Liu, C. Shu, J. Wang, C. Shen, "Structured Knowledge Distillation for Dense
    Prediction", TPAMI 2020; the self-attention is from H. Zhang et al., "Self-Attention Generative
    Adversarial Networks", ICML 2019.

    **Trainable**: all of its parameters (and the BatchNorm statistics, and the spectral-norm power
    iteration vectors, as buffers) are in ``state_dict()``. Give ``discriminator.parameters()`` to
    **their own optimizer** (CIRKD: Adam, lr 4e-4, betas (0.9, 0.99)), never to the student's; see
    :class:`SKDLoss` for the training step. Unlike the original code, ``forward`` returns the scores
    only (not the attention maps), and ``torch.nn.utils.parametrizations.spectral_norm`` updates its
    power iteration in training mode only.

    Args:
        num_classes: number of classes ``C`` (the logits' channels), >= 1.
        conv_dim: width of the first convolution, >= 1 (default 64, as in the paper's code).
        preprocess: ``"batchnorm"`` (default), ``"tanh"`` or ``"none"``: applied to the logits first.
        spectral_norm: wrap the stride-2 convolutions in spectral normalisation (default True).

    Shape:
        - input: ``(N, C, H, W)`` logits with ``H, W >= 64``.
        - output: ``(N, 1, H // 16 - 3, W // 16 - 3)`` scores (higher: more teacher-like).

    Raises:
        TypeError: non-int ``num_classes`` or ``conv_dim``; non-tensor or integer input.
        ValueError: ``num_classes < 1``, ``conv_dim < 1``, unknown ``preprocess``; input not 4-D,
            without ``num_classes`` channels, or smaller than 64 x 64.

    Example:
        >>> import torch
        >>> from segkd.losses.skd import SKDDiscriminator
        >>> _ = torch.manual_seed(0)
        >>> disc = SKDDiscriminator(num_classes=5, conv_dim=8)
        >>> disc(torch.randn(2, 5, 64, 96)).shape
        torch.Size([2, 1, 1, 3])
    """

    MIN_SIZE = 64

    def __init__(
        self, num_classes: int, conv_dim: int = 64, preprocess: Preprocess = "batchnorm", spectral_norm: bool = True
    ) -> None:
        super().__init__()
        self.num_classes = _checks.check_positive_int(num_classes, "num_classes")
        self.conv_dim = _checks.check_positive_int(conv_dim, "conv_dim")
        self.preprocess_mode: Preprocess = _checks.check_choice(  # type: ignore[assignment]
            preprocess, "preprocess", PREPROCESS_MODES
        )
        self.spectral_norm = bool(spectral_norm)

        def down(in_channels: int, out_channels: int) -> nn.Sequential:
            conv: nn.Module = nn.Conv2d(in_channels, out_channels, kernel_size=4, stride=2, padding=1)
            if self.spectral_norm:
                conv = _spectral_norm(conv)
            return nn.Sequential(conv, nn.LeakyReLU(0.1))

        self.preprocess: nn.Module
        if preprocess == "batchnorm":
            self.preprocess = nn.BatchNorm2d(num_classes)
        elif preprocess == "tanh":
            self.preprocess = nn.Tanh()
        else:
            self.preprocess = nn.Identity()
        d = conv_dim
        self.layer1 = down(num_classes, d)
        self.layer2 = down(d, 2 * d)
        self.layer3 = down(2 * d, 4 * d)
        self.attn1 = _SelfAttention(4 * d)
        self.layer4 = down(4 * d, 8 * d)
        self.attn2 = _SelfAttention(8 * d)
        self.last = nn.Conv2d(8 * d, 1, kernel_size=4)

    def forward(self, logits: Tensor) -> Tensor:
        """Return the ``(N, 1, h, w)`` critic scores of a batch of logits."""
        _checks.check_floating_tensor(logits, "logits")
        _checks.check_exact_dims(logits, "logits", 4, "(N, C, H, W)")
        _checks.check_channels(logits, "logits", self.num_classes, "num_classes")
        _checks.check_min_spatial_size(
            logits, "logits", self.MIN_SIZE, "four stride-2 convolutions then a 4 x 4 one in SKDDiscriminator"
        )
        x = self.preprocess(logits)
        x = self.attn1(self.layer3(self.layer2(self.layer1(x))))
        x = self.attn2(self.layer4(x))
        return self.last(x)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, conv_dim={self.conv_dim}, "
            f"preprocess={self.preprocess_mode!r}, spectral_norm={self.spectral_norm}"
        )


def _check_scores(value: Tensor, name: str) -> None:
    _checks.check_floating_tensor(value, name)
    _checks.check_nonempty(value, name)


def skd_generator_hinge_loss(fake_scores: Tensor) -> Tensor:
    r"""The student's (generator's) side of the SKD hinge adversarial loss.

    .. math::

        L_G = -\frac{1}{|D(S)|} \sum D(S)

    the mean critic score of the student's logits, negated (the SAGAN hinge generator loss; the SKD
    and CIRKD code call it "hinge").

    Reference: Y. Liu, C. Shu, J. Wang, C. Shen, "Structured Knowledge Distillation for Dense
    Prediction", TPAMI 2020.

    Args:
        fake_scores: discriminator scores of the student's logits, **not** detached (the gradient
            must reach the student).

    Shape:
        - fake_scores: any non-empty shape, e.g. ``(N, 1, h, w)``.
        - output: scalar.

    Returns:
        The loss (same dtype as ``fake_scores``).

    Raises:
        TypeError: non-tensor or integer ``fake_scores``.
        ValueError: empty ``fake_scores``.

    Example:
        >>> import torch
        >>> from segkd.losses.skd import skd_generator_hinge_loss
        >>> skd_generator_hinge_loss(torch.tensor([[0.5, -1.5], [2.0, 1.0]]))
        tensor(-0.5000)
    """
    _check_scores(fake_scores, "fake_scores")
    return -fake_scores.mean()


def skd_discriminator_hinge_loss(real_scores: Tensor, fake_scores: Tensor) -> Tensor:
    r"""The discriminator's side of the SKD hinge adversarial loss.

    .. math::

        L_D = \mathrm{mean}\,\max\left(0,\, 1 - D(T)\right) + \mathrm{mean}\,\max\left(0,\, 1 + D(S)\right)

    The critic is pushed to score the teacher's logits (real) above +1 and the student's (fake)
    below -1. Compute both scores from **detached** logits so that this loss trains the
    discriminator only.

    Reference: Y. Liu, C. Shu, J. Wang, C. Shen, "Structured Knowledge Distillation for Dense
    Prediction", TPAMI 2020.

    Args:
        real_scores: discriminator scores of the teacher's logits.
        fake_scores: discriminator scores of the student's logits, same shape.

    Shape:
        - real_scores, fake_scores: the same non-empty shape, e.g. ``(N, 1, h, w)``.
        - output: scalar.

    Returns:
        The loss, in fp32 (fp64 for fp64 scores).

    Raises:
        TypeError: non-tensor or integer scores.
        ValueError: shapes or devices differ, empty scores.

    Example:
        >>> import torch
        >>> from segkd.losses.skd import skd_discriminator_hinge_loss
        >>> real = torch.tensor([2.0, 0.5])  # relu(1 - real) = [0, 0.5]
        >>> fake = torch.tensor([-2.0, 0.0])  # relu(1 + fake) = [0, 1]
        >>> skd_discriminator_hinge_loss(real, fake)
        tensor(0.7500)
    """
    _check_scores(real_scores, "real_scores")
    _check_scores(fake_scores, "fake_scores")
    _checks.check_same_shape(real_scores, fake_scores, "real_scores", "fake_scores")
    _checks.check_same_device(real_scores, fake_scores, "real_scores", "fake_scores")
    dtype = _compute_dtype(fake_scores)  # fp32 for half scores: the sum of two fp16 means can overflow
    return F.relu(1.0 - real_scores.to(dtype)).mean() + F.relu(1.0 + fake_scores.to(dtype)).mean()


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
        self.tau = _checks.check_positive(tau, "tau")
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
        dtype = _compute_dtype(student_logits)
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
            return student_logits.new_zeros((), dtype=_compute_dtype(student_logits))
        real = self.discriminator(teacher_logits.detach())
        fake = self.discriminator(student_logits.detach())
        return self.discriminator_weight * skd_discriminator_hinge_loss(real, fake)

    def extra_repr(self) -> str:
        return (
            f"pairwise_weight={self.pairwise_weight}, pixel_weight={self.pixel_weight}, "
            f"adversarial_weight={self.adversarial_weight}, discriminator_weight={self.discriminator_weight}, "
            f"pool={self.pool}, tau={self.tau}, ignore_index={self.ignore_index}"
        )
