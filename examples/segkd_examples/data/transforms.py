"""Training augmentation: random scale, random crop with ignore padding, random horizontal flip.

All randomness comes from a ``numpy.random.Generator`` passed in, so an item's augmentation is a pure function
of the generator's seed; the datasets seed it from ``(seed, epoch, index)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["item_rng", "train_augment"]


def item_rng(seed: int, epoch: int, index: int, stream: int = 0) -> np.random.Generator:
    """Independent random stream for one item of one epoch (``numpy`` ``SeedSequence`` of the four integers)."""
    return np.random.default_rng([seed, epoch, index, stream])


def train_augment(
    image: Tensor,
    label: Tensor,
    rng: np.random.Generator,
    *,
    crop_size: Sequence[int],
    scale_range: Sequence[float] = (0.5, 2.0),
    flip: bool = True,
    ignore_index: int = 255,
) -> tuple[Tensor, Tensor]:
    r"""Random scale, pad-and-crop to ``crop_size``, random horizontal flip.

    .. math::

        s \sim U(s_{lo}, s_{hi}), \quad (H', W') = (\mathrm{round}(sH), \mathrm{round}(sW))

    The image is resized bilinearly, the label by nearest neighbour; if ``(H', W')`` is smaller than the crop,
    the image is padded at the bottom/right with 0 (the mean colour, since the image is already normalised) and
    the label with ``ignore_index``; a crop offset is drawn uniformly; the result is flipped left-right with
    probability 1/2 when ``flip``. Draw order: scale, row offset, column offset, flip.

    Args:
        image: ``(3, H, W)`` float, normalised.
        label: ``(H, W)`` int64 train ids.
        rng: the item's random generator.
        crop_size: ``(height, width)`` of the output.
        scale_range: ``(low, high)`` of the uniform scale factor.
        flip: allow the horizontal flip.
        ignore_index: label value of padded pixels.

    Returns:
        ``image (3, crop_h, crop_w)`` and ``label (crop_h, crop_w)``.

    Shape:
        - image: ``(3, H, W)`` -> ``(3, crop_h, crop_w)``.
        - label: ``(H, W)`` -> ``(crop_h, crop_w)``.
    """
    crop_h, crop_w = int(crop_size[0]), int(crop_size[1])
    height, width = label.shape
    scale = float(rng.uniform(scale_range[0], scale_range[1]))
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    if (new_h, new_w) != (height, width):
        image = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
        label = F.interpolate(label[None, None].float(), size=(new_h, new_w), mode="nearest")[0, 0].long()
    pad_h, pad_w = max(crop_h - new_h, 0), max(crop_w - new_w, 0)
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
        label = F.pad(label, (0, pad_w, 0, pad_h), value=ignore_index)
    top = int(rng.integers(0, label.shape[0] - crop_h + 1))
    left = int(rng.integers(0, label.shape[1] - crop_w + 1))
    image = image[:, top : top + crop_h, left : left + crop_w]
    label = label[top : top + crop_h, left : left + crop_w]
    if flip and rng.random() < 0.5:
        image, label = image.flip(-1), label.flip(-1)
    return image.contiguous(), label.contiguous().to(torch.int64)
