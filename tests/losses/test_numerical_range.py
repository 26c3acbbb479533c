"""Numerical range (issue 15, class 4): accurate over the range fp32 inputs can hold, or refused clearly."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch

from segkd import CWDLoss, DISTLoss, HWDLoss, KDLoss
from segkd.functional import channel_kl, cwd_loss, dist_loss, hwd_loss, hwd_weights, pixel_kd_loss
from segkd.ops import weighted_channel_kl


def _pair(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


# ---- tau: a temperature fp32 can carry, else a clear error ----------------------------------------

TAU_CALLS: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "channel_kl": lambda s, t, tau: channel_kl(s, t, tau),
    "weighted_channel_kl": lambda s, t, tau: weighted_channel_kl(s, t, tau),
    "cwd_loss": lambda s, t, tau: cwd_loss(s, t, tau),
    "hwd_loss": lambda s, t, tau: hwd_loss(s, t, tau),
    "hwd_loss_logits": lambda s, t, tau: hwd_loss(s, t, tau, distance="logits"),
    "hwd_weights": lambda s, t, tau: hwd_weights(s, t, tau),
    "pixel_kd_loss": lambda s, t, tau: pixel_kd_loss(s, t, tau=tau),
    "dist_loss": lambda s, t, tau: dist_loss(s, t, tau=tau),
    "CWDLoss": lambda s, t, tau: CWDLoss(tau)(s, t),
    "HWDLoss": lambda s, t, tau: HWDLoss(tau)(s, t),
    "KDLoss": lambda s, t, tau: KDLoss(tau)(s, t),
    "DISTLoss": lambda s, t, tau: DISTLoss(tau=tau)(s, t),
}
tau_calls = pytest.mark.parametrize("call", list(TAU_CALLS.values()), ids=list(TAU_CALLS))


@tau_calls
@pytest.mark.parametrize("tau", [1e-39, 1e-20, 9.9e-13, 1.01e12, 1e20, 3e38])
def test_temperature_outside_the_fp32_range_is_refused(call: Callable[..., torch.Tensor], tau: float) -> None:
    student, teacher = _pair((2, 3, 4, 4))
    message = rf"Expected `tau` to be between 1e-12 and 1e\+12 .*, got {re.escape(str(tau))}\."
    with pytest.raises(ValueError, match=message):
        call(student, teacher, tau)


@tau_calls
@pytest.mark.parametrize("tau", [1e-12, 1e12])
def test_temperature_at_the_ends_of_the_range_gives_finite_values(
    call: Callable[..., torch.Tensor], tau: float
) -> None:
    student, teacher = _pair((2, 3, 4, 4))
    assert torch.isfinite(call(student, teacher, tau)).all()


# ---- HWD with distance="logits": no overflow for any finite logits --------------------------------


def _hwd_weights_reference(student: torch.Tensor, teacher: torch.Tensor, mu: float, beta: float) -> torch.Tensor:
    """HWD's weights from the logit distance, written from the formula in float64 (no overflow below 1e150)."""
    d = (student.double() - teacher.double()).flatten(2).square().sum(dim=2)
    z = (d - d.mean(dim=1, keepdim=True)) / d.std(dim=1, keepdim=True)
    g = (1 - beta ** (z + mu)) / (1 - beta)
    return d.shape[1] * torch.softmax(g, dim=1)


@pytest.mark.parametrize("scale", [1.0, 1e19, 1e30, 1e37, 1e-30])
def test_hwd_logit_distance_weights_at_every_scale(scale: float) -> None:
    # fp32 squares overflowed near 1e19 and the weights became uniform without an error.
    student, teacher = _pair((2, 5, 4, 6), seed=1)
    student, teacher = student * scale, teacher * scale
    assert torch.isfinite(student).all()
    weights = hwd_weights(student, teacher, 4.0, 1.0, 0.1, "logits")
    assert weights.dtype == torch.float32
    expected = _hwd_weights_reference(student, teacher, 1.0, 0.1)
    assert (expected - 1).abs().max() > 0.1  # far from uniform
    torch.testing.assert_close(weights.double(), expected, rtol=1e-6, atol=1e-6)
    loss = hwd_loss(student, teacher, 4.0, 1.0, 0.1, "logits", "none")
    expected_loss = weights * cwd_loss(student, teacher, 4.0, "none")
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=0)
