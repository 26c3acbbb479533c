"""The Triton backend of channel_kl against an independent float64 reference and the torch backend.

On a machine without CUDA the kernels run under the Triton interpreter, which must be switched on
before Triton is first imported (``TRITON_INTERPRET=1``; the root conftest.py sets it). Shapes are
small because the interpreter is slow; block sizes are shrunk in some tests so that rows cross
several chunks and programs hold several rows with a masked tail.
"""

from __future__ import annotations

import decimal
import importlib
import os
import sys

import numpy as np
import pytest
import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # effective only if nothing imported Triton earlier

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install segkd[triton])")

from segkd.losses.cwd import cwd_loss  # noqa: E402
from segkd.losses.hwd import hwd_loss  # noqa: E402
from segkd.ops import _triton_backend, _triton_kernels  # noqa: E402
from segkd.ops.channel_kl import available_backends, channel_kl, resolve_backend  # noqa: E402

channel_kl_module = importlib.import_module("segkd.ops.channel_kl")
INTERPRETED = _triton_backend._is_interpreted(_triton_kernels.channel_kl_forward_kernel)
DEVICE = torch.device("cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda")

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(
        DEVICE.type == "cpu" and not INTERPRETED,
        reason="no CUDA, and Triton was imported before TRITON_INTERPRET=1 was set (set it in conftest.py)",
    ),
]

