"""Training configuration: one flat dataclass, loaded from YAML, overridden by flags and ``--set key=value``.

Precedence, lowest first: the dataclass defaults, the YAML file (``--config``), the named command-line
flags (``--lr 0.02``), then ``--set key=value`` pairs (``--set kd.tau=2``). The resolved result is written
to ``<out>/config.yaml`` so that every run records exactly what it did.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from .data.transforms import scale_steps

__all__ = [
    "AMP_MODES",
    "EVAL_MODES",
    "MIOU_CLASSES",
    "METHODS",
    "PAIR_KEYS",
    "ConfigError",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "parse_override",
]

#: Keys that hold a pair (``[height, width]`` or ``[low, high]``); one number stands for both.
PAIR_KEYS = ("crop_size", "eval_crop", "eval_stride", "scale_range")
METHODS = ("none", "hwd", "cwd", "dist", "skd", "ifvd", "mgd", "cirkd")
AMP_MODES = ("none", "bf16", "fp16")
EVAL_MODES = ("whole", "slide")
MIOU_CLASSES = ("present", "all")


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message names the key."""


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a training run (see ``docs/pipeline.md`` for the meaning of each key)."""

    # data
    dataset: str = "synthetic"
    data_root: str | None = None
    crop_size: list[int] = dataclasses.field(default_factory=lambda: [512, 512])
    scale_range: list[float] = dataclasses.field(default_factory=lambda: [0.5, 2.0])
    scale_step: float | None = None  # None: continuous random scale; 0.1: the authors' {0.5, 0.6, ..., 2.0}
    flip: bool = True
    workers: int | None = None  # per rank; None: min(4, usable CPUs // processes on this machine)
    synthetic_length: int = 64
    synthetic_val_length: int = 16
    synthetic_size: int = 64
    synthetic_classes: int = 8
    cocostuff_classes: int = 171  # 171 (mmsegmentation train ids) or 182 (raw ids, as the CIRKD/HWD code)
    label_out_of_range: str = "error"  # "error" or "ignore" (count such pixels as ignore_index)
    # models
    student: str = "deeplabv3_r18"
    teacher: str = "deeplabv3_r101"
    teacher_ckpt: str | None = None
    teacher_generation: str = "auto"  # CIRKD code generation of teacher_ckpt: "auto" (from the file), "2022", "2025"
    student_pretrained: str | None = None
    train_teacher: bool = False
    channels_last: bool = False
    sync_bn: bool = True
    # distillation
    method: str = "none"
    kd_weight: float | None = None  # None: the method's paper weight (segkd_examples.methods.PAPER_DEFAULTS)
    kd: dict[str, Any] = dataclasses.field(default_factory=dict)
    # optimisation
    max_iters: int = 40000
    batch_size: int = 8  # global, split over ranks
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    aux_weight: float = 0.4
    amp: str = "none"
    grad_clip: float | None = None
    # evaluation
    eval_every: int = 4000
    miou_classes: str = "present"  # mean over "present" classes (mmsegmentation) or "all" bins, empty = 0 (CIRKD)
    align_corners: bool = False  # bilinear upsampling of logits (CE and evaluation); the HWD/CIRKD code uses true
    eval_mode: str = "whole"
    eval_cache: bool = False  # decode this rank's validation images once and keep them in memory (evalcache.py)
    eval_crop: list[int] | None = None
    eval_stride: list[int] | None = None
    max_eval_images: int | None = None
    # run
    out: str = "runs/default"
    resume: str | None = None  # a checkpoint path, or "auto" for <out>/last.pt when it exists
    ckpt_every: int | None = None  # default: eval_every
    log_every: int = 50
    seed: int = 0
    deterministic: bool = False
    dist_timeout: float = 1800.0
    progress: bool = True
    tensorboard: bool = False

    def validate(self) -> TrainConfig:
        """Check cross-field constraints; return ``self``.

        Raises:
            ConfigError: naming the key and the bad value.
        """
        _choice("method", self.method, METHODS)
        _choice("amp", self.amp, AMP_MODES)
        _choice("eval_mode", self.eval_mode, EVAL_MODES)
        _choice("label_out_of_range", self.label_out_of_range, ("error", "ignore"))
        _choice("teacher_generation", self.teacher_generation, ("auto", "2022", "2025"))
        _choice("miou_classes", self.miou_classes, MIOU_CLASSES)
        if self.cocostuff_classes not in (171, 182):
            raise ConfigError(f"Expected `cocostuff_classes` to be 171 or 182, got {self.cocostuff_classes}.")
        for key in ("max_iters", "batch_size", "eval_every", "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"Expected `{key}` to be >= 1, got {getattr(self, key)}.")
        if self.ckpt_every is not None and self.ckpt_every < 1:
            raise ConfigError(f"Expected `ckpt_every` to be >= 1 or null, got {self.ckpt_every}.")
        if self.kd_weight is not None and not (math.isfinite(self.kd_weight) and self.kd_weight >= 0):
            raise ConfigError(f"Expected `kd_weight` to be a finite number >= 0 or null, got {self.kd_weight}.")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"Expected `workers` to be >= 0 or null (the machine's default), got {self.workers}.")
        for key in ("lr", "dist_timeout"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"Expected `{key}` to be a finite number > 0, got {value}.")
        for key in ("crop_size", "eval_crop", "eval_stride"):
            value = getattr(self, key)
            if value is not None and (len(value) != 2 or min(value) < 1):
                raise ConfigError(
                    f"Expected `{key}` to be one positive int (a square) or two [height, width], got {value}."
                )
        if len(self.scale_range) != 2 or not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ConfigError(f"Expected `scale_range` to be [low, high] with 0 < low <= high, got {self.scale_range}.")
        if self.scale_step is not None:
            try:
                scale_steps(self.scale_range, self.scale_step)
            except ValueError as error:
                raise ConfigError(str(error)) from None
        if self.eval_mode == "slide" and self.eval_crop is None:
            raise ConfigError("`eval_mode: slide` needs `eval_crop` (the window size, e.g. [512, 512]).")
        if self.train_teacher and self.method != "none":
            raise ConfigError(
                f"`train_teacher: true` trains the teacher alone; expected `method: none`, got {self.method!r}."
            )
        return self

    @property
    def checkpoint_every(self) -> int:
        """Iterations between two writes of ``last.pt``."""
        return self.ckpt_every if self.ckpt_every is not None else self.eval_every


def _choice(key: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"Expected `{key}` to be one of {', '.join(map(repr, choices))}, got {value!r}.")


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def _strip_optional(hint: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return hint, False


def _coerce(key: str, value: Any) -> Any:
    """Convert ``value`` (from YAML or a ``--set`` string) to the declared type of ``key``."""
    hint, optional = _strip_optional(_HINTS[key])
    if value is None:
        if optional:
            return None
        raise ConfigError(f"`{key}` cannot be null.")
    origin = typing.get_origin(hint)
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in {"true", "1", "yes", "on", "false", "0", "no", "off"}:
                return value.lower() in {"true", "1", "yes", "on"}
            raise ConfigError(f"Expected `{key}` to be true or false, got {value!r}.")
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ConfigError(f"Expected `{key}` to be an int, got {value!r}.")
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ConfigError(f"Expected `{key}` to be a number, got {value!r}.")
            return float(value)
        if hint is str:
            return str(value)
        if origin is list:
            (item,) = typing.get_args(hint)
            if isinstance(value, str):
                value = yaml.safe_load(value if value.startswith("[") else f"[{value}]")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = [value]
            values = [item(v) for v in value]
            if key in PAIR_KEYS and len(values) == 1:
                values = values * 2  # one number means a square crop/window (or a fixed scale)
            return values
        if origin is dict:
            if not isinstance(value, Mapping):
                raise ConfigError(f"Expected `{key}` to be a mapping, got {value!r}.")
            return dict(value)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"Cannot read `{key}` = {value!r} as {hint}: {exc}") from None
    return value


def config_from_dict(values: Mapping[str, Any], *, source: str = "config") -> TrainConfig:
    """Build a :class:`TrainConfig` from a mapping, rejecting unknown keys.

    Raises:
        ConfigError: unknown key (with the nearest known names) or a value of the wrong type.
    """
    cfg = TrainConfig()
    for key, value in values.items():
        if key not in _FIELDS:
            close = [k for k in _FIELDS if k.split("_")[0] == str(key).split("_")[0]]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"Unknown key `{key}` in {source}{hint}.")
        setattr(cfg, key, _coerce(key, value))
    return cfg


def load_config(path: str | Path) -> TrainConfig:
    """Read a YAML config file (a flat mapping of :class:`TrainConfig` keys).

    Raises:
        ConfigError: missing file, not a mapping, unknown key or bad value; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist.")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"Expected {path} to hold a mapping of config keys, got {type(data).__name__}.")
    return config_from_dict(data, source=str(path))


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``"key=value"`` (``value`` parsed as YAML, so ``1e-3``, ``true``, ``[512, 1024]`` work).

    Raises:
        ConfigError: no ``=`` in ``text``.
    """
    if "=" not in text:
        raise ConfigError(f"Expected --set KEY=VALUE, got {text!r}.")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    return key.strip(), value


def apply_overrides(cfg: TrainConfig, overrides: Iterable[str | tuple[str, Any]]) -> TrainConfig:
    """Apply ``key=value`` overrides in order; ``kd.NAME=value`` sets one distillation parameter.

    Raises:
        ConfigError: unknown key or bad value.
    """
    for item in overrides:
        key, value = parse_override(item) if isinstance(item, str) else item
        if key.startswith("kd."):
            cfg.kd = {**cfg.kd, key[3:]: value}
            continue
        if key not in _FIELDS:
            raise ConfigError(f"Unknown key `{key}` in --set {key}=...")
        setattr(cfg, key, _coerce(key, value))
    return cfg


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain ``dict`` of the config (YAML- and ``torch.load(weights_only=True)``-safe)."""
    return dataclasses.asdict(cfg)
