"""Bad input to the core (channel_kl, CWD, HWD): a clear ValueError/TypeError naming the argument and values."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from segkd import CWDLoss, HWDLoss, _checks
from segkd.functional import channel_kl, cwd_loss, hwd_loss, hwd_weights, hwd_weights_from_divergence

# Every entry point that takes (student, teacher) logits.
ENTRY_POINTS: dict[str, Callable[..., object]] = {
    "channel_kl": lambda s, t: channel_kl(s, t, 1.0, backend="torch"),
    "cwd_loss": lambda s, t: cwd_loss(s, t),
    "hwd_loss": lambda s, t: hwd_loss(s, t),
    "hwd_loss_logits": lambda s, t: hwd_loss(s, t, distance="logits"),
    "hwd_weights": lambda s, t: hwd_weights(s, t),
    "CWDLoss": lambda s, t: CWDLoss()(s, t),
    "HWDLoss": lambda s, t: HWDLoss()(s, t),
}
entry_points = pytest.mark.parametrize("call", list(ENTRY_POINTS.values()), ids=list(ENTRY_POINTS))


def _logits(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)


# ---- tensors ---------------------------------------------------------------------------------------


@entry_points
def test_shapes_differ(call: Callable[..., object]) -> None:
    with pytest.raises(
        ValueError,
        match=r"Expected `student` and `teacher` to have the same shape, got \(2, 19, 8, 8\) and \(2, 19, 8, 4\)\.",
    ):
        call(_logits(2, 19, 8, 8), _logits(2, 19, 8, 4))


@entry_points
def test_no_silent_broadcast(call: Callable[..., object]) -> None:
    with pytest.raises(ValueError, match=r"same shape, got \(2, 3, 4, 4\) and \(1, 3, 4, 4\)"):
        call(_logits(2, 3, 4, 4), _logits(1, 3, 4, 4))


@entry_points
@pytest.mark.parametrize("shape", [(5,), (2, 19)], ids=["1d", "2d"])
def test_fewer_than_three_dims(call: Callable[..., object], shape: tuple[int, ...]) -> None:
    dims = len(shape)
    with pytest.raises(
        ValueError,
        match=rf"Expected `student` to have at least 3 dimensions \(N, C, H, W\) or \(N, C, L\), got {dims} dimensions",
    ):
        call(_logits(*shape), _logits(*shape))


@entry_points
def test_different_devices(call: Callable[..., object]) -> None:
    teacher = torch.empty(2, 3, 4, 4, device="meta")
    with pytest.raises(
        ValueError, match=r"Expected `student` and `teacher` to be on the same device, got cpu and meta"
    ):
        call(_logits(2, 3, 4, 4), teacher)


@entry_points
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool], ids=str)
@pytest.mark.parametrize("which", ["student", "teacher"])
def test_integer_dtypes(call: Callable[..., object], dtype: torch.dtype, which: str) -> None:
    good, bad = _logits(2, 3, 4), torch.zeros(2, 3, 4, dtype=dtype)
    student, teacher = (bad, good) if which == "student" else (good, bad)
    with pytest.raises(TypeError, match=rf"Expected `{which}` to have a floating-point dtype, got {dtype}"):
        call(student, teacher)


@entry_points
def test_not_a_tensor(call: Callable[..., object]) -> None:
    with pytest.raises(TypeError, match=r"Expected `teacher` to be a torch.Tensor, got list"):
        call(_logits(1, 2, 3), [[[0.0, 0.0, 0.0]] * 2])


@entry_points
def test_empty_input(call: Callable[..., object]) -> None:
    with pytest.raises(ValueError, match=r"Expected `student` to be non-empty, got shape \(2, 3, 0, 4\)"):
        call(torch.zeros(2, 3, 0, 4), torch.zeros(2, 3, 0, 4))


# ---- hyper-parameters ------------------------------------------------------------------------------

HYPER_CALLS: dict[str, Callable[..., object]] = {
    "channel_kl": lambda s, t, **kw: channel_kl(s, t, **kw),
    "cwd_loss": lambda s, t, **kw: cwd_loss(s, t, **kw),
    "hwd_loss": lambda s, t, **kw: hwd_loss(s, t, **kw),
    "hwd_weights": lambda s, t, **kw: hwd_weights(s, t, **kw),
    "CWDLoss": lambda s, t, **kw: CWDLoss(**kw)(s, t),
    "HWDLoss": lambda s, t, **kw: HWDLoss(**kw)(s, t),
}
TAKES = {
    "tau": set(HYPER_CALLS),
    "beta": {"hwd_loss", "hwd_weights", "HWDLoss"},
    "mu": {"hwd_loss", "hwd_weights", "HWDLoss"},
    "distance": {"hwd_loss", "hwd_weights", "HWDLoss"},
    "reduction": {"cwd_loss", "hwd_loss", "CWDLoss", "HWDLoss"},
    "backend": set(HYPER_CALLS),
}


def _calls_taking(argument: str) -> pytest.MarkDecorator:
    names = sorted(TAKES[argument])
    return pytest.mark.parametrize("call", [HYPER_CALLS[n] for n in names], ids=names)


@_calls_taking("tau")
@pytest.mark.parametrize("tau", [0.0, -1.0, -1e-9, math.inf, math.nan])
def test_tau_must_be_positive_and_finite(call: Callable[..., object], tau: float) -> None:
    with pytest.raises(ValueError, match=rf"Expected `tau` to be a finite number > 0, got {tau}"):
        call(_logits(1, 2, 3), _logits(1, 2, 3), tau=tau)


@_calls_taking("tau")
@pytest.mark.parametrize("tau", ["4", None, torch.tensor([4.0]), torch.tensor(4.0 + 0j), True, torch.tensor(True)])
def test_tau_must_be_a_number(call: Callable[..., object], tau: object) -> None:
    with pytest.raises(TypeError, match=r"Expected `tau` to be a real number, got"):
        call(_logits(1, 2, 3), _logits(1, 2, 3), tau=tau)


@_calls_taking("beta")
@pytest.mark.parametrize("beta", [0.0, -0.1, math.inf])
def test_beta_must_be_positive(call: Callable[..., object], beta: float) -> None:
    with pytest.raises(ValueError, match=rf"Expected `beta` to be a finite number > 0, got {beta}"):
        call(_logits(1, 2, 3), _logits(1, 2, 3), beta=beta)


@_calls_taking("mu")
@pytest.mark.parametrize("mu", [math.nan, math.inf, -math.inf])
def test_mu_must_be_finite(call: Callable[..., object], mu: float) -> None:
    with pytest.raises(ValueError, match=rf"Expected `mu` to be finite, got {mu}"):
        call(_logits(1, 2, 3), _logits(1, 2, 3), mu=mu)


@_calls_taking("distance")
@pytest.mark.parametrize("distance", ["kl", "Prob", ""])
def test_unknown_distance(call: Callable[..., object], distance: str) -> None:
    with pytest.raises(ValueError, match=rf"Expected `distance` to be one of 'prob', 'logits', got '{distance}'"):
        call(_logits(1, 2, 3), _logits(1, 2, 3), distance=distance)


@_calls_taking("reduction")
@pytest.mark.parametrize("reduction", ["avg", "Mean", None])
def test_unknown_reduction(call: Callable[..., object], reduction: object) -> None:
    with pytest.raises(
        ValueError, match=rf"Expected `reduction` to be one of 'mean', 'sum', 'none', got {reduction!r}"
    ):
        call(_logits(1, 2, 3), _logits(1, 2, 3), reduction=reduction)


@_calls_taking("backend")
@pytest.mark.parametrize("backend", ["cuda", "Triton", ""])
def test_unknown_backend(call: Callable[..., object], backend: str) -> None:
    with pytest.raises(
        ValueError, match=rf"Expected `backend` to be one of 'auto', 'torch', 'triton', got '{backend}'"
    ):
        call(_logits(1, 2, 3), _logits(1, 2, 3), backend=backend)


def test_weights_from_divergence_needs_a_2d_floating_tensor() -> None:
    with pytest.raises(ValueError, match=r"Expected `divergence` to have 2 dimensions \(N, C\), got 3 dimensions"):
        hwd_weights_from_divergence(torch.zeros(2, 3, 4))
    with pytest.raises(TypeError, match=r"Expected `divergence` to have a floating-point dtype"):
        hwd_weights_from_divergence(torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"Expected `beta` to be a finite number > 0, got -1.0"):
        hwd_weights_from_divergence(torch.zeros(2, 3), beta=-1.0)


# ---- the opt-in finite check -----------------------------------------------------------------------


@entry_points
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("which", ["student", "teacher"])
def test_finite_check_on_raises(
    call: Callable[..., object], bad: float, which: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEGKD_CHECK_FINITE", "1")
    good, poisoned = _logits(2, 3, 4, 4), _logits(2, 3, 4, 4)
    poisoned[1, 2, 3, 0] = bad
    student, teacher = (poisoned, good) if which == "student" else (good, poisoned)
    with pytest.raises(
        ValueError,
        match=rf"Expected `{which}` to be finite, found 1 NaN/Inf values in a tensor of shape \(2, 3, 4, 4\)"
        r".*SEGKD_CHECK_FINITE=1",
    ):
        call(student, teacher)


@entry_points
def test_finite_check_is_off_by_default(call: Callable[..., object], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SEGKD_CHECK_FINITE", raising=False)
    assert not _checks.finite_check_enabled()
    student = _logits(2, 3, 4, 4)
    student[0, 0, 0, 0] = math.nan
    call(student, _logits(2, 3, 4, 4))  # no host sync, no error: garbage in, garbage out


@pytest.mark.parametrize(("value", "enabled"), [("1", True), ("true", True), ("ON", True), ("0", False), ("", False)])
def test_finite_check_env_values(value: str, enabled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGKD_CHECK_FINITE", value)
    assert _checks.finite_check_enabled() is enabled


def test_shape_str() -> None:
    assert _checks.shape_str(torch.Size([2, 19, 64, 64])) == "(2, 19, 64, 64)"
    assert _checks.shape_str(()) == "()"
