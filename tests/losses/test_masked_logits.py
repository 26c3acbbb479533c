"""Issue 15, class 3: the KL losses follow 0 log 0 = 0 where a teacher logit is -inf (a masked class or position).

KD (per-pixel class softmax), CWD and HWD (per-channel spatial softmax, torch backend here; both
backends in tests/ops/test_masked_teacher.py) used to return NaN. Expected values are the float64
references at -1e300 instead of -inf (the probability underflows to exactly 0, every term is finite:
the limit as the logit goes to -inf). A student logit of -inf where the teacher has mass gives +inf,
the true KL, with a finite gradient. A KD pixel whose teacher logits are all -inf has no distribution:
NaN, unless ``labels`` ignore it (then it contributes nothing, in value and gradient); the same holds for a
CWD/HWD channel whose teacher logits are all -inf (no spatial distribution).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from segkd import CWDLoss, HWDLoss, KDLoss
from segkd.functional import cwd_loss, hwd_loss, pixel_kd_loss
from segkd.testing.reference import cwd_loss_reference, hwd_loss_reference, pixel_kd_loss_reference

SHAPE = (2, 4, 3, 5)
TAU = 2.0


def _pair() -> tuple[Tensor, Tensor]:
    """float64 student and teacher; the teacher masks one class at one pixel, a class in two image columns and
    a class in an image row; the student is -inf at one of the masked entries too."""
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    teacher = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    teacher[0, 1, 2, 3] = -math.inf
    teacher[1, 2, :, :2] = -math.inf
    teacher[1, 0, 1, :] = -math.inf
    student[1, 2, 0, 0] = -math.inf
    return student, teacher


def _limit(x: Tensor) -> Tensor:
    return x.masked_fill(x == -math.inf, -1e300)


CASES: dict[str, tuple[Callable[[Tensor, Tensor], Tensor], Callable[[Tensor, Tensor], Tensor]]] = {
    "pixel_kd_loss": (lambda s, t: pixel_kd_loss(s, t, TAU), lambda s, t: pixel_kd_loss_reference(s, t, TAU)),
    "KDLoss-none": (
        lambda s, t: KDLoss(TAU, reduction="none")(s, t),
        lambda s, t: pixel_kd_loss_reference(s, t, TAU, reduction="none"),
    ),
    "cwd_loss": (lambda s, t: cwd_loss(s, t, TAU, backend="torch"), lambda s, t: cwd_loss_reference(s, t, TAU)),
    "CWDLoss-none": (
        lambda s, t: CWDLoss(TAU, "none", backend="torch")(s, t),
        lambda s, t: cwd_loss_reference(s, t, TAU, "none"),
    ),
    "hwd_loss": (
        lambda s, t: hwd_loss(s, t, TAU, mu=1.0, backend="torch"),
        lambda s, t: hwd_loss_reference(s, t, tau=TAU, mu=1.0),
    ),
    "HWDLoss-sum": (
        lambda s, t: HWDLoss(TAU, mu=1.0, reduction="sum", backend="torch")(s, t),
        lambda s, t: hwd_loss_reference(s, t, tau=TAU, mu=1.0, reduction="sum"),
    ),
}


def _value_and_grad(fn: Callable[[Tensor, Tensor], Tensor], student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    x = student.clone().requires_grad_(True)
    value = fn(x, teacher)
    weights = torch.linspace(0.5, 1.5, value.numel(), dtype=value.dtype).view(value.shape)
    (grad,) = torch.autograd.grad((value * weights).sum(), x)
    return value.detach(), grad


@pytest.mark.parametrize("name", list(CASES))
def test_masked_teacher_logits_follow_zero_log_zero(name: str) -> None:
    loss, reference = CASES[name]
    student, teacher = _pair()
    value, grad = _value_and_grad(loss, student, teacher)
    expected, expected_grad = _value_and_grad(reference, _limit(student), _limit(teacher))
    assert torch.isfinite(value).all()
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", list(CASES))
def test_float32_masked_teacher_is_finite_and_close(name: str) -> None:
    loss, reference = CASES[name]
    student, teacher = _pair()
    value, grad = _value_and_grad(loss, student.float(), teacher.float())
    expected, _ = _value_and_grad(reference, _limit(student.float().double()), _limit(teacher.float().double()))
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(value.double(), expected, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("name", ["pixel_kd_loss", "cwd_loss", "hwd_loss"])
def test_student_minus_inf_where_the_teacher_has_mass_is_inf(name: str) -> None:
    loss, _ = CASES[name]
    student, teacher = _pair()
    student[0, 3, 0, 0] = -math.inf  # the teacher is finite there
    value, grad = _value_and_grad(loss, student, teacher)
    assert value.item() == math.inf
    assert torch.isfinite(grad).all()


def test_cwd_channel_with_every_teacher_logit_masked_is_nan() -> None:
    student, teacher = _pair()
    teacher[0, 2] = -math.inf  # no teacher distribution over this channel's positions: undefined, not 0
    assert math.isnan(cwd_loss(student, teacher, TAU, backend="torch").item())


def test_kd_pixel_with_every_teacher_logit_masked() -> None:
    student, teacher = _pair()
    teacher[0, :, 0, 0] = -math.inf  # no teacher distribution at this pixel
    assert math.isnan(pixel_kd_loss(student, teacher, TAU).item())
    labels = torch.zeros(SHAPE[0], *SHAPE[2:], dtype=torch.long)
    labels[0, 0, 0] = 255
    value, grad = _value_and_grad(lambda s, t: pixel_kd_loss(s, t, TAU, labels), student, teacher)
    expected, expected_grad = _value_and_grad(
        lambda s, t: pixel_kd_loss_reference(s, t, TAU, labels), _limit(student), _limit(teacher)
    )
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("where", ["student", "teacher"])
def test_kd_nan_input_still_gives_nan(where: str) -> None:
    student, teacher = _pair()
    (student if where == "student" else teacher)[0, 0, 0, 0] = math.nan
    assert math.isnan(pixel_kd_loss(student, teacher, TAU).item())
