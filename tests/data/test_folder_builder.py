"""The folder builder (`--dataset=folder`: the user's own domains) on tiny files of each format.

Every count is checked against NumPy counting of the written label arrays and every stored
example is read back through `sources.SplitReader`, as training reads it.
"""

import hashlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jaxda.data import classes, prepare, sources
from jaxda.data.builders import base
from tests.data.test_builders import decode, png16, png_bytes, write

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAMES = ["sky", "road", "tree", "car", "person"]
COLORS = [[0, 0, 255], [128, 64, 128], [0, 128, 0], [0, 0, 142], [220, 20, 60]]


def classes_file(path, **extra) -> str:
    write(path, json.dumps({"names": NAMES, "colors": COLORS, **extra}).encode())
    return str(path)


def build(tmp_path, root, strict=False, **options) -> dict:
    folder = prepare.FolderOptions(**options)
    return prepare.prepare("folder", str(root), str(tmp_path / "tfds"), strict, folder=folder)


def image(rng, height=6, width=8) -> np.ndarray:
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def expected_counts(raws, mapping: dict, known: set, num_classes: int, name=str) -> dict:
    """class_pixels, ignored_pixels, unknown {name(value): px} by NumPy over the raw labels."""
    values, counts = np.unique(np.concatenate([r.ravel() for r in raws]), return_counts=True)
    class_pixels = np.zeros(num_classes, np.int64)
    unknown = {}
    for value, count in zip(values.tolist(), counts.tolist(), strict=True):
        if mapping.get(value, 255) < num_classes:
            class_pixels[mapping[value]] += count
        if value not in known:
            unknown[name(value)] = count
    return {
        "class_pixels": class_pixels.tolist(),
        "ignored_pixels": int(counts.sum() - class_pixels.sum()),
        "unknown": unknown,
    }


def read_back(tmp_path, name: str, split: str = "train") -> list[dict]:
    reader = sources.SplitReader(f"folder/{name}", split, str(tmp_path / "tfds"))
    return [reader[i] for i in range(len(reader))]


def image_ids(tmp_path, name: str, split: str) -> list[str]:
    builder = sources.get_builder(f"folder/{name}", str(tmp_path / "tfds"))
    source = builder.as_data_source(split)
    return [source[i]["image_id"].decode() for i in range(len(source))]


def test_train_ids_8_bit_with_classes(tmp_path):
    rng = np.random.default_rng(0)
    root, images, raws = tmp_path / "sim", {}, {}
    for path, (height, width) in [("a", (6, 8)), ("sub/b", (4, 6)), ("sub/deep/c", (6, 8))]:
        images[path] = png_bytes(image(rng, height, width))
        raws[path] = rng.choice(np.array([0, 1, 2, 3, 4, 7, 255], np.uint8), (height, width))
        write(root / f"{path}.png", images[path])
        write(root / f"gt/{path}.png", png_bytes(raws[path], palette=path == "a"))
    summary = build(
        tmp_path,
        root,
        name="source",
        images="**/*.png",  # Matches the labels too: they are taken as labels.
        labels="gt/{path}.png",
        classes=classes_file(tmp_path / "classes.json"),
    )
    train = summary["splits"]["train"]
    table = np.full(256, 255, np.uint8)
    table[:5] = range(5)
    expected = expected_counts(raws.values(), {i: i for i in range(5)}, {*range(5), 255}, 5)
    assert train["class_pixels"] == expected["class_pixels"]
    assert train["ignored_pixels"] == expected["ignored_pixels"]
    assert train["unknown_label_ids"] == expected["unknown"] and list(expected["unknown"]) == ["7"]
    assert train["num_examples"] == 3 and train["labelled"] and train["skipped"] == []
    assert train["reencoded_images"] == 0
    assert summary["classes"] == NAMES and summary["tfds_name"] == "folder/source"
    examples = read_back(tmp_path, "source")
    assert image_ids(tmp_path, "source", "train") == sorted(raws)  # Sorted relative paths.
    for example, path in zip(examples, sorted(raws), strict=True):
        assert example["image"] == images[path]  # Stored byte for byte.
        np.testing.assert_array_equal(decode(example["label"]), table[raws[path]])
    builder = sources.get_builder("folder/source", str(tmp_path / "tfds"))
    stored = classes.of_dataset_dir(builder.data_dir)
    assert list(stored.names) == NAMES and [list(c) for c in stored.colors] == COLORS
    text = prepare.format_summary(summary)
    assert " 4 person" in text and "unknown label ids (mapped to ignore): 7: " in text
    assert "road" in text and "traffic light" not in text
    again = build(tmp_path, tmp_path / "gone", name="source", images="**/*.png")
    assert again["already_prepared"] and again["splits"] == summary["splits"]
    assert "prepared with other --classes, --labels than given now" in again["note"]


