# mypy: allow-untyped-defs
"""Triton finalize step of :func:`segkd.ops.weighted_channel_kl`: weights, loss and backward coefficients.

One launch of one program turns the ``(R,)`` per-row KL values (``R = N * C``) into the loss and
``coef[r] = d loss / d kl[r]``, so a CWD or HWD forward is two kernels (rows, then this) and its
backward one. The program walks the batch ``IMAGES`` images at a time, each image's ``C`` channels
in one ``BLOCK_C`` block, and adds the loss in a fixed order: the result is deterministic. It is
the Triton twin of ``_weighting.finalize`` (the PyTorch reference it is tested against); the HWD
weights follow the same steps: shift by the first channel, standardise with the unbiased std
(``z = 0`` where it is zero or not finite), ``g = expm1(clamp(x ln beta)) / expm1(ln beta)``,
saturated, and ``w = C * softmax_c(g)`` formed as ``(C * e) / sum(e)`` so that equal ``g`` give
exactly 1. Arithmetic is in fp64 whatever the input dtype, as in the PyTorch path (the arrays are
``N * C`` long: nothing next to the row kernels); scalar arguments come as fp32 pairs ``hi + lo``,
since Triton passes Python floats as fp32.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import triton
import triton.language as tl
from torch import Tensor

from segkd.ops import _triton_backend, _weighting
from segkd.ops._triton_backend import _device_guard, _split_inverse, _to_fp32, next_power_of_2
from segkd.ops._triton_kernels import combine_segments

__all__ = ["finalize", "weighted_forward"]

MODE_CODES = {"uniform": 0, "hwd": 1, "given": 2}
REDUCTION_CODES = {"mean": 0, "sum": 1, "none": 2}
# Rows per loop step (whole images): with 8 warps (more for wider images) no variant spills registers up to
# 1024 channels per image (ptxas -v for sm_90, benchmarks/triton_registers.py); 4096 at 4 warps spilled up to
# 14 KB per thread with the split combine. One program runs, so more warps cost no occupancy.
TARGET_BLOCK_ELEMENTS = 1024
MAX_BLOCK_C = 8192  # more channels per image than this: the PyTorch finalize (never seen in segmentation)


@triton.jit
def _expm1(y):
    """``exp(y) - 1`` without cancellation: a Taylor series where ``|y| < 1/16``."""
    series = y * (1.0 + y * (0.5 + y * (1.0 / 6.0 + y * (1.0 / 24.0 + y * (1.0 / 120.0 + y * (1.0 / 720.0))))))
    series = series + y * y * y * y * y * y * y * (1.0 / 5040.0 + y * (1.0 / 40320.0 + y * (1.0 / 362880.0)))
    return tl.where(tl.abs(y) < 0.0625, series, tl.exp(y) - 1.0)


@triton.jit
def weighted_finalize_kernel(
    kl_ptr,
    aux_ptr,
    loss_ptr,
    coef_ptr,
    stats_s_ptr,
    stats_t_ptr,
    num_images,
    channels,
    num_segments,
    inv_tau,
    inv_tau_lo,
    mu,
    mu_lo,
    log_beta,
    log_beta_lo,
    scale,
    scale_lo,
    MODE: tl.constexpr,
    REDUCTION: tl.constexpr,
    BETA_IS_ONE: tl.constexpr,
    SPLIT: tl.constexpr,
    SPLIT_SQDIST: tl.constexpr,
    IMAGES: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Loss and ``coef`` of ``reduce(scale * w * kl)``; one program for the whole batch, arithmetic in fp64.

    With ``SPLIT``, ``kl_ptr`` holds the partials of a split forward (``combine_segments``; with the
    squared distance's fields when ``SPLIT_SQDIST``), which are combined here (and the backward's
    ``(max, log z)`` statistics written), instead of per-row values.
    """
    cols = tl.arange(0, BLOCK_C)[None, :]
    col_ok = cols < channels
    num_rows = num_images * channels
    # fp64 scalars from their fp32 pairs (hi + lo keeps ~48 bits of the Python float).
    zero = tl.zeros([], tl.float64)
    mu_acc = (zero + mu) + mu_lo
    log_beta_acc = (zero + log_beta) + log_beta_lo
    scale_acc = (zero + scale) + scale_lo
    inv_tau_acc = (zero + inv_tau) + inv_tau_lo
    channels_acc = zero + channels
    if not BETA_IS_ONE:
        curve_denominator = _expm1(log_beta_acc)
        # HWD's curve saturates: |x ln beta| <= 700 (as the PyTorch path does in fp64), |g| <= 2^1023.
        largest = tl.exp2(tl.full([], 1023.0, tl.float64))
    if REDUCTION == 0:  # noqa: SIM108 (a constexpr branch)
        row_share = 1.0 / (zero + num_rows)
    else:
        row_share = zero + 1.0
    total = tl.full([IMAGES], 0.0, tl.float64)
    for start in range(0, num_images, IMAGES):
        images = start + tl.arange(0, IMAGES)[:, None]
        mask = (images < num_images) & col_ok
        offsets = images.to(tl.int64) * channels + cols
        if SPLIT:
            kl, sqdist, m_s, log_z_s, m_t, log_z_t = combine_segments(
                kl_ptr, offsets, mask, num_rows, num_segments, inv_tau_acc, SPLIT_SQDIST, tl.float64
            )
            stats_dtype = stats_s_ptr.dtype.element_ty
            tl.store(stats_s_ptr + offsets * 2, m_s.to(stats_dtype), mask=mask)
            tl.store(stats_s_ptr + offsets * 2 + 1, log_z_s.to(stats_dtype), mask=mask)
            tl.store(stats_t_ptr + offsets * 2, m_t.to(stats_dtype), mask=mask)
            tl.store(stats_t_ptr + offsets * 2 + 1, log_z_t.to(stats_dtype), mask=mask)
            # The rounding of the per-row path, whose KL and distance are stored in the stats dtype.
            kl = kl.to(stats_dtype).to(tl.float64)
        else:
            kl = tl.load(kl_ptr + offsets, mask=mask, other=0.0).to(tl.float64)
        if MODE == 0:
            coef = tl.where(mask, scale_acc, 0.0)
        elif MODE == 2:
            coef = tl.load(aux_ptr + offsets, mask=mask, other=0.0).to(tl.float64) * scale_acc
        else:
            if SPLIT:
                d = sqdist.to(stats_dtype).to(tl.float64)
                first = tl.sum(tl.where(cols == 0, d, 0.0), axis=1)[:, None]
            else:
                d = tl.load(aux_ptr + offsets, mask=mask, other=0.0).to(tl.float64)
                first = tl.load(aux_ptr + images.to(tl.int64) * channels, mask=images < num_images, other=0.0)
            centred = tl.where(mask, d - first.to(tl.float64), 0.0)
            centred = tl.where(mask, centred - tl.sum(centred, axis=1)[:, None] / channels_acc, 0.0)
            # Unbiased variance; C == 1 has none (std 0: degenerate). Float scalars only: Triton may pass
            # channels == 1 as a compile-time constant.
            variance = tl.sum(centred * centred, axis=1) / tl.where(channels_acc > 1.5, channels_acc - 1.0, 1.0)
            std = tl.where(channels_acc > 1.5, tl.sqrt(variance), 0.0)
            degenerate = ~(std > 0.0) | ~(std < float("inf"))
            z = centred / tl.where(degenerate, 1.0, std)[:, None]
            z = tl.where(degenerate[:, None] | ~(tl.abs(z) < float("inf")), 0.0, z)
            x = z + mu_acc
            if BETA_IS_ONE:
                g = x
            else:
                y = tl.minimum(tl.maximum(x * log_beta_acc, -700.0), 700.0)
                g = _expm1(y) / curve_denominator
                g = tl.minimum(tl.maximum(g, -largest), largest)
            g = tl.where(mask, g, float("-inf"))
            peak = tl.max(g, axis=1)
            peak = tl.where(peak == float("-inf"), 0.0, peak)
            e = tl.where(mask, tl.exp(g - peak[:, None]), 0.0)
            total_e = tl.sum(e, axis=1)
            total_e = tl.where(total_e > 0.0, total_e, 1.0)
            coef = ((channels_acc * e) / total_e[:, None]) * scale_acc
        terms = coef * kl
        if REDUCTION == 2:
            tl.store(loss_ptr + offsets, terms.to(loss_ptr.dtype.element_ty), mask=mask)
        else:
            total += tl.sum(tl.where(mask, terms, 0.0), axis=1)
        tl.store(coef_ptr + offsets, (coef * row_share).to(coef_ptr.dtype.element_ty), mask=mask)
    if REDUCTION != 2:
        tl.store(loss_ptr, (tl.sum(total, axis=0) * row_share).to(loss_ptr.dtype.element_ty))


