"""Where each dataset keeps its files, and the start-up check that they are there.

``find_samples`` lists the ``(image, label)`` pairs of a split and raises :class:`DatasetRootError` with the path it
expected and what it found there when the layout is wrong, so a bad ``--data-root`` fails at start-up instead
of inside a data-loader worker an hour later. The layouts are documented in ``docs/datasets.md``.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import numpy as np

from segkd import _checks

from .info import DATASETS
from .labels import (
    ADE20K_LUT,
    CITYSCAPES_LUT,
    COCOSTUFF_RAW_ID_LUT,
    COCOSTUFF_RAW_LUT,
    COCOSTUFF_TRAIN_ID_LUT,
    COCOSTUFF_TRAIN_ID_TO_RAW_LUT,
)

__all__ = [
    "EXPECTED_COUNTS",
    "SPLITS",
    "DatasetLayout",
    "DatasetRootError",
    "IncompleteDatasetWarning",
    "check_dataset_root",
    "find_samples",
]

SPLITS = ("train", "val")
#: Number of images of each official split.
EXPECTED_COUNTS: dict[tuple[str, str], int] = {
    ("cityscapes", "train"): 2975,
    ("cityscapes", "val"): 500,
    ("ade20k", "train"): 20210,
    ("ade20k", "val"): 2000,
    ("cocostuff", "train"): 118287,
    ("cocostuff", "val"): 5000,
}
_SHOW = 5


class DatasetRootError(ValueError):
    """A dataset root that does not hold the expected layout; the message names the expected path and what is there."""


class IncompleteDatasetWarning(UserWarning):
    """A split holds a consistent set of image/label pairs, but not as many as the official dataset."""


@dataclasses.dataclass(frozen=True)
class DatasetLayout:
    """The files of one split.

    Attributes:
        samples: ``(image_path, label_path)`` pairs, sorted by image path.
        lut: 256-entry ``uint8`` table from label-file values to train ids (255 = ignore).
        label_format: what the label files are (for messages and logs).
    """

    samples: tuple[tuple[Path, Path], ...]
    lut: np.ndarray
    label_format: str


def _listing(path: Path) -> str:
    """What is at ``path`` (or at its nearest existing parent), for error messages."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a folder"
    names = sorted(os.listdir(probe))
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} entries)" if len(names) > 8 else "")
    where = "it" if probe == path else f"the nearest existing folder, {probe},"
    return f"{where} holds: {shown}" if names else f"{where} is empty"


def _require_dir(path: Path, dataset: str, what: str, pattern: str) -> None:
    if not path.is_dir():
        raise DatasetRootError(
            f"Expected the {dataset} {what} in {path} (files {pattern}), but that folder does not exist; "
            f"{_listing(path)}. See docs/datasets.md for the layout."
        )


def _pair(
    images: list[Path],
    label_for: dict[Path, Path],
    label_files: set[Path],
    dataset: str,
    image_dir: Path,
    image_pattern: str,
    label_dir: Path,
) -> tuple[tuple[Path, Path], ...]:
    if not images:
        raise DatasetRootError(
            f"Expected {dataset} images {image_pattern} in {image_dir}, found none; {_listing(image_dir)}. "
            "Is the archive extracted there? See docs/datasets.md."
        )
    missing = [label_for[i] for i in images if label_for[i] not in label_files]
    if missing:
        raise DatasetRootError(
            f"{len(missing)} of the {len(images)} {dataset} images in {image_dir} have no label file in {label_dir} "
            f"(first expected: {', '.join(str(p) for p in missing[:_SHOW])}); is the label archive fully extracted?"
        )
    orphans = sorted(label_files - set(label_for.values()))
    if orphans:
        raise DatasetRootError(
            f"{len(orphans)} {dataset} label files in {label_dir} have no image in {image_dir} "
            f"({len(label_files)} labels for {len(images)} images; first: {', '.join(str(p) for p in orphans[:_SHOW])})"
            "; is the image archive fully extracted?"
        )
    return tuple((i, label_for[i]) for i in images)


def _cityscapes(root: Path, split: str) -> DatasetLayout:
    image_dir, label_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    _require_dir(image_dir, "Cityscapes", "images", "<city>/*_leftImg8bit.png")
    _require_dir(label_dir, "Cityscapes", "labels", "<city>/*_gtFine_labelIds.png")
    images = sorted(image_dir.glob("*/*_leftImg8bit.png"))
    label_for = {
        i: label_dir / i.parent.name / (i.name[: -len("_leftImg8bit.png")] + "_gtFine_labelIds.png") for i in images
    }
    label_files = set(label_dir.glob("*/*_gtFine_labelIds.png"))
    samples = _pair(images, label_for, label_files, "Cityscapes", image_dir, "<city>/*_leftImg8bit.png", label_dir)
    return DatasetLayout(samples, CITYSCAPES_LUT, "gtFine labelIds (34 ids -> 19 train ids)")


