"""Distillation methods for the training loop: one :class:`Distiller` per ``--method``.

A distiller takes the student's and the teacher's :class:`SegmentationOutput` (``logits``, ``aux_logits``,
``features``, all at 1/8 resolution) and the labels, and returns ``(weighted_kd_total, terms)`` where
``terms`` maps a short name to each weighted part (for logging). Its trainable parts (MGD generator,
CIRKD projection heads) are its own parameters: the trainer puts them in the optimizer, the checkpoint and
DDP. An adversarial method (SKD, IFVD) also exposes a discriminator with its own optimizer, kept out of DDP's
reducer and synchronised by an explicit gradient all-reduce (see ``engine.py``).

The default weight and hyper-parameters of each method are those the HWD authors' scripts ran for the paper's
Table II (github.com/zju-SWJ/HWD, ``train_<method>.py``); ``examples/configs`` records them, with sources, and
``kd_weight`` / ``kd.<name>`` override them.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from segkd_examples.config import METHODS, ConfigError

__all__ = [
    "Distiller",
    "ModelInfo",
    "NoDistiller",
    "available_methods",
    "HWD_MU",
    "MGD_RECIPES",
    "PAPER_DEFAULTS",
    "DISCRIMINATOR_SWITCHES",
    "build_distiller",
    "check_input_size",
    "resolve_kd",
    "model_info",
]


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What a distiller needs to know about a model to build its trainable parts."""

    num_classes: int
    feature_channels: int
    has_aux: bool
    backbone_channels: int = 0


def model_info(model: nn.Module) -> ModelInfo:
    """Read ``num_classes``, ``feature_channels``, ``has_aux`` and ``backbone_channels`` from a segmentation model."""
    attrs: Any = model
    return ModelInfo(
        int(attrs.num_classes),
        int(attrs.feature_channels),
        bool(attrs.has_aux),
        int(getattr(attrs, "backbone_channels", 0)),
    )


