r"""Float64 reference of holistic weighted distillation (HWD), written from the formula.

The weights follow the five steps of W. Sun et al., "Holistic Weighted Distillation for
Semantic Segmentation", ICME 2023, with segkd's definition of the degenerate case: when every
channel divergence of an image is equal (student equals teacher, identical channels, ``C == 1``)
the standard deviation is zero or undefined, the standardised divergence is defined as ``z = 0``
and the weights are exactly uniform, so HWD equals CWD.

The smoothing curve is evaluated literally as ``(1 - beta**x) / (1 - beta)``, which is accurate
for the moderate ``x`` and ``beta`` of practice (``|x * ln(beta)|`` well below 700) and for
``beta`` not within about ``1e-6`` of one (use ``beta == 1`` itself for the linear limit).
"""

from __future__ import annotations

import torch
from torch import Tensor

from segkd.testing.reference._reduction import reduce_terms
from segkd.testing.reference.channel_kl import channel_kl_reference

__all__ = [
    "hwd_curve_reference",
    "hwd_loss_reference",
    "hwd_weights_from_divergence_reference",
    "hwd_weights_reference",
]


def hwd_curve_reference(x: Tensor, beta: float) -> Tensor:
    r"""The HWD smoothing curve in float64.

    .. math::

        g(x) = \frac{1 - \beta^x}{1 - \beta} \quad (\beta \ne 1), \qquad g(x) = x \quad (\beta = 1).

    Args:
        x: standardised divergences shifted by ``mu``.
        beta: base, > 0.

    Returns:
        ``g(x)`` in float64, same shape as ``x``.

    Raises:
        ValueError: ``beta <= 0``.

    Example:
        >>> import torch
        >>> from segkd.testing.reference import hwd_curve_reference
        >>> hwd_curve_reference(torch.tensor([-1.0, 0.0, 1.0, 2.0]), beta=0.1)
        tensor([-10.0000,   0.0000,   1.0000,   1.1000], dtype=torch.float64)
    """
    if not beta > 0:
        raise ValueError(f"Expected beta > 0, got {beta}.")
    x = x.to(torch.float64)
    if beta == 1.0:
        return x.clone()
    return (1.0 - torch.pow(torch.as_tensor(beta, dtype=torch.float64), x)) / (1.0 - beta)


def hwd_weights_from_divergence_reference(divergence: Tensor, mu: float = 0.0, beta: float = 0.1) -> Tensor:
    r"""HWD channel weights from ``(N, C)`` divergences, in float64.

    .. math::

        z[n, c] = \frac{d[n, c] - \operatorname{mean}_c d[n, :]}{\operatorname{std}_c d[n, :]},
        \quad x = z + \mu, \quad g = \frac{1 - \beta^x}{1 - \beta},
        \quad w[n, :] = C \,\operatorname{softmax}_c g[n, :],

    with the unbiased (``C - 1``) standard deviation. **Degenerate case**: for an image whose
    ``C`` divergences are all equal, or when ``C == 1``, ``z[n, :] = 0`` and ``w[n, :] = 1``.

    Args:
        divergence: ``(N, C)`` per-channel divergences.
        mu: shift of the standardised divergences.
        beta: curve base, > 0.

    Shape:
        - divergence: ``(N, C)``.
        - output: ``(N, C)``.

    Returns:
        Float64 weights, non-negative, summing to ``C`` in each row.

    Raises:
        ValueError: ``divergence`` is not 2-D, or ``beta <= 0``.

    Example:
        >>> import torch
        >>> from segkd.testing.reference import hwd_weights_from_divergence_reference
        >>> hwd_weights_from_divergence_reference(torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]]), mu=0.0, beta=0.1)
        tensor([[3.6629e-05, 8.0681e-01, 2.1931e+00],
                [1.0000e+00, 1.0000e+00, 1.0000e+00]], dtype=torch.float64)
    """
    if divergence.dim() != 2:
        raise ValueError(f"Expected divergence of shape (N, C), got {tuple(divergence.shape)}.")
    d = divergence.detach().to(torch.float64)
    channels = d.shape[1]
    z = torch.zeros_like(d)
    for n in range(d.shape[0]):
        row = d[n]
        if channels == 1 or bool((row == row[0]).all()):
            continue  # degenerate: std is zero or undefined, z stays 0
        z[n] = (row - row.mean()) / row.std(unbiased=True)
    g = hwd_curve_reference(z + mu, beta)
    return channels * torch.softmax(g, dim=1)


