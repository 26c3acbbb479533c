"""Pure-PyTorch backend of :func:`segkd.ops.channel_kl`: the reference every other backend is tested against.

Both functions work on rows: ``(R, L)`` tensors where each row is one ``(n, c)`` channel
flattened over its ``L = H * W`` positions. Rows are processed in blocks of at most
``_BLOCK_ELEMENTS`` elements per input (on CPU at most ``_CPU_BLOCK_ELEMENTS``, and at most an
eighth of the input, see :func:`_rows_per_block`) so that the temporaries (softmaxes in fp32)
never grow with the batch: peak extra memory is a few blocks, not a few copies of the input.

Launcher contract (shared with the Triton backend):

* ``forward(student, teacher, tau, need_sqdist) -> (kl, sqdist | None, lse_s, lse_t)``, every
  output of shape ``(R,)`` in the compute dtype (fp32, or fp64 for fp64 inputs). ``lse_*`` is
  ``logsumexp(x / tau)`` of each row: the only statistics the backward needs.
* ``backward(student, teacher, lse_s, lse_t, grad_kl, tau) -> grad_student`` of shape ``(R, L)``
  in the student's dtype, ``grad_kl[r] / tau * (p_S - p_T)`` computed in the compute dtype and
  rounded once at the end.

How a block is computed (on CPU what costs is the number of passes over a block and the overhead of
each PyTorch operation, a few microseconds; the four exponential passes, two softmaxes in the forward
and two in the backward, are the floor, the same as the eager formula's):

* the student and teacher rows of a block are loaded side by side into one reusable ``(2, rows, L)``
  buffer in the compute dtype (a half-precision input is converted by ``copy_`` and the pair scaled
  by ``1/tau`` in place, skipped when ``tau == 1``; an fp32 input is scaled while copied), so that
  one ``amax``, one ``softmax`` and one ``amax`` cover both inputs; the softmax is written into a
  second reusable buffer, so the loop allocates nothing;
* ``lse = max - log(max_i p_i)`` (the largest probability is ``exp(0) / sum``): no ``logsumexp``
  pass; the KL's ``lse_T - lse_S`` is formed as ``(max_T - max_S) - log(top_T / top_S)``;
* the backward writes ``scale * (p_S - p_T)`` with two in-place operations on the fp32 softmax and
  one rounding copy into the gradient.

On CPU, when the student needs a gradient, the forward also writes ``p_S - p_T`` into an ``(R, L)``
buffer in the compute dtype (``direction=``; the caller decides, see
``segkd.ops.channel_kl.keeps_direction``), and the backward is then
:func:`gradient_from_direction`, one multiply instead of two more softmaxes: the four exponential
passes become two, at the cost of holding that buffer from the forward to the backward (twice the
input's size for half-precision inputs). On CUDA the backend keeps the Triton backend's contract,
inputs and per-row statistics only, since there memory is what is scarce.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

_BLOCK_ELEMENTS = 1 << 20
_CPU_BLOCK_ELEMENTS = 1 << 18
_CPU_MIN_BLOCKS = 8
_CPU_MIN_BLOCK_ELEMENTS = 1 << 16


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are accumulated in: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows_per_block(num_rows: int, row_length: int, device: torch.device) -> int:
    """Rows per block: at most ``_BLOCK_ELEMENTS`` elements per input.

    On CPU at most ``_CPU_BLOCK_ELEMENTS`` (1 MiB per fp32 block: large enough that the
    per-operation overhead is small, small enough to stay in the last-level cache) and, down to
    ``_CPU_MIN_BLOCK_ELEMENTS``, at most ``1 / _CPU_MIN_BLOCKS`` of the input, so that the four fp32
    block temporaries take no more memory than one half-precision copy of the input.
    """
    block = _BLOCK_ELEMENTS
    if device.type == "cpu":
        eighth = num_rows * row_length // _CPU_MIN_BLOCKS
        block = min(block, _CPU_BLOCK_ELEMENTS, max(eighth, _CPU_MIN_BLOCK_ELEMENTS))
    return max(1, min(block // max(row_length, 1), num_rows))


class _Block(NamedTuple):
    """Views of one block of the workspace: ``inputs`` is ``(2, rows, L)``, ``s``/``t`` its halves."""

    inputs: Tensor
    s: Tensor
    t: Tensor
    probs: Tensor
    p_s: Tensor
    p_t: Tensor


class _Workspace:
    """Two reusable ``(2, rows, L)`` blocks in the compute dtype, for the inputs and for their softmaxes.

    ``[0]`` holds student rows, ``[1]`` teacher rows. Reused from block to block, so the loop
    allocates nothing (no page faults where the allocator hands freed blocks back to the system),
    and its views are made once per block size (the full blocks and the last one).
    """

    def __init__(
        self, rows_per_block: int, row_length: int, dtype: torch.dtype, device: torch.device, tau: float
    ) -> None:
        self._inputs = torch.empty(2 * rows_per_block * row_length, dtype=dtype, device=device)
        self._probs = torch.empty_like(self._inputs)
        self._row_length = row_length
        self._blocks: dict[int, _Block] = {}
        # 1/tau as a 0-dim CPU tensor of the compute dtype (the value a Python float would be cast to):
        # an operation wraps a Python scalar into a tensor on every call, a few microseconds each.
        self._inv_tau = None if tau == 1.0 else torch.tensor(1.0 / tau, dtype=dtype)

    def _block(self, num_rows: int) -> _Block:
        block = self._blocks.get(num_rows)
        if block is None:
            shape = (2, num_rows, self._row_length)
            size = 2 * num_rows * self._row_length
            inputs, probs = self._inputs[:size].view(shape), self._probs[:size].view(shape)
            (s, t), (p_s, p_t) = inputs.unbind(0), probs.unbind(0)
            block = self._blocks[num_rows] = _Block(inputs, s, t, probs, p_s, p_t)
        return block

    def load(self, student: Tensor, teacher: Tensor) -> _Block:
        """A block whose ``s``/``t`` hold ``student / tau`` and ``teacher / tau``; ``probs`` is free."""
        block = self._block(student.shape[0])
        inv_tau = self._inv_tau
        if inv_tau is not None and student.dtype == block.inputs.dtype:
            torch.mul(student, inv_tau, out=block.s)  # read, scale and write in one pass
            torch.mul(teacher, inv_tau, out=block.t)
        else:
            block.s.copy_(student)  # converts a half-precision input
            block.t.copy_(teacher)
            if inv_tau is not None:
                block.inputs.mul_(inv_tau)
        return block


def new_direction(student: Tensor) -> Tensor:
    """An ``(R, L)`` buffer for :func:`forward`'s ``direction``, in the compute dtype."""
    return torch.empty(student.shape, dtype=compute_dtype(student.dtype), device=student.device)


