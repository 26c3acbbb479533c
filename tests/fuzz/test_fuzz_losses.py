"""Fuzzing of every public segkd loss and op (issue 7): finite values, gradients only where the math says.

Each test draws inputs that break careless code: shapes with ``C == 1`` and one-pixel images, the
four float dtypes (fp32, bf16, fp16, fp64), values from ``1e-6`` to ``1e4`` in magnitude (log-uniform,
with the decades themselves mixed in), students equal, near-equal (a relative perturbation of
``1e-7`` to ``1e-3``), close or independent of their teacher, label maps with no, some or only
ignored pixels and single-class label maps. Properties checked on every case:

* the loss is finite, and the student's gradient is finite, for finite inputs;
* the teacher never receives a gradient (it is passed with ``requires_grad=True``);
* the student's gradient vanishes where the math says it does: equal student and teacher for the
  divergence losses, ignored pixels, masked-out MGD positions, ``C == 1`` for DIST;
* the Triton backend of ``channel_kl`` agrees with the PyTorch backend (under the Triton
  interpreter on machines without CUDA).

The number of cases per test comes from the hypothesis profile (conftest.py): ``ci`` (25, the
default) keeps this file quick; ``SEGKD_HYPOTHESIS_PROFILE=deep`` (10,000 per test) is ``make fuzz``.
Shapes are kept small on purpose: the edge cases are in the sizes 1 and 2 and in the values, not in
large maps. Each failure found here was fixed in the loss and pinned in ``test_regressions.py``.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import sys
from collections.abc import Callable, Iterator
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import event, given
from hypothesis import strategies as st
from torch import Tensor

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # effective only if nothing imported Triton earlier

from segkd.losses.adversarial import skd_discriminator_hinge_loss, skd_generator_hinge_loss
from segkd.losses.cirkd import CIRKDLoss, CIRKDMemoryLoss, cirkd_memory_kl, cirkd_minibatch_loss
from segkd.losses.cwd import cwd_loss
from segkd.losses.dist import dist_loss
from segkd.losses.hwd import hwd_loss, hwd_weights, hwd_weights_from_divergence
from segkd.losses.ifvd import ifvd_loss
from segkd.losses.kd import pixel_kd_loss
from segkd.losses.mgd import MGDLoss, mgd_mask
from segkd.losses.skd import skd_pairwise_loss
from segkd.ops.channel_kl import available_backends, channel_kl
from segkd.ops.weighted_kl import weighted_channel_kl
from segkd.testing import strategies as sks
from segkd.testing.reference import channel_kl_reference

DTYPES = sks.float_dtypes()  # fp32, fp64, fp16, bf16
# Modules with trainable layers (MGD's align/generation convs, CIRKD's projection head) are fuzzed in
# fp32, fp64 and bf16. Run entirely in fp16 (parameters included, which autocast never does), their
# layers overflow: MGD's weight gradient 2 alpha (G - T) x overflowed fp16 at alpha = 1 and features of
# 2.4e3; CIRKD's head maps tiny features to subnormal embeddings whose normalisation gradient (~1 / |e|)
# overflows and meets zeros in the conv backward (inf * 0 = NaN). That is fp16 arithmetic in the
# layers, not in the loss; the loss functions themselves are fuzzed in all four dtypes.
MODULE_DTYPES = sks.float_dtypes([torch.float32, torch.float64, torch.bfloat16])

# Magnitudes from 1e-6 to 1e4: the decades themselves, and log-uniform values in between.
magnitudes = st.one_of(
    st.sampled_from([1e-6, 1e-3, 1.0, 30.0, 1e4]),
    st.floats(-6.0, 4.0, allow_nan=False).map(lambda exponent: 10.0**exponent),
)
taus = sks.temperatures()
seeds = st.integers(0, 2**32 - 1)
RELATIONS = ("equal", "near", "close", "independent")

# Small on purpose: N 1-3, C 1-6, H, W 1-7 (boundaries drawn often by segkd.testing.strategies).
logit_shapes = sks.segmentation_shapes(max_batch=3, max_channels=6, max_side=7)
# Images of 16 to 81 pixels: rows the split test cuts into 2 to 6 segments.
split_shapes = sks.segmentation_shapes(max_batch=2, max_channels=5, min_side=4, max_side=9)


def _cast(values: Tensor, dtype: torch.dtype) -> Tensor:
    limit = torch.finfo(dtype).max / 2  # as segkd.testing.strategies: keep fp16 values finite
    return values.clamp(-limit, limit).to(dtype)


@st.composite
def pairs(
    draw: st.DrawFn,
    shapes: st.SearchStrategy[tuple[int, ...]],
    *,
    teacher_channels: st.SearchStrategy[int | None] | None = None,
    non_negative: st.SearchStrategy[bool] | None = None,
    dtypes: st.SearchStrategy[torch.dtype] = DTYPES,
) -> tuple[Tensor, Tensor, str]:
    """``(student, teacher, relation)`` with the four relations of this module (``near`` is new here).

    ``near`` perturbs the student by a relative ``1e-7`` to ``1e-3`` (it may round back to ``equal``
    in half precision). ``teacher_channels`` draws a different teacher width (then the relation is
    ``independent``). ``non_negative`` applies a ReLU to both, as for features after an activation
    (exact zero vectors included). ``dtypes`` narrows the dtypes.
    """
    shape = tuple(draw(shapes))
    dtype = draw(dtypes)
    scale = draw(magnitudes)
    relation = draw(st.sampled_from(RELATIONS))
    relu = draw(st.booleans() if non_negative is None else non_negative)
    generator = torch.Generator().manual_seed(draw(seeds))
    student = torch.randn(shape, generator=generator, dtype=torch.float64) * scale
    drawn_width = None if teacher_channels is None else draw(teacher_channels)
    width = shape[1] if drawn_width is None else drawn_width
    if width != shape[1]:
        relation = "independent"
    if relation == "equal":
        teacher = student.clone()
    elif relation == "near":
        relative = 10.0 ** draw(st.floats(-7.0, -3.0))
        teacher = student * (1.0 + relative * torch.randn(shape, generator=generator, dtype=torch.float64))
    elif relation == "close":
        teacher = student + 0.1 * scale * torch.randn(shape, generator=generator, dtype=torch.float64)
    else:
        teacher = torch.randn((shape[0], width, *shape[2:]), generator=generator, dtype=torch.float64) * scale
    if relu:
        student, teacher = student.clamp_min(0.0), teacher.clamp_min(0.0)
    return _cast(student, dtype), _cast(teacher, dtype), relation


@st.composite
def labels_for(
    draw: st.DrawFn, shape: tuple[int, ...], num_classes: int, ignore_index: int = 255
) -> tuple[Tensor, str]:
    """``(labels, kind)``: ``(N, H, W)`` label maps with 0, some or all pixels ignored; ``kind="single"``
    puts every kept pixel in one class."""
    labels = draw(sks.label_maps(shape, num_classes, ignore_index=ignore_index))
    kind = draw(st.sampled_from(["mixed", "single"]))
    if kind == "single":
        labels = torch.where(
            labels == ignore_index, labels, torch.full_like(labels, draw(st.integers(0, num_classes - 1)))
        )
    return labels, kind


def _leaves(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Both as leaves that require a gradient, so a teacher gradient would be visible."""
    return student.clone().requires_grad_(True), teacher.clone().requires_grad_(True)


