"""Segmentation models with one output contract, and :func:`build_model`.

Every model maps ``images (N, 3, H, W)`` to a :class:`SegmentationOutput` at stride 8 (``ceil(H / 8)`` by
``ceil(W / 8)``, not upsampled): the main logits, the auxiliary logits of an FCN head on ``layer3`` (ResNet
models and the tiny models; ``None`` for MobileNetV2, as in CIRKD) and the pre-classifier feature map after the
ASPP / pyramid-pooling head convolution. The module tree (``pretrained`` = backbone, ``head``, ``auxlayer``)
matches the CIRKD project's 2022 models, so its released checkpoints load by their own key names with
:func:`segkd_examples.models.load_checkpoint_into`.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn

from segkd import _checks

from .generations import GENERATIONS, head_channels
from .heads import DeepLabV3Head, FCNHead, PSPHead, TinyHead
from .mobilenetv2 import DilatedMobileNetV2
from .resnet import resnet18_v1s, resnet101_v1s
from .tiny import TinyBackbone

__all__ = ["MODEL_NAMES", "OUTPUT_STRIDE", "SegmentationModel", "SegmentationOutput", "build_model"]

#: Names accepted by :func:`build_model`.
MODEL_NAMES = ("deeplabv3_r101", "deeplabv3_r18", "deeplabv3_mbv2", "pspnet_r18", "tiny_teacher", "tiny_student")
#: Ratio of the input size to the output size of every model (sizes round up).
OUTPUT_STRIDE = 8


class SegmentationOutput(NamedTuple):
    """What every model returns.

    Attributes:
        logits: ``(N, K, ceil(H / 8), ceil(W / 8))`` class scores, not upsampled.
        aux_logits: same shape, from the auxiliary FCN head on ``layer3``; ``None`` for models without one or when
            the forward pass was called with ``with_aux=False``.
        features: ``(N, D, ceil(H / 8), ceil(W / 8))``, the pre-classifier feature (``D = feature_channels``).
        backbone_features: ``(N, B, ceil(H / 8), ceil(W / 8))``, the backbone's last stage (``layer4`` of a ResNet,
            the last inverted-residual block of MobileNetV2; ``B = backbone_channels``): what the MGD paper's
            segmentation recipe distils. ``None`` only for outputs built by hand.
    """

    logits: Tensor
    aux_logits: Tensor | None
    features: Tensor
    backbone_features: Tensor | None = None


class SegmentationModel(nn.Module):
    """Backbone (``pretrained``) + main head (``head``) + optional auxiliary head (``auxlayer``).

    Args:
        name: the model's name in :data:`MODEL_NAMES` (for messages).
        backbone: returns ``(layer3_map or None, last_map)`` at stride 8.
        head: returns ``(logits, features)``.
        aux_head: maps the ``layer3`` map to logits, or ``None``.
        num_classes: number of classes ``K``.
        feature_channels: channels ``D`` of the feature the head returns.

    Attributes:
        num_classes: ``K``.
        feature_channels: ``D``.
        backbone_channels: channels of the backbone's last stage (``backbone.out_channels``).
        has_aux: whether ``aux_logits`` is produced.

    Shape:
        - Input: ``(N, 3, H, W)``, normalised with :data:`~segkd_examples.models.IMAGENET_MEAN` /
          :data:`~segkd_examples.models.IMAGENET_STD` in BGR order.
        - Output: :class:`SegmentationOutput`.
    """

    def __init__(
        self,
        name: str,
        backbone: nn.Module,
        head: nn.Module,
        aux_head: nn.Module | None,
        num_classes: int,
        feature_channels: int,
    ) -> None:
        super().__init__()
        self.name = name
        self.pretrained = backbone
        self.head = head
        self.auxlayer = aux_head
        self.num_classes = num_classes
        self.feature_channels = feature_channels
        self.backbone_channels = int(getattr(backbone, "out_channels", 0))
        self.has_aux = aux_head is not None

    def forward(self, images: Tensor, *, with_aux: bool = True) -> SegmentationOutput:
        """Run the model.

        Args:
            images: ``(N, 3, H, W)`` normalised images.
            with_aux: compute the auxiliary logits (set ``False`` for a frozen teacher to save its cost).

        Returns:
            :class:`SegmentationOutput` at stride 8.

        Raises:
            ValueError: ``images`` is not ``(N, 3, H, W)``.
        """
        _checks.check_exact_dims(images, "images", 4, "(N, 3, H, W)")
        if images.shape[1] != 3:
            raise ValueError(
                f"Expected `images` to have 3 channels (N, 3, H, W), got shape {_checks.shape_str(images.shape)}."
            )
        c3, c4 = self.pretrained(images)
        logits, features = self.head(c4)
        aux_logits = self.auxlayer(c3) if (self.auxlayer is not None and with_aux) else None
        return SegmentationOutput(logits, aux_logits, features, c4)

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, num_classes={self.num_classes}, feature_channels={self.feature_channels}, "
            f"has_aux={self.has_aux}"
        )


def _build(name: str, num_classes: int, generation: str) -> SegmentationModel:
    backbone: nn.Module
    if name == "deeplabv3_r101":
        backbone, channels = resnet101_v1s(), head_channels(name, generation, 256)
        head: nn.Module = DeepLabV3Head(2048, channels, num_classes)
        aux: nn.Module | None = FCNHead(1024, num_classes)
    elif name == "deeplabv3_r18":
        backbone, channels = resnet18_v1s(), head_channels(name, generation, 128)
        head, aux = DeepLabV3Head(512, channels, num_classes), FCNHead(256, num_classes)
    elif name == "pspnet_r18":
        backbone, channels = resnet18_v1s(), 128
        head, aux = PSPHead(512, channels, num_classes), FCNHead(256, num_classes)
    elif name == "deeplabv3_mbv2":
        backbone, channels = DilatedMobileNetV2(), 128
        head, aux = DeepLabV3Head(320, channels, num_classes), None
    else:
        width = 16 if name == "tiny_teacher" else 8
        tiny = TinyBackbone(width)
        backbone, channels = tiny, tiny.out_channels
        head, aux = TinyHead(tiny.out_channels, channels, num_classes), FCNHead(tiny.layer3_channels, num_classes)
    return SegmentationModel(name, backbone, head, aux, num_classes, channels)


def build_model(
    name: str, num_classes: int, *, backbone_weights: str | None = None, generation: str = "2022"
) -> SegmentationModel:
    """Build one of the segmentation models in :data:`MODEL_NAMES`.

    ====================  ========================================  ================  ========
    name                  backbone / head                           ``D`` (features)  aux head
    ====================  ========================================  ================  ========
    ``deeplabv3_r101``    deep-stem dilated ResNet-101 / ASPP       256 (2025: 512)   yes
    ``deeplabv3_r18``     deep-stem dilated ResNet-18 / ASPP        128 (2025: 512)   yes
    ``pspnet_r18``        deep-stem dilated ResNet-18 / PSP         128               yes
    ``deeplabv3_mbv2``    dilated MobileNetV2 / ASPP                128               no
    ``tiny_teacher``      4 conv stages, width 16 / 3x3 conv        64                yes
    ``tiny_student``      4 conv stages, width 8 / 3x3 conv         32                yes
    ====================  ========================================  ================  ========

    Args:
        name: one of :data:`MODEL_NAMES`.
        num_classes: number of classes ``K`` (19 Cityscapes, 150 ADE20K, 171 COCO-Stuff, 8 synthetic).
        backbone_weights: path to ImageNet weights of the backbone in the CIRKD layout (``resnet18-imagenet.pth``,
            ``resnet101-imagenet.pth``, ``mobilenetv2-imagenet.pth``), loaded strictly with
            :func:`~segkd_examples.models.load_backbone_weights`; ``None`` for random initialisation.
        generation: which CIRKD code the architecture follows, ``"2022"`` (commit 2d8ad0f, what the HWD paper
            used) or ``"2025"`` (DeepLabV3 heads 512 wide); see :mod:`segkd_examples.models.generations`.

    Returns:
        The model, in training mode, on the CPU.

    Raises:
        ValueError: unknown ``name`` or ``generation``; ``num_classes`` < 1; ``backbone_weights`` given for a tiny
            model.
        TypeError: ``num_classes`` not an int.
        CheckpointError: ``backbone_weights`` cannot be read or does not match the backbone.
    """
    _checks.check_choice(name, "name", MODEL_NAMES)
    _checks.check_positive_int(num_classes, "num_classes")
    _checks.check_choice(generation, "generation", GENERATIONS)
    model = _build(name, num_classes, generation)
    if backbone_weights is not None:
        from .checkpoints import load_backbone_weights

        load_backbone_weights(model, backbone_weights)
    return model
