"""The PyTorch launchers of channel_kl (``segkd.ops._torch_backend``) called directly, against float64 references.

tests/ops/test_channel_kl.py tests them through ``channel_kl``; here: the launcher contract output by
output (``lse`` included), the gradient rounded once into half precision (within half a unit in the
last place of the float64 gradient), every row of every block written (small blocks, poisoned
allocations), the block sizes, and the KL of near-equal rows whatever the logits' common offset.
"""

from __future__ import annotations

import math

import pytest
import torch

from segkd.ops import _torch_backend
from segkd.testing.reference import channel_kl_reference, spatial_softmax_reference

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# Value tolerances of the statistics: the inputs are rounded to the dtype first and the reference
# sees the rounded values, so half-precision inputs get the fp32 tolerances of their fp32 compute.
STAT_TOLERANCES = {
    torch.float64: {"rtol": 1e-12, "atol": 1e-13},
    torch.float32: {"rtol": 2e-6, "atol": 2e-6},
    torch.float16: {"rtol": 2e-6, "atol": 2e-6},
    torch.bfloat16: {"rtol": 2e-6, "atol": 2e-6},
}


def _rows(
    num_rows: int, row_length: int, dtype: torch.dtype, scale: float = 3.0, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(num_rows, row_length, generator=gen, dtype=torch.float64) * scale).to(dtype)
    teacher = (torch.randn(num_rows, row_length, generator=gen, dtype=torch.float64) * scale).to(dtype)
    return student, teacher


def _reference_gradient(
    student: torch.Tensor, teacher: torch.Tensor, tau: float, grad_kl: torch.Tensor
) -> torch.Tensor:
    """``grad_kl[r] / tau * (p_S - p_T)`` in float64, from the float64 reference softmax."""
    p_s = spatial_softmax_reference(student[None], tau)[0]
    p_t = spatial_softmax_reference(teacher[None], tau)[0]
    return grad_kl.double()[:, None] / tau * (p_s - p_t)


def _backward_by(path: str, student: torch.Tensor, teacher: torch.Tensor, tau: float, grad_kl: torch.Tensor):
    """The student gradient by the backward that recomputes the softmaxes, or from the forward's ``p_S - p_T``."""
    if path == "recompute":
        _, _, lse_s, lse_t = _torch_backend.forward(student, teacher, tau, False)
        return _torch_backend.backward(student, teacher, lse_s, lse_t, grad_kl, tau)
    direction = _torch_backend.new_direction(student)
    _torch_backend.forward(student, teacher, tau, False, direction=direction)
    return _torch_backend.gradient_from_direction(direction, grad_kl, tau, student.dtype)


GRADIENT_PATHS = ["recompute", "direction"]


@pytest.mark.parametrize("need_sqdist", [False, True])
@pytest.mark.parametrize("tau", [1.0, 2.5])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_outputs_match_float64_reference(dtype: torch.dtype, tau: float, need_sqdist: bool) -> None:
    # tau == 1 and fp32/fp64 inputs take the copy path, tau != 1 the multiply-into path; half
    # precision is converted by copy_ and scaled in place. 13 x 37: rows of odd length.
    student, teacher = _rows(13, 37, dtype)
    kl, sqdist, lse_s, lse_t = _torch_backend.forward(student, teacher, tau, need_sqdist)
    compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for out in (kl, lse_s, lse_t):
        assert out.dtype == compute_dtype
        assert out.shape == (13,)
    ref_kl, ref_sqdist = channel_kl_reference(student[None].double(), teacher[None].double(), tau)
    torch.testing.assert_close(kl.double(), ref_kl[0], **STAT_TOLERANCES[dtype])
    torch.testing.assert_close(lse_s.double(), torch.logsumexp(student.double() / tau, dim=1), **STAT_TOLERANCES[dtype])
    torch.testing.assert_close(lse_t.double(), torch.logsumexp(teacher.double() / tau, dim=1), **STAT_TOLERANCES[dtype])
    if need_sqdist:
        assert sqdist is not None
        assert sqdist.dtype == compute_dtype
        torch.testing.assert_close(sqdist.double(), ref_sqdist[0], **STAT_TOLERANCES[dtype])
    else:
        assert sqdist is None


