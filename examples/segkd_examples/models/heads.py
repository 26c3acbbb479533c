"""Segmentation heads: DeepLabV3 (ASPP), PSPNet (pyramid pooling), the FCN auxiliary head, a tiny head.

Every main head returns ``(logits, features)`` where ``features`` is the map just before the 1x1 classifier
(what the feature-distillation losses consume). Parameter names and layer indices follow the CIRKD project's
2022 ``models/deeplabv3.py`` and ``models/pspnet.py`` so that its checkpoints load by their own key names
(for instance ``head.aspp.b1.block.0.weight``, ``head.block.4.weight``, ``head.psp.conv1.0.weight``,
``auxlayer.block.4.bias``).

References: Chen et al., "Rethinking Atrous Convolution for Semantic Image Segmentation" (DeepLabV3),
arXiv:1706.05587, 2017; Zhao et al., "Pyramid Scene Parsing Network", CVPR 2017; Long et al., "Fully
Convolutional Networks for Semantic Segmentation", CVPR 2015.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ASPP", "DeepLabV3Head", "FCNHead", "PSPHead", "PyramidPooling", "TinyHead"]


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 1, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel_size // 2)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class _ASPPConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, rate: int) -> None:
        super().__init__()
        self.block = _conv_bn_relu(in_channels, out_channels, 3, rate)

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class _ASPPPooling(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.gap = nn.Sequential(nn.AdaptiveAvgPool2d(1), *_conv_bn_relu(in_channels, out_channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(self.gap(x), x.shape[-2:], mode="bilinear", align_corners=True)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three dilated 3x3 (rates 12, 24, 36) and image pooling, fused by 1x1.

    Args:
        in_channels: input channels.
        out_channels: channels of each branch and of the output.
        rates: dilation rates of the three 3x3 branches.
    """

    def __init__(self, in_channels: int, out_channels: int, rates: tuple[int, int, int] = (12, 24, 36)) -> None:
        super().__init__()
        self.b0 = _conv_bn_relu(in_channels, out_channels)
        self.b1 = _ASPPConv(in_channels, out_channels, rates[0])
        self.b2 = _ASPPConv(in_channels, out_channels, rates[1])
        self.b3 = _ASPPConv(in_channels, out_channels, rates[2])
        self.b4 = _ASPPPooling(in_channels, out_channels)
        self.project = nn.Sequential(*_conv_bn_relu(5 * out_channels, out_channels), nn.Dropout(0.5))

    def forward(self, x: Tensor) -> Tensor:
        branches = (self.b0(x), self.b1(x), self.b2(x), self.b3(x), self.b4(x))
        return self.project(torch.cat(branches, dim=1))


class DeepLabV3Head(nn.Module):
    """ASPP, then 3x3 conv-BN-ReLU-dropout (the feature), then a 1x1 classifier (``block.4``).

    Args:
        in_channels: backbone channels (512 for ResNet-18, 2048 for ResNet-101, 320 for MobileNetV2).
        channels: ASPP and feature width (CIRKD: 128 for ResNet-18 and MobileNetV2, 256 for ResNet-101).
        num_classes: classifier outputs.

    Shape:
        - Input: ``(N, in_channels, h, w)``.
        - Output: ``((N, num_classes, h, w), (N, channels, h, w))``.
    """

    def __init__(self, in_channels: int, channels: int, num_classes: int) -> None:
        super().__init__()
        self.aspp = ASPP(in_channels, channels)
        self.block = nn.Sequential(
            *_conv_bn_relu(channels, channels, 3), nn.Dropout(0.1), nn.Conv2d(channels, num_classes, 1)
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.block[0:4](self.aspp(x))
        return self.block[4](features), features


class PyramidPooling(nn.Module):
    """Average-pool to 1x1, 2x2, 3x3 and 6x6, reduce each to ``in_channels / 4``, upsample, concatenate with input.

    Args:
        in_channels: input channels; the output has ``2 * in_channels``.
    """

    bins = (1, 2, 3, 6)

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        reduced = in_channels // 4
        self.conv1 = _conv_bn_relu(in_channels, reduced)
        self.conv2 = _conv_bn_relu(in_channels, reduced)
        self.conv3 = _conv_bn_relu(in_channels, reduced)
        self.conv4 = _conv_bn_relu(in_channels, reduced)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        pooled = [
            F.interpolate(conv(F.adaptive_avg_pool2d(x, bins)), size, mode="bilinear", align_corners=True)
            for conv, bins in zip((self.conv1, self.conv2, self.conv3, self.conv4), self.bins, strict=True)
        ]
        return torch.cat([x, *pooled], dim=1)


class PSPHead(nn.Module):
    """Pyramid pooling, then 3x3 conv-BN-ReLU-dropout (the feature), then a 1x1 ``classifier``.

    Args:
        in_channels: backbone channels (512 for ResNet-18).
        channels: feature width (CIRKD: 128 for ResNet-18, 512 for ResNet-101).
        num_classes: classifier outputs.

    Shape:
        - Input: ``(N, in_channels, h, w)``.
        - Output: ``((N, num_classes, h, w), (N, channels, h, w))``.
    """

    def __init__(self, in_channels: int, channels: int, num_classes: int) -> None:
        super().__init__()
        self.psp = PyramidPooling(in_channels)
        self.block = nn.Sequential(*_conv_bn_relu(2 * in_channels, channels, 3), nn.Dropout(0.1))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.block(self.psp(x))
        return self.classifier(features), features


class FCNHead(nn.Module):
    """Auxiliary head: 3x3 conv to ``in_channels / 4``, BN, ReLU, dropout 0.1, 1x1 classifier (``block.4``).

    Args:
        in_channels: channels of the map it reads (``layer3``).
        num_classes: classifier outputs.

    Shape:
        - Input: ``(N, in_channels, h, w)``.
        - Output: ``(N, num_classes, h, w)``.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        inter = in_channels // 4
        self.block = nn.Sequential(
            *_conv_bn_relu(in_channels, inter, 3), nn.Dropout(0.1), nn.Conv2d(inter, num_classes, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class TinyHead(nn.Module):
    """3x3 conv-BN-ReLU (the feature) and a 1x1 classifier: the head of the tiny CPU models.

    Args:
        in_channels: input channels.
        channels: feature width.
        num_classes: classifier outputs.
    """

    def __init__(self, in_channels: int, channels: int, num_classes: int) -> None:
        super().__init__()
        self.block = _conv_bn_relu(in_channels, channels, 3)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.block(x)
        return self.classifier(features), features