# Statistics are compared after rounding the inputs to the dtype (the reference sees the rounded
# values), so every dtype gets accumulation tolerances; gradients are rounded once to the dtype, and
# their "atol" is relative to the largest |grad_kl / tau * p| of the row set (fp32 exp arguments such
# as s / tau - lse ~ 10 carry ~1e-6 absolute rounding, so p carries ~1e-6 relative error).
TOLERANCES = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-12},
    torch.float32: {"rtol": 2e-5, "atol": 2e-6},
    torch.float16: {"rtol": 2e-5, "atol": 2e-6},
    torch.bfloat16: {"rtol": 2e-5, "atol": 2e-6},
}
GRAD_TOLERANCES = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-14},
    torch.float32: {"rtol": 1e-4, "atol": 4e-6},
    torch.float16: {"rtol": 2e-3, "atol": 4e-6},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 4e-6},
}
FP16_SUBNORMAL_STEP = 6e-8
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def reference(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> tuple[torch.Tensor, ...]:
    """kl, sqdist (N, C) and the softmaxes p_S, p_T (N, C, L), in float64, from the definitions."""
    s = student.detach().to(torch.float64).flatten(2) / tau
    t = teacher.detach().to(torch.float64).flatten(2) / tau
    log_p_s = s - s.amax(dim=2, keepdim=True)
    log_p_s = log_p_s - log_p_s.exp().sum(dim=2, keepdim=True).log()
    log_p_t = t - t.amax(dim=2, keepdim=True)
    log_p_t = log_p_t - log_p_t.exp().sum(dim=2, keepdim=True).log()
    p_s, p_t = log_p_s.exp(), log_p_t.exp()
    kl = (p_t * (log_p_t - log_p_s)).sum(dim=2)
    sqdist = (p_s - p_t).square().sum(dim=2)
    return kl, sqdist, p_s, p_t


def _pair(shape: tuple[int, ...], dtype: torch.dtype, scale: float = 3.0, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    teacher = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    return student.to(DEVICE), teacher.to(DEVICE)


def _run(student: torch.Tensor, teacher: torch.Tensor, tau: float, backend: str, grad_kl: torch.Tensor) -> tuple:
    student = student.detach().clone().requires_grad_()
    kl, sqdist = channel_kl(student, teacher, tau, return_sqdist=True, backend=backend)  # type: ignore[arg-type]
    (kl * grad_kl).sum().backward()
    assert student.grad is not None
    return kl, sqdist, student.grad


def _check_against_reference(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> None:
    dtype = student.dtype
    grad_kl = torch.randn(student.shape[:2], generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    kl, sqdist, grad = _run(student, teacher, tau, "triton", grad_kl.to(DEVICE))
    ref_kl, ref_sqdist, p_s, p_t = reference(student, teacher, tau)
    ref_grad = grad_kl.to(DEVICE)[..., None] / tau * (p_s - p_t)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    assert kl.dtype == sqdist.dtype == compute
    assert grad.dtype == dtype
    assert kl.shape == sqdist.shape == student.shape[:2]
    assert grad.shape == student.shape
    torch.testing.assert_close(kl.double(), ref_kl, **TOLERANCES[dtype])
    torch.testing.assert_close(sqdist.double(), ref_sqdist, **TOLERANCES[dtype])
    grad_tol = _grad_tolerance(dtype, grad_kl.to(DEVICE)[..., None] / tau * torch.maximum(p_s, p_t))
    torch.testing.assert_close(grad.double(), ref_grad.view(student.shape), **grad_tol)
    # and the torch backend (the reference implementation) agrees; its KL, sum p_T (t - s) - (lse_T - lse_S),
    # carries an absolute rounding error ~eps * |x / tau|, hence the scaled atol.
    t_kl, t_sqdist, t_grad = _run(student, teacher, tau, "torch", grad_kl.to(DEVICE))
    logit_scale = 1.0 + float(torch.maximum(student.abs().max(), teacher.abs().max())) / tau
    kl_tol = {"rtol": TOLERANCES[dtype]["rtol"], "atol": TOLERANCES[dtype]["atol"] * logit_scale}
    torch.testing.assert_close(kl, t_kl, **kl_tol)
    torch.testing.assert_close(sqdist, t_sqdist, **TOLERANCES[dtype])
    torch.testing.assert_close(grad.double(), t_grad.double(), **grad_tol)


def _grad_tolerance(dtype: torch.dtype, scale: torch.Tensor) -> dict[str, float]:
    tol = GRAD_TOLERANCES[dtype]
    atol = tol["atol"] * float(scale.abs().max())
    if dtype == torch.float16:
        atol = max(atol, FP16_SUBNORMAL_STEP)
    return {"rtol": tol["rtol"], "atol": atol}


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every buffer the launchers allocate starts as NaN, so an element left unwritten shows."""

    def new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(_triton_backend, "_new_output", new_output)


@pytest.fixture
def tiny_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 8 columns and tiles of 16 elements: rows cross chunks, programs hold 2-4 rows."""
    monkeypatch.setattr(_triton_backend, "FORWARD_MAX_BLOCK_L", 8)
    monkeypatch.setattr(_triton_backend, "BACKWARD_MAX_BLOCK_L", 8)
    monkeypatch.setattr(_triton_backend, "TARGET_TILE_ELEMENTS", 16)
    monkeypatch.setattr(_triton_backend, "MAX_ROWS_PER_PROGRAM", 4)


SHAPES = [
    (1, 1, 1, 1),  # L = 1: p = 1, kl = sqdist = 0
    (2, 3, 5, 7),  # L = 35: odd, masked tail
    (1, 13, 3),  # 13 rows of 3: packed rows with a masked row tail
    (3, 5, 1, 9),
    (1, 2, 300),  # a few hundred: several rows of one chunk each
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference_default_blocks(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    student, teacher = _pair(shape, dtype)
    _check_against_reference(student, teacher, tau=2.0)


@pytest.mark.usefixtures("tiny_blocks")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 7, 8), (1, 5, 17), (3, 3, 64)], ids=str)
def test_matches_reference_across_chunks(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    student, teacher = _pair(shape, dtype, seed=3)
    _check_against_reference(student, teacher, tau=4.0)


def test_plan_segments_splits_only_few_long_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_triton_backend, "FORWARD_MAX_BLOCK_L", 8)
    monkeypatch.setattr(_triton_backend, "MIN_SEGMENT_ELEMENTS", 8)
    monkeypatch.setattr(_triton_backend, "_target_programs", lambda device: 12)
    plan = _triton_backend.plan_segments
    # Short rows are packed several to a program, so each case below is one program of rows to begin with.
    # 3 rows of 37: 37 // 8 = 4 segments at most, of 10 columns rounded up to whole chunks: 16 + 16 + 5.
    assert plan(3, 37, DEVICE) == (3, 16)
    # 2 rows of 64: 8 segments of one chunk each (the most that 64 // 8 allows; 12 programs are wanted).
    assert plan(2, 64, DEVICE) == (8, 8)
    # 1 row of 100: 12 segments wanted and allowed, of 9 columns rounded up to 16: 7 segments.
    assert plan(1, 100, DEVICE) == (7, 16)
    assert plan(1000, 100, DEVICE) == (1, 100)  # 16 programs of 64 rows: enough already
    assert plan(1, 15, DEVICE) == (1, 15)  # too short for two segments
    monkeypatch.setattr(_triton_backend, "SPLIT_ROWS", False)
    assert plan(1, 100, DEVICE) == (1, 100)


def test_plan_segments_defaults() -> None:
    # The interpreter never splits by itself; on a GPU, 152 rows of 8192 (CWD at 8x19x64x128) are split
    # in four when the GPU has more than 38 multiprocessors.
    if DEVICE.type == "cpu":
        assert _triton_backend.plan_segments(152, 8192, DEVICE) == (1, 8192)
    elif _triton_backend._target_programs(DEVICE) > 152:
        assert _triton_backend.plan_segments(152, 8192, DEVICE) == (4, 2048)
    assert _triton_backend.plan_segments(100_000, 8192, DEVICE) == (1, 8192)


SPLIT_SHAPES = [(2, 3, 5, 7), (1, 5, 17), (3, 3, 64), (1, 2, 300), (2, 1, 16)]


@pytest.mark.usefixtures("split_rows")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SPLIT_SHAPES, ids=str)
def test_split_rows_match_reference(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    # Rows cut into segments of whole chunks (and a short last one), combined by the chain rule of the KL.
    rows, length = shape[0] * shape[1], int(np.prod(shape[2:]))
    assert _triton_backend.plan_segments(rows, length, DEVICE)[0] > 1
    student, teacher = _pair(shape, dtype, seed=5)
    _check_against_reference(student, teacher, tau=1.5)


@pytest.mark.usefixtures("split_rows")
def test_split_rows_with_large_segment_offsets() -> None:
    # One segment holds the row's mass (its max is 40 above the others'): the other segments' weights
    # w_k ~ exp(-40) must neither underflow into NaN nor lose the dominant segment's digits.
    student, teacher = _pair((1, 2, 40), torch.float32, seed=6)
    student[..., 8:16] += 40.0
    teacher[..., 24:32] += 40.0
    _check_against_reference(student, teacher, tau=1.0)


@pytest.mark.parametrize("tau", [0.3, 1.7])
def test_float64_keeps_float64_accuracy_for_any_tau(tau: float) -> None:
    # Compiled Triton passes Python floats as fp32; 1/tau is split in two so fp64 stays fp64.
    student, teacher = _pair((2, 3, 11), torch.float64, seed=4)
    _check_against_reference(student, teacher, tau=tau)


def test_tile_choice_crosses_chunks_with_tiny_blocks(tiny_blocks: None) -> None:
    # The fixture really makes rows of 17 cross three chunks and packs several rows per program.
    assert _triton_backend._tile(17, 10, _triton_backend.FORWARD_MAX_BLOCK_L) == (2, 8)
    assert _triton_backend._tile(3, 10, _triton_backend.FORWARD_MAX_BLOCK_L) == (4, 4)


def test_long_rows_with_default_blocks() -> None:
    # 16500 positions: more than 8 chunks of the default 2048, not a power of two.
    student, teacher = _pair((1, 2, 16500), torch.float32, seed=5)
    _check_against_reference(student, teacher, tau=4.0)


def test_many_rows() -> None:
    # 100k rows of 3 on CUDA (10k under the slow interpreter): many programs, packed rows.
    batch = 1000 if DEVICE.type == "cuda" else 100
    student, teacher = _pair((batch, 100, 3), torch.float32, seed=6)
    _check_against_reference(student, teacher, tau=1.0)


@pytest.mark.parametrize("split", [False, True], ids=["whole-rows", "split-rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_inputs(dtype: torch.dtype, split: bool, request: pytest.FixtureRequest) -> None:
    if split:  # rows of 35 in segments of 16, 16 and 3, read at each layout's row stride
        request.getfixturevalue("split_rows")
    base_s, base_t = _pair((2, 6, 5, 7), dtype, seed=7)
    for student, teacher in [
        (base_s.transpose(2, 3), base_t.transpose(2, 3)),  # rows not contiguous
        (base_s[:, ::2], base_t[:, 1::2]),  # strided channels
        (base_s.permute(1, 0, 2, 3)[:3].permute(1, 0, 2, 3), base_t[:, :3]),  # mixed layouts
    ]:
        _check_against_reference(student, teacher, tau=1.5)


def test_row_stride_kept_without_copy() -> None:
    # Rows with unit inner stride but a row stride > L are read in place.
    student, teacher = _pair((4, 20), torch.float32, seed=8)
    rows_s, rows_t = student[:, 3:14], teacher[:, 3:14]
    kl, sqdist, stats_s, stats_t = _triton_backend.forward(rows_s, rows_t, 2.0, True)
    ref_kl, ref_sqdist, _, _ = reference(rows_s[None], rows_t[None], 2.0)
    torch.testing.assert_close(kl.double(), ref_kl[0], **TOLERANCES[torch.float32])
    torch.testing.assert_close(sqdist.double(), ref_sqdist[0], **TOLERANCES[torch.float32])
    # Statistics (max, log z) per row: the raw row max, and lse = max / tau + log z.
    for stats, rows in ((stats_s, rows_s), (stats_t, rows_t)):
        assert stats.shape == (4, 2)
        torch.testing.assert_close(stats[:, 0], rows.amax(dim=1), rtol=0, atol=0)
        torch.testing.assert_close(stats[:, 0] / 2.0 + stats[:, 1], torch.logsumexp(rows / 2.0, dim=1))


def _reference_longdouble(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> tuple[np.ndarray, ...]:
    """kl and sqdist in numpy's extended precision (64-bit mantissa on x86), for fp64 inputs."""
    s = student.detach().cpu().numpy().astype(np.longdouble).reshape(*student.shape[:2], -1) / tau
    t = teacher.detach().cpu().numpy().astype(np.longdouble).reshape(*teacher.shape[:2], -1) / tau
    log_p_s = s - s.max(axis=2, keepdims=True)
    log_p_s = log_p_s - np.log(np.exp(log_p_s).sum(axis=2, keepdims=True))
    log_p_t = t - t.max(axis=2, keepdims=True)
    log_p_t = log_p_t - np.log(np.exp(log_p_t).sum(axis=2, keepdims=True))
    p_s, p_t = np.exp(log_p_s), np.exp(log_p_t)
    return (p_t * (log_p_t - log_p_s)).sum(axis=2), ((p_s - p_t) ** 2).sum(axis=2)


@pytest.mark.parametrize("split", [False, True], ids=["whole-rows", "split-rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_near_identical_inputs_keep_their_digits(
    dtype: torch.dtype, split: bool, request: pytest.FixtureRequest
) -> None:
    if split:
        request.getfixturevalue("split_rows")
    # p_S ~ p_T (relative differences ~1e-4): an online sum p_S^2 - 2 sum p_S p_T + sum p_T^2, or
    # sum p_T (t - s) - (lse_T - lse_S), would cancel; the two-pass kernel keeps the digits.
    gen = torch.Generator().manual_seed(9)
    teacher = torch.randn(2, 4, 40, generator=gen, dtype=torch.float64) * 2
    student = teacher + 1e-4 * torch.randn(2, 4, 40, generator=gen, dtype=torch.float64)
    student, teacher = student.to(dtype).to(DEVICE), teacher.to(dtype).to(DEVICE)
    kl, sqdist = channel_kl(student, teacher, 1.0, return_sqdist=True, backend="triton")
    if np.finfo(np.longdouble).eps >= np.finfo(np.float64).eps:
        pytest.skip("numpy has no extended precision on this platform")
    ref_kl, ref_sqdist = (torch.from_numpy(x.astype(np.float64)) for x in _reference_longdouble(student, teacher, 1.0))
    assert float(ref_kl.min()) > 1e-10
    assert float(ref_sqdist.min()) > 1e-10
    # Uncorrected, the KL would be off by the square of the rounding of log(z_T / z_S) (~1e-7 in fp32), the
    # squared distance by its first power: relative to d = log p_T - log p_S ~ 1e-4 that is ~1e-3 (the kernel
    # corrects both with the sum of the differences, see the forward kernel).
    kl_rtol, sqdist_rtol = (2e-6, 2e-6) if dtype == torch.float32 else (1e-10, 1e-9)
    torch.testing.assert_close(kl.double().cpu(), ref_kl, rtol=kl_rtol, atol=0.0)
    torch.testing.assert_close(sqdist.double().cpu(), ref_sqdist, rtol=sqdist_rtol, atol=0.0)
    # The one-pass expansion in the same precision is far off: this test can tell the two apart.
    p_s = torch.softmax(student.flatten(2), dim=2)
    p_t = torch.softmax(teacher.flatten(2), dim=2)
    expanded = (p_s * p_s).sum(2) - 2 * (p_s * p_t).sum(2) + (p_t * p_t).sum(2)
    assert float(((expanded.double().cpu() - ref_sqdist) / ref_sqdist).abs().max()) > 10 * sqdist_rtol


def test_identical_inputs_give_zero() -> None:
    student, _ = _pair((2, 3, 37), torch.float32, seed=10)
    kl, sqdist, grad = _run(student, student.clone(), 2.0, "triton", torch.ones(2, 3, device=DEVICE))
    assert float(kl.detach().abs().max()) == 0.0
    assert float(sqdist.abs().max()) == 0.0
    assert float(grad.abs().max()) < 1e-7


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_large_logits_stay_finite(dtype: torch.dtype) -> None:
    student, teacher = _pair((2, 3, 5, 7), dtype, scale=1e4, seed=11)
    kl, sqdist, grad = _run(student, teacher, 1.0, "triton", torch.ones(2, 3, device=DEVICE))
    assert bool(torch.isfinite(kl).all() and torch.isfinite(sqdist).all() and torch.isfinite(grad).all())
    ref_kl, ref_sqdist, _, _ = reference(student, teacher, 1.0)
    torch.testing.assert_close(kl.double(), ref_kl, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(sqdist.double(), ref_sqdist, rtol=1e-5, atol=1e-6)


def test_small_fp16_gradients_are_not_flushed() -> None:
    # 128x128 rows with p_S ~ p_T: (p_S - p_T) / tau ~ 4e-8 is below fp16's smallest normal (6e-5)
    # and mostly flushes; times grad_output = 1e3 it is ~4e-5, which fp16 holds when folded in first.
    gen = torch.Generator().manual_seed(12)
    teacher = torch.randn(1, 1, 128, 128, generator=gen, dtype=torch.float64)
    student = (teacher + 1e-2 * torch.randn(1, 1, 128, 128, generator=gen, dtype=torch.float64)).half().to(DEVICE)
    teacher = teacher.half().to(DEVICE)
    _, _, grad = _run(student, teacher, 4.0, "triton", torch.full((1, 1), 1e3, device=DEVICE))
    _, _, p_s, p_t = reference(student, teacher, 4.0)
    unfused = ((p_s - p_t) / 4.0).half()
    assert float((unfused == 0).double().mean()) > 0.3  # rounding before grad_output would lose these
    ref = (1e3 / 4.0 * (p_s - p_t)).view(student.shape)
    assert float((grad == 0).double().mean()) < 0.01
    torch.testing.assert_close(grad.double(), ref, rtol=2e-3, atol=FP16_SUBNORMAL_STEP)


def test_teacher_gets_no_gradient_and_sqdist_none() -> None:
    student, teacher = _pair((2, 3, 9), torch.float32, seed=13)
    student.requires_grad_()
    teacher.requires_grad_()
    kl, sqdist = channel_kl(student, teacher, 2.0, return_sqdist=True, backend="triton")
    assert not sqdist.requires_grad
    kl.sum().backward()
    assert teacher.grad is None
    assert student.grad is not None


def test_gradcheck_float64() -> None:
    student, teacher = _pair((1, 2, 5), torch.float64, seed=14)
    student.requires_grad_()
    assert torch.autograd.gradcheck(lambda s: channel_kl(s, teacher, 1.5, backend="triton"), (student,))


@pytest.mark.parametrize("distance", ["prob", "logits"])
def test_hwd_and_cwd_do_not_depend_on_backend(distance: str) -> None:
    student, teacher = _pair((2, 5, 6, 7), torch.float32, seed=15)
    losses = {}
    for backend in ("torch", "triton"):
        s = student.clone().requires_grad_()
        loss = hwd_loss(s, teacher, 4.0, 1.0, 0.1, distance, backend=backend) + cwd_loss(s, teacher, backend=backend)
        loss.backward()
        losses[backend] = (loss.detach(), s.grad)
    torch.testing.assert_close(losses["triton"][0], losses["torch"][0], rtol=1e-5, atol=1e-7)
    grad_scale = float(losses["torch"][1].abs().max())
    torch.testing.assert_close(losses["triton"][1], losses["torch"][1], rtol=1e-4, atol=1e-5 * grad_scale)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_matches_eager(backend: str) -> None:
    # aot_eager runs Dynamo and AOTAutograd (the fake-tensor and autograd registrations of the
    # custom op) without Inductor's C++ build; fullgraph=True proves there is no graph break.
    torch._dynamo.reset()
    student, teacher = _pair((2, 4, 5, 6), torch.float32, seed=16)

    def loss_fn(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return hwd_loss(s, t, 4.0, 0.0, 0.1, backend=backend) + 0.5 * cwd_loss(s, t, backend=backend)  # type: ignore[arg-type]

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    s_eager, s_compiled = student.clone().requires_grad_(), student.clone().requires_grad_()
    eager = loss_fn(s_eager, teacher)
    eager.backward()
    out = compiled(s_compiled, teacher)
    out.backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(s_compiled.grad, s_eager.grad)
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_custom_ops_pass_opcheck(backend: str) -> None:
    # Schema, fake (meta) implementation, autograd registration and AOT dispatch of the torch.library ops.
    forward_op = channel_kl_module._channel_kl_forward_op
    backward_op = channel_kl_module._channel_kl_backward_op
    if forward_op is None:
        pytest.skip("torch.library.custom_op needs torch >= 2.4")
    student, teacher = _pair((6, 35), torch.float32, seed=20)
    for need_sqdist in (True, False):
        torch.library.opcheck(forward_op, (student.requires_grad_(), teacher, 2.0, need_sqdist, backend))
    _, _, stats_s, stats_t = forward_op(student.detach(), teacher, 2.0, True, backend)
    grad_kl = torch.randn(6, generator=torch.Generator().manual_seed(21)).to(DEVICE)
    torch.library.opcheck(backward_op, (student.detach(), teacher, stats_s, stats_t, grad_kl, 2.0, backend))


def test_autocast_bf16_inputs_match_plain_bf16() -> None:
    student, teacher = _pair((2, 4, 5, 6), torch.float32, seed=17)
    weight = torch.randn(4, 4, 1, 1, generator=torch.Generator().manual_seed(18)).to(DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        logits = torch.nn.functional.conv2d(student, weight)
        assert logits.dtype == torch.bfloat16
        under_autocast = channel_kl(logits, teacher, 2.0, backend="triton")
    plain = channel_kl(logits.detach(), teacher, 2.0, backend="torch")
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, plain, rtol=1e-5, atol=1e-6)


def test_auto_picks_torch_for_cpu_and_env_forces_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_forward = _triton_backend.forward

    def counting_forward(*args: object) -> object:
        calls.append(1)
        return real_forward(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(_triton_backend, "forward", counting_forward)
    student, teacher = _pair((1, 2, 6), torch.float32, seed=19)
    assert "triton" in available_backends()
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    channel_kl(student.cpu(), teacher.cpu(), backend="auto")
    assert not calls
    channel_kl(student, teacher, backend="triton")
    assert len(calls) == 1
    monkeypatch.setenv("SEGKD_DISABLE_TRITON", "1")
    assert resolve_backend("triton", DEVICE) == "torch"
    assert resolve_backend("auto", torch.device("cuda")) == "torch"
    assert available_backends() == ["torch"]
    channel_kl(student, teacher, backend="triton")
    assert len(calls) == 1
    assert channel_kl_module._launcher("torch").__name__ == "segkd.ops._torch_backend"


def test_cpu_tensors_without_interpreter_raise() -> None:
    compiled_only = object()  # stands for a kernel that triton.jit compiled (no interpreter)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _triton_backend._kernel_for(compiled_only, torch.device("cpu"))


def _reference_decimal(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """kl and sqdist per row of ``(R, L)`` inputs in 40-digit decimal arithmetic, from the definitions.

    Exact in the inputs (``Decimal(float)`` is exact) and in ``tau``; independent of float rounding, so it
    measures the kernel's own error to ~1e-16 relative whatever the inputs' magnitude.
    """
    kls, sqdists = [], []
    with decimal.localcontext() as ctx:
        ctx.prec = 40
        inverse = 1 / decimal.Decimal(tau)
        for s_row, t_row in zip(student.double().cpu().tolist(), teacher.double().cpu().tolist(), strict=True):
            log_p = []
            for row in (s_row, t_row):
                scaled = [decimal.Decimal(x) * inverse for x in row]
                top = max(scaled)
                log_z = sum((x - top).exp() for x in scaled).ln()
                log_p.append([x - top - log_z for x in scaled])
            kls.append(float(sum(lt.exp() * (lt - ls) for ls, lt in zip(*log_p, strict=True))))
            sqdists.append(float(sum((ls.exp() - lt.exp()) ** 2 for ls, lt in zip(*log_p, strict=True))))
    return torch.tensor(kls, dtype=torch.float64), torch.tensor(sqdists, dtype=torch.float64)


@pytest.mark.parametrize("split", [False, True], ids=["whole-rows", "split-rows"])
@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_float64_near_identical_rows_have_float64_accuracy(
    tau: float, split: bool, request: pytest.FixtureRequest
) -> None:
    if split:
        request.getfixturevalue("split_rows")
    # d = log p_T - log p_S ~ 0.1: inside the Taylor branch of the kernel, whose truncation must stay below
    # fp64 rounding (a 6th-order series there is off by ~1e-9 relative).
    gen = torch.Generator().manual_seed(22)
    teacher = torch.randn(4, 24, generator=gen, dtype=torch.float64) * 2
    student = teacher + 0.1 * torch.randn(4, 24, generator=gen, dtype=torch.float64)
    kl, sqdist = _triton_backend.forward(student.to(DEVICE), teacher.to(DEVICE), tau, True)[:2]
    assert sqdist is not None
    ref_kl, ref_sqdist = _reference_decimal(student, teacher, tau)
    torch.testing.assert_close(kl.cpu(), ref_kl, rtol=1e-14, atol=0.0)
    torch.testing.assert_close(sqdist.cpu(), ref_sqdist, rtol=1e-13, atol=0.0)


LARGE_LOGIT_CASES = {
    # name: (dtype, student offset, teacher offset, spread, near-identical noise, tau)
    "offset_1e4_tau1": (torch.float32, 1e4, 1e4, 3.0, 0.0, 1.0),
    "offset_1e3_tau0.5": (torch.float32, 1e3, 1e3, 3.0, 0.0, 0.5),
    "offset_1e4_near_identical": (torch.float32, 1e4, 1e4, 3.0, 0.03, 1.0),
    "opposite_offsets": (torch.float32, 1e4, -1e4, 3.0, 0.0, 1.0),
    "bf16_offset_1e4_tau0.5": (torch.bfloat16, 1e4, 1e4, 300.0, 0.0, 0.5),
}


def _large_logit_rows(case: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """``(student, teacher, noise, tau)``: three rows of 21 of a ``LARGE_LOGIT_CASES`` case, on the CPU."""
    dtype, s_offset, t_offset, spread, noise, tau = LARGE_LOGIT_CASES[case]
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(3, 21, generator=gen, dtype=torch.float64) * spread
    if noise:  # the student is the teacher plus small noise
        student = (s_offset + base + noise * torch.randn(3, 21, generator=gen, dtype=torch.float64)).to(dtype)
    else:
        student = (s_offset + spread * torch.randn(3, 21, generator=gen, dtype=torch.float64)).to(dtype)
    return student, (t_offset + base).to(dtype), noise, tau


@pytest.mark.usefixtures("tiny_blocks")
@pytest.mark.parametrize("split", [False, True], ids=["whole-rows", "split-rows"])
@pytest.mark.parametrize("case", LARGE_LOGIT_CASES, ids=str)
def test_large_logits_keep_fp32_accuracy(case: str, split: bool, request: pytest.FixtureRequest) -> None:
    if split:
        request.getfixturevalue("split_rows")
    # |x| / tau ~ 1e4 with softmax spreads of a few units: exp(x / tau - lse) would carry the fp32 rounding of
    # lse (~1e-3 absolute at 1e4), i.e. ~1e-3 relative in every p. The kernel subtracts the row max before
    # scaling and must stay at fp32 rounding of the (rounded) inputs. Rows of 21 cross three chunks of 8.
    student, teacher, noise, tau = _large_logit_rows(case, seed=23)
    kl, sqdist = _triton_backend.forward(student.to(DEVICE), teacher.to(DEVICE), tau, True)[:2]
    assert sqdist is not None
    ref_kl, ref_sqdist = _reference_decimal(student, teacher, tau)
    assert float(ref_kl.min()) > 1e-4  # far from the subnormal range: a relative comparison means something
    torch.testing.assert_close(kl.double().cpu(), ref_kl, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(sqdist.double().cpu(), ref_sqdist, rtol=2e-6 if noise else 1e-6, atol=0.0)


@pytest.mark.usefixtures("tiny_blocks")
@pytest.mark.parametrize("case", LARGE_LOGIT_CASES, ids=str)
def test_large_logits_keep_fp32_accuracy_in_the_backward(case: str) -> None:
    # The backward forms p = exp((x - max) / tau - log z) from the stored (max, log z): with
    # exp(x / tau - lse) the gradient of these cases was off by ~1e-3 relative (fp32 rounding of lse).
    student, teacher, _, tau = _large_logit_rows(case, seed=24)
    dtype = student.dtype
    grad_kl = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float32)
    _, _, stats_s, stats_t = _triton_backend.forward(student.to(DEVICE), teacher.to(DEVICE), tau, False)
    grad = _triton_backend.backward(student.to(DEVICE), teacher.to(DEVICE), stats_s, stats_t, grad_kl.to(DEVICE), tau)
    s64, t64 = student.double(), teacher.double()
    p_s = torch.softmax((s64 - s64.amax(1, keepdim=True)) / tau, dim=1)
    p_t = torch.softmax((t64 - t64.amax(1, keepdim=True)) / tau, dim=1)
    expected = grad_kl.double()[:, None] / tau * (p_s - p_t)
    assert grad.dtype == dtype
    error = ((grad.double().cpu() - expected).abs().max() / expected.abs().max()).item()
    # One rounding into the input dtype, plus fp32 exponents (x - max) / tau of ~10-100 (~1e-5 relative in p).
    rounding = torch.finfo(dtype).eps
    assert error < 4 * rounding + 1e-5, f"relative gradient error {error:.2e}"
