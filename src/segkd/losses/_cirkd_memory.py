"""Queue mechanics of CIRKD's memory bank: label resizing, DDP gathering, enqueueing and sampling.

Private helpers of :class:`segkd.losses.cirkd.CIRKDMemoryLoss`. Every function works in place on the
queue and pointer tensors it is given and never builds an autograd graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "concat_all_gather",
    "enqueue_pixels",
    "enqueue_regions",
    "queue_nbytes",
    "resize_labels_nearest",
    "sample_queue",
]


def resize_labels_nearest(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour resize of an ``(N, H, W)`` label map to ``(N, h, w)``.

    Output pixel ``(i, j)`` takes input pixel ``(floor(i * H / h), floor(j * W / w))``, which is
    what ``F.interpolate(mode="nearest")`` computes, here in exact integer arithmetic.
    """
    height, width = labels.shape[-2:]
    out_h, out_w = size
    if (height, width) == (out_h, out_w):
        return labels
    rows = torch.arange(out_h, device=labels.device) * height // out_h
    cols = torch.arange(out_w, device=labels.device) * width // out_w
    return labels.index_select(-2, rows).index_select(-1, cols)


def _distributed_world_size() -> int:
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return 1
    return int(torch.distributed.get_world_size())


@torch.no_grad()
def concat_all_gather(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` from every DDP rank along dim 0; the tensor itself without DDP.

    Every rank must call it with a tensor of the same shape (``torch.distributed.all_gather``).
    The result carries no gradient.
    """
    world_size = _distributed_world_size()
    if world_size == 1:
        return tensor
    tensor = tensor.contiguous()
    gathered = [torch.empty_like(tensor) for _ in range(world_size)]
    torch.distributed.all_gather(gathered, tensor)
    return torch.cat(gathered, dim=0)


def _random_uniform(count: int, device: torch.device, generator: torch.Generator | None) -> Tensor:
    source = generator.device if generator is not None else device
    return torch.rand(count, generator=generator, device=source).to(device)


def sample_queue(queue: Tensor, count: int, generator: torch.Generator | None = None) -> Tensor:
    """Sample the same ``count`` random slots from every class's queue, as CIRKD does.

    Args:
        queue: ``(K, M, D)`` per-class queue.
        count: slots per class, ``1 <= count``; capped at ``M``.
        generator: source of the random permutation (its own device); the global RNG when ``None``.

    Returns:
        ``(K * min(count, M), D)`` entries, class-major (all of class 0's first), in the queue's dtype.
    """
    slots = queue.shape[1]
    source = generator.device if generator is not None else queue.device
    index = torch.randperm(slots, generator=generator, device=source)[: min(count, slots)].to(queue.device)
    return queue.index_select(1, index).flatten(0, 1)


@torch.no_grad()
def enqueue_regions(queue: Tensor, pointer: Tensor, features: Tensor, labels: Tensor, ignore_index: int) -> None:
    """Push one region entry per (image, present class): the renormalised mean of its unit features.

    Images are processed in batch order; each class's pointer advances by one per image that
    contains it, wrapping around the queue length.

    Args:
        queue: ``(K, R, D)`` region queue, written in place.
        pointer: ``(K,)`` int64 next slot per class, updated in place.
        features: ``(B, D, h, w)`` L2-normalised teacher features.
        labels: ``(B, h, w)`` class ids in ``[0, K)`` or ``ignore_index``.
        ignore_index: label of pixels never enqueued.
    """
    num_classes, length, dim = queue.shape
    for feat, label in zip(features.flatten(2).transpose(1, 2), labels.flatten(1), strict=True):
        valid = label != ignore_index
        ids, rows = label[valid], feat[valid]
        sums = torch.zeros(num_classes, dim, device=feat.device, dtype=feat.dtype).index_add_(0, ids, rows)
        counts = torch.bincount(ids, minlength=num_classes)
        present = torch.nonzero(counts > 0).squeeze(1)
        means = F.normalize(sums[present] / counts[present].unsqueeze(1).to(sums.dtype), p=2, dim=1)
        queue[present, pointer[present]] = means.to(queue.dtype)
        pointer[present] = (pointer[present] + 1) % length


@torch.no_grad()
def enqueue_pixels(
    queue: Tensor,
    pointer: Tensor,
    features: Tensor,
    labels: Tensor,
    ignore_index: int,
    update_freq: int,
    generator: torch.Generator | None = None,
) -> None:
    """Push up to ``update_freq`` random pixels of each (image, present class) into that class's queue.

    Per image and class, ``k = min(pixels of the class, update_freq, P)`` distinct pixels of that
    class are drawn at random. With ``ptr`` the class's pointer: if ``ptr + k >= P`` they fill
    the last ``k`` slots and the pointer returns to 0; otherwise they fill slots ``ptr .. ptr+k-1``
    and the pointer advances by ``k`` (CIRKD's rule).

    Args:
        queue: ``(K, P, D)`` pixel queue, written in place.
        pointer: ``(K,)`` int64 next slot per class, updated in place.
        features: ``(B, D, h, w)`` L2-normalised teacher features.
        labels: ``(B, h, w)`` class ids in ``[0, K)`` or ``ignore_index``.
        ignore_index: label of pixels never enqueued.
        update_freq: most pixels per image and class.
        generator: source of the random choice of pixels; the global RNG when ``None``.
    """
    num_classes, length, _ = queue.shape
    per_class_cap = min(update_freq, length)
    for feat, label in zip(features.flatten(2).transpose(1, 2), labels.flatten(1), strict=True):
        valid = label != ignore_index
        ids, rows = label[valid], feat[valid]
        counts = torch.bincount(ids, minlength=num_classes)
        take = counts.clamp(max=per_class_cap)
        # Random order within each class: shuffle, then a stable sort by class id.
        shuffle = torch.argsort(_random_uniform(ids.numel(), ids.device, generator))
        order = shuffle[torch.sort(ids[shuffle], stable=True).indices]
        sorted_ids = ids[order]
        first = torch.cumsum(counts, 0) - counts
        rank = torch.arange(ids.numel(), device=ids.device) - first[sorted_ids]
        keep = rank < take[sorted_ids]
        chosen_ids, chosen_rank = sorted_ids[keep], rank[keep]
        wrap = pointer + take >= length
        start = torch.where(wrap, length - take, pointer)
        queue[chosen_ids, start[chosen_ids] + chosen_rank] = F.normalize(rows[order[keep]], p=2, dim=1).to(queue.dtype)
        pointer.copy_(torch.where(wrap, torch.zeros_like(pointer), pointer + take))


def queue_nbytes(
    num_classes: int, dim: int, pixel_memory_size: int, region_memory_size: int, dtype: torch.dtype
) -> int:
    """Bytes held by the two queues and their pointers: ``K * (P + R) * D * itemsize + 2 * K * 8``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return num_classes * (pixel_memory_size + region_memory_size) * dim * itemsize + 2 * num_classes * 8
