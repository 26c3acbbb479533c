"""``weighted_channel_kl``: the fused weighted channel-wise KL loss that CWD and HWD are built on.

:func:`segkd.ops.channel_kl` returns the ``(N, C)`` KL values; a loss then weights, scales and
reduces them with a handful of small operations, and its backward expands the gradient back to
``(N * C,)`` before the row kernel runs. This op does the whole loss in three launches on the
Triton backend: the row kernel (KL, squared distance, normaliser statistics), one finalize kernel
(HWD's weights, ``tau^2`` scaling, reduction, and the backward coefficients
``coef = d loss / d kl``), and in the backward one row kernel that folds ``grad_output * coef``
in. The PyTorch backend runs the same steps with PyTorch operations (``_weighting``), and is the
reference the Triton steps are tested against.

Layers: :func:`weighted_channel_kl` (validation, dispatch) → :class:`WeightedChannelKLFunction`
(autograd; the ``torch.library`` custom op ``segkd::weighted_channel_kl_forward`` while compiling)
→ the backends' ``forward``/``finalize``/``backward`` launchers.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Literal

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from segkd import _checks
from segkd.ops import _torch_backend, _weighting
from segkd.ops.channel_kl import (
    Backend,
    _channel_kl_backward_op,
    _launcher,
    as_rows,
    differentiable_gradient,
    gradient_inputs,
    keeps_direction,
    remember_gradient_inputs,
    resolve_backend,
    saved_gradient,
    stats_shape,
)

__all__ = ["WEIGHTINGS", "WeightedChannelKLFunction", "weighted_channel_kl"]

Weighting = Literal["uniform", "hwd"]
WEIGHTINGS = ("uniform", "hwd")
Reduction = Literal["mean", "sum", "none"]
_TRITON_WEIGHTING = "segkd.ops._triton_weighting"


def _triton_weighting() -> Any:
    return sys.modules.get(_TRITON_WEIGHTING) or importlib.import_module(_TRITON_WEIGHTING)


def _gradient(ctx: Any, grad_loss: Tensor) -> Tensor:
    """Student gradient of ``loss`` from what the forward saved (``coef = d loss / d kl`` last) and ``grad_loss``."""
    *saved, coef = ctx.saved_tensors
    grad_rows = grad_loss.reshape(-1)
    if torch.is_grad_enabled():  # create_graph=True: a gradient autograd can differentiate again
        student, teacher = gradient_inputs(ctx, tuple(saved))
        return differentiable_gradient(student, teacher, coef * grad_rows.to(coef.dtype), ctx.tau)
    if not ctx.kept_direction and getattr(_launcher(ctx.backend), "FUSED_COEFFICIENTS", False):
        # One kernel: grad_loss (a scalar, or one value per row) and coef are folded in per row.
        student, teacher, stats_s, stats_t = saved
        return _launcher(ctx.backend).backward(student, teacher, stats_s, stats_t, grad_rows, ctx.tau, coef=coef)
    return saved_gradient(ctx, tuple(saved), (coef * grad_rows.to(coef.dtype)).contiguous())


class WeightedChannelKLFunction(torch.autograd.Function):
    """Autograd node of :func:`weighted_channel_kl` on ``(R, L)`` rows.

    Saves the inputs, the backend's per-row statistics and the per-row coefficients, or, with
    ``keep_direction=True`` (the torch backend on CPU, as for
    :class:`~segkd.ops.channel_kl.ChannelKLFunction`), ``p_S - p_T`` and the coefficients; the
    teacher and any given weights get no gradient.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        student: Tensor,
        teacher: Tensor,
        weights: Tensor | None,
        tau: float,
        channels: int,
        mode: str,
        mu: float,
        beta: float,
        reduction: str,
        backend: str,
        keep_direction: bool = False,
    ) -> Tensor:
        keep_direction = keep_direction and backend == "torch"
        if keep_direction:  # the torch backend also writes p_S - p_T (see keeps_direction)
            direction = _torch_backend.new_direction(student)
            kl, sqdist, _, _ = _torch_backend.forward(student, teacher, tau, mode == "hwd", direction=direction)
            aux = sqdist if mode == "hwd" else weights
            loss, coef = _weighting.finalize(kl, aux, channels, mode, mu, beta, tau * tau, reduction)
            ctx.save_for_backward(direction, coef)
        else:
            arguments = (student, teacher, weights, tau, channels, mode, mu, beta, reduction, backend)
            loss, coef, stats_s, stats_t = _forward_impl(*arguments)
            ctx.save_for_backward(student, teacher, stats_s, stats_t, coef)
        remember_gradient_inputs(ctx, student, teacher, tau, backend, kept_direction=keep_direction)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor | None) -> tuple[Tensor | None, ...]:
        nothing: tuple[None, ...] = (None,) * 10
        if grad_loss is None or not ctx.needs_input_grad[0]:
            return (None, *nothing)
        return (_gradient(ctx, grad_loss), *nothing)


