"""Issue 15, class 8: segkd's losses declare what check_distillation_loss needs, so `check(loss, shape)` passes.

``check_distillation_loss(segkd.HWDLoss(), shape)`` used to fail ``gradcheck`` (HWD's weights are
detached on purpose). Every loss now carries a ``distillation_checks`` declaration (its invariances,
its float64 reference, detached parts, labels, teacher width), and a user's loss can declare the same.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import segkd
from segkd.testing.checks import (
    DECLARATION_ATTRIBUTE,
    LossCheckError,
    LossDeclaration,
    check_distillation_loss,
    declared_checks,
)

TINY = {"pixel_memory_size": 12, "region_memory_size": 5, "pixel_contrast_size": 9, "region_contrast_size": 6}
SHAPE = (2, 3, 3, 4)
BASIC = {"output", "inputs_unchanged", "deterministic", "finite", "teacher_grad", "teacher_graph", "state_dict"}

# name -> (factory, student shape, the properties that must pass beyond BASIC)
LOSSES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], set[str]]] = {
    "HWDLoss": (segkd.HWDLoss, SHAPE, {"zero_at_equal", "channel_shift_invariant", "reference", "reference_gradient"}),
    "HWDLoss-logits-sum": (
        functools.partial(segkd.HWDLoss, mu=1.0, distance="logits", reduction="sum"),
        SHAPE,
        {"zero_at_equal", "reference", "reference_gradient"},
    ),
    "CWDLoss": (
        segkd.CWDLoss,
        SHAPE,
        {"gradcheck", "zero_at_equal", "channel_shift_invariant", "reference", "reference_gradient"},
    ),
    "DISTLoss": (segkd.DISTLoss, SHAPE, {"gradcheck", "pixel_shift_invariant", "reference", "reference_gradient"}),
    "DISTLoss-raw-logits": (
        functools.partial(segkd.DISTLoss, softmax=False),
        SHAPE,
        {"gradcheck", "reference", "reference_gradient"},
    ),
    "KDLoss": (
        functools.partial(segkd.KDLoss, tau=2.0, reduction="none"),
        SHAPE,
        {"gradcheck", "zero_at_equal", "pixel_shift_invariant", "reference", "reference_gradient"},
    ),
    "CIRKDMiniBatchLoss": (segkd.CIRKDMiniBatchLoss, (2, 3, 3, 4), {"gradcheck", "zero_at_equal", "reference"}),
    "IFVDLoss": (
        functools.partial(segkd.IFVDLoss, 3),
        (2, 4, 3, 4),
        {"gradcheck", "zero_at_equal", "reference", "reference_gradient"},
    ),
    "MGDLoss": (functools.partial(segkd.MGDLoss, 3, 4, alpha=1.0), (2, 3, 4, 3), {"gradcheck"}),
    "CIRKDMemoryLoss": (
        functools.partial(segkd.CIRKDMemoryLoss, 3, 3, 5, generator=torch.Generator().manual_seed(0), **TINY),
        (2, 3, 3, 3),
        {"gradcheck"},
    ),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_every_shipped_loss_passes_with_no_extra_argument(name: str) -> None:
    factory, shape, expected = LOSSES[name]
    torch.manual_seed(0)
    report = check_distillation_loss(factory(), shape)
    assert BASIC | expected <= set(report.passed)


def test_the_functional_hwd_passes_with_its_default_settings() -> None:
    report = check_distillation_loss(segkd.functional.hwd_loss, SHAPE)
    assert {"zero_at_equal", "channel_shift_invariant", "reference", "reference_gradient"} <= set(report.passed)


@pytest.mark.parametrize("name", ["cwd_loss", "hwd_loss", "pixel_kd_loss", "dist_loss"])
def test_functional_forms_declare_what_their_default_module_does(name: str) -> None:
    declared = declared_checks(getattr(segkd.functional, name))
    assert declared.reference is not None


def test_declared_settings_follow_the_module() -> None:
    declared = declared_checks(segkd.IFVDLoss(7, ignore_index=3))
    assert (declared.with_labels, declared.num_classes, declared.ignore_index) == (True, 7, 3)
    assert declared_checks(segkd.MGDLoss(3, 9)).teacher_channels == 9
    assert declared_checks(segkd.HWDLoss(distance="logits")).channel_shift_invariant is False
    assert declared_checks(segkd.HWDLoss()).exact_gradient is False
    assert declared_checks(segkd.DISTLoss(softmax=False)).pixel_shift_invariant is False


def test_a_declared_zero_at_equal_is_skipped_for_other_teacher_shapes() -> None:
    report = check_distillation_loss(segkd.CIRKDMiniBatchLoss(), (2, 3, 3, 3), teacher_shape=(2, 5, 3, 3))
    assert "zero_at_equal" not in report.passed
    assert "differs" in report.skipped["zero_at_equal"]


def test_arguments_override_the_declaration() -> None:
    report = check_distillation_loss(segkd.CWDLoss(), SHAPE, channel_shift_invariant=False, zero_at_equal=False)
    assert report.skipped["channel_shift_invariant"] == "not declared"
    assert report.skipped["zero_at_equal"] == "not declared"
    assert "reference" in report.passed  # still declared


def _detached_weights_loss(student: Tensor, teacher: Tensor) -> Tensor:
    weights = (student - teacher).detach().abs().mean(dim=(2, 3), keepdim=True)
    return (weights * (student - teacher.detach()) ** 2).mean()


def _detached_weights_reference(student: Tensor, teacher: Tensor) -> Tensor:
    s, t = student.to(torch.float64), teacher.to(torch.float64)
    total = torch.zeros((), dtype=torch.float64)
    for n in range(s.shape[0]):
        for c in range(s.shape[1]):
            weight = (s[n, c] - t[n, c]).detach().abs().mean()
            total = total + weight * ((s[n, c] - t[n, c]) ** 2).sum()
    return total / s.numel()


class _UserLoss(nn.Module):
    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return _detached_weights_loss(student, teacher)

    def distillation_checks(self) -> LossDeclaration:
        return LossDeclaration(zero_at_equal=True, reference=_detached_weights_reference, exact_gradient=False)


def test_a_user_loss_declares_the_same_way() -> None:
    with pytest.raises(LossCheckError) as info:  # undeclared: its detached weights fail gradcheck
        check_distillation_loss(_detached_weights_loss, SHAPE)
    assert info.value.property_name == "gradcheck"

    report = check_distillation_loss(_UserLoss(), SHAPE)
    assert {"zero_at_equal", "reference", "reference_gradient"} <= set(report.passed)

    def as_function(student: Tensor, teacher: Tensor) -> Tensor:
        return _detached_weights_loss(student, teacher)

    setattr(as_function, DECLARATION_ATTRIBUTE, {"reference": _detached_weights_reference, "exact_gradient": False})
    assert "reference_gradient" in check_distillation_loss(as_function, SHAPE).passed


def test_a_wrong_declaration_is_refused() -> None:
    def loss(student: Tensor, teacher: Tensor) -> Tensor:
        return F.mse_loss(student, teacher.detach())

    setattr(loss, DECLARATION_ATTRIBUTE, 3)
    with pytest.raises(TypeError, match=r"Expected `loss.distillation_checks` to be a LossDeclaration"):
        check_distillation_loss(loss, SHAPE)
