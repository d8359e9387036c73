"""TFDS builder of the user's own domain: images and labels in folders ("your own domains").

  python -m launch.prepare --dataset=folder --name=source --manual_dir=/data/sim \\
      --images='images/**/*.png' --labels='labels/{stem}.png' --label_format=train_ids \\
      --classes=/data/classes.json
  python -m launch.prepare --dataset=folder --name=target --manual_dir=/data/real \\
      --images='**/*.jpg' --split_folders=train:train,validation:val \\
      --labels='{dir}/{stem}_mask.png' --label_format=colors --classes=/data/classes.json

builds the TFDS dataset `folder/NAME` (in DATA_DIR/folder/NAME/1.0.0/), read like any other
dataset: `config.data.source.name = 'folder/source'`. Flags (all relative paths are relative to
--manual_dir, or to each split folder with --split_folders):

--name: the dataset's name: lowercase letters, digits and '_', starting with a letter.
--images: a glob of the image files; `**` matches any number of folders. The examples are the
  matched files sorted by relative path; image_id = the relative path without extension. PNGs
  (8-bit RGB) are stored byte for byte, other PNGs as 8-bit RGB; JPEGs and every other format
  PIL reads are stored as lossless PNGs of PIL's `convert('RGB')` decoding (no EXIF rotation).
  Sizes may differ between images.
--labels: the label PNG of an image, a pattern with the placeholders {stem} (file name without
  extension), {name} (file name), {dir} (the image's folder, '' at the top) and {path} (the
  relative path without extension), e.g. 'labels/{path}.png' or '{dir}/{stem}_mask.png'. An
  image without its label file is skipped (listed in the summary); a split in which no image
  has a label is stored unlabelled. Files --images matches that are another image's label are
  taken as labels. Without --labels the dataset is unlabelled (e.g. a target domain).
  Unlabelled examples store an all-255 (ignore) label of the image's size.
--label_format: how label PNGs hold the classes (`folder_labels`):
  train_ids (default): pixel values are class ids 0..C-1; the class set's ignore_id (default
    255) means unlabelled; other values are stored as 255 and reported as unknown ids.
  ids: raw ids mapped by --label_map=map.json ({"raw id": train id (< C, or 255)}); the
    ignore_id is stored as 255 silently, other ids not in the map are reported as unknown.
  colors: 8-bit RGB(A) PNGs whose colours are the class set's colours (needs --classes;
    alpha is not read); its ignore_colors are stored as 255 silently, other colours as 255
    and reported.
  Integer labels may be 8-bit grayscale or palette (the indices are read), 16-bit grayscale,
  or 8/16-bit RGB(A) with --label_channel=K (the channel holding the ids; single-channel
  files ignore it).
--classes: a classes.json (`jaxda.data.classes`); default: the 19 Cityscapes classes. It is
  stored with the dataset (`classes.CLASSES_FILE` in the version folder).
Splits (at most one of the last three; default: one split --split holding every image):
--split: the name of the single split (default 'train'), or with --split_fraction the rest.
--split_folders=train:DIR1,validation:DIR2: one folder per split.
--split_lists=train:FILE1,validation:FILE2: text files (found from the working folder or
  --manual_dir) listing image paths (with or without extension), one per line, '#' comments;
  images in no list are left out (counted in the summary).
--split_fraction=validation:0.1: an image goes to `validation` when a hash of its relative path
  is below 0.1, else to --split: deterministic, and unchanged when images are added.

Files that cannot be used (image without label, unreadable or corrupt file, not an image,
image/label size mismatch, non-PNG label) are skipped and listed in the summary; --strict
makes them errors.
"""

import collections
import dataclasses
import glob
import hashlib
import io
import os
import posixpath
import re
import string

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, UnidentifiedImageError

from jaxda.data import classes as classes_lib
from jaxda.data.builders import base, bdd100k, folder_labels

_NAME = re.compile(r"[a-z][a-z0-9_]*")
_PLACEHOLDERS = ("stem", "name", "dir", "path")


