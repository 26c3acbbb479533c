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
* that KL has an absolute rounding of a few ``eps`` (:func:`kl_error_scale` bounds it), most of a
  near-identical row's KL, and ``tau^2`` multiplies it in the losses: rows whose KL is below ``2^10``
  times that bound (near-identical rows, a large ``tau``) are recomputed by :func:`accurate_kl` in fp64,
  in a form accurate relative to the KL itself, with their ``p_S - p_T`` and ``sqdist``. Independent
  rows at usual temperatures never take that path.

On CPU, when the student needs a gradient, the forward also writes ``p_S - p_T`` into an ``(R, L)``
buffer in the compute dtype (``direction=``; the caller decides, see
``segkd.ops.channel_kl.keeps_direction``), and the backward is then
:func:`gradient_from_direction`, one multiply instead of two more softmaxes: the four exponential
passes become two, at the cost of holding that buffer from the forward to the backward (twice the
input's size for half-precision inputs). On CUDA the backend keeps the Triton backend's contract,
inputs and per-row statistics only, since there memory is what is scarce.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

_BLOCK_ELEMENTS = 1 << 20
_CPU_BLOCK_ELEMENTS = 1 << 18
_CPU_MIN_BLOCKS = 8
_CPU_MIN_BLOCK_ELEMENTS = 1 << 16
# Rows whose KL is below _ACCURATE_BELOW times kl_error_scale are recomputed by accurate_kl, about 20 times
# the cost per row: 2^10 keeps the fp32 form wherever its rounding bound is below ~1e-3 of the KL (measured
# errors are ~100 times below the bound), and sends only near-identical rows or a large tau to the fp64 form.
_ACCURATE_BELOW = 2.0**10


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
    # Below this the KL's rounding (see kl_error_scale) could exceed ~1e-3 of it: recomputed accurately.
    accurate_below = kl_error_scale(cross, max_s, max_t, row_length).mul_(_ACCURATE_BELOW)
    # KL = sum_i p_T,i (log p_T,i - log p_S,i) = cross - (lse_T - lse_S), as sum_i p_T,i = 1, with
    # lse = max - log(top). The difference of the log-normalisers is formed as
    # (max_T - max_S) - log(top_T / top_S): both terms vanish with the difference of the inputs,
    # where lse_T - lse_S would cancel two numbers of size |lse| (a few times less rounding for
    # near-equal rows; what is left, ~1e-7, is the fp32 sum inside each softmax). KL >= 0, so the
    # rounding that remains is clamped.
    kl = cross.sub_(max_t - max_s).add_(torch.log(top_t / top_s)).clamp_min_(0)
    # Near-identical rows, or a large tau: KL, p_S - p_T and sqdist from the accurate form, a block of rows at
    # a time (its fp64 temporaries stay a few blocks, as the loop's).
    need_difference = direction is not None or sqdist is not None
    for small in torch.lt(kl, accurate_below).nonzero().view(-1).split(max(1, rows // 2)):
        kl_rows, exact_difference = accurate_kl(student[small], teacher[small], tau, need_difference=need_difference)
        kl[small] = kl_rows.to(dtype)
        if direction is not None and exact_difference is not None:
            direction[small] = exact_difference.to(dtype)
        if sqdist is not None and exact_difference is not None:
            sqdist[small] = exact_difference.square().sum(dim=1).to(dtype)
    # Separate tensors: the outputs of a torch.library custom op may not alias each other.
    lse_s = max_s - top_s.log()
    lse_t = max_t - top_t.log()
    return kl, sqdist, lse_s, lse_t


def kl_error_scale(cross: Tensor, max_s: Tensor, max_t: Tensor, row_length: int) -> Tensor:
    """A bound on the rounding of :func:`forward`'s ``cross - (lse_T - lse_S)`` KL, per row (a new tensor).

    ``eps (1 + |cross| + |max_S| + |max_T| + log L) (1 + sqrt(L) / 64)``, in the compute dtype's ``eps``:
    the scaled logits are rounded relative to their size (``sum_i p_T,i |x_i / tau|`` is at most
    ``|max| + log L`` for the teacher and ``|cross|`` more for the student), and the sums inside each
    softmax grow their rounding with ``L``. Measured on fp32 rows of 64 to 65536 elements (independent,
    and near-identical at 1e-1 and 1e-3 noise; offsets 0 and 50; tau 0.3 to 100): the error stayed below
    ``0.7`` of this for near-identical rows and below ``2.3`` for independent ones (whose KL is large).
    """
    eps = torch.finfo(cross.dtype).eps
    size = torch.abs(cross).add_(max_s.abs()).add_(max_t.abs()).add_(1.0 + math.log(row_length))
    return size.mul_(eps * (1.0 + math.sqrt(row_length) / 64.0))


def _expm1_neg_plus(c: Tensor) -> Tensor:
    """``expm1(-c) + c`` in fp64 without cancellation: a 10th-order Taylor series for ``|c| < 1/16``, else directly.

    Truncation below ``2 |c|^9 / 11! < 3e-19`` relative to ``c^2 / 2`` in the series' range; outside it the
    direct form loses at most ``2 eps / |c| < 32 eps``.
    """
    minus_c = -c
    series = torch.full_like(c, 1.0 / math.factorial(10))
    for order in range(9, 1, -1):
        series.mul_(minus_c).add_(1.0 / math.factorial(order))
    series.mul_(c).mul_(c)
    return torch.where(c.abs() < 0.0625, series, torch.expm1(minus_c).add_(c))


def accurate_kl(
    student: Tensor, teacher: Tensor, tau: float, *, need_difference: bool = False
) -> tuple[Tensor, Tensor | None]:
    r"""``KL(p_T || p_S)`` per row in fp64, accurate relative to its own size (not to ``|lse|``).

    With ``d = (t - s - k) / tau`` for any constant ``k`` (here ``k = E_T[t - s]``, so ``d`` is small),

    .. math::

        \mathrm{KL} = E_T[d] + \log E_T[e^{-d}] = a + \operatorname{log1p}(b - a), \quad
        a = E_T[d], \quad b = E_T[e^{-d} - 1 + d] \ge 0,

    where ``b`` (second order in ``d``) is summed from non-negative terms formed without cancellation, and
    ``a`` (zero up to rounding) cancels to first order. ``t - s`` of fp32 or half-precision inputs is exact
    in fp64. With ``need_difference``, also ``p_S - p_T = p_T expm1(a - KL - d)`` (``log(p_S / p_T) = a - KL - d``),
    accurate relative to itself where ``p_S - p_T`` formed from two rounded softmaxes is not. About twenty times
    the cost of :func:`forward` per element: :func:`forward` runs it only on the rows whose KL is too small for
    its own fp32 form.

    Returns:
        ``(kl, p_S - p_T or None)``, in fp64, shapes ``(R,)`` and ``(R, L)``.
    """
    s, t = student.to(torch.float64), teacher.to(torch.float64)
    inv_tau = 1.0 / tau
    p_t = torch.softmax(t * inv_tau, dim=1)
    # Positions the teacher gives no mass (underflow, or a masked logit) contribute nothing (0 log 0 = 0), whatever
    # the logits there: d = 0 keeps 0 * inf out of the sums.
    mass = p_t > 0
    diff = torch.where(mass, t - s, 0.0)
    shift = (p_t * diff).sum(dim=1, keepdim=True)
    d = torch.where(mass, (diff - shift) * inv_tau, 0.0)
    a = (p_t * d).sum(dim=1)
    b = (p_t * _expm1_neg_plus(d)).sum(dim=1)
    kl = a + torch.log1p(b - a)
    if not need_difference:
        return kl, None
    # Where p_T = 0 the difference is p_S itself.
    difference = torch.where(mass, p_t * torch.expm1((a - kl)[:, None] - d), torch.softmax(s * inv_tau, dim=1))
    return kl, difference


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
