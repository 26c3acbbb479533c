"""Intra-class feature variation distillation (IFVD), Wang et al., ECCV 2020."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segkd import _checks
from segkd.losses._reduction import reduce_terms

if TYPE_CHECKING:
    from segkd.testing.checks import LossDeclaration

__all__ = ["IFVDLoss", "class_centre_similarity", "ifvd_loss", "nearest_labels"]

Reduction = Literal["mean", "sum", "none"]

_COUNT_EPS = 1e-6  # added to the pixel count of each class, as in the original code
_COS_EPS = 1e-8  # lower bound of each norm in the cosine similarity (torch.nn.functional.cosine_similarity's eps)


def _nearest_source_index(in_size: int, out_size: int, device: torch.device) -> Tensor:
    # Resampling an arange with F.interpolate gives exactly the source index rule of mode="nearest"
    # (floor(i * in / out), clamped), which is what the original's nn.Upsample(mode="nearest") used.
    positions = torch.arange(in_size, dtype=torch.float32, device=device).view(1, 1, in_size)
    return F.interpolate(positions, size=out_size, mode="nearest").view(out_size).long()


def nearest_labels(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """Resample an integer label map to ``size`` with the rule of ``F.interpolate(mode="nearest")``.

    Works on the integer labels directly (no round trip through float), so every class id and
    ``ignore_index`` survives exactly; a no-op when the size already matches.

    Args:
        labels: integer label map.
        size: target ``(h, w)``.

    Shape:
        - labels: ``(N, H, W)``.
        - output: ``(N, h, w)``, same dtype.

    Returns:
        The resampled labels.

    Example:
        >>> import torch
        >>> from segkd.losses.ifvd import nearest_labels
        >>> nearest_labels(torch.arange(16).view(1, 4, 4), (2, 2))
        tensor([[[ 0,  2],
                 [ 8, 10]]])
    """
    height, width = labels.shape[-2:]
    if (height, width) == tuple(size):
        return labels
    rows = _nearest_source_index(height, size[0], labels.device)
    cols = _nearest_source_index(width, size[1], labels.device)
    return labels.index_select(-2, rows).index_select(-1, cols)


def class_centre_similarity(features: Tensor, index: Tensor, num_slots: int) -> Tensor:
    r"""Cosine similarity of each pixel's feature to the mean feature of its class in the same image.

    .. math::

        c_{n,k} = \frac{\sum_{p:\,y_{n,p}=k} f_{n,p}}{|\{p : y_{n,p}=k\}| + 10^{-6}}, \qquad
        s_{n,p} = \frac{f_{n,p} \cdot c_{n,y_{n,p}}}
            {\max(\lVert f_{n,p} \rVert, 10^{-8})\,\max(\lVert c_{n,y_{n,p}} \rVert, 10^{-8})}.

    Computed in one pass with ``scatter_add`` over the pixels (no loop over classes), in fp32
    (fp64 for fp64 input). Gradients flow both through the pixel and through its class centre.
    Where :math:`f_{n,p}` or :math:`c_{n,y_{n,p}}` is exactly zero (no direction), :math:`s_{n,p} = 0`
    as the formula gives, but it passes no gradient (the clamped norms would pass ``1e8`` times the
    upstream gradient to that zero vector); a zero pixel still gets its gradient through its centre.

    Args:
        features: feature maps.
        index: class slot of every pixel, ``int64`` in ``[0, num_slots)``.
        num_slots: number of class slots.

    Shape:
        - features: ``(N, C, h, w)``.
        - index: ``(N, h * w)``.
        - output: ``(N, h * w)``.

    Returns:
        The similarity map, flattened over the pixels.
    """
    compute_dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    feats = features.flatten(2).to(compute_dtype)  # (N, C, L)
    batch, channels, _ = feats.shape
    expanded = index.unsqueeze(1).expand(-1, channels, -1)
    sums = feats.new_zeros(batch, channels, num_slots).scatter_add(2, expanded, feats)
    counts = feats.new_zeros(batch, num_slots).scatter_add_(1, index, torch.ones_like(index, dtype=compute_dtype))
    centres = sums / (counts.unsqueeze(1) + _COUNT_EPS)  # (N, C, K)
    centre_norms = torch.linalg.vector_norm(centres, dim=1).clamp_min(_COS_EPS)  # (N, K)
    pixel_norms = torch.linalg.vector_norm(feats, dim=1).clamp_min(_COS_EPS)  # (N, L)
    dots = (feats * centres.gather(2, expanded)).sum(dim=1)  # (N, L)
    # A zero pixel or centre has dot 0, so similarity 0 either way; the where keeps the clamped norm's
    # 1 / eps = 1e8 gradient (inf in fp16) from reaching that zero vector or, through the centre, its class.
    without_direction = (feats == 0).all(dim=1) | (centres == 0).all(dim=1).gather(1, index)  # (N, L)
    similarity = dots / (pixel_norms * centre_norms.gather(1, index))
    return torch.where(without_direction, torch.zeros_like(similarity), similarity)


def ifvd_loss(
    student: Tensor,
    teacher: Tensor,
    labels: Tensor,
    num_classes: int,
    ignore_index: int = 255,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""Intra-class feature variation distillation loss.

    For every image and class, the class centre is the mean feature of the pixels of that class;
    each pixel's cosine similarity to its own class centre gives an *intra-class feature
    variation* map :math:`s` (:func:`class_centre_similarity`). The student's map is pulled
    towards the teacher's:

    .. math::

        L = \frac{1}{N h w} \sum_{n=1}^{N} \sum_{p=1}^{h w} \left(s^S_{n,p} - s^T_{n,p}\right)^2,

    where pixels labelled ``ignore_index`` have :math:`s^S = s^T = 1` (they add zero but count in
    the mean, as in the original code). Labels are resampled to the feature size ``h x w`` with
    nearest-neighbour sampling (:func:`nearest_labels`).

    Reference: Y. Wang, W. Zhou, T. Jiang, X. Bai, Y. Xu, "Intra-class Feature Variation
    Distillation for Semantic Segmentation", ECCV 2020. The paper applies it to the feature before
    the classifier (after the PSP module) with weight 200, next to pixel KD and an adversarial term.

    Label values: the original code treats every label outside ``[0, num_classes)`` silently as
    ignored. Here such a value (other than ``ignore_index``) raises ``ValueError``; the check reads one
    boolean back to the host (one device synchronisation per call on CUDA) and looks only at the
    resampled labels, the ones the loss uses.

    Zero vectors (e.g. all-zero ReLU features): a pixel whose feature vector or class centre is
    exactly zero has similarity 0 and passes no gradient through it (the zero pixel still learns
    through its class centre), where the clamped norms would pass ``1e8`` times the upstream gradient,
    inf for fp16 features. Each element of the student gradient is then at most
    :math:`\frac{4}{N h w} \left(\frac{1}{\lVert f_{n,p} \rVert} + \frac{1}{\lVert c_{n,y_{n,p}} \rVert}\right)`
    for ``"mean"``, a term left out where its vector is zero.

    The teacher is detached inside: it never receives a gradient.

    Args:
        student: student feature maps.
        teacher: teacher feature maps; same ``N``, ``h``, ``w`` and device, any channel count.
        labels: integer class ids at any resolution.
        num_classes: number of classes ``K``; valid ids are ``0 .. K - 1``.
        ignore_index: label value of pixels to leave out (default 255).
        reduction: ``"mean"`` averages the squared differences over all ``N * h * w`` pixels
            (ignored ones included, at zero); ``"sum"`` adds them; ``"none"`` returns the
            ``(N, h, w)`` map of squared differences.

    Shape:
        - student: ``(N, C_S, h, w)``; teacher: ``(N, C_T, h, w)``.
        - labels: ``(N, H, W)``.
        - output: scalar, or ``(N, h, w)`` with ``reduction="none"``.

    Returns:
        The loss, in fp32 (fp64 for fp64 student features).

    Raises:
        TypeError: non-tensor or integer features, floating-point labels, non-int ``num_classes``
            or ``ignore_index``.
        ValueError: features not 4-D, different ``N``, ``h`` or ``w``, different devices, empty
            input, labels not ``(N, H, W)``, a label outside ``[0, num_classes)`` other than
            ``ignore_index``, ``num_classes < 1``, unknown ``reduction``.

    Example:
        >>> import torch
        >>> from segkd.losses.ifvd import ifvd_loss
        >>> _ = torch.manual_seed(0)
        >>> student = torch.randn(2, 8, 16, 16, requires_grad=True)
        >>> teacher = torch.randn(2, 16, 16, 16)
        >>> labels = torch.randint(0, 4, (2, 64, 64))
        >>> labels[:, :8] = 255
        >>> loss = ifvd_loss(student, teacher, labels, num_classes=4)
        >>> round(loss.item(), 4)
        0.1821
        >>> loss.backward()
        >>> student.grad.shape
        torch.Size([2, 8, 16, 16])
    """
    reduction = _checks.check_reduction(reduction)  # type: ignore[assignment]
    num_classes = _checks.check_positive_int(num_classes, "num_classes")
    ignore_index = _checks.check_int(ignore_index, "ignore_index")
    _checks.check_student_teacher_features(student, teacher, layout="(N, C, h, w)")
    labels = _checks.check_labels(labels, batch_size=student.shape[0])
    _checks.check_nonempty(labels, "labels")
    _checks.check_same_device(student, labels, "student", "labels")

    batch, _, height, width = student.shape
    small = nearest_labels(labels, (height, width)).long()  # small; int64 compares safely with any id
    _checks.check_label_values(small, num_classes, ignore_index)
    valid = (small != ignore_index).flatten(1)
    # Ignored pixels go to an extra slot K, so they never touch a real class centre.
    index = torch.where(valid, small.flatten(1), num_classes).long()
    sim_student = class_centre_similarity(student, index, num_classes + 1)
    with torch.no_grad():
        sim_teacher = class_centre_similarity(teacher.detach(), index, num_classes + 1).to(sim_student.dtype)
    one = torch.ones((), dtype=sim_student.dtype, device=sim_student.device)
    diff = torch.where(valid, sim_student, one) - torch.where(valid, sim_teacher, one)
    return reduce_terms(diff.square().view(batch, height, width), reduction)


