r"""Float64 reference of channel-wise distillation (CWD), written from the formula."""

from __future__ import annotations

from torch import Tensor

from segkd.testing.reference._reduction import reduce_terms
from segkd.testing.reference.channel_kl import channel_kl_reference

__all__ = ["cwd_loss_reference"]


def cwd_loss_reference(student: Tensor, teacher: Tensor, tau: float = 4.0, reduction: str = "mean") -> Tensor:
    r"""Channel-wise distillation loss, in float64.

    .. math::

        L = \frac{\tau^2}{N C} \sum_{n, c} \mathrm{KL}\left(p_T[n, c] \,\|\, p_S[n, c]\right)

    Reference: C. Shu, Y. Liu, J. Gao, Z. Yan, C. Shen, "Channel-wise Knowledge Distillation for
    Dense Prediction", ICCV 2021.

    Args:
        student: student logits.
        teacher: teacher logits, same shape.
        tau: temperature, > 0.
        reduction: ``"mean"`` (the formula), ``"sum"`` (without the ``1 / (N C)``) or ``"none"``
            (the ``(N, C)`` terms ``tau^2 * KL``).

    Shape:
        - student, teacher: ``(N, C, H, W)`` or ``(N, C, L)``.
        - output: scalar, or ``(N, C)`` for ``reduction="none"``.

    Returns:
        The float64 loss. The teacher is not detached (see :func:`channel_kl_reference`).

    Raises:
        ValueError: shapes differ, ``tau <= 0`` or an unknown ``reduction``.

    Example:
        >>> import torch
        >>> from segkd.testing.reference import cwd_loss_reference
        >>> student = torch.tensor([[[0.0, 0.0]]])
        >>> teacher = torch.tensor([[[0.0, 4.0]]])
        >>> round(cwd_loss_reference(student, teacher, tau=4.0).item(), 6)
        1.775105
    """
    kl, _ = channel_kl_reference(student, teacher, tau)
    terms = kl * (tau * tau)
    return reduce_terms(terms, reduction)