class Distiller(nn.Module):
    """Base class: ``forward(student_out, teacher_out, labels) -> (weighted_total, terms)``."""

    name = "base"
    #: Whether ``forward`` reads ``features`` (the trainer then keeps them; otherwise only logits matter).
    uses_features = False

    def discriminator(self) -> nn.Module | None:
        """The adversarial discriminator trained by its own optimizer, or ``None``."""
        return None

    def discriminator_optimizer(self) -> torch.optim.Optimizer | None:
        """The discriminator's own optimiser, or ``None``."""
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
        raise ConfigError(
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


class _BundleDistiller(Distiller):
    """A segkd loss that takes logits, features (and labels) and returns ``(total, weighted terms)``."""

    uses_features = True

    def __init__(
        self, name: str, loss: nn.Module, weight: float, *, keep_for_discriminator: bool = False, labels: bool = True
    ) -> None:
        super().__init__()
        self.name = name
        self.pass_labels = labels
        self.loss = loss
        self.weight = float(weight)
        self._keep = keep_for_discriminator
        self.last_outputs: tuple[Tensor, Tensor] | None = None

    def forward(self, student: Any, teacher: Any, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        s_logits, t_logits = student.logits.float(), teacher.logits.float()
        features = (student.features.float(), teacher.features.float())
        total, parts = self.loss(s_logits, t_logits, *features, labels if self.pass_labels else None)
        if self._keep:
            self.last_outputs = (s_logits.detach(), t_logits.detach())
        terms = {f"kd_{self.name}_{k}": v.detach() for k, v in parts.items()}
        value = self.weight * total
        terms[f"kd_{self.name}"] = value.detach()
        return value, terms

    def extra_repr(self) -> str:
        return f"weight={self.weight}"


class _AdversarialParts:
    """The discriminator's own optimiser, shared by SKD and IFVD (HWD ``train_skd.py`` / ``train_ifvd.py``).

    Adam at ``disc_lr`` with ``disc_betas`` (the authors': lr 4e-4, betas (0.9, 0.99)); the trainer decays
    its learning rate with the student's poly schedule and synchronises its BatchNorm under DDP.
    """

    disc_lr: float
    disc_betas: tuple[float, float]

    def _set_disc_optimiser(self, disc_lr: float, disc_betas: Any) -> None:
        self.disc_lr = float(disc_lr)
        self.disc_betas = (float(disc_betas[0]), float(disc_betas[1]))

    def _adam(self, disc: nn.Module) -> torch.optim.Optimizer:
        params = [p for p in disc.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.disc_lr, betas=self.disc_betas)


class _SKDDistiller(_AdversarialParts, _BundleDistiller):
    """SKD: pair-wise + pixel-wise + adversarial terms; the discriminator has its own Adam optimiser."""

    def __init__(self, loss: nn.Module, weight: float, *, disc_lr: float, disc_betas: tuple[float, float]) -> None:
        # No label mask on the pixel-wise term, as in the SKD/CIRKD code.
        super().__init__("skd", loss, weight, keep_for_discriminator=True, labels=False)
        self._set_disc_optimiser(disc_lr, disc_betas)

    def discriminator(self) -> nn.Module | None:
        loss: Any = self.loss
        return loss.discriminator

    def discriminator_optimizer(self) -> torch.optim.Optimizer | None:
        """Adam over the discriminator's parameters (HWD ``train_skd.py``: lr 4e-4, betas (0.9, 0.99))."""
        loss: Any = self.loss
        return self._adam(loss.discriminator)

    def discriminator_loss(self, student: Any, teacher: Any) -> Tensor:
        loss: Any = self.loss
        return self.weight * loss.discriminator_loss(student, teacher)


class _IFVDDistiller(_AdversarialParts, Distiller):
    r"""IFVD as HWD's ``train_ifvd.py`` runs it: pixel KD + IFV + adversarial, discriminator trained apart.

    .. math::

        L = \lambda\,\big(w_{kd}\,\mathrm{KD}_\tau(z_S, z_T) + w_{ifv}\,\mathrm{IFV}(f_S, f_T, y)
            + w_{adv}\,(-\overline{D(z_S)})\big), \qquad
        L_D = \lambda\,w_d\,\big(\overline{\max(0, 1 - D(z_T))} + \overline{\max(0, 1 + D(z_S))}\big)

    on the main logits ``z`` (pixel KD over all pixels, no label mask, and the discriminator) and the
    pre-classifier features ``f`` (IFV, labels resampled to the feature size). Logged: the unweighted
    ``kd_ifvd_pixel``, ``kd_ifvd_ifv``, ``kd_ifvd_adversarial`` and the weighted total ``kd_ifvd``.
    """

    name = "ifvd"
    uses_features = True

    def __init__(
        self,
        num_classes: int,
        weight: float,
        *,
        pixel_weight: float,
        ifv_weight: float,
        adversarial_weight: float,
        discriminator_weight: float,
        tau: float,
        ignore_index: int,
        conv_dim: int,
        preprocess: str,
        spectral_norm: bool,
        disc_lr: float,
        disc_betas: tuple[float, float],
    ) -> None:
        from segkd.losses.adversarial import SKDDiscriminator
        from segkd.losses.ifvd import IFVDLoss
        from segkd.losses.kd import KDLoss

        super().__init__()
        self.weight = float(weight)
        self.pixel_weight = float(pixel_weight)
        self.ifv_weight = float(ifv_weight)
        self.adversarial_weight = float(adversarial_weight)
        self.discriminator_weight = float(discriminator_weight)
        self.pixel = KDLoss(tau)
        self.ifv = IFVDLoss(num_classes, ignore_index)
        self.critic = SKDDiscriminator(num_classes, conv_dim, preprocess, spectral_norm)  # type: ignore[arg-type]
        self._set_disc_optimiser(disc_lr, disc_betas)
        self.last_outputs: tuple[Tensor, Tensor] | None = None

    def forward(self, student: Any, teacher: Any, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        from segkd.losses.adversarial import skd_generator_hinge_loss

        s_logits, t_logits = student.logits.float(), teacher.logits.float()
        zero = s_logits.new_zeros(())
        pixel = self.pixel(s_logits, t_logits) if self.pixel_weight else zero
        ifv = self.ifv(student.features.float(), teacher.features.float(), labels) if self.ifv_weight else zero
        adversarial = skd_generator_hinge_loss(self.critic(s_logits)).float() if self.adversarial_weight else zero
        total = self.weight * (
            self.pixel_weight * pixel + self.ifv_weight * ifv + self.adversarial_weight * adversarial
        )
        self.last_outputs = (s_logits.detach(), t_logits.detach())
        terms = {"kd_ifvd_pixel": pixel.detach(), "kd_ifvd_ifv": ifv.detach()}
        terms["kd_ifvd_adversarial"] = adversarial.detach()
        terms["kd_ifvd"] = total.detach()
        return total, terms

    def discriminator(self) -> nn.Module | None:
        return self.critic

    def discriminator_optimizer(self) -> torch.optim.Optimizer | None:
        """Adam over the discriminator's parameters (HWD ``train_ifvd.py``: lr 4e-4, betas (0.9, 0.99))."""
        return self._adam(self.critic)

    def discriminator_loss(self, student: Tensor, teacher: Tensor) -> Tensor:
        """``weight * discriminator_weight * hinge`` on detached logits, student scored first as in the HWD code."""
        from segkd.losses.adversarial import skd_discriminator_hinge_loss

        if self.discriminator_weight == 0:
            return student.new_zeros(())
        fake = self.critic(student.detach())
        real = self.critic(teacher.detach())
        return self.weight * self.discriminator_weight * skd_discriminator_hinge_loss(real, fake)

    def extra_repr(self) -> str:
        return (
            f"weight={self.weight}, pixel_weight={self.pixel_weight}, ifv_weight={self.ifv_weight}, "
            f"adversarial_weight={self.adversarial_weight}, discriminator_weight={self.discriminator_weight}"
        )


def _build_dist(weight: float, params: Mapping[str, Any], student: ModelInfo, teacher: ModelInfo) -> Distiller:
    from segkd.losses.dist import DISTLoss

    kwargs = _kwargs(params, ("beta", "gamma", "tau", "softmax"), "dist")
    return _LogitDistiller("dist", DISTLoss(**kwargs), weight)


_IFVD_DEFAULTS: dict[str, Any] = {
    "pixel_weight": 1.0,
    "ifv_weight": 20.0,
    "adversarial_weight": 0.001,
    "discriminator_weight": 0.1,
    "tau": 1.0,
    "ignore_index": 255,
    "conv_dim": 64,
    "preprocess": "batchnorm",
    "spectral_norm": True,
    "disc_lr": 4e-4,
    "disc_betas": (0.9, 0.99),
}


def _build_ifvd(weight: float, params: Mapping[str, Any], student: ModelInfo, teacher: ModelInfo) -> Distiller:
    kwargs = {**_IFVD_DEFAULTS, **_kwargs(params, tuple(_IFVD_DEFAULTS), "ifvd")}
    kwargs["disc_betas"] = tuple(kwargs["disc_betas"])
    return _IFVDDistiller(student.num_classes, weight, **kwargs)


#: MGD's two recipes: which feature it distils and the weight of a CWD term on the logits (tau ``logit_tau``).
MGD_RECIPES: dict[str, dict[str, Any]] = {
    # HWD code, train_mgd.py:206: the MGD term alone on the pre-classifier feature (s_outputs[-1]).
    "hwd": {"feature": "head", "logit_weight": 0.0, "logit_tau": 4.0},
    # MGD code (yzd-v/MGD), seg/mmseg/distillation/distillers/segmentation_distiller.py:118-130: the backbone's
    # last stage (student_feat[-1]) plus 3 x channel-wise KD on the logits at tau 4.
    "paper": {"feature": "backbone", "logit_weight": 3.0, "logit_tau": 4.0},
}


class _MGDDistiller(Distiller):
    r"""MGD: :math:`\lambda\,(L_{MGD}(f_S, f_T) + w_{logit}\,L_{CWD}(z_S, z_T))`; the generator trains with the student.

    ``feature="head"`` reads the pre-classifier features, ``"backbone"`` the backbone's last stage; with
    ``logit_weight > 0`` the unweighted parts are logged as ``kd_mgd_feature`` and ``kd_mgd_cwd``.
    """

    name = "mgd"
    uses_features = True

    def __init__(
        self,
        student: ModelInfo,
        teacher: ModelInfo,
        weight: float,
        *,
        alpha: float = 2e-5,
        mask_ratio: float = 0.75,
        feature: str = "head",
        logit_weight: float = 0.0,
        logit_tau: float = 4.0,
    ) -> None:
        from segkd.losses.cwd import CWDLoss
        from segkd.losses.mgd import MGDLoss

        super().__init__()
        if feature not in ("head", "backbone"):
            raise ValueError(f"Expected `kd.feature` to be 'head' or 'backbone', got {feature!r}.")
        channels = (
            (student.feature_channels, teacher.feature_channels)
            if feature == "head"
            else (student.backbone_channels, teacher.backbone_channels)
        )
        self.weight = float(weight)
        self.feature = feature
        self.logit_weight = float(logit_weight)
        self.loss = MGDLoss(*channels, alpha=alpha, mask_ratio=mask_ratio)
        self.logit = CWDLoss(tau=logit_tau) if self.logit_weight else None

    def _features(self, out: Any) -> Tensor:
        feat = out.features if self.feature == "head" else out.backbone_features
        return feat.float()

    def forward(self, student: Any, teacher: Any, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        feature = self.loss(self._features(student), self._features(teacher))
        total, terms = feature, {}
        if self.logit is not None:
            logit = self.logit(student.logits.float(), teacher.logits.float())
            total = total + self.logit_weight * logit
            terms = {"kd_mgd_feature": feature.detach(), "kd_mgd_cwd": logit.detach()}
        value = self.weight * total
        terms["kd_mgd"] = value.detach()
        return value, terms

    def extra_repr(self) -> str:
        return f"weight={self.weight}, feature={self.feature!r}, logit_weight={self.logit_weight}"


def _build_mgd(weight: float, params: Mapping[str, Any], student: ModelInfo, teacher: ModelInfo) -> Distiller:
    kwargs = _kwargs(params, ("alpha", "mask_ratio", "recipe", "feature", "logit_weight", "logit_tau"), "mgd")
    recipe = kwargs.pop("recipe", "hwd")
    if recipe not in MGD_RECIPES:
        raise ValueError(f"Expected `kd.recipe` to be one of {', '.join(map(repr, MGD_RECIPES))}, got {recipe!r}.")
    settings = {**MGD_RECIPES[recipe], **kwargs}
    return _MGDDistiller(student, teacher, weight, **settings)


_SKD_KEYS = (
    "pairwise_weight",
    "pixel_weight",
    "adversarial_weight",
    "discriminator_weight",
    "pool",
    "tau",
    "ignore_index",
    "conv_dim",
    "preprocess",
    "spectral_norm",
)


def _build_skd(weight: float, params: Mapping[str, Any], student: ModelInfo, teacher: ModelInfo) -> Distiller:
    from segkd.losses.skd import SKDLoss

    kwargs = _kwargs(params, (*_SKD_KEYS, "disc_lr", "disc_betas"), "skd")
    disc_lr = kwargs.pop("disc_lr", 4e-4)
    disc_betas = tuple(kwargs.pop("disc_betas", (0.9, 0.99)))
    return _SKDDistiller(SKDLoss(student.num_classes, **kwargs), weight, disc_lr=disc_lr, disc_betas=disc_betas)


_CIRKD_KEYS = (
    "kd_weight",
    "minibatch_weight",
    "memory_pixel_weight",
    "memory_region_weight",
    "kd_tau",
    "contrast_tau",
    "contrast_kd_tau",
    "minibatch_pool",
    "pixel_memory_size",
    "region_memory_size",
    "pixel_contrast_size",
    "region_contrast_size",
    "ignore_index",
    "pixel_update_freq",
)


def _build_cirkd(weight: float, params: Mapping[str, Any], student: ModelInfo, teacher: ModelInfo) -> Distiller:
    from segkd.losses.cirkd import CIRKDLoss

    kwargs = _kwargs(params, _CIRKD_KEYS, "cirkd")
    loss = CIRKDLoss(student.num_classes, student.feature_channels, teacher.feature_channels, **kwargs)
    return _BundleDistiller("cirkd", loss, weight)


_BUILDERS = {
    "hwd": _build_hwd,
    "cwd": _build_cwd,
    "dist": _build_dist,
    "skd": _build_skd,
    "ifvd": _build_ifvd,
    "mgd": _build_mgd,
    "cirkd": _build_cirkd,
}


#: Each method's loss weight (lambda) and loss parameters as the HWD authors' training scripts ran them for Table II
#: (github.com/zju-SWJ/HWD, ``train_<method>.py``); the sources are named in examples/configs/generate.py, which
#: writes these values into every config.
PAPER_DEFAULTS: dict[str, tuple[float, dict[str, Any]]] = {
    "none": (0.0, {}),
    "hwd": (3.0, {"tau": 4.0, "beta": 0.1}),  # mu: per dataset, HWD_MU
    "cwd": (3.0, {"tau": 4.0}),
    "dist": (1.0, {"beta": 1.0, "gamma": 1.0, "tau": 1.0, "softmax": False}),
    "skd": (
        1.0,
        {
            "pairwise_weight": 10.0,
            "pixel_weight": 1.0,
            "adversarial_weight": 0.001,
            "discriminator_weight": 0.1,
            "disc_lr": 0.0004,
            "disc_betas": [0.9, 0.99],
        },
    ),
    "ifvd": (
        1.0,
        {
            "pixel_weight": 1.0,
            "ifv_weight": 20.0,
            "adversarial_weight": 0.001,
            "discriminator_weight": 0.1,
            "disc_lr": 0.0004,
            "disc_betas": [0.9, 0.99],
        },
    ),
    "mgd": (1.0, {"alpha": 2.0e-5, "mask_ratio": 0.75}),
    "cirkd": (
        1.0,
        {"kd_weight": 1.0, "minibatch_weight": 1.0, "memory_pixel_weight": 0.1, "memory_region_weight": 0.1},
    ),
}
#: HWD's mu per dataset (HWD paper, Table I); the synthetic demo uses Cityscapes' value.
HWD_MU = {"cityscapes": 1.0, "ade20k": 0.0, "cocostuff": 0.1, "synthetic": 1.0}


def resolve_kd(
    method: str, dataset: str, kd_weight: float | None, kd: Mapping[str, Any] | None
) -> tuple[float, dict[str, Any]]:
    """The KD weight and loss parameters of a run: the paper's defaults, overridden by the config's values.

    ``kd_weight=None`` means the method's paper weight; ``kd`` entries replace the default parameters one by one.
    """
    if method not in PAPER_DEFAULTS:
        raise ConfigError(f"Expected `method` to be one of {', '.join(map(repr, METHODS))}, got {method!r}.")
    weight, params = PAPER_DEFAULTS[method]
    params = dict(params)
    if method == "hwd":
        params["mu"] = HWD_MU.get(dataset, 0.0)
    params.update(kd or {})
    return (weight if kd_weight is None else float(kd_weight)), params


_MODULES = {
    "hwd": "segkd.losses.hwd",
    "cwd": "segkd.losses.cwd",
    "dist": "segkd.losses.dist",
    "skd": "segkd.losses.skd",
    "ifvd": "segkd.losses.ifvd",
    "mgd": "segkd.losses.mgd",
    "cirkd": "segkd.losses.cirkd",
}


#: Methods with an adversarial discriminator, and the ``kd`` parameters that switch it on when non-zero.
DISCRIMINATOR_SWITCHES = {"skd": ("adversarial_weight", "discriminator_weight")}


def check_input_size(cfg: Any) -> None:
    """Refuse, before anything is built, a method whose discriminator cannot take this run's logits.

    SKD's discriminator (:class:`segkd.losses.adversarial.SKDDiscriminator`) needs logits of at least 64 x 64; the
    models give ``ceil(side / 8)`` logits per side of the training images (``synthetic_size`` for the synthetic
    data, ``crop_size`` otherwise). The message names the sizes and a command line that works.

    Args:
        cfg: an object with ``method``, ``dataset``, ``kd_weight``, ``kd``, ``crop_size`` and ``synthetic_size``.

    Raises:
        ConfigError: the discriminator is on (a non-zero ``adversarial_weight`` or ``discriminator_weight``) and
            the logits would be smaller than it needs.
    """
    switches = DISCRIMINATOR_SWITCHES.get(cfg.method)
    if switches is None:
        return
    _, params = resolve_kd(cfg.method, cfg.dataset, cfg.kd_weight, cfg.kd)
    active = {key: params[key] for key in switches if params.get(key)}
    if not active:
        return
    from segkd.losses.adversarial import SKDDiscriminator
    from segkd_examples.models.segmentation import OUTPUT_STRIDE

    need = SKDDiscriminator.MIN_SIZE
    synthetic = cfg.dataset == "synthetic"
    height, width = (cfg.synthetic_size, cfg.synthetic_size) if synthetic else tuple(cfg.crop_size)
    logits = (math.ceil(height / OUTPUT_STRIDE), math.ceil(width / OUTPUT_STRIDE))
    if min(logits) >= need:
        return
    side = need * OUTPUT_STRIDE
    switched_on = ", ".join(f"{key} {value}" for key, value in active.items())
    off = " ".join(f"--set kd.{key}=0" for key in switches)
    if synthetic:
        what, grow = f"synthetic images of {height} px give", f"--set synthetic_size={side}"
        example = f"python examples/train_ddp.py --config examples/configs/synthetic_skd.yaml {grow} " + " ".join(
            f"--set kd.{key}={PAPER_DEFAULTS['skd'][1][key]}" for key in switches
        )
    else:
        new_height, new_width = max(side, height), max(side, width)
        crop = str(new_height) if new_height == new_width else f"{new_height} {new_width}"
        what, grow = f"crop_size {list(cfg.crop_size)} gives", f"--crop-size {crop}"
        example = f"python examples/train_ddp.py --config CONFIG.yaml {grow}"
    raise ConfigError(
        f"`method: {cfg.method}` trains a discriminator ({switched_on}) that needs logits of at least {need} x {need}, "
        f"but {what} {logits[0]} x {logits[1]} logits (the models' output stride is {OUTPUT_STRIDE}). "
        f"Add `{grow}` (images of at least {side} px: {need} x {need} logits), or turn the adversarial term off "
        f"with `{off}`. For example: {example}"
    )


def available_methods() -> tuple[str, ...]:
    """Methods whose loss module imports in this installation (``none`` always)."""
    names = ["none"]
    for method, module in _MODULES.items():
        try:
            importlib.import_module(module)
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
        cfg: an object with ``dataset``, ``kd_weight`` (float, or ``None`` for the paper's weight) and ``kd``
            (loss parameters that replace the paper's defaults, see :func:`resolve_kd`).

    Returns:
        The distiller module.

    Raises:
        ConfigError: (a ``ValueError``) unknown method, unknown ``kd`` parameter, or classes that differ between
            the student and the teacher.
        ImportError: the method's loss is not in this segkd installation.
    """
    if method not in METHODS:
        raise ConfigError(f"Expected `method` to be one of {', '.join(map(repr, METHODS))}, got {method!r}.")
    if method == "none":
        return NoDistiller()
    if teacher_info is None:
        raise ConfigError(f"Method {method!r} needs a teacher.")
    if student_info.num_classes != teacher_info.num_classes:
        raise ConfigError(
            f"Expected the student and the teacher to predict the same number of classes, got "
            f"{student_info.num_classes} and {teacher_info.num_classes}."
        )
    if method not in _BUILDERS:
        raise ImportError(f"Method {method!r} is not available in this installation of segkd.")
    weight, params = resolve_kd(method, getattr(cfg, "dataset", ""), cfg.kd_weight, cfg.kd)
    return _BUILDERS[method](weight, params, student_info, teacher_info)