def test_ids_with_label_map_and_cityscapes_classes(tmp_path):
    rng = np.random.default_rng(1)
    raws = [rng.choice(np.array([10, 20, 30, 0, 99, 255], np.uint8), (5, 7)) for _ in range(2)]
    for index, raw in enumerate(raws):
        write(tmp_path / f"data/{index}.png", png_bytes(image(rng, 5, 7)))
        write(tmp_path / f"data/{index}_label.png", png_bytes(raw))
    mapping = {10: 0, 20: 18, 30: 255}
    write(tmp_path / "map.json", json.dumps({str(k): v for k, v in mapping.items()}).encode())
    summary = build(
        tmp_path,
        tmp_path / "data",
        name="ids",
        images="*.png",
        labels="{stem}_label.png",
        label_format="ids",
        label_map=str(tmp_path / "map.json"),
    )
    train = summary["splits"]["train"]
    expected = expected_counts(raws, mapping, {10, 20, 30, 255}, 19)
    assert len(train["class_pixels"]) == 19 and summary["classes_file"] is None
    assert train["class_pixels"] == expected["class_pixels"]
    assert train["ignored_pixels"] == expected["ignored_pixels"]
    assert train["unknown_label_ids"] == expected["unknown"]
    assert set(expected["unknown"]) == {"0", "99"} and train["num_examples"] == 2
    table = np.full(256, 255, np.uint8)
    table[list(mapping)] = list(mapping.values())
    for example, raw in zip(read_back(tmp_path, "ids"), raws, strict=True):
        np.testing.assert_array_equal(decode(example["label"]), table[raw])
    builder = sources.get_builder("folder/ids", str(tmp_path / "tfds"))
    assert classes.of_dataset_dir(builder.data_dir) is classes.CITYSCAPES  # Nothing stored.
    write(tmp_path / "bad_map.json", json.dumps({"10": 0, "20": 40}).encode())
    with pytest.raises(base.ManualDataError, match=r"--label_map=.*bad_map.json: entry '20': 40 "):
        build(
            tmp_path,
            tmp_path / "data",
            name="ids2",
            images="*.png",
            labels="{stem}_label.png",
            label_format="ids",
            label_map=str(tmp_path / "bad_map.json"),
        )


def test_colors(tmp_path):
    rng = np.random.default_rng(2)
    palette = np.array([*COLORS, [255, 255, 255], [255, 0, 255]], np.uint8)  # Ignore, unknown.
    picks = [rng.integers(0, len(palette), (6, 8)) for _ in range(2)]
    root = tmp_path / "real"
    write(root / "x.jpg", b"")  # Not matched by the glob.
    write(root / "one.png", png_bytes(image(rng)))
    write(root / "one_mask.png", png_bytes(palette[picks[0]]))
    rgba = np.concatenate([palette[picks[1]], np.full((6, 8, 1), 7, np.uint8)], axis=-1)
    write(root / "two.png", png_bytes(image(rng)))
    write(root / "two_mask.png", png_bytes(rgba))  # Alpha is not read.
    path = classes_file(tmp_path / "classes.json", ignore_colors=[[255, 255, 255]])
    summary = build(
        tmp_path,
        root,
        name="colours",
        images="**/*.png",
        labels="{dir}/{stem}_mask.png",  # {dir} = '' at the top.
        label_format="colors",
        classes=path,
    )
    train = summary["splits"]["train"]
    mapping = {i: i for i in range(5)}
    expected = expected_counts(picks, mapping, set(range(6)), 5)
    assert train["class_pixels"] == expected["class_pixels"]
    assert train["ignored_pixels"] == expected["ignored_pixels"]
    assert train["unknown_colors"] == {"#ff00ff": int(sum((p == 6).sum() for p in picks))}
    assert "unknown_label_ids" not in train and train["num_examples"] == 2
    table = np.array([0, 1, 2, 3, 4, 255, 255], np.uint8)
    for example, pick in zip(read_back(tmp_path, "colours"), picks, strict=True):
        np.testing.assert_array_equal(decode(example["label"]), table[pick])
    assert "unknown colours (mapped to ignore): #ff00ff: " in prepare.format_summary(summary)


