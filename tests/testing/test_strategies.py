"""segkd.testing.strategies: generated tensors respect their declared ranges, and the extra is optional."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
from hypothesis import find, given
from hypothesis import strategies as st

from segkd.testing import strategies as sks


@given(sks.segmentation_shapes())
def test_segmentation_shapes_are_in_range(shape: tuple[int, ...]) -> None:
    n, c, h, w = shape
    assert 1 <= n <= 4
    assert 1 <= c <= 40
    assert 1 <= h <= 33
    assert 1 <= w <= 33


@pytest.mark.parametrize(
    "condition",
    [
        lambda s: s[1] == 1,  # a single class
        lambda s: s[2] == s[3] == 1,  # a one-pixel image
        lambda s: s[1] == 40,
        lambda s: s[2] % 2 == 1 and s[3] % 2 == 1 and s[2] > 1,  # odd sizes, not powers of two
    ],
)
def test_segmentation_shapes_reach_the_edge_cases(condition: Callable[[tuple[int, ...]], bool]) -> None:
    find(sks.segmentation_shapes(), condition)


def test_segmentation_shapes_one_spatial_dim() -> None:
    shape = find(sks.segmentation_shapes(spatial_dims=1, max_side=7), lambda s: s[2] == 7)
    assert len(shape) == 3


def test_segmentation_shapes_reject_bad_ranges() -> None:
    with pytest.raises(ValueError, match=">= 1"):
        sks.segmentation_shapes(min_channels=0)
    with pytest.raises(ValueError, match="min <= max"):
        sks.segmentation_shapes(min_side=5, max_side=3)


@given(sks.logits((2, 3, 5, 7), magnitude=st.sampled_from([1e-3, 1e4]), dtype=sks.float_dtypes()))
def test_logits_shape_dtype_magnitude_and_finite(x: torch.Tensor) -> None:
    assert x.shape == (2, 3, 5, 7)
    assert x.dtype in sks.FLOAT_DTYPES
    assert torch.isfinite(x).all()
    assert 0 < float(x.abs().max()) <= 1e4 * 10


@given(sks.logits((1, 1, 2, 2), magnitude=1e5, dtype=torch.float16))
def test_logits_stay_finite_in_half_precision(x: torch.Tensor) -> None:
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("relation", ["independent", "close", "equal"])
@given(data=st.data())
def test_logit_pairs_relation(relation: str, data: st.DataObject) -> None:
    student, teacher = data.draw(sks.logit_pairs(sks.segmentation_shapes(max_side=6), relation=relation))
    assert student.shape == teacher.shape
    assert student.dtype == teacher.dtype
    assert student.data_ptr() != teacher.data_ptr()
    difference = float((student - teacher).abs().max())
    if relation == "equal":
        assert difference == 0
    elif relation == "close":
        assert difference <= 0.1 * 3.0 * 10


def test_logit_pairs_any_reaches_equal_pairs() -> None:
    find(sks.logit_pairs((1, 2, 3, 3)), lambda pair: torch.equal(pair[0], pair[1]))


def test_logit_pairs_rejects_unknown_relation() -> None:
    with pytest.raises(ValueError, match="relation"):
        find(sks.logit_pairs(relation="same"), lambda _: True)


@given(sks.feature_maps((2, 8, 3, 3), non_negative=True))
def test_feature_maps_non_negative(x: torch.Tensor) -> None:
    assert x.shape == (2, 8, 3, 3)
    assert (x >= 0).all()


@given(sks.feature_map_pairs(sks.segmentation_shapes(max_side=5), teacher_channels=st.integers(1, 9)))
def test_feature_map_pairs_share_batch_and_space(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    student, teacher = pair
    assert student.shape[0] == teacher.shape[0]
    assert student.shape[2:] == teacher.shape[2:]
    assert 1 <= teacher.shape[1] <= 9


@given(sks.label_maps(sks.segmentation_shapes(max_side=9, spatial_dims=1), num_classes=st.integers(1, 19)))
def test_label_maps_values(labels: torch.Tensor) -> None:
    assert labels.dtype == torch.int64
    valid = labels[labels != 255]
    assert ((valid >= 0) & (valid < 19)).all()


def test_label_maps_reach_all_ignored_and_none_ignored() -> None:
    shape = (2, 4, 4)
    find(sks.label_maps(shape, 3), lambda y: bool((y == 255).all()))
    find(sks.label_maps(shape, 3), lambda y: bool((y != 255).all()))
    find(sks.label_maps(shape, 3), lambda y: bool((y == 255).any() and (y != 255).any()))


def test_label_maps_reject_ignore_index_inside_the_classes() -> None:
    with pytest.raises(ValueError, match="ignore_index"):
        find(sks.label_maps((1, 2, 2), 300), lambda _: True)


@given(sks.segmentation_batches(sks.segmentation_shapes(max_channels=5, max_side=6)))
def test_segmentation_batches_match(batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    student, teacher, labels = batch
    assert student.shape == teacher.shape
    assert labels.shape == (student.shape[0], *student.shape[2:])
    valid = labels[labels != 255]
    assert (valid < student.shape[1]).all()


@given(sks.temperatures())
def test_temperatures_in_range(tau: float) -> None:
    assert 0.5 <= tau <= 8.0


def test_hypothesis_is_optional() -> None:
    # Block hypothesis in a fresh interpreter: segkd.testing still imports, the strategies ask for the extra.
    code = (
        "import sys\n"
        "sys.modules['hypothesis'] = None\n"
        "import segkd.testing, segkd.testing.reference\n"
        "try:\n"
        "    import segkd.testing.strategies\n"
        "except ImportError as error:\n"
        "    print(error)\n"
        "else:\n"
        "    print('imported')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert "pip install segkd[test]" in result.stdout
