"""channel_kl with the PyTorch backend against the float64 reference of segkd.testing.reference.

The Triton backend has its own tests (tests/ops/test_triton_backend.py); here `backend="torch"`
is always named explicitly, except in the backend-selection tests.
"""

from __future__ import annotations

import importlib
import types

import pytest
import torch

from segkd.ops import _selfcheck, _torch_backend
from segkd.ops.channel_kl import ChannelKLFunction, available_backends, channel_kl, keeps_direction, resolve_backend
from segkd.testing.reference import channel_kl_reference, spatial_softmax_reference

# `segkd.ops.channel_kl` the attribute is the function; the module is needed for monkeypatching.
channel_kl_module = importlib.import_module("segkd.ops.channel_kl")

SHAPES = [
    (1, 1, 1),
    (1, 1, 1, 1),
    (2, 3, 7),
    (1, 1, 33),
    (3, 5, 1, 9),
    (2, 19, 13, 11),
    (1, 40, 33, 1),
    (4, 2, 17, 33),
    (2, 3, 2, 3, 5),  # any trailing dims are flattened
]

# Inputs are rounded to the dtype first and the reference sees the rounded values, so these
# tolerances measure the computation only: fp16/bf16 compute in fp32 and get fp32 tolerances.
TOLERANCES = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-12},
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 1e-5, "atol": 1e-5},
    torch.bfloat16: {"rtol": 1e-5, "atol": 1e-5},
}
GRAD_TOLERANCES = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-14},
    torch.float32: {"rtol": 1e-4, "atol": 1e-8},
    torch.float16: {"rtol": 1e-3, "atol": 1e-7},  # one rounding to fp16 at the end
    torch.bfloat16: {"rtol": 1e-2, "atol": 1e-7},  # one rounding to bf16 at the end
}