@dataclasses.dataclass(frozen=True)
class FolderOptions:
    """The `launch.prepare --dataset=folder` flags (module docstring); split specs as on the
    command line ('train:DIR1,validation:DIR2') or as dicts."""

    name: str
    images: str
    labels: str | None = None
    label_format: str = "train_ids"
    label_map: str | None = None
    label_channel: int | None = None
    classes: str | None = None
    split: str | None = None  # None: 'train'.
    split_folders: str | dict | None = None
    split_lists: str | dict | None = None
    split_fraction: str | None = None

    def check(self) -> None:
        """Raises ManualDataError naming the flag for an invalid option or combination."""
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise base.ManualDataError(
                f"--name={self.name!r}: a folder dataset's name uses lowercase letters, digits "
                "and '_', starting with a letter (it becomes the TFDS name 'folder/NAME')"
            )
        for flag in ("images", "labels"):
            value = getattr(self, flag)
            if value is not None and (not value or os.path.isabs(value)):
                raise base.ManualDataError(
                    f"--{flag}={value!r}: give a pattern relative to --manual_dir"
                )
        if self.labels is not None:
            _label_fields(self.labels)
        if self.label_format not in folder_labels.FORMATS:
            raise base.ManualDataError(
                f"--label_format={self.label_format}: one of {', '.join(folder_labels.FORMATS)}"
            )
        if self.labels is None and (
            self.label_format != "train_ids" or self.label_map or self.label_channel is not None
        ):
            raise base.ManualDataError(
                "--label_format, --label_map and --label_channel describe label files: give "
                "--labels=PATTERN too (without it the dataset is unlabelled)"
            )
        if (self.label_format == "ids") != bool(self.label_map):
            raise base.ManualDataError(
                "--label_format=ids needs --label_map=FILE.json, and --label_map needs "
                f"--label_format=ids (given: --label_format={self.label_format})"
            )
        if self.label_format == "colors" and not self.classes:
            raise base.ManualDataError(
                "--label_format=colors needs --classes=classes.json (the colour of each class)"
            )
        if self.label_channel is not None and (
            self.label_format == "colors" or self.label_channel < 0
        ):
            raise base.ManualDataError(
                f"--label_channel={self.label_channel}: a channel index >= 0 of integer label "
                "files (--label_format=train_ids or ids)"
            )
        given = [f for f in ("split_folders", "split_lists", "split_fraction") if getattr(self, f)]
        if len(given) > 1:
            raise base.ManualDataError(f"give at most one of --{', --'.join(given)}")
        if self.split is not None and given and given[0] != "split_fraction":
            raise base.ManualDataError(
                f"--split names the only split (or, with --split_fraction, the rest); with "
                f"--{given[0]} the splits are named there"
            )
        for split in self.split_names():
            if not _NAME.fullmatch(split):
                raise base.ManualDataError(
                    f"split name {split!r}: lowercase letters, digits and '_', starting with a "
                    "letter (e.g. train, validation)"
                )

    def split_names(self) -> list[str]:
        if self.split_folders:
            return list(_split_spec(self.split_folders, "split_folders"))
        if self.split_lists:
            return list(_split_spec(self.split_lists, "split_lists"))
        rest = self.split or "train"
        if self.split_fraction:
            name, _ = _fraction(self.split_fraction, rest)
            return [rest, name]
        return [rest]


def _split_spec(spec: str | dict, flag: str) -> dict[str, str]:
    """'train:A,validation:B' (or a dict) -> {'train': 'A', 'validation': 'B'}."""
    if isinstance(spec, dict):
        return dict(spec)
    parsed = {}
    for part in spec.split(","):
        split, sep, value = part.strip().partition(":")
        if not sep or not split or not value or split in parsed:
            raise base.ManualDataError(
                f"--{flag}={spec}: expected SPLIT:PATH pairs separated by commas, each split once "
                f"(e.g. train:train,validation:val)"
            )
        parsed[split] = value
    return parsed


def _fraction(spec: str, rest: str) -> tuple[str, float]:
    """'validation:0.1' -> ('validation', 0.1)."""
    split, _, value = spec.partition(":")
    try:
        fraction = float(value)
    except ValueError:
        fraction = -1.0
    if not split or not 0 < fraction < 1 or split == rest:
        raise base.ManualDataError(
            f"--split_fraction={spec}: expected SPLIT:FRACTION with 0 < FRACTION < 1 and SPLIT "
            f"other than --split ({rest!r}), e.g. validation:0.1"
        )
    return split, fraction


