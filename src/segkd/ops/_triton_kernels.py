# mypy: allow-untyped-defs
"""Triton kernels of :func:`segkd.ops.channel_kl` (the kernel layer; launched by ``_triton_backend``).

Every kernel works on ``(R, L)`` rows: row ``r`` is one ``(n, c)`` channel, ``L = H * W`` long,
elements contiguous within a row and rows ``row_stride`` elements apart. A program owns ``ROWS``
rows and walks along them in chunks of ``BLOCK_L`` columns, so a row of any length is handled by
a loop, never by one whole-row block. Arithmetic is in ``ACC`` (fp32, or fp64 for fp64 inputs)
whatever the storage dtype.

Forward, two passes over each row (the second one mostly hits L2/L1, since the program has just
read the same chunks):

1. online max ``m`` of the raw inputs and sum ``z`` of ``exp((x - m) / tau)``; ``(m, log z)`` of each
   input is stored for the backward (``lse = m / tau + log z``, but ``lse`` itself is never formed);
2. with the exact statistics, per element ``p_T = exp((t - m_T) / tau - log z_T)`` and
   ``d = log p_T - log p_S = ((t - m_T) - (s - m_S)) / tau - log(z_T / z_S)`` (the raw part in whichever
   order rounds less: ``(t - s) - (m_T - m_S)`` for near-identical rows), the KL term
   ``p_T * (d + exp(-d) - 1)`` (equal to ``p_T * d`` summed, because ``sum p_S = 1``) and the difference
   ``p_S - p_T = p_T * expm1(-d)``. The row max is subtracted before scaling by ``1/tau`` and ``lse`` is
   never subtracted from a scaled logit, so logits of ``1e4`` lose nothing to the ``~1e-3`` fp32 rounding
   of ``x / tau`` or ``lse``. For small ``|d|`` (below ``1/8`` in fp32, ``1/2`` in fp64) both use a
   Taylor series in ``d`` (6th order in fp32, 15th in fp64: truncation below the dtype's rounding), so
   near-identical inputs lose no digits to cancellation: the KL terms are non-negative and
   ``(p_S - p_T)^2`` is formed from an accurate difference, not from ``sum p_S^2 - 2 sum p_S p_T + sum p_T^2``.

The second pass also sums ``h = sum (p_S - p_T)``, ``B = sum p_S (p_S - p_T)`` and ``C = sum p_S^2``: ``h`` is
``e^g - 1`` for the rounding error ``g`` of ``log(z_T / z_S)``, which corrects the KL (by ``h - log1p(h)``) and the
squared distance (to ``A - 2 h B + h^2 C``). With ``SPLIT`` a program owns one segment of its rows and stores
the segment's statistics and terms; ``combine_segments`` (in ``channel_kl_combine_kernel``, or in the fused
loss's finalize kernel) forms the rows' results by the chain rule of the KL.

Backward, one pass: ``grad[r, i] = grad_kl[r] / tau * (p_S - p_T)`` in ``ACC``, rounded once on store,
with ``p = exp((x - m) / tau - log z)`` from the stored statistics; ``grad_kl`` may be one scalar
(stride 0) and be multiplied by per-row coefficients (a weighted loss's ``d loss / d kl``).
"""

from __future__ import annotations

# Kernel arguments carry no Python annotations (Triton reads annotations to specialise arguments),
# hence the ``allow-untyped-defs`` mypy directive at the top of this file.
import triton
import triton.language as tl


@triton.jit
def _clamp_keep_nan(x):
    # max(x, 0) against rounding below 0, NaN kept: a NaN input gives a NaN KL, as in the torch backend.
    return tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _scaled(x, inv_tau, inv_tau_lo, EXACT_TAU: tl.constexpr):
    """``x / tau`` in ``x``'s dtype; fp64 (``EXACT_TAU``) uses ``1/tau = inv_tau + inv_tau_lo`` (fp32 scalars)."""
    if EXACT_TAU:
        # An infinite x (a masked logit) stays infinite: inf * inv_tau + inf * inv_tau_lo is NaN when inv_tau_lo < 0.
        scaled = x * inv_tau
        return tl.where(tl.abs(scaled) == float("inf"), scaled, scaled + x * inv_tau_lo)
    else:
        return x * inv_tau


