"""Map-style dataset over image/label file pairs (Cityscapes, ADE20K, COCO-Stuff-164k)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from segkd_examples.models.normalization import normalize_image

from .info import IGNORE_INDEX
from .labels import apply_lut
from .transforms import item_rng, train_augment

__all__ = ["DatasetFileError", "SegmentationFolder", "read_image", "read_label"]


class DatasetFileError(ValueError):
    """An image or label file that cannot be used; the message names the file."""


def read_image(path: Path) -> np.ndarray:
    """Decode an image file to an RGB ``uint8`` array ``(H, W, 3)`` with Pillow.

    Raises:
        DatasetFileError: the file is missing, truncated or not an image.
    """
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as exc:
        raise DatasetFileError(f"Cannot decode the image {path} (missing, truncated or corrupt?): {exc}") from None


def read_label(path: Path) -> np.ndarray:
    """Decode a label map to a ``uint8`` array ``(H, W)`` of file values.

    Raises:
        DatasetFileError: the file is missing, truncated, corrupt, or not an 8-bit single-channel map (mode ``L``
            or ``P``), e.g. a colour visualisation given instead of the id map.
    """
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P"):
                raise DatasetFileError(
                    f"The label map {path} has image mode {img.mode!r}; expected an 8-bit single-channel map of "
                    "class ids (mode 'L' or 'P'). Colour renderings such as *_color.png cannot be used as labels."
                )
            return np.asarray(img, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, DatasetFileError):
            raise
        raise DatasetFileError(f"Cannot decode the label map {path} (missing, truncated or corrupt?): {exc}") from None


class SegmentationFolder(Dataset[tuple[Tensor, Tensor]]):
    """Image/label pairs read from disk, with train-time augmentation.

    Items are ``(image, label)``: ``image`` float32 ``(3, H, W)`` in BGR order, normalised with
    :data:`~segkd_examples.models.IMAGENET_MEAN` / :data:`~segkd_examples.models.IMAGENET_STD`; ``label`` int64
    ``(H, W)`` of train ids with ``ignore_index`` for unlabelled pixels. In training mode each item is augmented by
    :func:`~segkd_examples.data.transforms.train_augment` with a generator seeded from ``(seed, epoch, index)``, so
    the same sampler order, seed and epoch give the same batches (call :meth:`set_epoch` at the start of every
    epoch; with ``persistent_workers=True`` the workers keep their own copy and would not see it).

    Args:
        name: dataset name, for messages.
        samples: ``(image_path, label_path)`` pairs.
        lut: 256-entry ``uint8`` table from file values to train ids.
        train: augment (True) or return whole images (False).
        crop_size: ``(height, width)`` of training crops.
        scale_range: ``(low, high)`` of the random scale.
        scale_step: ``None``: continuous scale; else drawn from ``low, low + step, ..., high``.
        flip: random horizontal flip in training.
        seed: base seed of the augmentation.
        ignore_index: label of padded pixels (the LUT already maps unlabelled values to 255).
    """

    def __init__(
        self,
        name: str,
        samples: Sequence[tuple[Path, Path]],
        lut: np.ndarray,
        *,
        train: bool,
        crop_size: Sequence[int] = (512, 512),
        scale_range: Sequence[float] = (0.5, 2.0),
        scale_step: float | None = None,
        flip: bool = True,
        seed: int = 0,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        self.name = name
        self.samples = tuple(samples)
        self.lut = lut
        self.train = train
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.scale_step = scale_step
        self.flip = flip
        self.seed = seed
        self.ignore_index = ignore_index
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Item ``index`` as decoded: RGB ``uint8`` ``(H, W, 3)`` and ``uint8`` train ids ``(H, W)``."""
        image_path, label_path = self.samples[index]
        rgb = read_image(image_path)
        raw = read_label(label_path)
        if raw.shape != rgb.shape[:2]:
            raise DatasetFileError(
                f"The label map {label_path} is {raw.shape[1]}x{raw.shape[0]} but its image {image_path} is "
                f"{rgb.shape[1]}x{rgb.shape[0]} (width x height)."
            )
        return rgb, apply_lut(raw, self.lut)

    def load(self, index: int) -> tuple[Tensor, Tensor]:
        """The whole, unaugmented item ``index`` (what the val split returns)."""
        rgb, label = self.read(index)
        return normalize_image(rgb), torch.from_numpy(label.astype(np.int64))

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not self.train:
            return self.load(index)
        rgb, label = self.read(index)
        rng = item_rng(self.seed, self.epoch, index)
        return train_augment(
            rgb,
            label,
            rng,
            crop_size=self.crop_size,
            scale_range=self.scale_range,
            scale_step=self.scale_step,
            flip=self.flip,
            ignore_index=self.ignore_index,
        )

    def __repr__(self) -> str:
        mode = f"train, crop={self.crop_size}, scale={self.scale_range}, flip={self.flip}" if self.train else "val"
        return f"SegmentationFolder({self.name!r}, {len(self)} images, {mode})"
