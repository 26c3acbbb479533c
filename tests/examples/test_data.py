"""Tests of segkd_examples.data on tiny fabricated trees in each real layout, and of the synthetic dataset.

The expected id mappings are written by hand from the datasets' definitions (cityscapesScripts' labels.py for
Cityscapes, "0 = other, k -> k - 1" for ADE20K, mmsegmentation's coco_stuff164k converter for COCO-Stuff), not
taken from the lookup tables under test.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from segkd_examples.data import (
    ADE20K_CLASSES,
    CITYSCAPES_CLASSES,
    COCOSTUFF_CLASSES,
    DATASETS,
    DatasetFileError,
    DatasetRootError,
    IncompleteDatasetWarning,
    build_dataset,
    check_dataset_root,
    dataset_info,
    draw_scale,
    train_augment,
)
from segkd_examples.models import IMAGENET_MEAN, normalize_image

torch.set_num_threads(1)

H, W = 6, 8  # tiny label maps: one row per tested value pattern


def _write_rgb(path: Path, seed: int, size: tuple[int, int] = (H, W)) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return rgb


def _write_label(path: Path, values: list[int], size: tuple[int, int] = (H, W)) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = np.resize(np.array(values, dtype=np.uint8), size[0] * size[1])
    label = flat.reshape(size)
    Image.fromarray(label).save(path)
    return label


def _expected(raw: np.ndarray, mapping: dict[int, int]) -> torch.Tensor:
    out = np.full(raw.shape, 255, dtype=np.int64)
    for source, target in mapping.items():
        out[raw == source] = target
    return torch.from_numpy(out)


# Hand-written from cityscapesScripts (labelIds -> trainIds): every id not listed is ignored.
CITYSCAPES_EXPECTED = {7: 0, 8: 1, 11: 2, 12: 3, 17: 5, 21: 8, 23: 10, 24: 11, 26: 13, 31: 16, 33: 18}
CITYSCAPES_VALUES = [0, 1, 4, 6, 7, 8, 9, 11, 12, 14, 17, 21, 23, 24, 26, 29, 30, 31, 33, 34, 255]
# mmsegmentation's clsID_to_trID for COCO-Stuff-164k, a hand-picked subset; the unused ids
# 11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90 (and anything above 181) are ignored.
COCO_EXPECTED = {
    0: 0,
    10: 10,
    12: 11,
    24: 23,
    26: 24,
    27: 25,
    30: 26,
    31: 27,
    43: 39,
    45: 40,
    46: 41,
    64: 59,
    66: 60,
    69: 61,
    71: 62,
    81: 72,
    83: 73,
    89: 79,
    91: 80,
    92: 81,
    181: 170,
}
COCO_VALUES = [
    0,
    10,
    11,
    12,
    24,
    25,
    26,
    27,
    28,
    29,
    30,
    31,
    43,
    44,
    45,
    46,
    64,
    65,
    66,
    67,
    68,
    69,
    70,
    71,
    81,
    82,
    83,
    89,
    90,
    91,
    92,
    181,
    182,
    200,
    255,
]


def make_cityscapes(root: Path, splits: tuple[str, ...] = ("train", "val")) -> dict[str, list[np.ndarray]]:
    raws: dict[str, list[np.ndarray]] = {}
    for split in splits:
        raws[split] = []
        for i, city in enumerate(("aachen", "bochum")):
            stem = f"{city}_000000_00001{i}"
            _write_rgb(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", seed=i)
            raw = _write_label(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", CITYSCAPES_VALUES[i:])
            raws[split].append(raw)
    return raws


def make_ade20k(root: Path) -> list[np.ndarray]:
    raws = []
    for split, folder in (("train", "training"), ("val", "validation")):
        for i in range(2):
            stem = f"ADE_{split}_0000000{i + 1}"
            _write_rgb(root / "ADEChallengeData2016" / "images" / folder / f"{stem}.jpg", seed=i)
            raw = _write_label(
                root / "ADEChallengeData2016" / "annotations" / folder / f"{stem}.png", [0, 1, 2, 150, 151, 255][i:]
            )
            if split == "val":
                raws.append(raw)
    return raws


def make_cocostuff(root: Path, train_ids: bool) -> list[np.ndarray]:
    raws = []
    for folder in ("train2017", "val2017"):
        for i in range(2):
            stem = f"00000000000{i + 1}"
            _write_rgb(root / "images" / folder / f"{stem}.jpg", seed=i)
            if train_ids:
                raw = _write_label(
                    root / "annotations" / folder / f"{stem}_labelTrainIds.png", [0, 5, 170, 171, 255][i:]
                )
            else:
                raw = _write_label(root / "annotations" / folder / f"{stem}.png", COCO_VALUES[i:])
            if folder == "val2017":
                raws.append(raw)
    return raws


# ----------------------------------------------------------------------------- info


def test_dataset_info() -> None:
    assert DATASETS == ("cityscapes", "ade20k", "cocostuff", "synthetic")
    for name, k in (("cityscapes", 19), ("ade20k", 150), ("cocostuff", 171), ("synthetic", 8)):
        info = dataset_info(name)
        assert info.num_classes == k
        assert len(info.class_names) == k
        assert len(set(info.class_names)) == k
        assert info.ignore_index == 255
    assert CITYSCAPES_CLASSES[0] == "road"
    assert CITYSCAPES_CLASSES[18] == "bicycle"
    assert ADE20K_CLASSES[0] == "wall"
    assert ADE20K_CLASSES[149] == "flag"
    assert COCOSTUFF_CLASSES[79] == "toothbrush"  # last thing class
    assert COCOSTUFF_CLASSES[80] == "banner"  # first stuff class
    assert dataset_info("synthetic", synthetic_classes=12).num_classes == 12
    with pytest.raises(ValueError, match=r"`name` to be one of .*got 'voc'"):
        dataset_info("voc")
    with pytest.raises(ValueError, match=r"`synthetic_classes` to be >= 2"):
        dataset_info("synthetic", synthetic_classes=1)


# ----------------------------------------------------------------------------- real layouts, id mapping


def test_cityscapes_mapping_and_normalisation(tmp_path: Path) -> None:
    raws = make_cityscapes(tmp_path)
    ds = build_dataset("cityscapes", tmp_path, "val")
    assert len(ds) == 2
    for i in range(2):
        image, label = ds[i]
        assert image.dtype == torch.float32
        assert image.shape == (3, H, W)
        assert label.dtype == torch.int64
        assert torch.equal(label, _expected(raws["val"][i], CITYSCAPES_EXPECTED))
    # PNG is lossless: the image is BGR minus the CIRKD mean, on the 0-255 scale.
    rgb = np.random.default_rng(0).integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    image, _ = ds[0]
    blue_minus_mean = torch.from_numpy(rgb[..., 2].astype(np.float32)) - IMAGENET_MEAN[0]
    torch.testing.assert_close(image[0], blue_minus_mean)
    torch.testing.assert_close(image[2], torch.from_numpy(rgb[..., 0].astype(np.float32)) - IMAGENET_MEAN[2])


def test_ade20k_mapping_and_direct_root(tmp_path: Path) -> None:
    raws = make_ade20k(tmp_path)
    expected = {v: v - 1 for v in (1, 2, 150)}  # 0 -> ignore, 151 and 255 are not classes -> ignore
    for root in (tmp_path, tmp_path / "ADEChallengeData2016"):
        ds = build_dataset("ade20k", root, "val")
        assert len(ds) == 2
        for i in range(2):
            image, label = ds[i]
            assert image.shape == (3, H, W)
            assert torch.equal(label, _expected(raws[i], expected))


def test_cocostuff_raw_182_ids_are_mapped_to_171(tmp_path: Path) -> None:
    raws = make_cocostuff(tmp_path, train_ids=False)
    ds = build_dataset("cocostuff", tmp_path, "val")
    for i in range(2):
        _, label = ds[i]
        assert torch.equal(label, _expected(raws[i], COCO_EXPECTED))
    full = build_dataset("cocostuff", tmp_path, "val")
    _, label = full[0]
    assert int(label[label != 255].max()) <= 170


def test_cocostuff_label_train_ids_are_used_when_present(tmp_path: Path) -> None:
    raws = make_cocostuff(tmp_path, train_ids=True)
    ds = build_dataset("cocostuff", tmp_path, "val")
    for i in range(2):
        _, label = ds[i]
        assert torch.equal(label, _expected(raws[i], {0: 0, 5: 5, 170: 170}))


def test_cocostuff_182_protocol_keeps_raw_ids(tmp_path: Path) -> None:
    # CIRKD's dataset/coco_stuff_164k.py: the raw ids 0..181 are the classes, 255 is ignored.
    raws = make_cocostuff(tmp_path, train_ids=False)
    ds = build_dataset("cocostuff", tmp_path, "val", cocostuff_classes=182)
    for i in range(2):
        _, label = ds[i]
        assert torch.equal(label, _expected(raws[i], {v: v for v in range(182)}))


def test_cocostuff_182_protocol_from_label_train_ids(tmp_path: Path) -> None:
    # mmsegmentation's train ids back to raw ids: 0 -> 0, 5 -> 5, 170 (the last class, wood) -> 181; 171 is invalid.
    raws = make_cocostuff(tmp_path, train_ids=True)
    ds = build_dataset("cocostuff", tmp_path, "val", cocostuff_classes=182)
    for i in range(2):
        _, label = ds[i]
        assert torch.equal(label, _expected(raws[i], {0: 0, 5: 5, 170: 181}))


def test_cocostuff_182_class_names() -> None:
    info = dataset_info("cocostuff", cocostuff_classes=182)
    assert info.num_classes == 182
    assert info.class_names[0] == "person"
    assert info.class_names[12] == "stop sign"
    assert info.class_names[91] == "banner"
    assert info.class_names[181] == "wood"
    unused = [i for i, name in enumerate(info.class_names) if name.startswith("unused")]
    assert unused == [11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90]
    with pytest.raises(ValueError, match="`cocostuff_classes` to be 171 or 182, got 180"):
        dataset_info("cocostuff", cocostuff_classes=180)


# ----------------------------------------------------------------------------- bad roots


def test_missing_root_and_folders(tmp_path: Path) -> None:
    with pytest.raises(DatasetRootError, match=r"cityscapes root .*nowhere is not an existing folder"):
        check_dataset_root("cityscapes", tmp_path / "nowhere", "train")
    with pytest.raises(DatasetRootError, match=r"needs a root folder"):
        check_dataset_root("ade20k", None, "train")
    make_cityscapes(tmp_path / "cs", splits=("train",))
    with pytest.raises(
        DatasetRootError, match=r"Cityscapes images in .*cs/leftImg8bit/val .*does not exist.*holds: train"
    ):
        check_dataset_root("cityscapes", tmp_path / "cs", "val")
    (tmp_path / "ade").mkdir()
    with pytest.raises(
        DatasetRootError, match=r"ADE20K images in .*ade/ADEChallengeData2016/images/training.*is empty"
    ):
        check_dataset_root("ade20k", tmp_path / "ade", "train")
    make_cityscapes(tmp_path / "cs2", splits=("train",))
    (tmp_path / "cs2" / "gtFine" / "train").rename(tmp_path / "cs2" / "gtFine" / "training")
    with pytest.raises(DatasetRootError, match=r"Cityscapes labels in .*cs2/gtFine/train .*holds: training"):
        build_dataset("cityscapes", tmp_path / "cs2", "train")


def test_partial_extraction_is_reported(tmp_path: Path) -> None:
    make_cityscapes(tmp_path)
    label = tmp_path / "gtFine" / "val" / "bochum" / "bochum_000000_000011_gtFine_labelIds.png"
    label.unlink()
    with pytest.raises(
        DatasetRootError,
        match=r"1 of the 2 Cityscapes images .* no label file .*bochum_000000_000011_gtFine_labelIds\.png",
    ):
        check_dataset_root("cityscapes", tmp_path, "val")
    (tmp_path / "leftImg8bit" / "train" / "aachen" / "aachen_000000_000010_leftImg8bit.png").unlink()
    with pytest.raises(DatasetRootError, match=r"1 Cityscapes label files .* have no image .*2 labels for 1 images"):
        check_dataset_root("cityscapes", tmp_path, "train")
    for image in (tmp_path / "leftImg8bit" / "train").glob("*/*.png"):
        image.unlink()
    with pytest.raises(
        DatasetRootError, match=r"Expected Cityscapes images <city>/\*_leftImg8bit\.png in .*found none"
    ):
        check_dataset_root("cityscapes", tmp_path, "train")


def test_half_converted_cocostuff_is_reported(tmp_path: Path) -> None:
    make_cocostuff(tmp_path, train_ids=False)
    _write_label(tmp_path / "annotations" / "val2017" / "000000000001_labelTrainIds.png", [0])
    with pytest.raises(DatasetRootError, match=r"1 of the 2 COCO-Stuff-164k images .*000000000002_labelTrainIds\.png"):
        check_dataset_root("cocostuff", tmp_path, "val")


def test_small_split_warns_and_synthetic_needs_no_root(tmp_path: Path) -> None:
    make_ade20k(tmp_path)
    with pytest.warns(IncompleteDatasetWarning, match=r"Found 2 ade20k train .* official split has 20210"):
        check_dataset_root("ade20k", tmp_path, "train")
    check_dataset_root("synthetic", None, "train")
    with pytest.raises(ValueError, match=r"`split` to be one of 'train', 'val', got 'test'"):
        check_dataset_root("cityscapes", tmp_path, "test")


def test_bad_files_give_named_errors(tmp_path: Path) -> None:
    make_cityscapes(tmp_path, splits=("val",))
    ds = build_dataset("cityscapes", tmp_path, "val")
    image_path, label_path = ds.samples[0]
    Image.fromarray(np.zeros((H, W, 3), dtype=np.uint8)).save(label_path)  # a colour image as label
    with pytest.raises(
        DatasetFileError, match=r"label map .*aachen_000000_000010_gtFine_labelIds\.png has image mode 'RGB'"
    ):
        ds[0]
    _write_label(label_path, [7], size=(H + 1, W))
    with pytest.raises(DatasetFileError, match=r"is 8x7 but its image .* is 8x6"):
        ds[0]
    data = image_path.read_bytes()
    image_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetFileError, match=r"Cannot decode the image .*aachen_000000_000010_leftImg8bit\.png"):
        ds[0]


def test_build_dataset_argument_checks(tmp_path: Path) -> None:
    make_cityscapes(tmp_path, splits=("train",))
    with pytest.raises(ValueError, match=r"`crop_size` to be two positive ints"):
        build_dataset("cityscapes", tmp_path, "train", crop_size=(0, 8))
    with pytest.raises(ValueError, match=r"`crop_size` to be a pair"):
        build_dataset("cityscapes", tmp_path, "train", crop_size=(8,))
    with pytest.raises(ValueError, match=r"`scale_range` to be \(low, high\) with 0 < low <= high"):
        build_dataset("cityscapes", tmp_path, "train", scale_range=(2.0, 1.0))
    with pytest.raises(ValueError, match=r"`seed` to be >= 0"):
        build_dataset("synthetic", None, "train", seed=-1)
    with pytest.raises(ValueError, match=r"`synthetic_length` to be >= 1"):
        build_dataset("synthetic", None, "train", synthetic_length=0)


# ----------------------------------------------------------------------------- augmentation


def test_train_crops_shapes_padding_and_reproducibility(tmp_path: Path) -> None:
    make_cityscapes(tmp_path, splits=("train",))
    ds = build_dataset("cityscapes", tmp_path, "train", crop_size=(10, 12), scale_range=(1.0, 1.0), flip=False)
    image, label = ds[0]
    assert image.shape == (3, 10, 12)
    assert label.shape == (10, 12)
    # the 6x8 image fits in the crop at offset (0, 0): the rest is padding
    assert (label[H:, :] == 255).all()
    assert (label[:, W:] == 255).all()
    assert (image[:, H:, :] == 0).all()
    assert (image[:, :, W:] == 0).all()
    whole_image, whole_label = ds.load(0)
    assert torch.equal(label[:H, :W], whole_label)
    assert torch.equal(image[:, :H, :W], whole_image)

    aug = build_dataset("cityscapes", tmp_path, "train", crop_size=(5, 7), scale_range=(0.5, 2.0), seed=3)
    again = build_dataset("cityscapes", tmp_path, "train", crop_size=(5, 7), scale_range=(0.5, 2.0), seed=3)
    first = [aug[i] for i in range(2)]
    for (a_img, a_lbl), (b_img, b_lbl) in zip(first, (again[i] for i in range(2)), strict=True):
        assert a_img.shape == (3, 5, 7)
        assert a_lbl.shape == (5, 7)
        assert torch.equal(a_img, b_img)
        assert torch.equal(a_lbl, b_lbl)
    aug.set_epoch(1)
    assert any(not torch.equal(first[i][0], aug[i][0]) for i in range(2))
    aug.set_epoch(0)
    assert all(torch.equal(first[i][0], aug[i][0]) for i in range(2))
    other_seed = build_dataset("cityscapes", tmp_path, "train", crop_size=(5, 7), seed=4)
    assert any(not torch.equal(first[i][0], other_seed[i][0]) for i in range(2))
    # values stay in the label set (nearest-neighbour resize) plus the padding value
    allowed = set(CITYSCAPES_EXPECTED.values()) | {255}
    for epoch in range(4):
        aug.set_epoch(epoch)
        assert set(aug[1][1].unique().tolist()) <= allowed


def _reference_augment(
    rgb: np.ndarray,
    label: np.ndarray,
    seed: int,
    crop: tuple[int, int],
    scale_range: tuple[float, float],
    scale_step: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize the whole image with F.interpolate, pad, crop, flip: the documented recipe, done the slow way."""
    rng = np.random.default_rng(seed)
    if scale_step is None:
        scale = rng.uniform(*scale_range)
    else:  # one of low, low + step, ..., high, equally likely
        count = round((scale_range[1] - scale_range[0]) / scale_step) + 1
        scale = scale_range[0] + scale_step * int(rng.integers(0, count))
    h, w = label.shape
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    image = F.interpolate(normalize_image(rgb)[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
    target = F.interpolate(torch.from_numpy(label.astype(np.float32))[None, None], size=(nh, nw), mode="nearest")
    target = target[0, 0].long()
    ph, pw = max(crop[0] - nh, 0), max(crop[1] - nw, 0)
    image = F.pad(image, (0, pw, 0, ph), value=0.0)
    target = F.pad(target, (0, pw, 0, ph), value=255)
    top = int(rng.integers(0, target.shape[0] - crop[0] + 1))
    left = int(rng.integers(0, target.shape[1] - crop[1] + 1))
    image = image[:, top : top + crop[0], left : left + crop[1]]
    target = target[top : top + crop[0], left : left + crop[1]]
    if rng.random() < 0.5:
        image, target = image.flip(-1), target.flip(-1)
    return image, target


@pytest.mark.parametrize("scale_range", [(0.5, 0.5), (0.77, 0.77), (1.0, 1.0), (1.6, 1.6), (2.0, 2.0), (0.5, 2.0)])
def test_windowed_augment_equals_resize_then_crop(scale_range: tuple[float, float]) -> None:
    source = np.random.default_rng(7)
    rgb = source.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    label = source.integers(0, 19, size=(37, 53), dtype=np.uint8)
    for seed in range(4):
        image, target = train_augment(
            rgb, label, np.random.default_rng(seed), crop_size=(24, 30), scale_range=scale_range
        )
        ref_image, ref_target = _reference_augment(rgb, label, seed, (24, 30), scale_range)
        assert image.shape == (3, 24, 30)
        assert target.dtype == torch.int64
        torch.testing.assert_close(image, ref_image, atol=2e-3, rtol=0)
        assert torch.equal(target, ref_target)


def test_discrete_scale_is_the_authors_set_each_equally_likely() -> None:
    """HWD's ``0.5 + randint(0, 15) / 10``: 16 factors 0.5, 0.6, ..., 2.0, each with probability 1/16."""
    rng = np.random.default_rng(0)
    draws = np.array([draw_scale(rng, (0.5, 2.0), 0.1) for _ in range(16_000)])
    factors, counts = np.unique(np.round(draws, 9), return_counts=True)
    np.testing.assert_allclose(factors, 0.5 + np.arange(16) / 10, rtol=0, atol=1e-12)
    # 1,000 expected per factor; a binomial standard deviation is 31, so 5 of them is a bound that holds.
    assert np.abs(counts - 1000).max() < 5 * math.sqrt(16_000 * (1 / 16) * (15 / 16))
    continuous = np.array([draw_scale(rng, (0.5, 2.0)) for _ in range(1000)])
    assert len(np.unique(continuous)) == 1000
    assert continuous.min() >= 0.5
    assert continuous.max() < 2.0


@pytest.mark.parametrize("scale_range", [(0.5, 2.0), (0.75, 1.25)])
def test_discrete_scale_augment_equals_resize_then_crop(scale_range: tuple[float, float]) -> None:
    source = np.random.default_rng(8)
    rgb = source.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    label = source.integers(0, 19, size=(37, 53), dtype=np.uint8)
    for seed in range(6):
        rng = np.random.default_rng(seed)
        image, target = train_augment(rgb, label, rng, crop_size=(24, 30), scale_range=scale_range, scale_step=0.25)
        ref_image, ref_target = _reference_augment(rgb, label, seed, (24, 30), scale_range, scale_step=0.25)
        torch.testing.assert_close(image, ref_image, atol=2e-3, rtol=0)
        assert torch.equal(target, ref_target)


@pytest.mark.parametrize("step", [0.0, -0.1, float("nan"), 0.4])
def test_bad_scale_step_is_refused(tmp_path: Path, step: float) -> None:
    with pytest.raises(ValueError, match="`scale_step`"):
        build_dataset("cityscapes", tmp_path, "train", scale_range=(0.5, 2.0), scale_step=step)


def test_train_augment_scale_and_flip() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, size=(6, 4, 3), dtype=np.uint8)
    label = np.arange(24, dtype=np.uint8).reshape(6, 4)
    whole = normalize_image(rgb)
    seen_flip = seen_plain = False
    for seed in range(12):
        image, target = train_augment(
            rgb, label, np.random.default_rng(seed), crop_size=(6, 4), scale_range=(1.0, 1.0), flip=True
        )
        if torch.equal(target, torch.from_numpy(label.astype(np.int64)).flip(-1)):
            seen_flip = True
            assert torch.equal(image, whole.flip(-1))
        else:
            seen_plain = True
            assert torch.equal(target, torch.from_numpy(label.astype(np.int64)))
            assert torch.equal(image, whole)
    assert seen_flip
    assert seen_plain
    # scale 2: nearest-neighbour upsampling, every 2x2 block holds one source label
    _, target = train_augment(
        rgb, label, np.random.default_rng(0), crop_size=(12, 8), scale_range=(2.0, 2.0), flip=False
    )
    expected = torch.from_numpy(label.astype(np.int64)).repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert torch.equal(target, expected)
    # scale 0.5 with a larger crop: 3x2 content, the rest padded with 255 (label) and 0 (image)
    image, small = train_augment(rgb, label, np.random.default_rng(0), crop_size=(6, 4), scale_range=(0.5, 0.5))
    assert int((small != 255).sum()) == 6
    assert int((image.abs().sum(0) == 0).sum()) == 24 - 6
    with pytest.raises(ValueError, match=r"`rgb` \(H, W, 3\) and `label` \(H, W\) of the same size"):
        train_augment(rgb, label[:5], np.random.default_rng(0), crop_size=(4, 4))


def test_train_batches_collate() -> None:
    ds = build_dataset("synthetic", None, "train", synthetic_length=4, synthetic_size=24)
    images, labels = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert images.shape == (4, 3, 24, 24)
    assert labels.shape == (4, 24, 24)


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_by_seed_and_split() -> None:
    a = build_dataset("synthetic", None, "val", synthetic_length=6, synthetic_size=32, seed=1)
    b = build_dataset("synthetic", None, "val", synthetic_length=6, synthetic_size=32, seed=1)
    c = build_dataset("synthetic", None, "val", synthetic_length=6, synthetic_size=32, seed=2)
    t = build_dataset("synthetic", None, "train", synthetic_length=6, synthetic_size=32, seed=1, flip=False)
    for i in range(6):
        assert torch.equal(a[i][0], b[i][0])
        assert torch.equal(a[i][1], b[i][1])
    assert any(not torch.equal(a[i][1], c[i][1]) for i in range(6))
    assert any(not torch.equal(a[i][1], t[i][1]) for i in range(6))
    image, label = a[0]
    assert image.shape == (3, 32, 32)
    assert image.dtype == torch.float32
    assert label.dtype == torch.int64
    with pytest.raises(IndexError):
        a[6]


def test_synthetic_flip_follows_epoch() -> None:
    ds = build_dataset("synthetic", None, "train", synthetic_length=8, synthetic_size=16, seed=0)
    epoch0 = [ds[i] for i in range(8)]
    ds.set_epoch(1)
    epoch1 = [ds[i] for i in range(8)]
    flipped = 0
    for (img0, lbl0), (img1, lbl1) in zip(epoch0, epoch1, strict=True):
        if torch.equal(lbl0, lbl1):
            assert torch.equal(img0, img1)
        else:
            flipped += 1
            assert torch.equal(lbl0, lbl1.flip(-1))
            assert torch.equal(img0, img1.flip(-1))
    assert flipped > 0


@pytest.mark.parametrize("num_classes", [8, 12])
def test_synthetic_class_coverage(num_classes: int) -> None:
    ds = build_dataset("synthetic", None, "val", synthetic_length=30, synthetic_classes=num_classes, seed=5)
    for start in (0, 7):
        seen: set[int] = set()
        for i in range(start, start + num_classes - 1):
            seen |= set(ds[i][1].unique().tolist())
        assert seen == set(range(num_classes))


def test_synthetic_classes_look_different() -> None:
    ds = build_dataset("synthetic", None, "val", synthetic_length=21, synthetic_size=48)
    sums = np.zeros((8, 3))
    counts = np.zeros(8)
    for i in range(21):
        rgb, label = ds.render(i)
        for k in range(8):
            mask = label == k
            sums[k] += rgb[mask].sum(axis=0)
            counts[k] += mask.sum()
    assert (counts > 0).all()
    means = sums / counts[:, None]
    for a, b in itertools.combinations(range(8), 2):
        assert np.linalg.norm(means[a] - means[b]) > 40, (a, b)