@triton.jit
def _expm1_neg_plus(d, ACC: tl.constexpr):
    """``q = d + expm1(-d) = d^2/2 - d^3/3! + d^4/4! - ...``, the Taylor series used for small ``|d|``."""
    if ACC == tl.float64:  # noqa: SIM300 (ACC is not a constant)
        # 15th order: truncation below 2 |d|^14 / 16! < 6e-18 relative to q for |d| < 1/2.
        c = 1.0 / 87178291200.0 - d * (1.0 / 1307674368000.0)
        c = 1.0 / 6227020800.0 - d * c
        c = 1.0 / 479001600.0 - d * c
        c = 1.0 / 39916800.0 - d * c
        c = 1.0 / 3628800.0 - d * c
        c = 1.0 / 362880.0 - d * c
        c = 1.0 / 40320.0 - d * c
        c = 1.0 / 5040.0 - d * c
        c = 1.0 / 720.0 - d * c
        c = 1.0 / 120.0 - d * c
        c = 1.0 / 24.0 - d * c
        c = 1.0 / 6.0 - d * c
        return d * d * (0.5 - d * c)
    else:
        # 6th order: truncation below 2 |d|^5 / 7! < 1.3e-8 relative to q for |d| < 1/8.
        return d * d * (0.5 - d * (1.0 / 6.0 - d * (1.0 / 24.0 - d * (1.0 / 120.0 - d * (1.0 / 720.0)))))


