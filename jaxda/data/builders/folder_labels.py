"""Label encodings of folder datasets (`folder`): label PNG -> raw values -> stored train ids.

A `LabelEncoding` decodes one label PNG to an [H, W] array of raw values and maps each raw value
through a lookup table to a stored train id (0..C-1, 255 = ignore). Raw values are:

* `train_ids` / `ids`: integers < 2^16: the pixel values of an 8-bit grayscale or palette PNG
  (palette *indices*, as label tools write them), of a 16-bit grayscale PNG, or one channel
  (`--label_channel`) of an 8- or 16-bit RGB/RGBA PNG;
* `colors`: 0xRRGGBB of an 8-bit RGB/RGBA/palette/grayscale PNG (alpha is not read).

Raw values the encoding does not define are stored as 255 and reported per value ("unknown").
"""

import collections
import io
import json
import os
import threading
import zlib

import numpy as np
from PIL import Image

from jaxda.data import classes as classes_lib
from jaxda.data.builders import base

FORMATS = ("train_ids", "ids", "colors")
IGNORE = 255
UNLABELLED = -1  # Histogram key of the pixels of unlabelled images (ignored, not unknown).
_TF_LOCK = threading.Lock()


def _tensorflow():
    """TensorFlow, imported once under a lock (first use may be in a worker thread)."""
    with _TF_LOCK:
        import tensorflow as tf  # Only for 16-bit labels: PIL garbles 16-bit colour PNGs.
    return tf


class LabelEncoding:
    """How the label files of a folder dataset hold the classes.

    table: [2^16] (integer formats) or [2^24] (colours) uint8: raw value -> stored train id.
    known: same shape, bool: raw values that are not reported as unknown (classes, ignore).
    """

    def __init__(self, label_format: str, table: np.ndarray, known: np.ndarray, channel=None):
        self.label_format, self.table, self.known, self.channel = (
            label_format,
            table,
            known,
            channel,
        )
        self.unknown_key = "unknown_colors" if label_format == "colors" else "unknown_label_ids"

    def decode(self, data: bytes, header: base.PngHeader, name: str) -> np.ndarray:
        """Label PNG bytes -> [H, W] raw values (indices into `table`)."""
        if self.label_format == "colors":
            return _decode_colors(data, header, name)
        return _decode_ids(data, header, name, self.channel)

    def histogram(self, raw: np.ndarray) -> collections.Counter:
        """{raw value: pixels} of an [H, W] raw label."""
        if raw.dtype.itemsize <= 2:  # Integer labels: bincount over at most 2^16 bins is fast.
            counts = np.bincount(raw.ravel())
            values = np.flatnonzero(counts)
            counts = counts[values]
        else:
            values, counts = np.unique(raw, return_counts=True)
        return collections.Counter(dict(zip(values.tolist(), counts.tolist(), strict=True)))

    def value_name(self, value: int) -> str:
        """'7' for an integer label value, '#ff00ff' for a colour."""
        return f"#{value:06x}" if self.label_format == "colors" else str(value)

    def summary(self, histogram: collections.Counter, num_classes: int) -> dict:
        """Pixels per class ([C]), ignored pixels and unknown values of a {raw: pixels} count."""
        class_pixels, ignored, unknown = [0] * num_classes, 0, {}
        for value, pixels in sorted(histogram.items()):
            if value == UNLABELLED:
                ignored += pixels
                continue
            train_id = int(self.table[value])
            if train_id < num_classes:
                class_pixels[train_id] += pixels
            else:
                ignored += pixels
            if not self.known[value]:
                unknown[self.value_name(value)] = pixels
        return {
            "class_pixels": class_pixels,
            "ignored_pixels": ignored,
            self.unknown_key: unknown,
        }


