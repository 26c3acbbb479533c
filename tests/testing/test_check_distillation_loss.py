"""check_distillation_loss: it passes on segkd's own losses and fails, naming the property, on broken ones."""

from __future__ import annotations

import functools
import importlib.util
import math
import random
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segkd.losses.cirkd import CIRKDLoss, CIRKDMemoryLoss, CIRKDMiniBatchLoss
from segkd.losses.cwd import CWDLoss, cwd_loss
from segkd.losses.dist import DISTLoss
from segkd.losses.hwd import HWDLoss
from segkd.losses.ifvd import IFVDLoss
from segkd.losses.kd import KDLoss
from segkd.losses.mgd import MGDLoss
from segkd.losses.skd import SKDLoss, skd_pairwise_loss
from segkd.testing.checks import PROPERTIES, CheckReport, LossCheckError, check_distillation_loss
from segkd.testing.reference import cwd_loss_reference, hwd_loss_reference
from segkd.testing.reference.cirkd import cirkd_minibatch_loss_reference
from segkd.testing.reference.dist import dist_loss_reference
from segkd.testing.reference.ifvd import ifvd_loss_reference
from segkd.testing.reference.mgd import mgd_loss_reference
from segkd.testing.reference.skd import pixel_kd_loss_reference, skd_pairwise_loss_reference

REPO = Path(__file__).resolve().parents[2]
SHAPE = (2, 3, 4, 5)  # odd sizes, a few dozen elements: gradcheck stays cheap


def expect_failure(prop: str, loss: Any, shape: tuple[int, ...] = SHAPE, **kwargs: Any) -> LossCheckError:
    """Run the battery, expect `prop` to fail, and check the message names the property and the shapes."""
    with pytest.raises(LossCheckError, match=re.escape(f"Property '{prop}' failed")) as info:
        check_distillation_loss(loss, shape, **kwargs)
    err = info.value
    assert err.property_name == prop
    assert isinstance(err, AssertionError)
    assert f"student {tuple(shape)}" in str(err)
    assert "largest difference found:" in str(err)
    return err