def test_16_bit_grayscale_and_rgb_labels(tmp_path):
    rng = np.random.default_rng(3)
    values = np.array([0, 1, 4, 255, 300, 65535], np.uint16)
    gray = rng.choice(values, (6, 8))
    rgb = rng.integers(0, 65536, (6, 8, 3)).astype(np.uint16)
    rgb[..., 1] = rng.choice(values, (6, 8))  # The ids; the other channels are noise.
    root = tmp_path / "data"
    write(root / "images/gray.png", png_bytes(image(rng)))
    write(root / "labels/gray.png", png_bytes(gray))  # PIL mode I;16: 16-bit grayscale.
    write(root / "images/rgb.png", png_bytes(image(rng)))
    write(root / "labels/rgb.png", png16(rgb))
    options = dict(name="deep", images="images/*.png", labels="labels/{stem}.png")
    with pytest.raises(base.ManualDataError, match=r"labels/rgb.png is a 16-bit RGB 8x6 label "):
        build(tmp_path, root, **options, classes=classes_file(tmp_path / "c.json"))
    summary = build(
        tmp_path, root, **options, label_channel=1, classes=classes_file(tmp_path / "c.json")
    )
    train = summary["splits"]["train"]
    raws = [gray, rgb[..., 1]]
    expected = expected_counts(raws, {i: i for i in range(5)}, {*range(5), 255}, 5)
    assert train["class_pixels"] == expected["class_pixels"]
    assert train["ignored_pixels"] == expected["ignored_pixels"]
    assert train["unknown_label_ids"] == expected["unknown"]
    assert set(expected["unknown"]) == {"300", "65535"}
    for example, raw in zip(read_back(tmp_path, "deep"), raws, strict=True):
        np.testing.assert_array_equal(decode(example["label"]), np.where(raw < 5, raw, 255))


def test_jpeg_and_other_images_unlabelled(tmp_path):
    rng = np.random.default_rng(4)
    root = tmp_path / "target"
    photo = io.BytesIO()
    Image.fromarray(image(rng, 8, 8)).save(photo, format="JPEG", quality=80)
    write(root / "a.jpg", photo.getvalue())
    png = png_bytes(image(rng, 4, 6))
    write(root / "b.png", png)
    rgba = rng.integers(0, 256, (5, 3, 4), dtype=np.uint8)
    write(root / "c.png", png_bytes(rgba))
    write(root / "d.txt", b"not an image")
    write(root / "a.png", png)  # Same id as a.jpg.
    summary = build(tmp_path, root, name="target", images="*")
    train = summary["splits"]["train"]
    assert not train["labelled"] and train["unlabelled"] == "no --labels given"
    assert train["num_examples"] == 3 and train["reencoded_images"] == 2
    assert train["class_pixels"] == [0] * 19 and train["ignored_pixels"] == 64 + 24 + 15
    assert train["skipped"] == [
        {"file": "a.png", "reason": "same image id (path without extension) as a.jpg"},
        {"file": "d.txt", "reason": "not an image file (PIL cannot identify it)"},
    ]
    a, b, c = read_back(tmp_path, "target")
    np.testing.assert_array_equal(
        decode(a["image"]), np.asarray(Image.open(root / "a.jpg").convert("RGB"))
    )
    assert b["image"] == png and decode(b["image"]).shape == (4, 6, 3)
    np.testing.assert_array_equal(decode(c["image"]), rgba[..., :3])
    for example, shape in zip((a, b, c), [(8, 8), (4, 6), (5, 3)], strict=True):
        np.testing.assert_array_equal(decode(example["label"]), np.full(shape, 255, np.uint8))
    assert "UNLABELLED: no --labels given" in prepare.format_summary(summary)


