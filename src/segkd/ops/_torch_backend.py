"""Pure-PyTorch backend of :func:`segkd.ops.channel_kl`: the reference every other backend is tested against.

Both functions work on rows: ``(R, L)`` tensors where each row is one ``(n, c)`` channel
flattened over its ``L = H * W`` positions. Rows are processed in blocks of at most
``_BLOCK_ELEMENTS`` elements (``_CPU_BLOCK_ELEMENTS`` on CPU, where a smaller block stays in
cache) so that the temporaries (softmaxes in fp32) never grow with the batch: peak extra memory
is a few blocks, not a few copies of the input.

Launcher contract (shared with the Triton backend):

* ``forward(student, teacher, tau, need_sqdist) -> (kl, sqdist | None, lse_s, lse_t)``, every
  output of shape ``(R,)`` in the compute dtype (fp32, or fp64 for fp64 inputs). ``lse_*`` is
  ``logsumexp(x / tau)`` of each row: the only statistics the backward needs.
* ``backward(student, teacher, lse_s, lse_t, grad_kl, tau) -> grad_student`` of shape ``(R, L)``
  in the student's dtype, ``grad_kl[r] / tau * (p_S - p_T)`` computed in the compute dtype and
  rounded once at the end.
"""

from __future__ import annotations

import torch
from torch import Tensor

_BLOCK_ELEMENTS = 1 << 20
_CPU_BLOCK_ELEMENTS = 1 << 17


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are accumulated in: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block_elements(device: torch.device) -> int:
    # CPU: blocks of 512 KiB per fp32 temporary stay in cache and keep peak memory low (a few blocks);
    # accelerators: larger blocks amortise the launches.
    return _CPU_BLOCK_ELEMENTS if device.type == "cpu" else _BLOCK_ELEMENTS


def _row_blocks(num_rows: int, row_length: int, device: torch.device | None = None) -> list[slice]:
    block = _BLOCK_ELEMENTS if device is None else _block_elements(device)
    rows_per_block = max(1, block // max(row_length, 1))
    return [slice(start, min(start + rows_per_block, num_rows)) for start in range(0, num_rows, rows_per_block)]


def _inverse(tau: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    # A one-element tensor (not a 0-dim one) takes part in type promotion: ``torch.mul(x_bf16, inv)`` reads
    # bf16 and computes and writes fp32 in one pass, where ``x.to(fp32) / tau`` takes two.
    return torch.full((1,), 1.0 / tau, dtype=dtype, device=device)


def forward(
    student: Tensor, teacher: Tensor, tau: float, need_sqdist: bool
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """Per-row ``KL(p_T || p_S)``, optional ``sum (p_S - p_T)^2`` and the log-normalisers."""
    num_rows, row_length = student.shape
    dtype = compute_dtype(student.dtype)
    sqdist = torch.empty(num_rows, dtype=dtype, device=student.device) if need_sqdist else None
    inv_tau = _inverse(tau, dtype, student.device)
    # max_i (x_i / tau) = (max_i x_i) / tau exactly (rounding is monotone): one reduction over the input.
    max_s = torch.mul(student.amax(dim=1), inv_tau)
    max_t = torch.mul(teacher.amax(dim=1), inv_tau)
    top_s, top_t, cross = (torch.empty_like(max_s) for _ in range(3))
    # Few operations per block (the per-operation overhead dominates on CPU); per-row results are
    # written in place and combined once after the loop.
    for rows in _row_blocks(num_rows, row_length, student.device):
        # Four block temporaries at most: s, t and their softmaxes (torch.softmax is one fused, vectorised kernel).
        s = torch.mul(student[rows], inv_tau)
        t = torch.mul(teacher[rows], inv_tau)
        p_s = torch.softmax(s, dim=1)
        p_t = torch.softmax(t, dim=1)
        torch.amax(p_s, dim=1, out=top_s[rows])
        torch.amax(p_t, dim=1, out=top_t[rows])
        torch.sum(t.sub_(s).mul_(p_t), dim=1, out=cross[rows])
        if sqdist is not None:
            torch.sum(p_s.sub_(p_t).square_(), dim=1, out=sqdist[rows])
    # lse = max + log(sum_i exp(x_i - max)) = max - log(max_i p_i), as the largest p_i is exp(0) / sum.
    lse_s = max_s.sub_(top_s.log_())
    lse_t = max_t.sub_(top_t.log_())
    # KL = sum_i p_T,i (log p_T,i - log p_S,i) = sum_i p_T,i (t_i - s_i) - (lse_T - lse_S), as sum_i p_T,i = 1.
    # For near-equal rows the two terms cancel and rounding (~1e-7 * lse) can leave a tiny negative
    # number; KL >= 0, so clamp it.
    kl = cross.sub_(lse_t - lse_s).clamp_min_(0)
    return kl, sqdist, lse_s, lse_t


def backward(student: Tensor, teacher: Tensor, lse_s: Tensor, lse_t: Tensor, grad_kl: Tensor, tau: float) -> Tensor:
    """Gradient of ``sum_r grad_kl[r] * KL_r`` with respect to the student rows."""
    num_rows, row_length = student.shape
    dtype = lse_s.dtype
    grad_student = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    inv_tau = _inverse(tau, dtype, student.device)
    scale = (grad_kl.to(dtype) * inv_tau)[:, None]
    for rows in _row_blocks(num_rows, row_length, student.device):
        # exp(x / tau - lse) is the softmax of x / tau: the fused kernel is faster than sub_ + exp_.
        p_s = torch.softmax(torch.mul(student[rows], inv_tau), dim=1)
        p_t = torch.softmax(torch.mul(teacher[rows], inv_tau), dim=1)
        # Scaled in the compute dtype, rounded once while written into the gradient.
        torch.mul(p_s.sub_(p_t), scale[rows], out=grad_student[rows])
    return grad_student
