"""Argument validation shared by every segkd loss and op.

Every user-facing check lives here so that error messages have one voice:
they name the argument, say what was expected and show what was received.
Checks never use ``assert`` (it vanishes under ``python -O``) and never force a
device synchronisation unless the user opts in with ``SEGKD_CHECK_FINITE=1``.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Collection, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "REDUCTIONS",
    "as_int",
    "as_real_number",
    "check_channels",
    "check_choice",
    "check_dim_size",
    "check_exact_dims",
    "check_finite_if_enabled",
    "check_finite_number",
    "check_floating_dtype",
    "check_floating_tensor",
    "check_generator",
    "check_in_range",
    "check_int",
    "check_label_values",
    "check_labels",
    "check_labels_shape",
    "check_min_dims",
    "check_min_spatial_size",
    "check_non_negative",
    "check_nonempty",
    "check_positive",
    "check_positive_int",
    "check_probability",
    "check_reduction",
    "check_same_device",
    "check_same_shape",
    "check_same_shape_except",
    "check_shape_spec",
    "check_student_teacher_features",
    "check_student_teacher_logits",
    "check_temperature",
    "finite_check_enabled",
    "shape_str",
]

REDUCTIONS = ("mean", "sum", "none")


def shape_str(shape: Sequence[int] | torch.Size) -> str:
    """Format a shape as ``(2, 19, 64, 64)`` for error messages."""
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def check_floating_tensor(value: Any, name: str) -> Tensor:
    """Raise ``TypeError`` unless ``value`` is a floating-point tensor."""
    if not isinstance(value, Tensor):
        raise TypeError(f"Expected `{name}` to be a torch.Tensor, got {type(value).__name__}.")
    if not value.is_floating_point():
        raise TypeError(f"Expected `{name}` to have a floating-point dtype, got {value.dtype}.")
    return value


def check_min_dims(value: Tensor, name: str, min_dims: int, layout: str = "(N, C, H, W) or (N, C, L)") -> None:
    """Raise ``ValueError`` if ``value`` has fewer than ``min_dims`` dimensions."""
    if value.dim() < min_dims:
        raise ValueError(
            f"Expected `{name}` to have at least {min_dims} dimensions {layout}, "
            f"got {value.dim()} dimensions with shape {shape_str(value.shape)}."
        )


def check_exact_dims(value: Tensor, name: str, dims: int, layout: str) -> None:
    """Raise ``ValueError`` unless ``value`` has exactly ``dims`` dimensions."""
    if value.dim() != dims:
        raise ValueError(
            f"Expected `{name}` to have {dims} dimensions {layout}, "
            f"got {value.dim()} dimensions with shape {shape_str(value.shape)}."
        )


def check_min_spatial_size(value: Tensor, name: str, min_size: int, reason: str = "") -> None:
    """Raise ``ValueError`` unless the last two dimensions of ``value`` are both at least ``min_size``."""
    if value.shape[-2] < min_size or value.shape[-1] < min_size:
        why = f" ({reason})" if reason else ""
        raise ValueError(
            f"Expected `{name}` to be at least {min_size} x {min_size} in its last two dimensions{why}, "
            f"got shape {shape_str(value.shape)}."
        )


def check_same_shape(a: Tensor, b: Tensor, name_a: str = "student", name_b: str = "teacher") -> None:
    """Raise ``ValueError`` unless ``a`` and ``b`` have identical shapes."""
    if a.shape != b.shape:
        raise ValueError(
            f"Expected `{name_a}` and `{name_b}` to have the same shape, "
            f"got {shape_str(a.shape)} and {shape_str(b.shape)}."
        )


def check_same_shape_except(
    a: Tensor, b: Tensor, dim: int, name_a: str = "student", name_b: str = "teacher", what: str = "channels"
) -> None:
    """Raise ``ValueError`` unless ``a`` and ``b`` have the same shape in every dimension but ``dim``."""
    differs = a.dim() != b.dim() or any(
        i != dim and x != y for i, (x, y) in enumerate(zip(a.shape, b.shape, strict=True))
    )
    if differs:
        raise ValueError(
            f"Expected `{name_a}` and `{name_b}` to have the same shape except in dimension {dim} ({what}), "
            f"got {shape_str(a.shape)} and {shape_str(b.shape)}."
        )


def check_same_device(a: Tensor, b: Tensor, name_a: str = "student", name_b: str = "teacher") -> None:
    """Raise ``ValueError`` unless ``a`` and ``b`` live on the same device."""
    if a.device != b.device:
        raise ValueError(f"Expected `{name_a}` and `{name_b}` to be on the same device, got {a.device} and {b.device}.")


def check_nonempty(value: Tensor, name: str) -> None:
    """Raise ``ValueError`` if ``value`` has a zero-sized dimension."""
    if value.numel() == 0:
        raise ValueError(f"Expected `{name}` to be non-empty, got shape {shape_str(value.shape)}.")


def check_student_teacher_logits(student: Any, teacher: Any, min_dims: int = 3) -> tuple[Tensor, Tensor]:
    """Validate a pair of logit (or feature) tensors of the same shape.

    Checks type, floating dtype, number of dimensions, identical shapes, device, and
    non-emptiness; then, when ``SEGKD_CHECK_FINITE=1``, that both are finite.
    """
    check_floating_tensor(student, "student")
    check_floating_tensor(teacher, "teacher")
    check_min_dims(student, "student", min_dims)
    check_min_dims(teacher, "teacher", min_dims)
    check_same_shape(student, teacher)
    check_same_device(student, teacher)
    check_nonempty(student, "student")
    check_finite_if_enabled(student, "student")
    check_finite_if_enabled(teacher, "teacher")
    return student, teacher


def check_student_teacher_features(
    student: Any,
    teacher: Any,
    name_student: str = "student",
    name_teacher: str = "teacher",
    layout: str = "(N, C, H, W)",
) -> tuple[Tensor, Tensor]:
    """Validate a pair of 4-D feature maps ``(N, C, H, W)`` whose channel counts may differ.

    Checks type, floating dtype, exactly 4 dims, equal ``N``, ``H`` and ``W``, device and
    non-emptiness; then, when ``SEGKD_CHECK_FINITE=1``, that both are finite.
    """
    for value, name in ((student, name_student), (teacher, name_teacher)):
        check_floating_tensor(value, name)
        check_exact_dims(value, name, 4, layout)
    check_same_shape_except(student, teacher, 1, name_student, name_teacher)
    check_same_device(student, teacher, name_student, name_teacher)
    for value, name in ((student, name_student), (teacher, name_teacher)):
        check_nonempty(value, name)
        check_finite_if_enabled(value, name)
    return student, teacher


def _scalar_kind(value: Any) -> str | None:
    """``"int"``, ``"float"`` or ``None``: the kind of real scalar ``value`` is.

    Real scalars are Python ``int``/``float``, NumPy scalars and 0-d arrays of an integer or
    floating dtype, and 0-d tensors of an integer or floating dtype. ``bool`` (Python, NumPy or
    tensor) and complex values are not.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return "int"
    if isinstance(value, numbers.Real):
        return "float"
    if isinstance(value, Tensor):
        if value.dim() != 0 or value.is_complex() or value.dtype == torch.bool:
            return None
        return "float" if value.is_floating_point() else "int"
    # NumPy 0-d arrays (and scalars, already numbers.Real above), without importing NumPy.
    kind = getattr(getattr(value, "dtype", None), "kind", None)
    if getattr(value, "ndim", None) == 0 and kind in {"i", "u", "f"}:
        return "float" if kind == "f" else "int"
    return None