@functools.lru_cache(maxsize=256)
def _split(value: float) -> tuple[float, float]:
    """``value`` as an fp32 number plus the fp32 rest (fp64 kernels add them back)."""
    high = _to_fp32(value)
    rest = value - high if math.isfinite(high) else 0.0
    return high, _to_fp32(rest)


def _tile(num_images: int, channels: int) -> tuple[int, int]:
    block_c = next_power_of_2(channels)
    images = max(1, min(TARGET_BLOCK_ELEMENTS // block_c, next_power_of_2(num_images)))
    return images, block_c


def _num_warps(block_elements: int) -> int:
    """8 warps up to 1024 elements per step, then one warp per 128 elements, at most 32."""
    return min(32, max(8, block_elements // 128))


def finalize(
    kl: Tensor,
    aux: Tensor | None,
    channels: int,
    mode: str,
    mu: float,
    beta: float,
    scale: float,
    reduction: str,
) -> tuple[Tensor, Tensor]:
    """Same contract as ``_weighting.finalize``: ``(loss, coef)`` in ``kl``'s dtype."""
    if channels > MAX_BLOCK_C:
        return _weighting.finalize(kl, aux, channels, mode, mu, beta, scale, reduction)
    loss, coef = _launch(kl, aux, None, kl.shape[0], channels, 1, 1.0, mode, mu, beta, scale, reduction)
    return loss, coef


def weighted_forward(
    student: Tensor,
    teacher: Tensor,
    weights: Tensor | None,
    tau: float,
    channels: int,
    mode: str,
    mu: float,
    beta: float,
    reduction: str,
    plan: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(loss, coef, stats_s, stats_t)`` of the weighted loss on ``(R, L)`` rows: two launches.

    The row kernel, then the finalize. When the rows are split (``plan``, by default from
    ``_triton_backend.plan_segments``) the finalize also combines the segments, so the launch count does not grow.
    """
    num_rows, row_length = student.shape
    need_sqdist = mode == "hwd"
    plan = plan or _triton_backend.plan_segments(num_rows, row_length, student.device)
    segments, segment_length = plan
    if segments == 1 or channels > MAX_BLOCK_C:
        kl, sqdist, stats_s, stats_t = _triton_backend.forward(student, teacher, tau, need_sqdist, plan)
        loss, coef = finalize(kl, sqdist if need_sqdist else weights, channels, mode, mu, beta, tau * tau, reduction)
        return loss, coef, stats_s, stats_t
    partials = _triton_backend.forward_partials(student, teacher, tau, need_sqdist, segments, segment_length)
    stats_s = _triton_backend._new_output(_triton_backend.stats_shape(num_rows), partials.dtype, student.device)
    stats_t = _triton_backend._new_output(_triton_backend.stats_shape(num_rows), partials.dtype, student.device)
    loss, coef = _launch(
        partials, weights, (stats_s, stats_t), num_rows, channels, segments, tau, mode, mu, beta, tau * tau, reduction
    )
    return loss, coef, stats_s, stats_t


def _launch(
    values: Tensor,
    aux: Tensor | None,
    stats: tuple[Tensor, Tensor] | None,
    num_rows: int,
    channels: int,
    segments: int,
    tau: float,
    mode: str,
    mu: float,
    beta: float,
    scale: float,
    reduction: str,
) -> tuple[Tensor, Tensor]:
    """One launch of the finalize kernel on per-row ``values`` (``kl``), or on partials with ``stats``."""
    num_images = num_rows // channels
    dtype = values.dtype
    loss_shape: tuple[int, ...] = (num_images, channels) if reduction == "none" else ()
    # Through the module, so that a test's patch of the allocator (or of _kernel_for) reaches here too.
    loss = _triton_backend._new_output(loss_shape, dtype, values.device)
    coef = _triton_backend._new_output((num_rows,), dtype, values.device)
    if aux is not None:
        aux = aux.contiguous()
    stats_s, stats_t = (coef, coef) if stats is None else stats  # never written without SPLIT
    images, block_c = _tile(num_images, channels)
    beta_is_one = beta == 1.0
    kernel: Any = _triton_backend._kernel_for(weighted_finalize_kernel, values.device)
    with _device_guard(values.device):
        kernel[(1,)](
            values,
            values if aux is None else aux,  # never read when mode is "uniform" (or "hwd" with SPLIT)
            loss,
            coef,
            stats_s,
            stats_t,
            num_images,
            channels,
            segments,
            *_split_inverse(tau),
            *_split(mu),
            *_split(0.0 if beta_is_one else math.log(beta)),
            *_split(scale),
            MODE=MODE_CODES[mode],
            REDUCTION=REDUCTION_CODES[reduction],
            BETA_IS_ONE=beta_is_one,
            SPLIT=stats is not None,
            SPLIT_SQDIST=stats is not None and mode == "hwd",  # the partials hold A, B, C
            IMAGES=images,
            BLOCK_C=block_c,
            num_warps=_num_warps(images * block_c),
            enable_fp_fusion=_triton_backend.FP_FUSION,
        )
    return loss, coef
