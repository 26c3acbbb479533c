"""``build_dataset``: one entry point for the real datasets and the synthetic one."""

from __future__ import annotations

import os
from collections.abc import Sequence

from torch import Tensor
from torch.utils.data import Dataset

from segkd import _checks

from .folder import SegmentationFolder
from .info import DATASETS, dataset_info
from .layouts import SPLITS, find_samples
from .synthetic import SyntheticSegmentation
from .transforms import scale_steps

__all__ = ["SYNTHETIC_DEFAULT_LENGTH", "SYNTHETIC_DEFAULT_SIZE", "build_dataset"]

#: Items of the synthetic train / val split when ``synthetic_length`` is not given.
SYNTHETIC_DEFAULT_LENGTH = {"train": 128, "val": 32}
#: Synthetic image side when ``synthetic_size`` is not given.
SYNTHETIC_DEFAULT_SIZE = 64


def _check_pair(value: Sequence[float], name: str) -> tuple[float, float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"Expected `{name}` to be a pair of numbers, got {value!r}.")
    return float(value[0]), float(value[1])


def build_dataset(
    name: str,
    root: str | os.PathLike[str] | None,
    split: str,
    *,
    crop_size: Sequence[int] = (512, 512),
    scale_range: Sequence[float] = (0.5, 2.0),
    scale_step: float | None = None,
    flip: bool = True,
    synthetic_length: int | None = None,
    synthetic_size: int | None = None,
    seed: int = 0,
    synthetic_classes: int = 8,
    cocostuff_classes: int = 171,
) -> Dataset[tuple[Tensor, Tensor]]:
    """Build a split of a dataset whose items are ``(image, label)``.

    ``image`` is float32 ``(3, H, W)``, BGR, normalised with :data:`~segkd_examples.models.IMAGENET_MEAN` /
    :data:`~segkd_examples.models.IMAGENET_STD`; ``label`` is int64 ``(H, W)`` with 255 = ignore. The train split
    of a real dataset is augmented (random scale in ``scale_range``, random ``crop_size`` crop with the label padded
    by 255 and the image by 0, random flip), reproducibly from ``(seed, epoch, index)`` (the dataset has a
    ``set_epoch`` method); the val split returns whole images (sizes may differ: evaluate with batch size 1).

    Args:
        name: one of :data:`~segkd_examples.data.DATASETS`.
        root: dataset root (see ``docs/datasets.md``); ignored for ``synthetic``.
        split: ``"train"`` or ``"val"``.
        crop_size: ``(height, width)`` of training crops (real datasets).
        scale_range: ``(low, high)`` of the random scale (real datasets).
        scale_step: ``None`` for a continuous scale, else the step of a discrete one (real datasets).
        flip: random horizontal flip in training.
        synthetic_length: number of synthetic items (default 128 train / 32 val).
        synthetic_size: synthetic image side (default 64).
        seed: base seed of the augmentation and of the synthetic images.
        synthetic_classes: number of synthetic classes, background included (default 8).
        cocostuff_classes: COCO-Stuff protocol: 171 (mmsegmentation train ids) or 182 (raw ids, CIRKD / HWD).

    Returns:
        A map-style dataset with ``set_epoch(epoch)``.

    Raises:
        ValueError: unknown ``name`` / ``split``; bad ``crop_size``, ``scale_range``, ``seed`` or synthetic sizes.
        DatasetRootError: the files of a real dataset are not where ``docs/datasets.md`` says.
    """
    _checks.check_choice(name, "name", DATASETS)
    _checks.check_choice(split, "split", SPLITS)
    _checks.check_int(seed, "seed")
    if seed < 0:
        raise ValueError(f"Expected `seed` to be >= 0, got {seed}.")
    if name == "synthetic":
        length = SYNTHETIC_DEFAULT_LENGTH[split] if synthetic_length is None else synthetic_length
        size = SYNTHETIC_DEFAULT_SIZE if synthetic_size is None else synthetic_size
        _checks.check_positive_int(length, "synthetic_length")
        _checks.check_positive_int(size, "synthetic_size")
        info = dataset_info(name, synthetic_classes=synthetic_classes)
        return SyntheticSegmentation(
            split, length=length, size=size, num_classes=info.num_classes, seed=seed, flip=bool(flip)
        )
    crop_h, crop_w = _check_pair(crop_size, "crop_size")
    if crop_h != int(crop_h) or crop_w != int(crop_w) or crop_h < 1 or crop_w < 1:
        raise ValueError(f"Expected `crop_size` to be two positive ints (height, width), got {crop_size!r}.")
    low, high = _check_pair(scale_range, "scale_range")
    if not 0 < low <= high:
        raise ValueError(f"Expected `scale_range` to be (low, high) with 0 < low <= high, got {scale_range!r}.")
    if scale_step is not None:
        scale_steps((low, high), scale_step)
    layout = find_samples(name, root, split, cocostuff_classes=cocostuff_classes)
    return SegmentationFolder(
        name,
        layout.samples,
        layout.lut,
        train=split == "train",
        crop_size=(int(crop_h), int(crop_w)),
        scale_range=(low, high),
        scale_step=scale_step,
        flip=bool(flip),
        seed=seed,
        ignore_index=dataset_info(name).ignore_index,
    )
