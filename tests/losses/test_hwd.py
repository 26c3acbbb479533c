"""HWD (Sun et al., ICME 2023) against the float64 reference of segkd.testing.reference."""

from __future__ import annotations

import math

import pytest
import torch

from segkd import HWDLoss
from segkd.functional import cwd_loss, hwd_loss, hwd_weights, hwd_weights_from_divergence
from segkd.losses.hwd import hwd_curve
from segkd.testing.reference import (
    hwd_curve_reference,
    hwd_loss_reference,
    hwd_weights_from_divergence_reference,
    hwd_weights_reference,
    spatial_softmax_reference,
)

SHAPES = [(1, 1, 1, 1), (2, 3, 7), (3, 5, 4, 9), (2, 19, 6, 5), (1, 40, 1, 33)]
# The paper's Table I settings (ADE20K, Cityscapes, COCO-Stuff) and a few others.
SETTINGS = [(4.0, 0.0, 0.1), (4.0, 1.0, 0.1), (4.0, 0.1, 0.1), (1.0, -0.5, 0.5), (2.0, 0.3, 1.0), (1.0, 0.0, 3.0)]


def _pair(shape: tuple[int, ...], dtype: torch.dtype = torch.float64, scale: float = 3.0, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    teacher = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    return student, teacher


# ---- values --------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [1e-3, 0.1, 0.5, 1.0, 2.0, 10.0])
def test_curve_matches_reference(beta: float) -> None:
    x = torch.linspace(-3, 3, 13, dtype=torch.float64)
    torch.testing.assert_close(hwd_curve(x, beta), hwd_curve_reference(x, beta), rtol=1e-12, atol=1e-12)


def test_curve_is_continuous_at_beta_one() -> None:
    x = torch.linspace(-3, 3, 13, dtype=torch.float64)
    for beta in (1 - 1e-9, 1 + 1e-9):
        torch.testing.assert_close(hwd_curve(x, beta), x, rtol=0, atol=1e-8)


@pytest.mark.parametrize(("tau", "mu", "beta"), SETTINGS)
@pytest.mark.parametrize("distance", ["prob", "logits"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_weights_match_reference(shape: tuple[int, ...], distance: str, tau: float, mu: float, beta: float) -> None:
    student, teacher = _pair(shape)
    weights = hwd_weights(student, teacher, tau, mu, beta, distance, backend="torch")
    expected = hwd_weights_reference(student, teacher, tau, mu, beta, distance)
    assert weights.shape == shape[:2]
    torch.testing.assert_close(weights, expected, rtol=1e-9, atol=1e-12)
    assert not weights.requires_grad


@pytest.mark.parametrize(("tau", "mu", "beta"), SETTINGS)
@pytest.mark.parametrize("distance", ["prob", "logits"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_matches_reference(reduction: str, distance: str, tau: float, mu: float, beta: float) -> None:
    shape = (3, 6, 5, 7)
    student, teacher = _pair(shape, seed=1)
    loss = hwd_loss(student, teacher, tau, mu, beta, distance, reduction, backend="torch")
    expected = hwd_loss_reference(student, teacher, tau, mu, beta, distance, reduction)
    assert loss.shape == expected.shape == (() if reduction != "none" else shape[:2])
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-12)


def test_weights_from_divergence_match_reference() -> None:
    divergence = torch.tensor(
        [[0.1, 0.4, 0.2, 0.9], [1.0, 1.0, 1.0, 1.0], [0.0, 2.0, 0.0, 0.0], [3.0, 3.0, 3.0, 3.5]], dtype=torch.float64
    )
    for mu, beta in [(0.0, 0.1), (1.0, 0.1), (-1.0, 2.0), (0.5, 1.0)]:
        torch.testing.assert_close(
            hwd_weights_from_divergence(divergence, mu, beta),
            hwd_weights_from_divergence_reference(divergence, mu, beta),
            rtol=1e-12,
            atol=1e-12,
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("distance", ["prob", "logits"])
def test_low_precision_inputs(dtype: torch.dtype, distance: str) -> None:
    student, teacher = _pair((2, 5, 6, 7), dtype)
    student.requires_grad_()
    loss = hwd_loss(student, teacher, mu=1.0, distance=distance)
    assert loss.dtype == torch.float32
    expected = hwd_loss_reference(student.detach(), teacher, mu=1.0, distance=distance)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-6)
    loss.backward()
    assert student.grad is not None
    assert student.grad.dtype == dtype


# ---- the degenerate case -------------------------------------------------------------------------


@pytest.mark.parametrize("distance", ["prob", "logits"])
@pytest.mark.parametrize(("tau", "mu", "beta"), SETTINGS)
def test_student_equal_teacher_gives_uniform_weights_and_zero_loss(
    distance: str, tau: float, mu: float, beta: float
) -> None:
    logits, _ = _pair((2, 7, 5, 3), torch.float32)
    student = logits.clone().requires_grad_()
    weights = hwd_weights(student, logits, tau, mu, beta, distance)
    assert torch.equal(weights, torch.ones(2, 7))
    loss = hwd_loss(student, logits, tau, mu, beta, distance)
    loss.backward()
    assert loss.item() == 0
    assert student.grad is not None
    assert student.grad.abs().max() == 0


@pytest.mark.parametrize("distance", ["prob", "logits"])
def test_identical_channels_give_uniform_weights_and_cwd(distance: str) -> None:
    # Every channel of the student is the same map, and so is every channel of the teacher.
    student_map, teacher_map = _pair((2, 1, 6, 5), torch.float32, seed=4)
    student, teacher = student_map.expand(2, 9, 6, 5), teacher_map.expand(2, 9, 6, 5)
    assert torch.equal(hwd_weights(student, teacher, distance=distance), torch.ones(2, 9))
    torch.testing.assert_close(
        hwd_loss(student, teacher, distance=distance), cwd_loss(student, teacher), rtol=0, atol=0
    )


@pytest.mark.parametrize("shape", [(3, 1, 4, 5), (2, 1, 1, 1), (1, 1, 7)], ids=str)
def test_single_channel_is_cwd_with_finite_gradient(shape: tuple[int, ...]) -> None:
    student, teacher = _pair(shape, torch.float32, seed=5)
    student.requires_grad_()
    weights = hwd_weights(student, teacher, mu=0.3, beta=0.1)
    assert torch.equal(weights, torch.ones(shape[:2]))
    loss = hwd_loss(student, teacher, mu=0.3, beta=0.1)
    torch.testing.assert_close(loss, cwd_loss(student, teacher), rtol=0, atol=0)
    loss.backward()
    assert student.grad is not None
    assert torch.isfinite(student.grad).all()


def test_degenerate_rows_do_not_affect_other_images() -> None:
    student, teacher = _pair((3, 4, 5, 5), seed=6)
    teacher[1] = student[1]  # image 1 is degenerate; images 0 and 2 are not
    weights = hwd_weights(student, teacher)
    assert torch.equal(weights[1], torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(weights, hwd_weights_reference(student, teacher), rtol=1e-9, atol=1e-12)
    assert not torch.equal(weights[0], torch.ones(4, dtype=torch.float64))


def test_weights_from_divergence_all_equal_rows_are_exactly_one() -> None:
    # Values whose mean is not exactly representable: a naive (d - mean) / std could give +-0.7 noise.
    divergence = torch.full((3, 7), 0.1, dtype=torch.float64)
    divergence[1] = 1 / 3
    divergence[2] = 1e-300
    assert torch.equal(hwd_weights_from_divergence(divergence, mu=0.0, beta=0.1), torch.ones(3, 7, dtype=torch.float64))
    assert torch.equal(hwd_weights_from_divergence(divergence.float(), mu=2.0, beta=0.5), torch.ones(3, 7))


# ---- gradients -----------------------------------------------------------------------------------


@pytest.mark.parametrize("distance", ["prob", "logits"])
@pytest.mark.parametrize(("tau", "mu", "beta"), SETTINGS)
def test_autograd_gradient_is_the_analytic_one_with_detached_weights(
    distance: str, tau: float, mu: float, beta: float
) -> None:
    # dL/ds = tau / (N C) * w * (p_S - p_T): no term from d w / d s, so the weights are detached.
    student, teacher = _pair((2, 5, 4, 3), seed=7)
    student.requires_grad_()
    hwd_loss(student, teacher, tau, mu, beta, distance).backward()
    weights = hwd_weights_reference(student.detach(), teacher, tau, mu, beta, distance)
    assert weights.std() > 0.01  # the weights really vary here, so the test can tell
    p_s = spatial_softmax_reference(student.detach(), tau)
    p_t = spatial_softmax_reference(teacher, tau)
    analytic = (tau / 10 * weights[:, :, None] * (p_s - p_t)).reshape(student.shape)
    torch.testing.assert_close(student.grad, analytic, rtol=1e-9, atol=1e-14)


def test_grad_output_not_one_with_reduction_none() -> None:
    student, teacher = _pair((2, 3, 5), seed=8)
    student.requires_grad_()
    grad_out = torch.tensor([[0.5, -2.0, 3.0], [1.5, 0.0, -1.0]], dtype=torch.float64)
    (grad,) = torch.autograd.grad(hwd_loss(student, teacher, 3.0, 1.0, 0.1, reduction="none"), student, grad_out)
    student64 = student.detach().clone().requires_grad_()
    reference = hwd_loss_reference(student64, teacher, 3.0, 1.0, 0.1, reduction="none")
    (expected,) = torch.autograd.grad(reference, student64, grad_out)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(
    ("shape", "mu", "beta"),
    [
        ((2, 1, 2, 3), 0.0, 0.1),  # C == 1: weight 1
        ((2, 3, 2, 3), 60.0, 0.1),  # saturated curve: g = 1 / (1 - beta) for every channel
    ],
    ids=["single-channel", "saturated"],
)
def test_gradcheck_where_weights_are_locally_constant(shape: tuple[int, ...], mu: float, beta: float) -> None:
    student, teacher = _pair(shape, scale=1.0, seed=9)
    student.requires_grad_()
    assert torch.autograd.gradcheck(lambda s: hwd_loss(s, teacher, 2.0, mu, beta, backend="torch"), (student,))


def test_teacher_gets_no_gradient() -> None:
    student, teacher = _pair((2, 3, 4, 4), torch.float32)
    student.requires_grad_()
    teacher.requires_grad_()
    for distance in ("prob", "logits"):
        hwd_loss(student, teacher, distance=distance).backward()
        assert teacher.grad is None
    assert not hwd_weights(student, teacher).requires_grad


# ---- robustness ----------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1e-6, 1e4])
@pytest.mark.parametrize("distance", ["prob", "logits"])
def test_extreme_logits_stay_finite(scale: float, distance: str) -> None:
    student, teacher = _pair((2, 6, 5, 5), torch.float32, scale=scale, seed=10)
    student.requires_grad_()
    loss = hwd_loss(student, teacher, 1.0, 1.0, 0.1, distance)
    loss.backward()
    assert torch.isfinite(loss)
    assert student.grad is not None
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize(
    ("mu", "beta"),
    [(0.0, 1e-300), (0.0, 1e300), (-50.0, 0.1), (50.0, 10.0), (1e6, 0.5), (-1e13, 1 - 1e-10), (1e20, 1 + 1e-15)],
)
def test_extreme_hyperparameters_give_finite_weights(mu: float, beta: float) -> None:
    student, teacher = _pair((2, 6, 4, 4), torch.float32, seed=11)
    weights = hwd_weights(student, teacher, 4.0, mu, beta)
    assert torch.isfinite(weights).all()
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(dim=1), torch.full((2,), 6.0))


# ---- module --------------------------------------------------------------------------------------


def test_module_equals_function() -> None:
    student, teacher = _pair((2, 5, 3, 3), torch.float32)
    for distance in ("prob", "logits"):
        for reduction in ("mean", "sum", "none"):
            module = HWDLoss(tau=2.0, mu=1.0, beta=0.1, distance=distance, reduction=reduction)
            expected = hwd_loss(student, teacher, 2.0, 1.0, 0.1, distance, reduction)
            torch.testing.assert_close(module(student, teacher), expected, rtol=0, atol=0)


def test_module_defaults_and_repr() -> None:
    module = HWDLoss()
    assert (module.tau, module.mu, module.beta, module.distance, module.reduction) == (4.0, 0.0, 0.1, "prob", "mean")
    assert repr(module) == "HWDLoss(tau=4.0, mu=0.0, beta=0.1, distance='prob', reduction='mean')"
    assert module.state_dict() == {}
    assert math.isclose(HWDLoss(mu=1).mu, 1.0)