def _label_fields(pattern: str) -> set[str]:
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(pattern) if f is not None}
    except ValueError as e:
        raise base.ManualDataError(f"--labels={pattern}: {e}") from None
    if not fields or fields - set(_PLACEHOLDERS):
        raise base.ManualDataError(
            f"--labels={pattern}: use the placeholders {{{'}, {'.join(_PLACEHOLDERS)}}} "
            f"(found {sorted(fields) or 'none'}), e.g. labels/{{stem}}.png"
        )
    return fields


def label_path(pattern: str, image: str) -> str:
    """The label path of the image at relative path `image` under the --labels pattern."""
    folder, name = posixpath.split(image)
    stem = posixpath.splitext(name)[0]
    path = pattern.format(stem=stem, name=name, dir=folder, path=posixpath.join(folder, stem))
    return posixpath.normpath(path.lstrip("/"))  # {dir} = '' at the top: '/x.png' -> 'x.png'.


def fraction_of(path: str) -> float:
    """A stable number in [0, 1) for a relative path: the first 8 bytes of its SHA-1 / 2^64."""
    return int.from_bytes(hashlib.sha1(path.encode()).digest()[:8], "big") / 2**64


@dataclasses.dataclass
class FolderPlan(base.SplitPlan):
    unlabelled: str = ""  # Why the split is unlabelled ('' = labelled).


@dataclasses.dataclass
class FolderStats(base.SplitStats):
    unlabelled: str = ""


