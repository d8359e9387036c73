"""TFDS builder of GTA5 ("Playing for Data", Richter et al. 2016) from the downloaded files.

The manual folder holds `images/NNNNN.png` (RGB, mostly 1914x1052) and `labels/NNNNN.png`
(8-bit palette PNGs whose palette *indices* are Cityscapes label ids). Split `train` holds
every id with both files (24,966 ids, of which a few pairs have differently sized image and
label: those are reported by name and left out), as AdaptSegNet, ADVENT and ProDA train on.
The official train/val/test id lists (`read_mapping.zip`, MaxSquare's `gta5_list/`) are not
stored as splits of their own: that would store tens of GB of images twice; the stored
`image_id` (e.g. '00042') identifies each example instead. Labels are stored as Cityscapes
train ids.
"""

import numpy as np

from jaxda.data import labels as labels_lib
from jaxda.data.builders import base


class Gta5(base.ManualSegmentationBuilder):
    """GTA5 images and labels (Cityscapes train ids)."""

    name = "gta5"
    PREPARE_NAME = "gta5"
    TITLE = "GTA5"
    HOMEPAGE = "https://download.visinf.tu-darmstadt.de/data/from_games/"
    DOWNLOAD = (
        "GTA5 from https://download.visinf.tu-darmstadt.de/data/from_games/ (all ten "
        "NN_images.zip and NN_labels.zip parts, extracted into one folder)"
    )
    EXPECTED = "images/NNNNN.png and labels/NNNNN.png"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Download {DOWNLOAD}. The manual folder must hold {EXPECTED}."
    LABEL_TABLE = labels_lib.lookup_table(labels_lib.CITYSCAPES_LABEL_TO_TRAIN_ID)
    KNOWN_IDS = range(34)  # Cityscapes label ids 0..33; anything else is unknown.

    def _find_pairs(self, root: str) -> dict[str, base.SplitPlan]:
        return self._pairs_from_folders(root, "images", "labels")

    def _decode_label(self, data: bytes, header: base.PngHeader, name: str) -> np.ndarray:
        return base.decode_index_label(data, name, modes=("P", "L"))
