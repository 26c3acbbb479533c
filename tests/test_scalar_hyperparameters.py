"""Issue 15, class 5: every hyper-parameter takes any real scalar, converted to a Python number.

A Python ``int``/``float``, a NumPy scalar or 0-d array, and a 0-d tensor of an integer or floating
dtype are all accepted (``np.float32(2.0)`` and ``torch.tensor(2.0)`` used to be refused while
``np.float64`` was accepted); ``bool``, complex, NaN and tensors with elements are refused.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import segkd
from segkd import _checks
from segkd.functional import cwd_loss, dist_loss, hwd_loss, pixel_kd_loss

# The arguments without default of each exported module, and the int settings among them.
REQUIRED: dict[str, dict[str, int]] = {
    "CIRKDLoss": {"num_classes": 3, "student_channels": 4, "teacher_channels": 5},
    "CIRKDMemoryLoss": {"num_classes": 3, "student_channels": 4, "teacher_channels": 5},
    "CIRKDMiniBatchLoss": {},
    "CWDLoss": {},
    "DISTLoss": {},
    "HWDLoss": {},
    "IFVDLoss": {"num_classes": 3},
    "KDLoss": {},
    "MGDLoss": {"student_channels": 4, "teacher_channels": 5},
    "SKDDiscriminator": {"num_classes": 3},
    "SKDLoss": {"num_classes": 3},
}
SMALL_QUEUES = {"pixel_memory_size": 12, "region_memory_size": 5, "pixel_contrast_size": 9, "region_contrast_size": 6}
FLOAT = 0.5  # exact in every floating dtype, and valid for every float setting (weights, taus, ratios, mu, beta)


def _numeric_settings(cls: type[nn.Module]) -> dict[str, Any]:
    """Every numeric setting of ``cls``: float ones at FLOAT, int ones at their default or required value."""
    settings: dict[str, Any] = dict(REQUIRED[cls.__name__])
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        default = parameter.default
        if name in settings or isinstance(default, bool):
            continue
        if isinstance(default, float):
            settings[name] = FLOAT
        elif isinstance(default, int):
            settings[name] = SMALL_QUEUES.get(name, default)
    return settings


def _convert(value: float | int, kind: str) -> Any:
    return {
        "numpy-32": np.float32(value) if isinstance(value, float) else np.int32(value),
        "numpy-64": np.float64(value) if isinstance(value, float) else np.int64(value),
        "numpy-0d": np.array(value),
        "tensor-0d": torch.tensor(value),
        "tensor-0d-f64": torch.tensor(value, dtype=torch.float64 if isinstance(value, float) else torch.int16),
    }[kind]


KINDS = ["numpy-32", "numpy-64", "numpy-0d", "tensor-0d", "tensor-0d-f64"]


@pytest.mark.parametrize("name", sorted(REQUIRED))
@pytest.mark.parametrize("kind", KINDS)
def test_every_module_setting_takes_numpy_and_0d_tensor_scalars(name: str, kind: str) -> None:
    cls = getattr(segkd, name)
    settings = _numeric_settings(cls)
    assert settings, f"{name} has no numeric setting: the test would check nothing"
    expected = cls(**settings)
    actual = cls(**{key: _convert(value, kind) for key, value in settings.items()})
    assert repr(actual) == repr(expected)  # extra_repr shows every setting
    for key, value in settings.items():
        stored = getattr(actual, key, None)
        if stored is not None and not isinstance(stored, nn.Module):
            assert type(stored) is type(value), f"{name}.{key} stored as {type(stored).__name__}"
            assert stored == value


@pytest.mark.parametrize("kind", KINDS)
def test_functional_forms_take_numpy_and_0d_tensor_scalars(kind: str) -> None:
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 4, 5, generator=gen), torch.randn(2, 3, 4, 5, generator=gen)
    tau, mu, beta = _convert(2.0, kind), _convert(1.0, kind), _convert(0.5, kind)
    pairs = [
        (cwd_loss(student, teacher, tau), cwd_loss(student, teacher, 2.0)),
        (hwd_loss(student, teacher, tau, mu, beta), hwd_loss(student, teacher, 2.0, 1.0, 0.5)),
        (dist_loss(student, teacher, mu, beta, tau), dist_loss(student, teacher, 1.0, 0.5, 2.0)),
        (pixel_kd_loss(student, teacher, tau), pixel_kd_loss(student, teacher, 2.0)),
    ]
    for actual, expected in pairs:
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "value",
    [True, np.bool_(True), torch.tensor(True), 2j, np.complex64(2), torch.tensor(2 + 0j), torch.tensor([2.0]), "2"],
    ids=repr,
)
def test_non_real_scalars_are_refused(value: object) -> None:
    with pytest.raises(TypeError, match=r"Expected `tau` to be a real number, got"):
        segkd.CWDLoss(tau=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [np.float32("nan"), torch.tensor(math.nan), np.float64(math.inf), -torch.tensor(1.0)])
def test_nan_inf_and_non_positive_scalars_are_refused(value: object) -> None:
    with pytest.raises(ValueError, match=r"Expected `tau` to be a finite number > 0, got"):
        segkd.CWDLoss(tau=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [2.0, np.float32(2.5), torch.tensor(2.5)], ids=repr)
def test_int_settings_refuse_floats(value: object) -> None:
    with pytest.raises(TypeError, match=r"Expected `num_classes` to be an int, got"):
        segkd.IFVDLoss(num_classes=value)  # type: ignore[arg-type]


def test_a_huge_int_is_not_finite() -> None:
    with pytest.raises(ValueError, match=r"Expected `tau` to be finite, got inf"):
        _checks.check_finite_number(10**400, "tau")