def _forward_impl(
    student: Tensor,
    teacher: Tensor,
    weights: Tensor | None,
    tau: float,
    channels: int,
    mode: str,
    mu: float,
    beta: float,
    reduction: str,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(loss, coef, stats_s, stats_t)``: the loss, ``d loss / d kl`` per row, and the backend's row statistics."""
    if backend == "triton":
        return _triton_weighting().weighted_forward(student, teacher, weights, tau, channels, mode, mu, beta, reduction)
    kl, sqdist, stats_s, stats_t = _launcher(backend).forward(student, teacher, tau, mode == "hwd")
    aux = sqdist if mode == "hwd" else weights
    loss, coef = _weighting.finalize(kl, aux, channels, mode, mu, beta, tau * tau, reduction)
    return loss, coef, stats_s, stats_t


# ---------------------------------------------------------------------------------------------
# torch.compile: the forward behind a torch.library custom op (opaque to Dynamo and Inductor, with
# a fake implementation for shapes); its backward multiplies grad_output by coef (a traced PyTorch
# operation) and calls channel_kl's backward custom op.
# ---------------------------------------------------------------------------------------------


def _forward_op_fake(
    student: Tensor,
    teacher: Tensor,
    weights: Tensor | None,
    tau: float,
    channels: int,
    mode: str,
    mu: float,
    beta: float,
    reduction: str,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dtype = _weighting_dtype(student)
    num_rows = student.shape[0]
    loss_shape = (num_rows // channels, channels) if reduction == "none" else ()
    stats = stats_shape(backend, num_rows)
    return (
        student.new_empty(loss_shape, dtype=dtype),
        student.new_empty(num_rows, dtype=dtype),
        student.new_empty(stats, dtype=dtype),
        student.new_empty(stats, dtype=dtype),
    )


def _weighting_dtype(student: Tensor) -> torch.dtype:
    return torch.float64 if student.dtype == torch.float64 else torch.float32


def _op_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    student, teacher, _, tau, _, _, _, _, _, backend = inputs
    _, coef, stats_s, stats_t = output
    ctx.save_for_backward(student, teacher, stats_s, stats_t, coef)
    ctx.tau = tau
    ctx.backend = backend
    ctx.mark_non_differentiable(coef, stats_s, stats_t)


def _op_backward(ctx: Any, grad_loss: Tensor | None, *_: Any) -> tuple[Tensor | None, ...]:
    student, teacher, stats_s, stats_t, coef = ctx.saved_tensors
    nothing: tuple[None, ...] = (None,) * 9
    if grad_loss is None or not ctx.needs_input_grad[0]:
        return (None, *nothing)
    grad_kl = coef * grad_loss.reshape(-1).to(coef.dtype)
    grad = _channel_kl_backward_op(student, teacher, stats_s, stats_t, grad_kl, ctx.tau, ctx.backend)
    return (grad, *nothing)


_forward_op: Any = None
if _channel_kl_backward_op is not None:  # torch >= 2.4, as for channel_kl
    _forward_op = torch.library.custom_op("segkd::weighted_channel_kl_forward", mutates_args=())(_forward_impl)
    _forward_op.register_fake(_forward_op_fake)
    _forward_op.register_autograd(_op_backward, setup_context=_op_setup_context)


def _apply(*arguments: Any) -> Tensor:
    """Run the op on rows with ``_forward_impl``'s arguments: the autograd.Function eagerly, the custom op compiling."""
    if _forward_op is not None and torch.compiler.is_compiling():
        return _forward_op(*arguments)[0]
    student, backend = arguments[0], arguments[-1]
    return WeightedChannelKLFunction.apply(*arguments, keeps_direction(student, backend))


def weighted_channel_kl(
    student: Tensor,
    teacher: Tensor,
    tau: float = 1.0,
    weights: Weighting | Tensor = "uniform",
    *,
    mu: float = 0.0,
    beta: float = 0.1,
    reduction: Reduction = "mean",
    backend: Backend = "auto",
) -> Tensor:
    r"""Weighted channel-wise KL loss between spatial softmaxes: the fused core of CWD and HWD.

    With :math:`\mathrm{KL}[n, c]` from :func:`segkd.ops.channel_kl` and one weight per channel,

    .. math::

        \ell[n, c] = \tau^2\, w[n, c]\, \mathrm{KL}\left(p_T[n, c] \,\|\, p_S[n, c]\right), \qquad
        L = \frac{1}{N C} \sum_{n, c} \ell[n, c] \ \text{(mean)}, \quad \sum_{n, c} \ell[n, c] \ \text{(sum)}.

    ``weights="uniform"`` is :math:`w = 1` (CWD); ``"hwd"`` gives HWD's weights computed from the
    squared distance of the softmaxes (see :func:`segkd.functional.hwd_weights`, ``distance="prob"``);
    a tensor gives the weights directly. Weights are never differentiated, and the teacher is
    detached: the gradient reaches the student only,
    :math:`\partial L / \partial s = \frac{\partial L}{\partial \ell}\, \tau\, w\, (p_S - p_T)`.
    A ``create_graph=True`` backward gives a gradient autograd differentiates again (double backward),
    with the weights held fixed.

    On CUDA with Triton this is two kernels forward (rows, then weights and reduction in one
    program, deterministic) and one backward; elsewhere the same steps run in PyTorch.

    Args:
        student: student logits.
        teacher: teacher logits, same shape and device (a different floating dtype is promoted).
        tau: softmax temperature, in ``[1e-12, 1e12]``.
        weights: ``"uniform"``, ``"hwd"``, or an ``(N, C)`` floating tensor on the inputs' device.
        mu: HWD's shift of the standardised divergences (``weights="hwd"`` only).
        beta: HWD's curve base, > 0 (``weights="hwd"`` only).
        reduction: ``"mean"`` (divide by ``N * C``), ``"sum"``, or ``"none"`` for the ``(N, C)`` terms.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``, as for :func:`segkd.ops.channel_kl`.

    Shape:
        - student, teacher: ``(N, C, H, W)`` or ``(N, C, L)``.
        - weights (tensor): ``(N, C)``.
        - output: scalar, or ``(N, C)`` with ``reduction="none"``.

    Returns:
        The loss in fp32 (fp64 for fp64 inputs).

    Raises:
        TypeError: non-tensor or non-floating inputs or weights, non-numeric hyper-parameters.
        ValueError: shapes or devices differ, fewer than 3 dims, empty input, ``tau`` outside ``[1e-12, 1e12]``,
            ``beta <= 0``, non-finite ``mu``, unknown ``weights`` name, ``reduction`` or ``backend``,
            weights of the wrong shape or device.
        RuntimeError: ``backend="triton"`` without Triton.

    Example:
        >>> import torch
        >>> from segkd.ops import channel_kl, weighted_channel_kl
        >>> _ = torch.manual_seed(0)
        >>> student = torch.randn(2, 3, 8, 8, requires_grad=True)
        >>> teacher = torch.randn(2, 3, 8, 8)
        >>> loss = weighted_channel_kl(student, teacher, tau=2.0)
        >>> torch.allclose(loss, 4.0 * channel_kl(student, teacher, tau=2.0).mean())
        True
        >>> weights = torch.tensor([[1.0, 0.0, 2.0], [0.5, 0.5, 2.0]])
        >>> round(weighted_channel_kl(student, teacher, 2.0, weights, reduction="sum").item(), 3)
        6.897
        >>> loss.backward()
    """
    student_rows, teacher_rows = as_rows(student, teacher)
    tau = _checks.check_temperature(tau)
    mu = _checks.check_finite_number(mu, "mu")
    beta = _checks.check_positive(beta, "beta")
    reduction = _checks.check_reduction(reduction)  # type: ignore[assignment]
    channels = student.shape[1]
    given: Tensor | None = None
    if isinstance(weights, str):
        mode = _checks.check_choice(weights, "weights", WEIGHTINGS)
    else:
        given = _checks.check_weights_tensor(weights, "weights", student)
        given = given.detach().reshape(-1).to(_weighting_dtype(student_rows))
        mode = "given"
    name = resolve_backend(backend, student.device, student_rows.dtype)
    return _apply(student_rows, teacher_rows, given, tau, channels, mode, mu, beta, reduction, name)