def _check_finite(value: Tensor, what: str, case: str) -> None:
    assert torch.isfinite(value).all(), f"{what} is not finite for {case}: {value.flatten()[:8]}"


def _backward_and_check(
    loss: Tensor, student: Tensor, teacher: Tensor | None, case: str, *, finite_grad: bool = True
) -> Tensor:
    """Check the loss, back-propagate its sum, check the gradients; return the student's gradient.

    ``finite_grad=False`` skips the finiteness of the student's gradient, for the fp16 cases whose
    exact gradient does not fit fp16 (see :func:`_fits_fp16`).
    """
    _check_finite(loss, "loss", case)
    loss.sum().backward()
    assert student.grad is not None, f"no gradient reached the student for {case}"
    if finite_grad:
        _check_finite(student.grad, "student gradient", case)
    else:
        event("fp16: exact gradient beyond fp16 range, finiteness not checked")
    if teacher is not None:
        assert teacher.grad is None, f"the teacher received a gradient for {case}"
    return student.grad


def _describe(student: Tensor, relation: str = "", labels: Tensor | None = None, **extra: object) -> str:
    """A one-line description of the case for failure messages; also tallies its kind for the statistics.

    The ``event`` calls show in ``pytest --hypothesis-show-statistics`` as the share of cases of each kind
    (dtype, relation, ``C == 1``, one-pixel images, all-ignored labels, magnitude), the coverage figures of
    docs/reliability.md.
    """
    largest = student.detach().double().abs().max().item()
    event(f"dtype {str(student.dtype).removeprefix('torch.')}")
    if relation:
        event(f"student-teacher {relation}")
    if student.dim() > 1 and student.shape[1] == 1:
        event("C == 1")
    if student.dim() > 2 and math.prod(student.shape[2:]) == 1:
        event("one-pixel image")
    event("max|x| >= 1e3" if largest >= 1e3 else "max|x| <= 1e-3" if largest <= 1e-3 else "1e-3 < max|x| < 1e3")
    if labels is not None:
        ignored = labels == 255
        event(
            "labels all ignored"
            if ignored.all()
            else "labels none ignored"
            if not ignored.any()
            else "labels some ignored"
        )
        kept = labels[~ignored]
        if kept.numel() > 0 and (kept == kept.flatten()[0]).all():
            event("labels single class")
    settings_text = ", ".join(f"{key}={value}" for key, value in extra.items())
    return f"{tuple(student.shape)} {student.dtype} {relation} max|x|={largest:.3g} {settings_text}"


FP16_GRAD_LIMIT = 3e4  # half of fp16's largest value (65504): room for the rounding of a sum


def _fits_fp16(loss_fn: Callable[[Tensor, Tensor], Tensor], student: Tensor, teacher: Tensor) -> bool:
    """Whether the exact (float64) gradient of ``loss_fn`` at these inputs fits fp16; always true otherwise.

    The cosine-normalised losses (SKD pair-wise, IFVD, CIRKD) have gradients of size ``1 / |f|`` for a
    feature vector ``f``, and ``1 / eps = 1e8 .. 1e12`` at an exactly zero vector, as in
    ``F.normalize``: an fp16 student with tiny or zero feature vectors has a true gradient beyond
    fp16's range. There the gradient's finiteness is not a property of the loss, only of the dtype.
    """
    if student.dtype != torch.float16:
        return True
    exact = student.detach().double().requires_grad_(True)
    loss_fn(exact, teacher.detach().double()).sum().backward()
    return bool(exact.grad.abs().max() <= FP16_GRAD_LIMIT)  # type: ignore[union-attr]


def _min_vector_norm(features: Tensor, pool: int | None = None, mode: str = "max") -> float:
    """Smallest channel-vector norm of ``features`` after the loss's pooling (``max`` or ``avg``)."""
    x = features.detach().double()
    if pool is not None and pool > 1:
        pooling = F.max_pool2d if mode == "max" else F.avg_pool2d
        x = pooling(x, pool, pool, ceil_mode=True)
    return float(torch.linalg.vector_norm(x.flatten(2), dim=1).min())


def _zero_grad_tolerance(dtype: torch.dtype) -> float:
    """Bound of a gradient that the math says is zero but rounding leaves at ~eps of its compute dtype."""
    return 1e-12 if dtype == torch.float64 else 1e-5


# ---------------------------------------------------------------------------------------------------------
# channel_kl, CWD, HWD
# ---------------------------------------------------------------------------------------------------------


