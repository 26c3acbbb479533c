r"""Float64 reference of masked generative distillation (MGD), written from the formula.

The convolutions are written as explicit sums over the kernel taps (``einsum`` over shifted,
zero-padded copies), in float64, without importing :mod:`segkd.losses` or ``torch.nn``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from segkd.testing.reference._reduction import reduce_terms

__all__ = ["conv2d_reference", "mgd_loss_reference"]


def conv2d_reference(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    r"""A stride-1 2-D convolution with "same" zero padding (odd kernels), in float64.

    .. math::

        y_{n,o,i,j} = b_o + \sum_{c, u, v} W_{o,c,u,v}\, x_{n,c,\,i + u - p_h,\,j + v - p_w},
        \qquad p_h = \lfloor k_h / 2 \rfloor,\ p_w = \lfloor k_w / 2 \rfloor,

    Args:
        x: input.
        weight: kernel with odd ``k_h``, ``k_w``.
        bias: optional bias.

    Shape:
        - x: ``(N, C, h, w)``; weight: ``(O, C, k_h, k_w)``; bias: ``(O,)``.
        - output: ``(N, O, h, w)``.

    Returns:
        The float64 output.

    Example:
        >>> import torch
        >>> from segkd.testing.reference.mgd import conv2d_reference
        >>> conv2d_reference(torch.ones(1, 1, 2, 2), torch.ones(1, 1, 3, 3))
        tensor([[[[4., 4.],
                  [4., 4.]]]], dtype=torch.float64)
    """
    x = x.to(torch.float64)
    weight = weight.to(torch.float64)
    _, _, height, width = x.shape
    k_h, k_w = weight.shape[-2:]
    p_h, p_w = k_h // 2, k_w // 2
    padded = x.new_zeros(x.shape[0], x.shape[1], height + 2 * p_h, width + 2 * p_w)
    padded[:, :, p_h : p_h + height, p_w : p_w + width] = x
    out = x.new_zeros(x.shape[0], weight.shape[0], height, width)
    for u in range(k_h):
        for v in range(k_w):
            window = padded[:, :, u : u + height, v : v + width]
            out = out + torch.einsum("oc,nchw->nohw", weight[:, :, u, v], window)
    if bias is not None:
        out = out + bias.to(torch.float64).view(1, -1, 1, 1)
    return out


def mgd_loss_reference(
    student: Tensor,
    teacher: Tensor,
    mask: Tensor,
    generation_weights: tuple[Tensor, Tensor, Tensor, Tensor],
    align_weights: tuple[Tensor, Tensor] | None = None,
    alpha: float = 2e-5,
    reduction: str = "mean",
) -> Tensor:
    r"""Masked generative distillation loss for a given keep-mask, in float64.

    .. math::

        A = W_a * S + b_a, \qquad
        G = W_2 * \mathrm{ReLU}\left(W_1 * (M \odot A) + b_1\right) + b_2, \qquad
        L = \frac{\alpha}{N} \sum_{n,c,i,j} \left(G_{n,c,i,j} - T_{n,c,i,j}\right)^2,

    with :math:`*` the convolution of :func:`conv2d_reference` (1x1 align, 3x3 generation) and
    :math:`A = S` when there is no align layer.

    Reference: Z. Yang, Z. Li, M. Shao, D. Shi, Z. Yuan, C. Yuan, "Masked Generative Distillation",
    ECCV 2022.

    Args:
        student: student features.
        teacher: teacher features.
        mask: keep-mask of zeros and ones (``1`` keeps a position).
        generation_weights: ``(W_1, b_1, W_2, b_2)`` of the two generation convolutions.
        align_weights: ``(W_a, b_a)`` of the 1x1 align convolution, or ``None``.
        alpha: loss weight.
        reduction: ``"mean"`` (the formula: divided by ``N``), ``"sum"`` or ``"none"`` (``(N,)``
            per-image sums times ``alpha``).

    Shape:
        - student: ``(N, C_S, h, w)``; teacher: ``(N, C_T, h, w)``; mask: ``(N, 1, h, w)``.
        - output: scalar, or ``(N,)`` for ``reduction="none"``.

    Returns:
        The float64 loss. The teacher is not detached.

    Raises:
        ValueError: an unknown ``reduction``.

    Example:
        >>> import torch
        >>> from segkd.testing.reference.mgd import mgd_loss_reference
        >>> zero_w, zero_b = torch.zeros(1, 1, 3, 3), torch.zeros(1)
        >>> student, teacher = torch.ones(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
        >>> mask = torch.ones(2, 1, 2, 2)
        >>> mgd_loss_reference(student, teacher, mask, (zero_w, zero_b, zero_w, zero_b), alpha=1.0).item()
        4.0
    """
    aligned = student.to(torch.float64)
    if align_weights is not None:
        aligned = conv2d_reference(aligned, align_weights[0], align_weights[1])
    w1, b1, w2, b2 = generation_weights
    hidden = torch.clamp(conv2d_reference(aligned * mask.to(torch.float64), w1, b1), min=0.0)
    generated = conv2d_reference(hidden, w2, b2)
    per_image = ((generated - teacher.to(torch.float64)) ** 2).sum(dim=(1, 2, 3)) * alpha
    return reduce_terms(per_image, reduction, mean_divisor=student.shape[0])
