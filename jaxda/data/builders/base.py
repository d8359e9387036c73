"""Shared base of the builders of the downloaded datasets (GTA5, SYNTHIA, Cityscapes).

A builder finds (image, label) file pairs in the user's manual folder; this module turns each
pair into an example. The image PNG is stored byte for byte (after a structural check of its
chunks, without decoding it); the label is decoded, mapped to Cityscapes train ids (255 =
ignore) and re-encoded as an 8-bit PNG. The per-pair work runs in a thread pool (zlib, PIL and
NumPy release the GIL) and the results come back in input order, so the stored order is the
sorted file order whatever the thread timing.

During generation the builder records, per split, a histogram of the raw label ids and every
file it skipped and why; `jaxda.data.prepare` turns these into its summary.
"""

import collections
import concurrent.futures
import dataclasses
import io
import os
import re
import struct
import threading
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from jaxda.data import labels as labels_lib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOR_TYPES = {0: "grayscale", 2: "RGB", 3: "palette", 4: "grayscale+alpha", 6: "RGBA"}
_MAX_LISTED = 20  # Problems listed in one error message; the summary lists them all.


class ManualDataError(ValueError):
    """The manual folder does not hold what the builder expects (or, strict, holds a bad file)."""


class BadFileError(ValueError):
    """One file of a pair cannot be used; the pair is skipped (an error when strict)."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name, self.reason = name, reason


@dataclasses.dataclass(frozen=True)
class PngHeader:
    width: int
    height: int
    bit_depth: int
    color_type: int

    def describe(self) -> str:
        kind = _COLOR_TYPES.get(self.color_type, f"color type {self.color_type}")
        return f"{self.bit_depth}-bit {kind} {self.width}x{self.height}"


def check_png(data: bytes, name: str) -> PngHeader:
    """The IHDR of a PNG, after walking every chunk (lengths, CRCs, IEND) without decoding.

    Catches truncated and corrupted downloads at the cost of a CRC pass (~1 ms per MB).
    """
    if not data.startswith(PNG_SIGNATURE):
        raise BadFileError(name, "empty file" if not data else "not a PNG file (bad signature)")
    view, pos, header = memoryview(data), len(PNG_SIGNATURE), None
    while True:
        if pos + 12 > len(data):
            raise BadFileError(
                name, f"truncated PNG: the file ends at byte {len(data)} before IEND"
            )
        length, kind = struct.unpack_from(">I4s", data, pos)
        kind = kind.decode("latin-1")
        end = pos + 12 + length
        if end > len(data):
            raise BadFileError(
                name, f"truncated PNG: chunk {kind} at byte {pos} runs past the end of the file"
            )
        (crc,) = struct.unpack_from(">I", data, end - 4)
        if zlib.crc32(view[pos + 4 : end - 4]) != crc:
            raise BadFileError(name, f"corrupt PNG: CRC mismatch in chunk {kind} at byte {pos}")
        if header is None:
            if kind != "IHDR" or length != 13:
                raise BadFileError(name, "corrupt PNG: the first chunk is not IHDR")
            header = PngHeader(*struct.unpack_from(">IIBB", data, pos + 8))
        if kind == "IEND":
            return header
        pos = end


def encode_png(array: np.ndarray) -> bytes:
    """[H, W] or [H, W, 3] uint8 -> PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_index_label(data: bytes, name: str, modes: tuple[str, ...] = ("P", "L")) -> np.ndarray:
    """An 8-bit label PNG whose pixel values (palette indices for mode P) are ids -> [H, W]."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.mode not in modes:
                raise BadFileError(
                    name,
                    f"expected a label PNG of mode {'/'.join(modes)} holding label ids, "
                    f"found mode {image.mode} (a colour rendering of the labels?)",
                )
            return np.asarray(image)
    except (OSError, SyntaxError, ValueError, zlib.error) as e:
        if isinstance(e, BadFileError):
            raise
        raise BadFileError(name, f"cannot decode: {e}") from None


def ordered_map(fn: Callable, items: Iterable, num_workers: int) -> Iterator:
    """fn(item) for each item, in a thread pool, yielded in input order (bounded lookahead)."""
    with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
        pending = collections.deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= 2 * num_workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # Closed early (an error downstream): drop the work not started yet.
            for future in pending:
                future.cancel()


class ManualFiles:
    """Reads files of the manual folder by name; 'NAME.zip:MEMBER' reads a zip member."""

    def __init__(self, root: os.PathLike):
        self.root = root
        self._zips: dict[str, zipfile.ZipFile] = {}
        self._lock = threading.Lock()

    def read(self, name: str) -> bytes:
        archive, sep, member = name.partition(".zip:")
        try:
            if not sep:
                with open(os.path.join(self.root, name), "rb") as f:
                    return f.read()
            with self._lock:  # Reads of one ZipFile from many threads are safe; opening is not.
                if archive not in self._zips:
                    self._zips[archive] = zipfile.ZipFile(os.path.join(self.root, archive + ".zip"))
            return self._zips[archive].read(member)
        except (OSError, KeyError, zipfile.BadZipFile, zlib.error, EOFError) as e:
            raise BadFileError(name, f"cannot read: {e}") from None

    def __enter__(self) -> "ManualFiles":
        return self

    def __exit__(self, *exc) -> None:
        for archive in self._zips.values():
            archive.close()


def list_folder(path: os.PathLike, limit: int = 8) -> str:
    """'a/, b.zip, c.txt (+3 more)': what a folder holds, for error messages."""
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except OSError as e:
        return f"nothing readable ({e.strerror})"
    if not entries:
        return "an empty folder"
    names = [e.name + ("/" if e.is_dir() else "") for e in entries[:limit]]
    more = f" (+{len(entries) - limit} more)" if len(entries) > limit else ""
    return ", ".join(names) + more


# How each dataset's folder looks at its top level, to say what a wrong folder holds instead:
# (launch.prepare --dataset name or None, test on the set of entry names, hint).
_LAYOUTS = (
    ("gta5", lambda names: {"images", "labels"} <= names, "GTA5: use --dataset=gta5"),
    ("synthia", lambda names: {"RGB", "GT"} <= names, "SYNTHIA: use --dataset=synthia"),
    (
        "cityscapes",
        lambda names: bool(
            names
            & {"leftImg8bit", "gtFine", "leftImg8bit_trainvaltest.zip", "gtFine_trainvaltest.zip"}
        ),
        "Cityscapes: use --dataset=cityscapes",
    ),
    (
        None,
        lambda names: any(re.fullmatch(r"\d+_(images|labels)\.zip", n) for n in names),
        "GTA5's downloaded zip parts: extract all of them into one folder (giving images/ and "
        "labels/) and pass that folder",
    ),
)


def layout_error(
    root: os.PathLike, title: str, prepare_name: str, expected: str
) -> ManualDataError:
    """The error for a manual folder that does not hold `expected`, saying what it does hold."""
    names = {e.name for e in os.scandir(root)} if os.path.isdir(root) else set()
    found = f"it holds {list_folder(root)}"
    for other_name, matches, hint in _LAYOUTS:
        if other_name != prepare_name and matches(names):
            found += f". This looks like {hint}"
            break
    else:  # The right dataset one level down (e.g. the folder the archive extracted to)?
        own = next(matches for name, matches, _ in _LAYOUTS if name == prepare_name)
        for sub in sorted(n for n in names if os.path.isdir(os.path.join(root, n))):
            if own(set(os.listdir(os.path.join(root, sub)))):
                found += f". The {title} files seem to be in {os.path.join(root, sub)}: pass that"
                break
    return ManualDataError(f"{title} expects {expected} in --manual_dir={root}, but {found}.")


def problems_message(what: str, problems: list[dict]) -> str:
    listed = "; ".join(f"{p['file']}: {p['reason']}" for p in problems[:_MAX_LISTED])
    more = f"; and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
    return (
        f"{what}: {listed}{more}. Without --strict such files are skipped and listed in the "
        "summary."
    )


@dataclasses.dataclass(frozen=True)
class Pair:
    """An example to build: its id and the names of its image and label (see `ManualFiles`)."""

    image_id: str
    image: str
    label: str


@dataclasses.dataclass
class SplitPlan:
    pairs: list[Pair]
    skipped: list[dict]  # {'file': name, 'reason': why}: files left out before reading any.


@dataclasses.dataclass
class SplitStats:
    """What generating one split found: raw label id histogram, skipped files."""

    label_id_pixels: np.ndarray  # [table size] int64: pixels of each raw label id.
    num_examples: int = 0
    reencoded_images: int = 0
    skipped: list[dict] = dataclasses.field(default_factory=list)

    def summary(self, table: np.ndarray, known_ids: range) -> dict:
        """The split's part of the prepare summary (counts after mapping to train ids)."""
        mapped = np.zeros((256,), np.int64)
        np.add.at(mapped, table, self.label_id_pixels)
        class_pixels = mapped[: labels_lib.NUM_CLASSES]
        unknown = {
            str(i): int(self.label_id_pixels[i])
            for i in np.flatnonzero(self.label_id_pixels)
            if i not in known_ids
        }
        return {
            "num_examples": self.num_examples,
            "class_pixels": [int(c) for c in class_pixels],
            "ignored_pixels": int(self.label_id_pixels.sum() - class_pixels.sum()),
            "unknown_label_ids": unknown,
            "reencoded_images": self.reencoded_images,
            "skipped": self.skipped,
        }


class ManualSegmentationBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the builders of downloaded segmentation datasets; labels stored as train ids.

    Subclasses set the class attributes below and implement `_find_pairs` and `_decode_label`.
    Before `download_and_prepare`, set `strict` (skipped files become errors) and
    `num_workers`; afterwards `split_summaries()` describes what was built.
    """

    VERSION = tfds.core.Version("1.0.0")
    PREPARE_NAME = ""  # launch.prepare --dataset=...
    TITLE = ""  # Human name used in messages.
    IMAGES_NOTE = "images are the original PNG files."  # How images are stored (description).
    HOMEPAGE = ""
    DOWNLOAD = ""  # Where and what to download, for messages.
    EXPECTED = ""  # What --manual_dir must hold, for messages.
    LABEL_TABLE: np.ndarray  # Raw label id -> train id (uint8, 255 = ignore).
    KNOWN_IDS: range  # Raw ids the dataset defines; others are counted as unknown.

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.strict = False
        self.num_workers = min(16, os.cpu_count() or 1)
        self.split_stats: dict[str, SplitStats] = {}

    def _pairs_from_folders(self, root: str, image_dir: str, label_dir: str) -> dict:
        """{'train': pairs of `image_dir/X.png` and `label_dir/X.png`} (GTA5, SYNTHIA)."""
        if not all(os.path.isdir(os.path.join(root, d)) for d in (image_dir, label_dir)):
            raise layout_error(root, self.TITLE, self.PREPARE_NAME, self.EXPECTED)
        images, image_others = png_files(root, image_dir)
        labels, label_others = png_files(root, label_dir)
        if not images.keys() & labels.keys():
            raise ManualDataError(
                f"{self.TITLE}: no image/label pair in {root}: {image_dir}/ holds {len(images)} "
                f"PNGs ({list_folder(os.path.join(root, image_dir), 3)}) and {label_dir}/ holds "
                f"{len(labels)} ({list_folder(os.path.join(root, label_dir), 3)}); pairs need "
                "the same file name in both."
            )
        train = pair_by_id(images, labels)
        train.skipped = image_others + label_others + train.skipped
        return {"train": train}

    def _description(self) -> str:
        return (
            f"{self.TITLE}, labels mapped to the 19 Cityscapes train ids (255 = ignore); "
            f"{self.IMAGES_NOTE}"
        )

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self._description(),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                    "label": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
                    "image_id": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            homepage=self.HOMEPAGE,
            disable_shuffling=True,  # Example i is the i-th file in sorted order.
        )

    def _find_pairs(self, root: str) -> dict[str, SplitPlan]:
        """Split name -> the pairs found under the manual folder `root` (nothing read yet)."""
        raise NotImplementedError

    def _decode_label(self, data: bytes, header: PngHeader, name: str) -> np.ndarray:
        """Label PNG bytes -> [H, W] raw label ids (integers < len(LABEL_TABLE))."""
        raise NotImplementedError

    def _split_generators(self, dl_manager):
        root = os.fspath(dl_manager.manual_dir)
        plans = self._find_pairs(root)
        unpaired = [p for plan in plans.values() for p in plan.skipped]
        if self.strict and unpaired:
            raise ManualDataError(problems_message(f"{self.TITLE}: unusable files", unpaired))
        return {split: self._generate_examples(split, plan, root) for split, plan in plans.items()}

    def _split_stats(self, plan: SplitPlan) -> SplitStats:
        """Empty statistics of a split about to be generated (a subclass may count otherwise:
        `stats.label_id_pixels += histogram` adds each example's histogram)."""
        return SplitStats(np.zeros(len(self.LABEL_TABLE), np.int64), skipped=list(plan.skipped))

    def _generate_examples(self, split: str, plan: SplitPlan, root: str):
        stats = self._split_stats(plan)
        self.split_stats[split] = stats
        with ManualFiles(root) as files:
            work = ordered_map(lambda p: self._make_example(files, p), plan.pairs, self.num_workers)
            for pair, result in zip(plan.pairs, work, strict=True):
                if isinstance(result, BadFileError):
                    if self.strict:
                        raise ManualDataError(
                            problems_message(
                                f"{self.TITLE}: bad file",
                                [{"file": result.name, "reason": result.reason}],
                            )
                        )
                    stats.skipped.append({"file": result.name, "reason": result.reason})
                    continue
                example, histogram, reencoded = result
                stats.num_examples += 1
                stats.label_id_pixels += histogram
                stats.reencoded_images += reencoded
                yield pair.image_id, example
        if not stats.num_examples:
            raise ManualDataError(
                problems_message(
                    f"{self.TITLE} split {split!r}: no usable examples in {root}", stats.skipped
                )
            )

    def _make_example(self, files: ManualFiles, pair: Pair):
        """(example, [table size] raw id histogram, 1 if re-encoded) or the BadFileError."""
        try:
            image = files.read(pair.image)
            header = check_png(image, pair.image)
            label_data = files.read(pair.label)
            raw = self._decode_label(label_data, check_png(label_data, pair.label), pair.label)
        except BadFileError as e:
            return e
        if raw.shape != (header.height, header.width):
            return BadFileError(
                pair.image,
                f"size mismatch: the image is {header.width}x{header.height} but "
                f"{pair.label} is {raw.shape[1]}x{raw.shape[0]} (width x height)",
            )
        reencoded = not (header.bit_depth == 8 and header.color_type == 2)
        if reencoded:  # Rare: RGBA, palette or 16-bit images become 8-bit RGB.
            try:
                with Image.open(io.BytesIO(image)) as decoded:
                    image = encode_png(np.asarray(decoded.convert("RGB")))
            except (OSError, SyntaxError, ValueError, zlib.error) as e:
                return BadFileError(pair.image, f"cannot decode ({header.describe()}): {e}")
        histogram = np.bincount(raw.ravel(), minlength=len(self.LABEL_TABLE))
        label = encode_png(self.LABEL_TABLE[raw])
        example = {"image": image, "label": label, "image_id": pair.image_id}
        return example, histogram, int(reencoded)

    def split_summaries(self) -> dict[str, dict]:
        """Split -> its summary, for the splits generated by this instance."""
        return {
            split: stats.summary(self.LABEL_TABLE, self.KNOWN_IDS)
            for split, stats in self.split_stats.items()
        }


def pair_by_id(images: dict[str, str], labels: dict[str, str]) -> SplitPlan:
    """Pairs {id: image name} with {id: label name} (sorted by id); reports the unmatched."""
    pairs = [Pair(i, images[i], labels[i]) for i in sorted(images.keys() & labels.keys())]
    skipped = [
        {"file": images[i], "reason": "image without a label (no matching label file)"}
        for i in sorted(images.keys() - labels.keys())
    ] + [
        {"file": labels[i], "reason": "label without an image (no matching image file)"}
        for i in sorted(labels.keys() - images.keys())
    ]
    return SplitPlan(pairs, skipped)


def png_files(root: str, folder: str) -> tuple[dict[str, str], list[dict]]:
    """{stem: 'folder/stem.png'} of the PNGs in root/folder, and its other files (skipped)."""
    found, others = {}, []
    for entry in sorted(os.scandir(os.path.join(root, folder)), key=lambda e: e.name):
        if entry.name.lower().endswith(".png") and entry.is_file():
            found[entry.name[:-4]] = f"{folder}/{entry.name}"
        elif not entry.name.startswith("."):
            others.append({"file": f"{folder}/{entry.name}", "reason": "not a .png file"})
    return found, others