class IFVDLoss(nn.Module):
    r"""Intra-class feature variation distillation loss as a module; see :func:`segkd.functional.ifvd_loss`.

    No trainable parts: student and teacher channel counts may differ.

    Reference: Y. Wang et al., "Intra-class Feature Variation Distillation for Semantic
    Segmentation", ECCV 2020 (weight 200 in the paper's training objective).

    Args:
        num_classes: number of classes ``K``.
        ignore_index: label value of pixels to leave out (default 255).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Shape:
        - student: ``(N, C_S, h, w)``; teacher: ``(N, C_T, h, w)``; labels: ``(N, H, W)``.
        - output: scalar, or ``(N, h, w)`` with ``reduction="none"``.

    Example:
        >>> import torch
        >>> from segkd.losses.ifvd import IFVDLoss
        >>> _ = torch.manual_seed(0)
        >>> criterion = IFVDLoss(num_classes=4)
        >>> student, teacher = torch.randn(2, 8, 16, 16), torch.randn(2, 16, 16, 16)
        >>> labels = torch.randint(0, 4, (2, 64, 64))
        >>> labels[:, :8] = 255
        >>> round(criterion(student, teacher, labels).item(), 4)
        0.1821
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, reduction: Reduction = "mean") -> None:
        super().__init__()
        self.num_classes = _checks.check_positive_int(num_classes, "num_classes")
        self.ignore_index = _checks.check_int(ignore_index, "ignore_index")
        self.reduction: Reduction = _checks.check_reduction(reduction)  # type: ignore[assignment]

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
        """Return the IFVD loss of ``student`` towards ``teacher`` under ``labels``."""
        return ifvd_loss(student, teacher, labels, self.num_classes, self.ignore_index, self.reduction)

    def distillation_checks(self) -> LossDeclaration:
        """The properties :func:`segkd.testing.check_distillation_loss` checks on this loss, and its reference."""
        from segkd.testing.checks import LossDeclaration
        from segkd.testing.reference import ifvd_loss_reference

        num_classes, ignore_index, reduction = self.num_classes, self.ignore_index, self.reduction

        def reference(student: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
            return ifvd_loss_reference(student, teacher, labels, num_classes, ignore_index, reduction)

        return LossDeclaration(
            zero_at_equal=True,
            reference=reference,
            with_labels=True,
            num_classes=num_classes,
            ignore_index=ignore_index,
        )

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, ignore_index={self.ignore_index}, reduction={self.reduction!r}"