def make_encoding(
    label_format: str,
    class_set: classes_lib.ClassSet,
    label_map: str | None = None,
    label_channel: int | None = None,
) -> LabelEncoding:
    """The encoding of `--label_format` (with `--label_map` for 'ids') under `class_set`."""
    num_classes = class_set.num_classes
    if label_format == "colors":
        table = np.full((1 << 24,), IGNORE, np.uint8)
        known = np.zeros((1 << 24,), bool)
        for train_id, color in enumerate(class_set.colors):
            table[_pack(color)], known[_pack(color)] = train_id, True
        for color in class_set.ignore_colors:
            known[_pack(color)] = True
        return LabelEncoding(label_format, table, known)
    table = np.full((1 << 16,), IGNORE, np.uint8)
    known = np.zeros((1 << 16,), bool)
    known[class_set.ignore_id] = True  # 'Not labelled' in the user's files: ignored silently.
    if label_format == "train_ids":
        table[:num_classes], known[:num_classes] = np.arange(num_classes), True
    else:
        for raw, train_id in read_label_map(label_map, num_classes).items():
            table[raw], known[raw] = train_id, True
    return LabelEncoding(label_format, table, known, label_channel)


def read_label_map(path: str, num_classes: int) -> dict[int, int]:
    """{raw id: train id} from a JSON file {"raw id": train id} (train ids < C or 255)."""
    path = os.path.abspath(os.path.expanduser(path))
    flag = f"--label_map={path}"
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise base.ManualDataError(f"{flag}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise base.ManualDataError(f"{flag}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict) or not data:
        raise base.ManualDataError(f'{flag}: expected a JSON object {{"raw id": train id, ...}}')
    mapping = {}
    for key, value in data.items():
        if not (key.isdigit() and int(key) < 1 << 16):
            raise base.ManualDataError(
                f"{flag}: entry {key!r}: a raw id is an integer 0..65535 (written as a string)"
            )
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or not (0 <= value < num_classes or value == IGNORE)
        ):
            raise base.ManualDataError(
                f"{flag}: entry {key!r}: {value!r} is not a train id of the {num_classes} classes "
                f"(0..{num_classes - 1}) or {IGNORE} (ignore)"
            )
        mapping[int(key)] = value
    return mapping


def _pack(color) -> int:
    red, green, blue = color
    return (red << 16) | (green << 8) | blue


def _decode_colors(data: bytes, header: base.PngHeader, name: str) -> np.ndarray:
    """An 8-bit colour label PNG -> [H, W] uint32 0xRRGGBB."""
    if header.bit_depth == 16:
        raise base.BadFileError(
            name, f"--label_format=colors reads 8-bit colour PNGs, found a {header.describe()} PNG"
        )
    rgb = _pil_array(data, name, convert="RGB").astype(np.uint32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def _decode_ids(data: bytes, header: base.PngHeader, name: str, channel: int | None):
    """An integer label PNG -> [H, W] uint8 or uint16 raw ids."""
    if header.bit_depth == 16:
        tf = _tensorflow()
        try:
            array = tf.io.decode_png(data, channels=0, dtype=tf.uint16).numpy()
        except tf.errors.OpError as e:
            raise base.BadFileError(name, f"cannot decode: {e.message}") from None
    else:  # PIL keeps palette indices (TensorFlow would return the palette's colours).
        array = _pil_array(data, name)
    if array.ndim == 2 or array.shape[-1] <= 2:  # Grayscale (+ alpha): the gray values.
        return array if array.ndim == 2 else array[..., 0]
    if channel is None:
        raise base.ManualDataError(
            f"{name} is a {header.describe()} label PNG: give --label_channel=K (0 = red, "
            "1 = green, 2 = blue) to read the ids from one channel, or --label_format=colors "
            "if the colours stand for the classes"
        )
    if channel >= array.shape[-1]:
        raise base.ManualDataError(
            f"--label_channel={channel}, but {name} ({header.describe()}) has "
            f"{array.shape[-1]} channels"
        )
    return array[..., channel]


def _pil_array(data: bytes, name: str, convert: str | None = None) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            array = np.asarray(image.convert(convert) if convert else image)
    except (OSError, SyntaxError, ValueError, zlib.error) as e:
        raise base.BadFileError(name, f"cannot decode: {e}") from None
    return array.astype(np.uint8) if array.dtype == bool else array  # 1-bit PNGs: 0/1.