class FolderBuilder(base.ManualSegmentationBuilder, skip_registration=True):
    """A dataset of the user's image (and label) folders; one BuilderConfig per --name."""

    name = "folder"
    PREPARE_NAME = "folder"
    TITLE = "Folder dataset"
    EXPECTED = "the image files that --images matches"
    DOWNLOAD = ""
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass the folder holding your images as --manual_dir."

    def __init__(self, *, options: FolderOptions | None = None, **kwargs):
        """`options` to build; reading a prepared dataset needs only config=NAME."""
        self.options = options  # Before super().__init__, which calls _info.
        if options is not None:
            options.check()
            kwargs["config"] = options.name
            self.class_set = (
                classes_lib.load(options.classes, "classes")
                if options.classes
                else classes_lib.CITYSCAPES
            )
        super().__init__(**kwargs)
        self.TITLE = f"Folder dataset {self.builder_config.name!r}"

    @classmethod
    def get_builder_config(cls, name: str, version=None) -> tfds.core.BuilderConfig:
        return tfds.core.BuilderConfig(name=name)  # Any --name is a config of its own.

    def _description(self) -> str:
        o = self.options
        if o is None:
            return "A folder dataset built by launch.prepare --dataset=folder."
        labels = f"labels {o.labels!r} ({o.label_format})" if o.labels else "no labels"
        return (
            f"Folder dataset {o.name!r}: images {o.images!r}, {labels}; labels stored as train "
            f"ids of {self.class_set.num_classes} classes ({', '.join(self.class_set.names)}; "
            "255 = ignore). PNG images stored as they are, others as PNGs of PIL's decoding."
        )

    def _find_pairs(self, root: str) -> dict[str, FolderPlan]:
        o = self.options
        self.encoding = folder_labels.make_encoding(
            o.label_format, self.class_set, o.label_map, o.label_channel
        )
        self.unassigned = 0  # Images in no --split_lists file.
        if o.split_folders:
            folders = _split_spec(o.split_folders, "split_folders")
            found = {split: (sub, self._find_images(root, sub)) for split, sub in folders.items()}
        else:
            parts = self._assign(root, self._find_images(root, ""))
            found = {split: ("", images) for split, images in parts.items()}
        plans = {split: self._plan(root, sub, images) for split, (sub, images) in found.items()}
        if o.labels and all(plan.unlabelled for plan in plans.values()):
            sub, images = next(iter(found.values()))
            example = posixpath.join(sub, label_path(o.labels, images[0]))
            raise base.ManualDataError(
                f"--labels={o.labels} matches no file for any image: e.g. for "
                f"{posixpath.join(sub, images[0])} it looked for {os.path.join(root, example)}"
            )
        return plans

    def _find_images(self, root: str, sub: str) -> list[str]:
        """The sorted relative paths of the images in root/sub that --images matches."""
        pattern, folder = self.options.images, os.path.join(root, sub) if sub else root
        where = f" (--split_folders: {sub})" if sub else ""
        if not os.path.isdir(folder):
            raise base.ManualDataError(
                f"--split_folders={self.options.split_folders}: {folder} is not a folder; "
                f"--manual_dir={root} holds {base.list_folder(root)}"
            )
        paths = glob.glob(pattern, root_dir=folder, recursive=True)
        paths = sorted(p for p in paths if os.path.isfile(os.path.join(folder, p)))
        if not paths:
            raise base.ManualDataError(
                f"--images={pattern} matches no file in {folder}{where}, which holds "
                f"{base.list_folder(folder)}"
            )
        if self.options.labels:  # Masks next to their images that the glob matched too.
            labels = [label_path(self.options.labels, p) for p in paths]
            same = next((p for p, label in zip(paths, labels, strict=True) if p == label), None)
            if same is not None:
                raise base.ManualDataError(
                    f"--labels={self.options.labels} gives {same} as its own label"
                )
            paths = [p for p in paths if p not in set(labels)]
        return paths

    def _assign(self, root: str, images: list[str]) -> dict[str, list[str]]:
        """{split: images} of the images of the manual folder, by --split_lists or
        --split_fraction (else all in --split)."""
        o, rest = self.options, self.options.split or "train"
        if o.split_fraction:
            name, fraction = _fraction(o.split_fraction, rest)
            parts = {rest: [], name: []}
            for image in images:
                parts[name if fraction_of(image) < fraction else rest].append(image)
            for split, part in parts.items():
                if not part:
                    raise base.ManualDataError(
                        f"--split_fraction={o.split_fraction}: split {split!r} gets none of the "
                        f"{len(images)} images"
                    )
            return parts
        if not o.split_lists:
            return {rest: images}
        by_name = {**{posixpath.splitext(i)[0]: i for i in images}, **{i: i for i in images}}
        listed: dict[str, str] = {}  # image -> 'FILE:LINE' where it is listed.
        parts, missing = {}, []
        for split, path in _split_spec(o.split_lists, "split_lists").items():
            parts[split] = []
            for where, entry in _read_list(path, root):
                image = by_name.get(posixpath.normpath(entry))
                if image is None:
                    missing.append(f"{where}: {entry}")
                elif image in listed:
                    raise base.ManualDataError(
                        f"--split_lists: {where}: {image} is already listed at {listed[image]}"
                    )
                else:
                    listed[image] = where
                    parts[split].append(image)
        if missing:
            raise base.ManualDataError(
                f"--split_lists: {len(missing)} listed images are not among the files "
                f"--images={o.images} matches in {root}: {'; '.join(missing[:10])}"
            )
        empty = [split for split, part in parts.items() if not part]
        if empty:
            raise base.ManualDataError(
                f"--split_lists={o.split_lists}: no image listed for {empty}"
            )
        self.unassigned = len(images) - len(listed)
        return {split: sorted(part) for split, part in parts.items()}

    def _plan(self, root: str, sub: str, images: list[str]) -> FolderPlan:
        """The pairs of one split; images without a label or with a duplicate id skipped."""
        pattern, ids = self.options.labels, {}
        pairs, skipped = [], []
        for image in images:
            image_id, name = posixpath.splitext(image)[0], posixpath.join(sub, image)
            if image_id in ids:
                reason = f"same image id (path without extension) as {ids[image_id]}"
                skipped.append({"file": name, "reason": reason})
                continue
            ids[image_id] = name
            label = posixpath.join(sub, label_path(pattern, image)) if pattern else ""
            pairs.append(base.Pair(image_id, name, label))
        has_label = {
            p.image_id for p in pairs if p.label and os.path.isfile(os.path.join(root, p.label))
        }
        if not pattern or not has_label:  # Unlabelled: every label is stored as all-ignore.
            pairs = [dataclasses.replace(p, label="") for p in pairs]
            why = "no label file found for any image" if pattern else "no --labels given"
            return FolderPlan(pairs, skipped, unlabelled=why)
        skipped += [
            {"file": p.image, "reason": f"image without a label: expected {p.label}"}
            for p in pairs
            if p.image_id not in has_label
        ]
        return FolderPlan([p for p in pairs if p.image_id in has_label], skipped)

    def _split_stats(self, plan: FolderPlan) -> FolderStats:
        return FolderStats(
            collections.Counter(), skipped=list(plan.skipped), unlabelled=plan.unlabelled
        )

    def _make_example(self, files: base.ManualFiles, pair: base.Pair):
        """(example, {raw value: pixels}, 1 if re-encoded) or the BadFileError."""
        try:
            image, (height, width), reencoded = image_png(files.read(pair.image), pair.image)
            if pair.label:
                data = files.read(pair.label)
                if not data.startswith(base.PNG_SIGNATURE):
                    raise base.BadFileError(pair.label, "labels must be PNG files: not a PNG")
                raw = self.encoding.decode(data, base.check_png(data, pair.label), pair.label)
        except base.BadFileError as e:
            return e
        if not pair.label:
            label = np.full((height, width), folder_labels.IGNORE, np.uint8)
            histogram = collections.Counter({folder_labels.UNLABELLED: height * width})
        elif raw.shape != (height, width):
            return base.BadFileError(
                pair.image,
                f"size mismatch: the image is {width}x{height} but {pair.label} is "
                f"{raw.shape[1]}x{raw.shape[0]} (width x height)",
            )
        else:
            label, histogram = self.encoding.table[raw], self.encoding.histogram(raw)
        example = {"image": image, "label": base.encode_png(label), "image_id": pair.image_id}
        return example, histogram, int(reencoded)

    def split_summaries(self) -> dict[str, dict]:
        summaries = {}
        for split, stats in self.split_stats.items():
            summary = {"num_examples": stats.num_examples, "labelled": not stats.unlabelled}
            if stats.unlabelled:
                summary["unlabelled"] = stats.unlabelled
            summary.update(self.encoding.summary(stats.label_id_pixels, self.class_set.num_classes))
            summary["reencoded_images"] = stats.reencoded_images
            summary["skipped"] = stats.skipped
            summaries[split] = summary
        return summaries