@triton.jit
def _log1p(x):
    """``log(1 + x)`` without the rounding of ``1 + x`` for small ``|x|`` (the classic ``u = 1 + x`` correction)."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def channel_kl_forward_kernel(
    student_ptr,
    teacher_ptr,
    kl_ptr,
    sqdist_ptr,
    stats_s_ptr,
    stats_t_ptr,
    partials_ptr,
    num_rows,
    row_length,
    student_row_stride,
    teacher_row_stride,
    segment_length,
    num_segments,
    inv_tau,
    inv_tau_lo,
    NEED_SQDIST: tl.constexpr,
    SPLIT: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_L: tl.constexpr,
    ACC: tl.constexpr,
    EXACT_TAU: tl.constexpr,
):
    """Per-row ``KL(p_T || p_S)``, optional ``sum (p_S - p_T)^2``, and ``(max x, log z)`` of each input.

    With ``SPLIT``, program ``pid`` owns segment ``pid % num_segments`` (columns
    ``[k * segment_length, (k + 1) * segment_length)``) of its rows and treats it as a row of its own: it
    stores the segment's statistics and terms in ``partials`` (layout in ``combine_segments``) instead
    of the row's results, which ``combine_segments`` then forms.
    """
    pid = tl.program_id(0)
    if SPLIT:
        row_block = pid // num_segments
        segment = pid % num_segments
        col_start = segment * segment_length
        col_end = tl.minimum(col_start + segment_length, row_length)
    else:
        row_block = pid
        col_start = 0
        col_end = row_length
    rows = row_block * ROWS + tl.arange(0, ROWS)
    row_ok = rows < num_rows
    rows64 = rows.to(tl.int64)
    s_base = student_ptr + rows64[:, None] * student_row_stride
    t_base = teacher_ptr + rows64[:, None] * teacher_row_stride
    offsets = tl.arange(0, BLOCK_L)[None, :]

    # Pass 1: online max (of the raw inputs: max(x / tau) = max(x) / tau for tau > 0) and sum of
    # exp((x - max) / tau), per row, one chunk at a time. The shift is subtracted before scaling, so
    # x - max is rounded relative to itself, not to |x| / tau (which would cost ~eps * |x| / tau in the exponent).
    m_s = tl.full([ROWS], float("-inf"), ACC)
    m_t = tl.full([ROWS], float("-inf"), ACC)
    z_s = tl.full([ROWS], 0.0, ACC)
    z_t = tl.full([ROWS], 0.0, ACC)
    for start in range(col_start, col_end, BLOCK_L):
        cols = start + offsets
        mask = row_ok[:, None] & (cols < col_end)
        s = tl.load(s_base + cols, mask=mask, other=0.0).to(ACC)
        t = tl.load(t_base + cols, mask=mask, other=0.0).to(ACC)
        new_m_s = tl.maximum(m_s, tl.max(tl.where(mask, s, float("-inf")), axis=1))
        new_m_t = tl.maximum(m_t, tl.max(tl.where(mask, t, float("-inf")), axis=1))
        # Rows past the end see only -inf: shift by 0 there. No -inf enters the arithmetic (masked lanes
        # become -inf after scaling, the running max is -inf only while z = 0): no inf - inf, no -inf * 0.
        shift_s = tl.where(new_m_s == float("-inf"), 0.0, new_m_s)
        shift_t = tl.where(new_m_t == float("-inf"), 0.0, new_m_t)
        e_s = tl.where(mask, _scaled(s - shift_s[:, None], inv_tau, inv_tau_lo, EXACT_TAU), float("-inf"))
        e_t = tl.where(mask, _scaled(t - shift_t[:, None], inv_tau, inv_tau_lo, EXACT_TAU), float("-inf"))
        r_s = tl.exp(_scaled(tl.where(m_s == float("-inf"), shift_s, m_s) - shift_s, inv_tau, inv_tau_lo, EXACT_TAU))
        r_t = tl.exp(_scaled(tl.where(m_t == float("-inf"), shift_t, m_t) - shift_t, inv_tau, inv_tau_lo, EXACT_TAU))
        z_s = z_s * r_s + tl.sum(tl.exp(e_s), axis=1)
        z_t = z_t * r_t + tl.sum(tl.exp(e_t), axis=1)
        m_s = new_m_s
        m_t = new_m_t
    z_s = tl.where(row_ok, z_s, 1.0)
    z_t = tl.where(row_ok, z_t, 1.0)
    m_s = tl.where(row_ok, m_s, 0.0)
    m_t = tl.where(row_ok, m_t, 0.0)
    log_z_s = tl.log(z_s)
    log_z_t = tl.log(z_t)
    # log p = (x - m) / tau - log z: only the small log z is subtracted after scaling, where
    # exp(x / tau - lse) would carry the rounding of lse (~eps * |m| / tau: 1e-3 at m / tau = 1e4 in fp32).
    # The gap log z_T - log z_S as one log of the ratio: an error e in it adds ~e^2 / 2 to the KL.
    log_z_gap = tl.log(z_t / z_s)
    m_gap = m_t - m_s

    # Pass 2: exact per-element terms with the final statistics.
    kl = tl.full([ROWS], 0.0, ACC)
    sqdist = tl.full([ROWS], 0.0, ACC)
    mass_gap = tl.full([ROWS], 0.0, ACC)  # sum (p_S - p_T), see below
    cross = tl.full([ROWS], 0.0, ACC)  # sum p_S (p_S - p_T)
    square = tl.full([ROWS], 0.0, ACC)  # sum p_S^2
    for start in range(col_start, col_end, BLOCK_L):
        cols = start + offsets
        mask = row_ok[:, None] & (cols < col_end)
        # Masked lanes read the row's max: every term stays finite there (and is dropped from the sums).
        s = tl.load(s_base + cols, mask=mask, other=m_s[:, None]).to(ACC)
        t = tl.load(t_base + cols, mask=mask, other=m_t[:, None]).to(ACC)
        x_s = s - m_s[:, None]
        x_t = t - m_t[:, None]
        p_t = tl.exp(_scaled(x_t, inv_tau, inv_tau_lo, EXACT_TAU) - log_z_t[:, None])
        # d = log p_T - log p_S = ((t - m_T) - (s - m_S)) / tau - log(z_T / z_S), its raw part rounded with an
        # error ~eps * (|t - m_T| + |s - m_S|) in this order, or ~eps * (|t - s| + |m_T - m_S|) as
        # (t - s) - (m_T - m_S): take the smaller. The first is exact-ish where p_T matters (t ~ m_T) whatever
        # the offsets of the two rows; the second keeps the digits of near-identical rows (t ~ s).
        x_ts = t - s
        d_raw = tl.where(
            tl.abs(x_ts) + tl.abs(m_gap[:, None]) < tl.abs(x_t) + tl.abs(x_s), x_ts - m_gap[:, None], x_t - x_s
        )
        d = _scaled(d_raw, inv_tau, inv_tau_lo, EXACT_TAU) - log_z_gap[:, None]
        q = _expm1_neg_plus(d, ACC)  # d + expm1(-d) for small |d|
        small = tl.abs(d) < (0.5 if ACC == tl.float64 else 0.125)  # noqa: SIM300 (ACC is not a constant)
        # p_S - p_T = p_T * expm1(-d) = p_T * (q - d) for small |d|, without cancellation.
        p_s = tl.exp(_scaled(x_s, inv_tau, inv_tau_lo, EXACT_TAU) - log_z_s[:, None])
        diff = tl.where(small, p_t * (q - d), p_s - p_t)
        # 0 log 0 = 0: where p_T = 0 (t = -inf, a masked logit) d is -inf or NaN and the term is p_S alone.
        term = tl.where(small, p_t * q, tl.where(p_t == 0.0, 0.0, p_t * d) + diff)
        kl += tl.sum(tl.where(mask, term, 0.0), axis=1)
        diff = tl.where(mask, diff, 0.0)
        mass_gap += tl.sum(diff, axis=1)
        if NEED_SQDIST:
            sqdist += tl.sum(diff * diff, axis=1)
            p_s = tl.where(mask, p_s, 0.0)
            cross += tl.sum(p_s * diff, axis=1)
            square += tl.sum(p_s * p_s, axis=1)

    # An error g in log_z_gap (the ~sqrt(L) eps rounding of the sums z) turns every difference into
    # (p_S - p_T) + p_S (e^g - 1), and the KL terms sum to KL + (e^g - 1 - g): first order cancels, the
    # second does not (it is all that is left of the KL of near-identical rows). The sum of the differences,
    # formed to the rounding of its small terms, is h = e^g - 1 (sum p_S = 1), which corrects both: the KL
    # by h - log1p(h) = h^2/2 - h^3/3 + ..., the squares to A - 2 h B + h^2 C (A, B, C accumulated above).
    kl = _clamp_keep_nan(kl - mass_gap * mass_gap * (0.5 - mass_gap * (1.0 / 3.0 - mass_gap * 0.25)))
    if NEED_SQDIST:
        sqdist = _clamp_keep_nan(sqdist - mass_gap * (2.0 * cross - mass_gap * square))
        cross = cross - mass_gap * square
    if SPLIT:
        # log(z_T / z_S) of the segment, corrected by g = log1p(h) as well: the combine needs it accurate.
        log_z_gap = log_z_gap - _log1p(mass_gap)
        # One value per (field, segment, row); rows fastest, so that the combine reads them coalesced.
        field = num_segments.to(tl.int64) * num_rows
        out = partials_ptr + segment.to(tl.int64) * num_rows + rows64
        tl.store(out, m_s, mask=row_ok)
        tl.store(out + field, z_s, mask=row_ok)
        tl.store(out + 2 * field, m_t, mask=row_ok)
        tl.store(out + 3 * field, z_t, mask=row_ok)
        tl.store(out + 4 * field, log_z_gap, mask=row_ok)
        tl.store(out + 5 * field, kl, mask=row_ok)
        if NEED_SQDIST:
            tl.store(out + 6 * field, sqdist, mask=row_ok)
            tl.store(out + 7 * field, cross, mask=row_ok)
            tl.store(out + 8 * field, square, mask=row_ok)
    else:
        _store_rows(
            kl_ptr,
            sqdist_ptr,
            stats_s_ptr,
            stats_t_ptr,
            rows,
            row_ok,
            kl,
            sqdist,
            m_s,
            log_z_s,
            m_t,
            log_z_t,
            NEED_SQDIST,
        )


@triton.jit
def _store_rows(
    kl_ptr,
    sqdist_ptr,
    stats_s_ptr,
    stats_t_ptr,
    rows,
    row_ok,
    kl,
    sqdist,
    m_s,
    log_z_s,
    m_t,
    log_z_t,
    NEED_SQDIST: tl.constexpr,
):
    """Store the row results: ``kl``, ``sqdist`` (``NEED_SQDIST``) and the ``(R, 2)`` statistics ``(max, log z)``.

    The backward forms ``p = exp((x - max) / tau - log z)`` from the statistics, which keeps fp32 accuracy at
    large ``|x| / tau``, where ``exp(x / tau - lse)`` would not.
    """
    rows64 = rows.to(tl.int64)
    tl.store(kl_ptr + rows, kl, mask=row_ok)
    tl.store(stats_s_ptr + rows64 * 2, m_s, mask=row_ok)
    tl.store(stats_s_ptr + rows64 * 2 + 1, log_z_s, mask=row_ok)
    tl.store(stats_t_ptr + rows64 * 2, m_t, mask=row_ok)
    tl.store(stats_t_ptr + rows64 * 2 + 1, log_z_t, mask=row_ok)
    if NEED_SQDIST:
        tl.store(sqdist_ptr + rows, sqdist, mask=row_ok)


@triton.jit
def _segment_terms(at, field, row_ok, m_s, m_t, m_gap, z_s, z_t, log_z_gap, inv_tau, ACC: tl.constexpr):
    """``(w_T,k, w_S,k, d_k)`` of the segment whose partials start at ``at``, given the row's statistics."""
    m_s_k = tl.load(at, mask=row_ok, other=0.0).to(ACC)
    z_s_k = tl.load(at + field, mask=row_ok, other=1.0).to(ACC)
    m_t_k = tl.load(at + 2 * field, mask=row_ok, other=0.0).to(ACC)
    z_t_k = tl.load(at + 3 * field, mask=row_ok, other=1.0).to(ACC)
    log_z_gap_k = tl.load(at + 4 * field, mask=row_ok, other=0.0).to(ACC)
    a_s = m_s_k - m_s
    a_t = m_t_k - m_t
    w_t = z_t_k * tl.exp(a_t * inv_tau) / z_t
    w_s = z_s_k * tl.exp(a_s * inv_tau) / z_s
    # The raw part of d_k in whichever order rounds less, as in the forward kernel.
    gap_k = m_t_k - m_s_k
    raw = tl.where(tl.abs(gap_k) + tl.abs(m_gap) < tl.abs(a_t) + tl.abs(a_s), gap_k - m_gap, a_t - a_s)
    return w_t, w_s, raw * inv_tau + log_z_gap_k - log_z_gap


