"""Deep-stem dilated ResNets (ResNet-v1s, output stride 8), with the CIRKD 2022 parameter names.

The stem is three 3x3 convolutions (3 -> 64 stride 2, 64 -> 64, 64 -> 128) instead of one 7x7, followed by a
3x3 max-pool; ``layer3`` and ``layer4`` keep stride 1 and dilate their 3x3 convolutions (2 and 4) so that the
output stride is 8. Parameter names (``conv1``, ``bn1``, ``conv2``, ``bn2``, ``conv3``, ``bn3``, ``layer1`` ...
``layer4``; no ``fc``) and the dilation schedule inside each stage follow the CIRKD project's
``models/base_models/resnet.py`` of 2022, so its ImageNet backbones (``resnet18-imagenet.pth``,
``resnet101-imagenet.pth``) and segmentation checkpoints load by their own key names and compute the same
function.

Reference: He et al., "Bag of Tricks for Image Classification with Convolutional Neural Networks" (ResNet-C deep
stem), CVPR 2019; Yu & Koltun, "Multi-Scale Context Aggregation by Dilated Convolutions", ICLR 2016.
"""

from __future__ import annotations

from torch import Tensor, nn

from ._init import init_backbone_weights_

__all__ = ["BasicBlock", "Bottleneck", "DilatedResNet", "resnet18_v1s", "resnet101_v1s"]


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34).

    Args:
        in_channels: input channels.
        planes: output channels.
        stride: stride of the first convolution.
        dilation: dilation of the first convolution.
        downsample: projection of the identity branch, or ``None``.
        previous_dilation: dilation of the second convolution.
    """

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
        previous_dilation: int = 1,
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, 1, previous_dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided/dilated), 1x1 expand by 4, with a residual connection (ResNet-50/101).

    Args:
        in_channels: input channels.
        planes: width of the 3x3 convolution; the block outputs ``4 * planes`` channels.
        stride: stride of the 3x3 convolution.
        dilation: dilation of the 3x3 convolution.
        downsample: projection of the identity branch, or ``None``.
        previous_dilation: unused by this block; accepted so that both block types share one constructor.
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
        previous_dilation: int = 1,
    ) -> None:
        super().__init__()
        del previous_dilation
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class DilatedResNet(nn.Module):
    """Deep-stem ResNet with dilated ``layer3``/``layer4`` (output stride 8).

    ``forward`` returns the outputs of ``layer3`` (for the auxiliary head) and ``layer4`` (for the main head).
    Spatial size after each stride-2 step is ``ceil(size / 2)``, so the outputs are ``ceil(H / 8) x ceil(W / 8)``.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: number of blocks in each of the four stages.

    Shape:
        - Input: ``(N, 3, H, W)``.
        - Output: ``((N, 256 * e, H', W'), (N, 512 * e, H', W'))`` with ``e = block.expansion`` and
          ``H' = ceil(H / 8)``, ``W' = ceil(W / 8)``.
    """

    #: Key prefixes of an ImageNet classification checkpoint that have no counterpart here (the classifier).
    imagenet_only_prefixes: tuple[str, ...] = ("fc.",)

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, int, int, int]) -> None:
        super().__init__()
        self._in_channels = 128
        self.conv1 = _conv3x3(3, 64, stride=2)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(64, 64)
        self.bn2 = nn.BatchNorm2d(64)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = _conv3x3(64, 128)
        self.bn3 = nn.BatchNorm2d(128)
        self.relu3 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], dilation=2)
        self.layer4 = self._make_layer(block, 512, layers[3], dilation=4)
        self.layer3_channels = 256 * block.expansion
        self.out_channels = 512 * block.expansion
        init_backbone_weights_(self)

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int = 1, dilation: int = 1
    ) -> nn.Sequential:
        out_channels = planes * block.expansion
        downsample = None
        if stride != 1 or self._in_channels != out_channels:
            downsample = nn.Sequential(
                nn.Conv2d(self._in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        # The first block of a dilated stage uses half the stage's dilation in its first 3x3 convolution
        # (1 for a dilation-2 stage, 2 for a dilation-4 stage), as in DeepLab and in the CIRKD code.
        first_dilation = 1 if dilation in (1, 2) else dilation // 2
        modules: list[nn.Module] = [
            block(self._in_channels, planes, stride, first_dilation, downsample, previous_dilation=dilation)
        ]
        self._in_channels = out_channels
        modules += [
            block(out_channels, planes, 1, dilation, None, previous_dilation=dilation) for _ in range(1, blocks)
        ]
        return nn.Sequential(*modules)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        x = self.layer2(self.layer1(self.maxpool(x)))
        c3 = self.layer3(x)
        c4 = self.layer4(c3)
        return c3, c4

    def imagenet_module(self) -> nn.Module:
        """The module whose ``state_dict`` matches an ImageNet checkpoint of this backbone (itself)."""
        return self


def resnet18_v1s() -> DilatedResNet:
    """Deep-stem dilated ResNet-18: 512 output channels, 256 at ``layer3``."""
    return DilatedResNet(BasicBlock, (2, 2, 2, 2))


def resnet101_v1s() -> DilatedResNet:
    """Deep-stem dilated ResNet-101: 2048 output channels, 1024 at ``layer3``."""
    return DilatedResNet(Bottleneck, (3, 4, 23, 3))
