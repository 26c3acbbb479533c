"""Procedural segmentation images: shapes with class-specific form, colour and texture, generated on the fly.

Each class ``c >= 1`` has its own shape (disc, square, triangle, bar, ring, cross, diamond, then cycling), its own
base colour and its own texture (flat, stripes at a class-specific angle and period, checkerboard, dots); class 0
is a softly shaded grey background. An image holds two to four objects that may occlude each other, plus
per-image brightness jitter and pixel noise, so a model must use shape and texture as well as colour. Everything
is a pure function of ``(seed, split, index)``: no files, no downloads, identical on every machine.
"""

from __future__ import annotations

import colorsys
import math

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from segkd_examples.models.normalization import normalize_image

from .transforms import item_rng

__all__ = ["SyntheticSegmentation"]

_NAMED_COLOURS = (
    (110, 110, 110),  # background (shaded)
    (220, 60, 50),  # disc
    (60, 180, 75),  # square
    (50, 90, 220),  # triangle
    (235, 200, 40),  # bar
    (200, 60, 200),  # ring
    (40, 200, 210),  # cross
    (245, 130, 40),  # diamond
)
_SHAPES = ("disc", "square", "triangle", "bar", "ring", "cross", "diamond")
_TEXTURES = ("flat", "stripes", "checker", "dots")


def _class_colour(cls: int) -> np.ndarray:
    if cls < len(_NAMED_COLOURS):
        return np.array(_NAMED_COLOURS[cls], dtype=np.float32)
    hue = (cls * 0.618033988749895) % 1.0  # golden-ratio hues keep extra classes apart
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.9)
    return np.array((255 * r, 255 * g, 255 * b), dtype=np.float32)


def _texture(cls: int, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    kind = _TEXTURES[(cls - 1) % len(_TEXTURES)]
    period = 4.0 + 2.0 * (cls % 3)
    if kind == "flat":
        return np.ones_like(xs)
    if kind == "stripes":
        angle = math.radians(37.0 * cls)
        phase = (xs * math.cos(angle) + ys * math.sin(angle)) / period
        return 1.0 + 0.25 * np.sign(np.sin(2 * math.pi * phase))
    if kind == "checker":
        return 1.0 + 0.25 * (2.0 * ((np.floor(xs / period) + np.floor(ys / period)) % 2) - 1.0)
    dy, dx = ys % period - period / 2, xs % period - period / 2
    return 1.0 - 0.35 * (dy**2 + dx**2 < (period / 3) ** 2)


def _shape_mask(cls: int, dy: np.ndarray, dx: np.ndarray, r: float, vertical: bool) -> np.ndarray:
    shape = _SHAPES[(cls - 1) % len(_SHAPES)]
    ady, adx = np.abs(dy), np.abs(dx)
    if shape == "disc":
        return dy**2 + dx**2 <= r**2
    if shape == "square":
        return np.maximum(ady, adx) <= 0.8 * r
    if shape == "triangle":
        return (dy >= -r) & (dy <= r) & (adx <= 0.6 * (dy + r))
    if shape == "bar":
        long, short = (ady, adx) if vertical else (adx, ady)
        return (long <= 1.2 * r) & (short <= 0.3 * r)
    if shape == "ring":
        dist2 = dy**2 + dx**2
        return (dist2 <= r**2) & (dist2 >= (0.55 * r) ** 2)
    if shape == "cross":
        return ((ady <= 0.28 * r) & (adx <= r)) | ((adx <= 0.28 * r) & (ady <= r))
    return ady + adx <= r


class SyntheticSegmentation(Dataset[tuple[Tensor, Tensor]]):
    """Procedurally generated images and masks for CPU demos and tests.

    The object drawn last (on top, never occluded) in item ``i`` has class ``1 + i mod (K - 1)``, so any
    ``K - 1`` consecutive items contain every class. Train and val items come from different streams. In the
    train split the only augmentation is a random horizontal flip seeded from ``(seed, epoch, index)`` (the
    layouts are already random; the scale/crop settings of the real datasets do not apply).

    Args:
        split: ``"train"`` or ``"val"``.
        length: number of items.
        size: image height and width.
        num_classes: ``K`` >= 2, background included.
        seed: base seed.
        flip: random horizontal flip in the train split.

    Shape:
        Items are ``image`` float32 ``(3, size, size)`` (BGR, normalised like the real datasets) and ``label``
        int64 ``(size, size)`` with values in ``0 .. K-1``.
    """

    def __init__(
        self, split: str, *, length: int, size: int = 64, num_classes: int = 8, seed: int = 0, flip: bool = True
    ) -> None:
        self.split = split
        self.train = split == "train"
        self.length = length
        self.size = size
        self.num_classes = num_classes
        self.seed = seed
        self.flip = flip
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the flip stream of ``epoch`` (the images themselves do not change)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def render(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Item ``index`` as an RGB ``uint8`` image ``(size, size, 3)`` and an int64 label map ``(size, size)``.

        Raises:
            IndexError: ``index`` outside ``[0, length)``.
        """
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} is out of range for a synthetic dataset of length {self.length}")
        rng = item_rng(self.seed, 0, index, stream=1 if self.train else 2)
        s = self.size
        ys, xs = np.meshgrid(np.arange(s, dtype=np.float32), np.arange(s, dtype=np.float32), indexing="ij")
        phase = rng.uniform(0, 2 * math.pi, size=2)
        shading = 1.0 + 0.15 * np.sin(2 * math.pi * xs / s + phase[0]) * np.cos(2 * math.pi * ys / s + phase[1])
        rgb = _class_colour(0)[None, None, :] * shading[..., None]
        label = np.zeros((s, s), dtype=np.int64)
        count = int(rng.integers(2, 5))
        classes = [int(c) for c in rng.integers(1, self.num_classes, size=count - 1)]
        classes.append(1 + index % (self.num_classes - 1))
        for cls in classes:
            r = float(rng.uniform(0.12, 0.28)) * s
            cy, cx = rng.uniform(0.2, 0.8, size=2) * s
            vertical = bool(rng.random() < 0.5)
            mask = _shape_mask(cls, ys - cy, xs - cx, r, vertical)
            tone = _class_colour(cls)[None, :] * _texture(cls, ys[mask], xs[mask])[:, None]
            rgb[mask] = tone
            label[mask] = cls
        rgb = rgb * float(rng.uniform(0.85, 1.15)) + rng.normal(0.0, 10.0, size=rgb.shape)
        return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), label

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        rgb, label_np = self.render(index)
        image, label = normalize_image(rgb), torch.from_numpy(label_np)
        if self.train and self.flip and item_rng(self.seed, self.epoch, index, stream=3).random() < 0.5:
            image, label = image.flip(-1).contiguous(), label.flip(-1).contiguous()
        return image, label

    def __repr__(self) -> str:
        return (
            f"SyntheticSegmentation({self.split!r}, length={self.length}, size={self.size}, "
            f"num_classes={self.num_classes}, seed={self.seed})"
        )
