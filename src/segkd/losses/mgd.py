"""Masked generative distillation (MGD), Yang et al., ECCV 2022."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from segkd import _checks
from segkd.losses._dtypes import to_layer_dtype

if TYPE_CHECKING:
    from segkd.testing.checks import LossDeclaration

__all__ = ["MGDLoss", "mgd_loss", "mgd_mask"]

Reduction = Literal["mean", "sum", "none"]


def mgd_mask(
    shape: tuple[int, int, int],
    mask_ratio: float,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""The random spatial keep-mask of MGD: each position is zeroed with probability ``mask_ratio``.

    As in the original code, one uniform draw :math:`u \sim U[0, 1)` per image and position, and
    the position is dropped where :math:`u > 1 - \text{mask\_ratio}`. The same mask applies to every
    channel.

    Args:
        shape: ``(N, h, w)``.
        mask_ratio: fraction of positions to zero, in ``[0, 1)``.
        device: device of the returned mask (default: the generator's device, else the CPU).
        dtype: floating dtype of the returned mask.
        generator: random source. The draw happens on the generator's device and the mask is then
            moved to ``device``, so a CPU generator also drives masks for CUDA features. ``None``
            draws from the global RNG of ``device``.

    Shape:
        - output: ``(N, 1, h, w)`` of zeros and ones.

    Returns:
        The keep-mask.

    Raises:
        ValueError: ``mask_ratio`` outside ``[0, 1)``.

    Example:
        >>> import torch
        >>> from segkd.losses.mgd import mgd_mask
        >>> mask = mgd_mask((1, 2, 4), 0.5, generator=torch.Generator().manual_seed(0))
        >>> mask.shape, mask.sum().item()
        (torch.Size([1, 1, 2, 4]), 5.0)
    """
    mask_ratio = _checks.check_probability(mask_ratio, "mask_ratio")
    generator = _checks.check_generator(generator)
    size = (int(shape[0]), 1, int(shape[1]), int(shape[2]))
    if generator is not None:
        draw = torch.rand(size, generator=generator, device=generator.device)
        if device is not None:
            draw = draw.to(device)
    else:
        draw = torch.rand(size, device=device)
    return (draw <= 1.0 - mask_ratio).to(dtype)


