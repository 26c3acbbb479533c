"""This rank's validation images decoded once and kept in memory, so that frequent evaluation costs the forward only.

The HWD authors evaluate every 400 iterations. Decoding a Cityscapes validation image (a 2048 x 1024 PNG) and
normalising it takes hundreds of milliseconds of CPU time, far more than the student's forward pass on a GPU, so a
hundred evaluations that decode every time would cost more than the training itself. :class:`CachedValImages`
decodes this rank's share once, through a data loader's workers, keeps each item as the decoded ``uint8`` RGB
image and ``uint8`` train-id map (4 bytes per pixel), and normalises on the evaluation device on every pass with
the arithmetic of :func:`~segkd_examples.models.normalize_image`, so the images are bitwise the ones the loader
gives. Memory: about 4 bytes per validation pixel over all ranks (Cityscapes 4.2 GB, COCO-Stuff-164k val about
5.5 GB, ADE20K val roughly 3 GB), held in host memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from segkd_examples.models.normalization import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["CachedValImages", "normalize_on_device"]


def normalize_on_device(rgb: Tensor) -> Tensor:
    """``uint8`` RGB ``(H, W, 3)`` (on any device) to the model input ``(1, 3, H, W)``, as ``normalize_image`` does."""
    bgr = rgb.to(torch.float32).flip(-1).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=rgb.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=rgb.device).view(3, 1, 1)
    return ((bgr - mean) / std).contiguous().unsqueeze(0)


class _Decoded(Dataset[tuple[Tensor, Tensor]]):
    """Items ``indices`` of ``dataset`` as decoded ``uint8`` arrays when it can (``read``), else as its items."""

    def __init__(self, dataset: Any, indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        index = self.indices[i]
        read = getattr(self.dataset, "read", None)
        if callable(read):
            rgb, label = read(index)
            return torch.from_numpy(np.require(rgb, requirements=["C", "W"])), torch.from_numpy(
                np.require(label, requirements=["C", "W"])
            )
        image, label = self.dataset[index]
        return image, label


class CachedValImages:
    """Iterable of ``(image (1, 3, H, W) float32, label (1, H, W) int64)`` pairs on ``device``, decoded once.

    Args:
        dataset: the validation split (a :class:`~segkd_examples.data.SegmentationFolder`, whose ``read`` gives
            the decoded ``uint8`` arrays, or any dataset of ``(image, label)`` items, kept as they are).
        indices: this rank's items.
        device: where the batches are produced.
        workers: data-loader workers of the first (decoding) pass.
    """

    def __init__(self, dataset: Any, indices: Sequence[int], *, device: torch.device, workers: int = 0) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.device = device
        self.workers = int(workers)
        self._items: list[tuple[Tensor, Tensor]] | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def _fill(self) -> list[tuple[Tensor, Tensor]]:
        loader = DataLoader(_Decoded(self.dataset, self.indices), batch_size=None, num_workers=self.workers)
        # clone: tensors from workers live in shared memory, one file descriptor each
        return [(image.clone(), label.clone()) for image, label in loader]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self._items is None:
            self._items = self._fill()
        for image, label in self._items:
            if image.dtype == torch.uint8:
                yield normalize_on_device(image.to(self.device)), label.to(self.device).long().unsqueeze(0)
            else:
                yield image.to(self.device).unsqueeze(0), label.to(self.device).unsqueeze(0)
