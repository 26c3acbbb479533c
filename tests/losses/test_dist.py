"""DIST: against a plain-Python float64 loop written here from the formula, and against segkd.testing.reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from segkd.losses.dist import DISTLoss, dist_loss, pearson_correlation
from segkd.testing import strategies as sks
from segkd.testing.checks import check_distillation_loss
from segkd.testing.reference.dist import dist_loss_reference, pearson_correlation_reference


def _loop_pearson(a: list[float], b: list[float], eps: float = 1e-8) -> float:
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    dot = sum((x - mean_a) * (y - mean_b) for x, y in zip(a, b, strict=True))
    norm_a = math.sqrt(sum((x - mean_a) ** 2 for x in a))
    norm_b = math.sqrt(sum((y - mean_b) ** 2 for y in b))
    return dot / (norm_a * norm_b + eps)


def _loop_softmax(z: list[float], tau: float) -> list[float]:
    top = max(v / tau for v in z)
    exps = [math.exp(v / tau - top) for v in z]
    total = sum(exps)
    return [e / total for e in exps]


def _loop_dist(student, teacher, beta=1.0, gamma=1.0, tau=1.0) -> float:
    """Every (image, position) is a row of C class scores; Pearson over rows (inter) and columns (intra)."""
    s = student.double().reshape(student.shape[0], student.shape[1], -1)
    t = teacher.double().reshape(teacher.shape[0], teacher.shape[1], -1)
    n_img, channels, positions = s.shape
    rows_s, rows_t = [], []
    for n in range(n_img):
        for p in range(positions):
            rows_s.append(_loop_softmax([float(s[n, c, p]) for c in range(channels)], tau))
            rows_t.append(_loop_softmax([float(t[n, c, p]) for c in range(channels)], tau))
    inter = 1 - sum(_loop_pearson(a, b) for a, b in zip(rows_s, rows_t, strict=True)) / len(rows_s)
    cols_s = [[row[c] for row in rows_s] for c in range(channels)]
    cols_t = [[row[c] for row in rows_t] for c in range(channels)]
    intra = 1 - sum(_loop_pearson(a, b) for a, b in zip(cols_s, cols_t, strict=True)) / channels
    return tau * tau * (beta * inter + gamma * intra)


def _pair(shape, seed=0, scale=2.0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return (
        scale * torch.randn(shape, generator=gen, dtype=dtype),
        scale * torch.randn(shape, generator=gen, dtype=dtype),
    )


SHAPES = [(2, 5, 3, 4), (3, 4), (2, 3, 5), (1, 4, 1, 1), (2, 1, 2, 3), (1, 2, 1, 3), (2, 19, 3, 2)]
SHAPE_IDS = ["nchw", "nc", "ncl", "one-pixel", "one-class", "two-classes", "c19"]
SETTINGS = [(1.0, 1.0, 1.0), (2.0, 0.5, 4.0), (0.0, 1.0, 0.5), (1.0, 0.0, 2.0)]


@pytest.mark.parametrize(("beta", "gamma", "tau"), SETTINGS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_matches_loop_reference_fp64(shape, beta, gamma, tau):
    student, teacher = _pair(shape, seed=len(shape) + int(10 * tau))
    expected = _loop_dist(student, teacher, beta, gamma, tau)
    got = dist_loss(student, teacher, beta=beta, gamma=gamma, tau=tau)
    assert got.dtype == torch.float64
    assert got.shape == ()
    assert got.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_reference_module_matches_loop(shape):
    student, teacher = _pair(shape, seed=7)
    expected = _loop_dist(student, teacher, 0.7, 1.3, 2.0)
    assert dist_loss_reference(student, teacher, 0.7, 1.3, 2.0).item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


def _hwd_criterion_dist(student, teacher, beta=1.0, gamma=1.0) -> float:
    """The HWD authors' CriterionDIST (zju-SWJ/HWD, losses/loss.py), re-derived in float64 NumPy.

    Rows are the N*H*W pixels in (n, h, w) order, columns the C classes, no softmax. Inter: per row,
    the cosine of the mean-centred vectors with 1e-8 added to the product of the norms, then 1 - mean
    over rows; intra: the same on the transposed matrix (per class, across all pixels of the batch).
    """
    s = student.double().permute(0, 2, 3, 1).reshape(-1, student.shape[1]).numpy()
    t = teacher.double().permute(0, 2, 3, 1).reshape(-1, teacher.shape[1]).numpy()

    def one_minus_mean_pearson(a, b):
        a = a - a.mean(axis=1, keepdims=True)
        b = b - b.mean(axis=1, keepdims=True)
        cos = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-8)
        return 1.0 - cos.mean()

    return beta * one_minus_mean_pearson(s, t) + gamma * one_minus_mean_pearson(s.T, t.T)


@pytest.mark.parametrize("shape", [(2, 19, 6, 5), (1, 150, 3, 4), (4, 7, 2, 2)], ids=str)
def test_without_softmax_equals_the_hwd_criterion(shape):
    # Table II's DIST: raw logits (HWD repo, losses/loss.py, softmax commented out), beta = gamma = 1.
    student, teacher = _pair(shape, seed=sum(shape), scale=3.0)
    got = dist_loss(student, teacher, softmax=False)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(_hwd_criterion_dist(student, teacher), rel=1e-6)
    assert DISTLoss(beta=0.5, gamma=2.0, softmax=False)(student, teacher).item() == pytest.approx(
        _hwd_criterion_dist(student, teacher, 0.5, 2.0), rel=1e-6
    )
    # the softmax form is a different loss on the same logits
    assert dist_loss(student, teacher).item() != pytest.approx(got.item(), rel=1e-3)


def test_without_softmax_tau_only_scales():
    student, teacher = _pair((2, 5, 3, 3), seed=21)
    base = dist_loss(student, teacher, softmax=False).item()
    assert dist_loss(student, teacher, tau=2.0, softmax=False).item() == pytest.approx(4.0 * base, rel=1e-9)


def test_softmax_must_be_a_bool():
    student, teacher = _pair((1, 3, 2, 2), seed=22)
    with pytest.raises(TypeError, match="`softmax` to be True or False"):
        dist_loss(student, teacher, softmax="no")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`softmax` to be True or False"):
        DISTLoss(softmax=0)  # type: ignore[arg-type]


def test_pearson_correlation_matches_loop_and_reference():
    a, b = _pair((4, 6), seed=3)
    got = pearson_correlation(a, b, dim=1)
    for i in range(4):
        expected = _loop_pearson(a[i].tolist(), b[i].tolist())
        assert got[i].item() == pytest.approx(expected, rel=1e-12)
        assert pearson_correlation_reference(a[i], b[i]).item() == pytest.approx(expected, rel=1e-12)
    # dim=0 correlates columns
    assert pearson_correlation(a, b, dim=0)[2].item() == pytest.approx(
        _loop_pearson(a[:, 2].tolist(), b[:, 2].tolist())
    )


def test_float32_close_to_fp64_reference():
    student, teacher = _pair((2, 7, 6, 5), seed=11, dtype=torch.float32)
    got = dist_loss(student, teacher, tau=2.0)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(_loop_dist(student, teacher, tau=2.0), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_fp32(dtype):
    student, teacher = _pair((2, 5, 4, 4), seed=12, dtype=dtype)
    got = dist_loss(student, teacher)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(_loop_dist(student.float(), teacher.float()), rel=1e-5, abs=1e-6)


def test_identical_student_and_teacher_give_zero():
    student, _ = _pair((2, 6, 5, 5), seed=1)
    # Exactly zero up to the eps / variance terms of the formula (variances here are >> 1e-8).
    assert dist_loss(student, student.clone(), tau=2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_one_class_gives_constant_with_zero_gradient():
    student, teacher = _pair((2, 1, 3, 3), seed=2)
    student.requires_grad_(True)
    loss = dist_loss(student, teacher, beta=2.0, gamma=0.5, tau=3.0)
    # Every softmax is 1: zero-variance rows and columns have correlation 0, each term is 1.
    assert loss.item() == pytest.approx(9.0 * (2.0 + 0.5))
    loss.backward()
    assert torch.isfinite(student.grad).all()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_single_pixel_batch_has_intra_term_one():
    student, teacher = _pair((1, 4, 1, 1), seed=4)
    student.requires_grad_(True)
    loss = dist_loss(student, teacher, beta=1.0, gamma=1.0)
    inter_only = dist_loss(student, teacher, beta=1.0, gamma=0.0)
    assert (loss - inter_only).item() == pytest.approx(1.0)  # a single sample: columns of length 1 -> term 1
    loss.backward()
    assert torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0  # the inter-class term still trains the student


def test_uniform_student_gives_one_per_term_and_finite_gradient():
    # Constant logits -> uniform softmax rows (zero variance) and constant columns: both terms are 1.
    student = torch.zeros(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    _, teacher = _pair((2, 3, 2, 2), seed=5)
    loss = dist_loss(student, teacher, beta=1.5, gamma=0.5)
    assert loss.item() == pytest.approx(2.0, abs=1e-12)
    loss.backward()
    assert torch.isfinite(student.grad).all()


def test_large_logits_are_finite():
    student, teacher = _pair((2, 5, 4, 4), seed=6, scale=1e4, dtype=torch.float32)
    student.requires_grad_(True)
    loss = dist_loss(student, teacher)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize("shape", [(1, 3, 2, 2), (2, 3), (1, 2, 1, 1), (2, 1, 1, 2)], ids=str)
def test_gradcheck(shape):
    student, teacher = _pair(shape, seed=9)
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: dist_loss(s, teacher, beta=0.7, gamma=1.3, tau=2.0), (student,))


def test_gradient_matches_reference_gradient():
    student, teacher = _pair((2, 3, 2, 3), seed=10)
    mine = student.clone().requires_grad_(True)
    ref = student.clone().requires_grad_(True)
    dist_loss(mine, teacher, tau=2.0).backward()
    dist_loss_reference(ref, teacher, tau=2.0).backward()
    torch.testing.assert_close(mine.grad, ref.grad, rtol=1e-9, atol=1e-12)


def test_teacher_gets_no_gradient():
    student, teacher = _pair((2, 4, 3, 3), seed=13)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    dist_loss(student, teacher).backward()
    assert teacher.grad is None
    assert student.grad is not None


def test_module_equals_function():
    student, teacher = _pair((2, 5, 4, 3), seed=14)
    criterion = DISTLoss(beta=2.0, gamma=0.5, tau=4.0)
    assert torch.equal(criterion(student, teacher), dist_loss(student, teacher, beta=2.0, gamma=0.5, tau=4.0))
    assert "beta=2.0" in repr(criterion)
    assert not list(criterion.parameters())


@pytest.mark.parametrize(
    ("student", "teacher", "error", "match"),
    [
        (
            torch.randn(2, 3, 4, 4),
            torch.randn(2, 3, 4, 5),
            ValueError,
            r"same shape, got \(2, 3, 4, 4\) and \(2, 3, 4, 5\)",
        ),
        (torch.randn(5), torch.randn(5), ValueError, "at least 2 dimensions"),
        (torch.randint(0, 3, (2, 3, 4, 4)), torch.randn(2, 3, 4, 4), TypeError, "floating-point"),
        ([[1.0]], torch.randn(1, 1), TypeError, "torch.Tensor"),
        (torch.randn(0, 3, 2, 2), torch.randn(0, 3, 2, 2), ValueError, "non-empty"),
    ],
    ids=["shape-mismatch", "one-dim", "int-dtype", "not-tensor", "empty"],
)
def test_bad_inputs(student, teacher, error, match):
    with pytest.raises(error, match=match):
        dist_loss(student, teacher)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"tau": 0.0}, ValueError, "`tau`"),
        ({"tau": -1.0}, ValueError, "`tau`"),
        ({"beta": -0.1}, ValueError, "`beta`"),
        ({"gamma": float("nan")}, ValueError, "`gamma`"),
        ({"tau": "1"}, TypeError, "`tau`"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    student, teacher = _pair((1, 3, 2, 2))
    with pytest.raises(error, match=match):
        dist_loss(student, teacher, **kwargs)
    with pytest.raises(error, match=match):
        DISTLoss(**kwargs)


@given(
    pair=sks.logit_pairs(sks.segmentation_shapes(max_batch=2, max_channels=6, max_side=5), dtype=torch.float64),
    tau=sks.temperatures(),
    beta=st.floats(0.0, 3.0),
    gamma=st.floats(0.0, 3.0),
)
def test_properties(pair, tau, beta, gamma):
    student, teacher = pair
    loss = dist_loss(student, teacher, beta=beta, gamma=gamma, tau=tau)
    # Pearson correlations lie in [-1, 1], so each term lies in [0, 2].
    assert -1e-9 <= loss.item() <= 2 * tau * tau * (beta + gamma) + 1e-9
    # Symmetric in student and teacher, and blind to a per-pixel shift of the logits (softmax).
    assert dist_loss(teacher, student, beta=beta, gamma=gamma, tau=tau).item() == pytest.approx(loss.item(), abs=1e-9)
    shift = torch.randn(student.shape[0], 1, *student.shape[2:], dtype=torch.float64)
    shifted = dist_loss(student + shift, teacher, beta=beta, gamma=gamma, tau=tau)
    assert shifted.item() == pytest.approx(loss.item(), abs=1e-7)


def test_battery():
    # At student == teacher the loss is eps / (centred norm)^2-small, not exactly 0: atol 1e-5.
    report = check_distillation_loss(
        DISTLoss(beta=1.0, gamma=2.0, tau=2.0),
        (2, 4, 3, 3),
        zero_at_equal=True,
        pixel_shift_invariant=True,
        reference=lambda s, t: dist_loss_reference(s, t, 1.0, 2.0, 2.0),
        atol=1e-5,
    )
    assert {"gradcheck", "zero_at_equal", "pixel_shift_invariant", "reference", "reference_gradient"} <= set(
        report.passed
    )
