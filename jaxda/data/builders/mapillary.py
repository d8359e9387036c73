"""TFDS builder of Mapillary Vistas v1.2 (Neuhold et al. 2017), as RobustNet reads it.

The manual folder (RobustNet's `cfg.DATASET.MAPILLARY_DIR`, the extracted v1.2 download)
holds `{training,validation}/images/X.jpg` and `{training,validation}/labels/X.png`: 8-bit
palette PNGs whose palette *indices* are the 66 v1.2 class ids (0..65, 65 = unlabeled). The
v2.0 download keeps the v1.2 labels in `{training,validation}/v1.2/labels/`, which is read
when `labels/` is absent (its `v2.0/labels`, 124 classes, never are). Splits `train` (18,000)
and `validation` (2,000); the test split (no labels) is ignored, and a folder without
`training/` builds only `validation`, all that RobustNet's evaluation needs.

Labels are stored as Cityscapes train ids by RobustNet's 66 -> 19 map
(`labels.MAPILLARY_CLASSES`: 23 classes mapped, the other 43 -> 255); RobustNet leaves ids
above 65 unchanged, which never occur in v1.2 labels: here they become 255 and are reported.
Images (JPEGs) are stored as PNGs of PIL's decoding, as for BDD100K (see `bdd100k`).

RobustNet evaluates Mapillary after resizing to height 1536 and a centre crop / pad to
1536x1536 (`jaxda.data.eval_transforms`); the stored images are the original size.
"""

import os

import numpy as np

from jaxda.data import labels as labels_lib
from jaxda.data.builders import base, bdd100k

_SPLITS = {"training": "train", "validation": "validation"}


class Mapillary(bdd100k.JpegSegmentationBuilder):
    """Mapillary Vistas v1.2 images and labels (Cityscapes train ids, RobustNet's map)."""

    name = "mapillary"
    PREPARE_NAME = "mapillary"
    TITLE = "Mapillary Vistas"
    HOMEPAGE = "https://www.mapillary.com/dataset/vistas"
    DOWNLOAD = (
        "Mapillary Vistas v1.2 (or v2.0, which includes the v1.2 labels) from "
        "https://www.mapillary.com/dataset/vistas (free registration), extracted"
    )
    EXPECTED = (
        "{training,validation}/images/X.jpg and {training,validation}/labels/X.png (v1.2 "
        "labels; or {training,validation}/v1.2/labels/X.png)"
    )
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Download {DOWNLOAD}. The manual folder must hold {EXPECTED}."
    LAYOUTS = (
        bdd100k.Layout("{split}/images", "{split}/labels", ".png"),
        bdd100k.Layout("{split}/images", "{split}/v1.2/labels", ".png"),
    )
    SPLITS = _SPLITS
    OTHER_LAYOUTS = (
        (
            lambda root: bdd100k.Bdd100k.find_layout(root) is not None,
            "BDD100K: use --dataset=bdd100k",
        ),
    )
    LABEL_TABLE = labels_lib.lookup_table(labels_lib.MAPILLARY_TO_TRAIN_ID)
    KNOWN_IDS = range(len(labels_lib.MAPILLARY_CLASSES))

    @classmethod
    def find_layout(cls, root: str) -> bdd100k.Layout | None:
        """Both layouts share the image folders: the labels decide (v1.2's own first)."""
        if not any(os.path.isdir(os.path.join(root, raw, "images")) for raw in cls.SPLITS):
            return None
        for layout in cls.LAYOUTS:
            for raw in cls.SPLITS:
                if os.path.isdir(os.path.join(root, layout.labels.format(split=raw))):
                    return layout
        return cls.LAYOUTS[0]  # No labels at all: _find_pairs names the missing folder.

    def _decode_label(self, data: bytes, header: base.PngHeader, name: str) -> np.ndarray:
        return base.decode_index_label(data, name, modes=("P", "L"))
