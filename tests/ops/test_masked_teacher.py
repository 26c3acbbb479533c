"""Issue 15, class 3: a teacher logit of -inf (a masked position) follows 0 log 0 = 0 in both backends.

Where the teacher's probability is exactly zero its term contributes nothing, whatever the student
has there. The expected values are the float64 references evaluated at a very negative finite logit
(-1e300) instead of -inf: its probability underflows to exactly 0 and every term is finite, so the
reference computes the limit as the logit goes to -inf. A student logit of -inf where the teacher's
probability is positive makes the KL +inf (the true value), with a finite gradient. NaN inputs stay NaN.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from torch import Tensor

from segkd.ops import channel_kl, weighted_channel_kl
from segkd.testing.reference import channel_kl_reference, hwd_loss_reference

HAS_TRITON = importlib.util.find_spec("triton") is not None
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="no Triton"))]
TOLERANCES = {torch.float64: {"rtol": 1e-10, "atol": 1e-12}, torch.float32: {"rtol": 2e-5, "atol": 2e-6}}
GRAD_TOLERANCES = {torch.float64: {"rtol": 1e-10, "atol": 1e-14}, torch.float32: {"rtol": 1e-4, "atol": 4e-6}}
# The Triton interpreter runs the kernels in NumPy, which warns on the -inf arithmetic that the kernels then mask
# out (inf - inf where a term is selected away); the values are what the tests check.
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning"),
]
SHAPE = (2, 3, 5, 7)  # rows of 35: several chunks and segments under the split_rows fixture


def _masked_pair(dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Student, teacher and the teacher's mask: a single position, a whole spatial run, a row's first half."""
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    teacher = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    mask = torch.zeros(SHAPE, dtype=torch.bool)
    mask[0, 1, 2, 3] = True
    mask[1, :, 0, :] = True  # a masked image row, in every channel
    mask[0, 2].view(-1)[:18] = True  # more than a split segment
    student[0, 2, 0, 0] = -math.inf  # masked in both
    return student.to(dtype), teacher.masked_fill(mask, -math.inf).to(dtype), mask


def _finite(x: Tensor) -> Tensor:
    """The limit stand-in: -inf becomes -1e300 (exp underflows to exactly 0 in float64)."""
    return x.to(torch.float64).masked_fill(x == -math.inf, -1e300)


def _run(fn, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[no-untyped-def]
    x = student.detach().clone().requires_grad_(True)
    value = fn(x, teacher)
    grad_out = torch.linspace(0.5, 1.5, value.numel(), dtype=value.dtype).view(value.shape)
    (grad,) = torch.autograd.grad((value * grad_out).sum(), x)
    return value.detach(), grad


def _variants(backend: str) -> dict[str, tuple]:  # type: ignore[type-arg]
    tau = 1.5
    return {
        "channel_kl": (
            lambda s, t: channel_kl(s, t, tau, backend=backend),  # type: ignore[arg-type]
            lambda s, t: channel_kl_reference(s, t, tau)[0],
        ),
        "cwd": (
            lambda s, t: weighted_channel_kl(s, t, tau, reduction="none", backend=backend),  # type: ignore[arg-type]
            lambda s, t: tau * tau * channel_kl_reference(s, t, tau)[0],
        ),
        "hwd": (
            lambda s, t: weighted_channel_kl(s, t, tau, "hwd", mu=1.0, beta=0.1, backend=backend),  # type: ignore[arg-type]
            lambda s, t: hwd_loss_reference(s, t, tau=tau, mu=1.0, beta=0.1),
        ),
    }


def _check(backend: str, dtype: torch.dtype) -> None:
    student, teacher, _ = _masked_pair(dtype)
    for name, (fn, reference) in _variants(backend).items():
        value, grad = _run(fn, student, teacher)
        s64 = _finite(student).requires_grad_(True)
        expected = reference(s64, _finite(teacher))
        grad_out = torch.linspace(0.5, 1.5, expected.numel(), dtype=torch.float64).view(expected.shape)
        (expected_grad,) = torch.autograd.grad((expected * grad_out).sum(), s64)
        assert torch.isfinite(value).all(), name
        torch.testing.assert_close(value.double(), expected, **TOLERANCES[dtype], msg=name)
        torch.testing.assert_close(grad.double(), expected_grad, **GRAD_TOLERANCES[dtype], msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_masked_teacher_logits_contribute_nothing(backend: str, dtype: torch.dtype) -> None:
    _check(backend, dtype)


@pytest.mark.skipif(not HAS_TRITON, reason="no Triton")
@pytest.mark.usefixtures("split_rows")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_masked_teacher_logits_in_split_rows(dtype: torch.dtype) -> None:
    _check("triton", dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_student_minus_inf_where_the_teacher_has_mass_gives_inf(backend: str) -> None:
    student, teacher, _ = _masked_pair(torch.float32)
    student[1, 0, 3, 3] = -math.inf  # teacher finite there: p_T > 0, p_S = 0
    value, grad = _run(lambda s, t: channel_kl(s, t, 1.5, backend=backend), student, teacher)  # type: ignore[arg-type]
    assert value[1, 0] == math.inf
    finite_rows = torch.ones_like(value, dtype=torch.bool)
    finite_rows[1, 0] = False
    assert torch.isfinite(value[finite_rows]).all()
    assert torch.isfinite(grad).all()  # (p_S - p_T) / tau: finite


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_nan_inputs_still_give_nan(where: str, backend: str, split: bool, request: pytest.FixtureRequest) -> None:
    # The torch backend's 0 log 0 (a nansum) must not hide a NaN input, nor may the Triton kernels' final
    # clamp max(kl, 0) (it returned 0 for a NaN row before it kept NaN).
    if split:
        if backend == "torch":
            pytest.skip("the torch backend does not split rows")
        request.getfixturevalue("split_rows")
    student, teacher, _ = _masked_pair(torch.float32)
    student, teacher = student.nan_to_num(neginf=-30.0), teacher.nan_to_num(neginf=-30.0)
    (student if where == "student" else teacher)[0, 0, 1, 1] = math.nan
    kl, sqdist = channel_kl(student, teacher, 1.5, return_sqdist=True, backend=backend)  # type: ignore[arg-type]
    assert math.isnan(kl[0, 0].item())
    assert math.isnan(sqdist[0, 0].item())
    assert torch.isfinite(kl.view(-1)[1:]).all()  # the other rows are untouched
    for weights in ("uniform", "hwd"):
        loss = weighted_channel_kl(student, teacher, 1.5, weights=weights, backend=backend)  # type: ignore[arg-type]
        assert math.isnan(loss.item()), weights
