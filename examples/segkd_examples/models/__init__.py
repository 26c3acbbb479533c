"""Segmentation models for the distillation pipeline: CIRKD-compatible teachers/students and tiny CPU models.

``build_model(name, num_classes)`` returns a :class:`SegmentationModel` whose forward pass gives a
:class:`SegmentationOutput` (``logits``, ``aux_logits``, ``features``) at output stride 8. The ResNet and
MobileNetV2 models reproduce the CIRKD project's architectures and parameter names, so its released teacher
checkpoints (:func:`load_checkpoint_into`) and ImageNet backbones (:func:`load_backbone_weights`) load strictly,
from both generations of its code (``build_model(..., generation="2025")`` for the current release's 512-wide
DeepLabV3 heads; :func:`checkpoint_generation` tells which one a file is), and expect inputs normalised with
:data:`IMAGENET_MEAN` / :data:`IMAGENET_STD` in BGR order (:func:`normalize_image`).
"""

from segkd_examples.checkpoint import CheckpointError

from .checkpoints import checkpoint_generation, load_backbone_weights, load_checkpoint_into, load_state_into
from .generations import GENERATIONS, infer_generation
from .normalization import IMAGENET_MEAN, IMAGENET_STD, INPUT_CHANNEL_ORDER, denormalize_image, normalize_image
from .segmentation import MODEL_NAMES, OUTPUT_STRIDE, SegmentationModel, SegmentationOutput, build_model

__all__ = [
    "MODEL_NAMES",
    "OUTPUT_STRIDE",
    "SegmentationModel",
    "SegmentationOutput",
    "build_model",
    "CheckpointError",
    "GENERATIONS",
    "checkpoint_generation",
    "infer_generation",
    "load_backbone_weights",
    "load_checkpoint_into",
    "load_state_into",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INPUT_CHANNEL_ORDER",
    "denormalize_image",
    "normalize_image",
]
