"""Triton backend of :func:`segkd.ops.channel_kl`: the launchers of the kernels in ``_triton_kernels``.

Same launcher contract as ``_torch_backend`` (the reference):

* ``forward(student, teacher, tau, need_sqdist) -> (kl, sqdist | None, stats_s, stats_t)``, in the
  compute dtype (fp32; fp64 for fp64 inputs, computed in fp64 inside the kernel); ``kl`` and
  ``sqdist`` are ``(R,)``. The row statistics are the backend's own (see ``stats_shape``): here
  ``(R, 2)``, the row max of the raw input and ``log z`` (``lse = max / tau + log z``), so that the
  backward forms ``exp((x - max) / tau - log z)`` without the fp32 rounding of ``lse`` at large logits;
* ``backward(student, teacher, stats_s, stats_t, grad_kl, tau, coef=None) -> grad_student`` ``(R, L)``
  in the student's dtype, ``grad_kl[r] / tau * (p_S - p_T)`` formed in the compute dtype and rounded
  once (with ``coef``: ``grad_kl`` is one element or ``R``, times ``coef[r]``).

CUDA tensors run the compiled kernels. CPU tensors run the same kernels under the Triton
interpreter (slow; this is how CI tests the kernels). The interpreter is chosen when ``triton.jit``
decorates, that is when Triton is first imported, so ``TRITON_INTERPRET=1`` must be in the
environment before that (the test suite's ``conftest.py`` sets it on machines without CUDA);
CPU tensors without it raise a ``RuntimeError`` that says so. Wrapping the compiled kernels in the
interpreter afterwards does not work: Triton's own ``tl.max``/``tl.sum`` helpers stay compiled.
Importing this module raises ``ImportError`` when Triton is missing, which the dispatcher reads as
"Triton unavailable".

Block sizes are module constants so tests can shrink them and cross chunk boundaries on tiny
inputs: a row is read in chunks of at most ``FORWARD_MAX_BLOCK_L`` (forward) or
``BACKWARD_MAX_BLOCK_L`` (backward) elements, and short rows are packed ``ROWS`` to a program
(a power of two, at most ``MAX_ROWS_PER_PROGRAM``) so that a program handles about
``TARGET_TILE_ELEMENTS`` elements per chunk.
"""

from __future__ import annotations

import contextlib
import functools
import math
import struct
from typing import Any

import torch
import triton.language as tl
from torch import Tensor

from segkd.ops import _triton_kernels
from segkd.ops._torch_backend import compute_dtype

__all__ = ["FUSED_COEFFICIENTS", "backward", "forward", "forward_partials", "plan_segments", "stats_shape"]

FUSED_COEFFICIENTS = True  # backward() takes coef=: a weighted loss's backward is one launch

FORWARD_MAX_BLOCK_L = 2048
BACKWARD_MAX_BLOCK_L = 2048
TARGET_TILE_ELEMENTS = 2048
MAX_ROWS_PER_PROGRAM = 64
# Few long rows (e.g. 152 rows of 8192): the forward splits each row into segments of at least
# MIN_SEGMENT_ELEMENTS, one program each, until there are PROGRAMS_PER_SM programs per multiprocessor
# (see plan_segments). SPLIT_ROWS = False keeps one program per row block (the benchmark compares both).
SPLIT_ROWS = True
PROGRAMS_PER_SM = 4
MIN_SEGMENT_ELEMENTS = 2048
# Contract a * b + c into one fused multiply-add when compiling (Triton 3.9's default, which Triton 3.10 turns
# off): set on every launch, so that the kernels' rounding, and the figures measured with it, do not change
# with the Triton version. The interpreter ignores it.
FP_FUSION = True
PARTIAL_FIELDS = 6  # per segment: max and z of each input, log(z_T / z_S), and the segment KL
PARTIAL_SQDIST_FIELDS = 3  # with the squared distance: A, B and C of combine_segments
COMBINE_BLOCK_ROWS = 128


def stats_shape(num_rows: int) -> tuple[int, ...]:
    """Shape of the per-row statistics ``forward`` returns for the backward: ``(max, log z)`` per row."""
    return (num_rows, 2)


def _new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Allocate an output buffer (uninitialised; tests swap this for a NaN-filled one)."""
    return torch.empty(shape, dtype=dtype, device=device)


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ints (plain Python: ``triton.cdiv`` costs microseconds per host call)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two ``>= n`` (``n >= 1``), as ``triton.next_power_of_2`` but a plain Python call."""
    return 1 << (n - 1).bit_length()