def hwd_weights_reference(
    student: Tensor, teacher: Tensor, tau: float = 4.0, mu: float = 0.0, beta: float = 0.1, distance: str = "prob"
) -> Tensor:
    r"""HWD channel weights of a pair of logit tensors, in float64.

    The divergence is ``d[n, c] = sum_i (p_S - p_T)^2`` of the ``tau``-softmaxes
    (``distance="prob"``) or ``sum_i (s - t)^2`` of the raw logits (``distance="logits"``); the
    weights follow from :func:`hwd_weights_from_divergence_reference`, degenerate case included.

    Args:
        student: student logits.
        teacher: teacher logits, same shape.
        tau: temperature, > 0.
        mu: shift of the standardised divergences.
        beta: curve base, > 0.
        distance: ``"prob"`` or ``"logits"``.

    Shape:
        - student, teacher: ``(N, C, H, W)`` or ``(N, C, L)``.
        - output: ``(N, C)``.

    Returns:
        Float64 weights, detached.

    Raises:
        ValueError: shapes differ, ``tau <= 0``, ``beta <= 0`` or an unknown ``distance``.

    Example:
        >>> import torch
        >>> from segkd.testing.reference import hwd_weights_reference
        >>> logits = torch.randn(2, 5, 4, 4)
        >>> hwd_weights_reference(logits, logits)
        tensor([[1., 1., 1., 1., 1.],
                [1., 1., 1., 1., 1.]], dtype=torch.float64)
    """
    if distance == "prob":
        _, divergence = channel_kl_reference(student, teacher, tau)
    elif distance == "logits":
        if student.shape != teacher.shape:
            raise ValueError(f"Expected equal shapes, got {tuple(student.shape)} and {tuple(teacher.shape)}.")
        diff = student.detach().to(torch.float64) - teacher.detach().to(torch.float64)
        divergence = diff.reshape(diff.shape[0], diff.shape[1], -1).square().sum(dim=-1)
    else:
        raise ValueError(f"Expected distance 'prob' or 'logits', got {distance!r}.")
    return hwd_weights_from_divergence_reference(divergence, mu, beta)


def hwd_loss_reference(
    student: Tensor,
    teacher: Tensor,
    tau: float = 4.0,
    mu: float = 0.0,
    beta: float = 0.1,
    distance: str = "prob",
    reduction: str = "mean",
) -> Tensor:
    r"""Holistic weighted distillation loss, in float64.

    .. math::

        L = \frac{\tau^2}{N C} \sum_{n, c} w[n, c] \, \mathrm{KL}\left(p_T[n, c] \,\|\, p_S[n, c]\right)

    with ``w`` from :func:`hwd_weights_reference` (detached). Reference: W. Sun, D. Chen, C. Wang,
    D. Ye, Y. Feng, C. Chen, "Holistic Weighted Distillation for Semantic Segmentation", ICME 2023.

    Args:
        student: student logits.
        teacher: teacher logits, same shape.
        tau: temperature, > 0.
        mu: shift of the standardised divergences.
        beta: curve base, > 0.
        distance: ``"prob"`` or ``"logits"``.
        reduction: ``"mean"`` (the formula), ``"sum"`` (without ``1 / (N C)``) or ``"none"``
            (the ``(N, C)`` terms ``tau^2 * w * KL``).

    Shape:
        - student, teacher: ``(N, C, H, W)`` or ``(N, C, L)``.
        - output: scalar, or ``(N, C)`` for ``reduction="none"``.

    Returns:
        The float64 loss; differentiating it gives the gradient with detached weights.

    Raises:
        ValueError: as :func:`hwd_weights_reference`, or an unknown ``reduction``.

    Example:
        >>> import torch
        >>> from segkd.testing.reference import cwd_loss_reference, hwd_loss_reference
        >>> student = torch.tensor([[[0.0, 0.0]]])
        >>> teacher = torch.tensor([[[0.0, 4.0]]])
        >>> # C == 1: the weight is 1 and HWD equals CWD.
        >>> bool(hwd_loss_reference(student, teacher) == cwd_loss_reference(student, teacher))
        True
    """
    weights = hwd_weights_reference(student, teacher, tau, mu, beta, distance)
    kl, _ = channel_kl_reference(student, teacher, tau)
    terms = weights * kl * (tau * tau)
    return reduce_terms(terms, reduction)
