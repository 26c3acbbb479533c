r"""Segmentation metrics: confusion matrix summed over ranks, mIoU, per-class IoU; whole and sliding-window inference.

.. math::

    \mathrm{IoU}_k = \frac{M_{kk}}{\sum_j M_{kj} + \sum_i M_{ik} - M_{kk}}, \qquad
    \mathrm{mIoU} = \frac{1}{|\{k : \text{class } k \text{ present}\}|} \sum_k \mathrm{IoU}_k,

where ``M[i, j]`` counts pixels of true class ``i`` predicted as ``j``. Two averages: ``"present"`` leaves the
classes that appear neither in the labels nor in the predictions (zero union) out of the mean, as mmsegmentation
does; ``"all"`` averages over all ``K`` bins with those classes counting 0, as CIRKD's and the HWD code's
``utils/score.py`` do (``IoU = inter / (eps + union)``, ``mIoU = IoU.mean()``). They differ only when a class is
empty: on COCO-Stuff's 182 raw ids, 11 never occur.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from segkd_examples.distributed import all_reduce_sum

__all__ = [
    "MIOU_CLASSES",
    "LabelRangeError",
    "check_label_range",
    "confusion_matrix",
    "evaluate",
    "format_iou_table",
    "iou_from_confusion",
    "miou_from_confusion",
    "predict_logits",
    "slide_logits",
]


#: The two averages of :func:`miou_from_confusion`.
MIOU_CLASSES = ("present", "all")


class LabelRangeError(ValueError):
    """A label map holds class ids outside ``[0, num_classes)`` that are not ``ignore_index``."""


def check_label_range(labels: Tensor, num_classes: int, ignore_index: int = 255, *, action: str = "error") -> Tensor:
    """Check that every label is a class id or ``ignore_index``; optionally map stray ids to ignore.

    Run it on the CPU tensors coming out of the data loader: a stray id then gives this message instead
    of a CUDA device-side assert in the loss with no context.

    Args:
        labels: integer label map, any shape.
        num_classes: number of classes ``K``.
        ignore_index: the id that marks pixels to skip.
        action: ``"error"`` raises on stray ids, ``"ignore"`` replaces them with ``ignore_index``.

    Returns:
        ``labels`` (a modified copy when ``action="ignore"`` found stray ids).

    Raises:
        LabelRangeError: stray ids with ``action="error"``; the message lists the first few.
    """
    bad = ((labels < 0) | (labels >= num_classes)) & (labels != ignore_index)
    if not bool(bad.any()):
        return labels
    if action == "ignore":
        return labels.masked_fill(bad, ignore_index)
    values = torch.unique(labels[bad])[:8].tolist()
    raise LabelRangeError(
        f"Found {int(bad.sum())} label pixels with class ids outside [0, {num_classes}) that are not the ignore "
        f"index {ignore_index} (first ids: {values}); the dataset's label mapping does not match num_classes="
        f"{num_classes}. Set `label_out_of_range: ignore` to count them as ignored."
    )


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """Confusion matrix ``M[true, predicted]`` of the pixels whose label is not ``ignore_index``.

    Args:
        pred: predicted class ids, same shape as ``target``.
        target: true class ids in ``[0, num_classes)`` or ``ignore_index``.
        num_classes: ``K``.
        ignore_index: label value to skip.

    Returns:
        ``(K, K)`` int64 matrix on ``pred``'s device.

    Raises:
        ValueError: shapes differ.
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"Expected `pred` and `target` to have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}."
        )
    # Ignored pixels go to an extra bin that is dropped: no boolean indexing (5x faster on a CPU at Cityscapes size).
    bins = num_classes * num_classes
    t = target.reshape(-1).long()
    index = torch.where(t == ignore_index, bins, t * num_classes + pred.reshape(-1).long())
    return torch.bincount(index, minlength=bins + 1)[:bins].reshape(num_classes, num_classes)


def iou_from_confusion(matrix: Tensor) -> Tensor:
    """Per-class IoU from a confusion matrix; ``nan`` for classes with an empty union."""
    m = matrix.double()
    tp = m.diagonal()
    union = m.sum(0) + m.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, math.nan))


def miou_from_confusion(matrix: Tensor, classes: str = "present") -> float:
    """Mean IoU of a confusion matrix.

    Args:
        matrix: ``(K, K)`` confusion matrix.
        classes: ``"present"``: mean over the classes with a non-empty union (``nan`` when there is none);
            ``"all"``: mean over all ``K`` bins, a class with an empty union counting 0 (CIRKD's ``utils/score.py``).

    Raises:
        ValueError: unknown ``classes``.
    """
    if classes not in MIOU_CLASSES:
        raise ValueError(f"Expected `classes` to be one of {MIOU_CLASSES}, got {classes!r}.")
    iou = iou_from_confusion(matrix)
    if classes == "all":
        return float(torch.nan_to_num(iou, nan=0.0).mean())
    valid = ~torch.isnan(iou)
    return float(iou[valid].mean()) if bool(valid.any()) else math.nan


def format_iou_table(
    iou: Sequence[float] | Tensor, class_names: Sequence[str] | None = None, miou_classes: str = "present"
) -> str:
    """A Markdown table of per-class IoU (in %), with the mean (``miou_classes`` as in :func:`miou_from_confusion`)."""
    values = [float(v) for v in (iou.tolist() if isinstance(iou, Tensor) else iou)]
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(values))]
    width = max([len("**mean**"), *(len(n) for n in names)])
    lines = [f"| {'class':<{width}} | IoU (%) |", f"|{'-' * (width + 2)}|--------:|"]
    for name, value in zip(names, values, strict=True):
        shown = "n/a" if math.isnan(value) else f"{100 * value:.2f}"
        lines.append(f"| {name:<{width}} | {shown:>7} |")
    valid = [v for v in values if not math.isnan(v)]
    count = len(values) if miou_classes == "all" else len(valid)
    mean = f"{100 * sum(valid) / count:.2f}" if count else "n/a"
    lines.append(f"| {'**mean**':<{width}} | {mean:>7} |")
    return "\n".join(lines)


