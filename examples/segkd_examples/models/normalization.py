"""Input normalisation that the CIRKD 2022 checkpoints were trained with.

The CIRKD project (Yang et al., CVPR 2022) reads images with OpenCV, so its networks see **BGR** channel order
on the 0-255 scale, minus the per-channel Caffe ImageNet mean, and no division by a standard deviation. Its
released teachers (DeepLabV3-ResNet101, 78.07 mIoU on Cityscapes val) and the students fine-tuned from its
ImageNet backbones only give their published numbers with exactly that input. Every dataset in
:mod:`segkd_examples.data` produces images in this form, so the synthetic demo and the real benchmarks share one
convention.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "INPUT_CHANNEL_ORDER", "denormalize_image", "normalize_image"]

#: Channel order the models expect (the released checkpoints were trained on OpenCV's BGR images).
INPUT_CHANNEL_ORDER = "BGR"
#: Per-channel mean, in BGR order, on the 0-255 pixel scale (the Caffe ImageNet mean used by CIRKD).
IMAGENET_MEAN: tuple[float, float, float] = (104.00698793, 116.66876762, 122.67891434)
#: Per-channel standard deviation, in BGR order: CIRKD subtracts the mean only.
IMAGENET_STD: tuple[float, float, float] = (1.0, 1.0, 1.0)


def normalize_image(rgb: Any) -> Tensor:
    r"""Turn an RGB ``uint8`` image of shape ``(H, W, 3)`` into the model input ``(3, H, W)``.

    .. math::

        x_{c} = \frac{I_{\pi(c)} - \mu_c}{\sigma_c}, \quad \pi = (2, 1, 0) \text{ (RGB to BGR)}

    Args:
        rgb: a ``numpy`` array or tensor, ``(H, W, 3)``, RGB, values 0-255 (any real dtype).

    Returns:
        float32 tensor ``(3, H, W)`` in BGR order, mean-subtracted with :data:`IMAGENET_MEAN` and divided by
        :data:`IMAGENET_STD`.

    Raises:
        ValueError: ``rgb`` is not ``(H, W, 3)``.

    Example:
        >>> import numpy as np
        >>> x = normalize_image(np.full((1, 1, 3), (255, 128, 0), dtype=np.uint8))
        >>> [round(v, 3) for v in x.flatten().tolist()]
        [-104.007, 11.331, 132.321]
    """
    source = np.asarray(rgb)
    array = torch.from_numpy(source if source.flags.writeable else source.copy())
    if array.dim() != 3 or array.shape[-1] != 3:
        raise ValueError(f"Expected `rgb` to have shape (H, W, 3), got {tuple(array.shape)}.")
    bgr = array.to(torch.float32).flip(-1).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    return ((bgr - mean) / std).contiguous()


def denormalize_image(image: Tensor) -> Tensor:
    """Invert :func:`normalize_image`: model input ``(3, H, W)`` back to an RGB ``uint8`` image ``(H, W, 3)``.

    Args:
        image: ``(3, H, W)`` tensor as produced by :func:`normalize_image` (padding regions come back as the mean
            colour).

    Returns:
        ``uint8`` tensor ``(H, W, 3)``, RGB, clipped to 0-255 (for visualisation).

    Raises:
        ValueError: ``image`` is not ``(3, H, W)``.
    """
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"Expected `image` to have shape (3, H, W), got {tuple(image.shape)}.")
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=image.device).view(3, 1, 1)
    bgr = image.detach().float() * std + mean
    return bgr.flip(0).permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8)