def _ade20k(root: Path, split: str) -> DatasetLayout:
    base = root / "ADEChallengeData2016"
    if not base.is_dir() and (root / "images").is_dir() and (root / "annotations").is_dir():
        base = root  # the user pointed at ADEChallengeData2016 itself
    folder = {"train": "training", "val": "validation"}[split]
    image_dir, label_dir = base / "images" / folder, base / "annotations" / folder
    _require_dir(image_dir, "ADE20K", "images", "*.jpg")
    _require_dir(label_dir, "ADE20K", "annotations", "*.png")
    images = sorted(image_dir.glob("*.jpg"))
    label_for = {i: label_dir / (i.stem + ".png") for i in images}
    label_files = set(label_dir.glob("*.png"))
    samples = _pair(images, label_for, label_files, "ADE20K", image_dir, "*.jpg", label_dir)
    return DatasetLayout(samples, ADE20K_LUT, "ADE20K annotations (0 ignored, 1..150 -> 0..149)")


def _cocostuff(root: Path, split: str, classes: int = 171) -> DatasetLayout:
    folder = {"train": "train2017", "val": "val2017"}[split]
    image_dir, label_dir = root / "images" / folder, root / "annotations" / folder
    _require_dir(image_dir, "COCO-Stuff-164k", "images", "*.jpg")
    _require_dir(label_dir, "COCO-Stuff-164k", "annotations", "*_labelTrainIds.png or *.png")
    images = sorted(image_dir.glob("*.jpg"))
    train_id_files = set(label_dir.glob("*_labelTrainIds.png"))
    if train_id_files:
        label_for = {i: label_dir / (i.stem + "_labelTrainIds.png") for i in images}
        samples = _pair(images, label_for, train_id_files, "COCO-Stuff-164k", image_dir, "*.jpg", label_dir)
        if classes == 182:
            return DatasetLayout(
                samples, COCOSTUFF_TRAIN_ID_TO_RAW_LUT, "COCO-Stuff labelTrainIds (171 train ids -> 182 raw ids)"
            )
        return DatasetLayout(samples, COCOSTUFF_TRAIN_ID_LUT, "COCO-Stuff labelTrainIds (171 train ids)")
    label_for = {i: label_dir / (i.stem + ".png") for i in images}
    samples = _pair(images, label_for, set(label_dir.glob("*.png")), "COCO-Stuff-164k", image_dir, "*.jpg", label_dir)
    if classes == 182:
        return DatasetLayout(samples, COCOSTUFF_RAW_ID_LUT, "COCO-Stuff raw stuffthingmaps (182 raw ids)")
    return DatasetLayout(samples, COCOSTUFF_RAW_LUT, "COCO-Stuff raw stuffthingmaps (182 ids -> 171 train ids)")


def find_samples(
    name: str, root: str | os.PathLike[str] | None, split: str, *, cocostuff_classes: int = 171
) -> DatasetLayout:
    """List the image/label pairs of one split of a dataset on disk.

    Args:
        name: ``"cityscapes"``, ``"ade20k"`` or ``"cocostuff"``.
        root: the dataset root described in ``docs/datasets.md``.
        split: ``"train"`` or ``"val"``.
        cocostuff_classes: COCO-Stuff protocol, 171 or 182 classes (the label table differs; see
            ``docs/datasets.md``).

    Returns:
        The split's :class:`DatasetLayout`.

    Raises:
        ValueError: unknown ``name`` or ``split``, or ``name == "synthetic"`` (it has no files).
        DatasetRootError: ``root`` missing; an expected folder missing; no images; images without labels or labels
            without images. The message names the path that was expected and what was found.
    """
    _checks.check_choice(name, "name", DATASETS)
    _checks.check_choice(split, "split", SPLITS)
    if name == "synthetic":
        raise ValueError("The synthetic dataset is generated on the fly and has no files to find.")
    if root is None or str(root) == "":
        raise DatasetRootError(f"The {name} dataset needs a root folder (--data-root); see docs/datasets.md.")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetRootError(f"The {name} root {path} is not an existing folder; {_listing(path)}.")
    if name == "cocostuff":
        if cocostuff_classes not in (171, 182):
            raise ValueError(f"Expected `cocostuff_classes` to be 171 or 182, got {cocostuff_classes!r}.")
        return _cocostuff(path, split, cocostuff_classes)
    finder = {"cityscapes": _cityscapes, "ade20k": _ade20k}[name]
    return finder(path, split)


def check_dataset_root(name: str, root: str | os.PathLike[str] | None, split: str) -> None:
    """Check at start-up that ``root`` holds a usable split of dataset ``name``.

    Does nothing for ``synthetic``. Warns with :class:`IncompleteDatasetWarning` when the split is consistent but
    smaller than the official one (for example a subset made on purpose, or an extraction that stopped between
    two cities).

    Args:
        name: one of :data:`~segkd_examples.data.DATASETS`.
        root: the dataset root (ignored for ``synthetic``).
        split: ``"train"`` or ``"val"``.

    Raises:
        ValueError: unknown ``name`` or ``split``.
        DatasetRootError: see :func:`find_samples`.
    """
    _checks.check_choice(name, "name", DATASETS)
    _checks.check_choice(split, "split", SPLITS)
    if name == "synthetic":
        return
    layout = find_samples(name, root, split)
    expected = EXPECTED_COUNTS[(name, split)]
    if len(layout.samples) != expected:
        warnings.warn(
            f"Found {len(layout.samples)} {name} {split} image/label pairs under {root}; the official split has "
            f"{expected}. Results will not be comparable to published ones unless this subset is intended.",
            IncompleteDatasetWarning,
            stacklevel=2,
        )