@triton.jit
def combine_segments(
    partials_ptr, rows, row_ok, num_rows, num_segments, inv_tau, NEED_SQDIST: tl.constexpr, ACC: tl.constexpr
):
    """Row results ``(kl, sqdist, max_s, log z_s, max_t, log z_t)`` from the partials of a ``SPLIT`` forward.

    ``rows`` (any shape) are row indices, ``inv_tau`` is ``1 / tau`` in ``ACC``. Field ``f`` of segment
    ``k`` of row ``r`` is at ``(f * num_segments + k) * num_rows + r``; the fields of each input's segment
    are its max and ``z_k = sum exp((x - max_k) / tau)``, then ``log(z_T,k / z_S,k)`` (formed accurately
    by the forward kernel), the segment KL ``KL_k`` between the segment's own softmaxes ``p'``, and
    (``NEED_SQDIST``) ``A_k = sum (p'_S - p'_T)^2``, ``B_k = sum p'_S (p'_S - p'_T)``, ``C_k = sum p'_S^2``.

    On segment ``k`` the row's softmax is ``p = w_k p'``, with the segment's mass
    ``w_k = z_k exp((max_k - max) / tau) / z``. The chain rule of the KL gives
    ``KL = sum_k w_T,k KL_k + KL(w_T || w_S)``, and with ``dw_k = w_S,k - w_T,k``,
    ``sqdist = sum_k w_T,k^2 A_k + 2 w_T,k dw_k B_k + dw_k^2 C_k``. As in the forward kernel, with
    ``d_k = log w_T,k - log w_S,k`` (from differences of maxima and logs of ratios), small ``|d_k|`` use
    ``KL(w_T || w_S) = sum_k w_T,k (d_k + expm1(-d_k))`` and ``dw_k = w_T,k expm1(-d_k)`` by series, so
    nothing cancels; larger ones ``w_T,k d_k + dw_k`` with ``dw_k`` from the masses, so that no
    ``exp(-d_k)`` overflows where a segment holds almost none of the teacher's mass.
    """
    field = num_segments.to(tl.int64) * num_rows
    base = partials_ptr + rows.to(tl.int64)
    threshold = 0.5 if ACC == tl.float64 else 0.125  # noqa: SIM300 (ACC is not a constant)
    m_s = tl.full(rows.shape, float("-inf"), ACC)
    m_t = tl.full(rows.shape, float("-inf"), ACC)
    for k in range(0, num_segments):
        at = base + k * num_rows
        m_s = tl.maximum(m_s, tl.load(at, mask=row_ok, other=0.0).to(ACC))
        m_t = tl.maximum(m_t, tl.load(at + 2 * field, mask=row_ok, other=0.0).to(ACC))
    z_s = tl.full(rows.shape, 0.0, ACC)
    z_t = tl.full(rows.shape, 0.0, ACC)
    for k in range(0, num_segments):
        at = base + k * num_rows
        m_s_k = tl.load(at, mask=row_ok, other=0.0).to(ACC)
        m_t_k = tl.load(at + 2 * field, mask=row_ok, other=0.0).to(ACC)
        z_s += tl.load(at + field, mask=row_ok, other=1.0).to(ACC) * tl.exp((m_s_k - m_s) * inv_tau)
        z_t += tl.load(at + 3 * field, mask=row_ok, other=1.0).to(ACC) * tl.exp((m_t_k - m_t) * inv_tau)
    m_gap = m_t - m_s
    # log(z_T / z_S): where every segment is close (all |d'_k| small, d'_k = d_k without this term), from
    # z_S / z_T = sum_k w_T,k exp(-d'_k) by series, whose terms are accurate, rather than from the sums z,
    # whose rounding differs from segment to segment; otherwise (rows far apart) from the sums.
    mass_gap = tl.full(rows.shape, 0.0, ACC)
    all_small = row_ok
    for k in range(0, num_segments):
        w_t, _, d = _segment_terms(base + k * num_rows, field, row_ok, m_s, m_t, m_gap, z_s, z_t, 0.0, inv_tau, ACC)
        small = tl.abs(d) < threshold
        d = tl.where(small, d, 0.0)
        mass_gap += w_t * (_expm1_neg_plus(d, ACC) - d)
        all_small = all_small & small
    log_z_gap = tl.where(all_small, -_log1p(mass_gap), tl.log(z_t / z_s))
    kl = tl.full(rows.shape, 0.0, ACC)
    sqdist = tl.full(rows.shape, 0.0, ACC)
    for k in range(0, num_segments):
        at = base + k * num_rows
        w_t, w_s, d = _segment_terms(at, field, row_ok, m_s, m_t, m_gap, z_s, z_t, log_z_gap, inv_tau, ACC)
        small = tl.abs(d) < threshold
        d_small = tl.where(small, d, 0.0)
        q = _expm1_neg_plus(d_small, ACC)  # d + expm1(-d) where small
        dw = tl.where(small, w_t * (q - d_small), w_s - w_t)
        # 0 log 0 = 0: a segment without teacher mass (all -inf: KL_k, A_k, B_k and d_k are NaN) adds dw alone.
        no_mass = w_t == 0.0
        segment_kl = w_t * tl.load(at + 5 * field, mask=row_ok, other=0.0).to(ACC)
        kl += tl.where(no_mass, dw, segment_kl + tl.where(small, w_t * q, w_t * d + dw))
        if NEED_SQDIST:
            a = tl.load(at + 6 * field, mask=row_ok, other=0.0).to(ACC)
            b = tl.load(at + 7 * field, mask=row_ok, other=0.0).to(ACC)
            c = tl.load(at + 8 * field, mask=row_ok, other=0.0).to(ACC)
            sqdist += tl.where(no_mass, dw * dw * c, w_t * w_t * a + 2.0 * w_t * dw * b + dw * dw * c)
    return _clamp_keep_nan(kl), _clamp_keep_nan(sqdist), m_s, tl.log(z_s), m_t, tl.log(z_t)


