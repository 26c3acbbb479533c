"""Distillation methods for the training loop: one :class:`Distiller` per ``--method``.

A distiller takes the student's and the teacher's :class:`SegmentationOutput` (``logits``, ``aux_logits``,
``features``, all at 1/8 resolution) and the labels, and returns ``(weighted_kd_total, terms)`` where
``terms`` maps a short name to each weighted part (for logging). Its trainable parts (MGD generator,
CIRKD projection heads) are its own parameters: the trainer puts them in the optimizer, the checkpoint and
DDP. An adversarial method (SKD) also exposes a discriminator with its own optimizer, kept out of DDP's
reducer and synchronised by an explicit gradient all-reduce (see ``engine.py``).

The default weight and hyper-parameters of each method are those of its own paper; ``examples/configs``
records them, with sources, and ``kd_weight`` / ``kd.<name>`` override them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from segkd_examples.config import METHODS

__all__ = [
    "Distiller",
    "ModelInfo",
    "NoDistiller",
    "available_methods",
    "build_distiller",
    "model_info",
]


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What a distiller needs to know about a model to build its trainable parts."""

    num_classes: int
    feature_channels: int
    has_aux: bool


def model_info(model: nn.Module) -> ModelInfo:
    """Read ``num_classes``, ``feature_channels`` and ``has_aux`` from a segmentation model."""
    return ModelInfo(int(model.num_classes), int(model.feature_channels), bool(model.has_aux))


class Outputs(NamedTuple):
    """The fields of ``SegmentationOutput`` a distiller reads (any object with these attributes works)."""

    logits: Tensor
    aux_logits: Tensor | None
    features: Tensor


class Distiller(nn.Module):
    """Base class: ``forward(student_out, teacher_out, labels) -> (weighted_total, terms)``."""

    name = "base"
    #: Whether ``forward`` reads ``features`` (the trainer then keeps them; otherwise only logits matter).
    uses_features = False

    def discriminator(self) -> nn.Module | None:
        """The adversarial discriminator trained by its own optimizer, or ``None``."""
        return None

    def discriminator_loss(self, student: Any, teacher: Any) -> Tensor:  # pragma: no cover - overridden
        """Loss of the discriminator's own update (only for methods with a discriminator)."""
        raise NotImplementedError(f"Method {self.name!r} has no discriminator.")


class NoDistiller(Distiller):
    """``--method none``: no distillation term (the baseline student, or teacher training)."""

    name = "none"

    def forward(self, student: Any, teacher: Any, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return student.logits.new_zeros(()), {}


class _LogitDistiller(Distiller):
    """Weight times a logit-map loss ``loss_fn(student.logits, teacher.logits)``."""

    def __init__(self, name: str, loss: nn.Module, weight: float) -> None:
        super().__init__()
        self.name = name
        self.loss = loss
        self.weight = float(weight)

    def forward(self, student: Any, teacher: Any, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        value = self.weight * self.loss(student.logits.float(), teacher.logits.float())
        return value, {f"kd_{self.name}": value.detach()}

    def extra_repr(self) -> str:
        return f"weight={self.weight}"


def _kwargs(params: Mapping[str, Any], allowed: tuple[str, ...], method: str) -> dict[str, Any]:
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(
            f"Unknown `kd` parameter(s) {unknown} for method {method!r}; expected some of {list(allowed)}."
        )
    return dict(params)


def _build_hwd(weight: float, params: Mapping[str, Any], student: ModelInfo, teacher: ModelInfo) -> Distiller:
    from segkd.losses.hwd import HWDLoss

    kwargs = _kwargs(params, ("tau", "mu", "beta", "distance", "backend"), "hwd")
    return _LogitDistiller("hwd", HWDLoss(**kwargs), weight)


def _build_cwd(weight: float, params: Mapping[str, Any], student: ModelInfo, teacher: ModelInfo) -> Distiller:
    from segkd.losses.cwd import CWDLoss

    kwargs = _kwargs(params, ("tau", "backend"), "cwd")
    return _LogitDistiller("cwd", CWDLoss(**kwargs), weight)


_BUILDERS = {
    "hwd": _build_hwd,
    "cwd": _build_cwd,
}


def available_methods() -> tuple[str, ...]:
    """Methods whose loss can be built in this installation (``none`` always)."""
    names = ["none"]
    for method, builder in _BUILDERS.items():
        try:
            builder(1.0, {}, ModelInfo(2, 4, False), ModelInfo(2, 4, False))
        except ImportError:
            continue
        names.append(method)
    return tuple(names)


def build_distiller(method: str, student_info: ModelInfo, teacher_info: ModelInfo | None, cfg: Any) -> Distiller:
    """Build the distiller of ``method`` with ``cfg.kd_weight`` and the ``cfg.kd`` parameters.

    Args:
        method: one of ``none, hwd, cwd, dist, skd, ifvd, mgd, cirkd``.
        student_info: the student's classes, feature channels and aux head.
        teacher_info: the same for the teacher (``None`` for ``method="none"``).
        cfg: an object with ``kd_weight`` (float) and ``kd`` (mapping of loss parameters).

    Returns:
        The distiller module.

    Raises:
        ValueError: unknown method, unknown ``kd`` parameter, or classes that differ between student and teacher.
        ImportError: the method's loss is not in this segkd installation.
    """
    if method not in METHODS:
        raise ValueError(f"Expected `method` to be one of {', '.join(map(repr, METHODS))}, got {method!r}.")
    if method == "none":
        return NoDistiller()
    if teacher_info is None:
        raise ValueError(f"Method {method!r} needs a teacher.")
    if student_info.num_classes != teacher_info.num_classes:
        raise ValueError(
            f"Expected the student and the teacher to predict the same number of classes, got "
            f"{student_info.num_classes} and {teacher_info.num_classes}."
        )
    if method not in _BUILDERS:
        raise ImportError(f"Method {method!r} is not available in this installation of segkd.")
    weight = float(cfg.kd_weight)
    params = dict(cfg.kd or {})
    return _BUILDERS[method](weight, params, student_info, teacher_info)


def zero_like_loss(reference: Tensor) -> Tensor:
    """A scalar zero on ``reference``'s device, in float32."""
    return torch.zeros((), device=reference.device, dtype=torch.float32)
