"""Names, class lists and class counts of the supported datasets."""

from __future__ import annotations

import dataclasses

from segkd import _checks

__all__ = [
    "ADE20K_CLASSES",
    "CITYSCAPES_CLASSES",
    "COCOSTUFF_CLASSES",
    "COCOSTUFF_182_CLASSES",
    "COCOSTUFF_CLASS_COUNTS",
    "DATASETS",
    "IGNORE_INDEX",
    "SYNTHETIC_CLASSES",
    "DatasetInfo",
    "dataset_info",
]

#: Names accepted by :func:`dataset_info`, :func:`~segkd_examples.data.build_dataset` and
#: :func:`~segkd_examples.data.check_dataset_root`.
DATASETS = ("cityscapes", "ade20k", "cocostuff", "synthetic")
#: Label value of pixels that are not scored (void, unlabelled, padding).
IGNORE_INDEX = 255

#: The 19 Cityscapes evaluation classes, in train-id order.
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip

#: The 150 ADE20K (SceneParsing / ADEChallengeData2016) classes, in label order (file value 1 -> class 0).
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel",
    "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip

#: The 171 COCO-Stuff-164k classes that occur in the data (80 things, then 91 stuff), in mmsegmentation's order.
COCOSTUFF_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis",
    "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush", "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage",
    "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard",
    "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone",
    "floor-tile", "floor-wood", "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel",
    "ground-other", "hill", "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud",
    "napkin", "net", "paper", "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield",
    "railing", "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other",
    "skyscraper", "snow", "solid-other", "stairs", "stone", "straw", "structural-other", "table", "tent",
    "textile-other", "towel", "tree", "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel",
    "wall-stone", "wall-tile", "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)  # fmt: skip

#: The 0-based raw ids of COCO-Stuff-164k that no pixel uses (COCO's unused thing category ids, minus 1).
_COCOSTUFF_UNUSED = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
#: The 182 classes of the raw-id protocol of the CIRKD / HWD code, in raw-id order: the 171 classes at their raw
#: ids and ``"unused <id>"`` at the 11 ids no pixel uses.
COCOSTUFF_182_CLASSES = tuple(
    f"unused {raw}" if raw in _COCOSTUFF_UNUSED else COCOSTUFF_CLASSES[raw - sum(u < raw for u in _COCOSTUFF_UNUSED)]
    for raw in range(182)
)
#: Class counts of the two COCO-Stuff protocols: 171 (mmsegmentation) and 182 (raw ids, CIRKD / HWD code).
COCOSTUFF_CLASS_COUNTS = (171, 182)

#: Names of the first synthetic classes (class 0 is the background); further classes are numbered.
SYNTHETIC_CLASSES = ("background", "disc", "square", "triangle", "bar", "ring", "cross", "diamond")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the trainer needs to know about a dataset.

    Attributes:
        name: one of :data:`DATASETS`.
        num_classes: number of scored classes ``K`` (labels are ``0 .. K-1`` or ``ignore_index``).
        class_names: ``K`` names, in label order.
        ignore_index: label of pixels that are not scored.
    """

    name: str
    num_classes: int
    class_names: tuple[str, ...]
    ignore_index: int = IGNORE_INDEX


def synthetic_class_names(num_classes: int) -> tuple[str, ...]:
    """Names of ``num_classes`` synthetic classes: the named shapes first, then ``"shape 8"``, ``"shape 9"`` ..."""
    return tuple(SYNTHETIC_CLASSES[i] if i < len(SYNTHETIC_CLASSES) else f"shape {i}" for i in range(num_classes))


def dataset_info(name: str, *, synthetic_classes: int = 8, cocostuff_classes: int = 171) -> DatasetInfo:
    """Class count and names of a dataset.

    Args:
        name: one of :data:`DATASETS`.
        synthetic_classes: number of classes of the ``synthetic`` dataset (>= 2), ignored for the others.
        cocostuff_classes: COCO-Stuff protocol, 171 (mmsegmentation's train ids) or 182 (the raw ids, as the
            CIRKD and HWD code train and score it); ignored for the others.

    Returns:
        The :class:`DatasetInfo` (19 classes for Cityscapes, 150 for ADE20K, 171 or 182 for COCO-Stuff-164k).

    Raises:
        ValueError: unknown ``name``; ``synthetic_classes`` < 2; ``cocostuff_classes`` not 171 or 182.

    Example:
        >>> dataset_info("cityscapes").class_names[:3]
        ('road', 'sidewalk', 'building')
    """
    _checks.check_choice(name, "name", DATASETS)
    if name == "cityscapes":
        return DatasetInfo(name, len(CITYSCAPES_CLASSES), CITYSCAPES_CLASSES)
    if name == "ade20k":
        return DatasetInfo(name, len(ADE20K_CLASSES), ADE20K_CLASSES)
    if name == "cocostuff":
        if cocostuff_classes not in COCOSTUFF_CLASS_COUNTS:
            raise ValueError(f"Expected `cocostuff_classes` to be 171 or 182, got {cocostuff_classes!r}.")
        names = COCOSTUFF_182_CLASSES if cocostuff_classes == 182 else COCOSTUFF_CLASSES
        return DatasetInfo(name, len(names), names)
    _checks.check_int(synthetic_classes, "synthetic_classes")
    if synthetic_classes < 2:
        raise ValueError(
            f"Expected `synthetic_classes` to be >= 2 (background and one shape), got {synthetic_classes}."
        )
    return DatasetInfo(name, synthetic_classes, synthetic_class_names(synthetic_classes))