def as_real_number(value: Any, name: str) -> float:
    """Return a real scalar (see :func:`_scalar_kind`) as a Python float, raising ``TypeError`` otherwise.

    Too large an integer for a float becomes ``inf`` (and the caller's finiteness check refuses it).
    """
    if _scalar_kind(value) is None:
        raise TypeError(f"Expected `{name}` to be a real number, got {_describe(value)}.")
    number = value.item() if isinstance(value, Tensor) else value
    try:
        return float(number)
    except OverflowError:
        return math.inf if number > 0 else -math.inf


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {shape_str(value.shape)} and dtype {value.dtype}"
    return type(value).__name__


def check_positive(value: Any, name: str) -> float:
    """Return ``value`` as a float, raising unless it is a finite real number > 0."""
    number = as_real_number(value, name)
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"Expected `{name}` to be a finite number > 0, got {number}.")
    return number


def check_finite_number(value: Any, name: str) -> float:
    """Return ``value`` as a float, raising unless it is a finite real number."""
    number = as_real_number(value, name)
    if not math.isfinite(number):
        raise ValueError(f"Expected `{name}` to be finite, got {number}.")
    return number


def as_int(value: Any, name: str) -> int:
    """Return an integer scalar (Python, NumPy or 0-d integer tensor) as a Python ``int``; ``bool`` is refused."""
    if _scalar_kind(value) != "int":
        raise TypeError(f"Expected `{name}` to be an int, got {_describe(value)}.")
    return int(value.item() if isinstance(value, Tensor) else value)