def forward(
    student: Tensor, teacher: Tensor, tau: float, need_sqdist: bool, *, direction: Tensor | None = None
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """Per-row ``KL(p_T || p_S)``, optional ``sum (p_S - p_T)^2`` and the log-normalisers.

    ``direction``, if given (``(R, L)``, contiguous, in the compute dtype), is filled with
    ``p_S - p_T``, what :func:`gradient_from_direction` needs.
    """
    num_rows, row_length = student.shape
    dtype = compute_dtype(student.dtype)
    device = student.device
    # Per-row results, written in place block by block and combined once after the loop: the row
    # maxima of s and t, the largest probability of p_S and p_T, and sum_i p_T,i (t_i - s_i).
    maxima = torch.empty(2, num_rows, dtype=dtype, device=device)
    tops = torch.empty(2, num_rows, dtype=dtype, device=device)
    cross = torch.empty(num_rows, dtype=dtype, device=device)
    sqdist = torch.empty(num_rows, dtype=dtype, device=device) if need_sqdist else None
    rows = _rows_per_block(num_rows, row_length, device)
    workspace = _Workspace(rows, row_length, dtype, device, tau)
    student_blocks, teacher_blocks = student.split(rows), teacher.split(rows)
    nothing = (None,) * len(student_blocks)
    blocks = zip(
        student_blocks,
        teacher_blocks,
        maxima.split(rows, dim=1),
        tops.split(rows, dim=1),
        cross.split(rows),
        sqdist.split(rows) if sqdist is not None else nothing,
        direction.split(rows) if direction is not None else nothing,
        strict=True,
    )
    for student_rows, teacher_rows, max_out, top_out, cross_out, sqdist_out, direction_out in blocks:
        block = workspace.load(student_rows, teacher_rows)
        torch.amax(block.inputs, dim=2, out=max_out)
        torch.softmax(block.inputs, dim=2, out=block.probs)  # one fused, vectorised kernel for both inputs
        torch.amax(block.probs, dim=2, out=top_out)
        # nansum: 0 log 0 = 0. Where p_T = 0 because t = -inf (a masked logit) the product is 0 * -inf = NaN, and
        # the term is 0; a NaN input still gives NaN, through the row maxima.
        torch.nansum(block.t.sub_(block.s).mul_(block.p_t), dim=1, out=cross_out)
        if direction_out is not None:
            difference = torch.sub(block.p_s, block.p_t, out=direction_out)
            if sqdist_out is not None:
                torch.sum(torch.mul(difference, difference, out=block.p_s), dim=1, out=sqdist_out)
        elif sqdist_out is not None:
            torch.sum(block.p_s.sub_(block.p_t).square_(), dim=1, out=sqdist_out)
    max_s, max_t = maxima.unbind(0)
    top_s, top_t = tops.unbind(0)
    # KL = sum_i p_T,i (log p_T,i - log p_S,i) = cross - (lse_T - lse_S), as sum_i p_T,i = 1, with
    # lse = max - log(top). The difference of the log-normalisers is formed as
    # (max_T - max_S) - log(top_T / top_S): both terms vanish with the difference of the inputs,
    # where lse_T - lse_S would cancel two numbers of size |lse| (a few times less rounding for
    # near-equal rows; what is left, ~1e-7, is the fp32 sum inside each softmax). KL >= 0, so the
    # rounding that remains is clamped.
    kl = cross.sub_(max_t - max_s).add_(torch.log(top_t / top_s)).clamp_min_(0)
    # Separate tensors: the outputs of a torch.library custom op may not alias each other.
    lse_s = max_s - top_s.log()
    lse_t = max_t - top_t.log()
    return kl, sqdist, lse_s, lse_t


def backward(student: Tensor, teacher: Tensor, lse_s: Tensor, lse_t: Tensor, grad_kl: Tensor, tau: float) -> Tensor:
    """Gradient of ``sum_r grad_kl[r] * KL_r`` with respect to the student rows."""
    num_rows, row_length = student.shape
    dtype = lse_s.dtype
    device = student.device
    grad_student = torch.empty(student.shape, dtype=student.dtype, device=device)
    inv_tau = 1.0 / tau
    scale = (grad_kl.to(dtype) * inv_tau)[:, None]
    rows = _rows_per_block(num_rows, row_length, device)
    workspace = _Workspace(rows, row_length, dtype, device, tau)
    same_dtype = student.dtype == dtype
    blocks = zip(student.split(rows), teacher.split(rows), scale.split(rows), grad_student.split(rows), strict=True)
    for student_rows, teacher_rows, scale_rows, grad_out in blocks:
        # exp(x / tau - lse) is the softmax of x / tau: the fused kernel is faster than sub_ + exp_.
        block = workspace.load(student_rows, teacher_rows)
        torch.softmax(block.inputs, dim=2, out=block.probs)
        # Formed and scaled in the compute dtype, rounded once into the gradient's dtype.
        if same_dtype:
            torch.mul(block.p_s.sub_(block.p_t), scale_rows, out=grad_out)
        else:
            grad_out.copy_(block.p_s.sub_(block.p_t).mul_(scale_rows))
    return grad_student


def gradient_from_direction(direction: Tensor, grad_kl: Tensor, tau: float, dtype: torch.dtype) -> Tensor:
    """:func:`backward`'s gradient from the ``p_S - p_T`` that :func:`forward` wrote into ``direction``.

    ``grad_kl[r] / tau * direction[r]`` formed in the compute dtype and rounded once into ``dtype``
    (the same operations, in the same order, as :func:`backward`); ``direction`` is left unchanged,
    so the backward can run again (``retain_graph=True``).
    """
    scale = (grad_kl.to(direction.dtype) * (1.0 / tau))[:, None]
    if dtype == direction.dtype:
        return direction * scale
    # Half precision: the product is formed block by block in one reusable compute-dtype buffer and
    # rounded into the gradient (an operation with a half-precision `out=` would allocate a whole
    # compute-dtype temporary, one more copy of the direction at the peak).
    num_rows, row_length = direction.shape
    grad_student = torch.empty(direction.shape, dtype=dtype, device=direction.device)
    rows = _rows_per_block(num_rows, row_length, direction.device)
    buffer = torch.empty(rows * row_length, dtype=direction.dtype, device=direction.device)
    for direction_rows, scale_rows, grad_out in zip(
        direction.split(rows), scale.split(rows), grad_student.split(rows), strict=True
    ):
        product = buffer[: direction_rows.numel()].view(direction_rows.shape)
        grad_out.copy_(torch.mul(direction_rows, scale_rows, out=product))
    return grad_student
