"""``channel_kl``: the spatial-softmax KL between teacher and student channels, shared by CWD and HWD.

Four layers, four names:

* :func:`channel_kl` (dispatcher): validates, flattens ``(N, C, *)`` to rows, picks a backend.
* :class:`ChannelKLFunction` (autograd): saves the inputs and per-row normaliser statistics only (the
  torch backend on CPU saves ``p_S - p_T`` instead, see :func:`keeps_direction`). Under
  ``torch.compile`` the same launchers run behind the ``torch.library`` custom ops
  ``segkd::channel_kl_forward`` / ``segkd::channel_kl_backward`` (fake and autograd registered), so
  Dynamo and Inductor see one opaque call and the graph does not break.
* launchers: ``_torch_backend.forward/backward`` and ``_triton_backend.forward/backward``.
* kernels: the PyTorch reference blocks, or the Triton kernels.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType
from typing import Any, Literal, overload

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from segkd import _checks
from segkd.ops import _selfcheck, _torch_backend

__all__ = ["BACKENDS", "ChannelKLFunction", "available_backends", "channel_kl", "resolve_backend"]

Backend = Literal["auto", "torch", "triton"]
BACKENDS = ("auto", "torch", "triton")
_DISABLE_TRITON_ENV = "SEGKD_DISABLE_TRITON"
_TRITON_LAUNCHERS = "segkd.ops._triton_backend"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in {"1", "true", "yes", "on"}


def _triton_module() -> ModuleType | None:
    """The Triton launcher module, or ``None`` when Triton cannot be imported here."""
    loaded = sys.modules.get(_TRITON_LAUNCHERS)  # the per-call fast path: no import machinery
    if loaded is not None:
        return loaded
    try:
        return importlib.import_module(_TRITON_LAUNCHERS)
    except ImportError:
        return None


def _triton_available() -> bool:
    # A constant for torch.compile (marked below): Dynamo would otherwise break the graph at importlib.
    return _triton_module() is not None


# What `torch.compiler.assume_constant_result` does, without the ~1 s import of torch._dynamo (and Triton) that
# decorator costs at `import segkd`: Dynamo reads this attribute when it traces a call, and then runs the function
# instead of tracing it. tests/test_import_time.py checks that the decorator still sets exactly this attribute.
_triton_available._dynamo_marked_constant = True  # type: ignore[attr-defined]


def available_backends() -> list[str]:
    """Concrete backends usable in this environment (``"torch"`` always is)."""
    names = ["torch"]
    if not _env_flag(_DISABLE_TRITON_ENV) and _triton_available():
        names.append("triton")
    return names


def _auto_considers_triton(device: torch.device) -> bool:
    """Whether ``"auto"`` considers Triton on ``device`` at all: CUDA (tests widen it to the CPU interpreter)."""
    return device.type == "cuda"


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """Turn ``"auto" | "torch" | "triton"`` into the concrete backend for ``device`` and the inputs' ``dtype``.

    ``SEGKD_DISABLE_TRITON=1`` forces ``"torch"`` whatever was asked. ``"auto"`` picks Triton for CUDA
    tensors when it imports, the GPU's compute capability is one the kernels are compile-tested for
    (sm_75 or newer), and the kernels pass their first-use self-check on that ``(device, dtype)``
    (``_selfcheck``: run once, a warning and the PyTorch reference if it fails); the PyTorch reference
    otherwise. Under ``torch.compile`` it reads the check's cached verdict only (no verdict yet: ``"torch"``).
    ``"triton"`` skips the check: errors are raised.

    Raises:
        ValueError: unknown ``backend``.
        RuntimeError: ``backend="triton"`` where Triton cannot be imported.
    """
    _checks.check_choice(backend, "backend", BACKENDS)
    if backend == "torch" or _env_flag(_DISABLE_TRITON_ENV):
        return "torch"
    if backend == "triton":
        if not _triton_available():
            raise RuntimeError(
                "backend='triton' was requested but Triton is not available: install it with "
                "`pip install segkd[triton]`, or use backend='torch'."
            )
        return "triton"
    if not (_auto_considers_triton(device) and _triton_available()):
        return "torch"
    if torch.compiler.is_compiling():  # never run the check while tracing
        return "triton" if _selfcheck.passed(device, dtype) else "torch"
    return "triton" if _selfcheck.triton_works(device, dtype) else "torch"


def stats_shape(backend: str, num_rows: int) -> tuple[int, ...]:
    """Shape of the per-row statistics a concrete backend saves for its backward.

    ``(R,)`` (``logsumexp(x / tau)``) unless the launcher module says otherwise with a ``stats_shape``
    function (Triton: ``(R, 2)``, the row max and ``log z``). Fake implementations need it.
    """
    custom = getattr(_launcher(backend), "stats_shape", None)
    return (num_rows,) if custom is None else tuple(custom(num_rows))


def _launcher(name: str) -> ModuleType:
    if name == "torch":
        return _torch_backend
    module = _triton_module()
    if module is None:  # resolve_backend already checked; only reachable if Triton vanished since.
        raise RuntimeError("The Triton backend could not be imported.")
    return module


class ChannelKLFunction(torch.autograd.Function):
    """Autograd node of :func:`channel_kl` on ``(R, L)`` rows.

    Saves ``student``, ``teacher`` and the backend's per-row statistics; never a softmax. With
    ``keep_direction=True`` (the torch backend on CPU only, see :func:`keeps_direction`) it saves
    instead the ``(R, L)`` difference ``p_S - p_T`` in the compute dtype, and the backward is one
    multiply. The squared distance output carries no gradient; the teacher gets none either.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        student: Tensor,
        teacher: Tensor,
        tau: float,
        need_sqdist: bool,
        backend: str,
        keep_direction: bool = False,
    ) -> tuple[Tensor, Tensor]:
        keep_direction = keep_direction and backend == "torch"
        if keep_direction:
            direction = _torch_backend.new_direction(student)
            kl, sqdist, _, _ = _torch_backend.forward(student, teacher, tau, need_sqdist, direction=direction)
            ctx.save_for_backward(direction)
        else:
            kl, sqdist, stats_s, stats_t = _launcher(backend).forward(student, teacher, tau, need_sqdist)
            ctx.save_for_backward(student, teacher, stats_s, stats_t)
        remember_gradient_inputs(ctx, student, teacher, tau, backend, kept_direction=keep_direction)
        if sqdist is None:
            sqdist = kl.new_empty(0)
        ctx.mark_non_differentiable(sqdist)
        return kl, sqdist

    @staticmethod
    def backward(ctx: Any, grad_kl: Tensor | None, grad_sqdist: Tensor | None) -> tuple[Tensor | None, ...]:
        nothing: tuple[None, ...] = (None,) * 5
        if grad_kl is None or not ctx.needs_input_grad[0]:
            return (None, *nothing)
        if torch.is_grad_enabled():  # create_graph=True: a gradient autograd can differentiate again
            student, teacher = gradient_inputs(ctx, ctx.saved_tensors)
            return (differentiable_gradient(student, teacher, grad_kl, ctx.tau), *nothing)
        return (saved_gradient(ctx, ctx.saved_tensors, grad_kl.contiguous()), *nothing)


