"""CWD (Shu et al., ICCV 2021) against the float64 reference of segkd.testing.reference."""

from __future__ import annotations

import pytest
import torch

from segkd import CWDLoss
from segkd.functional import cwd_loss
from segkd.testing.reference import cwd_loss_reference, spatial_softmax_reference

SHAPES = [(1, 1, 1, 1), (2, 3, 7), (3, 5, 4, 9), (2, 19, 6, 5), (1, 40, 1, 33)]


def _pair(shape: tuple[int, ...], dtype: torch.dtype = torch.float64, scale: float = 3.0, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    teacher = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    return student, teacher


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_matches_reference(shape: tuple[int, ...], reduction: str, tau: float) -> None:
    student, teacher = _pair(shape)
    loss = cwd_loss(student, teacher, tau, reduction, backend="torch")
    expected = cwd_loss_reference(student, teacher, tau, reduction)
    assert loss.shape == expected.shape == (() if reduction != "none" else shape[:2])
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_low_precision_inputs_compute_in_fp32(dtype: torch.dtype) -> None:
    student, teacher = _pair((2, 4, 5, 6), dtype)
    student.requires_grad_()
    loss = cwd_loss(student, teacher, backend="torch")
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), cwd_loss_reference(student.detach(), teacher), rtol=1e-5, atol=1e-6)
    loss.backward()
    assert student.grad is not None
    assert student.grad.dtype == dtype


def test_reductions_are_consistent() -> None:
    student, teacher = _pair((3, 4, 5))
    terms = cwd_loss(student, teacher, 2.0, "none")
    torch.testing.assert_close(cwd_loss(student, teacher, 2.0, "sum"), terms.sum())
    torch.testing.assert_close(cwd_loss(student, teacher, 2.0, "mean"), terms.sum() / 12)


def test_gradcheck_float64() -> None:
    student, teacher = _pair((2, 3, 2, 3), scale=1.0)
    student.requires_grad_()
    assert torch.autograd.gradcheck(lambda s: cwd_loss(s, teacher, 2.0, backend="torch"), (student,))


def test_gradient_is_tau_over_nc_times_probability_difference() -> None:
    student, teacher = _pair((2, 3, 4, 5), seed=1)
    student.requires_grad_()
    tau = 4.0
    cwd_loss(student, teacher, tau).backward()
    p_s = spatial_softmax_reference(student.detach(), tau)
    p_t = spatial_softmax_reference(teacher, tau)
    expected = (tau / 6 * (p_s - p_t)).reshape(student.shape)
    torch.testing.assert_close(student.grad, expected, rtol=1e-10, atol=1e-14)


def test_grad_output_not_one_with_reduction_none() -> None:
    student, teacher = _pair((2, 3, 5), seed=2)
    student.requires_grad_()
    grad_out = torch.tensor([[0.5, -2.0, 3.0], [1.5, 0.0, -1.0]], dtype=torch.float64)
    (grad,) = torch.autograd.grad(cwd_loss(student, teacher, 3.0, "none"), student, grad_out)
    student64 = student.detach().clone().requires_grad_()
    (expected,) = torch.autograd.grad(cwd_loss_reference(student64, teacher, 3.0, "none"), student64, grad_out)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-14)


def test_teacher_gets_no_gradient() -> None:
    student, teacher = _pair((2, 3, 4, 4))
    student.requires_grad_()
    teacher.requires_grad_()
    cwd_loss(student, teacher).backward()
    assert teacher.grad is None
    assert student.grad is not None


def test_module_equals_function() -> None:
    student, teacher = _pair((2, 5, 3, 3), torch.float32)
    for reduction in ("mean", "sum", "none"):
        module = CWDLoss(tau=2.5, reduction=reduction, backend="torch")
        torch.testing.assert_close(module(student, teacher), cwd_loss(student, teacher, 2.5, reduction), rtol=0, atol=0)
    module = CWDLoss()
    assert module.tau == 4.0
    assert module.reduction == "mean"
    assert "tau=4.0" in repr(module)
    assert not list(module.parameters())
    assert module.state_dict() == {}


def test_large_logits_stay_finite() -> None:
    student, teacher = _pair((2, 4, 5, 5), torch.float32, scale=1e4)
    student.requires_grad_()
    loss = cwd_loss(student, teacher, 1.0)
    loss.backward()
    assert torch.isfinite(loss)
    assert student.grad is not None
    assert torch.isfinite(student.grad).all()
    torch.testing.assert_close(loss.double(), cwd_loss_reference(student.detach(), teacher, 1.0), rtol=1e-4, atol=0)
