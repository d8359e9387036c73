"""The BDD100K and Mapillary Vistas builders and RobustNet's Mapillary evaluation transform.

The builder tests write the files a user downloads (JPEG images, BDD's train-id PNGs,
Mapillary's 8-bit palette PNGs of class ids 0..65), build them through `jaxda.data.prepare`
and check the summary and the stored examples against NumPy/PIL computations of their own.
The transform test compares against a PIL transcription of RobustNet's transforms.
"""

import io
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageOps

from jaxda.data import eval_transforms, prepare, sources
from jaxda.data import labels as labels_lib
from jaxda.data.builders import base
from tests.data.test_builders import decode, png_bytes, random_image, write

# RobustNet's Mapillary -> Cityscapes map, transcribed from its datasets/mapillary.py,
# gen_id_to_ignore(): {Mapillary id: (train id, the class name in RobustNet's comment)}; every
# other id of 0..65 -> 255 (ignore).
ROBUSTNET_MAPILLARY = {
    13: (0, "Road"),
    24: (0, "Lane Marking - General"),
    41: (0, "Manhole"),
    2: (1, "Curb"),
    15: (1, "Sidewalk"),
    17: (2, "Building"),
    6: (3, "Wall"),
    3: (4, "Fence"),
    45: (5, "Pole"),
    47: (5, "Utility Pole"),
    48: (6, "Traffic Light"),
    50: (7, "Traffic Sign"),
    30: (8, "Vegitation"),  # Sic.
    29: (9, "Terrain"),
    27: (10, "Sky"),
    19: (11, "Person"),
    20: (12, "Bicyclist"),
    21: (12, "Motorcyclist"),
    22: (12, "Other Rider"),
    55: (13, "Car"),
    61: (14, "Truck"),
    54: (15, "Bus"),
    58: (16, "On Rails"),
    57: (17, "Motorcycle"),
    52: (18, "Bicycle"),
}
SIZE = (16, 24)  # (height, width) of the test images.


def jpeg_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def pil_pixels(jpeg: bytes) -> np.ndarray:
    """What RobustNet feeds its network: PIL's decoding, converted to RGB."""
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


def class_counts(raws: list[np.ndarray], to_train_id: dict[int, int]) -> dict:
    """The summary's counts, from the raw ids and a {raw id: train id} map (others ignored)."""
    pixels = np.concatenate([r.ravel() for r in raws]).astype(np.int64)
    class_pixels = [0] * labels_lib.NUM_CLASSES
    for raw_id, train_id in to_train_id.items():
        class_pixels[train_id] += int(np.sum(pixels == raw_id))
    return {"class_pixels": class_pixels, "ignored_pixels": pixels.size - sum(class_pixels)}


def check_examples(name, split, data_dir, expected: dict, to_train_id: dict) -> None:
    """Stored examples == {image id: (jpeg bytes, raw ids)} in id order: the image is PIL's
    decoding of the JPEG, the label the raw ids mapped by `to_train_id` (others 255)."""
    reader = sources.SplitReader(name, split, data_dir)
    assert len(reader) == len(expected)
    for index, image_id in enumerate(sorted(expected)):
        jpeg, raw = expected[image_id]
        example = reader[index]
        np.testing.assert_array_equal(decode(example["image"]), pil_pixels(jpeg))
        train_ids = np.full(raw.shape, 255, np.uint8)
        for raw_id, train_id in to_train_id.items():
            train_ids[raw == raw_id] = train_id
        np.testing.assert_array_equal(decode(example["label"]), train_ids)


BDD_LAYOUTS = {
    "robustnet": ("images/{}", "labels/{}", "_train_id.png"),
    "official": ("images/10k/{}", "labels/sem_seg/masks/{}", ".png"),
}


def make_bdd(root, rng, layout: str = "robustnet") -> dict:
    """A BDD100K folder; returns {'train'|'validation': {id: (jpeg, label ids)}} of the pairs."""
    images, labels, suffix = BDD_LAYOUTS[layout]
    values = np.array([*range(19), 255, 19, 200], np.uint8)  # 19 and 200: not train ids.
    pairs = {"train": {}, "validation": {}}
    for raw, split, stems in (("train", "train", "ab"), ("val", "validation", "c")):
        for stem in stems:
            image_id = f"{stem}0a1b2c3-{stem}4d5e6f7"
            jpeg = jpeg_bytes(random_image(rng, *SIZE))
            raw_ids = rng.choice(values, SIZE)
            write(f"{root}/{images.format(raw)}/{image_id}.jpg", jpeg)
            write(f"{root}/{labels.format(raw)}/{image_id}{suffix}", png_bytes(raw_ids))
            pairs[split][image_id] = (jpeg, raw_ids)
    # Ignored: the unlabelled test images; reported: a validation image without a label.
    write(
        f"{root}/{images.format('test')}/d0000000-00000000.jpg",
        jpeg_bytes(np.zeros((4, 4, 3), np.uint8)),
    )
    write(
        f"{root}/{images.format('val')}/e0000000-00000000.jpg",
        jpeg_bytes(np.zeros((4, 4, 3), np.uint8)),
    )
    return pairs


