"""DIST: knowledge distillation from a stronger teacher by matching correlations, Huang et al., NeurIPS 2022."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from segkd import _checks

if TYPE_CHECKING:
    from segkd.testing.checks import LossDeclaration

__all__ = ["DISTLoss", "dist_loss", "pearson_correlation"]

_PEARSON_EPS = 1e-8


def pearson_correlation(a: Tensor, b: Tensor, dim: int = -1, eps: float = _PEARSON_EPS) -> Tensor:
    r"""Pearson correlation of ``a`` and ``b`` along ``dim``: the cosine of the mean-centred vectors.

    .. math::

        \rho(a, b) = \frac{\langle a - \bar a,\; b - \bar b \rangle}
                          {\lVert a - \bar a \rVert \, \lVert b - \bar b \rVert + \epsilon}

    ``eps`` sits in the denominator exactly as in the DIST code. **Degenerate case**: a vector with
    zero variance (constant, or of length 1) centres to zero, so :math:`\rho = 0`; this is the
    continuous limit of the formula (the numerator vanishes faster than the denominator) and its
    gradient is finite (zero through the zero vector).

    Args:
        a: first tensor.
        b: second tensor, same shape.
        dim: the dimension along which vectors are correlated.
        eps: added to the product of the norms, >= 0.

    Shape:
        - a, b: any shape, identical.
        - output: the shape of ``a`` without ``dim``.

    Returns:
        Correlations in ``[-1, 1]`` (slightly inside for ``eps > 0``).

    Example:
        >>> import torch
        >>> from segkd.losses.dist import pearson_correlation
        >>> a = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]])
        >>> b = torch.tensor([[2.0, 4.0, 6.5], [0.0, 1.0, 2.0]])
        >>> pearson_correlation(a, b)
        tensor([0.9979, 0.0000])
    """
    a_centred = a - a.mean(dim=dim, keepdim=True)
    b_centred = b - b.mean(dim=dim, keepdim=True)
    # linalg.vector_norm has a zero (not NaN) gradient at the zero vector.
    norms = torch.linalg.vector_norm(a_centred, dim=dim) * torch.linalg.vector_norm(b_centred, dim=dim)
    return (a_centred * b_centred).sum(dim=dim) / (norms + eps)


def _class_rows(logits: Tensor) -> Tensor:
    """``(N, C, *)`` -> ``(N * prod(*), C)``: one row per pixel (sample), one column per class."""
    return logits.movedim(1, -1).reshape(-1, logits.shape[1])


def dist_loss(
    student: Tensor,
    teacher: Tensor,
    beta: float = 1.0,
    gamma: float = 1.0,
    tau: float = 1.0,
    softmax: bool = True,
) -> Tensor:
    r"""DIST loss: inter-class and intra-class Pearson-correlation matching, every pixel a sample.

    The logits are rearranged so that each pixel of each image is one row, ``Y`` of shape
    ``(M, C)`` with ``M = N H W``, and (with ``softmax=True``) softened over classes at temperature
    :math:`\tau`:

    .. math::

        Y_S = \mathrm{softmax}(Z_S / \tau), \quad Y_T = \mathrm{softmax}(Z_T / \tau)
        \quad (\text{over the } C \text{ classes of each row}),
        \qquad \text{or, with } \texttt{softmax=False}: \quad Y_S = Z_S / \tau, \quad Y_T = Z_T / \tau,

        L_{inter} = 1 - \frac{1}{M} \sum_{m=1}^{M} \rho\left(Y_S[m, :],\, Y_T[m, :]\right), \qquad
        L_{intra} = 1 - \frac{1}{C} \sum_{c=1}^{C} \rho\left(Y_S[:, c],\, Y_T[:, c]\right),

        L = \tau^2 \left(\beta L_{inter} + \gamma L_{intra}\right),

    where :math:`\rho` is :func:`pearson_correlation` with :math:`\epsilon = 10^{-8}` in the
    denominator. The intra-class term correlates each class's scores across all pixels of the whole
    batch, so the loss does not split into per-pixel or per-image terms and has no ``reduction``.

    Reference: T. Huang, S. You, F. Wang, C. Qian, C. Xu, "Knowledge Distillation from A Stronger
    Teacher", NeurIPS 2022 (code: github.com/hunto/DIST_KD; its segmentation variant applies the
    softmax at :math:`\tau = 1`, the default here).

    Two forms: ``softmax=True`` (default) is DIST_KD's; ``softmax=False`` correlates the raw logits,
    as the HWD authors' ``CriterionDIST`` does (github.com/zju-SWJ/HWD, ``losses/loss.py``, softmax
    commented out; its README's "w/o Softmax" rows are the DIST numbers of the HWD paper's Table II).
    The correlation is scale-invariant, so without the softmax :math:`\tau` only scales the loss by
    :math:`\tau^2` (up to :math:`\epsilon`); the HWD form is ``softmax=False, tau=1``.

    The teacher is detached inside: it never receives a gradient.

    **Degenerate inputs** (finite value and gradient, no NaN): a row or column with zero variance has
    correlation 0 and so contributes 1 to its term. With ``C == 1`` every softmax is 1, both terms are
    1 and ``L = tau^2 (beta + gamma)`` with zero gradient; with a single pixel in the whole batch
    (``M == 1``) the intra-class term is 1.

    Args:
        student: student logits.
        teacher: teacher logits, same shape and device.
        beta: weight of the inter-class term, >= 0.
        gamma: weight of the intra-class term, >= 0.
        tau: softmax temperature, in ``[1e-12, 1e12]``.
        softmax: correlate ``softmax(z / tau)`` (DIST_KD, default) or ``z / tau`` (the HWD code).

    Shape:
        - student, teacher: ``(N, C, H, W)`` (segmentation); also accepted: ``(N, C)``
          (classification, as in the original DIST) and ``(N, C, L)``; every position is a sample.
        - output: scalar.

    Returns:
        The loss, in fp32 (fp64 for fp64 inputs).

    Raises:
        TypeError: non-tensor or integer inputs, non-numeric ``beta``, ``gamma`` or ``tau``.
        ValueError: shapes or devices differ, fewer than 2 dims, empty input, ``tau`` outside ``[1e-12, 1e12]``,
            negative ``beta`` or ``gamma``.

    Example:
        >>> import torch
        >>> from segkd.losses.dist import dist_loss
        >>> _ = torch.manual_seed(0)
        >>> student = torch.randn(2, 5, 8, 8, requires_grad=True)
        >>> teacher = torch.randn(2, 5, 8, 8)
        >>> loss = dist_loss(student, teacher)
        >>> round(loss.item(), 4)
        2.0093
        >>> loss.backward()
        >>> student.grad.shape
        torch.Size([2, 5, 8, 8])
        >>> round(dist_loss(teacher, teacher).item(), 4)
        0.0
        >>> round(dist_loss(student, teacher, softmax=False).item(), 4)  # the HWD code's form
        1.9654
    """
    _checks.check_student_teacher_logits(student, teacher, min_dims=2)
    beta = _checks.check_non_negative(beta, "beta")
    gamma = _checks.check_non_negative(gamma, "gamma")
    tau = _checks.check_temperature(tau)
    softmax = _checks.check_bool(softmax, "softmax")
    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    y_s = _class_rows(student).to(dtype) / tau
    y_t = _class_rows(teacher.detach()).to(dtype) / tau
    if softmax:
        y_s, y_t = torch.softmax(y_s, dim=1), torch.softmax(y_t, dim=1)
    inter = 1.0 - pearson_correlation(y_s, y_t, dim=1).mean()
    intra = 1.0 - pearson_correlation(y_s, y_t, dim=0).mean()
    return (tau * tau) * (beta * inter + gamma * intra)


class DISTLoss(nn.Module):
    r"""DIST loss as a module; see :func:`segkd.functional.dist_loss`.

    Has no trainable parameters. The paper's segmentation setting is ``beta = gamma = tau = 1``
    (the defaults), with the loss added to the task loss at weight 1; the HWD paper's Table II ran
    the same with ``softmax=False`` (raw logits, the HWD code's ``CriterionDIST``).

    Args:
        beta: weight of the inter-class term, >= 0.
        gamma: weight of the intra-class term, >= 0.
        tau: softmax temperature, in ``[1e-12, 1e12]``.
        softmax: correlate softmax probabilities (DIST_KD, default) or raw logits (the HWD code).

    Shape:
        - student, teacher: ``(N, C, H, W)`` logits (also ``(N, C)`` or ``(N, C, L)``).
        - output: scalar.

    Example:
        >>> import torch
        >>> from segkd.losses.dist import DISTLoss
        >>> _ = torch.manual_seed(0)
        >>> criterion = DISTLoss(beta=1.0, gamma=1.0, tau=1.0)
        >>> student, teacher = torch.randn(2, 5, 8, 8), torch.randn(2, 5, 8, 8)
        >>> round(criterion(student, teacher).item(), 4)
        2.0093
    """

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0, softmax: bool = True) -> None:
        super().__init__()
        self.beta = _checks.check_non_negative(beta, "beta")
        self.gamma = _checks.check_non_negative(gamma, "gamma")
        self.tau = _checks.check_temperature(tau)
        self.softmax = _checks.check_bool(softmax, "softmax")

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        """Return the DIST loss of ``student`` logits towards ``teacher`` logits."""
        return dist_loss(student, teacher, self.beta, self.gamma, self.tau, self.softmax)

    def distillation_checks(self) -> LossDeclaration:
        """The properties :func:`segkd.testing.check_distillation_loss` checks on this loss, and its reference."""
        from segkd.testing.checks import LossDeclaration
        from segkd.testing.reference import dist_loss_reference

        beta, gamma, tau, softmax = self.beta, self.gamma, self.tau, self.softmax
        return LossDeclaration(
            # A softmax over classes ignores a per-pixel constant; the raw logits' intra-class term does not.
            pixel_shift_invariant=softmax,
            reference=lambda s, t: dist_loss_reference(s, t, beta, gamma, tau, softmax),
        )

    def extra_repr(self) -> str:
        return f"beta={self.beta}, gamma={self.gamma}, tau={self.tau}, softmax={self.softmax}"


# With its default settings the function declares what the module with its defaults declares (segkd.testing).
dist_loss.distillation_checks = lambda: DISTLoss().distillation_checks()  # type: ignore[attr-defined]
