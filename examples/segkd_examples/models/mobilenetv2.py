"""Dilated MobileNetV2 (output stride 8) with the CIRKD 2022 parameter names.

The 18 feature blocks of MobileNetV2 (stem + 17 inverted residuals, no final 1x1 convolution and no classifier)
live in ``net.features``, as in the CIRKD project's ``models/base_models/mobilenetv2.py``; the last two
down-sampling blocks (indices 7 and 14) drop their stride and the 3x3 depthwise convolutions after them are
dilated (2, then 4), so the 320-channel output has stride 8. An ImageNet checkpoint of MobileNetV2
(``mobilenetv2-imagenet.pth``) loads into ``net`` once its classifier (``classifier.*``) and final 1x1 block
(``features.18.*``) are set aside.

Reference: Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018.
"""

from __future__ import annotations

from torch import Tensor, nn

from ._init import init_backbone_weights_

__all__ = ["DilatedMobileNetV2", "InvertedResidual", "MobileNetV2Features"]

# (expansion t, output channels c, repeats n, stride s) of each stage.
_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class InvertedResidual(nn.Module):
    """Expand (1x1), depthwise 3x3, project (1x1, linear); residual when shapes allow.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the depthwise convolution (1 or 2).
        expand_ratio: hidden width as a multiple of ``in_channels``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = round(in_channels * expand_ratio)
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += [nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2Features(nn.Module):
    """The ``features`` trunk of MobileNetV2 (width 1.0) up to the 320-channel block, undilated (stride 32)."""

    def __init__(self) -> None:
        super().__init__()
        blocks: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6(inplace=True))
        ]
        in_channels = 32
        for t, c, n, s in _SETTINGS:
            for i in range(n):
                blocks.append(InvertedResidual(in_channels, c, s if i == 0 else 1, t))
                in_channels = c
        self.features = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)


def _dilate(module: nn.Module, dilation: int) -> None:
    # A strided 3x3 convolution loses its stride and gets half the dilation; the others get the full dilation.
    for conv in module.modules():
        if not isinstance(conv, nn.Conv2d) or conv.kernel_size != (3, 3):
            continue
        if conv.stride == (2, 2):
            conv.stride = (1, 1)
            d = dilation // 2
        else:
            d = dilation
        conv.dilation = (d, d)
        conv.padding = (d, d)


class DilatedMobileNetV2(nn.Module):
    """MobileNetV2 trunk with output stride 8 (blocks 7-13 dilated by 2, blocks 14-17 by 4).

    Shape:
        - Input: ``(N, 3, H, W)``.
        - Output: ``(None, (N, 320, ceil(H / 8), ceil(W / 8)))``; the first entry (a ``layer3`` map for an
          auxiliary head) is ``None`` because the CIRKD MobileNetV2 students have no auxiliary head.
    """

    #: Key prefixes of an ImageNet MobileNetV2 checkpoint with no counterpart here (last 1x1 block, classifier).
    imagenet_only_prefixes: tuple[str, ...] = ("features.18.", "classifier.")

    def __init__(self) -> None:
        super().__init__()
        self.net = MobileNetV2Features()
        for index in range(7, 14):
            _dilate(self.net.features[index], 2)
        for index in range(14, len(self.net.features)):
            _dilate(self.net.features[index], 4)
        self.out_channels = 320
        self.layer3_channels = 0
        init_backbone_weights_(self)

    def forward(self, x: Tensor) -> tuple[None, Tensor]:
        return None, self.net(x)

    def imagenet_module(self) -> nn.Module:
        """The module whose ``state_dict`` matches an ImageNet MobileNetV2 checkpoint (``net``)."""
        return self.net