def check_non_negative(value: Any, name: str) -> float:
    """Return ``value`` as a float, raising unless it is a finite number >= 0."""
    value = check_finite_number(value, name)
    if value < 0:
        raise ValueError(f"Expected `{name}` to be >= 0, got {value}.")
    return value


def check_in_range(
    value: Any, name: str, low: float, high: float, *, low_inclusive: bool = True, high_inclusive: bool = True
) -> float:
    """Return ``value`` as a float, raising unless it lies in the given interval."""
    value = check_finite_number(value, name)
    above_low = value >= low if low_inclusive else value > low
    below_high = value <= high if high_inclusive else value < high
    if not (above_low and below_high):
        left = "[" if low_inclusive else "("
        right = "]" if high_inclusive else ")"
        raise ValueError(f"Expected `{name}` to be in {left}{low}, {high}{right}, got {value}.")
    return value


def check_probability(value: Any, name: str) -> float:
    """Return ``value`` as a float in ``[0, 1)``."""
    return check_in_range(value, name, 0.0, 1.0, high_inclusive=False)


def check_positive_int(value: Any, name: str) -> int:
    """Return ``value`` as an ``int``, raising unless it is an integer scalar >= 1 (see :func:`as_int`)."""
    value = as_int(value, name)
    if value < 1:
        raise ValueError(f"Expected `{name}` to be >= 1, got {value}.")
    return value


TEMPERATURE_RANGE = (1e-12, 1e12)


def check_temperature(value: Any, name: str = "tau") -> float:
    """Return a softmax temperature as a float, raising unless ``1e-12 <= value <= 1e12``.

    Outside that range fp32 cannot carry a distillation loss: ``tau^2`` (the losses' scale) and the KL,
    of order ``(|t - s| / tau)^2``, leave fp32's normal range (a subnormal ``tau`` such as ``1e-39`` has an
    infinite ``1 / tau`` and gave NaN).
    """
    value = check_positive(value, name)
    low, high = TEMPERATURE_RANGE
    if not low <= value <= high:
        raise ValueError(
            f"Expected `{name}` to be between {low:g} and {high:g} (a temperature fp32 can carry), got {value}."
        )
    return value


def check_choice(value: Any, name: str, choices: Collection[str]) -> str:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"Expected `{name}` to be one of {options}, got {value!r}.")
    return str(value)


def check_reduction(reduction: Any) -> str:
    """Validate ``reduction`` against ``"mean"``, ``"sum"`` and ``"none"``."""
    return check_choice(reduction, "reduction", REDUCTIONS)


def check_labels(labels: Any, name: str = "labels", batch_size: int | None = None) -> Tensor:
    """Validate an integer label map of shape ``(N, H, W)`` and return it as ``int64``.

    Any integer dtype is accepted (``uint8`` is what a PNG label map decodes to, ``int16``,
    ``int32``, ``int64``); the returned map is ``int64`` (the same tensor when it already is), the
    dtype torch's indexing operations need, so callers must use the returned tensor.
    """
    if not isinstance(labels, Tensor):
        raise TypeError(f"Expected `{name}` to be a torch.Tensor, got {type(labels).__name__}.")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"Expected `{name}` to have an integer dtype (class ids), got {labels.dtype}.")
    check_exact_dims(labels, name, 3, "(N, H, W)")
    if batch_size is not None and labels.shape[0] != batch_size:
        raise ValueError(
            f"Expected `{name}` to have batch size {batch_size} to match the inputs, "
            f"got shape {shape_str(labels.shape)}."
        )
    try:
        return labels.long()
    except (RuntimeError, TypeError) as exc:  # an integer dtype torch cannot convert on this device
        message = f"Expected `{name}` to have an integer dtype convertible to int64, got {labels.dtype}."
        raise TypeError(message) from exc


def check_labels_shape(labels: Tensor, expected: Sequence[int], name: str = "labels", against: str = "logits") -> None:
    """Raise ``ValueError`` unless ``labels`` has exactly the shape ``expected`` (e.g. ``(N, H, W)`` of the logits)."""
    if tuple(labels.shape) != tuple(int(s) for s in expected):
        raise ValueError(
            f"Expected `{name}` to have shape {shape_str(expected)} to match the {against}, "
            f"got {shape_str(labels.shape)}."
        )


def check_int(value: Any, name: str) -> int:
    """Return ``value`` as an ``int`` of any sign; ``TypeError`` unless an integer scalar (:func:`as_int`)."""
    return as_int(value, name)


