r"""Float64 reference of DIST (Huang et al., NeurIPS 2022), written from the formula with plain loops."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["dist_loss_reference", "pearson_correlation_reference"]


def pearson_correlation_reference(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    r"""Pearson correlation of two 1-D vectors, in float64, with ``eps`` in the denominator.

    .. math::

        \rho(a, b) = \frac{\sum_i (a_i - \bar a)(b_i - \bar b)}
                          {\sqrt{\sum_i (a_i - \bar a)^2}\,\sqrt{\sum_i (b_i - \bar b)^2} + \epsilon}

    A zero-variance vector gives 0.

    Args:
        a: 1-D tensor.
        b: 1-D tensor, same length.
        eps: added to the product of the norms.

    Returns:
        A float64 scalar tensor (differentiable).

    Example:
        >>> import torch
        >>> from segkd.testing.reference.dist import pearson_correlation_reference
        >>> round(pearson_correlation_reference(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])).item(), 6)
        -1.0
    """
    a = a.to(torch.float64)
    b = b.to(torch.float64)
    n = a.shape[0]
    zero = torch.zeros((), dtype=torch.float64)
    mean_a, mean_b = zero, zero
    for i in range(n):
        mean_a = mean_a + a[i] / n
        mean_b = mean_b + b[i] / n
    dot, sq_a, sq_b = zero, zero, zero
    for i in range(n):
        dot = dot + (a[i] - mean_a) * (b[i] - mean_b)
        sq_a = sq_a + (a[i] - mean_a) ** 2
        sq_b = sq_b + (b[i] - mean_b) ** 2
    # sqrt through torch.where keeps the gradient finite for a zero-variance vector.
    norm_a = torch.where(sq_a > 0, sq_a, torch.ones_like(sq_a)).sqrt() * (sq_a > 0)
    norm_b = torch.where(sq_b > 0, sq_b, torch.ones_like(sq_b)).sqrt() * (sq_b > 0)
    return dot / (norm_a * norm_b + eps)


def dist_loss_reference(
    student: Tensor, teacher: Tensor, beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0, softmax: bool = True
) -> Tensor:
    r"""DIST loss in float64, with every pixel a sample.

    .. math::

        L = \tau^2 \Big(\beta \big(1 - \tfrac{1}{M} \textstyle\sum_m \rho(Y_S[m], Y_T[m])\big)
            + \gamma \big(1 - \tfrac{1}{C} \textstyle\sum_c \rho(Y_S[:, c], Y_T[:, c])\big)\Big),

    with rows ``Y[m] = softmax(z[n, :, pixel] / tau)`` for the ``M = N * H * W`` pixels of the batch, or
    ``Y[m] = z[n, :, pixel] / tau`` with ``softmax=False`` (the raw-logit form of the HWD authors' code).

    Reference: T. Huang, S. You, F. Wang, C. Qian, C. Xu, "Knowledge Distillation from A Stronger
    Teacher", NeurIPS 2022.

    Args:
        student: student logits.
        teacher: teacher logits, same shape.
        beta: weight of the inter-class term.
        gamma: weight of the intra-class term.
        tau: softmax temperature, > 0.
        softmax: correlate probabilities (default) or the scaled logits themselves.

    Shape:
        - student, teacher: ``(N, C, *)``: ``(N, C)``, ``(N, C, L)`` or ``(N, C, H, W)``.
        - output: scalar.

    Returns:
        The float64 loss. The teacher is not detached.

    Raises:
        ValueError: shapes differ or ``tau <= 0``.

    Example:
        >>> import torch
        >>> from segkd.testing.reference.dist import dist_loss_reference
        >>> z = torch.tensor([[[0.0, 1.0]], [[2.0, 0.0]], [[1.0, 3.0]]]).unsqueeze(0)  # (1, 3, 1, 2)
        >>> round(dist_loss_reference(z, z).item(), 4)
        0.0
        >>> round(dist_loss_reference(z, z.flip(1)).item(), 4)
        0.744
    """
    if student.shape != teacher.shape:
        raise ValueError(f"Expected the same shape, got {tuple(student.shape)} and {tuple(teacher.shape)}.")
    if not tau > 0:
        raise ValueError(f"Expected tau > 0, got {tau}.")
    channels = student.shape[1]
    positions = math.prod(student.shape[2:])
    s = student.to(torch.float64).reshape(student.shape[0], channels, positions)
    t = teacher.to(torch.float64).reshape(teacher.shape[0], channels, positions)
    rows_s, rows_t = [], []
    for n in range(s.shape[0]):
        for p in range(positions):
            row_s, row_t = s[n, :, p] / tau, t[n, :, p] / tau
            rows_s.append(torch.softmax(row_s, dim=0) if softmax else row_s)
            rows_t.append(torch.softmax(row_t, dim=0) if softmax else row_t)
    y_s = torch.stack(rows_s)  # (M, C)
    y_t = torch.stack(rows_t)
    samples = y_s.shape[0]
    inter_sum = torch.zeros((), dtype=torch.float64)
    for m in range(samples):
        inter_sum = inter_sum + pearson_correlation_reference(y_s[m], y_t[m])
    intra_sum = torch.zeros((), dtype=torch.float64)
    for c in range(channels):
        intra_sum = intra_sum + pearson_correlation_reference(y_s[:, c], y_t[:, c])
    inter = 1.0 - inter_sum / samples
    intra = 1.0 - intra_sum / channels
    return tau * tau * (beta * inter + gamma * intra)
