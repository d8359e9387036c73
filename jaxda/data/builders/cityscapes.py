"""TFDS builder of Cityscapes fine annotations (Cordts et al. 2016) with train-id labels.

The TFDS catalog's `cityscapes` stores raw label ids at a fixed 1024x2048 and extracts the zips
to disk first; this builder reads the official `leftImg8bit_trainvaltest.zip` and
`gtFine_trainvaltest.zip` members directly (no extraction), or the same files already
extracted (`leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png`,
`gtFine/{train,val}/<city>/<same prefix>_gtFine_labelIds.png`). Splits `train` (2,975) and
`validation` (500); the test split (no public labels) and the other gtFine files (`_color`,
`_instanceIds`, `_polygons.json`) are ignored. Labels are stored as Cityscapes train ids.
"""

import os
import re
import zipfile

import numpy as np

from jaxda.data import labels as labels_lib
from jaxda.data.builders import base

_IMAGES, _LABELS = "leftImg8bit", "gtFine"
_PATTERNS = {
    _IMAGES: re.compile(r"leftImg8bit/(train|val)/[^/]+/([^/]+)_leftImg8bit\.png"),
    _LABELS: re.compile(r"gtFine/(train|val)/[^/]+/([^/]+)_gtFine_labelIds\.png"),
}
_DESCRIPTIONS = {
    _IMAGES: "leftImg8bit/{train,val}/<city>/*_leftImg8bit.png",
    _LABELS: "gtFine/{train,val}/<city>/*_gtFine_labelIds.png",
}
_SPLITS = {"train": "train", "val": "validation"}


class CityscapesFine(base.ManualSegmentationBuilder):
    """Cityscapes images and fine labels (train ids), from the official zips or folders."""

    name = "cityscapes_fine"
    PREPARE_NAME = "cityscapes"
    TITLE = "Cityscapes"
    HOMEPAGE = "https://www.cityscapes-dataset.com/"
    DOWNLOAD = (
        "Cityscapes from https://www.cityscapes-dataset.com/downloads/ (free registration): "
        "leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip"
    )
    EXPECTED = (
        "leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip (or the leftImg8bit/ and "
        "gtFine/ folders extracted from them)"
    )
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Download {DOWNLOAD}. The manual folder must hold {EXPECTED}."
    LABEL_TABLE = labels_lib.lookup_table(labels_lib.CITYSCAPES_LABEL_TO_TRAIN_ID)
    KNOWN_IDS = range(34)  # Label ids 0..33 (license plate, -1, is not drawn in the PNGs).

    def _find_pairs(self, root: str) -> dict[str, base.SplitPlan]:
        images, labels = (_find(root, part) for part in (_IMAGES, _LABELS))
        if images is None or labels is None:
            raise base.layout_error(root, self.TITLE, self.PREPARE_NAME, self.EXPECTED)
        plans = {}
        for raw_split, split in _SPLITS.items():
            plans[split] = base.pair_by_id(images[raw_split], labels[raw_split])
        if not any(plan.pairs for plan in plans.values()):
            raise base.ManualDataError(
                f"Cityscapes: no image/label pair in {root}: images and labels pair up by their "
                "<city>_<seq>_<frame> prefix in the same split."
            )
        return plans

    def _decode_label(self, data: bytes, header: base.PngHeader, name: str) -> np.ndarray:
        return base.decode_index_label(data, name, modes=("L",))


def _find(root: str, part: str) -> dict[str, dict[str, str]] | None:
    """{'train'|'val': {image id: file name}} of one part (zip first, else folder); None if absent.

    Zip members are named 'ZIP:MEMBER' (see `base.ManualFiles`).
    """
    zip_name = f"{part}_trainvaltest.zip"
    zip_path = os.path.join(root, zip_name)
    if os.path.isfile(zip_path):
        try:
            with zipfile.ZipFile(zip_path) as archive:
                members = archive.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise base.ManualDataError(
                f"Cityscapes: {zip_path} is not a readable zip file ({e}); download it again."
            ) from None
        names = {m: f"{zip_name}:{m}" for m in members}
        where = zip_name
    elif os.path.isdir(os.path.join(root, part)):
        names = {}
        for folder, _, files in os.walk(os.path.join(root, part)):
            relative = os.path.relpath(folder, root).replace(os.sep, "/")
            names.update({f"{relative}/{f}": f"{relative}/{f}" for f in files})
        where = f"{part}/"
    else:
        return None
    found = {raw_split: {} for raw_split in _SPLITS}
    for path, name in names.items():
        match = _PATTERNS[part].fullmatch(path)
        if match:
            found[match.group(1)][match.group(2)] = name
    if not any(found.values()):
        listing = ", ".join(sorted(names)[:5]) or "nothing"
        raise base.ManualDataError(
            f"Cityscapes: {os.path.join(root, where)} holds no {_DESCRIPTIONS[part]} files "
            f"(found: {listing}). Expected "
            f"the official {zip_name} (or its extracted {part}/ folder); is it another dataset "
            "or part (e.g. gtCoarse, rightImg8bit)?"
        )
    return found