def check_bool(value: Any, name: str) -> bool:
    """Return ``value`` unchanged, raising ``TypeError`` unless it is a ``bool``."""
    if not isinstance(value, bool):
        raise TypeError(f"Expected `{name}` to be True or False, got {type(value).__name__}.")
    return value


def check_channels(value: Tensor, name: str, expected: int, setting: str) -> None:
    """Raise ``ValueError`` unless dimension 1 of ``value`` has ``expected`` entries (the declared ``setting``)."""
    if value.dim() < 2 or value.shape[1] != expected:
        raise ValueError(
            f"Expected `{name}` to have {expected} channels in dimension 1 ({setting}={expected}), "
            f"got shape {shape_str(value.shape)}."
        )


def check_generator(value: Any, name: str = "generator") -> torch.Generator | None:
    """Return ``value`` unchanged, raising ``TypeError`` unless it is a ``torch.Generator`` or ``None``."""
    if value is not None and not isinstance(value, torch.Generator):
        raise TypeError(f"Expected `{name}` to be a torch.Generator or None, got {type(value).__name__}.")
    return value


def check_label_values(labels: Tensor, num_classes: int, ignore_index: int, name: str = "labels") -> None:
    """Raise ``ValueError`` if ``labels`` holds a value outside ``[0, num_classes)`` other than ``ignore_index``.

    Costs a few element-wise ops and one boolean read back to the host: on CUDA, one device
    synchronisation per call (a graph break under ``torch.compile``).
    """
    bad = ((labels < 0) | (labels >= num_classes)) & (labels != ignore_index)
    if bool(bad.any()):
        values = torch.unique(labels[bad]).tolist()
        shown = ", ".join(str(v) for v in values[:5]) + (", ..." if len(values) > 5 else "")
        raise ValueError(
            f"Expected `{name}` to hold class ids in [0, {num_classes}) or ignore_index={ignore_index}, found {shown}."
        )


def check_dim_size(value: Tensor, name: str, dim: int, expected: int, what: str) -> None:
    """Raise ``ValueError`` unless ``value.shape[dim] == expected`` (``what`` names the dimension)."""
    if value.shape[dim] != expected:
        raise ValueError(
            f"Expected `{name}` to have size {expected} in dimension {dim} ({what}), "
            f"got shape {shape_str(value.shape)}."
        )


def check_floating_dtype(value: Any, name: str) -> torch.dtype:
    """Return ``value`` unchanged, raising unless it is a floating-point ``torch.dtype``."""
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise TypeError(f"Expected `{name}` to be a floating-point torch.dtype, got {value!r}.")
    return value


def check_shape_spec(value: Any, name: str, min_dims: int = 1) -> tuple[int, ...]:
    """Return ``value`` as a tuple of ints, raising unless it is a sequence of at least ``min_dims`` ints >= 1."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, torch.Size)):
        raise TypeError(f"Expected `{name}` to be a sequence of ints like (2, 19, 8, 8), got {type(value).__name__}.")
    if len(value) < min_dims or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in value):
        raise ValueError(f"Expected `{name}` to hold at least {min_dims} ints >= 1, got {tuple(value)!r}.")
    return tuple(int(s) for s in value)


def finite_check_enabled() -> bool:
    """Whether the opt-in NaN/Inf input check is on (``SEGKD_CHECK_FINITE=1``)."""
    return os.environ.get("SEGKD_CHECK_FINITE", "0").strip().lower() in {"1", "true", "yes", "on"}


def check_finite_if_enabled(value: Tensor, name: str) -> None:
    """Raise ``ValueError`` on NaN/Inf in ``value`` when ``SEGKD_CHECK_FINITE=1``.

    Off by default: the check reads the tensor back to the host, which
    synchronises a CUDA stream.
    """
    if not finite_check_enabled():
        return
    finite = torch.isfinite(value)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(
            f"Expected `{name}` to be finite, found {bad} NaN/Inf values in a tensor of shape {shape_str(value.shape)} "
            "(this check is on because SEGKD_CHECK_FINITE=1)."
        )


def check_weights_tensor(value: Any, name: str, logits: Tensor) -> Tensor:
    """Validate per-channel weights against ``(N, C, ...)`` logits: a floating ``(N, C)`` tensor on their device."""
    check_floating_tensor(value, name)
    expected = tuple(logits.shape[:2])
    if tuple(value.shape) != expected:
        raise ValueError(
            f"Expected `{name}` to have shape (N, C) = {shape_str(expected)} for logits of shape "
            f"{shape_str(logits.shape)}, got {shape_str(value.shape)}."
        )
    check_same_device(value, logits, name, "student")
    check_finite_if_enabled(value, name)
    return value