@given(data=pairs(logit_shapes, non_negative=st.just(False)), tau=taus)
def test_channel_kl_torch(data: tuple[Tensor, Tensor, str], tau: float) -> None:
    raw_student, raw_teacher, relation = data
    student, teacher = _leaves(raw_student, raw_teacher)
    case = _describe(student, relation, tau=tau)
    kl, sqdist = channel_kl(student, teacher, tau, return_sqdist=True, backend="torch")
    _check_finite(sqdist, "sqdist", case)
    assert (kl >= 0).all(), f"negative KL for {case}"
    assert (sqdist >= 0).all(), f"negative sqdist for {case}"
    assert (sqdist <= 2 + 1e-5).all(), f"sqdist above 2 for {case}"
    grad = _backward_and_check(kl, student, teacher, case)
    if relation == "equal":
        assert (kl == 0).all(), f"KL of equal inputs is not 0 for {case}"
        assert (grad == 0).all(), f"equal inputs give a non-zero gradient for {case}"
    # The gradient of a KL between two distributions sums to zero over each row (softmax Jacobian).
    # Each element is rounded once to the student's dtype: allow a few ulps of the row's absolute sum.
    rows = grad.double().flatten(2)
    info = torch.finfo(grad.dtype)
    bound = 4 * info.eps * rows.abs().sum(dim=2) + rows.shape[2] * info.tiny * info.eps + 1e-6 / tau
    assert (rows.sum(dim=2).abs() <= bound).all(), f"gradient rows do not sum to 0 for {case}"


TRITON = "triton" in available_backends()


@pytest.mark.triton
@pytest.mark.skipif(not TRITON, reason="Triton is not installed or disabled (SEGKD_DISABLE_TRITON)")
@given(data=pairs(logit_shapes, non_negative=st.just(False)), tau=taus, weight_seed=seeds)
def test_channel_kl_triton_agrees_with_torch(data: tuple[Tensor, Tensor, str], tau: float, weight_seed: int) -> None:
    raw_student, raw_teacher, relation = data
    device = "cuda" if torch.cuda.is_available() else "cpu"
    raw_student, raw_teacher = raw_student.to(device), raw_teacher.to(device)
    # grad_output != 1 and different per channel, so a backend that ignores it is caught.
    generator = torch.Generator().manual_seed(weight_seed)
    grad_out = (torch.rand(raw_student.shape[:2], generator=generator, dtype=torch.float64) + 0.5).to(device)
    results = {}
    for backend in ("torch", "triton"):
        student, teacher = _leaves(raw_student, raw_teacher)
        kl, sqdist = channel_kl(student, teacher, tau, return_sqdist=True, backend=backend)
        (kl * grad_out.to(kl.dtype)).sum().backward()
        assert teacher.grad is None
        results[backend] = (kl.detach(), sqdist, student.grad)
    case = _describe(raw_student, relation, tau=tau)
    for name, index in (("kl", 0), ("sqdist", 1)):
        _check_finite(results["triton"][index], f"triton {name}", case)
    _check_finite(results["triton"][2], "triton gradient", case)
    exact = raw_student.dtype == torch.float64
    # The torch backend's KL, sum p_T (t - s) - (lse_T - lse_S), is a difference of two log-normalisers of
    # size |x| / tau: its absolute rounding error is ~eps * |x| / tau (eps = 1e-7 in fp32, 1e-16 in fp64).
    # The Triton kernel is accurate to rounding of its inputs at every scale (fp64: Taylor series beyond fp64
    # rounding; |x| / tau ~ 1e4: no rounding of x / tau or lse in the exponents), so this is the bound.
    lse_scale = 1.0 + raw_student.double().abs().max().item() / tau + raw_teacher.double().abs().max().item() / tau
    atol = 1e-14 * lse_scale if exact else 4e-6 * lse_scale
    rtol = 1e-12 if exact else 1e-4
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=rtol, atol=atol)
    # sqdist below fp64: the kernel against a float64 reference of the rounded inputs (its exponents carry
    # ~1e-16 |x| / tau, far below fp32's), then the torch backend against the kernel. The torch backend scales
    # x / tau before it subtracts the row max: when 1/tau is not a power of two each exponent carries
    # ~eps |x| / tau, which sqdist (first order in the exponents) carries relative, up to 2 eps per unit of
    # lse_scale. The deep run found 2.1e-4 at |x| ~ 2e4, tau = 0.75, where the kernel matched a 40-digit
    # reference to 2e-7 (docs/kernel.md, the torch backend's accuracy).
    if not exact:
        _, reference_sqdist = channel_kl_reference(raw_student.double().cpu(), raw_teacher.double().cpu(), tau)
        torch.testing.assert_close(results["triton"][1].double().cpu(), reference_sqdist, rtol=1e-4, atol=1e-6)
    torch_sqdist_rtol = 1e-10 if exact else 1e-4 + 2 * torch.finfo(torch.float32).eps * lse_scale
    torch.testing.assert_close(
        results["triton"][1], results["torch"][1], rtol=torch_sqdist_rtol, atol=1e-15 if exact else 1e-6
    )
    grad_atol = {torch.float64: 1e-9, torch.float32: 4e-6, torch.float16: 4e-6, torch.bfloat16: 4e-6}
    grad_rtol = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
    dtype = raw_student.dtype
    torch.testing.assert_close(
        results["triton"][2].double(),
        results["torch"][2].double(),
        rtol=grad_rtol[dtype],
        atol=grad_atol[dtype] * 2.0 * lse_scale / tau,
    )


@contextlib.contextmanager
def _split_rows() -> Iterator[bool]:
    """The Triton forward with rows of 16+ split into segments of 8 or 16 (a ``with`` block, since hypothesis
    runs many examples in one test function and function-scoped fixtures would not be reset between them)."""
    backend = importlib.import_module("segkd.ops._triton_backend")
    patches = {"_target_programs": lambda device: 1 << 30, "MIN_SEGMENT_ELEMENTS": 8, "FORWARD_MAX_BLOCK_L": 8}
    with mock.patch.multiple(backend, **patches):  # type: ignore[arg-type]
        yield True