def _tile(row_length: int, num_rows: int, max_block: int) -> tuple[int, int]:
    """``(ROWS, BLOCK_L)``: chunk length (a power of two) and rows per program."""
    block_l = min(next_power_of_2(row_length), max_block)
    rows = max(1, min(TARGET_TILE_ELEMENTS // block_l, MAX_ROWS_PER_PROGRAM, next_power_of_2(num_rows)))
    return rows, block_l


@functools.lru_cache(maxsize=16)
def _multiprocessors(device_index: int) -> int:
    return int(torch.cuda.get_device_properties(device_index).multi_processor_count)


def _target_programs(device: torch.device) -> int:
    """Programs the forward should launch at least (below it, rows are split); 0 under the interpreter."""
    if device.type != "cuda":
        return 0
    index = torch.cuda.current_device() if device.index is None else device.index
    return PROGRAMS_PER_SM * _multiprocessors(index)


def plan_segments(num_rows: int, row_length: int, device: torch.device) -> tuple[int, int]:
    """``(num_segments, segment_length)`` of the forward: ``(1, row_length)`` when rows are not split.

    Rows are split when one program per row block would leave the GPU short of programs
    (``_target_programs``) and the rows are long enough for segments of ``MIN_SEGMENT_ELEMENTS``;
    segments are whole chunks (``FORWARD_MAX_BLOCK_L``) except the last.
    """
    rows, block_l = _tile(row_length, num_rows, FORWARD_MAX_BLOCK_L)
    programs = cdiv(num_rows, rows)
    target = _target_programs(device)
    most = row_length // MIN_SEGMENT_ELEMENTS
    if not SPLIT_ROWS or programs >= target or most < 2:
        return 1, row_length
    wanted = min(most, cdiv(target, programs))
    segment_length = cdiv(cdiv(row_length, wanted), block_l) * block_l
    segments = cdiv(row_length, segment_length)
    return (segments, segment_length) if segments > 1 else (1, row_length)


def _num_warps(tile_elements: int) -> int:
    return 8 if tile_elements >= 4096 else 4


def _is_interpreted(kernel: Any) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - depends on the installed Triton
        return False
    return isinstance(kernel, InterpretedFunction)


def _kernel_for(kernel: Any, device: torch.device) -> Any:
    """The kernel to launch for tensors on ``device``: compiled on CUDA, interpreted on CPU."""
    if device.type == "cuda" or (device.type == "cpu" and _is_interpreted(kernel)):
        return kernel
    if device.type == "cpu":
        raise RuntimeError(
            "backend='triton' on CPU tensors runs under the Triton interpreter, which must be switched on "
            "before Triton is first imported: set the environment variable TRITON_INTERPRET=1 when starting "
            "Python, or use backend='torch' (or 'auto'), or move the tensors to a CUDA device."
        )
    raise RuntimeError(f"The Triton backend of channel_kl runs on CUDA (or, interpreted, CPU) tensors, got {device}.")


def _rows(x: Tensor) -> Tensor:
    """``x`` with unit stride along each row (copied only when needed)."""
    return x if x.stride(1) == 1 or x.shape[1] == 1 else x.contiguous()


def _acc(dtype: torch.dtype) -> Any:
    return tl.float64 if compute_dtype(dtype) == torch.float64 else tl.float32


@functools.lru_cache(maxsize=64)
def _split_inverse(tau: float) -> tuple[float, float]:
    """``1 / tau`` as an fp32 value plus the fp32 rest: fp64 kernels get ~48 bits of it.

    Triton passes Python floats to compiled kernels as fp32.
    """
    inverse = 1.0 / tau
    high = _to_fp32(inverse)
    return high, _to_fp32(inverse - high)


def _to_fp32(value: float) -> float:
    try:
        return float(struct.unpack("f", struct.pack("f", value))[0])
    except OverflowError:  # beyond fp32's range, as a cast would give
        return math.copysign(math.inf, value)


def _device_guard(device: torch.device) -> Any:
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def forward(
    student: Tensor, teacher: Tensor, tau: float, need_sqdist: bool, plan: tuple[int, int] | None = None
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """Per-row ``KL(p_T || p_S)``, optional ``sum (p_S - p_T)^2`` and the ``(R, 2)`` statistics ``(max, log z)``.

    One launch; two when the rows are split (``plan``, by default from ``plan_segments``): the segments,
    then their combination.
    """
    student, teacher = _rows(student), _rows(teacher)
    num_rows, row_length = student.shape
    dtype = compute_dtype(torch.promote_types(student.dtype, teacher.dtype))
    kl = _new_output((num_rows,), dtype, student.device)
    stats_s = _new_output(stats_shape(num_rows), dtype, student.device)
    stats_t = _new_output(stats_shape(num_rows), dtype, student.device)
    sqdist = _new_output((num_rows,), dtype, student.device) if need_sqdist else None
    segments, segment_length = plan or plan_segments(num_rows, row_length, student.device)
    if segments == 1:
        _launch_forward(student, teacher, tau, need_sqdist, (kl, sqdist, stats_s, stats_t), None, 1, row_length)
        return kl, sqdist, stats_s, stats_t
    partials = forward_partials(student, teacher, tau, need_sqdist, segments, segment_length)
    kernel = _kernel_for(_triton_kernels.channel_kl_combine_kernel, student.device)
    block_rows = min(COMBINE_BLOCK_ROWS, next_power_of_2(num_rows))
    with _device_guard(student.device):
        kernel[(cdiv(num_rows, block_rows),)](
            partials,
            kl,
            kl if sqdist is None else sqdist,  # never written when NEED_SQDIST is False
            stats_s,
            stats_t,
            num_rows,
            segments,
            *_split_inverse(tau),
            NEED_SQDIST=need_sqdist,
            BLOCK_R=block_rows,
            ACC=_acc(dtype),
            EXACT_TAU=dtype == torch.float64,
            num_warps=4,
            enable_fp_fusion=FP_FUSION,
        )
    return kl, sqdist, stats_s, stats_t


def forward_partials(
    student: Tensor, teacher: Tensor, tau: float, need_sqdist: bool, segments: int, segment_length: int
) -> Tensor:
    """The forward of rows split into ``segments`` (``>= 2``): the partials ``combine_segments`` reads.

    Shape ``(fields, segments, R)`` in the compute dtype, ``fields = PARTIAL_FIELDS`` (plus
    ``PARTIAL_SQDIST_FIELDS`` with ``need_sqdist``).
    """
    student, teacher = _rows(student), _rows(teacher)
    num_rows = student.shape[0]
    dtype = compute_dtype(torch.promote_types(student.dtype, teacher.dtype))
    fields = PARTIAL_FIELDS + (PARTIAL_SQDIST_FIELDS if need_sqdist else 0)
    partials = _new_output((fields, segments, num_rows), dtype, student.device)
    _launch_forward(student, teacher, tau, need_sqdist, None, partials, segments, segment_length)
    return partials


def _launch_forward(
    student: Tensor,
    teacher: Tensor,
    tau: float,
    need_sqdist: bool,
    outputs: tuple[Tensor, Tensor | None, Tensor, Tensor] | None,
    partials: Tensor | None,
    segments: int,
    segment_length: int,
) -> None:
    """Launch the forward kernel: the row results into ``outputs``, or the segments' into ``partials``."""
    num_rows, row_length = student.shape
    rows, block_l = _tile(row_length, num_rows, FORWARD_MAX_BLOCK_L)
    if outputs is not None:
        kl, sqdist, stats_s, stats_t = outputs
        dtype = kl.dtype
    else:
        assert partials is not None
        kl = sqdist = stats_s = stats_t = partials  # never written with SPLIT
        dtype = partials.dtype
    kernel = _kernel_for(_triton_kernels.channel_kl_forward_kernel, student.device)
    with _device_guard(student.device):
        kernel[(cdiv(num_rows, rows) * segments,)](
            student,
            teacher,
            kl,
            kl if sqdist is None else sqdist,  # never written when NEED_SQDIST is False
            stats_s,
            stats_t,
            kl if partials is None else partials,  # never written without SPLIT
            num_rows,
            row_length,
            student.stride(0),
            teacher.stride(0),
            segment_length,
            segments,
            *_split_inverse(tau),
            NEED_SQDIST=need_sqdist,
            SPLIT=partials is not None,
            ROWS=rows,
            BLOCK_L=block_l,
            ACC=_acc(dtype),
            EXACT_TAU=dtype == torch.float64,
            num_warps=_num_warps(rows * block_l),
            enable_fp_fusion=FP_FUSION,
        )


def backward(
    student: Tensor,
    teacher: Tensor,
    stats_s: Tensor,
    stats_t: Tensor,
    grad_kl: Tensor,
    tau: float,
    coef: Tensor | None = None,
) -> Tensor:
    """Gradient of ``sum_r grad_kl[r] * KL_r`` with respect to the student rows.

    With ``coef`` (``(R,)``, ``d loss / d kl`` of a loss built on the KL), the gradient of that loss:
    ``grad_kl`` is then the loss's incoming gradient, one element (a scalar loss) or ``R``.
    """
    student, teacher = _rows(student), _rows(teacher)
    num_rows, row_length = student.shape
    grad_kl = grad_kl.reshape(-1)
    grad_kl_stride = 0 if grad_kl.numel() == 1 else 1
    if grad_kl_stride and grad_kl.stride(0) != 1:
        grad_kl = grad_kl.contiguous()
    grad = _new_output((num_rows, row_length), student.dtype, student.device)
    rows, block_l = _tile(row_length, num_rows, BACKWARD_MAX_BLOCK_L)
    num_col_blocks = cdiv(row_length, block_l)
    kernel = _kernel_for(_triton_kernels.channel_kl_backward_kernel, student.device)
    with _device_guard(student.device):
        kernel[(cdiv(num_rows, rows) * num_col_blocks,)](
            student,
            teacher,
            stats_s,
            stats_t,
            grad_kl,
            grad_kl if coef is None else coef,  # never read without HAS_COEF
            grad,
            num_rows,
            row_length,
            student.stride(0),
            teacher.stride(0),
            grad.stride(0),
            grad_kl_stride,
            *_split_inverse(tau),
            num_col_blocks,
            ROWS=rows,
            BLOCK_L=block_l,
            ACC=_acc(stats_s.dtype),
            EXACT_TAU=stats_s.dtype == torch.float64,
            HAS_COEF=coef is not None,
            num_warps=_num_warps(rows * block_l),
            enable_fp_fusion=FP_FUSION,
        )
    return grad
