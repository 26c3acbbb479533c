# mypy: allow-untyped-defs
"""Triton kernels of :func:`segkd.ops.channel_kl` (the kernel layer; launched by ``_triton_backend``).

Every kernel works on ``(R, L)`` rows: row ``r`` is one ``(n, c)`` channel, ``L = H * W`` long,
elements contiguous within a row and rows ``row_stride`` elements apart. A program owns ``ROWS``
rows and walks along them in chunks of ``BLOCK_L`` columns, so a row of any length is handled by
a loop, never by one whole-row block. Arithmetic is in ``ACC`` (fp32, or fp64 for fp64 inputs)
whatever the storage dtype.

Forward, two passes over each row (the second one mostly hits L2/L1, since the program has just
read the same chunks):

1. online max and sum of ``exp`` for the student and the teacher, giving ``lse = logsumexp(x / tau)``;
2. with the exact statistics, per element ``d = log p_T - log p_S = (t - s) / tau - (lse_T - lse_S)``,
   the KL term ``p_T * (d + exp(-d) - 1)`` (equal to ``p_T * d`` summed, because ``sum p_S = 1``) and
   the difference ``p_S - p_T = p_T * expm1(-d)``. For ``|d| < 1/8`` both use a Taylor series in ``d``,
   so near-identical inputs lose no digits to cancellation: the KL terms are non-negative and
   ``(p_S - p_T)^2`` is formed from an accurate difference, not from ``sum p_S^2 - 2 sum p_S p_T + sum p_T^2``.

Backward, one pass: ``grad[r, i] = grad_kl[r] / tau * (p_S - p_T)`` in ``ACC``, rounded once on store.
"""

from __future__ import annotations

# Kernel arguments carry no Python annotations (Triton reads annotations to specialise arguments),
# hence the ``allow-untyped-defs`` mypy directive at the top of this file.
import triton
import triton.language as tl


@triton.jit
def channel_kl_forward_kernel(
    student_ptr,
    teacher_ptr,
    kl_ptr,
    sqdist_ptr,
    lse_s_ptr,
    lse_t_ptr,
    num_rows,
    row_length,
    student_row_stride,
    teacher_row_stride,
    inv_tau,
    inv_tau_lo,
    NEED_SQDIST: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_L: tl.constexpr,
    ACC: tl.constexpr,
    EXACT_TAU: tl.constexpr,
):
    """Per-row ``KL(p_T || p_S)``, optional ``sum (p_S - p_T)^2`` and both ``logsumexp(x / tau)``."""
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_ok = rows < num_rows
    rows64 = rows.to(tl.int64)
    s_base = student_ptr + rows64[:, None] * student_row_stride
    t_base = teacher_ptr + rows64[:, None] * teacher_row_stride
    offsets = tl.arange(0, BLOCK_L)[None, :]

    # Pass 1: online max and sum of exp, per row, one chunk at a time.
    m_s = tl.full([ROWS], float("-inf"), ACC)
    m_t = tl.full([ROWS], float("-inf"), ACC)
    z_s = tl.full([ROWS], 0.0, ACC)
    z_t = tl.full([ROWS], 0.0, ACC)
    for start in range(0, row_length, BLOCK_L):
        cols = start + offsets
        mask = row_ok[:, None] & (cols < row_length)
        s = tl.load(s_base + cols, mask=mask, other=0.0).to(ACC)
        t = tl.load(t_base + cols, mask=mask, other=0.0).to(ACC)
        if EXACT_TAU:  # fp64: 1/tau = inv_tau + inv_tau_lo, as scalar arguments are fp32
            s = s * inv_tau + s * inv_tau_lo
            t = t * inv_tau + t * inv_tau_lo
        else:
            s = s * inv_tau
            t = t * inv_tau
        s = tl.where(mask, s, float("-inf"))
        t = tl.where(mask, t, float("-inf"))
        new_m_s = tl.maximum(m_s, tl.max(s, axis=1))
        new_m_t = tl.maximum(m_t, tl.max(t, axis=1))
        # Rows past the end see only -inf: shift by 0 there so that no inf - inf appears.
        shift_s = tl.where(new_m_s == float("-inf"), 0.0, new_m_s)
        shift_t = tl.where(new_m_t == float("-inf"), 0.0, new_m_t)
        z_s = z_s * tl.exp(m_s - shift_s) + tl.sum(tl.exp(s - shift_s[:, None]), axis=1)
        z_t = z_t * tl.exp(m_t - shift_t) + tl.sum(tl.exp(t - shift_t[:, None]), axis=1)
        m_s = new_m_s
        m_t = new_m_t
    z_s = tl.where(row_ok, z_s, 1.0)
    z_t = tl.where(row_ok, z_t, 1.0)
    m_s = tl.where(row_ok, m_s, 0.0)
    m_t = tl.where(row_ok, m_t, 0.0)
    lse_s = m_s + tl.log(z_s)
    lse_t = m_t + tl.log(z_t)
    # lse_T - lse_S without the rounding of the two lse (each off by ~ulp(lse) ~ 1e-6 in fp32):
    # an error e in the gap adds ~e^2/2 to the KL, which matters only when p_S ~ p_T.
    lse_gap = (m_t - m_s) + tl.log(z_t / z_s)

    # Pass 2: exact per-element terms with the final statistics.
    kl = tl.full([ROWS], 0.0, ACC)
    sqdist = tl.full([ROWS], 0.0, ACC)
    for start in range(0, row_length, BLOCK_L):
        cols = start + offsets
        mask = row_ok[:, None] & (cols < row_length)
        s = tl.load(s_base + cols, mask=mask, other=0.0).to(ACC)
        t = tl.load(t_base + cols, mask=mask, other=0.0).to(ACC)
        if EXACT_TAU:
            s = s * inv_tau + s * inv_tau_lo
            t = t * inv_tau + t * inv_tau_lo
        else:
            s = s * inv_tau
            t = t * inv_tau
        p_s = tl.exp(s - lse_s[:, None])
        p_t = tl.exp(t - lse_t[:, None])
        d = (t - s) - lse_gap[:, None]
        # q = d + expm1(-d) = d^2/2 - d^3/6 + d^4/24 - d^5/120 + d^6/720 for small |d|.
        q = d * d * (0.5 - d * (1.0 / 6.0 - d * (1.0 / 24.0 - d * (1.0 / 120.0 - d * (1.0 / 720.0)))))
        small = tl.abs(d) < 0.125  # series truncation below 1e-8 relative there
        diff = tl.where(small, p_t * (q - d), p_s - p_t)
        term = tl.where(small, p_t * q, p_t * d + diff)
        kl += tl.sum(tl.where(mask, term, 0.0), axis=1)
        if NEED_SQDIST:
            diff = tl.where(mask, diff, 0.0)
            sqdist += tl.sum(diff * diff, axis=1)

    tl.store(kl_ptr + rows, kl, mask=row_ok)
    tl.store(lse_s_ptr + rows, lse_s, mask=row_ok)
    tl.store(lse_t_ptr + rows, lse_t, mask=row_ok)
    if NEED_SQDIST:
        tl.store(sqdist_ptr + rows, sqdist, mask=row_ok)


