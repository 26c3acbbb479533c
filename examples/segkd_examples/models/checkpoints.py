"""Strict, safe loading of segmentation checkpoints and ImageNet backbone weights.

Files are read with ``torch.load(weights_only=True, map_location="cpu")`` (through
:func:`segkd_examples.checkpoint.load_checkpoint`), so a downloaded file cannot run code; a file that needs
pickled Python objects is refused with a message that says why. Keys are then matched *strictly*: any missing
key, unexpected key or shape mismatch raises :class:`CheckpointError` naming the file, the first offending keys
and shapes, and a hint (wrong number of classes, wrong architecture, backbone file given as a full checkpoint).
The only tolerated difference is a missing BatchNorm ``num_batches_tracked`` counter, which checkpoints written
by old PyTorch versions lack and which does not affect the computation (PyTorch itself tolerates it).

Accepted layouts: a plain state dict (what the CIRKD project released: ``torch.save(model.state_dict())``), the
same with a DataParallel/DDP ``module.`` prefix on every key, or a mapping with the state dict under
``"state_dict"`` or ``"model"`` (the pipeline's own ``last.pt`` / ``best.pt``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segkd_examples.checkpoint import CheckpointError, load_checkpoint

from .generations import HEAD_CHANNELS, WIDTH_KEY, infer_generation

__all__ = [
    "CheckpointError",
    "checkpoint_generation",
    "load_backbone_weights",
    "load_checkpoint_into",
    "load_state_into",
]

_SHOW = 5  # how many keys a message lists
_NESTED_KEYS = ("state_dict", "model")
_COUNTER_SUFFIX = "num_batches_tracked"


def _state_dict_from(data: Mapping[str, Any], path: Path, what: str) -> dict[str, torch.Tensor]:
    state: Mapping[str, Any] = data
    for key in _NESTED_KEYS:
        nested = data.get(key)
        if isinstance(nested, Mapping) and not isinstance(nested, torch.Tensor):
            state = nested
            break
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"The {what} {path} is not a state dict of tensors: {len(not_tensors)} entries are not tensors "
            f"(first: {', '.join(map(str, not_tensors[:_SHOW]))}); expected a model state dict, or a mapping "
            f"holding one under {' or '.join(repr(k) for k in _NESTED_KEYS)}."
        )
    if not state:
        raise CheckpointError(f"The {what} {path} holds no tensors.")
    result = {str(k): v for k, v in state.items()}
    if all(k.startswith("module.") for k in result):
        result = {k[len("module.") :]: v for k, v in result.items()}
    return result


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _generation_hint(name: str | None, own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str:
    mine, theirs = own.get(WIDTH_KEY), state.get(WIDTH_KEY)
    if mine is None or theirs is None or mine.shape == theirs.shape or theirs.dim() == 0:
        return ""
    for (model, gen), width in HEAD_CHANNELS.items():
        if model == name and theirs.shape[0] == width:
            return (
                f"the file's head is {width} channels wide, CIRKD's {gen} {name}: build the model with "
                f"generation={gen!r} (the pipeline's `teacher_generation: auto` does it from the file)"
            )
    return ""


def _hints(
    num_classes: int | None,
    own: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    missing: list[str],
    name: str | None = None,
) -> list[str]:
    hints: list[str] = []
    generation = _generation_hint(name, own, state)
    if generation:
        hints.append(generation)
    for key, value in state.items():
        mine = own.get(key)
        if (
            mine is not None
            and num_classes is not None
            and value.dim() == mine.dim() >= 1
            and value.shape != mine.shape
            and mine.shape[0] == num_classes
            and value.shape[1:] == mine.shape[1:]
        ):
            hints.append(
                f"the checkpoint's classifier `{key}` has {value.shape[0]} classes but the model was built with "
                f"num_classes={num_classes}: use the dataset (or num_classes) the checkpoint was trained for"
            )
            break
    common = set(own) & set(state)
    if own and len(common) < len(own) // 2:
        prefixes = sorted({k.split(".", 1)[0] + "." for k in state})
        bare_backbone = any(k.startswith(("layer1.", "features.")) for k in state) and not any(
            k.startswith("pretrained.") for k in state
        )
        if bare_backbone and any(k.startswith("pretrained.") for k in own):
            hints.append(
                "this looks like ImageNet backbone weights (no `pretrained.` prefix, no head): load them with "
                "load_backbone_weights / build_model(..., backbone_weights=...) instead"
            )
        else:
            hints.append(
                f"only {len(common)} of the model's {len(own)} keys are in the file (its top-level prefixes: "
                f"{', '.join(prefixes[:8])}): it is probably a checkpoint of a different architecture"
            )
    elif missing and all(k.startswith("auxlayer.") for k in missing):
        hints.append("only the auxiliary head `auxlayer.*` is missing: the checkpoint was saved without aux head")
    return hints


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], *, path: Path, what: str, label: str) -> None:
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.endswith(_COUNTER_SUFFIX)]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {', '.join(missing[:_SHOW])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:_SHOW])})")
        if mismatched:
            shown = "; ".join(f"{k}: file {_shape(state[k])} vs model {_shape(own[k])}" for k in mismatched[:_SHOW])
            parts.append(f"{len(mismatched)} shape mismatches (first: {shown})")
        hints = _hints(getattr(module, "num_classes", None), own, state, missing, getattr(module, "name", None))
        message = f"The {what} {path} does not match {label}: " + "; ".join(parts) + "."
        if hints:
            message += " Hint: " + "; ".join(hints) + "."
        raise CheckpointError(message)
    for key, value in own.items():  # counters absent from old checkpoints keep the model's value
        if key not in state:
            state[key] = value
    with torch.no_grad():
        module.load_state_dict(state, strict=True)


def _label(model: nn.Module) -> str:
    name = getattr(model, "name", type(model).__name__)
    num_classes = getattr(model, "num_classes", None)
    return f"the model {name}" + (f" ({num_classes} classes)" if num_classes is not None else "")


def load_checkpoint_into(model: nn.Module, path: str | os.PathLike[str], *, what: str) -> None:
    """Load a whole-model checkpoint (e.g. a CIRKD teacher) into ``model``, strictly.

    Args:
        model: a model from :func:`~segkd_examples.models.build_model` (or any ``nn.Module``).
        path: the file: a state dict in the CIRKD layout (``pretrained.*``, ``head.*``, ``auxlayer.*``),
            optionally with a ``module.`` prefix on every key or nested under ``"state_dict"`` / ``"model"``.
        what: what the file is for, used in messages (``"teacher checkpoint"``).

    Raises:
        CheckpointError: the file is missing, empty, truncated or corrupt; it needs pickled Python objects
            (refused because loading it could run arbitrary code); it holds non-tensor entries; or its keys or
            shapes do not match the model (the message lists the first missing / unexpected keys and shape
            mismatches, and hints at a wrong number of classes or a wrong architecture).
    """
    path = Path(path)
    load_state_into(model, load_checkpoint(path, what=what), path=path, what=what)


def load_state_into(model: nn.Module, data: Mapping[str, Any], *, path: str | os.PathLike[str], what: str) -> None:
    """Load the already-read contents of a whole-model checkpoint into ``model``, strictly.

    What :func:`load_checkpoint_into` does after reading the file, for callers that have read it already
    (with :func:`segkd_examples.checkpoint.load_checkpoint`) to look at its other entries.

    Args:
        model: a model from :func:`~segkd_examples.models.build_model` (or any ``nn.Module``).
        data: the mapping read from ``path``, in any layout :func:`load_checkpoint_into` accepts.
        path: the file it was read from, for messages.
        what: what the file is for, used in messages.

    Raises:
        CheckpointError: non-tensor entries, or keys or shapes that do not match the model.
    """
    path = Path(path)
    _load_strict(model, _state_dict_from(data, path, what), path=path, what=what, label=_label(model))


def checkpoint_generation(
    name: str, data: Mapping[str, Any], *, path: str | os.PathLike[str], what: str = "checkpoint"
) -> str:
    """The CIRKD generation (``"2022"`` or ``"2025"``) of model ``name`` that a checkpoint's weights fit.

    Read from the head width (:func:`~segkd_examples.models.generations.infer_generation`), in any layout
    :func:`load_checkpoint_into` accepts (so also the pipeline's own ``best.pt``).

    Args:
        name: the model the weights are for.
        data: the mapping read from ``path`` (:func:`segkd_examples.checkpoint.load_checkpoint`).
        path: the file, for messages.
        what: what the file is for, used in messages.

    Raises:
        CheckpointError: non-tensor entries, or a head width that is neither generation's.
    """
    path = Path(path)
    return infer_generation(name, _state_dict_from(data, path, what), source=f"The {what} {path}")


def load_backbone_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load ImageNet weights into the backbone (``model.pretrained``) of a segmentation model, strictly.

    The CIRKD project's ImageNet files (``resnet18-imagenet.pth``, ``resnet101-imagenet.pth``,
    ``mobilenetv2-imagenet.pth``) hold the classification network without any prefix; their classifier
    (``fc.*`` for ResNets; ``features.18.*`` and ``classifier.*`` for MobileNetV2) has no counterpart in a
    segmentation backbone and is set aside by name. Every other key must match.

    Args:
        model: a model from :func:`~segkd_examples.models.build_model` with a ResNet or MobileNetV2 backbone.
        path: the ImageNet weights file.

    Raises:
        ValueError: ``model`` has no backbone with ImageNet weights (the tiny models).
        CheckpointError: unreadable, unsafe or mismatching file, as for :func:`load_checkpoint_into`.
    """
    backbone = getattr(model, "pretrained", None)
    prefixes = getattr(backbone, "imagenet_only_prefixes", ())
    if backbone is None or not hasattr(backbone, "imagenet_module") or not prefixes:
        raise ValueError(
            f"The model {getattr(model, 'name', type(model).__name__)} has no backbone with ImageNet weights; "
            "only the ResNet and MobileNetV2 models accept `backbone_weights`."
        )
    path = Path(path)
    what = "ImageNet backbone weights"
    state = _state_dict_from(load_checkpoint(path, what=what), path, what)
    if any(k.startswith(("pretrained.", "head.")) for k in state):
        raise CheckpointError(
            f"The {what} {path} is a whole segmentation checkpoint (keys such as `pretrained.*`, `head.*`), not an "
            "ImageNet backbone file; load it with load_checkpoint_into (the teacher/resume checkpoint options)."
        )
    state = {k: v for k, v in state.items() if not k.startswith(prefixes)}
    target = backbone.imagenet_module()
    _load_strict(target, state, path=path, what=what, label=f"the {type(backbone).__name__} backbone")
