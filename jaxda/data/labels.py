"""Label spaces: Cityscapes train ids, class names, palette and id maps.

Every published dataset in jaxda is trained and evaluated in the Cityscapes 19-class train-id
space (ids 0..18, 255 = ignore), as every DeepLabV2-era UDA method does
(docs/methods/datasets.md); datasets prepared from your own folders may carry their own class
set (jaxda/data/classes.py).
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


# Mapillary Vistas v1.2 classes in label-id order (the 66 entries of the dataset's config.json:
# name, readable name), each with the Cityscapes train id RobustNet maps it to
# (datasets/mapillary.py, gen_id_to_ignore) or None: ignored. RobustNet maps only these 23 ids,
# so e.g. crosswalks, bike lanes, guard rails, street lights and the backs of traffic signs are
# ignored rather than merged into road, fence, pole or traffic sign.
MAPILLARY_CLASSES = (
    ("animal--bird", "Bird", None),  # 0
    ("animal--ground-animal", "Ground Animal", None),  # 1
    ("construction--barrier--curb", "Curb", 1),  # 2
    ("construction--barrier--fence", "Fence", 4),  # 3
    ("construction--barrier--guard-rail", "Guard Rail", None),  # 4
    ("construction--barrier--other-barrier", "Barrier", None),  # 5
    ("construction--barrier--wall", "Wall", 3),  # 6
    ("construction--flat--bike-lane", "Bike Lane", None),  # 7
    ("construction--flat--crosswalk-plain", "Crosswalk - Plain", None),  # 8
    ("construction--flat--curb-cut", "Curb Cut", None),  # 9
    ("construction--flat--parking", "Parking", None),  # 10
    ("construction--flat--pedestrian-area", "Pedestrian Area", None),  # 11
    ("construction--flat--rail-track", "Rail Track", None),  # 12
    ("construction--flat--road", "Road", 0),  # 13
    ("construction--flat--service-lane", "Service Lane", None),  # 14
    ("construction--flat--sidewalk", "Sidewalk", 1),  # 15
    ("construction--structure--bridge", "Bridge", None),  # 16
    ("construction--structure--building", "Building", 2),  # 17
    ("construction--structure--tunnel", "Tunnel", None),  # 18
    ("human--person", "Person", 11),  # 19
    ("human--rider--bicyclist", "Bicyclist", 12),  # 20
    ("human--rider--motorcyclist", "Motorcyclist", 12),  # 21
    ("human--rider--other-rider", "Other Rider", 12),  # 22
    ("marking--crosswalk-zebra", "Lane Marking - Crosswalk", None),  # 23
    ("marking--general", "Lane Marking - General", 0),  # 24
    ("nature--mountain", "Mountain", None),  # 25
    ("nature--sand", "Sand", None),  # 26
    ("nature--sky", "Sky", 10),  # 27
    ("nature--snow", "Snow", None),  # 28
    ("nature--terrain", "Terrain", 9),  # 29
    ("nature--vegetation", "Vegetation", 8),  # 30
    ("nature--water", "Water", None),  # 31
    ("object--banner", "Banner", None),  # 32
    ("object--bench", "Bench", None),  # 33
    ("object--bike-rack", "Bike Rack", None),  # 34
    ("object--billboard", "Billboard", None),  # 35
    ("object--catch-basin", "Catch Basin", None),  # 36
    ("object--cctv-camera", "CCTV Camera", None),  # 37
    ("object--fire-hydrant", "Fire Hydrant", None),  # 38
    ("object--junction-box", "Junction Box", None),  # 39
    ("object--mailbox", "Mailbox", None),  # 40
    ("object--manhole", "Manhole", 0),  # 41
    ("object--phone-booth", "Phone Booth", None),  # 42
    ("object--pothole", "Pothole", None),  # 43
    ("object--street-light", "Street Light", None),  # 44
    ("object--support--pole", "Pole", 5),  # 45
    ("object--support--traffic-sign-frame", "Traffic Sign Frame", None),  # 46
    ("object--support--utility-pole", "Utility Pole", 5),  # 47
    ("object--traffic-light", "Traffic Light", 6),  # 48
    ("object--traffic-sign--back", "Traffic Sign (Back)", None),  # 49
    ("object--traffic-sign--front", "Traffic Sign (Front)", 7),  # 50
    ("object--trash-can", "Trash Can", None),  # 51
    ("object--vehicle--bicycle", "Bicycle", 18),  # 52
    ("object--vehicle--boat", "Boat", None),  # 53
    ("object--vehicle--bus", "Bus", 15),  # 54
    ("object--vehicle--car", "Car", 13),  # 55
    ("object--vehicle--caravan", "Caravan", None),  # 56
    ("object--vehicle--motorcycle", "Motorcycle", 17),  # 57
    ("object--vehicle--on-rails", "On Rails", 16),  # 58
    ("object--vehicle--other-vehicle", "Other Vehicle", None),  # 59
    ("object--vehicle--trailer", "Trailer", None),  # 60
    ("object--vehicle--truck", "Truck", 14),  # 61
    ("object--vehicle--wheeled-slow", "Wheeled Slow", None),  # 62
    ("void--car-mount", "Car Mount", None),  # 63
    ("void--ego-vehicle", "Ego Vehicle", None),  # 64
    ("void--unlabeled", "Unlabeled", None),  # 65
)
MAPILLARY_TO_TRAIN_ID = {
    label_id: train_id
    for label_id, (_, _, train_id) in enumerate(MAPILLARY_CLASSES)
    if train_id is not None
}


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
