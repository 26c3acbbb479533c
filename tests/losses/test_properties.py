"""Hypothesis properties of CWD and HWD (issue 2), over generated shapes, temperatures, mu, beta and dtypes.

Shapes come from segkd.testing.strategies: N 1-4, C 1-40, H and W 1-33 (odd sizes, C == 1 and
one-pixel images included). The number of examples is set by the hypothesis profile (conftest.py).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from segkd import CWDLoss, HWDLoss
from segkd.functional import cwd_loss, hwd_loss, hwd_weights
from segkd.testing import strategies as sks
from segkd.testing.reference import channel_kl_reference, hwd_loss_reference

shapes = sks.segmentation_shapes()
taus = sks.temperatures()
mus = st.floats(-2.0, 2.0)
betas = st.one_of(st.just(1.0), st.floats(0.05, 5.0))
distances = st.sampled_from(["prob", "logits"])
dtypes = sks.float_dtypes()


def _tolerance(dtype: torch.dtype, tau: float = 1.0) -> dict[str, float]:
    """Tolerance of a loss computed in fp32 (or fp64).

    The fp32 KL has an absolute error of about 1e-7 * |logsumexp| per channel (two log-normalisers that
    cancel), a few 1e-6 for logits of size ~10; the losses scale it by tau^2.
    """
    return {"rtol": 1e-9, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5 * tau * tau}


@given(pair=sks.logit_pairs(shapes, dtype=dtypes), tau=taus, mu=mus, beta=betas, distance=distances)
def test_hwd_matches_reference(pair, tau, mu, beta, distance) -> None:
    student, teacher = pair
    loss = hwd_loss(student, teacher, tau, mu, beta, distance)
    expected = hwd_loss_reference(student, teacher, tau, mu, beta, distance)
    # Half-precision inputs are computed in fp32: same tolerance as fp32 inputs.
    torch.testing.assert_close(loss.double(), expected, **_tolerance(student.dtype, tau))


@given(pair=sks.logit_pairs(shapes, dtype=dtypes), tau=taus, mu=mus, beta=betas, distance=distances)
def test_weights_are_non_negative_and_sum_to_c(pair, tau, mu, beta, distance) -> None:
    student, teacher = pair
    weights = hwd_weights(student, teacher, tau, mu, beta, distance)
    channels = student.shape[1]
    assert weights.shape == student.shape[:2]
    assert torch.isfinite(weights).all()
    assert (weights >= 0).all()
    torch.testing.assert_close(
        weights.double().sum(dim=1), torch.full((student.shape[0],), float(channels), dtype=torch.float64)
    )


@given(
    pair=sks.logit_pairs(sks.segmentation_shapes(max_channels=1), dtype=dtypes),
    tau=taus,
    mu=mus,
    beta=betas,
    distance=distances,
)
def test_single_channel_gives_exactly_cwd(pair, tau, mu, beta, distance) -> None:
    student, teacher = pair
    assert torch.equal(hwd_loss(student, teacher, tau, mu, beta, distance), cwd_loss(student, teacher, tau))


@given(
    pair=sks.logit_pairs(sks.segmentation_shapes(max_channels=1), dtype=dtypes),
    channels=st.integers(1, 40),
    tau=taus,
    mu=mus,
    beta=betas,
    distance=distances,
)
def test_equal_divergences_give_exactly_cwd(pair, channels, tau, mu, beta, distance) -> None:
    # Repeating one channel C times makes every channel's divergence identical.
    student, teacher = (x.expand(x.shape[0], channels, *x.shape[2:]) for x in pair)
    weights = hwd_weights(student, teacher, tau, mu, beta, distance)
    assert torch.equal(weights, torch.ones_like(weights))
    assert torch.equal(hwd_loss(student, teacher, tau, mu, beta, distance), cwd_loss(student, teacher, tau))


@given(
    pair=sks.logit_pairs(shapes, dtype=st.sampled_from([torch.float32, torch.float64])),
    tau=taus,
    mu=st.floats(1e3, 1e6),
    beta=st.floats(0.01, 0.9),
    distance=distances,
)
def test_large_mu_gives_cwd(pair, tau, mu, beta, distance) -> None:
    # For beta < 1, x = z + mu -> infinity makes g = (1 - beta^x) / (1 - beta) constant: uniform weights.
    student, teacher = pair
    torch.testing.assert_close(
        hwd_loss(student, teacher, tau, mu, beta, distance), cwd_loss(student, teacher, tau), rtol=1e-6, atol=1e-9
    )


@given(
    shape=sks.segmentation_shapes(min_channels=2, max_channels=12, min_side=2, max_side=9),
    data=st.data(),
    tau=taus,
)
def test_one_hot_weights_isolate_one_channel_and_zero_weights_give_nothing(shape, data, tau) -> None:
    # Channel k disagrees strongly, the others only slightly. With beta = 1e10 and mu = 3 the curve is so
    # steep that the weights are one-hot: w[:, k] = C and exactly 0 elsewhere.
    n, c = shape[:2]
    k = data.draw(st.integers(0, c - 1), label="channel")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(shape, generator=gen, dtype=torch.float64)
    teacher = student + 1e-3 * torch.randn(shape, generator=gen, dtype=torch.float64)
    ramp = torch.linspace(-1.0, 1.0, shape[2] * shape[3], dtype=torch.float64).reshape(shape[2:])
    teacher[:, k] = student[:, k] + 8.0 * tau * ramp
    student.requires_grad_()
    mu, beta = 3.0, 1e10

    weights = hwd_weights(student, teacher, tau, mu, beta)
    expected_weights = torch.zeros(n, c, dtype=torch.float64)
    expected_weights[:, k] = c
    torch.testing.assert_close(weights, expected_weights, rtol=0, atol=1e-12)

    terms = hwd_loss(student, teacher, tau, mu, beta, reduction="none")
    kl, _ = channel_kl_reference(student.detach(), teacher, tau)
    torch.testing.assert_close(terms[:, k], tau * tau * c * kl[:, k], rtol=1e-9, atol=1e-12)
    others = torch.arange(c) != k
    assert torch.equal(terms[:, others], torch.zeros_like(terms[:, others]))  # zero weight -> zero loss
    loss = hwd_loss(student, teacher, tau, mu, beta)
    torch.testing.assert_close(loss, tau * tau / n * kl[:, k].sum(), rtol=1e-9, atol=1e-12)
    loss.backward()
    assert student.grad is not None
    assert torch.equal(student.grad[:, others], torch.zeros_like(student.grad[:, others]))  # ... and zero grad
    assert student.grad[:, k].abs().sum() > 0


@given(
    logits=sks.logits(shapes, dtype=dtypes),
    tau=taus,
    mu=mus,
    beta=betas,
    distance=distances,
)
def test_student_equal_teacher_gives_zero_loss_and_zero_gradient(logits, tau, mu, beta, distance) -> None:
    student = logits.clone().requires_grad_()
    hwd = hwd_loss(student, logits, tau, mu, beta, distance)
    cwd = cwd_loss(student, logits, tau)
    assert hwd.item() == 0
    assert cwd.item() == 0
    (hwd + cwd).backward()
    assert student.grad is not None
    assert torch.equal(student.grad, torch.zeros_like(student.grad))


@given(
    pair=sks.logit_pairs(shapes, magnitude=st.sampled_from([1e3, 1e4]), dtype=dtypes),
    sign=st.sampled_from([1.0, -1.0]),
    tau=taus,
    mu=mus,
    beta=betas,
    distance=distances,
)
def test_large_logits_stay_finite(pair, sign, tau, mu, beta, distance) -> None:
    student, teacher = pair
    student = (student * sign).requires_grad_()
    hwd = hwd_loss(student, teacher, tau, mu, beta, distance)
    cwd = cwd_loss(student, teacher, tau)
    assert torch.isfinite(hwd)
    assert torch.isfinite(cwd)
    (hwd + cwd).backward()
    assert student.grad is not None
    assert torch.isfinite(student.grad).all()


@given(
    pair=sks.logit_pairs(shapes, dtype=st.sampled_from([torch.float32, torch.float64])),
    data=st.data(),
    tau=taus,
    mu=mus,
    beta=betas,
    which=st.sampled_from(["student", "teacher"]),
)
def test_prob_distance_is_invariant_to_a_constant_per_channel(pair, data, tau, mu, beta, which) -> None:
    student, teacher = pair
    n, c = student.shape[:2]
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    offsets = torch.randn(n, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 5
    offsets = offsets.reshape(n, c, *([1] * (student.dim() - 2))).to(student.dtype)
    shifted_student = student + offsets if which == "student" else student
    shifted_teacher = teacher + offsets if which == "teacher" else teacher
    tolerance = _tolerance(student.dtype, tau)
    weights = hwd_weights(student, teacher, tau, mu, beta)
    shifted_weights = hwd_weights(shifted_student, shifted_teacher, tau, mu, beta)
    # Weights standardise differences of divergences; where two channels tie, rounding of the shifted
    # input may break the tie differently, so compare them only where the unshifted divergences are clearly distinct.
    _, divergence = channel_kl_reference(student, teacher, tau)
    assume(c == 1 or bool((divergence.std(dim=1) > 1e-3).all()))
    torch.testing.assert_close(shifted_weights, weights, **tolerance)
    torch.testing.assert_close(
        hwd_loss(shifted_student, shifted_teacher, tau, mu, beta),
        hwd_loss(student, teacher, tau, mu, beta),
        **tolerance,
    )
    torch.testing.assert_close(
        cwd_loss(shifted_student, shifted_teacher, tau), cwd_loss(student, teacher, tau), **tolerance
    )


@given(pair=sks.logit_pairs(shapes), tau=taus, mu=mus, beta=betas, distance=distances)
def test_modules_equal_functions(pair, tau, mu, beta, distance) -> None:
    student, teacher = pair
    for reduction in ("mean", "sum", "none"):
        assert torch.equal(
            HWDLoss(tau, mu, beta, distance, reduction)(student, teacher),
            hwd_loss(student, teacher, tau, mu, beta, distance, reduction),
        )
        assert torch.equal(CWDLoss(tau, reduction)(student, teacher), cwd_loss(student, teacher, tau, reduction))


@given(pair=sks.logit_pairs(shapes, dtype=dtypes), tau=taus)
def test_cwd_is_non_negative(pair, tau) -> None:
    terms = cwd_loss(*pair, tau, reduction="none")
    assert (terms >= 0).all()


@pytest.mark.parametrize("loss", [cwd_loss, hwd_loss])
@given(pair=sks.logit_pairs(shapes, dtype=st.sampled_from([torch.float32, torch.float64])))
def test_mean_is_sum_over_n_times_c(loss, pair) -> None:
    student, teacher = pair
    n, c = student.shape[:2]
    torch.testing.assert_close(
        loss(student, teacher, reduction="mean") * (n * c), loss(student, teacher, reduction="sum")
    )
