"""TFDS builder of BDD100K semantic segmentation (Yu et al. 2020), as RobustNet reads it.

The 10k-image segmentation subset (7,000 train, 1,000 validation; 1280x720 JPEGs) in one of
two layouts, recognised in this order:

* RobustNet's (`cfg.DATASET.BDD_DIR` = the `bdd100k/seg` folder of the original
  `bdd100k_seg.zip`): `images/{train,val}/X.jpg` and `labels/{train,val}/X_train_id.png`;
* the current official download (`bdd100k_images_10k.zip` and
  `bdd100k_sem_seg_labels_trainval.zip`, extracted into one `bdd100k` folder):
  `images/10k/{train,val}/X.jpg` and `labels/sem_seg/masks/{train,val}/X.png`.

Splits `train` and `validation` (a split whose image folder is absent is not built, so a
folder holding only `val` yields only `validation`; the unlabelled test images are ignored).
Labels are 8-bit PNGs that already hold Cityscapes train ids (0..18, 255 = ignore); RobustNet
keeps them as they are (its scoring skips every value >= 19); this builder keeps 0..18 and 255
and stores any other value as 255, reporting it as an unknown id.

Images: the pipeline decodes image bytes with `tf.io.decode_png` and reads image sizes from
PNG headers (`sources.png_size`), so each JPEG is decoded here exactly as RobustNet decodes it,
`PIL.Image.open(path).convert('RGB')` (no EXIF rotation), and stored as a lossless 8-bit RGB
PNG of those pixels: the stored pixels are RobustNet's input pixels, whatever JPEG decoder
TensorFlow would have used, and the input pipeline stays unchanged. The price is size (a PNG
photo is several times its JPEG) and build time.

`JpegSegmentationBuilder` (JPEG images, PNG labels) is shared with the Mapillary builder.
"""

import dataclasses
import io
import os
import zlib

import numpy as np
from PIL import Image

from jaxda.data import labels as labels_lib
from jaxda.data.builders import base

_SPLITS = {"train": "train", "val": "validation"}


