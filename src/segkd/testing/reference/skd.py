r"""Float64 references of the SKD terms (Liu et al., TPAMI 2020), written from the formulas with plain loops."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from segkd.testing.reference._reduction import reduce_terms

__all__ = [
    "pixel_kd_loss_reference",
    "skd_discriminator_hinge_loss_reference",
    "skd_generator_hinge_loss_reference",
    "skd_pairwise_loss_reference",
]


def _max_pool_ceil(feat: Tensor, pool: int) -> Tensor:
    """``(C, H, W)`` -> ``(C, ceil(H / pool), ceil(W / pool))``: the max over each (possibly clipped) cell."""
    _, height, width = feat.shape
    rows, cols = math.ceil(height / pool), math.ceil(width / pool)
    cells = []
    for r in range(rows):
        for c in range(cols):
            cell = feat[:, r * pool : (r + 1) * pool, c * pool : (c + 1) * pool]
            cells.append(cell.flatten(1).amax(dim=1))
    return torch.stack(cells, dim=1).reshape(feat.shape[0], rows, cols)


def _similarity_matrix(feat: Tensor) -> Tensor:
    """``(C, P)`` -> ``(P, P)`` cosine similarities; a zero column normalises to zero."""
    positions = feat.shape[1]
    unit = []
    for i in range(positions):
        v = feat[:, i]
        norm = torch.sqrt((v * v).sum())
        unit.append(v / torch.clamp(norm, min=1e-12))
    rows = [torch.stack([(unit[i] * unit[j]).sum() for j in range(positions)]) for i in range(positions)]
    return torch.stack(rows)


def skd_pairwise_loss_reference(
    student_feat: Tensor, teacher_feat: Tensor, pool: int = 2, reduction: str = "mean"
) -> Tensor:
    r"""SKD pair-wise loss in float64.

    .. math::

        L = \frac{1}{N (hw)^2} \sum_{n, i, j} \left(\hat f^S_{n,i} \cdot \hat f^S_{n,j}
            - \hat f^T_{n,i} \cdot \hat f^T_{n,j}\right)^2,

    where :math:`\hat f_{n,i}` is position ``i`` of image ``n`` after ``pool x pool`` max pooling
    (ceil mode) and L2 normalisation over channels (``max(norm, 1e-12)`` in the denominator).

    Reference: Y. Liu, C. Shu, J. Wang, C. Shen, "Structured Knowledge Distillation for Dense
    Prediction", TPAMI 2020.

    Args:
        student_feat: ``(N, C_S, H, W)`` features.
        teacher_feat: ``(N, C_T, H, W)`` features.
        pool: pooling window and stride (1: no pooling).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (the ``(N, hw, hw)`` squared differences).

    Shape:
        - output: scalar, or ``(N, hw, hw)`` for ``reduction="none"``.

    Returns:
        The float64 loss. The teacher is not detached.

    Raises:
        ValueError: ``N, H, W`` differ, ``pool < 1`` or an unknown ``reduction``.

    Example:
        >>> import torch
        >>> from segkd.testing.reference.skd import skd_pairwise_loss_reference
        >>> s = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # (1, 2, 1, 2): orthogonal pixels
        >>> t = torch.tensor([[[[1.0, 1.0]]]])  # (1, 1, 1, 2): identical pixels
        >>> skd_pairwise_loss_reference(s, t, pool=1).item()  # off-diagonal 0 vs 1
        0.5
    """
    if student_feat.shape[0] != teacher_feat.shape[0] or student_feat.shape[2:] != teacher_feat.shape[2:]:
        raise ValueError(f"Expected the same N, H, W, got {tuple(student_feat.shape)} and {tuple(teacher_feat.shape)}.")
    if pool < 1:
        raise ValueError(f"Expected pool >= 1, got {pool}.")
    terms = []
    for n in range(student_feat.shape[0]):
        pooled_s = _max_pool_ceil(student_feat[n].to(torch.float64), pool).flatten(1)
        pooled_t = _max_pool_ceil(teacher_feat[n].to(torch.float64), pool).flatten(1)
        terms.append((_similarity_matrix(pooled_s) - _similarity_matrix(pooled_t)) ** 2)
    squared = torch.stack(terms)
    return reduce_terms(squared, reduction)


def pixel_kd_loss_reference(
    student: Tensor,
    teacher: Tensor,
    tau: float = 1.0,
    labels: Tensor | None = None,
    ignore_index: int = 255,
    reduction: str = "mean",
) -> Tensor:
    r"""Pixel-wise KL distillation in float64.

    .. math::

        L = \frac{\tau^2}{|K|} \sum_{(n,h,w) \in K} \sum_c p_T[c] \left(\log p_T[c] - \log p_S[c]\right),
        \qquad p = \mathrm{softmax}(z[n, :, h, w] / \tau),

    with :math:`K` the pixels whose label is not ``ignore_index`` (all pixels without labels);
    0 when :math:`K` is empty.

    Reference: Y. Liu, C. Shu, J. Wang, C. Shen, "Structured Knowledge Distillation for Dense
    Prediction", TPAMI 2020.

    Args:
        student: ``(N, C, H, W)`` logits.
        teacher: ``(N, C, H, W)`` logits.
        tau: temperature, > 0.
        labels: optional ``(N, H, W)`` integer labels.
        ignore_index: label value to leave out.
        reduction: ``"mean"`` (over kept pixels), ``"sum"`` or ``"none"`` (``(N, H, W)``, ignored = 0).

    Shape:
        - output: scalar, or ``(N, H, W)`` for ``reduction="none"``.

    Returns:
        The float64 loss. The teacher is not detached.

    Raises:
        ValueError: shapes differ, ``tau <= 0`` or an unknown ``reduction``.

    Example:
        >>> import torch, math
        >>> from segkd.testing.reference.skd import pixel_kd_loss_reference
        >>> s = torch.zeros(1, 2, 1, 1)  # p_S = (1/2, 1/2)
        >>> t = torch.tensor([0.0, math.log(3.0)]).reshape(1, 2, 1, 1)  # p_T = (1/4, 3/4)
        >>> round(pixel_kd_loss_reference(s, t).item(), 6)  # 0.25 ln 0.5 + 0.75 ln 1.5
        0.130812
    """
    if student.shape != teacher.shape:
        raise ValueError(f"Expected the same shape, got {tuple(student.shape)} and {tuple(teacher.shape)}.")
    if not tau > 0:
        raise ValueError(f"Expected tau > 0, got {tau}.")
    batch, channels, height, width = student.shape
    s = student.to(torch.float64)
    t = teacher.to(torch.float64)
    zero = torch.zeros((), dtype=torch.float64)
    values = []
    kept = 0
    for n in range(batch):
        for h in range(height):
            for w in range(width):
                if labels is not None and int(labels[n, h, w]) == ignore_index:
                    values.append(zero)
                    continue
                kept += 1
                log_z_s = torch.logsumexp(s[n, :, h, w] / tau, dim=0)
                log_z_t = torch.logsumexp(t[n, :, h, w] / tau, dim=0)
                kl = torch.zeros((), dtype=torch.float64)
                for c in range(channels):
                    log_p_t = t[n, c, h, w] / tau - log_z_t
                    log_p_s = s[n, c, h, w] / tau - log_z_s
                    kl = kl + torch.exp(log_p_t) * (log_p_t - log_p_s)
                values.append(tau * tau * kl)
    terms = torch.stack(values).reshape(batch, height, width)
    return reduce_terms(terms, reduction, mean_divisor=max(kept, 1))


def skd_generator_hinge_loss_reference(fake_scores: Tensor) -> Tensor:
    r"""The SKD generator (student) adversarial loss in float64: :math:`-\mathrm{mean}\, D(S)`.

    Reference: Y. Liu, C. Shu, J. Wang, C. Shen, "Structured Knowledge Distillation for Dense
    Prediction", TPAMI 2020.

    Args:
        fake_scores: discriminator scores of the student's logits, any shape.

    Returns:
        The float64 loss.

    Example:
        >>> import torch
        >>> from segkd.testing.reference.skd import skd_generator_hinge_loss_reference
        >>> skd_generator_hinge_loss_reference(torch.tensor([1.0, 2.0, -6.0])).item()
        1.0
    """
    values = [float(v) for v in fake_scores.flatten().tolist()]
    return torch.tensor(-sum(values) / len(values), dtype=torch.float64)


def skd_discriminator_hinge_loss_reference(real_scores: Tensor, fake_scores: Tensor) -> Tensor:
    r"""The SKD discriminator hinge loss in float64.

    .. math::

        L_D = \mathrm{mean}\,\max(0, 1 - D(T)) + \mathrm{mean}\,\max(0, 1 + D(S))

    Reference: Y. Liu, C. Shu, J. Wang, C. Shen, "Structured Knowledge Distillation for Dense
    Prediction", TPAMI 2020.

    Args:
        real_scores: scores of the teacher's logits.
        fake_scores: scores of the student's logits.

    Returns:
        The float64 loss.

    Example:
        >>> import torch
        >>> from segkd.testing.reference.skd import skd_discriminator_hinge_loss_reference
        >>> skd_discriminator_hinge_loss_reference(torch.tensor([0.0, 3.0]), torch.tensor([0.0, -3.0])).item()
        1.0
    """
    real = [float(v) for v in real_scores.flatten().tolist()]
    fake = [float(v) for v in fake_scores.flatten().tolist()]
    loss_real = sum(max(0.0, 1.0 - v) for v in real) / len(real)
    loss_fake = sum(max(0.0, 1.0 + v) for v in fake) / len(fake)
    return torch.tensor(loss_real + loss_fake, dtype=torch.float64)
