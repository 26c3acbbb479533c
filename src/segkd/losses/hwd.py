"""Holistic weighted distillation (HWD): channel-wise KL with a weight per channel."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from segkd import _checks
from segkd.ops import _weighting
from segkd.ops.channel_kl import BACKENDS, Backend, channel_kl
from segkd.ops.weighted_kl import weighted_channel_kl

if TYPE_CHECKING:
    from segkd.testing.checks import LossDeclaration

__all__ = ["DISTANCES", "HWDLoss", "hwd_curve", "hwd_loss", "hwd_weights", "hwd_weights_from_divergence"]

Reduction = Literal["mean", "sum", "none"]
Distance = Literal["prob", "logits"]
DISTANCES = ("prob", "logits")


def hwd_curve(x: Tensor, beta: float) -> Tensor:
    r"""The HWD smoothing curve :math:`g(x) = (1 - \beta^x) / (1 - \beta)`, with :math:`g(x) = x` at :math:`\beta = 1`.

    Evaluated as ``expm1(x ln beta) / expm1(ln beta)``, which is exact near ``beta == 1``; the
    exponent is clipped so that extreme ``x`` or ``beta`` saturate instead of overflowing.

    Args:
        x: standardised divergences shifted by ``mu``.
        beta: curve base, > 0.

    Returns:
        ``g(x)``, same shape and dtype as ``x``.

    Raises:
        TypeError: non-numeric ``beta``.
        ValueError: ``beta <= 0`` or not finite.

    Example:
        >>> import torch
        >>> from segkd.losses.hwd import hwd_curve
        >>> hwd_curve(torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64), beta=0.1)
        tensor([-10.0000,   0.0000,   1.0000], dtype=torch.float64)
    """
    beta = _checks.check_positive(beta, "beta")
    return _weighting.hwd_curve(x, beta)


def hwd_weights_from_divergence(divergence: Tensor, mu: float = 0.0, beta: float = 0.1) -> Tensor:
    r"""HWD channel weights from per-channel divergences ``d`` of shape ``(N, C)``.

    .. math::

        z = \frac{d - \bar d}{\sigma_d}, \quad x = z + \mu, \quad
        g = \frac{1 - \beta^x}{1 - \beta}, \quad w[n, :] = C\,\mathrm{softmax}_c(g[n, :]),

    with the mean and the unbiased (``C - 1``) standard deviation taken over channels within each
    image. **Degenerate case**: wherever the standard deviation is zero or undefined (all
    divergences equal, e.g. student equals teacher, or ``C == 1``), ``z = 0`` and the weights are
    exactly uniform (all ones), so HWD equals CWD. The published code divides by zero there.

    Reference: W. Sun, D. Chen, C. Wang, D. Ye, Y. Feng, C. Chen, "Holistic Weighted Distillation
    for Semantic Segmentation", ICME 2023.

    Args:
        divergence: ``(N, C)`` divergences; detached.
        mu: shift of the standardised divergences.
        beta: base of the smoothing curve, > 0.

    Shape:
        - divergence: ``(N, C)``.
        - output: ``(N, C)``.

    Returns:
        ``(N, C)`` weights, non-negative, summing to ``C`` in each row, dtype of ``divergence``.

    Raises:
        TypeError: non-tensor or non-floating ``divergence``, non-numeric ``mu`` or ``beta``.
        ValueError: ``divergence`` not 2-D, non-finite ``mu``, ``beta <= 0``.

    Example:
        >>> import torch
        >>> from segkd.functional import hwd_weights_from_divergence
        >>> divergence = torch.tensor([[0.1, 0.2, 0.6], [0.3, 0.3, 0.3]])
        >>> hwd_weights_from_divergence(divergence, mu=1.0, beta=0.1)  # the second image is degenerate
        tensor([[0.6955, 1.0049, 1.2996],
                [1.0000, 1.0000, 1.0000]])
    """
    _checks.check_floating_tensor(divergence, "divergence")
    _checks.check_exact_dims(divergence, "divergence", 2, "(N, C)")
    mu = _checks.check_finite_number(mu, "mu")
    beta = _checks.check_positive(beta, "beta")
    return _weighting.hwd_weights(divergence, mu, beta)


def _divergence(student: Tensor, teacher: Tensor, tau: float, distance: str, backend: Backend) -> Tensor:
    if distance == "prob":
        _, sqdist = channel_kl(student, teacher, tau, return_sqdist=True, backend=backend)
        return sqdist
    return _logit_divergence(student, teacher)


def _logit_divergence(student: Tensor, teacher: Tensor) -> Tensor:
    """``sum_i (s - t)^2`` per channel, divided by one power of two per image so that it cannot overflow.

    The weights only see the divergences standardised over the channels of each image, which an exact
    per-image scale leaves unchanged, so any finite logits work (fp32 squares overflowed at ``|s - t| ~ 2e19``
    and gave uniform weights). ``(s / 2 - t / 2) / 2^k`` is formed in fp64 (fp32 where the device has no fp64),
    with ``2^k`` the largest ``|s / 2 - t / 2|`` of the image rounded up to a power of two; halving and
    power-of-two scales are exact. Returned in fp32 (fp64 for fp64 inputs), as the ``"prob"`` divergence.
    """
    with torch.no_grad():
        dtype = _weighting.weight_dtype(student.device)
        if student.dtype == torch.float64:
            dtype = torch.float64
        half = student.detach().flatten(2).to(dtype) * 0.5 - teacher.detach().flatten(2).to(dtype) * 0.5
        largest = half.abs().amax(dim=(1, 2), keepdim=True)
        exponent = torch.frexp(largest).exponent  # largest = m * 2^exponent with 0.5 <= m < 1 (0 for 0)
        divergence = torch.ldexp(half, -exponent).square().sum(dim=2)
    return divergence.to(torch.float64 if student.dtype == torch.float64 else torch.float32)


def hwd_weights(
    student: Tensor,
    teacher: Tensor,
    tau: float = 4.0,
    mu: float = 0.0,
    beta: float = 0.1,
    distance: Distance = "prob",
    *,
    backend: Backend = "auto",
) -> Tensor:
    r"""The HWD channel weights for a batch of logits, without gradient.

    ``d[n, c]`` is :math:`\sum_i (p_S - p_T)^2` of the ``tau``-softmaxes (``distance="prob"``) or
    :math:`\sum_i (s - t)^2` of the raw logits (``distance="logits"``); the weights follow from
    :func:`hwd_weights_from_divergence`.

    Args:
        student: student logits.
        teacher: teacher logits, same shape and device.
        tau: temperature, > 0.
        mu: shift of the standardised divergences.
        beta: base of the smoothing curve, > 0.
        distance: ``"prob"`` or ``"logits"``.
        backend: kernel backend of :func:`segkd.ops.channel_kl`.

    Shape:
        - student, teacher: ``(N, C, H, W)`` or ``(N, C, L)``.
        - output: ``(N, C)``.

    Returns:
        Weights, non-negative, summing to ``C`` for each image; detached.

    Raises:
        TypeError: non-tensor or integer inputs, non-numeric hyper-parameters.
        ValueError: shapes or devices differ, fewer than 3 dims, ``tau`` outside ``[1e-12, 1e12]``, ``beta <= 0``,
            non-finite ``mu``, unknown ``distance``.

    Example:
        >>> import torch
        >>> from segkd.functional import hwd_weights
        >>> _ = torch.manual_seed(0)
        >>> student, teacher = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
        >>> hwd_weights(student, teacher, tau=4.0, mu=1.0, beta=0.1)
        tensor([[1.3492, 1.3621, 0.2887]])
        >>> hwd_weights(teacher, teacher)
        tensor([[1., 1., 1.]])
    """
    _checks.check_student_teacher_logits(student, teacher)
    tau = _checks.check_temperature(tau)
    distance = _checks.check_choice(distance, "distance", DISTANCES)  # type: ignore[assignment]
    divergence = _divergence(student, teacher, tau, distance, backend)
    return hwd_weights_from_divergence(divergence, mu, beta)


def hwd_loss(
    student: Tensor,
    teacher: Tensor,
    tau: float = 4.0,
    mu: float = 0.0,
    beta: float = 0.1,
    distance: Distance = "prob",
    reduction: Reduction = "mean",
    *,
    backend: Backend = "auto",
) -> Tensor:
    r"""Holistic weighted distillation loss.

    The channel-wise KL of CWD, with one weight per channel that favours the channels where
    student and teacher disagree most (for ``beta < 1``):

    .. math::

        L = \frac{\tau^2}{N C} \sum_{n, c} w[n, c]\,
            \mathrm{KL}\left(p_T[n, c] \,\|\, p_S[n, c]\right),

    where ``w`` comes from :func:`hwd_weights` (detached: it shapes the gradient's size per
    channel, not its direction).

    Reference: W. Sun, D. Chen, C. Wang, D. Ye, Y. Feng, C. Chen, "Holistic Weighted Distillation
    for Semantic Segmentation", ICME 2023. Paper settings: ``tau=4``, ``beta=0.1`` and ``mu=0`` (ADE20K),
    ``mu=1`` (Cityscapes), ``mu=0.1`` (COCO-Stuff); loss weight 3 next to cross-entropy.

    If all channel divergences of an image are equal (student equals teacher, ``C == 1``) the
    weights are exactly uniform and the loss equals :func:`segkd.functional.cwd_loss`.

    **Masked logits** (``-inf``): 0 log 0 = 0, a position whose teacher probability is 0 contributes
    nothing. A student ``-inf`` where the teacher's probability is positive gives ``+inf`` (the true
    KL; the gradient stays finite); a channel whose teacher logits are all ``-inf`` gives NaN. With
    ``distance="logits"`` a masked channel's distance is ``+inf``, and that image's weights fall back
    to uniform (CWD).

    The teacher is detached inside: it never receives a gradient.

    Args:
        student: student logits.
        teacher: teacher logits, same shape and device.
        tau: temperature, > 0.
        mu: shift of the standardised divergences (larger gives flatter weights for ``beta < 1``).
        beta: base of the smoothing curve ``g``, > 0; ``beta == 1`` gives ``g(x) = x``.
        distance: divergence behind the weights: ``"prob"`` (squared distance of the
            softmaxes) or ``"logits"`` (squared distance of the raw logits).
        reduction: ``"mean"`` divides the weighted sum by ``N * C``; ``"sum"`` does not;
            ``"none"`` returns the ``(N, C)`` terms ``tau^2 * w * KL``.
        backend: kernel backend of :func:`segkd.ops.channel_kl`.

    Shape:
        - student, teacher: ``(N, C, H, W)`` or ``(N, C, L)``.
        - output: scalar, or ``(N, C)`` with ``reduction="none"``.

    Returns:
        The loss, in fp32 (fp64 for fp64 inputs).

    Raises:
        TypeError: non-tensor or integer inputs, non-numeric hyper-parameters.
        ValueError: shapes or devices differ, fewer than 3 dims, ``tau`` outside ``[1e-12, 1e12]``, ``beta <= 0``,
            non-finite ``mu``, unknown ``distance`` or ``reduction``.

    Example:
        >>> import torch
        >>> from segkd.functional import hwd_loss
        >>> _ = torch.manual_seed(0)
        >>> student = torch.randn(2, 4, 16, 16, requires_grad=True)
        >>> teacher = torch.randn(2, 4, 16, 16)
        >>> loss = hwd_loss(student, teacher, tau=4.0, mu=1.0, beta=0.1)
        >>> round(loss.item(), 4)
        1.0195
        >>> loss.backward()
    """
    reduction = _checks.check_reduction(reduction)  # type: ignore[assignment]
    _checks.check_student_teacher_logits(student, teacher)
    tau = _checks.check_temperature(tau)
    mu = _checks.check_finite_number(mu, "mu")
    beta = _checks.check_positive(beta, "beta")
    distance = _checks.check_choice(distance, "distance", DISTANCES)  # type: ignore[assignment]
    if distance == "prob":  # weights, loss and reduction all inside the fused op
        return weighted_channel_kl(student, teacher, tau, "hwd", mu=mu, beta=beta, reduction=reduction, backend=backend)
    weights = hwd_weights_from_divergence(_divergence(student, teacher, tau, distance, backend), mu, beta)
    return weighted_channel_kl(student, teacher, tau, weights, reduction=reduction, backend=backend)


class HWDLoss(nn.Module):
    r"""Holistic weighted distillation loss as a module; see :func:`segkd.functional.hwd_loss`.

    Args:
        tau: temperature, > 0 (paper: 4).
        mu: shift of the standardised divergences (paper: 0 ADE20K, 1 Cityscapes, 0.1 COCO-Stuff).
        beta: base of the smoothing curve, > 0 (paper: 0.1).
        distance: ``"prob"`` or ``"logits"``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        backend: kernel backend of :func:`segkd.ops.channel_kl`.

    Shape:
        - student, teacher: ``(N, C, H, W)`` or ``(N, C, L)``.
        - output: scalar, or ``(N, C)`` with ``reduction="none"``.

    Example:
        >>> import torch
        >>> from segkd import HWDLoss
        >>> _ = torch.manual_seed(0)
        >>> criterion = HWDLoss(tau=4.0, mu=1.0, beta=0.1)
        >>> student, teacher = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
        >>> round(criterion(student, teacher).item(), 4)
        1.0195
    """

    def __init__(
        self,
        tau: float = 4.0,
        mu: float = 0.0,
        beta: float = 0.1,
        distance: Distance = "prob",
        reduction: Reduction = "mean",
        *,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        self.tau = _checks.check_temperature(tau)
        self.mu = _checks.check_finite_number(mu, "mu")
        self.beta = _checks.check_positive(beta, "beta")
        self.distance: Distance = _checks.check_choice(distance, "distance", DISTANCES)  # type: ignore[assignment]
        self.reduction: Reduction = _checks.check_reduction(reduction)  # type: ignore[assignment]
        self.backend: Backend = _checks.check_choice(backend, "backend", BACKENDS)  # type: ignore[assignment]

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        """Return the HWD loss of ``student`` towards ``teacher``."""
        return hwd_loss(
            student, teacher, self.tau, self.mu, self.beta, self.distance, self.reduction, backend=self.backend
        )

    def distillation_checks(self) -> LossDeclaration:
        """The properties :func:`segkd.testing.check_distillation_loss` checks on this loss, and its reference.

        The weights are detached on purpose, so the gradient is checked against the float64 reference
        (which detaches them too) instead of by ``gradcheck``.
        """
        from segkd.testing.checks import LossDeclaration
        from segkd.testing.reference import hwd_loss_reference

        tau, mu, beta, distance, reduction = self.tau, self.mu, self.beta, self.distance, self.reduction
        return LossDeclaration(
            zero_at_equal=True,
            channel_shift_invariant=distance == "prob",  # the logits distance changes with a shift
            reference=lambda s, t: hwd_loss_reference(s, t, tau, mu, beta, distance, reduction),
            exact_gradient=False,
        )

    def extra_repr(self) -> str:
        return (
            f"tau={self.tau}, mu={self.mu}, beta={self.beta}, distance={self.distance!r}, reduction={self.reduction!r}"
        )


# With its default settings the function declares what the module with its defaults declares (segkd.testing).
hwd_loss.distillation_checks = lambda: HWDLoss().distillation_checks()  # type: ignore[attr-defined]