@pytest.mark.parametrize("layout", list(BDD_LAYOUTS))
def test_bdd100k(tmp_path, layout):
    pairs = make_bdd(tmp_path / "bdd", np.random.default_rng(0), layout)
    data_dir = str(tmp_path / "tfds")
    summary = prepare.prepare("bdd100k", str(tmp_path / "bdd"), data_dir)
    assert list(summary["splits"]) == ["train", "validation"]
    identity = {i: i for i in range(19)}
    for split, expected in pairs.items():
        check_examples("bdd100k", split, data_dir, expected, identity)
        info = summary["splits"][split]
        raws = [raw for _, raw in expected.values()]
        assert {k: info[k] for k in ("class_pixels", "ignored_pixels")} == class_counts(
            raws, identity
        )
        all_raw = np.concatenate([r.ravel() for r in raws])
        assert info["unknown_label_ids"] == {
            str(i): int(np.sum(all_raw == i)) for i in (19, 200) if np.any(all_raw == i)
        }
        assert info["num_examples"] == info["reencoded_images"] == len(expected)
    images = BDD_LAYOUTS[layout][0].format("val")
    assert summary["splits"]["validation"]["skipped"] == [
        {
            "file": f"{images}/e0000000-00000000.jpg",
            "reason": "image without a label (no matching label file)",
        }
    ]
    assert summary["splits"]["train"]["skipped"] == []
    text = prepare.format_summary(summary)
    assert "Split 'train': 2 examples" in text and "images re-encoded as 8-bit RGB: 2" in text


def make_mapillary(root, rng, labels_dir: str = "labels") -> dict:
    """A Mapillary Vistas folder (palette label PNGs, one grayscale JPEG, a .DS_Store);
    returns {'train'|'validation': {id: (jpeg, class ids)}} of the pairs."""
    pairs = {"train": {}, "validation": {}}
    for raw, split, count in (("training", "train", 2), ("validation", "validation", 2)):
        for index in range(count):
            image_id = f"{split[0]}{index}Xy_Z-{index}AbCdEfGhIjKlMn"
            pixels = random_image(rng, *SIZE)
            jpeg = jpeg_bytes(pixels[..., 0] if index == 1 else pixels)  # Grayscale: index 1.
            ids = rng.integers(0, 66, SIZE).astype(np.uint8)
            if split == "validation" and index == 0:
                ids[0, :3] = 70  # Not a v1.2 id: counted as unknown.
            write(f"{root}/{raw}/images/{image_id}.jpg", jpeg)
            write(f"{root}/{raw}/{labels_dir}/{image_id}.png", png_bytes(ids, palette=True))
            pairs[split][image_id] = (jpeg, ids)
    write(f"{root}/training/images/.DS_Store", b"\0")  # Left out silently, as RobustNet does.
    write(f"{root}/testing/images/t0.jpg", jpeg_bytes(np.zeros((4, 4, 3), np.uint8)))
    return pairs


@pytest.mark.parametrize("labels_dir", ["labels", "v1.2/labels"])
def test_mapillary(tmp_path, labels_dir):
    pairs = make_mapillary(tmp_path / "mapillary", np.random.default_rng(1), labels_dir)
    data_dir = str(tmp_path / "tfds")
    summary = prepare.prepare("mapillary", str(tmp_path / "mapillary"), data_dir)
    assert list(summary["splits"]) == ["train", "validation"]
    robustnet = {i: train_id for i, (train_id, _) in ROBUSTNET_MAPILLARY.items()}
    for split, expected in pairs.items():
        check_examples("mapillary", split, data_dir, expected, robustnet)
        info = summary["splits"][split]
        raws = [raw for _, raw in expected.values()]
        assert {k: info[k] for k in ("class_pixels", "ignored_pixels")} == class_counts(
            raws, robustnet
        )
        assert info["num_examples"] == 2 and info["skipped"] == []
    assert summary["splits"]["train"]["unknown_label_ids"] == {}
    assert summary["splits"]["validation"]["unknown_label_ids"] == {"70": 3}


