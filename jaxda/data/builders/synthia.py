"""TFDS builder of SYNTHIA-RAND-CITYSCAPES (Ros et al. 2016) from the downloaded files.

The manual folder (`RAND_CITYSCAPES/` of the download) holds `RGB/NNNNNNN.png` (1280x760) and
`GT/LABELS/NNNNNNN.png`: 16-bit PNGs with 3 or 4 channels whose first channel (in RGB order,
as FreeImage reads it; OpenCV's BGR order puts it last) is the SYNTHIA class id and whose
second is an instance id. PIL reduces 16-bit colour PNGs to 8 bits, which garbles the ids, so
the labels are decoded with `tf.io.decode_png(dtype=uint16)`. All 9,400 images form split
`train`; MaxSquare-style train/val subsets (ids 0..8999 / 9000..9399) are selected by the
stored `image_id`. Labels are stored as Cityscapes train ids (SYNTHIA_TO_TRAIN_ID).
"""

import numpy as np

from jaxda.data import labels as labels_lib
from jaxda.data.builders import base

_LABELS = "GT/LABELS"


class SynthiaRandCityscapes(base.ManualSegmentationBuilder):
    """SYNTHIA-RAND-CITYSCAPES images and labels (Cityscapes train ids)."""

    name = "synthia_rand_cityscapes"
    PREPARE_NAME = "synthia"
    TITLE = "SYNTHIA-RAND-CITYSCAPES"
    HOMEPAGE = "https://synthia-dataset.net/"
    DOWNLOAD = (
        "SYNTHIA-RAND-CITYSCAPES (CVPR16) from https://synthia-dataset.net/downloads/ "
        "(extract it; pass its RAND_CITYSCAPES folder)"
    )
    EXPECTED = "RGB/NNNNNNN.png and GT/LABELS/NNNNNNN.png"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Download {DOWNLOAD}. The manual folder must hold {EXPECTED}."
    # SYNTHIA class ids are 0..22 (void .. lane marking) but stored in 16 bits: map all 2^16.
    LABEL_TABLE = labels_lib.lookup_table(labels_lib.SYNTHIA_TO_TRAIN_ID, size=1 << 16)
    KNOWN_IDS = range(23)

    def _find_pairs(self, root: str) -> dict[str, base.SplitPlan]:
        import tensorflow  # noqa: F401  (imported here once, not first in the worker threads)

        return self._pairs_from_folders(root, "RGB", _LABELS)

    def _decode_label(self, data: bytes, header: base.PngHeader, name: str) -> np.ndarray:
        if header.bit_depth != 16 or header.color_type not in (2, 6):
            raise base.BadFileError(
                name,
                f"expected a 16-bit RGB/RGBA SYNTHIA label PNG (class id in the first "
                f"channel), found a {header.describe()} PNG",
            )
        import tensorflow as tf  # Only here: PIL cannot read 16-bit colour PNGs.

        try:
            ids = tf.io.decode_png(data, channels=0, dtype=tf.uint16).numpy()
        except tf.errors.OpError as e:
            raise base.BadFileError(name, f"cannot decode: {e.message}") from None
        return ids[..., 0]