def decode_jpeg(data: bytes, name: str) -> np.ndarray:
    """Image file bytes -> [H, W, 3] uint8, decoded as RobustNet does (PIL, convert('RGB'))."""
    if not data:
        raise base.BadFileError(name, "empty file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError, zlib.error, Image.DecompressionBombError) as e:
        raise base.BadFileError(name, f"cannot decode the image: {e}") from None


def encode_photo_png(array: np.ndarray) -> bytes:
    """[H, W, 3] uint8 -> PNG bytes; zlib level 1: photos compress ~6% less than at the
    default level 6 but encode ~1.5x faster, and PIL holds the GIL while encoding."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class _JpegAsPng:
    """`base.ManualFiles` whose images (`.jpg`) read back as PNGs of their decoded pixels."""

    def __init__(self, files: base.ManualFiles):
        self._files = files

    def read(self, name: str) -> bytes:
        data = self._files.read(name)
        if name.lower().endswith((".jpg", ".jpeg")):
            return encode_photo_png(decode_jpeg(data, name))
        return data


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where one layout keeps a split's files ('{split}' = the dataset's own split name)."""

    images: str  # Folder of the '.jpg' images.
    labels: str  # Folder of the label PNGs.
    label_suffix: str  # Label file name = image stem + label_suffix.


class JpegSegmentationBuilder(base.ManualSegmentationBuilder, skip_registration=True):
    """A manual builder whose images are JPEGs: stored as PNGs of PIL's decoding (see the
    module docstring); labels as in `base`. Subclasses set LAYOUTS, SPLITS, OTHER_LAYOUTS."""

    LAYOUTS: tuple[Layout, ...]  # Recognised layouts, in order of preference.
    SPLITS: dict[str, str]  # The dataset's split folder name -> TFDS split name.
    # (test on a folder's path, hint): other datasets, to say what a wrong folder holds.
    OTHER_LAYOUTS: tuple = ()
    IMAGES_NOTE = "images are the JPEGs decoded by PIL (convert('RGB')), stored as lossless PNGs."

    def _make_example(self, files: base.ManualFiles, pair: base.Pair):
        result = super()._make_example(_JpegAsPng(files), pair)
        if isinstance(result, base.BadFileError):
            return result
        example, histogram, _ = result
        return example, histogram, 1  # Every image is re-encoded (counted in the summary).

    @classmethod
    def find_layout(cls, root: str) -> Layout | None:
        """The first layout with a split's image folder under `root`, else None."""
        for layout in cls.LAYOUTS:
            for raw in cls.SPLITS:
                if os.path.isdir(os.path.join(root, layout.images.format(split=raw))):
                    return layout
        return None

    def _find_pairs(self, root: str) -> dict[str, base.SplitPlan]:
        layout = self.find_layout(root)
        if layout is None:
            raise self._layout_error(root)
        plans = {}
        for raw, split in self.SPLITS.items():
            image_dir = layout.images.format(split=raw)
            label_dir = layout.labels.format(split=raw)
            has_images, has_labels = (
                os.path.isdir(os.path.join(root, d)) for d in (image_dir, label_dir)
            )
            if not has_images and not has_labels:
                continue
            if not has_images or not has_labels:
                missing, present = (image_dir, label_dir) if has_labels else (label_dir, image_dir)
                raise base.ManualDataError(
                    f"{self.TITLE}: {os.path.join(root, present)} exists but "
                    f"{os.path.join(root, missing)} does not. Expected {self.EXPECTED}: "
                    "extract the missing part of the download into the same folder."
                )
            images, image_others = _files_with_suffix(root, image_dir, ".jpg")
            labels, label_others = _files_with_suffix(root, label_dir, layout.label_suffix)
            plan = base.pair_by_id(images, labels)
            plan.skipped = image_others + label_others + plan.skipped
            plans[split] = plan
        if not any(plan.pairs for plan in plans.values()):
            raise base.ManualDataError(
                f"{self.TITLE}: no image/label pair in {root}: an image {layout.images}/X.jpg "
                f"pairs with the label {layout.labels}/X{layout.label_suffix}, where {{split}} "
                f"is one of {', '.join(self.SPLITS)}."
            )
        return plans

    def _layout_error(self, root: str) -> base.ManualDataError:
        """The error for a manual folder in no known layout, saying what it holds instead."""
        found = f"it holds {base.list_folder(root)}"
        hint = next((hint for matches, hint in self.OTHER_LAYOUTS if matches(root)), None)
        if hint is not None:
            found += f". This looks like {hint}"
        else:  # The dataset one or two levels down (the folder an archive extracted to)?
            candidates = [c for sub in _subfolders(root) for c in (sub, *_subfolders(sub))]
            here = next((c for c in candidates if self.find_layout(c) is not None), None)
            if here is not None:
                found += f". The {self.TITLE} files seem to be in {here}: pass that"
        return base.ManualDataError(
            f"{self.TITLE} expects {self.EXPECTED} in --manual_dir={root}, but {found}."
        )


def _subfolders(path: str) -> list[str]:
    """The folders in `path`, sorted by name ([] if unreadable)."""
    try:
        return sorted(e.path for e in os.scandir(path) if e.is_dir())
    except OSError:
        return []


def _files_with_suffix(root: str, folder: str, suffix: str) -> tuple[dict[str, str], list[dict]]:
    """{stem: 'folder/stem+suffix'} of root/folder's files named *suffix, and its other
    files (skipped; hidden files such as .DS_Store are left out silently)."""
    found, others = {}, []
    for entry in sorted(os.scandir(os.path.join(root, folder)), key=lambda e: e.name):
        if entry.name.lower().endswith(suffix) and entry.is_file():
            found[entry.name[: -len(suffix)]] = f"{folder}/{entry.name}"
        elif not entry.name.startswith("."):
            others.append({"file": f"{folder}/{entry.name}", "reason": f"not a *{suffix} file"})
    return found, others


class Bdd100k(JpegSegmentationBuilder):
    """BDD100K 10k semantic segmentation images and labels (train ids)."""

    name = "bdd100k"
    PREPARE_NAME = "bdd100k"
    TITLE = "BDD100K"
    HOMEPAGE = "https://bdd-data.berkeley.edu/"
    DOWNLOAD = (
        "BDD100K semantic segmentation from https://bdd-data.berkeley.edu/ (free registration): "
        "'10K Images' and 'Segmentation' labels, extracted into one folder"
    )
    EXPECTED = (
        "images/{train,val}/X.jpg and labels/{train,val}/X_train_id.png (RobustNet's "
        "bdd100k/seg folder), or images/10k/{train,val}/X.jpg and "
        "labels/sem_seg/masks/{train,val}/X.png (the current bdd100k folder)"
    )
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Download {DOWNLOAD}. The manual folder must hold {EXPECTED}."
    LAYOUTS = (
        Layout("images/{split}", "labels/{split}", "_train_id.png"),
        Layout("images/10k/{split}", "labels/sem_seg/masks/{split}", ".png"),
    )
    SPLITS = _SPLITS
    OTHER_LAYOUTS = (
        (
            lambda root: any(
                os.path.isdir(os.path.join(root, split, "images"))
                for split in ("training", "validation")
            ),
            "Mapillary Vistas: use --dataset=mapillary",
        ),
    )
    # Train ids pass through; 255 and any other value -> ignore.
    LABEL_TABLE = labels_lib.lookup_table({i: i for i in range(labels_lib.NUM_CLASSES)})
    KNOWN_IDS = (*range(labels_lib.NUM_CLASSES), labels_lib.IGNORE_LABEL)

    def _decode_label(self, data: bytes, header: base.PngHeader, name: str) -> np.ndarray:
        return base.decode_index_label(data, name, modes=("L", "P"))