def test_split_folders_skips_and_unlabelled_split(tmp_path):
    rng = np.random.default_rng(5)
    root, raw = tmp_path / "data", {}
    for split, stems in [("tr", ["x/a", "b", "c"]), ("va", ["d", "e"])]:
        for stem in stems:
            write(root / f"{split}/{stem}.png", png_bytes(image(rng)))
            if split == "tr" and stem != "c":
                raw[stem] = rng.integers(0, 19, (6, 8)).astype(np.uint8)
                write(root / f"{split}/{stem}_mask.png", png_bytes(raw[stem]))
    summary = build(
        tmp_path,
        root,
        name="folders",
        images="**/*.png",
        labels="{dir}/{stem}_mask.png",
        split_folders="train:tr,validation:va",
    )
    train, validation = summary["splits"]["train"], summary["splits"]["validation"]
    assert train["num_examples"] == 2 and train["labelled"]
    assert train["skipped"] == [
        {"file": "tr/c.png", "reason": "image without a label: expected tr/c_mask.png"}
    ]
    assert validation["num_examples"] == 2 and not validation["labelled"]
    assert validation["unlabelled"] == "no label file found for any image"
    assert validation["skipped"] == []
    assert image_ids(tmp_path, "folders", "train") == ["b", "x/a"]
    assert image_ids(tmp_path, "folders", "validation") == ["d", "e"]
    for example, stem in zip(read_back(tmp_path, "folders"), ["b", "x/a"], strict=True):
        np.testing.assert_array_equal(decode(example["label"]), raw[stem])
    text = prepare.format_summary(summary)
    assert "UNLABELLED: no label file found for any image" in text


def test_split_lists(tmp_path):
    rng = np.random.default_rng(6)
    root = tmp_path / "data"
    for stem in ["a", "b", "c", "sub/d"]:
        write(root / f"{stem}.png", png_bytes(image(rng)))
    write(tmp_path / "train.txt", b"# training images\na.png\n\nsub/d\n")
    write(root / "val.txt", b"./b.png\n")  # Found relative to the manual folder.
    lists = f"train:{tmp_path}/train.txt,validation:val.txt"
    summary = build(tmp_path, root, name="lists", images="**/*.png", split_lists=lists)
    assert {s: i["num_examples"] for s, i in summary["splits"].items()} == {
        "train": 2,
        "validation": 1,
    }
    assert summary["images_in_no_split"] == 1
    assert image_ids(tmp_path, "lists", "train") == ["a", "sub/d"]
    write(tmp_path / "train.txt", b"a.png\n# comment\nmissing.png\n")
    with pytest.raises(
        base.ManualDataError, match=r"--split_lists: 1 listed .*train.txt:3: missing.png"
    ):
        build(tmp_path, root, name="lists2", images="**/*.png", split_lists=lists)


def test_split_fraction_is_deterministic_and_stable(tmp_path):
    rng = np.random.default_rng(7)
    root = tmp_path / "data"

    def expected(paths):  # Independent of the builder: SHA-1 of the relative path.
        val = [p for p in paths if int(hashlib.sha1(p.encode()).hexdigest()[:16], 16) < 0.3 * 2**64]
        return sorted(p[:-4] for p in paths if p not in val), sorted(p[:-4] for p in val)

    first = [f"im{i:02d}.png" for i in range(10)]
    for path in first:
        write(root / path, png_bytes(image(rng, 2, 3)))
    options = dict(images="*.png", split_fraction="validation:0.3", split="training")
    build(tmp_path, root, name="frac", **options)
    train, validation = expected(first)
    assert train and validation
    assert image_ids(tmp_path, "frac", "training") == train
    assert image_ids(tmp_path, "frac", "validation") == validation
    more = [f"new{i:02d}.png" for i in range(6)]
    for path in more:
        write(root / path, png_bytes(image(rng, 2, 3)))
    build(tmp_path, root, name="frac_more", **options)
    train_more = image_ids(tmp_path, "frac_more", "training")
    validation_more = image_ids(tmp_path, "frac_more", "validation")
    assert (train_more, validation_more) == expected(first + more)
    assert [i for i in validation_more if i.startswith("im")] == validation  # Unchanged.