def _read_list(path: str, root: str) -> list[tuple[str, str]]:
    """[('FILE:LINE', entry)] of a split list (relative to the working or manual folder)."""
    candidates = [os.path.expanduser(path), os.path.join(root, path)]
    found = next((p for p in candidates if os.path.isfile(p)), None)
    if found is None:
        raise base.ManualDataError(
            f"--split_lists: {path}: no such file (looked in {os.getcwd()} and {root})"
        )
    with open(found) as f:
        lines = [line.strip() for line in f]
    return [
        (f"{found}:{number}", line.removeprefix("./"))
        for number, line in enumerate(lines, 1)
        if line and not line.startswith("#")
    ]


def image_png(data: bytes, name: str) -> tuple[bytes, tuple[int, int], bool]:
    """Image file bytes -> (PNG bytes to store, (height, width), whether re-encoded)."""
    if data.startswith(base.PNG_SIGNATURE):
        header = base.check_png(data, name)
        if header.bit_depth == 8 and header.color_type == 2:
            return data, (header.height, header.width), False
        array = bdd100k.decode_jpeg(data, name)  # PIL's convert('RGB'), as `base` re-encodes.
        return base.encode_png(array), array.shape[:2], True
    if not data:
        raise base.BadFileError(name, "empty file")
    try:
        Image.open(io.BytesIO(data)).close()  # Reads the header only.
    except UnidentifiedImageError:
        raise base.BadFileError(name, "not an image file (PIL cannot identify it)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise base.BadFileError(name, f"cannot decode the image: {e}") from None
    array = bdd100k.decode_jpeg(data, name)
    return bdd100k.encode_photo_png(array), array.shape[:2], True
