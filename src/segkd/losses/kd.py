"""Pixel-wise knowledge distillation: the per-pixel KL between class distributions (SKD, IFVD and CIRKD use it)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from segkd import _checks
from segkd.losses._dtypes import compute_dtype
from segkd.losses._reduction import reduce_terms

if TYPE_CHECKING:
    from segkd.testing.checks import LossDeclaration

__all__ = ["KDLoss", "pixel_kd_loss"]

Reduction = Literal["mean", "sum", "none"]


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

    **Masked logits** (``-inf``): 0 log 0 = 0, a class whose teacher probability is 0 contributes
    nothing, whatever the student has there. A student ``-inf`` where the teacher's probability is
    positive gives ``+inf`` (the true KL; the gradient stays finite). A pixel whose teacher logits
    are all ``-inf`` has no distribution: NaN, unless ``labels`` ignore it.

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
            ``tau`` outside ``[1e-12, 1e12]``, unknown ``reduction``.

    Example:
        >>> import torch
        >>> from segkd.losses.kd import pixel_kd_loss
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
    tau = _checks.check_temperature(tau)
    _checks.check_student_teacher_logits(student, teacher, min_dims=4)
    _checks.check_exact_dims(student, "student", 4, "(N, C, H, W)")
    n, _, h, w = student.shape
    kept: Tensor | None = None
    if labels is not None:
        _checks.check_int(ignore_index, "ignore_index")
        labels = _checks.check_labels(labels, batch_size=n)
        _checks.check_labels_shape(labels, (n, h, w))
        _checks.check_same_device(student, labels, "student", "labels")
        kept = labels != ignore_index
    dtype = compute_dtype(student)
    log_p_s = torch.log_softmax(student.to(dtype) / tau, dim=1)
    log_p_t = torch.log_softmax(teacher.detach().to(dtype) / tau, dim=1)
    p_t = log_p_t.exp()
    if kept is not None:  # an ignored pixel contributes nothing, in value and gradient, whatever its logits
        p_t = torch.where(kept[:, None], p_t, 0.0)
    # 0 log 0 = 0: where p_T = 0 (a teacher logit of -inf, or an underflow) the term is 0 whatever log p_S is;
    # `p_t == 0` (not `> 0`) keeps a NaN teacher NaN.
    terms = torch.where(p_t == 0, 0.0, p_t * (log_p_t - log_p_s))
    # KL >= 0, but for near-equal pixels rounding can leave ~-1e-7: clamp it, as channel_kl does.
    terms = terms.sum(dim=1).clamp_min(0) * (tau * tau)  # (N, H, W)
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
        >>> from segkd.losses.kd import KDLoss
        >>> _ = torch.manual_seed(0)
        >>> criterion = KDLoss(tau=1.0)
        >>> student, teacher = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
        >>> round(criterion(student, teacher).item(), 4)
        0.6564
    """

    def __init__(self, tau: float = 1.0, ignore_index: int = 255, reduction: Reduction = "mean") -> None:
        super().__init__()
        self.tau = _checks.check_temperature(tau)
        self.ignore_index = _checks.check_int(ignore_index, "ignore_index")
        self.reduction: Reduction = _checks.check_reduction(reduction)  # type: ignore[assignment]

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor | None = None) -> Tensor:
        """Return the pixel-wise KD loss of ``student`` logits towards ``teacher`` logits."""
        return pixel_kd_loss(student, teacher, self.tau, labels, self.ignore_index, self.reduction)

    def distillation_checks(self) -> LossDeclaration:
        """The properties :func:`segkd.testing.check_distillation_loss` checks on this loss, and its reference."""
        from segkd.testing.checks import LossDeclaration
        from segkd.testing.reference import pixel_kd_loss_reference

        tau, ignore_index, reduction = self.tau, self.ignore_index, self.reduction

        def reference(student: Tensor, teacher: Tensor, labels: Tensor | None = None) -> Tensor:
            return pixel_kd_loss_reference(student, teacher, tau, labels, ignore_index, reduction)

        return LossDeclaration(zero_at_equal=True, pixel_shift_invariant=True, reference=reference)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, ignore_index={self.ignore_index}, reduction={self.reduction!r}"


# With its default settings the function declares what the module with its defaults declares (segkd.testing).
pixel_kd_loss.distillation_checks = lambda: KDLoss().distillation_checks()  # type: ignore[attr-defined]
