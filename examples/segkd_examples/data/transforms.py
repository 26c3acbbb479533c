"""Training augmentation: random scale, random crop with ignore padding, random horizontal flip.

All randomness comes from a ``numpy.random.Generator`` passed in, so an item's augmentation is a pure function
of the generator's seed; the datasets seed it from ``(seed, epoch, index)``.

The crop window is drawn first and only the pixels inside it are resampled (separable bilinear interpolation
for the image, nearest neighbour for the label, with the same sampling positions as ``F.interpolate(...,
align_corners=False)`` on the whole image). A 2x up-scaled Cityscapes frame is thus never materialised: the cost
is proportional to the crop, not to the scaled image, which keeps data loading off the critical path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from segkd_examples.models.normalization import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["bilinear_taps", "item_rng", "nearest_taps", "train_augment"]


def item_rng(seed: int, epoch: int, index: int, stream: int = 0) -> np.random.Generator:
    """Independent random stream for one item of one epoch (``numpy`` ``SeedSequence`` of the four integers)."""
    return np.random.default_rng([seed, epoch, index, stream])


def bilinear_taps(start: int, stop: int, in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Source indices and weights of output positions ``start .. stop-1`` of a bilinear resize.

    .. math::

        u = \max\!\left(\left(j + \tfrac12\right)\frac{n_{in}}{n_{out}} - \tfrac12,\ 0\right), \quad
        i_0 = \lfloor u \rfloor, \quad i_1 = \min(i_0 + 1, n_{in} - 1), \quad w = u - i_0

    (``align_corners=False``, as ``torch.nn.functional.interpolate``.)

    Returns:
        ``(i0, i1, w)``: int64 indices and float32 weights of the second tap.
    """
    scale = in_size / out_size
    src = np.maximum((np.arange(start, stop, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    return i0, i1, (src - i0).astype(np.float32)


def nearest_taps(start: int, stop: int, in_size: int, out_size: int) -> np.ndarray:
    """Source indices of output positions ``start .. stop-1`` of a nearest resize: ``floor(j * in / out)``."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.floor(np.arange(start, stop, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(src, in_size - 1)


def _resample_window(
    rgb: np.ndarray, rows: tuple[int, int], cols: tuple[int, int], out_size: tuple[int, int]
) -> np.ndarray:
    height, width = rgb.shape[:2]
    if out_size == (height, width):
        return rgb[rows[0] : rows[1], cols[0] : cols[1]].astype(np.float32)
    r0, r1, rw = bilinear_taps(rows[0], rows[1], height, out_size[0])
    c0, c1, cw = bilinear_taps(cols[0], cols[1], width, out_size[1])
    top = rgb[r0].astype(np.float32)
    bottom = rgb[r1].astype(np.float32)
    blended = top + (bottom - top) * rw[:, None, None]
    left, right = blended[:, c0], blended[:, c1]
    return left + (right - left) * cw[None, :, None]


def scale_steps(scale_range: Sequence[float], scale_step: float) -> int:
    """Return ``n`` such that ``low + k * scale_step`` for ``k = 0..n`` spans ``scale_range`` exactly.

    Raises:
        ValueError: ``scale_step`` is not > 0, or ``high - low`` is not a whole number of steps.
    """
    low, high = float(scale_range[0]), float(scale_range[1])
    if not (math.isfinite(scale_step) and scale_step > 0):
        raise ValueError(f"Expected `scale_step` to be a finite number > 0, got {scale_step}.")
    steps = round((high - low) / scale_step)
    if abs(low + steps * scale_step - high) > 1e-9 * max(1.0, high):
        raise ValueError(
            f"Expected `scale_range` {list(scale_range)} to span a whole number of `scale_step` {scale_step} steps."
        )
    return steps


def draw_scale(rng: np.random.Generator, scale_range: Sequence[float], scale_step: float | None = None) -> float:
    r"""Draw a random scale factor: :math:`U(s_{lo}, s_{hi})`, or uniform over :math:`s_{lo} + k \Delta`.

    With ``scale_step`` :math:`\Delta`, the factor is one of ``low, low + step, ..., high``, each equally likely:
    ``0.5 + randint(0, 15) / 10`` in the HWD authors' ``dataset/datasets.py`` is ``(0.5, 2.0)`` with step 0.1.
    """
    low, high = float(scale_range[0]), float(scale_range[1])
    if scale_step is None:
        return float(rng.uniform(low, high))
    return low + scale_step * int(rng.integers(0, scale_steps(scale_range, scale_step) + 1))


def train_augment(
    rgb: np.ndarray,
    label: np.ndarray,
    rng: np.random.Generator,
    *,
    crop_size: Sequence[int],
    scale_range: Sequence[float] = (0.5, 2.0),
    scale_step: float | None = None,
    flip: bool = True,
    ignore_index: int = 255,
) -> tuple[Tensor, Tensor]:
    r"""Random scale, pad-and-crop to ``crop_size``, random horizontal flip, then normalisation.

    .. math::

        s \sim U(s_{lo}, s_{hi}) \text{ (or uniform over } s_{lo} + k\Delta\text{, see :func:`draw_scale`)}, \quad
        (H', W') = (\mathrm{round}(sH), \mathrm{round}(sW))

    The image is resized bilinearly and the label by nearest neighbour to ``(H', W')``; if that is smaller than the
    crop, it is padded at the bottom/right (image with 0 after normalisation, i.e. the mean colour; label with
    ``ignore_index``); a crop offset is drawn uniformly; the result is flipped left-right with probability 1/2 when
    ``flip``. Draw order: scale, row offset, column offset, flip. Only the crop window is computed.

    Args:
        rgb: ``(H, W, 3)`` RGB image, ``uint8`` (or any real dtype on the 0-255 scale).
        label: ``(H, W)`` train ids (integers).
        rng: the item's random generator.
        crop_size: ``(height, width)`` of the output.
        scale_range: ``(low, high)`` of the uniform scale factor.
        scale_step: ``None`` for a continuous scale; else the factor is drawn from ``low, low + step, ..., high``.
        flip: allow the horizontal flip.
        ignore_index: label value of padded pixels.

    Returns:
        ``image`` float32 ``(3, crop_h, crop_w)`` (BGR, normalised like
        :func:`~segkd_examples.models.normalize_image`) and ``label`` int64 ``(crop_h, crop_w)``.

    Raises:
        ValueError: ``rgb`` is not ``(H, W, 3)`` or ``label`` is not ``(H, W)``.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or label.shape != rgb.shape[:2]:
        raise ValueError(
            f"Expected `rgb` (H, W, 3) and `label` (H, W) of the same size, got {rgb.shape} and {label.shape}."
        )
    crop_h, crop_w = int(crop_size[0]), int(crop_size[1])
    height, width = label.shape
    scale = draw_scale(rng, scale_range, scale_step)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    top = int(rng.integers(0, max(new_h, crop_h) - crop_h + 1))
    left = int(rng.integers(0, max(new_w, crop_w) - crop_w + 1))
    rows = (top, min(top + crop_h, new_h))
    cols = (left, min(left + crop_w, new_w))

    window = _resample_window(rgb, rows, cols, (new_h, new_w))
    if (new_h, new_w) == (height, width):
        window_label = label[rows[0] : rows[1], cols[0] : cols[1]]
    else:
        r = nearest_taps(rows[0], rows[1], height, new_h)
        c = nearest_taps(cols[0], cols[1], width, new_w)
        window_label = label[r[:, None], c[None, :]]

    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
    std = np.asarray(IMAGENET_STD, dtype=np.float32)
    bgr = (window[..., ::-1] - mean) / std
    image = torch.from_numpy(np.ascontiguousarray(bgr.transpose(2, 0, 1)))
    target = torch.from_numpy(np.ascontiguousarray(window_label, dtype=np.int64))
    pad_h, pad_w = crop_h - image.shape[1], crop_w - image.shape[2]
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
        target = F.pad(target, (0, pad_w, 0, pad_h), value=ignore_index)
    if flip and rng.random() < 0.5:
        image, target = image.flip(-1), target.flip(-1)
    return image.contiguous(), target.contiguous().to(torch.int64)
