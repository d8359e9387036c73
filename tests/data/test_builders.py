"""The GTA5, SYNTHIA and Cityscapes builders, on tiny data written in the real on-disk formats.

Each test writes the files a user downloads (palette PNG labels, 16-bit SYNTHIA labels from a
hand-rolled PNG encoder, Cityscapes zips or folders), builds the dataset through
`jaxda.data.prepare` and reads it back through `jaxda.data.sources.SplitReader`.
"""

import io
import os
import struct
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image

from jaxda.data import labels as labels_lib
from jaxda.data import prepare, sources
from jaxda.data.builders import base

CS_TABLE = labels_lib.lookup_table(labels_lib.CITYSCAPES_LABEL_TO_TRAIN_ID)
SYNTHIA_TABLE = labels_lib.lookup_table(labels_lib.SYNTHIA_TO_TRAIN_ID, size=1 << 16)
# Cityscapes label ids written into GTA5 labels: mapped ones, unmapped known ones (0, 4) and
# ids outside 0..33 (34, 255), which must be counted as unknown.
GTA5_IDS = np.array([7, 8, 11, 26, 33, 0, 4, 34, 255], np.uint8)


def png16(array: np.ndarray) -> bytes:
    """[H, W, C] uint16 (C = 3 or 4) -> 16-bit RGB/RGBA PNG, written independently of PIL/TF."""
    height, width, channels = array.shape
    rows = b"".join(b"\0" + array[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    color_type = {3: 2, 4: 6}[channels]
    ihdr = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return (
        base.PNG_SIGNATURE
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def png_bytes(array: np.ndarray, palette: bool = False) -> bytes:
    image = Image.fromarray(array)
    if palette:  # GTA5: mode P; colours unlike the indices, so reading colours would be wrong.
        image = image.convert("P")
        image.putpalette(np.random.default_rng(1).integers(0, 256, 768, dtype=np.uint8).tobytes())
        assert image.mode == "P"
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write(path, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def random_image(rng, height, width) -> np.ndarray:
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def make_gta5(root, rng) -> dict:
    """A GTA5 folder; returns {id: (image bytes, raw label ids)} of the usable pairs."""
    pairs = {}
    for index, (height, width) in enumerate([(16, 24), (12, 20), (16, 24)], 1):
        image = png_bytes(random_image(rng, height, width))
        raw = rng.choice(GTA5_IDS, (height, width))
        image_id = f"{index:05d}"
        write(f"{root}/images/{image_id}.png", image)
        write(f"{root}/labels/{image_id}.png", png_bytes(raw, palette=True))
        pairs[image_id] = (image, raw)
    # Size mismatch (as in the real data), an image without label, a label without image.
    write(f"{root}/images/00004.png", png_bytes(random_image(rng, 16, 24)))
    write(f"{root}/labels/00004.png", png_bytes(rng.choice(GTA5_IDS, (16, 20)), palette=True))
    write(f"{root}/images/00005.png", png_bytes(random_image(rng, 16, 24)))
    write(f"{root}/labels/00006.png", png_bytes(rng.choice(GTA5_IDS, (16, 24)), palette=True))
    return pairs


def make_synthia(root, rng) -> dict:
    """A SYNTHIA folder (one 4-channel label); returns {id: (image bytes, class ids)}."""
    pairs = {}
    for index, channels in enumerate([3, 4, 3]):
        image = png_bytes(random_image(rng, 10, 14))
        label = np.zeros((10, 14, channels), np.uint16)
        label[..., 0] = rng.choice(np.array([0, 1, 3, 8, 10, 13, 21, 22, 23, 300]), (10, 14))
        label[..., 1] = rng.integers(1000, 65536, (10, 14))  # Instance ids: must be ignored.
        if channels == 4:
            label[..., 3] = 65535
        image_id = f"{index:07d}"
        write(f"{root}/RGB/{image_id}.png", image)
        write(f"{root}/GT/LABELS/{image_id}.png", png16(label))
        pairs[image_id] = (image, label[..., 0])
    return pairs


CITIES = {"train": ("aachen", "bochum"), "val": ("frankfurt",)}


def make_cityscapes(root, rng, zipped: bool, size: tuple[int, int] = (8, 16)) -> dict:
    """Cityscapes as the two official zips or as their extracted folders.

    Returns {'train'|'validation': {id: (image bytes, label ids)}} of the usable pairs.
    """
    files, pairs = {}, {"train": {}, "validation": {}}
    for split, cities in CITIES.items():
        for city in cities:
            for frame in range(2):
                stem = f"{city}_000000_{frame:06d}"
                image = png_bytes(random_image(rng, *size))
                raw = rng.integers(0, 36, size).astype(np.uint8)  # 34, 35: unknown ids.
                files[f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png"] = image
                gt = f"gtFine/{split}/{city}/{stem}_gtFine"
                files[f"{gt}_labelIds.png"] = png_bytes(raw)
                files[f"{gt}_color.png"] = png_bytes(random_image(rng, *size))
                files[f"{gt}_instanceIds.png"] = png_bytes(raw)
                files[f"{gt}_polygons.json"] = b"{}"
                pairs["train" if split == "train" else "validation"][stem] = (image, raw)
    # Ignored: the test split, README; reported: a validation image without label.
    files["leftImg8bit/test/berlin/berlin_000000_000000_leftImg8bit.png"] = png_bytes(
        random_image(rng, 8, 16)
    )
    files["leftImg8bit/val/frankfurt/frankfurt_000001_000000_leftImg8bit.png"] = png_bytes(
        random_image(rng, 8, 16)
    )
    if not zipped:
        for name, data in files.items():
            write(f"{root}/{name}", data)
        return pairs
    os.makedirs(root, exist_ok=True)
    for part in ("leftImg8bit", "gtFine"):
        with zipfile.ZipFile(f"{root}/{part}_trainvaltest.zip", "w") as archive:
            archive.writestr("README", b"readme")
            for name, data in files.items():
                if name.startswith(part + "/"):
                    archive.writestr(name, data)
    return pairs


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def check_split(name, split, data_dir, expected: dict, table: np.ndarray) -> None:
    """Stored examples == expected {id: (image bytes, raw ids)} in id order, labels mapped."""
    reader = sources.SplitReader(name, split, data_dir)
    assert len(reader) == len(expected)
    for index, (image, raw) in enumerate(expected[k] for k in sorted(expected)):
        example = reader[index]
        assert example["image"] == image  # The original PNG bytes, not re-encoded.
        np.testing.assert_array_equal(decode(example["label"]), table[raw])


def expected_counts(raws, table, known_ids) -> dict:
    ids, counts = np.unique(np.concatenate([r.ravel() for r in raws]), return_counts=True)
    class_pixels = [int(counts[table[ids] == c].sum()) for c in range(labels_lib.NUM_CLASSES)]
    return {
        "class_pixels": class_pixels,
        "ignored_pixels": int(counts.sum()) - sum(class_pixels),
        "unknown_label_ids": {
            str(i): int(n) for i, n in zip(ids, counts, strict=True) if i not in known_ids
        },
    }


def test_check_png_catches_truncated_and_corrupt_files():
    data = png_bytes(np.zeros((4, 6, 3), np.uint8))
    assert base.check_png(data, "x.png") == base.PngHeader(6, 4, 8, 2)
    with pytest.raises(base.BadFileError, match=r"x.png: truncated PNG"):
        base.check_png(data[:-20], "x.png")
    corrupt = bytearray(data)
    corrupt[45] ^= 0xFF  # Inside the IDAT data.
    with pytest.raises(base.BadFileError, match=r"CRC mismatch in chunk IDAT"):
        base.check_png(bytes(corrupt), "x.png")
    with pytest.raises(base.BadFileError, match=r"not a PNG"):
        base.check_png(b"GIF89a", "x.png")


def test_gta5(tmp_path):
    pairs = make_gta5(tmp_path / "gta5", np.random.default_rng(0))
    data_dir = str(tmp_path / "tfds")
    summary = prepare.prepare("gta5", str(tmp_path / "gta5"), data_dir)
    check_split("gta5", "train", data_dir, pairs, CS_TABLE)
    train = summary["splits"]["train"]
    assert train["num_examples"] == 3
    expected = expected_counts([raw for _, raw in pairs.values()], CS_TABLE, range(34))
    assert {k: train[k] for k in expected} == expected
    assert set(expected["unknown_label_ids"]) == {"34", "255"}
    skipped = {s["file"]: s["reason"] for s in train["skipped"]}
    assert set(skipped) == {"images/00004.png", "images/00005.png", "labels/00006.png"}
    assert (
        "size mismatch: the image is 24x16 but labels/00004.png is 20x16"
        in skipped["images/00004.png"]
    )


def test_gta5_strict_stops_at_the_mismatched_pair(tmp_path):
    make_gta5(tmp_path / "gta5", np.random.default_rng(0))
    os.remove(tmp_path / "gta5/images/00005.png")
    os.remove(tmp_path / "gta5/labels/00006.png")
    with pytest.raises(base.ManualDataError, match=r"images/00004.png: size mismatch"):
        prepare.prepare("gta5", str(tmp_path / "gta5"), str(tmp_path / "tfds"), strict=True)


def test_synthia_16_bit_labels(tmp_path):
    pairs = make_synthia(tmp_path / "synthia", np.random.default_rng(0))
    data_dir = str(tmp_path / "tfds")
    summary = prepare.prepare("synthia", str(tmp_path / "synthia"), data_dir)
    check_split("synthia_rand_cityscapes", "train", data_dir, pairs, SYNTHIA_TABLE)
    train = summary["splits"]["train"]
    expected = expected_counts([raw for _, raw in pairs.values()], SYNTHIA_TABLE, range(23))
    assert {k: train[k] for k in expected} == expected
    assert set(train["unknown_label_ids"]) == {"23", "300"}
    assert train["num_examples"] == 3 and train["skipped"] == []


@pytest.mark.parametrize("zipped", [True, False], ids=["zips", "folders"])
def test_cityscapes(tmp_path, zipped):
    pairs = make_cityscapes(tmp_path / "cityscapes", np.random.default_rng(0), zipped)
    data_dir = str(tmp_path / "tfds")
    summary = prepare.prepare("cityscapes", str(tmp_path / "cityscapes"), data_dir)
    assert list(summary["splits"]) == ["train", "validation"]
    for split, expected_pairs in pairs.items():
        check_split("cityscapes_fine", split, data_dir, expected_pairs, CS_TABLE)
        info = summary["splits"][split]
        raws = [raw for _, raw in expected_pairs.values()]
        expected = expected_counts(raws, CS_TABLE, range(34))
        assert {k: info[k] for k in expected} == expected
        assert info["num_examples"] == len(expected_pairs)
    prefix = "leftImg8bit_trainvaltest.zip:" if zipped else ""
    assert summary["splits"]["validation"]["skipped"] == [
        {
            "file": f"{prefix}leftImg8bit/val/frankfurt/frankfurt_000001_000000_leftImg8bit.png",
            "reason": "image without a label (no matching label file)",
        }
    ]
    assert summary["splits"]["train"]["skipped"] == []


def test_truncated_files_are_skipped_or_strict_errors(tmp_path):
    make_gta5(tmp_path / "gta5", np.random.default_rng(0))
    image = tmp_path / "gta5/images/00002.png"
    image.write_bytes(image.read_bytes()[:-30])
    label = tmp_path / "gta5/labels/00003.png"
    label.write_bytes(label.read_bytes()[:50])
    summary = prepare.prepare("gta5", str(tmp_path / "gta5"), str(tmp_path / "tfds"))
    skipped = {s["file"]: s["reason"] for s in summary["splits"]["train"]["skipped"]}
    assert skipped["images/00002.png"].startswith("truncated PNG")
    assert skipped["labels/00003.png"].startswith("truncated PNG")
    assert summary["splits"]["train"]["num_examples"] == 1
    os.remove(tmp_path / "gta5/images/00005.png")  # Unpaired files would stop it earlier.
    os.remove(tmp_path / "gta5/labels/00006.png")
    with pytest.raises(base.ManualDataError, match=r"images/00002.png: truncated PNG"):
        prepare.prepare("gta5", str(tmp_path / "gta5"), str(tmp_path / "tfds2"), strict=True)
    assert os.listdir(tmp_path / "tfds2/gta5") == [], "no partial dataset is left behind"


def test_non_rgb_images_are_stored_as_rgb(tmp_path):
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (6, 8, 4), dtype=np.uint8)
    raw = rng.choice(GTA5_IDS, (6, 8))
    write(tmp_path / "gta5/images/00001.png", png_bytes(rgba))
    write(tmp_path / "gta5/labels/00001.png", png_bytes(raw, palette=True))
    summary = prepare.prepare("gta5", str(tmp_path / "gta5"), str(tmp_path / "tfds"))
    assert summary["splits"]["train"]["reencoded_images"] == 1
    example = sources.SplitReader("gta5", "train", str(tmp_path / "tfds"))[0]
    np.testing.assert_array_equal(decode(example["image"]), rgba[..., :3])
    np.testing.assert_array_equal(decode(example["label"]), CS_TABLE[raw])