@pytest.mark.parametrize("path", GRADIENT_PATHS)
@pytest.mark.parametrize("tau", [1.0, 2.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_backward_matches_float64_gradient(dtype: torch.dtype, tau: float, path: str) -> None:
    student, teacher = _rows(11, 29, dtype, seed=1)
    grad_kl = torch.linspace(-2.0, 3.0, 11, dtype=_torch_backend.compute_dtype(dtype))  # of both signs, zero-free
    grad = _backward_by(path, student, teacher, tau, grad_kl)
    assert grad.dtype == dtype
    assert grad.shape == student.shape
    expected = _reference_gradient(student, teacher, tau, grad_kl)
    tolerance = {"rtol": 1e-12, "atol": 1e-16} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-9}
    torch.testing.assert_close(grad.double(), expected, **tolerance)


@pytest.mark.parametrize("path", GRADIENT_PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_gradient_is_rounded_once(dtype: torch.dtype, path: str) -> None:
    # Formed and scaled in fp32 and rounded once: every element is the float64 gradient rounded to
    # the dtype, up to the fp32 error of p_S - p_T (a few units of 2^-24 times p_S + p_T). Half a
    # unit in the last place is at most eps / 2 relative (plus half the subnormal spacing near 0).
    # Rounding p_S and p_T, or their difference before the scale, to the dtype is off by far more.
    student, teacher = _rows(9, 301, dtype, scale=2.0, seed=2)
    tau = 4.0
    grad_kl = torch.linspace(-30.0, 50.0, 9)
    grad = _backward_by(path, student, teacher, tau, grad_kl)
    assert grad.dtype == dtype
    expected = _reference_gradient(student, teacher, tau, grad_kl)
    p_s = spatial_softmax_reference(student[None], tau)[0]
    p_t = spatial_softmax_reference(teacher[None], tau)[0]
    fp32_error = 4 * 2**-24 * (p_s + p_t) * grad_kl.double().abs()[:, None] / tau
    info = torch.finfo(dtype)
    bound = info.eps / 2 * expected.abs() + fp32_error + info.smallest_normal * info.eps / 2
    error = (grad.double() - expected).abs()
    assert (error <= bound).all(), f"largest error / bound: {float((error / bound).max()):.3f}"
    # The bound is tight: rounding the unscaled difference to the dtype first breaks it.
    twice = ((p_s - p_t).to(dtype).double() * grad_kl.double()[:, None] / tau).to(dtype).double()
    assert not ((twice - expected).abs() <= bound).all()


@pytest.mark.parametrize("offset", [0.0, 50.0])
@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_near_equal_rows_kl_is_accurate_whatever_the_common_offset(tau: float, offset: float) -> None:
    # KL of rows that differ by ~1e-3 is ~1e-7, second order in the difference. Forming it as
    # cross - (lse_T - lse_S) cancels two log-normalisers of size |lse| (~offset / tau) and is off by
    # ~1e-7 |lse| (2e-6 at offset 50); the backend forms lse_T - lse_S from the difference of the row
    # maxima and the log of the ratio of the largest probabilities, which both vanish with the
    # difference: the error stays at the fp32 rounding of the softmax sums (~3e-7), offset or not.
    gen = torch.Generator().manual_seed(7)
    student64 = torch.randn(38, 1023, generator=gen, dtype=torch.float64) * 3 + offset
    teacher64 = student64 + 1e-3 * torch.randn(student64.shape, generator=gen, dtype=torch.float64)
    student, teacher = student64.float(), teacher64.float()
    kl, _, _, _ = _torch_backend.forward(student, teacher, tau, False)
    ref_kl, _ = channel_kl_reference(student[None].double(), teacher[None].double(), tau)
    assert (kl >= 0).all()
    torch.testing.assert_close(kl.double(), ref_kl[0], rtol=0, atol=6e-7)


@pytest.fixture
def poisoned_allocations(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every floating tensor from torch.empty / empty_like starts as NaN: a row no block writes shows up."""
    original_empty, original_empty_like = torch.empty, torch.empty_like

    def empty(*args, **kwargs):
        out = original_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    def empty_like(*args, **kwargs):
        out = original_empty_like(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)


@pytest.mark.parametrize("path", GRADIENT_PATHS)
@pytest.mark.parametrize("tau", [1.0, 3.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("num_rows", "row_length"),
    [(21, 4), (7, 3), (3, 33)],
    ids=["ragged-last-block", "one-row-blocks", "rows-longer-than-a-block"],
)
def test_every_row_of_every_block_is_written(
    monkeypatch: pytest.MonkeyPatch,
    poisoned_allocations: None,
    num_rows: int,
    row_length: int,
    dtype: torch.dtype,
    tau: float,
    path: str,
) -> None:
    # Blocks of 10 elements: 2 rows of 4 (21 rows: 10 full blocks and a last one of 1 row), 3 rows
    # of 3 capped by the eighth-of-the-input rule to 1 row, and 1 row of 33 (a row longer than a block).
    # fp32 gradients: the error is relative to p_S + p_T (~0.25 here), not to their difference.
    monkeypatch.setattr(_torch_backend, "_CPU_BLOCK_ELEMENTS", 10)
    monkeypatch.setattr(_torch_backend, "_CPU_MIN_BLOCK_ELEMENTS", 1)
    student, teacher = _rows(num_rows, row_length, dtype, seed=3)
    direction = _torch_backend.new_direction(student) if path == "direction" else None
    kl, sqdist, lse_s, lse_t = _torch_backend.forward(student, teacher, tau, True, direction=direction)
    grad_kl = torch.rand(num_rows, generator=torch.Generator().manual_seed(4), dtype=kl.dtype) + 0.5
    if direction is None:
        grad = _torch_backend.backward(student, teacher, lse_s, lse_t, grad_kl, tau)
    else:
        grad = _torch_backend.gradient_from_direction(direction, grad_kl, tau, dtype)
    assert sqdist is not None
    for out in (kl, sqdist, lse_s, lse_t, grad):
        assert torch.isfinite(out).all()
    ref_kl, ref_sqdist = channel_kl_reference(student[None].double(), teacher[None].double(), tau)
    torch.testing.assert_close(kl.double(), ref_kl[0], **STAT_TOLERANCES[dtype])
    torch.testing.assert_close(sqdist.double(), ref_sqdist[0], **STAT_TOLERANCES[dtype])
    torch.testing.assert_close(lse_s.double(), torch.logsumexp(student.double() / tau, dim=1), **STAT_TOLERANCES[dtype])
    expected = _reference_gradient(student, teacher, tau, grad_kl)
    tolerance = {torch.float64: (1e-12, 1e-15), torch.float32: (1e-5, 1e-7), torch.bfloat16: (2**-8, 1e-7)}[dtype]
    torch.testing.assert_close(grad.double(), expected, rtol=tolerance[0], atol=tolerance[1])


@pytest.mark.parametrize("need_sqdist", [False, True])
@pytest.mark.parametrize("tau", [1.0, 2.5])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_writes_probability_difference_and_same_statistics(
    dtype: torch.dtype, tau: float, need_sqdist: bool
) -> None:
    # direction= is p_S - p_T in the compute dtype; writing it changes none of the other outputs (the
    # squared distance is then summed from it rather than from the softmax buffer: the same numbers).
    # Its gradient is the recomputing backward's, bit for bit (the same fp32 operations), and leaves
    # the direction as it was, so that a second backward (retain_graph=True) gets the same gradient.
    student, teacher = _rows(13, 37, dtype, seed=5)
    direction = _torch_backend.new_direction(student)
    assert direction.shape == student.shape
    assert direction.dtype == _torch_backend.compute_dtype(dtype)
    kept = _torch_backend.forward(student, teacher, tau, need_sqdist, direction=direction)
    plain = _torch_backend.forward(student, teacher, tau, need_sqdist)
    for kept_out, plain_out in zip(kept, plain, strict=True):
        assert (kept_out is None) == (plain_out is None)
        if kept_out is not None:
            torch.testing.assert_close(kept_out, plain_out, rtol=0, atol=0)
    p_s = spatial_softmax_reference(student[None].double(), tau)[0]
    p_t = spatial_softmax_reference(teacher[None].double(), tau)[0]
    tolerance = {"rtol": 1e-12, "atol": 1e-15} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-8}
    torch.testing.assert_close(direction.double(), p_s - p_t, **tolerance)
    grad_kl = torch.linspace(-3.0, 2.0, 13, dtype=direction.dtype)
    before = direction.clone()
    grad = _torch_backend.gradient_from_direction(direction, grad_kl, tau, dtype)
    assert grad.dtype == dtype
    torch.testing.assert_close(direction, before, rtol=0, atol=0)
    recomputed = _torch_backend.backward(student, teacher, plain[2], plain[3], grad_kl, tau)
    torch.testing.assert_close(grad, recomputed, rtol=0, atol=0)


def test_rows_per_block_on_cpu() -> None:
    cpu = torch.device("cpu")
    block, smallest = _torch_backend._CPU_BLOCK_ELEMENTS, _torch_backend._CPU_MIN_BLOCK_ELEMENTS
    for num_rows, row_length in [(152, 8192), (1200, 4096), (1368, 4096), (2400, 16384), (40, 100), (7, 3)]:
        rows = _torch_backend._rows_per_block(num_rows, row_length, cpu)
        assert 1 <= rows <= num_rows
        assert rows * row_length <= block
        # The four fp32 block temporaries hold at most one half-precision copy of the input, or
        # the smallest block: 4 blocks * 4 bytes <= 2 bytes per input element.
        assert rows * row_length <= max(num_rows * row_length / 8, smallest)
    # The benchmark's CPU shapes: (8, 19, 64, 128) in 8 blocks of 19 rows, (8, 150, 64, 64) in blocks of 1 MiB.
    assert _torch_backend._rows_per_block(152, 8192, cpu) == 19
    assert _torch_backend._rows_per_block(1200, 4096, cpu) == block // 4096
    # A row longer than a block is a block of its own; a small input is one block.
    assert _torch_backend._rows_per_block(4, 4 * block, cpu) == 1
    assert _torch_backend._rows_per_block(40, 100, cpu) == 40


def test_rows_per_block_on_an_accelerator_uses_the_large_blocks() -> None:
    cuda = torch.device("cuda")  # only its type is read: no GPU needed
    assert _torch_backend._rows_per_block(1200, 4096, cuda) == _torch_backend._BLOCK_ELEMENTS // 4096
    assert _torch_backend._rows_per_block(152, 8192, cuda) == min(152, _torch_backend._BLOCK_ELEMENTS // 8192)
    assert _torch_backend._rows_per_block(3, 1 << 22, cuda) == 1


def test_equal_rows_give_exact_zeros_and_lse_is_finite_at_large_logits() -> None:
    student, _ = _rows(6, 50, torch.float32, scale=1e4, seed=5)
    kl, sqdist, lse_s, lse_t = _torch_backend.forward(student, student.clone(), 1.0, True)
    assert sqdist is not None
    assert kl.abs().max() == 0
    assert sqdist.abs().max() == 0
    assert torch.equal(lse_s, lse_t)
    # logsumexp of logits ~1e4 is ~the row maximum: relative fp32 accuracy.
    expected = torch.logsumexp(student.double(), dim=1)
    assert float(((lse_s.double() - expected) / expected.abs()).abs().max()) < 4 * 2**-24 * math.log2(50)