def test_mapillary_validation_only(tmp_path):
    root = tmp_path / "mapillary"
    pairs = make_mapillary(root, np.random.default_rng(2))
    for name in os.listdir(root / "training/images"):
        os.remove(root / "training/images" / name)
    for name in os.listdir(root / "training/labels"):
        os.remove(root / "training/labels" / name)
    os.rmdir(root / "training/images")
    os.rmdir(root / "training/labels")
    summary = prepare.prepare("mapillary", str(root), str(tmp_path / "tfds"))
    assert list(summary["splits"]) == ["validation"]
    assert summary["splits"]["validation"]["num_examples"] == len(pairs["validation"])


def test_mapillary_map_matches_robustnet_entry_by_entry():
    table = labels_lib.lookup_table(labels_lib.MAPILLARY_TO_TRAIN_ID)
    assert len(labels_lib.MAPILLARY_CLASSES) == 66
    for label_id in range(256):
        expected = ROBUSTNET_MAPILLARY.get(label_id, (255, None))[0]
        assert table[label_id] == expected, label_id
    for label_id, (train_id, robustnet_name) in ROBUSTNET_MAPILLARY.items():
        _, readable, stored = labels_lib.MAPILLARY_CLASSES[label_id]
        assert stored == train_id
        # RobustNet's comments name the v1.2 class (readable name; one typo).
        assert readable.lower().startswith(robustnet_name.lower().replace("vegitation", "veget"))
    assert labels_lib.MAPILLARY_CLASSES[65][0] == "void--unlabeled"
    assert sorted(set(labels_lib.MAPILLARY_TO_TRAIN_ID.values())) == list(range(19))


def test_bad_jpeg_is_skipped_or_a_strict_error(tmp_path):
    root = tmp_path / "bdd"
    make_bdd(root, np.random.default_rng(0))
    os.remove(root / "images/val/e0000000-00000000.jpg")
    image = root / "images/train/a0a1b2c3-a4d5e6f7.jpg"
    image.write_bytes(image.read_bytes()[:200])
    summary = prepare.prepare("bdd100k", str(root), str(tmp_path / "tfds"))
    (skipped,) = summary["splits"]["train"]["skipped"]
    assert skipped["file"] == "images/train/a0a1b2c3-a4d5e6f7.jpg"
    assert skipped["reason"].startswith("cannot decode the image")
    assert summary["splits"]["train"]["num_examples"] == 1
    with pytest.raises(base.ManualDataError, match=r"a0a1b2c3-a4d5e6f7.jpg: cannot decode"):
        prepare.prepare("bdd100k", str(root), str(tmp_path / "tfds2"), strict=True)


def test_missing_empty_and_wrong_manual_dirs(tmp_path):
    with pytest.raises(
        prepare.ManualDataError,
        match=r"missing does not exist. BDD100K needs the folder holding images/\{train,val\}/"
        r"X.jpg and labels/\{train,val\}/X_train_id.png .*bdd-data.berkeley.edu",
    ):
        prepare.prepare("bdd100k", str(tmp_path / "missing"), str(tmp_path / "tfds"))
    os.mkdir(tmp_path / "empty")
    with pytest.raises(prepare.ManualDataError, match=r"empty is empty.*mapillary.com"):
        prepare.prepare("mapillary", str(tmp_path / "empty"), str(tmp_path / "tfds"))
    # Images without labels: the missing folder is named.
    write(tmp_path / "no_labels/images/val/x.jpg", jpeg_bytes(np.zeros((4, 4, 3), np.uint8)))
    with pytest.raises(
        prepare.ManualDataError, match=r"no_labels/images/val exists but .*no_labels/labels/val"
    ):
        prepare.prepare("bdd100k", str(tmp_path / "no_labels"), str(tmp_path / "tfds"))
    # One dataset's folder given for the other; the dataset one or two levels down.
    make_mapillary(tmp_path / "vistas", np.random.default_rng(0))
    with pytest.raises(
        prepare.ManualDataError,
        match=r"BDD100K expects .* in --manual_dir=.*vistas, but it holds testing/, training/, "
        r"validation/. This looks like Mapillary Vistas: use --dataset=mapillary",
    ):
        prepare.prepare("bdd100k", str(tmp_path / "vistas"), str(tmp_path / "tfds"))
    make_bdd(tmp_path / "download/bdd100k/seg", np.random.default_rng(0))
    with pytest.raises(
        prepare.ManualDataError, match=r"files seem to be in .*download/bdd100k/seg"
    ):
        prepare.prepare("bdd100k", str(tmp_path / "download"), str(tmp_path / "tfds"))
    with pytest.raises(prepare.ManualDataError, match=r"This looks like BDD100K: use --dataset="):
        prepare.prepare("mapillary", str(tmp_path / "download/bdd100k/seg"), str(tmp_path / "t"))