# -------------------------------------------------------------------------- small losses written from formulas
def pixel_kd(student: Tensor, teacher: Tensor, tau: float = 2.0) -> Tensor:
    """Per-pixel KL(p_T || p_S) over classes, tau^2, mean over pixels: correct."""
    log_p_s = F.log_softmax(student / tau, dim=1)
    log_p_t = F.log_softmax(teacher.detach() / tau, dim=1)
    return tau**2 * (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()


def pixel_kd_reference(student: Tensor, teacher: Tensor, tau: float = 2.0) -> Tensor:
    """The same formula with explicit loops over pixels, float64."""
    s, t = student.to(torch.float64), teacher.to(torch.float64)
    n, _, h, w = s.shape
    total = s.new_zeros(())
    for i in range(n):
        for y in range(h):
            for x in range(w):
                p_t = torch.softmax(t[i, :, y, x] / tau, dim=0)
                total = total + (p_t * (p_t.log() - torch.log_softmax(s[i, :, y, x] / tau, dim=0))).sum()
    return tau**2 * total / (n * h * w)


def weighted_cwd(student: Tensor, teacher: Tensor, detach_weights: bool, tau: float = 2.0) -> Tensor:
    """CWD with HWD-like channel weights from the squared distance of the spatial softmaxes."""
    log_p_s = torch.log_softmax(student.flatten(2) / tau, dim=-1)
    log_p_t = torch.log_softmax(teacher.detach().flatten(2) / tau, dim=-1)
    sqdist = (log_p_s.exp() - log_p_t.exp()).square().sum(-1)
    if detach_weights:
        sqdist = sqdist.detach()
    weights = student.shape[1] * torch.softmax(10.0 * sqdist, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return tau**2 * (weights * kl).mean()


def weighted_cwd_reference(student: Tensor, teacher: Tensor, tau: float = 2.0) -> Tensor:
    """The intended loss: weights detached, float64, loops over channels."""
    s, t = student.to(torch.float64), teacher.to(torch.float64)
    n, c = s.shape[:2]
    kl = s.new_zeros(n, c)
    sqdist = torch.zeros(n, c, dtype=torch.float64)
    for i in range(n):
        for k in range(c):
            p_s = torch.softmax(s[i, k].reshape(-1) / tau, dim=0)
            p_t = torch.softmax(t[i, k].reshape(-1) / tau, dim=0)
            sqdist[i, k] = float((p_s - p_t).detach().square().sum())
            kl[i, k] = (p_t * (p_t.log() - p_s.log())).sum()
    weights = c * torch.softmax(10.0 * sqdist, dim=1)
    return tau**2 * (weights * kl).mean()


class _ScaledKL(torch.autograd.Function):
    """Per-pixel KL with a hand-written backward that forgets the 1/tau factor."""

    @staticmethod
    def forward(ctx: Any, student: Tensor, teacher: Tensor, tau: float) -> Tensor:
        ctx.save_for_backward(student, teacher)
        ctx.tau = tau
        log_p_s = F.log_softmax(student / tau, dim=1)
        log_p_t = F.log_softmax(teacher / tau, dim=1)
        return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        student, teacher = ctx.saved_tensors
        pixels = student.numel() // student.shape[1]
        diff = torch.softmax(student / ctx.tau, dim=1) - torch.softmax(teacher / ctx.tau, dim=1)
        return grad * diff / pixels, None, None  # missing / tau


def masked_pixel_kd(student: Tensor, teacher: Tensor, labels: Tensor, safe: bool = True) -> Tensor:
    """Per-pixel KL over the labelled pixels; `safe=False` divides by the raw number of valid pixels."""
    valid = (labels != 255).to(student.dtype)
    log_p_s = F.log_softmax(student, dim=1)
    log_p_t = F.log_softmax(teacher.detach(), dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)
    count = valid.sum().clamp_min(1.0) if safe else valid.sum()
    return (kl * valid).sum() / count


# --------------------------------------------------------------------------------------- segkd's own losses
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_passes_on_cwd(reduction: str) -> None:
    report = check_distillation_loss(
        CWDLoss(tau=4.0, reduction=reduction),  # type: ignore[arg-type]
        SHAPE,
        zero_at_equal=True,
        channel_shift_invariant=True,
        reference=lambda s, t: cwd_loss_reference(s, t, tau=4.0, reduction=reduction),
    )
    assert isinstance(report, CheckReport)
    assert set(report.passed) == set(PROPERTIES) - {"pixel_shift_invariant"}
    assert dict(report.skipped) == {"pixel_shift_invariant": "not declared"}
    assert report.student_shape == report.teacher_shape == SHAPE
    assert report.label_shape is None
    assert str(report).splitlines() == [
        "passed: " + ", ".join(report.passed),
        "skipped pixel_shift_invariant: not declared",
    ]


def test_passes_on_the_cwd_function_and_skips_state_dict() -> None:
    report = check_distillation_loss(functools.partial(cwd_loss, tau=2.0), (1, 1, 3, 3), zero_at_equal=True)
    assert "gradcheck" in report.passed
    assert report.skipped["state_dict"] == "not an nn.Module"
    assert report.skipped["reference"] == "no reference given"


@pytest.mark.parametrize(("mu", "beta"), [(1.0, 0.1), (0.0, 0.5)])
def test_passes_on_hwd_with_its_gradient_checked_against_the_reference(mu: float, beta: float) -> None:
    report = check_distillation_loss(
        HWDLoss(tau=4.0, mu=mu, beta=beta),
        SHAPE,
        zero_at_equal=True,
        channel_shift_invariant=True,
        exact_gradient=False,
        reference=lambda s, t: hwd_loss_reference(s, t, tau=4.0, mu=mu, beta=beta),
    )
    assert "reference_gradient" in report.passed
    assert "gradcheck" in report.skipped


def test_hwd_fails_gradcheck_because_its_weights_are_detached_on_purpose() -> None:
    # The autograd gradient of HWD is not the derivative of its value (the weights are detached):
    # gradcheck, asked for over HWD's own declaration, must catch that and point to exact_gradient=False.
    err = expect_failure("gradcheck", HWDLoss(tau=4.0, mu=1.0, beta=0.1), exact_gradient=True)
    assert "exact_gradient=False" in str(err)
    assert err.largest_difference > 1e-4


def test_hwd_on_logit_distances_is_not_channel_shift_invariant() -> None:
    # distance="logits" weights by sum_i (s - t)^2, which a per-channel constant changes.
    loss = HWDLoss(tau=4.0, mu=1.0, beta=0.1, distance="logits")
    err = expect_failure(
        "channel_shift_invariant",
        loss,
        exact_gradient=False,
        channel_shift_invariant=True,
        reference=lambda s, t: hwd_loss_reference(s, t, tau=4.0, mu=1.0, beta=0.1, distance="logits"),
    )
    assert "per-channel constant added to the student" in str(err)
    assert err.largest_difference > 1e-6


def test_passes_on_dist() -> None:
    # DIST's Pearson correlation has eps=1e-8 in its denominator, so at student == teacher the loss is
    # tau^2 * eps / var, about 1e-6 here, not exactly 0: declare that with atol.
    report = check_distillation_loss(
        DISTLoss(beta=1.0, gamma=2.0, tau=2.0),
        SHAPE,
        zero_at_equal=True,
        pixel_shift_invariant=True,
        reference=lambda s, t: dist_loss_reference(s, t, beta=1.0, gamma=2.0, tau=2.0),
        atol=1e-4,
    )
    assert "pixel_shift_invariant" in report.passed


def test_passes_on_skd_pairwise_with_different_channel_counts() -> None:
    report = check_distillation_loss(
        functools.partial(skd_pairwise_loss, pool=2),
        (2, 3, 5, 4),
        teacher_shape=(2, 6, 5, 4),
        reference=lambda s, t: skd_pairwise_loss_reference(s, t, pool=2),
    )
    assert "reference_gradient" in report.passed
    assert report.teacher_shape == (2, 6, 5, 4)
    report = check_distillation_loss(functools.partial(skd_pairwise_loss, pool=2), (2, 3, 5, 4), zero_at_equal=True)
    assert "zero_at_equal" in report.passed


def test_passes_on_pixel_kd_with_labels() -> None:
    report = check_distillation_loss(
        KDLoss(tau=2.0),
        SHAPE,
        with_labels=True,
        num_classes=3,
        zero_at_equal=True,
        pixel_shift_invariant=True,
        reference=lambda s, t, labels: pixel_kd_loss_reference(s, t, 2.0, labels),
    )
    assert report.label_shape == (2, 4, 5)
    assert "state_dict" in report.passed


def test_passes_on_ifvd_with_labels_at_another_resolution() -> None:
    report = check_distillation_loss(
        IFVDLoss(num_classes=3),
        (2, 4, 3, 4),
        teacher_shape=(2, 6, 3, 4),
        with_labels=True,
        num_classes=3,
        label_shape=(2, 7, 9),
        reference=lambda s, t, labels: ifvd_loss_reference(s, t, labels, 3),
    )
    assert "reference_gradient" in report.passed
    report = check_distillation_loss(
        IFVDLoss(num_classes=3), (2, 4, 3, 4), with_labels=True, num_classes=3, zero_at_equal=True
    )
    assert "zero_at_equal" in report.passed


class OnLogits(nn.Module):
    """Adapter for the bundles that take (logits, logits, features, features[, labels]) and return (loss, terms).

    The logits double as the features, so the battery drives every term through the student.
    """

    def __init__(self, bundle: nn.Module) -> None:
        super().__init__()
        self.bundle = bundle

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor | None = None) -> Tensor:
        if labels is None:
            return self.bundle(student, teacher, student, teacher)[0]
        return self.bundle(student, teacher, student, teacher, labels)[0]


def test_passes_on_the_skd_bundle_without_the_adversarial_term() -> None:
    bundle = SKDLoss(num_classes=3, adversarial_weight=0.0, discriminator_weight=0.0, conv_dim=4)

    def reference(s: Tensor, t: Tensor) -> Tensor:
        return 10.0 * skd_pairwise_loss_reference(s, t, pool=2) + pixel_kd_loss_reference(s, t, 1.0)

    report = check_distillation_loss(OnLogits(bundle), SHAPE, zero_at_equal=True, reference=reference)
    assert "reference_gradient" in report.passed


def test_passes_on_the_skd_bundle_with_its_discriminator() -> None:
    # The discriminator needs 64 x 64 logits: gradcheck in fast mode keeps that to a few evaluations.
    torch.manual_seed(0)
    bundle = SKDLoss(num_classes=2, conv_dim=4)
    report = check_distillation_loss(OnLogits(bundle), (1, 2, 64, 64), fast_gradcheck=True, scales=(1e4,))
    assert {"gradcheck", "state_dict", "deterministic"} <= set(report.passed)


@pytest.mark.parametrize("seeded", [True, False])
def test_passes_on_mgd_with_its_random_mask_and_trainable_layers(seeded: bool) -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(5) if seeded else None
    module = MGDLoss(student_channels=3, teacher_channels=4, alpha=1.0, mask_ratio=0.5, generator=generator)

    def reference(s: Tensor, t: Tensor) -> Tensor:
        # Every battery call starts from a fresh copy of the module (so of its generator) after
        # torch.manual_seed: drawing the same uniform numbers here gives the same keep-mask.
        size = (s.shape[0], 1, *s.shape[2:])
        draw = torch.rand(size, generator=torch.Generator().manual_seed(5)) if seeded else torch.rand(size)
        mask = (draw <= 0.5).to(torch.float64)
        first, second = module.generation[0], module.generation[2]
        assert module.align is not None
        weights = [first.weight, first.bias, second.weight, second.bias, module.align.weight, module.align.bias]
        w1, b1, w2, b2, wa, ba = (w.detach().to(torch.float64) for w in weights)
        return mgd_loss_reference(s, t, mask, (w1, b1, w2, b2), (wa, ba), alpha=1.0)

    report = check_distillation_loss(module, (2, 3, 4, 3), teacher_shape=(2, 4, 4, 3), reference=reference)
    assert {"gradcheck", "reference", "reference_gradient", "state_dict", "deterministic"} <= set(report.passed)


def test_passes_on_cirkd() -> None:
    report = check_distillation_loss(
        CIRKDMiniBatchLoss(tau=0.1, pool=2),
        (2, 3, 3, 4),
        teacher_shape=(2, 5, 3, 4),
        reference=lambda s, t: cirkd_minibatch_loss_reference(s, t, 0.1, 2),
    )
    assert "reference" in report.passed  # this reference computes values only (plain float loops)
    assert report.skipped["reference_gradient"] == "the reference's output does not require grad"
    report = check_distillation_loss(CIRKDMiniBatchLoss(tau=0.5), (2, 3, 3, 3), zero_at_equal=True)
    assert "zero_at_equal" in report.passed
    tiny = {"pixel_memory_size": 12, "region_memory_size": 5, "pixel_contrast_size": 9, "region_contrast_size": 6}
    torch.manual_seed(0)
    memory = CIRKDMemoryLoss(3, 3, 5, generator=torch.Generator().manual_seed(0), **tiny)  # type: ignore[arg-type]
    before = {k: v.clone() for k, v in memory.state_dict().items()}
    report = check_distillation_loss(
        memory, (2, 3, 3, 3), teacher_shape=(2, 5, 3, 3), with_labels=True, num_classes=3, label_shape=(2, 6, 6)
    )
    assert {"gradcheck", "state_dict", "deterministic"} <= set(report.passed)  # queues change in every call
    assert all(torch.equal(before[k], v) for k, v in memory.state_dict().items())  # but only in the copies
    torch.manual_seed(0)
    bundle = CIRKDLoss(3, 3, 3, generator=torch.Generator().manual_seed(0), **tiny)  # type: ignore[arg-type]
    report = check_distillation_loss(OnLogits(bundle), (2, 3, 3, 3), with_labels=True, num_classes=3)
    assert {"gradcheck", "state_dict", "deterministic"} <= set(report.passed)


# ----------------------------------------------------------------------------------------------- broken losses
def test_passes_on_a_correct_loss_written_from_the_formula() -> None:
    report = check_distillation_loss(
        pixel_kd, SHAPE, zero_at_equal=True, pixel_shift_invariant=True, reference=pixel_kd_reference
    )
    assert "reference_gradient" in report.passed


def test_fails_when_the_teacher_is_not_detached() -> None:
    def loss(student: Tensor, teacher: Tensor) -> Tensor:
        return F.mse_loss(student, teacher)  # teacher gets a gradient

    err = expect_failure("teacher_grad", loss)
    assert "teacher received a gradient" in str(err)
    assert err.largest_difference > 0


def test_fails_when_the_graph_reaches_the_teacher_even_with_a_zero_gradient() -> None:
    def loss(student: Tensor, teacher: Tensor) -> Tensor:
        return pixel_kd(student, teacher) + 0.0 * teacher.sum()  # zero gradient, but backward runs into it

    err = expect_failure("teacher_graph", loss)
    assert err.largest_difference == 0.0


def test_fails_with_nan_gradient_on_equal_inputs() -> None:
    def loss(student: Tensor, teacher: Tensor) -> Tensor:
        return (student - teacher.detach()).square().sum(dim=1).sqrt().mean()  # d sqrt(x) / dx at 0

    err = expect_failure("finite", loss)
    assert "student == teacher" in str(err)
    assert "student.grad has" in str(err)


def test_fails_with_nan_when_every_pixel_is_ignored() -> None:
    check_distillation_loss(masked_pixel_kd, SHAPE, with_labels=True, num_classes=3)
    err = expect_failure("finite", functools.partial(masked_pixel_kd, safe=False), with_labels=True, num_classes=3)
    assert "every label is ignore_index=255" in str(err)
    assert "labels (2, 4, 5)" in str(err)


def test_fails_with_overflow_on_large_logits() -> None:
    def loss(student: Tensor, teacher: Tensor) -> Tensor:  # softmax without max-subtraction
        e_s, e_t = student.exp(), teacher.detach().exp()
        p_s, p_t = e_s / e_s.sum(1, keepdim=True), e_t / e_t.sum(1, keepdim=True)
        return (p_t * (p_t.log() - p_s.log())).sum(1).mean()

    err = expect_failure("finite", loss)
    assert "scale 10000" in str(err)


def test_fails_on_a_wrong_normalisation_against_the_reference() -> None:
    def loss(student: Tensor, teacher: Tensor) -> Tensor:
        return cwd_loss(student, teacher, tau=4.0, reduction="sum") / student.shape[0]  # / N, not / (N C)

    err = expect_failure("reference", loss, reference=lambda s, t: cwd_loss_reference(s, t, tau=4.0))
    assert "differs from the reference" in str(err)
    assert err.largest_difference > 0.1  # the loss is C = 3 times too large: off by twice its O(1) value


def test_a_non_detached_weight_passes_gradcheck_but_fails_the_reference_gradient() -> None:
    intended = functools.partial(weighted_cwd, detach_weights=True)
    broken = functools.partial(weighted_cwd, detach_weights=False)
    check_distillation_loss(intended, SHAPE, exact_gradient=False, reference=weighted_cwd_reference)
    expect_failure("gradcheck", intended)  # detached on purpose: not the derivative of the value
    assert "gradcheck" in check_distillation_loss(broken, SHAPE).passed  # consistent, so gradcheck is blind to it
    err = expect_failure("reference_gradient", broken, exact_gradient=False, reference=weighted_cwd_reference)
    assert "gradient differs from the reference" in str(err)
    assert err.largest_difference > 1e-6


def test_exact_gradient_false_needs_a_differentiable_reference() -> None:
    err = expect_failure(
        "reference_gradient",
        HWDLoss(tau=4.0),
        exact_gradient=False,
        reference=lambda s, t: hwd_loss_reference(s.detach(), t, tau=4.0),
    )
    assert "needs a differentiable reference" in str(err)


def test_fails_gradcheck_on_a_wrong_hand_written_backward() -> None:
    def loss(student: Tensor, teacher: Tensor) -> Tensor:
        return _ScaledKL.apply(student, teacher.detach(), 2.0)

    err = expect_failure("gradcheck", loss)
    assert err.largest_difference > 1e-3

    def summed(student: Tensor, teacher: Tensor) -> Tensor:  # gradcheck's atol is absolute: no 1/8192 mean
        return loss(student, teacher) * (student.numel() // student.shape[1])

    err = expect_failure("gradcheck", summed, (1, 2, 64, 64), fast_gradcheck=True, scales=())
    assert err.largest_difference > 1e-3


def test_fails_on_a_loss_that_is_not_invariant_as_declared() -> None:
    def loss(student: Tensor, teacher: Tensor) -> Tensor:
        return (student - teacher.detach()).square().mean()

    err = expect_failure("channel_shift_invariant", loss, channel_shift_invariant=True)
    assert err.largest_difference > 0.1
    # the per-pixel softmax KD is invariant per pixel but not per channel, CWD the other way round
    expect_failure("channel_shift_invariant", pixel_kd, channel_shift_invariant=True)
    err = expect_failure("pixel_shift_invariant", CWDLoss(tau=4.0), pixel_shift_invariant=True)
    assert "per-pixel constant (same for all channels) added to the student" in str(err)


def test_fails_when_not_zero_at_equal_inputs() -> None:
    def loss(student: Tensor, teacher: Tensor) -> Tensor:
        return pixel_kd(student, teacher) + 1e-3 * student.square().mean()

    err = expect_failure("zero_at_equal", loss, zero_at_equal=True)
    assert "the loss is not zero" in str(err)


def test_fails_on_randomness_outside_torch() -> None:
    def loss(student: Tensor, teacher: Tensor) -> Tensor:
        keep = 0.5 + random.random()  # Python's RNG: not reseeded by torch.manual_seed
        return keep * pixel_kd(student, teacher)

    err = expect_failure("deterministic", loss)
    assert "two calls" in str(err)


class MaskedMSE(nn.Module):
    """MGD-like: a 1x1 conv on the student and a random spatial mask drawn from torch's RNG."""

    def __init__(self, channels: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.align = nn.Conv2d(channels, channels, 1)
        self.generator = generator

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        n, _, h, w = student.shape
        if self.generator is None:
            keep = torch.rand(n, 1, h, w, dtype=student.dtype, device=student.device) > 0.5
        else:
            keep = torch.rand(n, 1, h, w, generator=self.generator).to(student.device) > 0.5
        return (self.align(student) * keep - teacher.detach()).square().sum() / n


@pytest.mark.parametrize("own_generator", [False, True])
def test_passes_on_random_masks_and_trainable_parts(own_generator: bool) -> None:
    generator = torch.Generator().manual_seed(3) if own_generator else None
    loss = MaskedMSE(3, generator)
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    report = check_distillation_loss(loss, SHAPE)
    assert "gradcheck" in report.passed
    assert "state_dict" in report.passed
    assert all(torch.equal(before[k], v) for k, v in loss.state_dict().items())  # the module is untouched
    if generator is not None:  # nor its generator
        assert torch.equal(generator.get_state(), torch.Generator().manual_seed(3).get_state())


class RunningScale(nn.Module):
    """Keeps a running statistic of the teacher; `persistent=False` loses it in state_dict()."""

    def __init__(self, persistent: bool) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(()), persistent=persistent)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        with torch.no_grad():
            self.scale.mul_(0.5).add_(0.5 * teacher.detach().abs().mean())
        return pixel_kd(student, teacher) * self.scale


def test_state_dict_round_trip() -> None:
    check_distillation_loss(RunningScale(persistent=True), SHAPE)
    err = expect_failure("state_dict", RunningScale(persistent=False))
    assert "loaded copy gives a different loss" in str(err)
    assert err.largest_difference > 0


def test_state_dict_flags_tensors_that_are_not_registered() -> None:
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weights = torch.ones(3)  # not a buffer: misses state_dict(), .to() and .double()

        def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
            return (cwd_loss(student, teacher, reduction="none") * self.weights.to(student.dtype)).mean()

    err = expect_failure("state_dict", Plain())
    assert "weights" in str(err)
    assert math.isnan(err.largest_difference)


def test_python_state_changed_by_forward_breaks_the_round_trip() -> None:
    class Counter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
            self.calls += 1
            return pixel_kd(student, teacher) * (1.0 + 0.1 * self.calls)

    # Every other check uses fresh copies, so only the round trip sees the lost counter.
    expect_failure("state_dict", Counter())


def test_fails_when_the_loss_modifies_its_inputs() -> None:
    def loss(student: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
        labels[labels == 255] = 0  # a classic: "fixes" the caller's label map in place
        return masked_pixel_kd(student, teacher, labels)

    err = expect_failure("inputs_unchanged", loss, with_labels=True, num_classes=3)
    assert "modified labels in place" in str(err)
    assert err.largest_difference == 255


def test_a_loss_that_raises_is_reported_under_the_property() -> None:
    def loss(student: Tensor, teacher: Tensor) -> Tensor:
        if student.dtype == torch.float64:
            raise RuntimeError("float64 is not supported")
        return pixel_kd(student, teacher)

    err = expect_failure("gradcheck", loss)
    assert "the loss raised RuntimeError: float64 is not supported" in str(err)
    assert isinstance(err.__cause__, RuntimeError)


def test_a_non_tensor_output_is_reported() -> None:
    err = expect_failure("output", lambda s, t: pixel_kd(s, t).item())
    assert "expected a floating-point tensor" in str(err)


def test_tuple_outputs_are_checked_element_by_element() -> None:
    def loss(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
        return pixel_kd(student, teacher), cwd_loss(student, teacher, reduction="none")

    report = check_distillation_loss(loss, SHAPE, zero_at_equal=True)
    assert "gradcheck" in report.passed

    def broken(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
        return pixel_kd(student, teacher), F.mse_loss(student, teacher)

    expect_failure("teacher_grad", broken)


def test_restores_the_global_random_state() -> None:
    loss = MaskedMSE(3)
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    check_distillation_loss(loss, SHAPE, scales=())
    assert torch.equal(torch.get_rng_state(), state)


def test_the_seed_changes_the_inputs_not_the_verdict() -> None:
    a = check_distillation_loss(pixel_kd, SHAPE, seed=0)
    b = check_distillation_loss(pixel_kd, SHAPE, seed=7)
    assert a.passed == b.passed


# ------------------------------------------------------------------------------------------------- bad settings
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"with_labels": True}, ValueError, "`num_classes` to be given when `with_labels=True`"),
        ({"zero_at_equal": True, "teacher_shape": (2, 6, 4, 5)}, ValueError, "`teacher_shape` to equal"),
        ({"exact_gradient": False}, ValueError, "Expected a `reference` when `exact_gradient=False`"),
        ({"reference": "cwd"}, TypeError, "`reference` to be callable"),
        ({"teacher_shape": (2, 3)}, ValueError, "`teacher_shape` to hold at least 3 ints >= 1"),
        ({"atol": -1.0}, ValueError, "`atol` to be >= 0"),
        ({"dtype": torch.int64}, TypeError, "`dtype` to be a floating-point torch.dtype"),
        ({"with_labels": True, "num_classes": 0}, ValueError, "`num_classes` to be >= 1"),
    ],
)
def test_bad_settings(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=re.escape(match)):
        check_distillation_loss(pixel_kd, SHAPE, **kwargs)


@pytest.mark.parametrize(
    ("shape", "error", "match"),
    [
        ((2, 3), ValueError, "`student_shape` to hold at least 3 ints >= 1, got (2, 3)"),
        ((2, 0, 4, 4), ValueError, "`student_shape` to hold at least 3 ints >= 1"),
        ("2x3x4", TypeError, "`student_shape` to be a sequence of ints"),
    ],
)
def test_bad_student_shape(shape: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=re.escape(match)):
        check_distillation_loss(pixel_kd, shape)


def test_loss_must_be_callable() -> None:
    with pytest.raises(TypeError, match="Expected `loss` to be callable"):
        check_distillation_loss("cwd", SHAPE)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------- the docs example
def test_the_docs_example_runs() -> None:
    path = REPO / "docs" / "examples" / "test_my_loss.py"
    spec = importlib.util.spec_from_file_location("segkd_docs_example_test_my_loss", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tests = [getattr(module, name) for name in dir(module) if name.startswith("test_")]
    assert tests
    for test in tests:
        test()


def test_docs_testing_md_shows_the_example_unchanged() -> None:
    docs = (REPO / "docs" / "testing.md").read_text()
    section = docs[docs.index("## Testing your own loss in ten lines") :]
    block = re.search(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert block is not None
    example = (REPO / "docs" / "examples" / "test_my_loss.py").read_text()
    assert block.group(1).strip() == example.strip()
    code_lines = [line for line in example.splitlines() if line.strip() and not line.lstrip().startswith(('"""', "#"))]
    assert len(code_lines) <= 12  # "in ten lines": imports, the loss, the test