def mgd_loss(
    student: Tensor,
    teacher: Tensor,
    align: Callable[[Tensor], Tensor] | None,
    generation: Callable[[Tensor], Tensor],
    alpha: float = 2e-5,
    mask_ratio: float = 0.75,
    reduction: Reduction = "mean",
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Masked generative distillation loss.

    The student's feature is aligned to the teacher's width, a random fraction ``mask_ratio`` of
    its spatial positions is zeroed, and a small generation block must rebuild the teacher's
    feature from what is left:

    .. math::

        L = \frac{\alpha}{N} \sum_{n, c, i, j}
            \left(\mathcal{G}\big(M_n \odot \mathcal{A}(S)_n\big)_{c,i,j} - T_{n,c,i,j}\right)^2,

    with :math:`\mathcal{A}` the align layer (identity when ``align is None``), :math:`M` the
    keep-mask of :func:`mgd_mask` (shape ``(N, 1, h, w)``) and :math:`\mathcal{G}` the generation
    block. The squared error is summed in fp32 (fp64 for fp64 input), also under autocast.

    Reference: Z. Yang, Z. Li, M. Shao, D. Shi, Z. Yuan, C. Yuan, "Masked Generative Distillation",
    ECCV 2022. Segmentation settings of the original code: ``alpha=2e-5``, ``mask_ratio=0.75`` on the
    last backbone stage.

    ``align`` and ``generation`` are trainable (see :class:`MGDLoss`, which owns them); the teacher
    is detached inside: it never receives a gradient.

    Args:
        student: student feature maps.
        teacher: teacher feature maps; same ``N``, ``h``, ``w`` and device.
        align: maps ``(N, C_S, h, w)`` to ``(N, C_T, h, w)`` (the original: a 1x1 conv), or ``None``
            when the widths already match.
        generation: maps ``(N, C_T, h, w)`` to ``(N, C_T, h, w)`` (the original: 3x3 conv, ReLU, 3x3 conv).
        alpha: loss weight, >= 0 (segmentation: 2e-5).
        mask_ratio: fraction of positions zeroed, in ``[0, 1)`` (segmentation: 0.75).
        reduction: ``"mean"`` divides the sum by the batch size ``N`` (the formula above, as in the
            original); ``"sum"`` does not; ``"none"`` returns the ``(N,)`` per-image sums times ``alpha``.
        generator: random source of the mask (see :func:`mgd_mask`); a generator seeded the same
            way gives the same loss.

    Shape:
        - student: ``(N, C_S, h, w)``; teacher: ``(N, C_T, h, w)``.
        - output: scalar, or ``(N,)`` with ``reduction="none"``.

    Returns:
        The loss, in fp32 (fp64 when the generated feature is fp64).

    Raises:
        TypeError: non-tensor or integer features, non-numeric ``alpha`` or ``mask_ratio``.
        ValueError: features not 4-D, different ``N``, ``h``, ``w`` or device, empty input,
            ``mask_ratio`` outside ``[0, 1)``, ``alpha < 0``, ``align`` missing for different widths,
            an ``align`` or ``generation`` output of the wrong shape, unknown ``reduction``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from segkd.losses.mgd import mgd_loss
        >>> _ = torch.manual_seed(0)
        >>> align = nn.Conv2d(4, 8, kernel_size=1)
        >>> generation = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        >>> student, teacher = torch.randn(2, 4, 8, 8), torch.randn(2, 8, 8, 8)
        >>> loss = mgd_loss(student, teacher, align, generation, alpha=1.0,
        ...                 generator=torch.Generator().manual_seed(0))
        >>> round(loss.item(), 4)
        520.7194
        >>> loss.backward()
        >>> generation[0].weight.grad is not None
        True
    """
    reduction = _checks.check_reduction(reduction)  # type: ignore[assignment]
    alpha = _checks.check_non_negative(alpha, "alpha")
    mask_ratio = _checks.check_probability(mask_ratio, "mask_ratio")
    _checks.check_student_teacher_features(student, teacher, layout="(N, C, h, w)")

    teacher = teacher.detach()
    if align is None:
        _checks.check_same_shape(student, teacher, "student (no `align` layer)", "teacher")
        aligned = student
    else:
        aligned = align(student)
        _checks.check_same_shape(aligned, teacher, "align(student)", "teacher")
    batch, _, height, width = aligned.shape
    mask = mgd_mask((batch, height, width), mask_ratio, device=aligned.device, dtype=aligned.dtype, generator=generator)
    generated = generation(aligned * mask)
    _checks.check_same_shape(generated, teacher, "generation(masked student)", "teacher")
    compute_dtype = torch.float64 if generated.dtype == torch.float64 else torch.float32
    per_image = (generated.to(compute_dtype) - teacher.to(compute_dtype)).square().flatten(1).sum(dim=1)
    if reduction == "none":
        return per_image * alpha
    total = per_image.sum() * alpha
    return total / batch if reduction == "mean" else total


class MGDLoss(nn.Module):
    r"""Masked generative distillation loss with its trainable layers; see :func:`segkd.functional.mgd_loss`.

    Trainable parts (module parameters, saved in ``state_dict()``): ``align``, a 1x1 conv from
    ``student_channels`` to ``teacher_channels`` (``None`` when they are equal), and ``generation``,
    3x3 conv, ReLU, 3x3 conv at ``teacher_channels`` width (padding 1, with bias, PyTorch's default
    initialisation, as in the original). **Give** ``criterion.parameters()`` **to the optimizer**
    next to the student's, otherwise the generator never learns and the loss only pulls the student
    towards whatever a random generator makes of it. They are training-time only: the deployed
    student does not use them.

    **Dtypes**: the layers compute in their own dtype (``criterion.to(dtype)``); outside autocast a
    student of another floating dtype (an fp16 student, fp32 layers) is cast to it, and its gradient
    comes back in the student's dtype. Under autocast, autocast chooses.

    Reference: Z. Yang et al., "Masked Generative Distillation", ECCV 2022.

    Args:
        student_channels: ``C_S``, width of the student feature.
        teacher_channels: ``C_T``, width of the teacher feature.
        alpha: loss weight, >= 0 (default 2e-5, the original segmentation setting).
        mask_ratio: fraction of positions zeroed, in ``[0, 1)`` (default 0.75, the original's
            ``lambda_mgd``).
        generator: random source of the masks (see :func:`segkd.losses.mgd.mgd_mask`); ``None`` uses
            the global RNG. Not part of the ``state_dict``.
        reduction: ``"mean"`` (sum over the batch divided by ``N``), ``"sum"`` or ``"none"`` (``(N,)``).

    Shape:
        - student: ``(N, C_S, h, w)``; teacher: ``(N, C_T, h, w)``.
        - output: scalar, or ``(N,)`` with ``reduction="none"``.

    Raises:
        ValueError: at construction, non-positive channel counts, ``alpha < 0`` or ``mask_ratio``
            outside ``[0, 1)``; in ``forward``, features whose channel counts differ from the declared
            ones, plus everything :func:`segkd.functional.mgd_loss` checks.

    Example:
        >>> import torch
        >>> from segkd.losses.mgd import MGDLoss
        >>> _ = torch.manual_seed(0)
        >>> criterion = MGDLoss(student_channels=4, teacher_channels=8, alpha=1.0,
        ...                     generator=torch.Generator().manual_seed(0))
        >>> sorted(criterion.state_dict())[:2]
        ['align.bias', 'align.weight']
        >>> student, teacher = torch.randn(2, 4, 8, 8), torch.randn(2, 8, 8, 8)
        >>> optimizer = torch.optim.SGD(criterion.parameters(), lr=0.01)  # plus the student's parameters
        >>> round(criterion(student, teacher).item(), 4)
        520.7194
    """

    align: nn.Conv2d | None

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        alpha: float = 2e-5,
        mask_ratio: float = 0.75,
        generator: torch.Generator | None = None,
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__()
        self.student_channels = _checks.check_positive_int(student_channels, "student_channels")
        self.teacher_channels = _checks.check_positive_int(teacher_channels, "teacher_channels")
        self.alpha = _checks.check_non_negative(alpha, "alpha")
        self.mask_ratio = _checks.check_probability(mask_ratio, "mask_ratio")
        self.reduction: Reduction = _checks.check_reduction(reduction)  # type: ignore[assignment]
        self.generator = _checks.check_generator(generator)
        if student_channels != teacher_channels:
            self.align = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
        else:
            self.align = None
        self.generation = nn.Sequential(
            nn.Conv2d(teacher_channels, teacher_channels, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(teacher_channels, teacher_channels, kernel_size=3, padding=1),
        )

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        """Return the MGD loss of ``student`` towards ``teacher`` (one fresh random mask per call)."""
        _checks.check_floating_tensor(student, "student")
        _checks.check_floating_tensor(teacher, "teacher")
        _checks.check_channels(student, "student", self.student_channels, "student_channels")
        _checks.check_channels(teacher, "teacher", self.teacher_channels, "teacher_channels")
        return mgd_loss(
            to_layer_dtype(student, self),
            teacher,
            self.align,
            self.generation,
            self.alpha,
            self.mask_ratio,
            self.reduction,
            generator=self.generator,
        )

    def distillation_checks(self) -> LossDeclaration:
        """The inputs :func:`segkd.testing.check_distillation_loss` needs: a teacher of ``teacher_channels``."""
        from segkd.testing.checks import LossDeclaration

        return LossDeclaration(teacher_channels=self.teacher_channels)

    def extra_repr(self) -> str:
        return (
            f"student_channels={self.student_channels}, teacher_channels={self.teacher_channels}, "
            f"alpha={self.alpha}, mask_ratio={self.mask_ratio}, reduction={self.reduction!r}"
        )
