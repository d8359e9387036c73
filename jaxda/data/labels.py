"""Label spaces: Cityscapes train ids, class names, palette and id maps.

Every dataset in jaxda is trained and evaluated in the Cityscapes 19-class train-id space
(ids 0..18, 255 = ignore), as every DeepLabV2-era UDA method does (docs/methods/datasets.md).
"""

import numpy as np

IGNORE_LABEL = 255

CITYSCAPES_CLASSES = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)
NUM_CLASSES = len(CITYSCAPES_CLASSES)

# Official Cityscapes colours, indexed by train id.
CITYSCAPES_PALETTE = np.array(
    [
        (128, 64, 128),
        (244, 35, 232),
        (70, 70, 70),
        (102, 102, 156),
        (190, 153, 153),
        (153, 153, 153),
        (250, 170, 30),
        (220, 220, 0),
        (107, 142, 35),
        (152, 251, 152),
        (70, 130, 180),
        (220, 20, 60),
        (255, 0, 0),
        (0, 0, 142),
        (0, 0, 70),
        (0, 60, 100),
        (0, 80, 100),
        (0, 0, 230),
        (119, 11, 32),
    ],
    dtype=np.uint8,
)

# Cityscapes (and GTA5) label id -> train id; every other id is ignored.
CITYSCAPES_LABEL_TO_TRAIN_ID = {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    19: 6,
    20: 7,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    31: 16,
    32: 17,
    33: 18,
}

# Train id -> Cityscapes label id (the inverse map): the ids of `*_labelIds.png` files that the
# official cityscapesScripts evaluation reads.
CITYSCAPES_TRAIN_ID_TO_LABEL_ID = {t: i for i, t in CITYSCAPES_LABEL_TO_TRAIN_ID.items()}


# SYNTHIA (RAND-CITYSCAPES) class id -> train id (docs/methods/datasets.md: MaxSquare, da-sac,
# RobustNet);
# 0 void, 13 parking-slot, 14 road-work, 22 lane-marking and every other id -> ignore.
SYNTHIA_TO_TRAIN_ID = {
    1: 10,
    2: 2,
    3: 0,
    4: 1,
    5: 4,
    6: 8,
    7: 5,
    8: 13,
    9: 7,
    10: 11,
    11: 18,
    12: 17,
    15: 6,
    16: 9,
    17: 12,
    18: 14,
    19: 15,
    20: 16,
    21: 3,
}

# SYNTHIA -> Cityscapes is evaluated on 16 classes (terrain, truck and train do not occur in
# SYNTHIA) and on 13 (also without wall, fence and pole), both from the same confusion matrix.
SYNTHIA_16_CLASSES = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
SYNTHIA_13_CLASSES = (0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)


def class_id(name: str) -> int:
    """Returns the Cityscapes train id of a class name, e.g. 'car' -> 13."""
    try:
        return CITYSCAPES_CLASSES.index(name)
    except ValueError:
        raise ValueError(
            f"Unknown class name {name!r}; known Cityscapes classes: {CITYSCAPES_CLASSES}"
        ) from None


def lookup_table(mapping: dict[int, int], size: int = 256) -> np.ndarray:
    """A uint8 lookup table of `size` entries: mapped ids as given, all others -> 255."""
    table = np.full((size,), IGNORE_LABEL, np.uint8)
    for source_id, train_id in mapping.items():
        table[source_id] = train_id
    return table


def colorize(train_ids: np.ndarray) -> np.ndarray:
    """[..., H, W] train ids -> [..., H, W, 3] uint8 Cityscapes colours (ignore -> black)."""
    palette = np.zeros((256, 3), np.uint8)
    palette[:NUM_CLASSES] = CITYSCAPES_PALETTE
    return palette[train_ids]


def train_ids_to_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """[...] train ids -> uint8 Cityscapes label ids (ignore and unknown -> 0, 'unlabeled')."""
    table = np.zeros((256,), np.uint8)
    for train_id, label_id in CITYSCAPES_TRAIN_ID_TO_LABEL_ID.items():
        table[train_id] = label_id
    return table[np.asarray(train_ids)]