def keeps_direction(student: Tensor, backend: str) -> bool:
    """Whether the forward keeps ``p_S - p_T`` for the backward: the torch backend on CPU, when a gradient is needed.

    On CPU the exponential passes are what costs, and keeping the difference saves the backward's two
    softmaxes; on CUDA every backend saves only the inputs and per-row statistics.
    """
    return backend == "torch" and student.device.type == "cpu" and student.requires_grad and torch.is_grad_enabled()


def remember_gradient_inputs(
    ctx: Any, student: Tensor, teacher: Tensor, tau: float, backend: str, *, kept_direction: bool
) -> None:
    """Store on ``ctx`` what :func:`saved_gradient` and :func:`gradient_inputs` need besides the saved tensors.

    When the forward kept ``p_S - p_T``, the inputs are not saved tensors (the first-order backward does not
    read them, and saved-tensor hooks see only the difference); ``ctx`` holds plain references to them and
    their version counters, for a ``create_graph=True`` backward.
    """
    ctx.tau = tau
    ctx.backend = backend
    ctx.student_dtype = student.dtype
    ctx.kept_direction = kept_direction
    if kept_direction:
        ctx.inputs = (student, teacher)
        ctx.input_versions = (student._version, teacher._version)


def gradient_inputs(ctx: Any, saved: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    """The ``(student, teacher)`` rows of the forward, for a ``create_graph=True`` backward.

    Raises:
        RuntimeError: the forward kept ``p_S - p_T`` and an input was modified in place since.
    """
    if not ctx.kept_direction:
        return saved[0], saved[1]
    student, teacher = ctx.inputs
    if (student._version, teacher._version) != ctx.input_versions:
        raise RuntimeError(
            "A create_graph=True backward through channel_kl needs the `student` and `teacher` of the forward, "
            "but one of them was modified by an in-place operation since; clone it before modifying it."
        )
    return student, teacher


def differentiable_gradient(student: Tensor, teacher: Tensor, grad_kl: Tensor, tau: float) -> Tensor:
    r"""``grad_kl / tau * (p_S - p_T)`` with PyTorch operations autograd differentiates again (double backward).

    What a ``create_graph=True`` backward returns on every backend: the same value as the fused backward
    (in the compute dtype, rounded once into the student's dtype), but with a graph to ``student`` and
    ``grad_kl``, so ``d/ds (v . grad) = grad_kl / tau^2 (diag(p_S) - p_S p_S^T) v`` comes out right.
    """
    dtype = _torch_backend.compute_dtype(student.dtype)
    inv_tau = 1.0 / tau
    p_s = torch.softmax(student.to(dtype) * inv_tau, dim=1)
    p_t = torch.softmax(teacher.to(dtype) * inv_tau, dim=1)
    scale = grad_kl.reshape(-1, 1).to(dtype) * inv_tau
    return (scale * (p_s - p_t)).to(student.dtype)


def saved_gradient(ctx: Any, saved: tuple[Tensor, ...], grad_kl: Tensor) -> Tensor:
    """The student gradient for ``grad_kl`` (one contiguous value per row) from what the forward saved.

    ``saved`` is ``(direction,)`` when the forward kept ``p_S - p_T`` (``ctx.kept_direction``), else
    ``(student, teacher, stats_s, stats_t)``; ``ctx`` is set by :func:`remember_gradient_inputs`.
    """
    if ctx.kept_direction:
        (direction,) = saved
        return _torch_backend.gradient_from_direction(direction, grad_kl, ctx.tau, ctx.student_dtype)
    student, teacher, stats_s, stats_t = saved
    return _launcher(ctx.backend).backward(student, teacher, stats_s, stats_t, grad_kl, ctx.tau)


# ---------------------------------------------------------------------------------------------
# torch.compile: the same launchers behind two torch.library custom ops. Dynamo and Inductor treat
# them as opaque calls with known output shapes (register_fake), so neither backend is traced into
# (the Triton interpreter, or a Python loop over row blocks); no graph break. Eager calls keep the
# cheaper ChannelKLFunction above.
# ---------------------------------------------------------------------------------------------


def _forward_op_impl(
    student: Tensor, teacher: Tensor, tau: float, need_sqdist: bool, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    kl, sqdist, stats_s, stats_t = _launcher(backend).forward(student, teacher, tau, need_sqdist)
    return kl, (kl.new_empty(0) if sqdist is None else sqdist), stats_s, stats_t


def _forward_op_fake(
    student: Tensor, teacher: Tensor, tau: float, need_sqdist: bool, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dtype = _torch_backend.compute_dtype(torch.promote_types(student.dtype, teacher.dtype))
    num_rows = student.shape[0]
    kl = student.new_empty(num_rows, dtype=dtype)
    sqdist = student.new_empty(num_rows if need_sqdist else 0, dtype=dtype)
    stats = stats_shape(backend, num_rows)
    return kl, sqdist, student.new_empty(stats, dtype=dtype), student.new_empty(stats, dtype=dtype)


def _backward_op_impl(
    student: Tensor, teacher: Tensor, stats_s: Tensor, stats_t: Tensor, grad_kl: Tensor, tau: float, backend: str
) -> Tensor:
    return _launcher(backend).backward(student, teacher, stats_s, stats_t, grad_kl.contiguous(), tau)


def _backward_op_fake(
    student: Tensor, teacher: Tensor, stats_s: Tensor, stats_t: Tensor, grad_kl: Tensor, tau: float, backend: str
) -> Tensor:
    return torch.empty(student.shape, dtype=student.dtype, device=student.device)


def _op_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    student, teacher, tau, _, backend = inputs
    _, sqdist, stats_s, stats_t = output
    ctx.save_for_backward(student, teacher, stats_s, stats_t)
    ctx.tau = tau
    ctx.backend = backend
    ctx.mark_non_differentiable(sqdist, stats_s, stats_t)


def _op_backward(ctx: Any, grad_kl: Tensor | None, *_: Any) -> tuple[Tensor | None, ...]:
    student, teacher, stats_s, stats_t = ctx.saved_tensors
    if grad_kl is None or not ctx.needs_input_grad[0]:
        return None, None, None, None, None
    grad_student = _channel_kl_backward_op(student, teacher, stats_s, stats_t, grad_kl, ctx.tau, ctx.backend)
    return grad_student, None, None, None, None


_channel_kl_forward_op: Any = None
_channel_kl_backward_op: Any = None
if hasattr(torch.library, "custom_op"):  # torch >= 2.4; older versions trace ChannelKLFunction instead
    _channel_kl_forward_op = torch.library.custom_op("segkd::channel_kl_forward", mutates_args=())(_forward_op_impl)
    _channel_kl_forward_op.register_fake(_forward_op_fake)
    _channel_kl_backward_op = torch.library.custom_op("segkd::channel_kl_backward", mutates_args=())(_backward_op_impl)
    _channel_kl_backward_op.register_fake(_backward_op_fake)
    _channel_kl_forward_op.register_autograd(_op_backward, setup_context=_op_setup_context)


def _apply(student: Tensor, teacher: Tensor, tau: float, need_sqdist: bool, backend: str) -> tuple[Tensor, Tensor]:
    """Run the op on rows: the autograd.Function in eager mode, the custom op while compiling."""
    if _channel_kl_forward_op is not None and torch.compiler.is_compiling():
        kl, sqdist, _, _ = _channel_kl_forward_op(student, teacher, tau, need_sqdist, backend)
        return kl, sqdist
    keep = keeps_direction(student, backend)
    return ChannelKLFunction.apply(student, teacher, tau, need_sqdist, backend, keep)


def as_rows(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Validate a logit pair and return it as ``(N * C, L)`` rows: mixed dtypes promoted, the teacher detached."""
    _checks.check_student_teacher_logits(student, teacher)
    if student.dtype != teacher.dtype:  # e.g. a bf16 student under autocast and an fp32 teacher
        common = torch.promote_types(student.dtype, teacher.dtype)
        student, teacher = student.to(common), teacher.to(common)
    rows = student.shape[0] * student.shape[1]
    return student.reshape(rows, -1), teacher.detach().reshape(rows, -1)


@overload
def channel_kl(
    student: Tensor, teacher: Tensor, tau: float = ..., *, return_sqdist: Literal[False] = ..., backend: Backend = ...
) -> Tensor: ...


@overload
def channel_kl(
    student: Tensor, teacher: Tensor, tau: float = ..., *, return_sqdist: Literal[True], backend: Backend = ...
) -> tuple[Tensor, Tensor]: ...


def channel_kl(
    student: Tensor,
    teacher: Tensor,
    tau: float = 1.0,
    *,
    return_sqdist: bool = False,
    backend: Backend = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Channel-wise KL divergence between spatial softmaxes of teacher and student.

    Each channel ``(n, c)`` is turned into a distribution over its ``L = H * W`` positions,

    .. math::

        p_S[n, c, i] = \frac{\exp(s_{n,c,i} / \tau)}{\sum_j \exp(s_{n,c,j} / \tau)}, \qquad
        \mathrm{kl}[n, c] = \sum_i p_T[n, c, i] \log \frac{p_T[n, c, i]}{p_S[n, c, i]},

    and optionally :math:`\mathrm{sqdist}[n, c] = \sum_i (p_S[n,c,i] - p_T[n,c,i])^2`.

    The backward pass gives ``grad_student = grad_kl[n, c] / tau * (p_S - p_T)``; the teacher is
    detached and gets no gradient; ``sqdist`` carries none. Statistics are accumulated in fp32
    (fp64 for fp64 inputs) and returned in that dtype; the gradient has the student's dtype.
    Only the inputs and two to four numbers per channel are kept for the backward pass (on CPU the
    torch backend keeps ``p_S - p_T`` instead, and skips recomputing the softmaxes).
    A ``create_graph=True`` backward (a gradient penalty, a Hessian-vector product) recomputes the
    gradient with differentiable PyTorch operations, on every backend, so double backward is exact.

    Args:
        student: student logits.
        teacher: teacher logits, same shape and device (a different floating dtype is promoted).
        tau: softmax temperature, in ``[1e-12, 1e12]``.
        return_sqdist: also return the squared L2 distance between the two softmaxes.
        backend: ``"auto"`` (Triton on CUDA when installed and its first-use self-check passes, else
            PyTorch), ``"torch"`` or ``"triton"``. ``SEGKD_DISABLE_TRITON=1`` forces ``"torch"``.

    Shape:
        - student, teacher: ``(N, C, H, W)`` or ``(N, C, L)`` (any trailing dims are flattened).
        - output: ``(N, C)``, and ``(N, C)`` for ``sqdist``.

    Returns:
        ``kl``, or ``(kl, sqdist)`` when ``return_sqdist=True``.

    Raises:
        TypeError: non-tensor or non-floating inputs, non-numeric ``tau``.
        ValueError: shapes differ, fewer than 3 dims, empty input, different devices,
            ``tau`` outside ``[1e-12, 1e12]``, unknown ``backend``; NaN/Inf inputs when ``SEGKD_CHECK_FINITE=1``.
        RuntimeError: ``backend="triton"`` without Triton.

    Example:
        >>> import torch
        >>> from segkd.ops import channel_kl
        >>> _ = torch.manual_seed(0)
        >>> student, teacher = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
        >>> kl = channel_kl(student, teacher, tau=1.0)
        >>> kl.shape
        torch.Size([2, 3])
        >>> round(kl.sum().item(), 4)
        7.9162
    """
    student_rows, teacher_rows = as_rows(student, teacher)
    tau = _checks.check_temperature(tau)
    name = resolve_backend(backend, student.device, student_rows.dtype)
    batch, channels = student.shape[:2]
    kl, sqdist = _apply(student_rows, teacher_rows, tau, return_sqdist, name)
    kl = kl.view(batch, channels)
    if return_sqdist:
        return kl, sqdist.view(batch, channels)
    return kl
