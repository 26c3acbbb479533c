"""Channel-wise distillation (CWD), Shu et al., ICCV 2021."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from torch import Tensor, nn

from segkd import _checks
from segkd.ops.channel_kl import BACKENDS, Backend
from segkd.ops.weighted_kl import weighted_channel_kl

if TYPE_CHECKING:
    from segkd.testing.checks import LossDeclaration

__all__ = ["CWDLoss", "cwd_loss"]

Reduction = Literal["mean", "sum", "none"]


def cwd_loss(
    student: Tensor,
    teacher: Tensor,
    tau: float = 4.0,
    reduction: Reduction = "mean",
    *,
    backend: Backend = "auto",
) -> Tensor:
    r"""Channel-wise distillation loss.

    Each channel of the logits is softened over its spatial positions at temperature
    :math:`\tau` and the student's distribution is pulled towards the teacher's:

    .. math::

        L = \frac{\tau^2}{N C} \sum_{n=1}^{N} \sum_{c=1}^{C}
            \mathrm{KL}\left(p_T[n, c] \,\|\, p_S[n, c]\right),
        \qquad p[n, c, i] = \mathrm{softmax}_i\left(x[n, c, i] / \tau\right).

    Reference: C. Shu, Y. Liu, J. Gao, Z. Yan, C. Shen, "Channel-wise Knowledge Distillation for
    Dense Prediction", ICCV 2021.

    The teacher is detached inside: it never receives a gradient.

    **Masked logits** (``-inf``): 0 log 0 = 0, a position whose teacher probability is 0 contributes
    nothing. A student ``-inf`` where the teacher's probability is positive gives ``+inf`` (the true
    KL; the gradient stays finite); a channel whose teacher logits are all ``-inf`` gives NaN.

    Args:
        student: student logits (or features).
        teacher: teacher logits, same shape and device.
        tau: temperature, > 0. The paper uses 4 for logits.
        reduction: ``"mean"`` divides the sum by ``N * C`` (the formula above); ``"sum"`` drops the
            division; ``"none"`` returns the ``(N, C)`` terms ``tau^2 * KL``.
        backend: kernel backend of :func:`segkd.ops.channel_kl`.

    Shape:
        - student, teacher: ``(N, C, H, W)`` or ``(N, C, L)``.
        - output: scalar, or ``(N, C)`` with ``reduction="none"``.

    Returns:
        The loss, in fp32 (fp64 for fp64 inputs).

    Raises:
        TypeError: non-tensor or integer inputs.
        ValueError: shapes or devices differ, fewer than 3 dims, ``tau`` outside ``[1e-12, 1e12]``,
            unknown ``reduction``.

    Example:
        >>> import torch
        >>> from segkd.functional import cwd_loss
        >>> _ = torch.manual_seed(0)
        >>> student = torch.randn(2, 4, 16, 16, requires_grad=True)
        >>> teacher = torch.randn(2, 4, 16, 16)
        >>> loss = cwd_loss(student, teacher, tau=4.0)
        >>> round(loss.item(), 4)
        0.9742
        >>> loss.backward()
        >>> student.grad.shape
        torch.Size([2, 4, 16, 16])
    """
    # The fused op validates every argument, computes the KL rows, tau^2 scaling and reduction, and
    # detaches the teacher.
    return weighted_channel_kl(student, teacher, tau, "uniform", reduction=reduction, backend=backend)


class CWDLoss(nn.Module):
    r"""Channel-wise distillation loss as a module; see :func:`segkd.functional.cwd_loss`.

    Args:
        tau: temperature, > 0 (default 4, as in the paper for logits).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        backend: kernel backend of :func:`segkd.ops.channel_kl`.

    Shape:
        - student, teacher: ``(N, C, H, W)`` or ``(N, C, L)``.
        - output: scalar, or ``(N, C)`` with ``reduction="none"``.

    Example:
        >>> import torch
        >>> from segkd import CWDLoss
        >>> _ = torch.manual_seed(0)
        >>> criterion = CWDLoss(tau=4.0)
        >>> student, teacher = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
        >>> round(criterion(student, teacher).item(), 4)
        0.9742
    """

    def __init__(self, tau: float = 4.0, reduction: Reduction = "mean", *, backend: Backend = "auto") -> None:
        super().__init__()
        self.tau = _checks.check_temperature(tau)
        self.reduction: Reduction = _checks.check_reduction(reduction)  # type: ignore[assignment]
        self.backend: Backend = _checks.check_choice(backend, "backend", BACKENDS)  # type: ignore[assignment]

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        """Return the CWD loss of ``student`` towards ``teacher``."""
        return cwd_loss(student, teacher, self.tau, self.reduction, backend=self.backend)

    def distillation_checks(self) -> LossDeclaration:
        """The properties :func:`segkd.testing.check_distillation_loss` checks on this loss, and its reference."""
        from segkd.testing.checks import LossDeclaration
        from segkd.testing.reference import cwd_loss_reference

        tau, reduction = self.tau, self.reduction
        return LossDeclaration(
            zero_at_equal=True,
            channel_shift_invariant=True,
            reference=lambda s, t: cwd_loss_reference(s, t, tau, reduction),
        )

    def extra_repr(self) -> str:
        return f"tau={self.tau}, reduction={self.reduction!r}"


# With its default settings the function declares what the module with its defaults declares (segkd.testing).
cwd_loss.distillation_checks = lambda: CWDLoss().distillation_checks()  # type: ignore[attr-defined]
