"""The two generations of CIRKD's segmentation models, and which one a checkpoint was saved from.

CIRKD's code (github.com/winycg/CIRKD) changed its DeepLabV3 heads in 2025: up to commit 2d8ad0f (June 2024, the
code the HWD paper built on) the ASPP and the feature convolution are 256 channels wide on ResNet-101 and 128 on
ResNet-18 (``models/deeplabv3.py``); from the 2025 rewrite on they are 512 wide on both, and the README links files
of the new width under the old names (e.g. ``deeplabv3_resnet101_citys_best_model.pth``). DeepLabV3-MobileNetV2
(``models/deeplabv3_mobile.py``, 128 wide) and PSPNet-ResNet18 (``models/pspnet.py``, 128 wide) are the same in
both generations, key for key. Only the width differs; parameter names, layer order and the forward pass do not.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from segkd_examples.checkpoint import CheckpointError

__all__ = ["GENERATIONS", "HEAD_CHANNELS", "head_channels", "infer_generation"]

#: CIRKD code generations: ``"2022"`` (up to commit 2d8ad0f) and ``"2025"`` (the current code).
GENERATIONS = ("2022", "2025")
#: ``(model name, generation) -> head width`` of the models whose head changed between generations.
HEAD_CHANNELS: dict[tuple[str, str], int] = {
    ("deeplabv3_r101", "2022"): 256,
    ("deeplabv3_r101", "2025"): 512,
    ("deeplabv3_r18", "2022"): 128,
    ("deeplabv3_r18", "2025"): 512,
}
#: The key whose first dimension is the head width (the ASPP 1x1 branch).
WIDTH_KEY = "head.aspp.b0.0.weight"


def head_channels(name: str, generation: str, default: int) -> int:
    """The ASPP / feature width of model ``name`` in ``generation`` (``default`` when it did not change)."""
    return HEAD_CHANNELS.get((name, generation), default)


def infer_generation(name: str, state: Mapping[str, torch.Tensor], *, source: str = "the checkpoint") -> str:
    """The CIRKD generation whose model ``name`` has the head width found in ``state``.

    Models that are the same in both generations (and states without the width key, which the strict loader
    then reports) give ``"2022"``.

    Args:
        name: a model name of :data:`~segkd_examples.models.MODEL_NAMES`.
        state: a state dict (CIRKD key names, without a ``module.`` prefix).
        source: what ``state`` came from, for messages.

    Returns:
        ``"2022"`` or ``"2025"``.

    Raises:
        CheckpointError: the head width is neither generation's.
    """
    widths = {gen: width for (model, gen), width in HEAD_CHANNELS.items() if model == name}
    weight = state.get(WIDTH_KEY)
    if not widths or weight is None or weight.dim() == 0:
        return GENERATIONS[0]
    for gen, width in widths.items():
        if weight.shape[0] == width:
            return gen
    known = ", ".join(f"{width} ({gen})" for gen, width in widths.items())
    raise CheckpointError(
        f"{source} has a {name} head {weight.shape[0]} channels wide (`{WIDTH_KEY}` of shape "
        f"{tuple(weight.shape)}); CIRKD's {name} heads are {known}: it is not a {name} checkpoint of either generation."
    )