def _pair(shape: tuple[int, ...], dtype: torch.dtype, scale: float = 3.0, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    teacher = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    return student, teacher


def _reference_grad(student: torch.Tensor, teacher: torch.Tensor, tau: float, grad_kl: torch.Tensor) -> torch.Tensor:
    """Gradient of sum(grad_kl * kl) w.r.t. the student, by autograd through the float64 reference."""
    student64 = student.detach().to(torch.float64).requires_grad_()
    kl, _ = channel_kl_reference(student64, teacher.detach(), tau)
    (grad,) = torch.autograd.grad(kl, student64, grad_kl.to(torch.float64))
    return grad


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_backward_match_reference(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    student, teacher = _pair(shape, dtype)
    tau = 2.0
    student.requires_grad_()
    kl, sqdist = channel_kl(student, teacher, tau, return_sqdist=True, backend="torch")
    ref_kl, ref_sqdist = channel_kl_reference(student.detach(), teacher, tau)
    compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert kl.dtype == sqdist.dtype == compute_dtype
    assert kl.shape == sqdist.shape == shape[:2]
    torch.testing.assert_close(kl.double(), ref_kl, **TOLERANCES[dtype])
    torch.testing.assert_close(sqdist.double(), ref_sqdist, **TOLERANCES[dtype])

    grad_kl = torch.rand(shape[:2], generator=torch.Generator().manual_seed(5), dtype=compute_dtype) * 3 - 1
    kl.backward(grad_kl)  # grad_output != 1, and of both signs
    assert student.grad is not None
    assert student.grad.dtype == dtype
    assert student.grad.shape == student.shape
    expected = _reference_grad(student, teacher, tau, grad_kl)
    torch.testing.assert_close(student.grad.double(), expected, **GRAD_TOLERANCES[dtype])


@pytest.mark.parametrize("tau", [0.25, 1.0, 4.0, 10.0])
def test_temperatures(tau: float) -> None:
    student, teacher = _pair((2, 3, 5, 4), torch.float64)
    kl, sqdist = channel_kl(student, teacher, tau, return_sqdist=True, backend="torch")
    ref_kl, ref_sqdist = channel_kl_reference(student, teacher, tau)
    torch.testing.assert_close(kl, ref_kl, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sqdist, ref_sqdist, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "make_view",
    [
        lambda x: x.transpose(2, 3),
        lambda x: x[:, ::2, 1:, ::3],
        lambda x: x.contiguous(memory_format=torch.channels_last),
        lambda x: x.permute(1, 0, 2, 3),
        lambda x: x.expand(3, -1, -1, -1) if x.shape[0] == 1 else x[:1].expand(3, -1, -1, -1),
    ],
    ids=["transpose", "strided-slice", "channels-last", "permute", "expand"],
)
def test_non_contiguous_inputs(make_view) -> None:
    base_s, base_t = _pair((2, 6, 7, 9), torch.float32)
    base_s.requires_grad_()
    student, teacher = make_view(base_s), make_view(base_t)
    kl, sqdist = channel_kl(student, teacher, 1.5, return_sqdist=True, backend="torch")
    ref_kl, ref_sqdist = channel_kl_reference(student.detach(), teacher, 1.5)
    torch.testing.assert_close(kl.double(), ref_kl, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sqdist.double(), ref_sqdist, rtol=1e-5, atol=1e-5)
    grad_kl = torch.linspace(-1, 2, kl.numel()).reshape(kl.shape)
    (grad,) = torch.autograd.grad(kl, base_s, grad_kl)
    base64 = base_s.detach().double().requires_grad_()
    ref_kl64, _ = channel_kl_reference(make_view(base64), teacher, 1.5)
    (expected,) = torch.autograd.grad(ref_kl64, base64, grad_kl.double())
    torch.testing.assert_close(grad.double(), expected, rtol=1e-4, atol=1e-8)


def test_gradient_is_grad_kl_over_tau_times_probability_difference() -> None:
    student, teacher = _pair((2, 4, 3, 5), torch.float64, seed=3)
    student.requires_grad_()
    tau = 3.0
    kl = channel_kl(student, teacher, tau, backend="torch")
    grad_kl = torch.arange(1.0, 9.0, dtype=torch.float64).reshape(2, 4) - 4.5
    kl.backward(grad_kl)
    p_s = spatial_softmax_reference(student.detach(), tau)
    p_t = spatial_softmax_reference(teacher, tau)
    analytic = (grad_kl[:, :, None] / tau * (p_s - p_t)).reshape(student.shape)
    torch.testing.assert_close(student.grad, analytic, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("return_sqdist", [False, True])
def test_gradcheck_float64(return_sqdist: bool) -> None:
    student, teacher = _pair((2, 3, 2, 3), torch.float64, scale=1.0, seed=4)
    student.requires_grad_()

    def kl_only(x: torch.Tensor) -> torch.Tensor:
        out = channel_kl(x, teacher, 1.7, return_sqdist=return_sqdist, backend="torch")
        return out[0] if isinstance(out, tuple) else out

    assert torch.autograd.gradcheck(kl_only, (student,), eps=1e-6, atol=1e-7)


def test_teacher_gets_no_gradient_even_if_it_requires_grad() -> None:
    student, teacher = _pair((2, 3, 4, 4), torch.float32)
    student.requires_grad_()
    teacher.requires_grad_()
    kl, _ = channel_kl(student, teacher, 2.0, return_sqdist=True, backend="torch")
    (kl.sum() * 2).backward()
    assert teacher.grad is None
    assert student.grad is not None
    # With only the teacher requiring grad, nothing is differentiable.
    only_teacher = channel_kl(student.detach(), teacher, 2.0, backend="torch")
    assert not only_teacher.requires_grad


def test_sqdist_carries_no_gradient() -> None:
    student, teacher = _pair((2, 3, 4, 4), torch.float32)
    student.requires_grad_()
    kl, sqdist = channel_kl(student, teacher, 2.0, return_sqdist=True, backend="torch")
    assert kl.requires_grad
    assert not sqdist.requires_grad
    (grad_with,) = torch.autograd.grad(kl.sum() + sqdist.sum(), student)
    kl_alone = channel_kl(student, teacher, 2.0, backend="torch")
    (grad_without,) = torch.autograd.grad(kl_alone.sum(), student)
    torch.testing.assert_close(grad_with, grad_without, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_small_gradients_at_128x128_are_not_flushed_to_zero(dtype: torch.dtype) -> None:
    # At 128x128 the probabilities are ~6e-5, their differences smaller; the loss scale and the
    # upstream gradient make each element ~1e-9. They must be computed in fp32 and rounded once,
    # after grad_output is applied. fp16 cannot hold 1e-9 (its smallest subnormal is 6e-8), so
    # there the upstream gradient is a typical GradScaler-scaled one, putting elements near 1e-6.
    shape = (1, 2, 128, 128)
    student, teacher = _pair(shape, dtype, scale=1.0, seed=6)
    student.requires_grad_()
    tau = 4.0
    kl = channel_kl(student, teacher, tau, backend="torch")
    upstream = 0.3 if dtype == torch.float16 else 3e-4
    grad_kl = torch.full((1, 2), upstream) * torch.tensor([[1.0, -0.5]])
    kl.backward(grad_kl)
    expected = _reference_grad(student, teacher, tau, grad_kl)
    grad = student.grad
    assert grad is not None
    assert grad.dtype == dtype
    typical = float(expected.abs().median())
    assert (1e-10 < typical < 1e-8) if dtype != torch.float16 else (1e-7 < typical < 1e-5)
    # No element that the dtype can represent is flushed to zero.
    smallest = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps  # the smallest subnormal
    representable = expected.abs() >= smallest
    assert representable.double().mean() > 0.95
    assert (grad != 0)[representable].all()
    # fp16: atol is the subnormal spacing.
    tolerance = {"rtol": 1e-3, "atol": 6e-8} if dtype == torch.float16 else GRAD_TOLERANCES[dtype] | {"atol": 1e-14}
    torch.testing.assert_close(grad.double(), expected, **tolerance)


def test_half_precision_student_with_fp32_teacher_is_promoted() -> None:
    student, teacher = _pair((2, 3, 4, 5), torch.bfloat16)
    student.requires_grad_()
    kl = channel_kl(student, teacher.float(), 1.0, backend="torch")
    assert kl.dtype == torch.float32
    torch.testing.assert_close(
        kl.double(), channel_kl_reference(student.detach(), teacher, 1.0)[0], **TOLERANCES[torch.float32]
    )
    kl.sum().backward()
    assert student.grad is not None
    assert student.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("scale", [1e-4, 1e2, 1e4])
def test_extreme_logits_stay_finite(scale: float) -> None:
    student, teacher = _pair((2, 5, 6, 7), torch.float32, scale=scale)
    student.requires_grad_()
    kl, sqdist = channel_kl(student, teacher, 1.0, return_sqdist=True, backend="torch")
    kl.sum().backward()
    assert torch.isfinite(kl).all()
    assert torch.isfinite(sqdist).all()
    assert student.grad is not None
    assert torch.isfinite(student.grad).all()
    ref_kl, ref_sqdist = channel_kl_reference(student.detach(), teacher, 1.0)
    # KL grows like the logit scale; the fp32 error is relative to it.
    torch.testing.assert_close(kl.double(), ref_kl, rtol=1e-4, atol=1e-6 * max(scale, 1.0))
    torch.testing.assert_close(sqdist.double(), ref_sqdist, rtol=1e-5, atol=1e-6)


def test_equal_inputs_give_exact_zeros() -> None:
    student, _ = _pair((2, 7, 5, 3), torch.float32)
    student.requires_grad_()
    kl, sqdist = channel_kl(student, student.detach().clone(), 4.0, return_sqdist=True, backend="torch")
    kl.sum().backward()
    assert kl.abs().max() == 0
    assert sqdist.abs().max() == 0
    assert student.grad is not None
    assert student.grad.abs().max() == 0


def test_near_equal_inputs_give_non_negative_kl() -> None:
    # KL is second order in the difference; the rounding of the two log-normalisers must not make it negative.
    gen = torch.Generator().manual_seed(7)
    student = torch.randn(2, 19, 33, 31, generator=gen) * 3
    teacher = student + 1e-4 * torch.randn(student.shape, generator=gen)
    kl = channel_kl(student, teacher, 1.0, backend="torch")
    assert (kl >= 0).all()
    ref_kl, _ = channel_kl_reference(student, teacher, 1.0)
    torch.testing.assert_close(kl.double(), ref_kl, rtol=0, atol=2e-6)


def test_row_blocks_cover_every_row(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tiny blocks: several rows per block with a ragged last block (L=4), and rows longer than a block
    # (L=33). Fresh allocations are poisoned with NaN, so a row the loop skips would show up.
    original_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        out = original_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(_torch_backend, "_BLOCK_ELEMENTS", 10)
    monkeypatch.setattr(torch, "empty", poisoned_empty)
    monkeypatch.setattr(torch, "empty_like", lambda x, **kw: poisoned_empty(x.shape, dtype=kw.get("dtype", x.dtype)))
    for shape in [(3, 7, 4), (2, 3, 33)]:
        student, teacher = _pair(shape, torch.float64)
        student.requires_grad_()
        kl, sqdist = channel_kl(student, teacher, 1.0, return_sqdist=True, backend="torch")
        grad_kl = torch.rand(shape[:2], dtype=torch.float64)
        kl.backward(grad_kl)
        ref_kl, ref_sqdist = channel_kl_reference(student.detach(), teacher, 1.0)
        torch.testing.assert_close(kl, ref_kl)
        torch.testing.assert_close(sqdist, ref_sqdist)
        torch.testing.assert_close(student.grad, _reference_grad(student, teacher, 1.0, grad_kl))


def _saved_tensors(run) -> tuple[list[torch.Tensor], object]:
    """The tensors autograd saves while ``run()`` builds its graph, and what ``run()`` returned."""
    saved: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = run()
    return saved, out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("return_sqdist", [False, True])
def test_saves_only_inputs_and_per_row_statistics(dtype: torch.dtype, return_sqdist: bool) -> None:
    # The contract of the Triton backend, and of the torch backend on CUDA: ChannelKLFunction without
    # keep_direction, as channel_kl calls it there (on CPU the torch backend keeps p_S - p_T, below).
    shape = (2, 3, 16, 16)
    rows = shape[0] * shape[1]
    student, teacher = _pair(shape, dtype)
    student.requires_grad_()
    student_rows, teacher_rows = student.reshape(rows, -1), teacher.reshape(rows, -1)
    saved, out = _saved_tensors(
        lambda: ChannelKLFunction.apply(student_rows, teacher_rows, 2.0, return_sqdist, "torch")
    )
    assert saved, "expected the autograd node to save something"
    input_storages = {student.untyped_storage().data_ptr(), teacher.untyped_storage().data_ptr()}
    for tensor in saved:
        is_input = tensor.untyped_storage().data_ptr() in input_storages
        is_row_statistic = tensor.shape == (rows,)
        assert is_input or is_row_statistic, f"saved a tensor of shape {tuple(tensor.shape)} that is not an input"
    out[0].sum().backward()  # the saved tensors are enough for the backward pass
    torch.testing.assert_close(
        student.grad.double(), _reference_grad(student, teacher, 2.0, torch.ones(shape[:2])), **GRAD_TOLERANCES[dtype]
    )


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("return_sqdist", [False, True])
def test_cpu_torch_backend_saves_only_the_probability_difference(dtype: torch.dtype, return_sqdist: bool) -> None:
    # On CPU, with a gradient to compute, the forward keeps p_S - p_T in the compute dtype (fp32 for
    # half precision) and nothing else; the backward is one multiply, and can run twice.
    shape = (2, 3, 16, 16)
    student, teacher = _pair(shape, dtype)
    student.requires_grad_()
    saved, out = _saved_tensors(lambda: channel_kl(student, teacher, 2.0, return_sqdist=return_sqdist, backend="torch"))
    (direction,) = saved
    assert direction.shape == (6, 256)
    assert direction.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    kl = out[0] if isinstance(out, tuple) else out
    grad_kl = torch.linspace(-1.0, 2.0, 6, dtype=torch.float64).reshape(2, 3)
    kl.backward(grad_kl.to(kl.dtype), retain_graph=True)
    expected = _reference_grad(student, teacher, 2.0, grad_kl)
    torch.testing.assert_close(student.grad.double(), expected, **GRAD_TOLERANCES[dtype])
    first = student.grad.clone()
    kl.backward(grad_kl.to(kl.dtype))  # retain_graph: the saved difference is still intact
    torch.testing.assert_close(student.grad, 2 * first, rtol=0, atol=0)


def test_probability_difference_is_kept_only_when_a_gradient_is_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, ...]] = []
    original = _torch_backend.new_direction
    monkeypatch.setattr(_torch_backend, "new_direction", lambda x: calls.append(tuple(x.shape)) or original(x))
    student, teacher = _pair((2, 3, 5), torch.float32)
    channel_kl(student, teacher, backend="torch")  # no gradient wanted
    student.requires_grad_()
    with torch.no_grad():
        channel_kl(student, teacher, backend="torch")
    with torch.inference_mode():
        channel_kl(student, teacher, backend="torch")
    assert calls == []
    channel_kl(student, teacher, backend="torch")
    assert calls == [(6, 5)]
    assert not keeps_direction(torch.zeros(2, device="meta", requires_grad=True), "torch")  # CPU only
    assert not keeps_direction(student, "triton")


def test_trailing_size_one_gives_zero() -> None:
    student, teacher = _pair((3, 4, 1), torch.float32)
    kl, sqdist = channel_kl(student, teacher, 1.0, return_sqdist=True, backend="torch")
    assert kl.abs().max() == 0
    assert sqdist.abs().max() == 0


# ---- backend selection -------------------------------------------------------------------------


class _FakeTritonLauncher(types.ModuleType):
    """Stands in for the Triton launcher module; records that it was called."""

    def __init__(self) -> None:
        super().__init__("fake_triton_backend")
        self.calls = 0

    def forward(self, student, teacher, tau, need_sqdist):
        self.calls += 1
        return _torch_backend.forward(student, teacher, tau, need_sqdist)

    def backward(self, student, teacher, lse_s, lse_t, grad_kl, tau):
        self.calls += 1
        return _torch_backend.backward(student, teacher, lse_s, lse_t, grad_kl, tau)


@pytest.fixture
def fake_triton(monkeypatch: pytest.MonkeyPatch) -> _FakeTritonLauncher:
    fake = _FakeTritonLauncher()
    monkeypatch.setattr(channel_kl_module, "_triton_module", lambda: fake)
    monkeypatch.setattr(_selfcheck, "triton_works", lambda device, dtype: True)  # tests/ops/test_selfcheck.py
    monkeypatch.delenv("SEGKD_DISABLE_TRITON", raising=False)
    return fake


def test_auto_picks_triton_on_cuda_and_torch_on_cpu(fake_triton: _FakeTritonLauncher) -> None:
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cuda")) == "triton"
    assert resolve_backend("torch", torch.device("cuda")) == "torch"
    assert resolve_backend("triton", torch.device("cpu")) == "triton"
    assert available_backends() == ["torch", "triton"]


def test_disable_triton_env_forces_torch(fake_triton: _FakeTritonLauncher, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGKD_DISABLE_TRITON", "1")
    assert resolve_backend("auto", torch.device("cuda")) == "torch"
    assert resolve_backend("triton", torch.device("cuda")) == "torch"
    assert available_backends() == ["torch"]
    student, teacher = _pair((1, 2, 3, 3), torch.float32)
    channel_kl(student.requires_grad_(), teacher, 1.0, backend="triton").sum().backward()
    assert fake_triton.calls == 0


def test_explicit_triton_backend_is_dispatched(fake_triton: _FakeTritonLauncher) -> None:
    student, teacher = _pair((1, 2, 3, 3), torch.float32)
    channel_kl(student.requires_grad_(), teacher, 1.0, backend="triton").sum().backward()
    assert fake_triton.calls == 2  # forward and backward


def test_triton_backend_unavailable_errors_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channel_kl_module, "_triton_module", lambda: None)
    monkeypatch.delenv("SEGKD_DISABLE_TRITON", raising=False)
    student, teacher = _pair((1, 2, 3, 3), torch.float32)
    with pytest.raises(RuntimeError, match=r"backend='triton'.*Triton is not available.*pip install segkd\[triton\]"):
        channel_kl(student, teacher, 1.0, backend="triton")
    assert resolve_backend("auto", torch.device("cuda")) == "torch"
    assert available_backends() == ["torch"]


def test_unknown_backend_is_rejected() -> None:
    student, teacher = _pair((1, 2, 3), torch.float32)
    with pytest.raises(ValueError, match=r"Expected `backend` to be one of 'auto', 'torch', 'triton', got 'cuda'"):
        channel_kl(student, teacher, 1.0, backend="cuda")