@triton.jit
def channel_kl_combine_kernel(
    partials_ptr,
    kl_ptr,
    sqdist_ptr,
    stats_s_ptr,
    stats_t_ptr,
    num_rows,
    num_segments,
    inv_tau,
    inv_tau_lo,
    NEED_SQDIST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    ACC: tl.constexpr,
    EXACT_TAU: tl.constexpr,
):
    """The row results of a ``SPLIT`` forward (``combine_segments``) for ``BLOCK_R`` rows."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < num_rows
    inv = tl.zeros([], ACC) + inv_tau
    if EXACT_TAU:
        inv = inv + inv_tau_lo
    kl, sqdist, m_s, log_z_s, m_t, log_z_t = combine_segments(
        partials_ptr, rows, row_ok, num_rows, num_segments, inv, NEED_SQDIST, ACC
    )
    _store_rows(
        kl_ptr, sqdist_ptr, stats_s_ptr, stats_t_ptr, rows, row_ok, kl, sqdist, m_s, log_z_s, m_t, log_z_t, NEED_SQDIST
    )


@triton.jit
def channel_kl_backward_kernel(
    student_ptr,
    teacher_ptr,
    stats_s_ptr,
    stats_t_ptr,
    grad_kl_ptr,
    coef_ptr,
    grad_ptr,
    num_rows,
    row_length,
    student_row_stride,
    teacher_row_stride,
    grad_row_stride,
    grad_kl_stride,
    inv_tau,
    inv_tau_lo,
    num_col_blocks,
    ROWS: tl.constexpr,
    BLOCK_L: tl.constexpr,
    ACC: tl.constexpr,
    EXACT_TAU: tl.constexpr,
    HAS_COEF: tl.constexpr,
):
    """``grad[r, i] = g[r] / tau * (p_S[r, i] - p_T[r, i])`` for one ``ROWS x BLOCK_L`` tile.

    ``p = exp((x - max) / tau - log z)`` from the forward's per-row ``(max, log z)`` statistics.

    ``g[r] = grad_kl[r * grad_kl_stride]``, times ``coef[r]`` when ``HAS_COEF``: a loss's incoming
    gradient (one scalar, stride 0, or one value per row) and its ``d loss / d kl``, folded in here
    instead of in a separate launch.
    """
    pid = tl.program_id(0)
    row_block = pid // num_col_blocks
    col_block = pid % num_col_blocks
    rows = row_block * ROWS + tl.arange(0, ROWS)
    cols = col_block * BLOCK_L + tl.arange(0, BLOCK_L)[None, :]
    row_ok = rows < num_rows
    mask = row_ok[:, None] & (cols < row_length)
    rows64 = rows.to(tl.int64)
    m_s = tl.load(stats_s_ptr + rows64 * 2, mask=row_ok, other=0.0).to(ACC)
    log_z_s = tl.load(stats_s_ptr + rows64 * 2 + 1, mask=row_ok, other=0.0).to(ACC)
    m_t = tl.load(stats_t_ptr + rows64 * 2, mask=row_ok, other=0.0).to(ACC)
    log_z_t = tl.load(stats_t_ptr + rows64 * 2 + 1, mask=row_ok, other=0.0).to(ACC)
    g = tl.load(grad_kl_ptr + rows64 * grad_kl_stride, mask=row_ok, other=0.0).to(ACC)
    if HAS_COEF:
        g = g * tl.load(coef_ptr + rows, mask=row_ok, other=0.0).to(ACC)
    # Masked lanes read the row's max: finite terms there, never stored.
    s = tl.load(student_ptr + rows64[:, None] * student_row_stride + cols, mask=mask, other=m_s[:, None]).to(ACC)
    t = tl.load(teacher_ptr + rows64[:, None] * teacher_row_stride + cols, mask=mask, other=m_t[:, None]).to(ACC)
    # p = exp((x - max) / tau - log z): the shift is subtracted before scaling, as in the forward.
    p_s = tl.exp(_scaled(s - m_s[:, None], inv_tau, inv_tau_lo, EXACT_TAU) - log_z_s[:, None])
    p_t = tl.exp(_scaled(t - m_t[:, None], inv_tau, inv_tau_lo, EXACT_TAU) - log_z_t[:, None])
    grad = _scaled(g, inv_tau, inv_tau_lo, EXACT_TAU)[:, None] * (p_s - p_t)
    tl.store(grad_ptr + rows64[:, None] * grad_row_stride + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)
