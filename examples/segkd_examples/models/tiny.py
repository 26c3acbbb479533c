"""A tiny stride-8 convolutional backbone for the synthetic CPU demo and the tests."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["TinyBackbone"]


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class TinyBackbone(nn.Module):
    """Three stride-2 3x3 convolutions, one more at stride 8 (``stage3``) and a dilated one (``stage4``).

    Args:
        width: channels of the first stage; the later stages use ``2 * width`` and ``4 * width``.

    Shape:
        - Input: ``(N, 3, H, W)``.
        - Output: ``((N, 2 * width, H', W'), (N, 4 * width, H', W'))`` with ``H' = ceil(H / 8)``.
    """

    imagenet_only_prefixes: tuple[str, ...] = ()

    def __init__(self, width: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn_relu(3, width, stride=2), *_conv_bn_relu(width, 2 * width, stride=2))
        self.stage3 = nn.Sequential(
            *_conv_bn_relu(2 * width, 2 * width, stride=2), *_conv_bn_relu(2 * width, 2 * width)
        )
        self.stage4 = nn.Sequential(*_conv_bn_relu(2 * width, 4 * width, dilation=2))
        self.layer3_channels = 2 * width
        self.out_channels = 4 * width

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        c3 = self.stage3(self.stem(x))
        return c3, self.stage4(c3)
