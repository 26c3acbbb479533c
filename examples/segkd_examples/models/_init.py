"""Weight initialisation shared by the ResNet and MobileNetV2 backbones."""

from __future__ import annotations

from torch import nn


def init_backbone_weights_(backbone: nn.Module) -> None:
    """He-normal (fan-out) convolution weights, BatchNorm scale 1 and shift 0, in place (for training from scratch)."""
    for module in backbone.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
