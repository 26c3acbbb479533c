"""SKD: pair-wise, pixel-wise and adversarial terms against plain-Python float64 loops written from the formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from segkd.losses.adversarial import (
    SKDDiscriminator,
    _SelfAttention,
    skd_discriminator_hinge_loss,
    skd_generator_hinge_loss,
)
from segkd.losses.kd import KDLoss, pixel_kd_loss
from segkd.losses.skd import SKDLoss, skd_pairwise_loss
from segkd.testing import strategies as sks
from segkd.testing.checks import check_distillation_loss
from segkd.testing.reference.skd import (
    pixel_kd_loss_reference,
    skd_discriminator_hinge_loss_reference,
    skd_generator_hinge_loss_reference,
    skd_pairwise_loss_reference,
)

# --------------------------------------------------------------------------------------------------
# Loop references (plain Python floats)
# --------------------------------------------------------------------------------------------------


def _loop_pool_normalise(feat, pool):
    """One image (C, H, W) -> list of unit vectors, one per pooled cell, row-major; zero stays zero."""
    channels, height, width = feat.shape
    vectors = []
    for r in range(0, height, pool):
        for c in range(0, width, pool):
            vec = []
            for k in range(channels):
                cell = [
                    float(feat[k, i, j])
                    for i in range(r, min(r + pool, height))
                    for j in range(c, min(c + pool, width))
                ]
                vec.append(max(cell))
            norm = math.sqrt(sum(v * v for v in vec))
            vectors.append([v / max(norm, 1e-12) for v in vec])
    return vectors


def _loop_pairwise(student, teacher, pool=2, reduction="mean"):
    terms = []
    for n in range(student.shape[0]):
        vs = _loop_pool_normalise(student[n].double(), pool)
        vt = _loop_pool_normalise(teacher[n].double(), pool)
        for i in range(len(vs)):
            for j in range(len(vs)):
                sim_s = sum(a * b for a, b in zip(vs[i], vs[j], strict=True))
                sim_t = sum(a * b for a, b in zip(vt[i], vt[j], strict=True))
                terms.append((sim_s - sim_t) ** 2)
    return sum(terms) / len(terms) if reduction == "mean" else sum(terms)


def _loop_pixel_kd(student, teacher, tau=1.0, labels=None, ignore_index=255):
    """Returns (sum over kept pixels of tau^2 KL, number of kept pixels)."""
    n_img, channels, height, width = student.shape
    total, kept = 0.0, 0
    for n in range(n_img):
        for h in range(height):
            for w in range(width):
                if labels is not None and int(labels[n, h, w]) == ignore_index:
                    continue
                kept += 1
                zs = [float(student[n, c, h, w]) / tau for c in range(channels)]
                zt = [float(teacher[n, c, h, w]) / tau for c in range(channels)]
                lse_s = max(zs) + math.log(sum(math.exp(v - max(zs)) for v in zs))
                lse_t = max(zt) + math.log(sum(math.exp(v - max(zt)) for v in zt))
                kl = sum(math.exp(t - lse_t) * ((t - lse_t) - (s - lse_s)) for s, t in zip(zs, zt, strict=True))
                total += tau * tau * kl
    return total, kept


def _randn(*shape, seed=0, dtype=torch.float64, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=gen, dtype=dtype)


def _labels(n, h, w, num_classes, seed=0, ignore_fraction=0.3):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n, h, w), generator=gen)
    labels[torch.rand(n, h, w, generator=gen) < ignore_fraction] = 255
    return labels


# --------------------------------------------------------------------------------------------------
# Pair-wise
# --------------------------------------------------------------------------------------------------

PAIRWISE_CASES = [
    ((2, 3, 4, 4), 5, 2),
    ((2, 3, 5, 7), 4, 2),  # odd sizes: ceil-mode cells at the border
    ((1, 2, 3, 3), 6, 1),  # no pooling
    ((2, 4, 7, 5), 4, 3),
    ((1, 3, 1, 1), 2, 2),  # one pixel
    ((1, 1, 4, 2), 1, 2),  # one channel
]


@pytest.mark.parametrize(("student_shape", "teacher_channels", "pool"), PAIRWISE_CASES, ids=str)
def test_pairwise_matches_loop_reference(student_shape, teacher_channels, pool):
    n, _, h, w = student_shape
    student = _randn(*student_shape, seed=1)
    teacher = _randn(n, teacher_channels, h, w, seed=2)
    for reduction in ("mean", "sum"):
        expected = _loop_pairwise(student, teacher, pool, reduction)
        got = skd_pairwise_loss(student, teacher, pool=pool, reduction=reduction)
        assert got.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)
        assert skd_pairwise_loss_reference(student, teacher, pool, reduction).item() == pytest.approx(
            expected, rel=1e-10, abs=1e-12
        )
    cells = math.ceil(h / pool) * math.ceil(w / pool)
    none = skd_pairwise_loss(student, teacher, pool=pool, reduction="none")
    assert none.shape == (n, cells, cells)
    torch.testing.assert_close(none, skd_pairwise_loss_reference(student, teacher, pool, "none"))


def test_pairwise_relu_features_with_zero_vectors():
    # ReLU features: some pooled positions are exactly zero in every channel.
    student = F.relu(_randn(2, 3, 4, 4, seed=3))
    teacher = F.relu(_randn(2, 5, 4, 4, seed=4))
    student[0, :, :2, :2] = 0.0
    teacher[1, :, 2:, :] = 0.0
    got = skd_pairwise_loss(student, teacher)
    assert got.item() == pytest.approx(_loop_pairwise(student, teacher), rel=1e-10)
    student.requires_grad_(True)
    skd_pairwise_loss(student, teacher).backward()
    assert torch.isfinite(student.grad).all()


def _features_with_zero_cells(shape, seed, zero_cells, pool):
    """Positive features (no ties inside a cell) with the given ``(n, row, col)`` pooled cells exactly zero."""
    feat = _randn(*shape, seed=seed).abs() + 0.1
    for n, r, c in zero_cells:
        feat[n, :, r * pool : (r + 1) * pool, c * pool : (c + 1) * pool] = 0.0
    return feat


def _pairwise_gradient_bound(student, pool):
    """Per element: 8 / (N P |u|), with u the pooled vector the element belongs to and P the pooled positions.

    dL/dA_ij = 2 (A_S - A_T)_ij / (N P^2) with |A_S - A_T| <= 2, so dL/du_hat_i (P terms j, each for A_ij and
    A_ji, |u_hat_j| <= 1) is at most 8 / (N P); the normalisation's Jacobian (I - u_hat u_hat^T) / |u| has norm
    1 / |u|, and the max pooling hands each pooled value's gradient to one element.
    """
    n, _, h, w = student.shape
    pooled = F.max_pool2d(student.double(), pool, pool, ceil_mode=True)
    positions = pooled.shape[2] * pooled.shape[3]
    norms = torch.linalg.vector_norm(pooled, dim=1, keepdim=True)
    norms = norms.repeat_interleave(pool, dim=2).repeat_interleave(pool, dim=3)[:, :, :h, :w]
    return 8.0 / (n * positions * norms)  # inf at zero vectors: no bound needed, their gradient is 0


@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=["fp64", "fp32", "fp16", "bf16"]
)
@pytest.mark.parametrize("pool", [1, 2])
def test_pairwise_zero_vectors_pass_no_gradient_and_the_rest_is_bounded(dtype, pool):
    # Student and teacher with exactly zero pooled vectors (as after a ReLU). Before the fix the student's zero
    # vectors got ~1e12 x the upstream gradient (F.normalize's 1 / eps): inf in fp16.
    student = _features_with_zero_cells((2, 3, 4, 6), 20, [(0, 0, 0), (0, 1, 2), (1, 1, 1)], pool).to(dtype)
    teacher = _features_with_zero_cells((2, 5, 4, 6), 21, [(0, 0, 0), (1, 0, 2)], pool).to(dtype)
    leaf = student.clone().requires_grad_(True)
    loss = skd_pairwise_loss(leaf, teacher, pool=pool)
    loss.backward()
    # The value is the formula's (a zero vector normalises to zero), computed in fp32 for half inputs.
    assert loss.item() == pytest.approx(
        _loop_pairwise(student, teacher, pool), rel=1e-10 if dtype == torch.float64 else 1e-5
    )
    grad = leaf.grad.double()
    assert torch.isfinite(grad).all()
    zero = (F.max_pool2d(student.double(), pool, pool, ceil_mode=True) == 0).all(dim=1, keepdim=True)
    zero = zero.repeat_interleave(pool, dim=2).repeat_interleave(pool, dim=3)[:, :, :4, :6].expand_as(grad)
    assert (grad[zero] == 0).all()
    assert (grad.abs() <= _pairwise_gradient_bound(student, pool) * 1.01).all()  # 1%: the fp16/bf16 rounding
    # Elsewhere the gradient is unchanged: the float64 reference's (a zero vector's own gradient there is NaN).
    exact = student.double().requires_grad_(True)
    skd_pairwise_loss_reference(exact, teacher.double(), pool).backward()
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(grad[~zero], exact.grad[~zero], rtol=tol, atol=tol * exact.grad[~zero].abs().max())


@pytest.mark.skipif(not torch.amp.is_autocast_available("cpu"), reason="no CPU autocast")
def test_pairwise_under_bfloat16_autocast_is_float32_with_zero_vectors():
    student = _features_with_zero_cells((2, 3, 4, 4), 22, [(0, 0, 0), (1, 1, 0)], 2).float()
    teacher = _features_with_zero_cells((2, 4, 4, 4), 23, [(1, 0, 1)], 2).float()
    plain, under = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    want = skd_pairwise_loss(plain, teacher)
    want.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = skd_pairwise_loss(under, teacher)
        bf16 = skd_pairwise_loss(student.bfloat16().requires_grad_(True), teacher.bfloat16())
    got.backward()
    assert got.dtype == bf16.dtype == torch.float32  # the similarities are not run in bf16 by autocast
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(under.grad, plain.grad)
    assert torch.isfinite(bf16)
    assert (under.grad[0, :, :2, :2] == 0).all()


def test_pairwise_zero_for_identical_and_scaled_features():
    feat = _randn(2, 4, 6, 5, seed=5)
    assert skd_pairwise_loss(feat, feat.clone()).item() == pytest.approx(0.0, abs=1e-14)
    # Only directions matter: a positive scale per pooled position changes nothing.
    scale = torch.rand(2, 1, 6, 5, dtype=torch.float64) + 0.5
    pooled_equal = F.max_pool2d(feat * 3.0, 2, 2, ceil_mode=True)
    assert skd_pairwise_loss(feat * 3.0, feat).item() == pytest.approx(0.0, abs=1e-14)
    assert pooled_equal.shape == (2, 4, 3, 3)
    assert skd_pairwise_loss(feat * scale, feat, pool=1).item() == pytest.approx(0.0, abs=1e-14)


def test_pairwise_single_pixel_is_zero_with_finite_gradient():
    student = _randn(2, 3, 1, 1, seed=6).requires_grad_(True)
    teacher = _randn(2, 7, 1, 1, seed=7)
    loss = skd_pairwise_loss(student, teacher)
    assert loss.item() == pytest.approx(0.0, abs=1e-14)  # both 1 x 1 matrices hold 1
    loss.backward()
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize("pool", [1, 2])
def test_pairwise_gradcheck(pool):
    student = _randn(1, 2, 3, 3, seed=8).requires_grad_(True)
    teacher = _randn(1, 3, 3, 3, seed=9)
    assert torch.autograd.gradcheck(lambda s: skd_pairwise_loss(s, teacher, pool=pool), (student,))


def test_pairwise_gradient_matches_reference():
    student = _randn(2, 3, 3, 4, seed=10)
    teacher = _randn(2, 2, 3, 4, seed=11)
    mine, ref = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    skd_pairwise_loss(mine, teacher).backward()
    skd_pairwise_loss_reference(ref, teacher).backward()
    torch.testing.assert_close(mine.grad, ref.grad)


def test_pairwise_teacher_gets_no_gradient_and_float32():
    student = _randn(2, 3, 4, 4, seed=12, dtype=torch.float32).requires_grad_(True)
    teacher = _randn(2, 6, 4, 4, seed=13, dtype=torch.float32).requires_grad_(True)
    loss = skd_pairwise_loss(student, teacher)
    loss.backward()
    assert teacher.grad is None
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(_loop_pairwise(student.detach(), teacher.detach()), rel=1e-5)


def test_pairwise_battery():
    report = check_distillation_loss(
        lambda s, t: skd_pairwise_loss(s, t, pool=2),
        (2, 3, 3, 5),
        teacher_shape=(2, 4, 3, 5),
        reference=lambda s, t: skd_pairwise_loss_reference(s, t, 2),
    )
    assert "reference_gradient" in report.passed
    assert "teacher_graph" in report.passed


@pytest.mark.parametrize(
    ("student", "teacher", "kwargs", "error", "match"),
    [
        (torch.randn(2, 3, 4), torch.randn(2, 3, 4), {}, ValueError, r"`student_feat` to have 4 dimensions"),
        (torch.randn(2, 3, 4, 4), torch.randn(3, 3, 4, 4), {}, ValueError, r"except in dimension 1 \(channels\)"),
        (torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 6), {}, ValueError, r"got \(2, 3, 4, 4\) and \(2, 5, 4, 6\)"),
        (torch.randint(0, 2, (1, 2, 2, 2)), torch.randn(1, 2, 2, 2), {}, TypeError, "`student_feat`.*floating"),
        (torch.randn(1, 2, 2, 2), torch.randn(1, 2, 2, 2), {"pool": 0}, ValueError, "`pool`"),
        (torch.randn(1, 2, 2, 2), torch.randn(1, 2, 2, 2), {"pool": 1.5}, TypeError, "`pool`"),
        (torch.randn(1, 2, 2, 2), torch.randn(1, 2, 2, 2), {"reduction": "avg"}, ValueError, "`reduction`"),
        (torch.randn(1, 0, 2, 2), torch.randn(1, 2, 2, 2), {}, ValueError, "non-empty"),
    ],
    ids=["3d", "batch", "spatial", "int", "pool0", "pool-float", "reduction", "empty"],
)
def test_pairwise_bad_inputs(student, teacher, kwargs, error, match):
    with pytest.raises(error, match=match):
        skd_pairwise_loss(student, teacher, **kwargs)


# --------------------------------------------------------------------------------------------------
# Pixel-wise
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [1.0, 2.5])
@pytest.mark.parametrize("with_labels", [False, True])
@pytest.mark.parametrize("shape", [(2, 4, 3, 5), (1, 1, 2, 2), (1, 3, 1, 1), (3, 19, 2, 1)], ids=str)
def test_pixel_kd_matches_loop_reference(shape, with_labels, tau):
    n, c, h, w = shape
    student, teacher = _randn(*shape, seed=20, scale=3.0), _randn(*shape, seed=21, scale=3.0)
    labels = _labels(n, h, w, c, seed=22) if with_labels else None
    total, kept = _loop_pixel_kd(student, teacher, tau, labels)
    mean = pixel_kd_loss(student, teacher, tau=tau, labels=labels)
    assert mean.item() == pytest.approx(total / max(kept, 1), rel=1e-10, abs=1e-12)
    assert pixel_kd_loss(student, teacher, tau, labels, reduction="sum").item() == pytest.approx(total, rel=1e-10)
    none = pixel_kd_loss(student, teacher, tau, labels, reduction="none")
    assert none.shape == (n, h, w)
    assert none.sum().item() == pytest.approx(total, rel=1e-10, abs=1e-12)
    if labels is not None:
        assert torch.all(none[labels == 255] == 0)
    for reduction in ("mean", "sum", "none"):
        torch.testing.assert_close(
            pixel_kd_loss(student, teacher, tau, labels, reduction=reduction),
            pixel_kd_loss_reference(student, teacher, tau, labels, reduction=reduction),
        )


def test_pixel_kd_equals_batchmean_kl_without_labels():
    # The CIRKD formula: F.kl_div(log p_S, p_T, "batchmean") over N * H * W rows, times tau^2.
    student, teacher = _randn(2, 5, 3, 4, seed=23), _randn(2, 5, 3, 4, seed=24)
    rows_s = student.permute(0, 2, 3, 1).reshape(-1, 5) / 2.0
    rows_t = teacher.permute(0, 2, 3, 1).reshape(-1, 5) / 2.0
    expected = F.kl_div(F.log_softmax(rows_s, 1), F.softmax(rows_t, 1), reduction="batchmean") * 4.0
    assert pixel_kd_loss(student, teacher, tau=2.0).item() == pytest.approx(expected.item(), rel=1e-12)


def test_pixel_kd_all_ignored_is_finite_zero():
    student = _randn(2, 3, 4, 4, seed=25).requires_grad_(True)
    teacher = _randn(2, 3, 4, 4, seed=26)
    labels = torch.full((2, 4, 4), 255)
    loss = pixel_kd_loss(student, teacher, labels=labels)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))
    assert pixel_kd_loss(student, teacher, labels=labels, reduction="sum").item() == 0.0
    labels[0, 0, 0] = 7  # any value other than ignore_index is kept, even >= C
    total, kept = _loop_pixel_kd(student.detach(), teacher, labels=labels)
    assert kept == 1
    assert pixel_kd_loss(student, teacher, labels=labels).item() == pytest.approx(total, rel=1e-10)


def test_pixel_kd_custom_ignore_index():
    student, teacher = _randn(1, 3, 2, 3, seed=27), _randn(1, 3, 2, 3, seed=28)
    labels = torch.tensor([[[0, -1, 2], [-1, 1, 1]]])
    total, kept = _loop_pixel_kd(student, teacher, labels=labels, ignore_index=-1)
    assert kept == 4
    got = pixel_kd_loss(student, teacher, labels=labels, ignore_index=-1)
    assert got.item() == pytest.approx(total / kept, rel=1e-10)


def test_pixel_kd_degenerate_inputs():
    logits = _randn(2, 4, 3, 3, seed=29)
    assert pixel_kd_loss(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-14)
    one_class = _randn(2, 1, 3, 3, seed=30).requires_grad_(True)
    loss = pixel_kd_loss(one_class, _randn(2, 1, 3, 3, seed=31))
    assert loss.item() == 0.0  # a single class: both distributions are 1
    loss.backward()
    assert torch.isfinite(one_class.grad).all()
    big_s = _randn(2, 4, 3, 3, seed=32, dtype=torch.float32, scale=1e4).requires_grad_(True)
    big = pixel_kd_loss(big_s, _randn(2, 4, 3, 3, seed=33, dtype=torch.float32, scale=1e4))
    big.backward()
    assert torch.isfinite(big)
    assert torch.isfinite(big_s.grad).all()


def test_pixel_kd_gradcheck_with_labels():
    student = _randn(1, 3, 2, 3, seed=34).requires_grad_(True)
    teacher = _randn(1, 3, 2, 3, seed=35)
    labels = torch.tensor([[[0, 255, 2], [1, 1, 255]]])
    assert torch.autograd.gradcheck(lambda s: pixel_kd_loss(s, teacher, 2.0, labels), (student,))
    assert torch.autograd.gradcheck(lambda s: pixel_kd_loss(s, teacher, 0.5, reduction="none"), (student,))


def test_pixel_kd_battery_with_labels():
    report = check_distillation_loss(
        KDLoss(tau=2.0),
        (2, 4, 3, 3),
        with_labels=True,
        num_classes=4,
        zero_at_equal=True,
        pixel_shift_invariant=True,
        reference=lambda s, t, y: pixel_kd_loss_reference(s, t, 2.0, y),
    )
    assert {"gradcheck", "zero_at_equal", "pixel_shift_invariant", "reference"} <= set(report.passed)


def test_kd_module_equals_function_and_half_precision():
    student, teacher = _randn(2, 4, 3, 3, seed=36), _randn(2, 4, 3, 3, seed=37)
    labels = _labels(2, 3, 3, 4, seed=38)
    criterion = KDLoss(tau=3.0, ignore_index=255, reduction="sum")
    assert torch.equal(criterion(student, teacher, labels), pixel_kd_loss(student, teacher, 3.0, labels, 255, "sum"))
    assert torch.equal(KDLoss()(student, teacher), pixel_kd_loss(student, teacher))
    assert not list(criterion.parameters())
    assert "tau=3.0" in repr(criterion)
    half = pixel_kd_loss(student.half(), teacher.half())
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(
        pixel_kd_loss(student.half().double(), teacher.half().double()).item(), rel=1e-5
    )


def test_pixel_kd_teacher_gets_no_gradient():
    student = _randn(1, 3, 2, 2, seed=39).requires_grad_(True)
    teacher = _randn(1, 3, 2, 2, seed=40).requires_grad_(True)
    pixel_kd_loss(student, teacher).backward()
    assert teacher.grad is None


@pytest.mark.parametrize(
    ("labels", "kwargs", "error", "match"),
    [
        (torch.zeros(2, 3, 5, dtype=torch.long), {}, ValueError, r"`labels` to have shape \(2, 3, 4\)"),
        (torch.zeros(2, 3, 4), {}, TypeError, "`labels` to have an integer dtype"),
        (torch.zeros(2, 1, 3, 4, dtype=torch.long), {}, ValueError, "`labels` to have 3 dimensions"),
        (torch.zeros(3, 3, 4, dtype=torch.long), {}, ValueError, "batch size 2"),
        (torch.zeros(2, 3, 4, dtype=torch.bool), {}, TypeError, "integer dtype"),
        (torch.zeros(2, 3, 4, dtype=torch.long), {"ignore_index": 2.5}, TypeError, "`ignore_index`"),
        (None, {"tau": 0.0}, ValueError, "`tau`"),
        (None, {"reduction": "batchmean"}, ValueError, "`reduction`"),
    ],
    ids=[
        "labels-shape",
        "labels-float",
        "labels-4d",
        "labels-batch",
        "labels-bool",
        "ignore-float",
        "tau",
        "reduction",
    ],
)
def test_pixel_kd_bad_arguments(labels, kwargs, error, match):
    student, teacher = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4)
    with pytest.raises(error, match=match):
        pixel_kd_loss(student, teacher, labels=labels, **kwargs)


@pytest.mark.parametrize(
    ("student", "teacher", "match"),
    [
        (torch.randn(2, 5, 3, 4), torch.randn(2, 4, 3, 4), r"same shape, got \(2, 5, 3, 4\) and \(2, 4, 3, 4\)"),
        (torch.randn(2, 5, 3), torch.randn(2, 5, 3), "at least 4 dimensions"),
        (torch.randn(2, 5, 3, 4, 1), torch.randn(2, 5, 3, 4, 1), "`student` to have 4 dimensions"),
    ],
    ids=["mismatch", "3d", "5d"],
)
def test_pixel_kd_bad_logits(student, teacher, match):
    with pytest.raises(ValueError, match=match):
        pixel_kd_loss(student, teacher)
    with pytest.raises(ValueError, match=match):
        KDLoss()(student, teacher)


@given(batch=sks.segmentation_batches(sks.segmentation_shapes(max_batch=2, max_channels=5, max_side=4)))
def test_pixel_kd_properties(batch):
    student, teacher, labels = batch
    loss = pixel_kd_loss(student, teacher, labels=labels)
    assert torch.isfinite(loss)
    assert loss.item() >= -1e-5  # KL >= 0 up to rounding
    assert pixel_kd_loss(teacher, teacher, labels=labels).item() == pytest.approx(0.0, abs=1e-5)


# --------------------------------------------------------------------------------------------------
# Hinge losses
# --------------------------------------------------------------------------------------------------


def test_generator_hinge_is_negated_mean():
    scores = torch.tensor([[0.5, -1.5], [2.0, 1.0]], requires_grad=True)
    loss = skd_generator_hinge_loss(scores)
    assert loss.item() == pytest.approx(-(0.5 - 1.5 + 2.0 + 1.0) / 4)
    assert loss.item() == pytest.approx(skd_generator_hinge_loss_reference(scores.detach()).item())
    loss.backward()
    assert torch.equal(scores.grad, torch.full((2, 2), -0.25))


def test_discriminator_hinge_hand_values():
    real = torch.tensor([2.0, 1.0, 0.5, -1.0], requires_grad=True)
    fake = torch.tensor([-3.0, -1.0, 0.0, 0.5], requires_grad=True)
    # relu(1 - real) = [0, 0, 0.5, 2] -> 0.625; relu(1 + fake) = [0, 0, 1, 1.5] -> 0.625
    loss = skd_discriminator_hinge_loss(real, fake)
    assert loss.item() == pytest.approx(1.25)
    assert loss.item() == pytest.approx(skd_discriminator_hinge_loss_reference(real.detach(), fake.detach()).item())
    loss.backward()
    # Gradient: -1/4 where 1 - real > 0, +1/4 where 1 + fake > 0 (0 on the flat side).
    assert torch.equal(real.grad, torch.tensor([0.0, 0.0, -0.25, -0.25]))
    assert torch.equal(fake.grad, torch.tensor([0.0, 0.0, 0.25, 0.25]))


@given(
    real=st.lists(st.floats(-5, 5), min_size=1, max_size=8),
    fake=st.lists(st.floats(-5, 5), min_size=1, max_size=8),
)
def test_hinge_losses_against_reference(real, fake):
    size = min(len(real), len(fake))
    r = torch.tensor(real[:size], dtype=torch.float64)
    f = torch.tensor(fake[:size], dtype=torch.float64)
    assert skd_discriminator_hinge_loss(r, f).item() == pytest.approx(
        skd_discriminator_hinge_loss_reference(r, f).item(), abs=1e-12
    )
    assert skd_generator_hinge_loss(f).item() == pytest.approx(skd_generator_hinge_loss_reference(f).item(), abs=1e-12)


def test_hinge_bad_inputs():
    with pytest.raises(ValueError, match=r"`real_scores` and `fake_scores` to have the same shape"):
        skd_discriminator_hinge_loss(torch.zeros(2, 1, 1, 1), torch.zeros(3, 1, 1, 1))
    with pytest.raises(TypeError, match=r"`fake_scores`.*floating"):
        skd_generator_hinge_loss(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="`fake_scores` to be non-empty"):
        skd_generator_hinge_loss(torch.zeros(0))
    with pytest.raises(TypeError, match=r"`real_scores` to be a torch\.Tensor"):
        skd_discriminator_hinge_loss([1.0], torch.zeros(1))


# --------------------------------------------------------------------------------------------------
# Discriminator
# --------------------------------------------------------------------------------------------------


def test_self_attention_matches_formula():
    torch.manual_seed(0)
    block = _SelfAttention(16).double()
    x = _randn(2, 16, 3, 2, seed=41)
    torch.testing.assert_close(block(x), x)  # gamma starts at 0: the block is the identity
    with torch.no_grad():
        block.gamma.fill_(0.7)
    q = torch.einsum("oc,nci->noi", block.query.weight[:, :, 0, 0], x.flatten(2)) + block.query.bias[None, :, None]
    k = torch.einsum("oc,nci->noi", block.key.weight[:, :, 0, 0], x.flatten(2)) + block.key.bias[None, :, None]
    v = torch.einsum("oc,nci->noi", block.value.weight[:, :, 0, 0], x.flatten(2)) + block.value.bias[None, :, None]
    attention = torch.softmax(torch.einsum("nci,ncj->nij", q, k), dim=2)  # query i attends to keys j
    expected = x + 0.7 * torch.einsum("ncj,nij->nci", v, attention).reshape(x.shape)
    torch.testing.assert_close(block(x), expected)
    assert q.shape[1] == 2  # channels // 8


@pytest.mark.parametrize(("height", "width", "out"), [(64, 64, (1, 1)), (64, 96, (1, 3)), (97, 80, (3, 2))])
def test_discriminator_output_shape(height, width, out):
    torch.manual_seed(0)
    disc = SKDDiscriminator(num_classes=3, conv_dim=2)
    scores = disc(torch.randn(2, 3, height, width))
    assert scores.shape == (2, 1, *out)
    assert torch.isfinite(scores).all()


def test_discriminator_parts_and_state_dict():
    torch.manual_seed(0)
    disc = SKDDiscriminator(num_classes=5, conv_dim=4)
    keys = set(disc.state_dict())
    assert "preprocess.running_mean" in keys  # BatchNorm over the classes
    assert "layer1.0.parametrizations.weight.original" in keys  # spectral norm
    assert "layer4.0.parametrizations.weight.0._u" in keys
    assert "attn1.gamma" in keys
    assert "attn2.gamma" in keys
    assert "last.weight" in keys  # the output convolution has no spectral norm, as in the original
    assert disc.attn1.value.in_channels == 16
    assert disc.attn2.value.in_channels == 32
    plain = SKDDiscriminator(num_classes=5, conv_dim=4, preprocess="tanh", spectral_norm=False)
    assert "layer1.0.weight" in plain.state_dict()
    assert isinstance(plain.preprocess, nn.Tanh)
    assert "spectral_norm=False" in repr(plain)


def test_discriminator_spectral_norm_bounds_the_weights():
    torch.manual_seed(0)
    disc = SKDDiscriminator(num_classes=3, conv_dim=4)
    x = torch.randn(1, 3, 64, 64)
    for _ in range(15):  # one power iteration per training-mode forward
        disc(x)
    for layer in (disc.layer1, disc.layer2, disc.layer3, disc.layer4):
        weight = layer[0].weight  # the normalised weight
        sigma = torch.linalg.matrix_norm(weight.reshape(weight.shape[0], -1), ord=2)
        assert sigma.item() == pytest.approx(1.0, rel=1e-3)


def test_discriminator_bad_inputs():
    disc = SKDDiscriminator(num_classes=3, conv_dim=2)
    with pytest.raises(ValueError, match=r"at least 64 x 64.*got shape \(1, 3, 63, 64\)"):
        disc(torch.randn(1, 3, 63, 64))
    with pytest.raises(ValueError, match=r"3 channels in dimension 1 \(num_classes=3\)"):
        disc(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match="`logits` to have 4 dimensions"):
        disc(torch.randn(3, 64, 64))
    with pytest.raises(TypeError, match=r"`logits`.*floating"):
        disc(torch.zeros(1, 3, 64, 64, dtype=torch.long))
    with pytest.raises(ValueError, match="`preprocess`"):
        SKDDiscriminator(3, preprocess="bn")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`num_classes`"):
        SKDDiscriminator(0)
    with pytest.raises(TypeError, match="`conv_dim`"):
        SKDDiscriminator(3, conv_dim=8.0)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# SKDLoss
# --------------------------------------------------------------------------------------------------


def _skd_inputs(seed=0, n=2, classes=3, size=64, feat_size=8):
    student_logits = _randn(n, classes, size, size, seed=seed, dtype=torch.float32)
    teacher_logits = _randn(n, classes, size, size, seed=seed + 1, dtype=torch.float32)
    student_feat = _randn(n, 4, feat_size, feat_size, seed=seed + 2, dtype=torch.float32)
    teacher_feat = _randn(n, 6, feat_size, feat_size, seed=seed + 3, dtype=torch.float32)
    return student_logits, teacher_logits, student_feat, teacher_feat


def test_skd_loss_is_weighted_sum_of_terms():
    torch.manual_seed(0)
    skd = SKDLoss(num_classes=3, pairwise_weight=2.0, pixel_weight=0.5, adversarial_weight=0.3, conv_dim=2).eval()
    s_logits, t_logits, s_feat, t_feat = _skd_inputs()
    labels = _labels(2, 64, 64, 3, seed=5)
    loss, terms = skd(s_logits, t_logits, s_feat, t_feat, labels)
    pairwise = skd_pairwise_loss(s_feat, t_feat, pool=2)
    pixel = pixel_kd_loss(s_logits, t_logits, labels=labels)
    adversarial = skd_generator_hinge_loss(skd.discriminator(s_logits))  # eval mode: deterministic
    assert set(terms) == {"pairwise", "pixel", "adversarial"}
    torch.testing.assert_close(terms["pairwise"], pairwise)
    torch.testing.assert_close(terms["pixel"], pixel)
    torch.testing.assert_close(terms["adversarial"], adversarial)
    torch.testing.assert_close(loss, 2.0 * pairwise + 0.5 * pixel + 0.3 * adversarial)
    assert all(not t.requires_grad for t in terms.values())


def test_skd_loss_defaults_are_the_paper_weights():
    skd = SKDLoss(num_classes=19)
    assert (skd.pairwise_weight, skd.pixel_weight, skd.adversarial_weight, skd.discriminator_weight) == (
        10.0,
        1.0,
        0.001,
        0.1,
    )
    assert (skd.pool, skd.tau, skd.ignore_index, skd.discriminator.conv_dim) == (2, 1.0, 255, 64)
    names = [name for name, _ in skd.named_parameters()]
    assert names
    assert all(name.startswith("discriminator.") for name in names)
    assert all(key.startswith("discriminator.") for key in skd.state_dict())


def test_skd_zero_weights_skip_their_terms():
    # Small logits would fail the discriminator: with both adversarial weights 0 it is never called.
    skd = SKDLoss(num_classes=3, adversarial_weight=0.0, discriminator_weight=0.0, conv_dim=2)
    s_logits, t_logits, s_feat, t_feat = _skd_inputs(size=8)
    loss, terms = skd(s_logits, t_logits, s_feat, t_feat)
    assert terms["adversarial"].item() == 0.0
    torch.testing.assert_close(loss, 10.0 * terms["pairwise"] + terms["pixel"])
    assert skd.discriminator_loss(s_logits, t_logits).item() == 0.0
    pixel_only = SKDLoss(num_classes=3, pairwise_weight=0.0, adversarial_weight=0.0, conv_dim=2)
    loss, terms = pixel_only(s_logits, t_logits, s_feat, t_feat[:, :, :4])  # features not used
    assert terms["pairwise"].item() == 0.0
    torch.testing.assert_close(loss, pixel_kd_loss(s_logits, t_logits))


def test_discriminator_loss_value_and_no_gradient_to_student():
    torch.manual_seed(0)
    skd = SKDLoss(num_classes=3, discriminator_weight=0.25, conv_dim=2).eval()
    s_logits, t_logits, _, _ = _skd_inputs(seed=3)
    s_logits.requires_grad_(True)
    d_loss = skd.discriminator_loss(s_logits, t_logits)
    expected = 0.25 * skd_discriminator_hinge_loss(skd.discriminator(t_logits), skd.discriminator(s_logits))
    torch.testing.assert_close(d_loss, expected)
    d_loss.backward()
    assert s_logits.grad is None
    assert all(p.grad is not None for p in skd.discriminator.parameters() if p.requires_grad)


def test_two_optimizer_training_step_updates_both_parameter_sets():
    torch.manual_seed(0)
    backbone, head = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 3, 1)
    student_params = [*backbone.parameters(), *head.parameters()]
    skd = SKDLoss(num_classes=3, conv_dim=2)
    opt_student = torch.optim.SGD(student_params, lr=0.1)
    opt_disc = torch.optim.Adam(skd.discriminator.parameters(), lr=1e-2, betas=(0.9, 0.99))
    before_student = [p.detach().clone() for p in student_params]
    before_disc = {k: v.detach().clone() for k, v in skd.discriminator.named_parameters()}
    images = torch.randn(2, 3, 64, 64)
    teacher_logits = torch.randn(2, 3, 64, 64, requires_grad=True)  # requires_grad only to check detaching
    teacher_feat = torch.randn(2, 5, 64, 64, requires_grad=True)
    labels = _labels(2, 64, 64, 3, seed=6)

    student_feat = backbone(images)
    student_logits = head(student_feat)
    loss, _ = skd(student_logits, teacher_logits, student_feat, teacher_feat, labels)
    opt_student.zero_grad()
    loss.backward()
    opt_student.step()
    student_grads = [p.grad.clone() for p in student_params]
    d_loss = skd.discriminator_loss(student_logits, teacher_logits)
    opt_disc.zero_grad()
    d_loss.backward()
    opt_disc.step()

    assert all(not torch.equal(a, b) for a, b in zip(before_student, student_params, strict=True))
    changed = [k for k, v in skd.discriminator.named_parameters() if not torch.equal(v, before_disc[k])]
    assert any(k.startswith("layer1") for k in changed)
    assert "last.weight" in changed
    # The discriminator step gives no gradient to the student, nor any step to the teacher.
    assert all(torch.equal(p.grad, g) for p, g in zip(student_params, student_grads, strict=True))
    assert teacher_logits.grad is None
    assert teacher_feat.grad is None
    assert torch.isfinite(loss)
    assert torch.isfinite(d_loss)


def test_skd_state_dict_round_trip():
    torch.manual_seed(0)
    trained = SKDLoss(num_classes=3, conv_dim=2)
    s_logits, t_logits, s_feat, t_feat = _skd_inputs(seed=7)
    trained.discriminator_loss(s_logits, t_logits).backward()  # moves BN statistics and SN vectors
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01)
    fresh = SKDLoss(num_classes=3, conv_dim=2)
    fresh.load_state_dict(trained.state_dict())
    trained.eval()
    fresh.eval()
    torch.testing.assert_close(
        fresh(s_logits, t_logits, s_feat, t_feat)[0], trained(s_logits, t_logits, s_feat, t_feat)[0]
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"pairwise_weight": -1.0}, ValueError, "`pairwise_weight`"),
        ({"adversarial_weight": float("inf")}, ValueError, "`adversarial_weight`"),
        ({"discriminator_weight": "0.1"}, TypeError, "`discriminator_weight`"),
        ({"pool": 0}, ValueError, "`pool`"),
        ({"tau": 0.0}, ValueError, "`tau`"),
        ({"ignore_index": None}, TypeError, "`ignore_index`"),
        ({"num_classes": 0}, ValueError, "`num_classes`"),
    ],
)
def test_skd_loss_bad_arguments(kwargs, error, match):
    settings = {"num_classes": 3, "conv_dim": 2, **kwargs}
    with pytest.raises(error, match=match):
        SKDLoss(**settings)


def test_skd_loss_bad_inputs():
    skd = SKDLoss(num_classes=3, conv_dim=2)
    s_logits, t_logits, s_feat, t_feat = _skd_inputs()
    with pytest.raises(ValueError, match="same shape"):
        skd(s_logits, t_logits[:, :, :32], s_feat, t_feat)
    with pytest.raises(ValueError, match="except in dimension 1"):
        skd(s_logits, t_logits, s_feat, t_feat[:, :, :4])
    with pytest.raises(ValueError, match=r"`labels` to have shape \(2, 64, 64\)"):
        skd(s_logits, t_logits, s_feat, t_feat, torch.zeros(2, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`student_logits` to have 4 channels.*\(num_classes=4\)"):
        SKDLoss(num_classes=4, conv_dim=2)(s_logits, t_logits, s_feat, t_feat)
    with pytest.raises(ValueError, match="at least 64 x 64"):
        skd.discriminator_loss(s_logits[:, :, :32], t_logits[:, :, :32])