@triton.jit
def channel_kl_backward_kernel(
    student_ptr,
    teacher_ptr,
    lse_s_ptr,
    lse_t_ptr,
    grad_kl_ptr,
    grad_ptr,
    num_rows,
    row_length,
    student_row_stride,
    teacher_row_stride,
    grad_row_stride,
    inv_tau,
    inv_tau_lo,
    num_col_blocks,
    ROWS: tl.constexpr,
    BLOCK_L: tl.constexpr,
    ACC: tl.constexpr,
    EXACT_TAU: tl.constexpr,
):
    """``grad[r, i] = grad_kl[r] / tau * (p_S[r, i] - p_T[r, i])`` for one ``ROWS x BLOCK_L`` tile."""
    pid = tl.program_id(0)
    row_block = pid // num_col_blocks
    col_block = pid % num_col_blocks
    rows = row_block * ROWS + tl.arange(0, ROWS)
    cols = col_block * BLOCK_L + tl.arange(0, BLOCK_L)[None, :]
    row_ok = rows < num_rows
    mask = row_ok[:, None] & (cols < row_length)
    rows64 = rows.to(tl.int64)
    lse_s = tl.load(lse_s_ptr + rows, mask=row_ok, other=0.0).to(ACC)
    lse_t = tl.load(lse_t_ptr + rows, mask=row_ok, other=0.0).to(ACC)
    g = tl.load(grad_kl_ptr + rows, mask=row_ok, other=0.0).to(ACC)
    s = tl.load(student_ptr + rows64[:, None] * student_row_stride + cols, mask=mask, other=0.0).to(ACC)
    t = tl.load(teacher_ptr + rows64[:, None] * teacher_row_stride + cols, mask=mask, other=0.0).to(ACC)
    if EXACT_TAU:  # fp64: 1/tau = inv_tau + inv_tau_lo, as scalar arguments are fp32
        scale = g * inv_tau + g * inv_tau_lo
        s = s * inv_tau + s * inv_tau_lo
        t = t * inv_tau + t * inv_tau_lo
    else:
        scale = g * inv_tau
        s = s * inv_tau
        t = t * inv_tau
    p_s = tl.exp(s - lse_s[:, None])
    p_t = tl.exp(t - lse_t[:, None])
    grad = scale[:, None] * (p_s - p_t)
    tl.store(grad_ptr + rows64[:, None] * grad_row_stride + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)
