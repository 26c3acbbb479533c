r"""Float64 reference of the channel-wise KL divergence behind CWD and HWD.

Written straight from the formula, independently of :mod:`segkd.ops` (no fusing, no
blocking, no custom autograd): every channel ``(n, c)`` becomes a distribution over its
``L = H * W`` positions by a softmax at temperature :math:`\tau`, and the teacher-to-student
KL divergence and the squared L2 distance of the two distributions are returned.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["channel_kl_reference", "spatial_softmax_reference"]


def _as_float64_rows(x: Tensor) -> Tensor:
    if x.dim() < 3:
        raise ValueError(f"Expected at least 3 dimensions (N, C, H, W) or (N, C, L), got shape {tuple(x.shape)}.")
    return x.to(torch.float64).reshape(x.shape[0], x.shape[1], -1)


def spatial_softmax_reference(logits: Tensor, tau: float) -> Tensor:
    r"""Softmax of each channel over its spatial positions, in float64.

    .. math::

        p[n, c, i] = \frac{\exp(x[n, c, i] / \tau)}{\sum_j \exp(x[n, c, j] / \tau)}

    Args:
        logits: ``(N, C, H, W)`` or ``(N, C, L)`` logits of any floating dtype.
        tau: temperature, > 0.

    Shape:
        - logits: ``(N, C, *)``.
        - output: ``(N, C, L)`` with ``L`` the product of the trailing sizes.

    Returns:
        The float64 distributions; each ``(n, c)`` row sums to one.

    Raises:
        ValueError: fewer than 3 dimensions.

    Example:
        >>> import torch
        >>> from segkd.testing.reference import spatial_softmax_reference
        >>> spatial_softmax_reference(torch.zeros(1, 1, 2, 2), tau=4.0)
        tensor([[[0.2500, 0.2500, 0.2500, 0.2500]]], dtype=torch.float64)
    """
    return torch.softmax(_as_float64_rows(logits) / tau, dim=-1)


def channel_kl_reference(student: Tensor, teacher: Tensor, tau: float = 1.0) -> tuple[Tensor, Tensor]:
    r"""Channel-wise ``KL(p_T || p_S)`` and ``sum_i (p_S - p_T)^2``, in float64.

    .. math::

        \mathrm{kl}[n, c] = \sum_i p_T[n, c, i] \left(\log p_T[n, c, i] - \log p_S[n, c, i]\right),
        \qquad
        \mathrm{sqdist}[n, c] = \sum_i \left(p_S[n, c, i] - p_T[n, c, i]\right)^2,

    with :math:`p_S, p_T` the spatial softmaxes of :func:`spatial_softmax_reference`. This is the
    quantity of C. Shu et al., "Channel-wise Knowledge Distillation for Dense Prediction",
    ICCV 2021, before the :math:`\tau^2 / (N C)` factor.

    Both inputs are cast to float64 and the log-probabilities come from ``log_softmax``, so the
    result is accurate for logits up to about ``1e4``. Gradients flow to both inputs (a reference
    does not detach anything); use it for values, or differentiate it to get an analytic gradient.

    Args:
        student: student logits.
        teacher: teacher logits, same shape.
        tau: temperature, > 0.

    Shape:
        - student, teacher: ``(N, C, H, W)`` or ``(N, C, L)``.
        - output: two ``(N, C)`` tensors.

    Returns:
        ``(kl, sqdist)``, both float64.

    Raises:
        ValueError: shapes differ, fewer than 3 dimensions, or ``tau <= 0``.

    Example:
        >>> import torch
        >>> from segkd.testing.reference import channel_kl_reference
        >>> student = torch.tensor([[[0.0, 0.0]]])
        >>> teacher = torch.tensor([[[0.0, 1.0]]])
        >>> kl, sqdist = channel_kl_reference(student, teacher, tau=1.0)
        >>> round(kl.item(), 6), round(sqdist.item(), 6)
        (0.110944, 0.106776)
    """
    if student.shape != teacher.shape:
        raise ValueError(f"Expected equal shapes, got {tuple(student.shape)} and {tuple(teacher.shape)}.")
    if not tau > 0:
        raise ValueError(f"Expected tau > 0, got {tau}.")
    log_p_s = torch.log_softmax(_as_float64_rows(student) / tau, dim=-1)
    log_p_t = torch.log_softmax(_as_float64_rows(teacher) / tau, dim=-1)
    p_s, p_t = log_p_s.exp(), log_p_t.exp()
    # 0 * log 0 is 0: positions where the teacher has no mass add nothing, even if log p_S is -inf.
    kl = torch.where(p_t > 0, p_t * (log_p_t - log_p_s), torch.zeros_like(p_t)).sum(dim=-1)
    sqdist = (p_s - p_t).square().sum(dim=-1)
    return kl, sqdist