@pytest.mark.triton
@pytest.mark.skipif(not TRITON, reason="Triton is not installed or disabled (SEGKD_DISABLE_TRITON)")
@given(
    data=pairs(split_shapes, non_negative=st.just(False)),
    tau=taus,
    seed=seeds,
    weighting=st.sampled_from(["uniform", "given"]),
    reduction=st.sampled_from(["mean", "none"]),
)
def test_triton_split_rows_agree_with_whole_rows(
    data: tuple[Tensor, Tensor, str], tau: float, seed: int, weighting: str, reduction: str
) -> None:
    """Rows split into segments and combined by the chain rule of the KL (``channel_kl``'s combine kernel, the
    fused loss's finalize) give the whole-row kernel's KL, squared distance, loss and gradient.

    Not HWD's weights: they standardise the squared distances across channels, which turns rounding-level
    differences of near-equal distances (one-hot rows at |x| / tau ~ 1e3: every sqdist ~ 2) into weights 5%
    apart (the first deep run found one); tests/ops compare the split HWD loss with its reference.
    """
    raw_student, raw_teacher, relation = data
    device = "cuda" if torch.cuda.is_available() else "cpu"
    raw_student, raw_teacher = raw_student.to(device), raw_teacher.to(device)
    generator = torch.Generator().manual_seed(seed)
    case = _describe(raw_student, relation, tau=tau, weighting=weighting, reduction=reduction)
    given = torch.rand(raw_student.shape[:2], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    weights: str | Tensor = given.float().to(device) if weighting == "given" else weighting
    results = []
    for context in (contextlib.nullcontext(False), _split_rows()):
        with context:
            kl, sqdist = channel_kl(*_leaves(raw_student, raw_teacher), tau, return_sqdist=True, backend="triton")
            student, teacher = _leaves(raw_student, raw_teacher)
            loss = weighted_channel_kl(student, teacher, tau, weights, reduction=reduction, backend="triton")  # type: ignore[arg-type]
            grad_out = (torch.rand(loss.shape, generator=generator, dtype=torch.float64) + 0.5).to(device)
            (loss * grad_out.to(loss.dtype)).sum().backward()
        assert student.grad is not None
        for name, value in (("kl", kl), ("sqdist", sqdist), ("loss", loss), ("gradient", student.grad)):
            _check_finite(value.detach(), f"split {name}" if results else name, case)
        results.append((kl.detach(), sqdist.detach(), loss.detach(), student.grad))
        generator = torch.Generator().manual_seed(seed)  # the same grad_out for both
    (kl, sqdist, loss, grad), (split_kl, split_sqdist, split_loss, split_grad) = results
    exact = raw_student.dtype == torch.float64
    # Both are accurate to a few roundings of their inputs, except where near-identical fp32 rows leave
    # ~1e-5 of the KL to the rounding of the exponents (docs/kernel.md); the atol covers KLs near zero.
    tolerance = {"rtol": 1e-10, "atol": 1e-15} if exact else {"rtol": 2e-4, "atol": 1e-9}
    torch.testing.assert_close(split_kl, kl, **tolerance)
    torch.testing.assert_close(split_sqdist, sqdist, **tolerance)
    torch.testing.assert_close(split_loss, loss, **tolerance)
    # The backward is the same kernel; its statistics (max, log z) come from the combine, equal up to rounding,
    # which moves every p by a few eps of itself: the gradient coef / tau * (p_S - p_T) of near-identical rows
    # moves by that much of coef / tau, not of its own (smaller) size. coef <= tau^2 * max w * max grad_out / rows.
    rows = 1 if reduction == "none" else raw_student.shape[0] * raw_student.shape[1]
    max_weight = 1  # uniform, or given weights in [0, 1)
    coef_over_tau = tau * max_weight * 1.5 / rows
    compute_eps = 2.3e-16 if exact else 1.2e-7
    grad_rtol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
    torch.testing.assert_close(
        split_grad.double(),
        grad.double(),
        rtol=grad_rtol[raw_student.dtype],
        atol=16 * compute_eps * coef_over_tau + 1e3 * torch.finfo(raw_student.dtype).tiny,
    )


@pytest.mark.triton
@pytest.mark.skipif(not TRITON, reason="Triton is not installed or disabled (SEGKD_DISABLE_TRITON)")
@given(
    data=pairs(logit_shapes, non_negative=st.just(False)),
    tau=taus,
    seed=seeds,
    weighting=st.sampled_from(["uniform", "hwd", "given"]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    mu=st.floats(-2.0, 2.0),
    beta=st.one_of(st.just(1.0), st.just(0.1), st.floats(0.01, 10.0)),
)
def test_weighted_channel_kl_triton_is_its_composition(
    data: tuple[Tensor, Tensor, str], tau: float, seed: int, weighting: str, reduction: str, mu: float, beta: float
) -> None:
    """The fused Triton loss (finalize kernel, coefficients folded into the backward) equals the same loss
    composed from Triton's channel_kl and PyTorch operations: tau^2 * reduce(w * kl), w from its sqdist."""
    raw_student, raw_teacher, relation = data
    device = "cuda" if torch.cuda.is_available() else "cpu"
    raw_student, raw_teacher = raw_student.to(device), raw_teacher.to(device)
    generator = torch.Generator().manual_seed(seed)
    given_weights = torch.rand(raw_student.shape[:2], generator=generator, dtype=torch.float64).to(device)
    weights: str | Tensor = given_weights.float() if weighting == "given" else weighting
    case = _describe(raw_student, relation, tau=tau, weighting=weighting, reduction=reduction, mu=mu, beta=beta)

    student, teacher = _leaves(raw_student, raw_teacher)
    fused = weighted_channel_kl(student, teacher, tau, weights, mu=mu, beta=beta, reduction=reduction, backend="triton")  # type: ignore[arg-type]
    grad_out = (torch.rand(fused.shape, generator=generator, dtype=torch.float64) + 0.5).to(device)
    (fused * grad_out.to(fused.dtype)).sum().backward()
    assert teacher.grad is None
    fused_grad = student.grad
    _check_finite(fused.detach(), "fused loss", case)
    assert fused_grad is not None
    _check_finite(fused_grad, "fused gradient", case)

    student, teacher = _leaves(raw_student, raw_teacher)
    kl, sqdist = channel_kl(student, teacher, tau, return_sqdist=True, backend="triton")
    if weighting == "uniform":
        w = torch.ones_like(kl)
    elif weighting == "hwd":
        w = hwd_weights_from_divergence(sqdist, mu, beta).to(kl.dtype)
    else:
        w = given_weights.float().to(kl.dtype)
    terms = tau * tau * w * kl
    composed = {"mean": terms.mean, "sum": terms.sum, "none": lambda: terms}[reduction]()
    (composed * grad_out.to(composed.dtype)).sum().backward()
    exact = raw_student.dtype == torch.float64
    # Near the subnormal range (the deep run found a term of 1e-307) rounding is absolute, not relative.
    near_subnormal = 1e3 * torch.finfo(fused.dtype).tiny
    # HWD's weights are exp(g - max g) with |g - max g| up to ~745 before they underflow: a rounding eps of g
    # (the two sides standardise and sum in different orders) becomes ~745 eps relative in a small weight
    # (the deep run found 1.3e-12 on a weight-1e-180 term, mu = -2, beta = 0.1).
    exact_rtol = 1e-10 if weighting == "hwd" else 1e-12
    torch.testing.assert_close(
        fused.detach(), composed.detach(), rtol=exact_rtol if exact else 1e-5, atol=near_subnormal
    )
    grad_rtol = {torch.float64: exact_rtol, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
    assert student.grad is not None
    scale = student.grad.double().abs().max().item()
    torch.testing.assert_close(
        fused_grad.double(),
        student.grad.double(),
        rtol=grad_rtol[raw_student.dtype],
        atol=1e-12 * scale + 1e3 * torch.finfo(raw_student.dtype).tiny,
    )


@given(
    data=pairs(logit_shapes, non_negative=st.just(False)), tau=taus, reduction=st.sampled_from(["mean", "sum", "none"])
)
def test_cwd(data: tuple[Tensor, Tensor, str], tau: float, reduction: str) -> None:
    raw_student, raw_teacher, relation = data
    student, teacher = _leaves(raw_student, raw_teacher)
    case = _describe(student, relation, tau=tau, reduction=reduction)
    loss = cwd_loss(student, teacher, tau, reduction, backend="torch")  # type: ignore[arg-type]
    assert (loss >= 0).all(), f"negative CWD for {case}"
    grad = _backward_and_check(loss, student, teacher, case)
    if relation == "equal":
        assert (loss == 0).all(), f"equal inputs: non-zero loss for {case}"
        assert (grad == 0).all(), f"equal inputs: non-zero gradient for {case}"


@given(
    data=pairs(logit_shapes, non_negative=st.just(False)),
    tau=taus,
    mu=st.floats(-2.0, 2.0),
    beta=st.one_of(st.just(1.0), st.just(0.1), st.floats(0.01, 10.0)),
    distance=st.sampled_from(["prob", "logits"]),
)
def test_hwd(data: tuple[Tensor, Tensor, str], tau: float, mu: float, beta: float, distance: str) -> None:
    raw_student, raw_teacher, relation = data
    student, teacher = _leaves(raw_student, raw_teacher)
    case = _describe(student, relation, tau=tau, mu=mu, beta=beta, distance=distance)
    weights = hwd_weights(student, teacher, tau, mu, beta, distance, backend="torch")  # type: ignore[arg-type]
    _check_finite(weights, "weights", case)
    assert (weights >= 0).all(), f"negative weights for {case}"
    assert not weights.requires_grad, f"weights attached to the graph for {case}"
    channels = student.shape[1]
    sums = weights.double().sum(dim=1)
    assert torch.allclose(sums, torch.full_like(sums, float(channels)), rtol=1e-4), f"weights do not sum to C: {case}"
    loss = hwd_loss(student, teacher, tau, mu, beta, distance, "none", backend="torch")  # type: ignore[arg-type]
    assert (loss >= 0).all(), f"negative HWD for {case}"
    grad = _backward_and_check(loss, student, teacher, case)
    if relation == "equal":
        assert torch.equal(weights, torch.ones_like(weights)), f"equal inputs: weights not uniform for {case}"
        assert (loss == 0).all(), f"equal inputs: non-zero loss for {case}"
        assert (grad == 0).all(), f"equal inputs: non-zero gradient for {case}"


# ---------------------------------------------------------------------------------------------------------
# DIST, pixel KD, SKD
# ---------------------------------------------------------------------------------------------------------

dist_shapes = st.one_of(
    logit_shapes,
    sks.segmentation_shapes(max_batch=3, max_channels=6, max_side=7, spatial_dims=1),  # (N, C, L)
    st.tuples(st.integers(1, 6), st.integers(1, 6)),  # (N, C): classification
)


@given(
    data=pairs(dist_shapes, non_negative=st.just(False)),
    tau=taus,
    beta=st.sampled_from([0.0, 1.0, 2.0]),
    gamma=st.sampled_from([0.0, 1.0, 2.0]),
)
def test_dist(data: tuple[Tensor, Tensor, str], tau: float, beta: float, gamma: float) -> None:
    raw_student, raw_teacher, relation = data
    student, teacher = _leaves(raw_student, raw_teacher)
    case = _describe(student, relation, tau=tau, beta=beta, gamma=gamma)
    loss = dist_loss(student, teacher, beta, gamma, tau)
    # Each term is 1 - mean correlation, with |correlation| <= 1 up to rounding: the correlation of
    # identical vectors of length n is 1 within the dot product's rounding bound (n + 2) eps, so the loss
    # can be down to -(n + 2) eps tau^2 (beta + gamma) (the deep run found -5 ulps for n = 72).
    length = max(student.shape[1], student.numel() // student.shape[1])
    slack = (length + 2) * torch.finfo(loss.dtype).eps * tau * tau * (beta + gamma)
    assert loss.item() >= -slack, f"DIST below 0 for {case}"
    assert loss.item() <= 2 * tau * tau * (beta + gamma) + slack, f"DIST above 2 tau^2 (beta + gamma) for {case}"
    grad = _backward_and_check(loss, student, teacher, case)
    if student.shape[1] == 1:  # every softmax is 1: constant loss tau^2 (beta + gamma), zero gradient
        assert (grad == 0).all(), f"C == 1 gives a non-zero gradient for {case}"
        assert abs(loss.item() - tau * tau * (beta + gamma)) <= 1e-6 * tau * tau * (beta + gamma), case


@given(
    data=pairs(logit_shapes, non_negative=st.just(False)),
    tau=taus,
    reduction=st.sampled_from(["mean", "sum", "none"]),
    use_labels=st.booleans(),
    label_data=st.data(),
)
def test_pixel_kd(
    data: tuple[Tensor, Tensor, str], tau: float, reduction: str, use_labels: bool, label_data: st.DataObject
) -> None:
    raw_student, raw_teacher, relation = data
    n, c, h, w = raw_student.shape
    labels, kind = label_data.draw(labels_for((n, h, w), c)) if use_labels else (None, "none")
    student, teacher = _leaves(raw_student, raw_teacher)
    case = _describe(student, relation, tau=tau, reduction=reduction, labels=labels, label_kind=kind)
    loss = pixel_kd_loss(student, teacher, tau, labels, reduction=reduction)  # type: ignore[arg-type]
    assert (loss >= 0).all(), f"negative pixel KD for {case}"
    grad = _backward_and_check(loss, student, teacher, case)
    if labels is not None:
        ignored = (labels == 255).unsqueeze(1).expand_as(grad)
        assert (grad[ignored] == 0).all(), f"ignored pixels get a gradient for {case}"
    if relation == "equal":
        # sum_c p_T = 1 only up to rounding: the log-softmax backward leaves ~eps * p per class.
        bound = _zero_grad_tolerance(student.dtype) * tau
        assert grad.double().abs().max() <= bound, f"equal inputs give a gradient for {case}"


feature_shapes = sks.segmentation_shapes(max_batch=3, max_channels=5, max_side=7)


@given(
    data=pairs(feature_shapes, teacher_channels=st.integers(1, 5)),
    pool=st.sampled_from([1, 2, 3]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
)
def test_skd_pairwise(data: tuple[Tensor, Tensor, str], pool: int, reduction: str) -> None:
    raw_student, raw_teacher, relation = data
    student, teacher = _leaves(raw_student, raw_teacher)
    case = _describe(student, relation, pool=pool, reduction=reduction)
    loss = skd_pairwise_loss(student, teacher, pool, reduction)  # type: ignore[arg-type]
    # Every squared difference of two cosines is in [0, 4].
    terms = skd_pairwise_loss(student.detach(), teacher, pool, "none")
    assert (terms >= 0).all(), f"negative SKD pair-wise term for {case}"
    assert (terms <= 4 + 1e-4).all(), f"SKD pair-wise term above 4 for {case}"
    fits = _fits_fp16(lambda s, t: skd_pairwise_loss(s, t, pool, reduction), raw_student, raw_teacher)  # type: ignore[arg-type]
    grad = _backward_and_check(loss, student, teacher, case, finite_grad=fits)
    if relation == "equal":
        assert (loss == 0).all(), f"equal inputs: non-zero loss for {case}"
        assert (grad == 0).all(), f"equal inputs: non-zero gradient for {case}"


@given(
    fake=sks.logits(
        sks.segmentation_shapes(max_batch=3, max_channels=2, max_side=5), magnitude=magnitudes, dtype=DTYPES
    ),
    real_seed=seeds,
)
def test_skd_hinge_losses(fake: Tensor, real_seed: int) -> None:
    generator = torch.Generator().manual_seed(real_seed)
    scale = fake.double().abs().max()
    real = _cast(torch.randn(fake.shape, generator=generator, dtype=torch.float64) * scale, fake.dtype)
    fake = fake.clone().requires_grad_(True)
    case = _describe(fake)
    generator_loss = skd_generator_hinge_loss(fake)
    grad = _backward_and_check(generator_loss, fake, None, case)
    torch.testing.assert_close(grad, torch.full_like(grad, -1.0 / grad.numel()))  # d(-mean)/dx
    fake.grad = None
    real = real.requires_grad_(True)
    discriminator_loss = skd_discriminator_hinge_loss(real, fake)
    assert discriminator_loss.item() >= 0, case
    grad = _backward_and_check(discriminator_loss, fake, None, case)
    assert ((grad == 0) | (fake.detach() > -1)).all(), f"the hinge passes a gradient below -1 for {case}"


# ---------------------------------------------------------------------------------------------------------
# IFVD, MGD
# ---------------------------------------------------------------------------------------------------------


@given(
    data=pairs(feature_shapes, teacher_channels=st.one_of(st.just(None), st.integers(1, 5))),  # type: ignore[arg-type]
    label_data=st.data(),
    label_scale=st.sampled_from([1, 2, 3]),
    num_classes=st.integers(1, 5),
    reduction=st.sampled_from(["mean", "sum", "none"]),
)
def test_ifvd(
    data: tuple[Tensor, Tensor, str], label_data: st.DataObject, label_scale: int, num_classes: int, reduction: str
) -> None:
    raw_student, raw_teacher, relation = data
    n, _, h, w = raw_student.shape
    labels, kind = label_data.draw(labels_for((n, h * label_scale, w * label_scale), num_classes))
    student, teacher = _leaves(raw_student, raw_teacher)
    case = _describe(
        student, relation, num_classes=num_classes, labels=labels, label_kind=kind, label_scale=label_scale
    )
    loss = ifvd_loss(student, teacher, labels, num_classes, reduction=reduction)  # type: ignore[arg-type]
    assert (loss >= 0).all(), f"negative IFVD for {case}"
    fits = _fits_fp16(lambda s, t: ifvd_loss(s, t, labels, num_classes, reduction=reduction), raw_student, raw_teacher)  # type: ignore[arg-type]
    grad = _backward_and_check(loss, student, teacher, case, finite_grad=fits)
    small = labels[:, ::label_scale, ::label_scale]  # nearest resampling by an integer factor
    ignored = (small == 255).unsqueeze(1).expand_as(grad)
    assert (grad[ignored] == 0).all(), f"ignored pixels get a gradient for {case}"
    if relation == "equal":
        assert (loss == 0).all(), f"equal inputs: non-zero loss for {case}"
        assert (grad == 0).all(), f"equal inputs: non-zero gradient for {case}"


@given(
    data=pairs(feature_shapes, teacher_channels=st.one_of(st.just(None), st.integers(1, 5)), dtypes=MODULE_DTYPES),  # type: ignore[arg-type]
    mask_ratio=st.sampled_from([0.0, 0.5, 0.75, 0.999]),
    alpha=st.sampled_from([2e-5, 1.0]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    mask_seed=seeds,
    init_seed=seeds,
)
def test_mgd(
    data: tuple[Tensor, Tensor, str],
    mask_ratio: float,
    alpha: float,
    reduction: str,
    mask_seed: int,
    init_seed: int,
) -> None:
    raw_student, raw_teacher, relation = data
    dtype = raw_student.dtype
    torch.manual_seed(init_seed)
    criterion = MGDLoss(
        raw_student.shape[1],
        raw_teacher.shape[1],
        alpha,
        mask_ratio,
        generator=torch.Generator().manual_seed(mask_seed),
        reduction=reduction,  # type: ignore[arg-type]
    ).to(dtype)
    student, teacher = _leaves(raw_student, raw_teacher)
    case = _describe(student, relation, mask_ratio=mask_ratio, alpha=alpha, reduction=reduction)
    loss = criterion(student, teacher)
    assert (loss >= 0).all(), f"negative MGD for {case}"
    grad = _backward_and_check(loss, student, teacher, case)
    for parameter in criterion.parameters():
        assert parameter.grad is not None, f"a trainable MGD layer gets no gradient for {case}"
        _check_finite(parameter.grad, "MGD layer gradient", case)
    if criterion.align is None:
        # Positions zeroed by the mask feed nothing forward, so they get exactly zero gradient.
        n, _, h, w = student.shape
        mask = mgd_mask((n, h, w), mask_ratio, dtype=dtype, generator=torch.Generator().manual_seed(mask_seed))
        dropped = (mask == 0).expand_as(grad)
        assert (grad[dropped] == 0).all(), f"masked-out positions get a gradient for {case}"


# ---------------------------------------------------------------------------------------------------------
# CIRKD
# ---------------------------------------------------------------------------------------------------------


@given(
    data=pairs(sks.segmentation_shapes(max_batch=3, max_channels=5, max_side=6), teacher_channels=st.integers(1, 5)),
    tau=st.sampled_from([0.1, 1.0]) | st.floats(0.05, 2.0),
    pool=st.sampled_from([None, 1, 2, 3]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
)
def test_cirkd_minibatch(data: tuple[Tensor, Tensor, str], tau: float, pool: int | None, reduction: str) -> None:
    raw_student, raw_teacher, relation = data
    student, teacher = _leaves(raw_student, raw_teacher)
    case = _describe(student, relation, tau=tau, pool=pool, reduction=reduction)
    loss = cirkd_minibatch_loss(student, teacher, tau, pool, reduction)  # type: ignore[arg-type]
    assert (loss >= 0).all(), f"negative CIRKD mini-batch loss for {case}"
    fits = _fits_fp16(lambda s, t: cirkd_minibatch_loss(s, t, tau, pool, reduction), raw_student, raw_teacher)  # type: ignore[arg-type]
    grad = _backward_and_check(loss, student, teacher, case, finite_grad=fits)
    smallest = _min_vector_norm(raw_student, pool, "avg")
    if relation == "equal" and smallest == 0:
        event("equal inputs with a zero feature vector: zero-gradient check skipped")
    if relation == "equal" and smallest > 0:
        # Same log-softmax on both sides: only the rounding of sum p_T = 1 is left, scaled by 1 / tau and
        # by 1 / |f| through the normalisation. (At an exactly zero vector F.normalize's 1 / eps = 1e12
        # amplifies that rounding: excluded, see docs/reliability.md.)
        bound = _zero_grad_tolerance(student.dtype) / (tau * min(smallest, 1.0))
        assert grad.double().abs().max() <= bound, f"equal inputs give a gradient for {case}"


@given(
    data=pairs(sks.segmentation_shapes(max_batch=3, min_channels=1, max_channels=5, max_side=5)),
    label_data=st.data(),
    label_scale=st.sampled_from([1, 2]),
    num_classes=st.integers(1, 4),
    sizes=st.tuples(st.integers(1, 6), st.integers(1, 6)),
    contrast_tau=st.sampled_from([0.1, 1.0]),
    kd_tau=st.sampled_from([1.0, 4.0]),
    entry_seed=seeds,
)
def test_cirkd_memory_kl(
    data: tuple[Tensor, Tensor, str],
    label_data: st.DataObject,
    label_scale: int,
    num_classes: int,
    sizes: tuple[int, int],
    contrast_tau: float,
    kd_tau: float,
    entry_seed: int,
) -> None:
    raw_student, raw_teacher, relation = data
    n, d, h, w = raw_student.shape
    labels, kind = label_data.draw(labels_for((n, h * label_scale, w * label_scale), num_classes))
    generator = torch.Generator().manual_seed(entry_seed)
    pixels, regions = (torch.nn.functional.normalize(torch.randn(m, d, generator=generator), dim=1) for m in sizes)
    student, teacher = _leaves(raw_student, raw_teacher)
    case = _describe(
        student, relation, labels=labels, label_kind=kind, entries=sizes, contrast_tau=contrast_tau, kd_tau=kd_tau
    )
    p2p, p2r = cirkd_memory_kl(student, teacher, labels, pixels, regions, contrast_tau, kd_tau)
    assert p2p.item() >= 0, f"negative CIRKD pixel-to-pixel loss for {case}"
    assert p2r.item() >= 0, f"negative CIRKD pixel-to-region loss for {case}"

    def both_terms(s: Tensor, t: Tensor) -> Tensor:
        return sum(cirkd_memory_kl(s, t, labels, pixels.double(), regions.double(), contrast_tau, kd_tau))  # type: ignore[return-value]

    fits = _fits_fp16(both_terms, raw_student, raw_teacher)
    grad = _backward_and_check(p2p + p2r, student, teacher, case, finite_grad=fits)
    small = labels[:, ::label_scale, ::label_scale]
    ignored = (small == 255).unsqueeze(1).expand_as(grad)
    assert (grad[ignored] == 0).all(), f"non-anchor pixels get a gradient for {case}"


@given(
    # The projection head's BatchNorm needs more than one value per channel in training mode (PyTorch
    # raises a clear ValueError for one one-pixel image): not a case of the loss, so N * H * W > 1.
    data=pairs(
        sks.segmentation_shapes(max_batch=2, max_channels=4, max_side=4).map(
            lambda s: s if s[0] * s[2] * s[3] > 1 else (s[0], s[1], s[2], 2)
        ),
        teacher_channels=st.integers(1, 4),
        dtypes=MODULE_DTYPES,
    ),
    label_data=st.data(),
    num_classes=st.integers(1, 3),
    memory=st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(1, 6), st.integers(1, 4)),
    steps=st.integers(1, 3),
    module_seed=seeds,
)
def test_cirkd_modules_with_tiny_queues(
    data: tuple[Tensor, Tensor, str],
    label_data: st.DataObject,
    num_classes: int,
    memory: tuple[int, int, int, int],
    steps: int,
    module_seed: int,
) -> None:
    """CIRKDLoss (pixel KD + mini-batch + memory module) over a few training steps with tiny queues."""
    raw_student, raw_teacher, relation = data
    dtype = raw_student.dtype
    n, c_s, h, w = raw_student.shape
    c_t = raw_teacher.shape[1]
    pixel_size, region_size, pixel_contrast, region_contrast = memory
    torch.manual_seed(module_seed)
    criterion = CIRKDLoss(
        num_classes,
        c_s,
        c_t,
        pixel_memory_size=pixel_size,
        region_memory_size=region_size,
        pixel_contrast_size=pixel_contrast,
        region_contrast_size=region_contrast,
        pixel_update_freq=2,
        queue_dtype=dtype,
        generator=torch.Generator().manual_seed(module_seed),
    ).to(dtype)
    generator = torch.Generator().manual_seed(module_seed)
    logits = _cast(torch.randn(n, num_classes, h, w, generator=generator, dtype=torch.float64) * 3, dtype)
    for step in range(steps):
        labels, kind = label_data.draw(labels_for((n, 2 * h, 2 * w), num_classes))
        student, teacher = _leaves(raw_student, raw_teacher)
        student_logits, teacher_logits = _leaves(logits, logits.flip(0))
        case = _describe(student, relation, step=step, labels=labels, label_kind=kind, memory=memory)
        total, terms = criterion(student_logits, teacher_logits, student, teacher, labels)
        for name, value in terms.items():
            _check_finite(value, f"term {name}", case)
        _backward_and_check(total, student, teacher, case)
        assert teacher_logits.grad is None, f"the teacher logits received a gradient for {case}"
        _check_finite(student_logits.grad, "student logit gradient", case)  # type: ignore[arg-type]
        for name, buffer in criterion.named_buffers():
            if "queue" in name and buffer.is_floating_point():
                _check_finite(buffer, name, case)
        for parameter in criterion.parameters():
            if parameter.grad is not None:
                _check_finite(parameter.grad, "projection head gradient", case)
        criterion.zero_grad()


@given(
    data=pairs(sks.segmentation_shapes(max_batch=2, max_channels=4, max_side=4), dtypes=MODULE_DTYPES),
    label_data=st.data(),
    num_classes=st.integers(1, 3),
    module_seed=seeds,
)
def test_cirkd_memory_module_eval_mode(
    data: tuple[Tensor, Tensor, str], label_data: st.DataObject, num_classes: int, module_seed: int
) -> None:
    """In eval mode nothing is enqueued; the loss against the initial random queues stays finite."""
    raw_student, raw_teacher, relation = data
    dtype = raw_student.dtype
    n, c, h, w = raw_student.shape
    torch.manual_seed(module_seed)
    criterion = CIRKDMemoryLoss(
        num_classes, c, c, 3, 2, 4, 2, queue_dtype=dtype, generator=torch.Generator().manual_seed(module_seed)
    ).to(dtype)
    criterion.eval()
    before = criterion.pixel_queue.clone()
    labels, kind = label_data.draw(labels_for((n, h, w), num_classes))
    student, teacher = _leaves(raw_student, raw_teacher)
    case = _describe(student, relation, labels=labels, label_kind=kind)
    p2p, p2r = criterion(student, teacher, labels)
    _backward_and_check(p2p + p2r, student, teacher, case)
    assert torch.equal(before, criterion.pixel_queue), f"eval mode changed the queue for {case}"