@pytest.mark.parametrize(("name", "command"), [("bdd100k", "bdd100k"), ("mapillary", "mapillary")])
def test_not_prepared_error_names_the_prepare_command(tmp_path, name, command):
    with pytest.raises(sources.DatasetNotPreparedError) as error:
        sources.get_builder(name, str(tmp_path))
    message = str(error.value)
    assert f"python -m launch.prepare --dataset={command} --manual_dir=DIR" in message
    assert "https://" in message


def robustnet_mapillary_eval(image, label, eval_size: int, height=None):
    """RobustNet's ResizeHeight(height) + CenterCropPad(eval_size) (its transforms/
    joint_transforms.py; ignore_index left at 0), written out with PIL: -> (image, label)."""
    height = eval_size if height is None else height
    img, mask = Image.fromarray(image), Image.fromarray(label)
    width = int(img.size[0] / img.size[1] * height)
    img = img.resize((width, height), Image.BICUBIC)
    mask = mask.resize((width, height), Image.NEAREST)
    w, h = img.size
    pad_x, pad_y = max(eval_size - w, 0), max(eval_size - h, 0)
    if pad_x or pad_y:
        img = ImageOps.expand(img, border=(pad_x, pad_y, pad_x, pad_y), fill=0)
        mask = ImageOps.expand(mask, border=(pad_x, pad_y, pad_x, pad_y), fill=0)
    left, top = round((w - eval_size) / 2.0), round((h - eval_size) / 2.0)  # Half to even.
    box = (left, top, left + eval_size, top + eval_size)
    return np.asarray(img.crop(box)), np.asarray(mask.crop(box))


# (H, W) inputs for height = crop = 24 (RobustNet's 1536, scaled down): landscape crops with an
# even and an odd surplus (round half to even), an upscale, and portrait pads of 9 and 11
# (round(-4.5) = -4, round(-5.5) = -6).
SHAPES = [(30, 50), (30, 47), (16, 20), (40, 25), (48, 26)]


@pytest.mark.parametrize(("height", "width"), SHAPES)
def test_mapillary_eval_transform_matches_robustnet(height, width):
    rng = np.random.default_rng(height * 100 + width)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    label = rng.choice(np.array([*range(19), 255], np.uint8), (height, width))
    transform = tf.function(
        eval_transforms.resize_height_center_crop_pad,
        input_signature=[
            tf.TensorSpec([None, None, 3], tf.uint8),
            tf.TensorSpec([None, None], tf.uint8),
            tf.TensorSpec([], tf.int32),
            tf.TensorSpec([], tf.int32),
        ],
    )
    for resize_to, crop in ((24, 24), (20, 24)):  # And a height below the crop: pads rows.
        out_image, out_label = transform(image, label, resize_to, crop)
        want_image, want_label = robustnet_mapillary_eval(image, label, crop, resize_to)
        np.testing.assert_array_equal(out_image.numpy(), want_image)
        np.testing.assert_array_equal(out_label.numpy(), want_label)
    # label_pad = 255: exactly the pixels RobustNet fills (found by shifting the ids by one).
    _, padded = eval_transforms.resize_height_center_crop_pad(image, label, 24, 24, label_pad=255)
    _, marked = robustnet_mapillary_eval(image, np.minimum(label, 19) + 1, 24)
    want = np.where(marked == 0, 255, np.where(marked == 20, 255, marked - 1))
    np.testing.assert_array_equal(padded.numpy(), want)


def test_eval_transform_keeps_label_channel_and_rejects_float_images():
    image = np.zeros((30, 50, 3), np.uint8)
    label = np.ones((30, 50, 1), np.int32)
    out_image, out_label = eval_transforms.resize_height_center_crop_pad(image, label, 24, 24)
    assert out_image.shape == (24, 24, 3) and out_label.shape == (24, 24, 1)
    assert out_label.dtype == tf.int32 and np.all(out_label.numpy() == 1)
    with pytest.raises(TypeError, match=r"expects a uint8 image, got float32"):
        eval_transforms.resize_height_center_crop_pad(image.astype(np.float32), label, 24, 24)