Forward = Callable[[Tensor], Tensor]


def predict_logits(
    forward: Forward, image: Tensor, out_size: tuple[int, int], *, align_corners: bool = False
) -> Tensor:
    """Whole-image inference: logits of ``image`` upsampled (bilinear, ``align_corners`` as given) to ``out_size``."""
    logits = forward(image)
    return F.interpolate(logits.float(), size=out_size, mode="bilinear", align_corners=align_corners)


def slide_logits(
    forward: Forward,
    image: Tensor,
    num_classes: int,
    crop: Sequence[int],
    stride: Sequence[int] | None = None,
    *,
    align_corners: bool = False,
) -> Tensor:
    """Sliding-window inference: average of the window logits (each upsampled to its window) over the image.

    Windows of size ``crop`` step by ``stride`` (default: two thirds of ``crop``, as mmsegmentation's
    configs); the last window in each direction is aligned with the image border; an image smaller than
    ``crop`` is padded with zeros (the normalised mean) and the padding cropped away.

    Args:
        forward: maps ``(N, 3, h, w)`` images to ``(N, K, h', w')`` logits.
        image: ``(N, 3, H, W)``.
        num_classes: ``K``.
        crop: window ``(height, width)``.
        stride: step ``(height, width)``.
        align_corners: of the bilinear upsampling of each window's logits.

    Returns:
        ``(N, K, H, W)`` float32 logits.
    """
    crop_h, crop_w = int(crop[0]), int(crop[1])
    if stride is None:
        stride_h, stride_w = max(1, crop_h * 2 // 3), max(1, crop_w * 2 // 3)
    else:
        stride_h, stride_w = int(stride[0]), int(stride[1])
    n, _, height, width = image.shape
    pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
    padded = F.pad(image, (0, pad_w, 0, pad_h)) if pad_h or pad_w else image
    full_h, full_w = padded.shape[-2:]
    total = image.new_zeros((n, num_classes, full_h, full_w), dtype=torch.float32)
    count = image.new_zeros((1, 1, full_h, full_w), dtype=torch.float32)
    rows = max(math.ceil((full_h - crop_h) / stride_h), 0) + 1
    cols = max(math.ceil((full_w - crop_w) / stride_w), 0) + 1
    for r in range(rows):
        for c in range(cols):
            y0 = min(r * stride_h, full_h - crop_h)
            x0 = min(c * stride_w, full_w - crop_w)
            window = padded[:, :, y0 : y0 + crop_h, x0 : x0 + crop_w]
            total[:, :, y0 : y0 + crop_h, x0 : x0 + crop_w] += predict_logits(
                forward, window, (crop_h, crop_w), align_corners=align_corners
            )
            count[:, :, y0 : y0 + crop_h, x0 : x0 + crop_w] += 1
    return (total / count)[:, :, :height, :width]


@torch.no_grad()
def evaluate(
    forward: Forward,
    batches: Iterable[tuple[Tensor, Tensor]],
    num_classes: int,
    *,
    device: torch.device,
    ignore_index: int = 255,
    mode: str = "whole",
    crop: Sequence[int] | None = None,
    stride: Sequence[int] | None = None,
    label_action: str = "error",
    autocast: Any = None,
    align_corners: bool = False,
    miou_classes: str = "present",
) -> tuple[float, list[float], Tensor]:
    """Evaluate on this rank's share of the images, then sum the confusion matrix over all ranks.

    Every rank must call this (it ends with an ``all_reduce``); ranks may hold different numbers of images.

    Args:
        forward: maps images to logits at any resolution (the model in eval mode).
        batches: ``(images, labels)`` pairs, ``(N, 3, H, W)`` and ``(N, H, W)``.
        num_classes: ``K``.
        device: where to run.
        ignore_index: label value to skip.
        mode: ``"whole"`` or ``"slide"``.
        crop: window size for ``"slide"``.
        stride: window step for ``"slide"``.
        label_action: what to do with stray label ids (see :func:`check_label_range`).
        autocast: a context-manager factory for mixed precision, or ``None``.
        align_corners: of the bilinear upsampling of the logits to the label size (``True`` in the HWD and CIRKD
            code's validation).
        miou_classes: how the mIoU averages (:func:`miou_from_confusion`).

    Returns:
        ``(miou, per_class_iou, confusion_matrix)``; IoU of absent classes is ``nan``.
    """
    matrix = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)
    for images, labels in batches:
        labels = check_label_range(labels, num_classes, ignore_index, action=label_action)
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        ctx = autocast() if autocast is not None else contextlib.nullcontext()
        with ctx:
            if mode == "slide":
                if crop is None:
                    raise ValueError("Sliding-window evaluation needs `crop`.")
                logits = slide_logits(forward, images, num_classes, crop, stride, align_corners=align_corners)
            else:
                size = (int(labels.shape[-2]), int(labels.shape[-1]))
                logits = predict_logits(forward, images, size, align_corners=align_corners)
        matrix += confusion_matrix(logits.argmax(1), labels, num_classes, ignore_index)
    all_reduce_sum(matrix)
    iou = iou_from_confusion(matrix.cpu())
    return miou_from_confusion(matrix.cpu(), miou_classes), [float(v) for v in iou.tolist()], matrix.cpu()