def test_skip_reasons_and_strict(tmp_path):
    rng = np.random.default_rng(8)
    root = tmp_path / "data"
    for stem in ["good", "corrupt", "badlabel", "mismatch", "jpeglabel", "nolabel"]:
        write(root / f"img/{stem}.png", png_bytes(image(rng)))
        if stem != "nolabel":
            write(root / f"lbl/{stem}.png", png_bytes(np.zeros((6, 8), np.uint8)))
    corrupt = (root / "img/corrupt.png").read_bytes()
    (root / "img/corrupt.png").write_bytes(corrupt[:-20])
    (root / "lbl/badlabel.png").write_bytes((root / "lbl/badlabel.png").read_bytes()[:30])
    write(root / "lbl/mismatch.png", png_bytes(np.zeros((6, 7), np.uint8)))
    jpeg = io.BytesIO()
    Image.fromarray(np.zeros((6, 8), np.uint8)).save(jpeg, format="JPEG")
    write(root / "lbl/jpeglabel.png", jpeg.getvalue())
    photo = io.BytesIO()
    Image.fromarray(image(rng)).save(photo, format="JPEG")
    write(root / "img/truncated.jpg", photo.getvalue()[:-40])
    write(root / "lbl/truncated.png", png_bytes(np.zeros((6, 8), np.uint8)))
    options = dict(images="img/*", labels="lbl/{stem}.png")
    summary = build(tmp_path, root, name="skips", **options)
    skipped = {s["file"]: s["reason"] for s in summary["splits"]["train"]["skipped"]}
    assert skipped == {
        "img/nolabel.png": "image without a label: expected lbl/nolabel.png",
        "img/corrupt.png": skipped["img/corrupt.png"],
        "lbl/badlabel.png": skipped["lbl/badlabel.png"],
        "img/mismatch.png": "size mismatch: the image is 8x6 but lbl/mismatch.png is 7x6 "
        "(width x height)",
        "lbl/jpeglabel.png": "labels must be PNG files: not a PNG",
        "img/truncated.jpg": skipped["img/truncated.jpg"],
    }
    assert skipped["img/truncated.jpg"].startswith("cannot decode the image: image file is trunc")
    assert skipped["img/corrupt.png"].startswith("truncated PNG")
    assert skipped["lbl/badlabel.png"].startswith("truncated PNG")
    assert summary["splits"]["train"]["num_examples"] == 1
    text = prepare.format_summary(summary)
    assert "img/nolabel.png: image without a label: expected lbl/nolabel.png" in text
    os.remove(root / "img/nolabel.png")
    with pytest.raises(
        base.ManualDataError, match=r"'strict': bad file: lbl/badlabel.png: truncated PNG"
    ):
        build(tmp_path, root, strict=True, name="strict", **options)
    write(root / "img/nolabel.png", png_bytes(image(rng)))
    with pytest.raises(base.ManualDataError, match=r"unusable files: img/nolabel.png: image "):
        build(tmp_path, root, strict=True, name="strict", **options)


