"""Datasets for the distillation pipeline: Cityscapes, ADE20K, COCO-Stuff-164k and a procedural one.

``build_dataset(name, root, split)`` returns ``(image, label)`` items ready for the models of
:mod:`segkd_examples.models` (BGR, CIRKD mean subtraction; int64 labels with 255 = ignore);
``check_dataset_root`` validates a root at start-up; ``dataset_info`` gives class counts and names. The on-disk
layouts, file counts and id mappings are documented in ``docs/datasets.md``.
"""

from .build import build_dataset
from .folder import DatasetFileError, SegmentationFolder
from .info import (
    ADE20K_CLASSES,
    CITYSCAPES_CLASSES,
    COCOSTUFF_182_CLASSES,
    COCOSTUFF_CLASSES,
    DATASETS,
    IGNORE_INDEX,
    DatasetInfo,
    dataset_info,
)
from .labels import CITYSCAPES_ID_TO_TRAIN_ID, COCOSTUFF_RAW_TO_TRAIN_ID
from .layouts import (
    EXPECTED_COUNTS,
    DatasetLayout,
    DatasetRootError,
    IncompleteDatasetWarning,
    check_dataset_root,
    find_samples,
)
from .synthetic import SyntheticSegmentation
from .transforms import draw_scale, train_augment
from .workers import default_workers, usable_cpus

__all__ = [
    "DATASETS",
    "IGNORE_INDEX",
    "DatasetInfo",
    "dataset_info",
    "build_dataset",
    "check_dataset_root",
    "find_samples",
    "DatasetLayout",
    "DatasetRootError",
    "DatasetFileError",
    "IncompleteDatasetWarning",
    "EXPECTED_COUNTS",
    "SegmentationFolder",
    "SyntheticSegmentation",
    "draw_scale",
    "train_augment",
    "default_workers",
    "usable_cpus",
    "CITYSCAPES_CLASSES",
    "ADE20K_CLASSES",
    "COCOSTUFF_CLASSES",
    "COCOSTUFF_182_CLASSES",
    "CITYSCAPES_ID_TO_TRAIN_ID",
    "COCOSTUFF_RAW_TO_TRAIN_ID",
]
