"""How each dataset's label files map to training ids (``0 .. K-1``, 255 = ignore).

Every mapping is a 256-entry lookup table applied to the 8-bit label image: ``train_id = lut[file_value]``.
File values that a dataset does not define map to 255 (ignored), so a stray value can never produce an
out-of-range class id.
"""

from __future__ import annotations

import numpy as np

from .info import IGNORE_INDEX

__all__ = [
    "ADE20K_LUT",
    "CITYSCAPES_ID_TO_TRAIN_ID",
    "CITYSCAPES_LUT",
    "COCOSTUFF_RAW_TO_TRAIN_ID",
    "COCOSTUFF_RAW_LUT",
    "COCOSTUFF_RAW_ID_LUT",
    "COCOSTUFF_TRAIN_ID_TO_RAW_LUT",
    "COCOSTUFF_TRAIN_ID_LUT",
    "COCOSTUFF_UNUSED_RAW_IDS",
    "apply_lut",
    "lut_from_mapping",
]


def lut_from_mapping(mapping: dict[int, int]) -> np.ndarray:
    """A ``uint8`` table of 256 entries: ``mapping`` where defined, 255 elsewhere."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for source, target in mapping.items():
        lut[source] = target
    return lut


def apply_lut(label: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Map an 8-bit label image through ``lut`` (both ``uint8``); returns a new ``uint8`` array."""
    return lut[label]


#: Cityscapes ``*_gtFine_labelIds.png`` value -> train id (the 19 evaluated classes of cityscapesScripts).
CITYSCAPES_ID_TO_TRAIN_ID: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14,
    28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
CITYSCAPES_LUT = lut_from_mapping(CITYSCAPES_ID_TO_TRAIN_ID)

#: ADE20K annotation value ``v`` -> ``v - 1`` for ``v`` in 1..150; 0 ("other") -> 255.
ADE20K_LUT = lut_from_mapping({v: v - 1 for v in range(1, 151)})

#: The 11 ids of the 0-based 182-id COCO-Stuff label maps that no pixel uses (COCO's unused thing ids).
COCOSTUFF_UNUSED_RAW_IDS = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
#: Raw COCO-Stuff-164k label value (0-based ids 0..181, 255 = unlabelled) -> one of the 171 train ids, in order,
#: as mmsegmentation's ``tools/dataset_converters/coco_stuff164k.py`` maps them.
COCOSTUFF_RAW_TO_TRAIN_ID: dict[int, int] = {
    raw: train for train, raw in enumerate(r for r in range(182) if r not in COCOSTUFF_UNUSED_RAW_IDS)
}
COCOSTUFF_RAW_LUT = lut_from_mapping(COCOSTUFF_RAW_TO_TRAIN_ID)
#: ``*_labelTrainIds.png`` already hold train ids 0..170; anything else is ignored.
COCOSTUFF_TRAIN_ID_LUT = lut_from_mapping({v: v for v in range(171)})
#: The 182-class protocol of the CIRKD / HWD code (``dataset/coco_stuff_164k.py``): raw ids 0..181 are the classes.
COCOSTUFF_RAW_ID_LUT = lut_from_mapping({v: v for v in range(182)})
#: The 182-class protocol from mmsegmentation's ``*_labelTrainIds.png``: train id -> raw id (the inverse renumbering).
COCOSTUFF_TRAIN_ID_TO_RAW_LUT = lut_from_mapping({train: raw for raw, train in COCOSTUFF_RAW_TO_TRAIN_ID.items()})
