"""Second-order gradients through ``channel_kl`` and ``weighted_channel_kl`` (and CWD/HWD on top of them).

A ``create_graph=True`` backward must return a gradient with a graph (a gradient penalty keeps its
term), checked with ``gradgradcheck`` in float64 and against a plain differentiable float64 formula
written here, independent of segkd.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradgradcheck

from segkd.functional import cwd_loss, hwd_loss, hwd_weights
from segkd.ops import channel_kl, weighted_channel_kl
from segkd.ops.channel_kl import ChannelKLFunction

SHAPE = (2, 3, 2, 2)


def _pair(seed: int = 0, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    student = (2 * torch.randn(SHAPE, generator=generator, dtype=torch.float64)).to(dtype).requires_grad_()
    teacher = (2 * torch.randn(SHAPE, generator=generator, dtype=torch.float64)).to(dtype)
    return student, teacher


def _kl_formula(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """``(N, C)`` KL(p_T || p_S) of the spatial softmaxes, plain float64 PyTorch (differentiable)."""
    log_p_s = torch.log_softmax(student.double().flatten(2) / tau, dim=2)
    log_p_t = torch.log_softmax(teacher.double().flatten(2) / tau, dim=2)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=2)


@pytest.mark.parametrize("return_sqdist", [False, True])
@pytest.mark.parametrize("keep_direction", [True, False], ids=["kept-difference", "saved-inputs"])
def test_channel_kl_gradgradcheck(return_sqdist: bool, keep_direction: bool) -> None:
    student, teacher = _pair()
    teacher_rows = teacher.reshape(6, -1)

    def kl(x: torch.Tensor) -> torch.Tensor:
        if keep_direction:  # what channel_kl does on CPU
            out = channel_kl(x, teacher, 1.7, return_sqdist=return_sqdist, backend="torch")
            return out[0] if return_sqdist else out
        return ChannelKLFunction.apply(x.reshape(6, -1), teacher_rows, 1.7, return_sqdist, "torch", False)[0]

    assert gradgradcheck(kl, (student,))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weights", ["uniform", "given"])
def test_weighted_channel_kl_gradgradcheck(reduction: str, weights: str) -> None:
    student, teacher = _pair(1)
    given = torch.linspace(0.0, 2.0, 6, dtype=torch.float64).reshape(2, 3)
    weighting = given if weights == "given" else "uniform"
    assert gradgradcheck(
        lambda x: weighted_channel_kl(x, teacher, 2.5, weighting, reduction=reduction, backend="torch"), (student,)
    )


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cwd_loss_gradgradcheck(reduction: str) -> None:
    student, teacher = _pair(2)
    assert gradgradcheck(lambda x: cwd_loss(x, teacher, 4.0, reduction, backend="torch"), (student,))


@pytest.mark.parametrize("distance", ["prob", "logits"])
def test_hwd_loss_gradgradcheck_with_its_weights_held(distance: str) -> None:
    # HWD's weights are detached on purpose, so a numerical derivative (which moves them) cannot check
    # hwd_loss itself; with the weights it computes held fixed, the loss is differentiable twice.
    student, teacher = _pair(3)
    weights = hwd_weights(student, teacher, 4.0, 1.0, 0.1, distance)
    assert gradgradcheck(lambda x: weighted_channel_kl(x, teacher, 4.0, weights, backend="torch"), (student,))


@pytest.mark.parametrize("distance", ["prob", "logits"])
def test_hwd_loss_hessian_vector_product_matches_formula(distance: str) -> None:
    student, teacher = _pair(4)
    vector = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (grad,) = torch.autograd.grad(hwd_loss(student, teacher, 4.0, 1.0, 0.1, distance), student, create_graph=True)
    (hvp,) = torch.autograd.grad((grad * vector).sum(), student)

    weights = hwd_weights(student, teacher, 4.0, 1.0, 0.1, distance)  # held fixed, as hwd_loss documents
    x = student.detach().clone().requires_grad_()
    (ref_grad,) = torch.autograd.grad((16.0 * weights * _kl_formula(x, teacher, 4.0)).mean(), x, create_graph=True)
    (ref_hvp,) = torch.autograd.grad((ref_grad * vector).sum(), x)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(hvp, ref_hvp, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("loss_name", ["cwd", "hwd", "channel_kl"])
def test_gradient_penalty_matches_formula(loss_name: str) -> None:
    # loss + lam * |d loss / d s|^2, and its gradient, against the same written as plain float64 PyTorch.
    student, teacher = _pair(6)
    lam, tau = 0.3, 2.0
    weights = hwd_weights(student, teacher, tau)

    def segkd_loss(x: torch.Tensor) -> torch.Tensor:
        if loss_name == "cwd":
            return cwd_loss(x, teacher, tau)
        if loss_name == "hwd":
            return hwd_loss(x, teacher, tau)
        return channel_kl(x, teacher, tau).sum()

    def formula(x: torch.Tensor) -> torch.Tensor:
        kl = _kl_formula(x, teacher, tau)
        if loss_name == "cwd":
            return (tau * tau * kl).mean()
        if loss_name == "hwd":
            return (tau * tau * weights * kl).mean()
        return kl.sum()

    def penalised(loss_fn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss = loss_fn(x)
        (grad,) = torch.autograd.grad(loss, x, create_graph=True)
        total = loss + lam * grad.pow(2).sum()
        (total_grad,) = torch.autograd.grad(total, x)
        return total, total_grad

    total, total_grad = penalised(segkd_loss, student)
    x = student.detach().clone().requires_grad_()
    ref_total, ref_grad = penalised(formula, x)
    assert ref_total - formula(x) > 1e-6  # the penalty term is there, and not negligible
    torch.testing.assert_close(total, ref_total, rtol=1e-12, atol=0)
    torch.testing.assert_close(total_grad, ref_grad, rtol=1e-11, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_create_graph_gradient_equals_first_order_gradient(dtype: torch.dtype) -> None:
    # The differentiable backward returns the same gradient as the fused one, in the student's dtype.
    student, teacher = _pair(7, dtype)
    grad_loss = torch.tensor(0.7)
    (plain,) = torch.autograd.grad(cwd_loss(student, teacher, 3.0), student, grad_loss)
    (graphed,) = torch.autograd.grad(cwd_loss(student, teacher, 3.0), student, grad_loss, create_graph=True)
    assert graphed.requires_grad
    assert graphed.dtype == dtype
    tolerance = {"rtol": 1e-5, "atol": 1e-8} if dtype == torch.float32 else {"rtol": 8e-3, "atol": 1e-6}
    torch.testing.assert_close(graphed, plain, **tolerance)


def test_in_place_change_before_a_create_graph_backward_is_refused() -> None:
    student, teacher = _pair(8)
    logits = student * 1.0
    loss = cwd_loss(logits, teacher)
    loss_kl = channel_kl(logits, teacher).sum()
    with torch.no_grad():
        logits.add_(1.0)
    for value in (loss, loss_kl):
        with pytest.raises(RuntimeError, match="modified by an in-place operation"):
            torch.autograd.grad(value, student, create_graph=True, retain_graph=True)
    torch.autograd.grad(loss, student)  # a first-order backward never read the inputs: still fine


def _triton_interpreted() -> bool:
    """Whether the Triton backend runs here (the root conftest.py sets ``TRITON_INTERPRET=1`` on CPU)."""
    try:
        from segkd.ops import _triton_backend, _triton_kernels
    except ImportError:
        return False
    return bool(_triton_backend._is_interpreted(_triton_kernels.channel_kl_forward_kernel))


@pytest.mark.triton
@pytest.mark.parametrize("op", ["channel_kl", "cwd", "hwd"])
def test_triton_backend_double_backward_matches_torch(op: str) -> None:
    if not _triton_interpreted():
        pytest.skip("Triton is not installed, or was imported before TRITON_INTERPRET=1 was set")
    student, teacher = _pair(9, torch.float32)
    vector = torch.randn(SHAPE, generator=torch.Generator().manual_seed(10))

    def hvp(backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        x = student.detach().clone().requires_grad_()
        if op == "channel_kl":
            loss = channel_kl(x, teacher, 2.0, backend=backend).sum()  # type: ignore[arg-type]
        elif op == "cwd":
            loss = cwd_loss(x, teacher, 2.0, backend=backend)  # type: ignore[arg-type]
        else:
            loss = hwd_loss(x, teacher, 2.0, 1.0, backend=backend)  # type: ignore[arg-type]
        (grad,) = torch.autograd.grad(loss, x, create_graph=True)
        return grad, torch.autograd.grad((grad * vector).sum(), x)[0]

    for got, expected in zip(hvp("triton"), hvp("torch"), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
