"""Throwaway stand-ins for ``segkd_examples.models`` / ``segkd_examples.data`` (pipeline contract, docs/pipeline.md).

Used by the pipeline tests only while the real packages are not importable, so that the trainer can be
tested against the contract. ``install_if_missing()`` registers them in ``sys.modules`` when needed.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import types
from typing import NamedTuple

import torch
from torch import Tensor, nn

_EXAMPLES = str(__import__("pathlib").Path(__file__).resolve().parents[2] / "examples")
if _EXAMPLES not in sys.path:
    sys.path.insert(0, _EXAMPLES)


class SegmentationOutput(NamedTuple):
    logits: Tensor
    aux_logits: Tensor | None
    features: Tensor


class _TinyNet(nn.Module):
    def __init__(self, num_classes: int, width: int, aux: bool) -> None:
        super().__init__()
        self.num_classes, self.feature_channels, self.has_aux = num_classes, width, aux
        layers: list[nn.Module] = []
        c_in = 3
        for _ in range(3):  # stride 8
            layers += [nn.Conv2d(c_in, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            c_in = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(width, num_classes, 1)
        self.aux_head = nn.Conv2d(width, num_classes, 1) if aux else None

    def forward(self, images: Tensor) -> SegmentationOutput:
        feat = self.body(images)
        aux = self.aux_head(feat) if self.aux_head is not None else None
        return SegmentationOutput(self.head(feat), aux, feat)


MODEL_NAMES = ("tiny_teacher", "tiny_student")


def build_model(name: str, num_classes: int, *, backbone_weights: str | None = None) -> nn.Module:
    if name not in MODEL_NAMES:
        raise ValueError(f"stub models: unknown {name!r}")
    return _TinyNet(num_classes, 16 if name == "tiny_teacher" else 8, aux=name == "tiny_student")


class CheckpointError(ValueError):
    pass


def load_checkpoint_into(model: nn.Module, path: str, *, what: str) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    class_names: tuple[str, ...]
    ignore_index: int = 255


DATASETS = ("cityscapes", "ade20k", "cocostuff", "synthetic")


def dataset_info(name: str, **kwargs) -> DatasetInfo:
    return DatasetInfo(name, 4, ("a", "b", "c", "d"))


class _Synthetic(torch.utils.data.Dataset):
    def __init__(self, length: int, size: int, seed: int, train: bool) -> None:
        self.length, self.size, self.seed, self.train, self.epoch = length, size, seed, train, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(self.seed * 7919 + index)
        label = torch.zeros(self.size, self.size, dtype=torch.int64)
        for k in range(1, 4):
            y, x = torch.randint(0, self.size // 2, (2,), generator=g).tolist()
            label[y : y + self.size // 2, x : x + self.size // 2] = k
        image = label.float().unsqueeze(0).repeat(3, 1, 1) + 0.3 * torch.randn(3, self.size, self.size, generator=g)
        if self.train:
            aug = torch.Generator().manual_seed(self.seed * 31 + self.epoch * 100_003 + index)
            if bool(torch.rand((), generator=aug) < 0.5):
                image, label = image.flip(-1), label.flip(-1)
        return image, label


def build_dataset(
    name,
    root,
    split,
    *,
    crop_size=(512, 512),
    scale_range=(0.5, 2.0),
    flip=True,
    synthetic_length=None,
    synthetic_size=None,
    seed=0,
):
    return _Synthetic(synthetic_length or 16, synthetic_size or 32, seed + (split == "val") * 1000, split == "train")


class DatasetRootError(ValueError):
    pass


def check_dataset_root(name: str, root: str, split: str) -> None:
    return None


def install_if_missing() -> list[str]:
    """Register the stubs for whichever of the two packages cannot be imported with its contract; return them."""
    installed = []
    for sub, needed in (("models", "build_model"), ("data", "build_dataset")):
        full = f"segkd_examples.{sub}"
        try:
            module = importlib.import_module(full)
            if hasattr(module, needed):
                continue
        except ImportError:
            pass
        stub = types.ModuleType(full)
        stub.__dict__.update({k: v for k, v in globals().items() if not k.startswith("__")})
        sys.modules[full] = stub
        installed.append(sub)
    return installed