def test_errors_name_the_flag_and_the_path(tmp_path):
    root = tmp_path / "data"
    write(root / "images/a.png", png_bytes(np.zeros((2, 3, 3), np.uint8)))
    with pytest.raises(
        base.ManualDataError,
        match=r"--images=\*\*/\*.jpg matches no file in .*data, which holds images/",
    ):
        build(tmp_path, root, name="x", images="**/*.jpg")
    with pytest.raises(
        base.ManualDataError,
        match=r"--labels=labels/\{stem\}.png matches no file for any image: e.g. for "
        r"images/a.png it looked for .*data/labels/a.png",
    ):
        build(tmp_path, root, name="x", images="images/*.png", labels="labels/{stem}.png")
    duplicate = classes_file(tmp_path / "dup.json", ignore_colors=[COLORS[1]])
    with pytest.raises(classes.ClassFileError, match=r"dup.json: colour \[128, 64, 128\] is "):
        build(tmp_path, root, name="x", images="images/*.png", classes=duplicate)
    for bad in ["Source", "my-data", "", "1st"]:
        with pytest.raises(base.ManualDataError, match=r"--name=.*lowercase letters, digits"):
            build(tmp_path, root, name=bad, images="images/*.png")
    with pytest.raises(base.ManualDataError, match=r"at most one of --split_folders, --split_"):
        build(tmp_path, root, name="x", images="*", split_folders="a:b", split_fraction="v:0.1")
    with pytest.raises(base.ManualDataError, match=r"--labels=labels/\{id\}.png: use the "):
        build(tmp_path, root, name="x", images="images/*.png", labels="labels/{id}.png")
    with pytest.raises(base.ManualDataError, match=r"--label_format=colors needs --classes"):
        build(tmp_path, root, name="x", images="*", labels="{stem}.png", label_format="colors")
    with pytest.raises(base.ManualDataError, match=r"only for --dataset=folder, not --dataset=gta"):
        prepare.folder_options("gta5", {"images": "*.png"})
    with pytest.raises(base.ManualDataError, match=r"--dataset=folder needs --images"):
        prepare.folder_options("folder", {"name": "x"})
    assert not os.path.exists(tmp_path / "tfds/folder/x/1.0.0")


def test_not_prepared_folder_dataset_names_the_command(tmp_path):
    with pytest.raises(sources.DatasetNotPreparedError) as error:
        sources.get_builder("folder/mine", str(tmp_path))
    message = str(error.value)
    assert (
        "python -m launch.prepare --dataset=folder --name=mine --manual_dir=DIR --images=GLOB"
        in message
    )
    assert f"--data_dir={tmp_path}" in message and "prepared there: none" in message


@pytest.mark.slow  # ~20 s (three subprocesses); by default tests/test_prepare.py runs the
# command line and the tests above build folder datasets through the same library calls.
def test_command_line(tmp_path):
    rng = np.random.default_rng(9)
    root = tmp_path / "data"
    for stem in ["a", "b"]:
        write(root / f"{stem}.png", png_bytes(image(rng)))
        write(root / f"{stem}.lbl.png", png_bytes(rng.integers(0, 5, (6, 8)).astype(np.uint8)))
    args = [
        sys.executable,
        "-m",
        "launch.prepare",
        "--dataset=folder",
        "--name=mine",
        f"--manual_dir={root}",
        "--images=*.png",
        "--labels={stem}.lbl.png",
        f"--classes={classes_file(tmp_path / 'classes.json')}",
        f"--data_dir={tmp_path / 'tfds'}",
        f"--summary_json={tmp_path / 'summary.json'}",
    ]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "Split 'train': 2 examples" in result.stdout
    assert " 4 person" in result.stdout and "sidewalk" not in result.stdout
    with open(tmp_path / "summary.json") as f:
        assert json.load(f)["classes"] == NAMES
    assert sources.get_builder("folder/mine", str(tmp_path / "tfds")).info.splits["train"]
    bad = [*args[:3], "--dataset=gta5", f"--manual_dir={root}", "--images=*.png"]
    result = subprocess.run(bad, cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "launch.prepare: error: --images: only for --dataset=folder, not --dataset=gta5"
    )
    write(
        tmp_path / "dup.json", json.dumps({"names": ["a", "b"], "colors": [[1, 2, 3]] * 2}).encode()
    )
    bad = [*args[:8], f"--classes={tmp_path / 'dup.json'}", f"--data_dir={tmp_path / 'tfds2'}"]
    result = subprocess.run(bad, cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "dup.json: colour [1, 2, 3] is given to both 'a' and 'b'" in result.stderr
