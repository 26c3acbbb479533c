"""Hypothesis strategies for segmentation-shaped tensors: logits, feature maps and label maps.

They generate the inputs that break distillation losses in practice: odd spatial sizes (not only
powers of two), a single class (``C == 1``), one-pixel images, logits from tiny to ``+-1e4``,
half-precision dtypes, a student equal to its teacher, and label maps full of ignore pixels.

Tensor values are drawn from a seeded ``torch.Generator`` (the seed is what hypothesis draws and
shrinks), so even ``(4, 40, 33, 33)`` logits are generated quickly. Every tensor is on the CPU
unless ``device`` says otherwise.

This module needs `hypothesis <https://hypothesis.readthedocs.io>`_, installed by the ``test``
extra: ``pip install segkd[test]``.

Example:
    >>> from hypothesis import given, settings
    >>> from segkd.functional import cwd_loss
    >>> from segkd.testing import strategies as sks
    >>> @settings(max_examples=5, database=None)
    ... @given(pair=sks.logit_pairs(sks.segmentation_shapes(max_channels=4, max_side=5)))
    ... def test_cwd_is_non_negative(pair):
    ...     student, teacher = pair
    ...     assert cwd_loss(student, teacher) >= 0  # segkd clamps each channel's KL at 0
    >>> test_cwd_is_non_negative()
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

try:
    from hypothesis import strategies as st
    from hypothesis.strategies import SearchStrategy
except ImportError as error:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "segkd.testing.strategies needs hypothesis, which is not installed: `pip install segkd[test]`."
    ) from error

__all__ = [
    "FLOAT_DTYPES",
    "Relation",
    "feature_map_pairs",
    "feature_maps",
    "float_dtypes",
    "label_maps",
    "logit_pairs",
    "logits",
    "segmentation_batches",
    "segmentation_shapes",
    "temperatures",
]

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
Relation = Literal["independent", "close", "equal", "any"]
_RELATIONS = ("independent", "close", "equal")

Shape = tuple[int, ...]


def _as_strategy(value: object) -> SearchStrategy:
    """Wrap a plain value in ``st.just`` so every argument may be a value or a strategy."""
    return value if isinstance(value, SearchStrategy) else st.just(value)


def _sizes(low: int, high: int) -> SearchStrategy[int]:
    """Integers in ``[low, high]`` with the two boundaries drawn often (C == 1, one-pixel images)."""
    if low > high:
        raise ValueError(f"Expected a size range with min <= max, got [{low}, {high}].")
    return st.one_of(st.sampled_from(sorted({low, high})), st.integers(low, high))


def segmentation_shapes(
    *,
    min_batch: int = 1,
    max_batch: int = 4,
    min_channels: int = 1,
    max_channels: int = 40,
    min_side: int = 1,
    max_side: int = 33,
    spatial_dims: int = 2,
) -> SearchStrategy[Shape]:
    """Shapes ``(N, C, H, W)`` (or ``(N, C, L)`` with ``spatial_dims=1``) of segmentation logits.

    Each size is drawn uniformly from its range, with the boundaries mixed in often, so ``C == 1``,
    ``1 x 1`` images and odd sizes such as ``(3, 17, 1, 33)`` all appear within a few examples.

    Args:
        min_batch: smallest ``N``.
        max_batch: largest ``N``.
        min_channels: smallest ``C``.
        max_channels: largest ``C``.
        min_side: smallest ``H``, ``W`` (or ``L``).
        max_side: largest ``H``, ``W`` (or ``L``).
        spatial_dims: number of trailing spatial dimensions, 1 or more.

    Returns:
        A strategy of shape tuples of length ``2 + spatial_dims``.

    Raises:
        ValueError: a range with min > max or below 1, or ``spatial_dims < 1``.

    Example:
        >>> from hypothesis import find, settings
        >>> from segkd.testing.strategies import segmentation_shapes
        >>> find(segmentation_shapes(), lambda shape: True, settings=settings(database=None))  # the simplest
        (1, 1, 1, 1)
    """
    if min(min_batch, min_channels, min_side, spatial_dims) < 1:
        raise ValueError("Expected every minimum size and `spatial_dims` to be >= 1.")
    return st.tuples(
        _sizes(min_batch, max_batch),
        _sizes(min_channels, max_channels),
        *[_sizes(min_side, max_side) for _ in range(spatial_dims)],
    )


def float_dtypes(dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> SearchStrategy[torch.dtype]:
    """One of ``dtypes`` (default: fp32, fp64, fp16, bf16)."""
    return st.sampled_from(list(dtypes))


def temperatures(min_value: float = 0.5, max_value: float = 8.0) -> SearchStrategy[float]:
    """Softmax temperatures in ``[min_value, max_value]``, with 1 and 4 (the common settings) mixed in."""
    fixed = [t for t in (1.0, 4.0) if min_value <= t <= max_value]
    floats = st.floats(min_value, max_value, allow_nan=False, allow_infinity=False)
    return st.one_of(st.sampled_from(fixed), floats) if fixed else floats


def _random(seed: int, shape: Shape, scale: float, dtype: torch.dtype, device: str | torch.device) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=generator, dtype=torch.float64) * scale
    return _cast(values, dtype, device)


def _cast(values: Tensor, dtype: torch.dtype, device: str | torch.device) -> Tensor:
    # Keep large magnitudes finite in fp16 (max 65504): clamp at half the largest value.
    limit = torch.finfo(dtype).max / 2
    return values.clamp(-limit, limit).to(dtype=dtype, device=device)


_seeds = st.integers(0, 2**32 - 1)


@st.composite
def logits(
    draw: st.DrawFn,
    shapes: SearchStrategy[Shape] | Shape | None = None,
    *,
    magnitude: SearchStrategy[float] | float = 3.0,
    dtype: SearchStrategy[torch.dtype] | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Tensor:
    """Logits ``magnitude * randn(shape)`` of a segmentation shape.

    Args:
        draw: supplied by hypothesis.
        shapes: a shape or a strategy of shapes (default :func:`segmentation_shapes`).
        magnitude: scale of the logits, a float or a strategy of floats (e.g.
            ``st.sampled_from([1e-3, 1.0, 1e4])``). Values are clamped to half the dtype's range.
        dtype: a dtype or a strategy of dtypes (e.g. :func:`float_dtypes`).
        device: where the tensor is put.

    Returns:
        A strategy of tensors.

    Example:
        >>> import torch
        >>> from hypothesis import find, settings
        >>> from segkd.testing.strategies import logits
        >>> strategy = logits((2, 3, 5, 7), magnitude=1e4, dtype=torch.bfloat16)
        >>> x = find(strategy, lambda x: True, settings=settings(database=None))
        >>> x.shape, x.dtype
        (torch.Size([2, 3, 5, 7]), torch.bfloat16)
    """
    shape = draw(_as_strategy(segmentation_shapes() if shapes is None else shapes))
    scale = draw(_as_strategy(magnitude))
    return _random(draw(_seeds), tuple(shape), scale, draw(_as_strategy(dtype)), device)


@st.composite
def logit_pairs(
    draw: st.DrawFn,
    shapes: SearchStrategy[Shape] | Shape | None = None,
    *,
    magnitude: SearchStrategy[float] | float = 3.0,
    dtype: SearchStrategy[torch.dtype] | torch.dtype = torch.float32,
    relation: Relation = "any",
    device: str | torch.device = "cpu",
) -> tuple[Tensor, Tensor]:
    """A ``(student, teacher)`` pair of logits with the same shape and dtype.

    Args:
        draw: supplied by hypothesis.
        shapes: a shape or a strategy of shapes (default :func:`segmentation_shapes`).
        magnitude: scale of the logits, a float or a strategy of floats.
        dtype: a dtype or a strategy of dtypes; both tensors get the same one.
        relation: ``"independent"`` (two independent draws), ``"close"`` (the teacher is the
            student plus 10% noise), ``"equal"`` (the teacher is a copy of the student: the
            degenerate case of many losses) or ``"any"`` (one of the three, drawn).
        device: where the tensors are put.

    Returns:
        A strategy of ``(student, teacher)`` tuples; the two never share memory.

    Raises:
        ValueError: an unknown ``relation``.

    Example:
        >>> import torch
        >>> from hypothesis import find, settings
        >>> from segkd.testing.strategies import logit_pairs
        >>> student, teacher = find(logit_pairs((1, 2, 3, 3), relation="equal"), lambda pair: True,
        ...                         settings=settings(database=None))
        >>> torch.equal(student, teacher)
        True
    """
    if relation not in (*_RELATIONS, "any"):
        raise ValueError(f"Expected `relation` to be one of {(*_RELATIONS, 'any')}, got {relation!r}.")
    shape = tuple(draw(_as_strategy(segmentation_shapes() if shapes is None else shapes)))
    scale = draw(_as_strategy(magnitude))
    chosen_dtype = draw(_as_strategy(dtype))
    kind = draw(st.sampled_from(_RELATIONS)) if relation == "any" else relation
    generator = torch.Generator().manual_seed(draw(_seeds))
    student = torch.randn(shape, generator=generator, dtype=torch.float64) * scale
    if kind == "equal":
        teacher = student.clone()
    elif kind == "close":
        teacher = student + 0.1 * scale * torch.randn(shape, generator=generator, dtype=torch.float64)
    else:
        teacher = torch.randn(shape, generator=generator, dtype=torch.float64) * scale
    return _cast(student, chosen_dtype, device), _cast(teacher, chosen_dtype, device)


@st.composite
def feature_maps(
    draw: st.DrawFn,
    shapes: SearchStrategy[Shape] | Shape | None = None,
    *,
    magnitude: SearchStrategy[float] | float = 1.0,
    non_negative: bool = False,
    dtype: SearchStrategy[torch.dtype] | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Tensor:
    """Feature maps ``(N, C, H, W)``, optionally non-negative (as after a ReLU, with exact zeros).

    Args:
        draw: supplied by hypothesis.
        shapes: a shape or a strategy of shapes (default :func:`segmentation_shapes` with up to
            64 channels).
        magnitude: scale of the values, a float or a strategy of floats.
        non_negative: apply a ReLU, so about half of the values are exactly zero.
        dtype: a dtype or a strategy of dtypes.
        device: where the tensor is put.

    Returns:
        A strategy of tensors.

    Example:
        >>> from hypothesis import find, settings
        >>> from segkd.testing.strategies import feature_maps
        >>> strategy = feature_maps((1, 4, 2, 2), non_negative=True)
        >>> features = find(strategy, lambda x: True, settings=settings(database=None))
        >>> bool((features >= 0).all())
        True
    """
    default = segmentation_shapes(max_channels=64)
    shape = tuple(draw(_as_strategy(default if shapes is None else shapes)))
    values = _random(draw(_seeds), shape, draw(_as_strategy(magnitude)), torch.float64, "cpu")
    if non_negative:
        values = values.clamp_min(0.0)
    return _cast(values, draw(_as_strategy(dtype)), device)


@st.composite
def feature_map_pairs(
    draw: st.DrawFn,
    shapes: SearchStrategy[Shape] | Shape | None = None,
    *,
    teacher_channels: SearchStrategy[int] | int | None = None,
    magnitude: SearchStrategy[float] | float = 1.0,
    non_negative: bool = False,
    dtype: SearchStrategy[torch.dtype] | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[Tensor, Tensor]:
    """Student and teacher feature maps with the same ``N, H, W``, for feature distillation.

    Args:
        draw: supplied by hypothesis.
        shapes: the student's shape or a strategy of shapes (default :func:`segmentation_shapes`
            with up to 64 channels).
        teacher_channels: the teacher's channel count (an int or a strategy); ``None`` keeps the
            student's, as for losses that compare features directly. Use a different count for
            losses with a learned projection (MGD, for example).
        magnitude: scale of the values, a float or a strategy of floats.
        non_negative: apply a ReLU to both.
        dtype: a dtype or a strategy of dtypes; both get the same one.
        device: where the tensors are put.

    Returns:
        A strategy of ``(student, teacher)`` tuples.

    Example:
        >>> from hypothesis import find, settings
        >>> from segkd.testing.strategies import feature_map_pairs
        >>> student, teacher = find(feature_map_pairs((2, 8, 5, 5), teacher_channels=16), lambda pair: True,
        ...                         settings=settings(database=None))
        >>> student.shape, teacher.shape
        (torch.Size([2, 8, 5, 5]), torch.Size([2, 16, 5, 5]))
    """
    default = segmentation_shapes(max_channels=64)
    shape = tuple(draw(_as_strategy(default if shapes is None else shapes)))
    channels = shape[1] if teacher_channels is None else draw(_as_strategy(teacher_channels))
    chosen_dtype = draw(_as_strategy(dtype))
    scale = draw(_as_strategy(magnitude))
    student = draw(feature_maps(shape, magnitude=scale, non_negative=non_negative, dtype=chosen_dtype, device=device))
    teacher_shape = (shape[0], channels, *shape[2:])
    teacher = draw(
        feature_maps(teacher_shape, magnitude=scale, non_negative=non_negative, dtype=chosen_dtype, device=device)
    )
    return student, teacher


@st.composite
def label_maps(
    draw: st.DrawFn,
    shapes: SearchStrategy[Shape] | Shape,
    num_classes: SearchStrategy[int] | int,
    *,
    ignore_index: int | None = 255,
    ignore_fraction: SearchStrategy[float] | float | None = None,
    device: str | torch.device = "cpu",
) -> Tensor:
    """Integer label maps ``(N, H, W)`` with class ids in ``[0, num_classes)`` and ignore pixels.

    Args:
        draw: supplied by hypothesis.
        shapes: the label map's ``(N, H, W)`` shape, or a strategy of them.
        num_classes: number of classes, >= 1 (an int or a strategy).
        ignore_index: the id of ignored pixels (default 255, as in mmseg); ``None`` for none.
        ignore_fraction: the probability that a pixel is ignored; default draws one of 0, a value
            in ``(0, 1)``, and 1 (every pixel ignored: the case that divides by zero in careless
            code).
        device: where the tensor is put.

    Returns:
        A strategy of ``torch.int64`` tensors.

    Raises:
        ValueError: ``num_classes < 1``, or an ``ignore_index`` inside ``[0, num_classes)``.

    Example:
        >>> from hypothesis import find, settings
        >>> from segkd.testing.strategies import label_maps
        >>> all_ignored = lambda y: bool((y == 255).all())
        >>> find(label_maps((1, 2, 3), num_classes=19), all_ignored, settings=settings(database=None))
        tensor([[[255, 255, 255],
                 [255, 255, 255]]])
    """
    shape = tuple(draw(_as_strategy(shapes)))
    classes = draw(_as_strategy(num_classes))
    if classes < 1:
        raise ValueError(f"Expected `num_classes` to be >= 1, got {classes}.")
    if ignore_index is not None and 0 <= ignore_index < classes:
        raise ValueError(f"Expected `ignore_index` outside [0, {classes}), got {ignore_index}.")
    if ignore_fraction is None:
        ignore_fraction = st.one_of(st.just(0.0), st.floats(0.05, 0.95), st.just(1.0))
    fraction = 0.0 if ignore_index is None else draw(_as_strategy(ignore_fraction))
    generator = torch.Generator().manual_seed(draw(_seeds))
    labels = torch.randint(0, classes, shape, generator=generator, dtype=torch.int64)
    if fraction > 0 and ignore_index is not None:
        ignored = torch.rand(shape, generator=generator) < fraction
        labels = labels.masked_fill(ignored, ignore_index)
    return labels.to(device)


@st.composite
def segmentation_batches(
    draw: st.DrawFn,
    shapes: SearchStrategy[Shape] | Shape | None = None,
    *,
    magnitude: SearchStrategy[float] | float = 3.0,
    dtype: SearchStrategy[torch.dtype] | torch.dtype = torch.float32,
    relation: Relation = "any",
    ignore_index: int | None = 255,
    device: str | torch.device = "cpu",
) -> tuple[Tensor, Tensor, Tensor]:
    """``(student, teacher, labels)``: a logit pair and a matching ``(N, H, W)`` label map.

    The number of classes is the logits' ``C``; the label map has ignore pixels as in
    :func:`label_maps`.

    Args:
        draw: supplied by hypothesis.
        shapes: an ``(N, C, H, W)`` shape or a strategy of them (default :func:`segmentation_shapes`).
        magnitude: scale of the logits.
        dtype: dtype of the logits (a dtype or a strategy).
        relation: relation between student and teacher, as in :func:`logit_pairs`.
        ignore_index: the id of ignored pixels; ``None`` for none.
        device: where the tensors are put.

    Returns:
        A strategy of ``(student, teacher, labels)`` tuples.

    Raises:
        ValueError: a shape that is not 4-D.

    Example:
        >>> from hypothesis import find, settings
        >>> from segkd.testing.strategies import segmentation_batches
        >>> student, teacher, labels = find(segmentation_batches((2, 19, 8, 8)), lambda batch: True,
        ...                                 settings=settings(database=None))
        >>> labels.shape, labels.dtype
        (torch.Size([2, 8, 8]), torch.int64)
    """
    shape = tuple(draw(_as_strategy(segmentation_shapes() if shapes is None else shapes)))
    if len(shape) != 4:
        raise ValueError(f"Expected `(N, C, H, W)` shapes, got {shape}.")
    student, teacher = draw(logit_pairs(shape, magnitude=magnitude, dtype=dtype, relation=relation, device=device))
    labels = draw(label_maps((shape[0], *shape[2:]), shape[1], ignore_index=ignore_index, device=device))
    return student, teacher, labels
