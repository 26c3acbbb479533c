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
    kl = torch.empty(num_rows, dtype=dtype, device=student.device)
    lse_s = torch.empty_like(kl)
    lse_t = torch.empty_like(kl)
    sqdist = torch.empty_like(kl) if need_sqdist else None
    inv_tau = _inverse(tau, dtype, student.device)
    for rows in _row_blocks(num_rows, row_length, student.device):
        # Four block temporaries at most: s, t and their softmaxes. torch.softmax is one fused,
        # vectorised kernel; lse = max + log(sum exp(x - max)) = max - log(max_i p_i), as the largest
        # p_i is exp(0) / sum.
        s = torch.mul(student[rows], inv_tau)
        t = torch.mul(teacher[rows], inv_tau)
        p_s = torch.softmax(s, dim=1)
        p_t = torch.softmax(t, dim=1)
        lse_s_block = s.amax(dim=1) - p_s.amax(dim=1).log_()
        lse_t_block = t.amax(dim=1) - p_t.amax(dim=1).log_()
        # KL = sum_i p_T,i (log p_T,i - log p_S,i) = sum_i p_T,i (t_i - s_i) - (lse_T - lse_S), as sum_i p_T,i = 1.
        # For near-equal rows the two terms cancel and rounding (~1e-7 * lse) can leave a tiny negative
        # number; KL >= 0, so clamp it.
        cross = t.sub_(s).mul_(p_t).sum(dim=1)
        kl[rows] = (cross - (lse_t_block - lse_s_block)).clamp_min_(0)
        lse_s[rows] = lse_s_block
        lse_t[rows] = lse_t_block
        if sqdist is not None:
            sqdist[rows] = p_s.sub_(p_t).square_().sum(dim=1)
    return kl, sqdist, lse_s, lse_t


def backward(student: Tensor, teacher: Tensor, lse_s: Tensor, lse_t: Tensor, grad_kl: Tensor, tau: float) -> Tensor:
    """Gradient of ``sum_r grad_kl[r] * KL_r`` with respect to the student rows."""
    num_rows, row_length = student.shape
    dtype = lse_s.dtype
    grad_student = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    inv_tau = _inverse(tau, dtype, student.device)
    scale = grad_kl.to(dtype) * inv_tau
    for rows in _row_blocks(num_rows, row_length, student.device):
        # exp(x / tau - lse) is the softmax of x / tau: the fused kernel is faster than sub_ + exp_.
        p_s = torch.softmax(torch.mul(student[rows], inv_tau), dim=1)
        p_t = torch.softmax(torch.mul(teacher[rows], inv_tau), dim=1)
        # Scaled in the compute dtype, rounded once while written into the gradient.
        torch.mul(p_s.sub_(p_t), scale[rows, None], out=grad_student[rows])
    return grad_student
