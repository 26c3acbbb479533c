"""Issue 15, class 1: every loss that takes labels accepts any integer dtype (uint8 from a PNG, int16, ...).

The result and the student's gradient must equal those for the same labels in int64 (the dtype the
other tests check against float64 references), in training and in eval mode, and a non-integer
label map is refused with a message naming `labels`.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from segkd import CIRKDLoss, CIRKDMemoryLoss, IFVDLoss, KDLoss, SKDLoss
from segkd.functional import ifvd_loss, pixel_kd_loss
from segkd.losses.cirkd import cirkd_memory_kl

TINY = {"pixel_memory_size": 12, "region_memory_size": 5, "pixel_contrast_size": 9, "region_contrast_size": 6}
DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]
K = 3  # classes
IGNORE = 100  # representable in every dtype above


def _inputs(seed: int = 0) -> tuple[Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    logits_s, logits_t = torch.randn(2, K, 6, 6, generator=gen), torch.randn(2, K, 6, 6, generator=gen)
    feat_s, feat_t = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(2, 5, 3, 3, generator=gen)
    labels = torch.randint(0, K, (2, 6, 6), generator=gen)
    labels[0, :2] = IGNORE
    return logits_s, logits_t, feat_s, feat_t, labels


def _memory(training: bool) -> CIRKDMemoryLoss:
    torch.manual_seed(0)
    module = CIRKDMemoryLoss(K, 4, 5, ignore_index=IGNORE, generator=torch.Generator().manual_seed(0), **TINY)  # type: ignore[arg-type]
    return module.train(training)


def _bundle_cirkd() -> CIRKDLoss:
    torch.manual_seed(0)
    return CIRKDLoss(K, 4, 5, ignore_index=IGNORE, generator=torch.Generator().manual_seed(0), **TINY)  # type: ignore[arg-type]


def _bundle_skd() -> SKDLoss:
    torch.manual_seed(0)
    return SKDLoss(num_classes=K, conv_dim=2, adversarial_weight=0.0, ignore_index=IGNORE)


# Each case: (student, teacher, feat_s, feat_t, labels) -> a tuple of output tensors; the student
# logits or features that get a gradient are the first two inputs.
CASES: dict[str, Callable[..., tuple[Tensor, ...]]] = {
    "pixel_kd_loss": lambda s, t, fs, ft, y: (pixel_kd_loss(s, t, 2.0, y, IGNORE),),
    "KDLoss": lambda s, t, fs, ft, y: (KDLoss(ignore_index=IGNORE)(s, t, y),),
    "ifvd_loss": lambda s, t, fs, ft, y: (ifvd_loss(fs, ft, y, K, IGNORE),),
    "IFVDLoss": lambda s, t, fs, ft, y: (IFVDLoss(K, ignore_index=IGNORE)(fs, ft, y),),
    "cirkd_memory_kl": lambda s, t, fs, ft, y: cirkd_memory_kl(
        fs[:, :4], ft[:, :4], y, torch.ones(7, 4), torch.ones(5, 4).cumsum(0), ignore_index=IGNORE
    ),
    "CIRKDMemoryLoss-train": lambda s, t, fs, ft, y: _memory(True)(fs, ft, y),
    "CIRKDMemoryLoss-eval": lambda s, t, fs, ft, y: _memory(False)(fs, ft, y),
    "CIRKDLoss": lambda s, t, fs, ft, y: (_bundle_cirkd()(s, t, fs, ft, y)[0],),
    "SKDLoss": lambda s, t, fs, ft, y: (_bundle_skd()(s, t, fs, ft, y)[0],),
}


def _run(case: Callable[..., tuple[Tensor, ...]], labels_dtype: torch.dtype) -> tuple[Tensor, ...]:
    s, t, fs, ft, labels = _inputs()
    s.requires_grad_(True)
    fs.requires_grad_(True)
    outputs = case(s, t, fs, ft, labels.to(labels_dtype))
    sum(o.sum() for o in outputs).backward()
    zeros = torch.zeros(())
    return (*outputs, s.grad if s.grad is not None else zeros, fs.grad if fs.grad is not None else zeros)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_any_integer_label_dtype_gives_the_int64_result(name: str, dtype: torch.dtype) -> None:
    expected = _run(CASES[name], torch.int64)
    actual = _run(CASES[name], dtype)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bool], ids=str)
def test_non_integer_labels_are_refused_naming_labels(name: str, dtype: torch.dtype) -> None:
    s, t, fs, ft, labels = _inputs()
    with pytest.raises(TypeError, match=r"Expected `labels` to have an integer dtype"):
        CASES[name](s, t, fs, ft, labels.to(dtype))


def test_uint8_png_labels_with_ignore_255() -> None:
    # The common case: a PNG decodes to uint8 and 255 marks the ignored pixels.
    _, _, fs, ft, labels = _inputs()
    labels[labels == IGNORE] = 255
    torch.manual_seed(0)
    memory = CIRKDMemoryLoss(K, 4, 5, generator=torch.Generator().manual_seed(0), **TINY)  # type: ignore[arg-type]
    pixel, region = memory(fs, ft, labels.to(torch.uint8))
    assert torch.isfinite(pixel)
    assert torch.isfinite(region)
    assert int(memory.pixel_queue_ptr.sum()) > 0  # the step was enqueued
