"""`jaxda.data.prepare` and `launch.prepare`: summaries, rebuilds and the error messages."""

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from jaxda.data import prepare, sources
from tests.data.test_builders import make_cityscapes, make_gta5, png_bytes, write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_prepared_dataset_is_reported_not_rebuilt(tmp_path):
    make_gta5(tmp_path / "gta5", np.random.default_rng(0))
    data_dir = str(tmp_path / "tfds")
    built = prepare.prepare("gta5", str(tmp_path / "gta5"), data_dir)
    assert not built["already_prepared"]
    stored = os.path.join(built["dataset_dir"], prepare.SUMMARY_FILE)
    with open(stored) as f:
        assert json.load(f)["splits"] == built["splits"]
    # The manual folder is not even needed again.
    again = prepare.prepare("gta5", str(tmp_path / "gone"), data_dir)
    assert again["already_prepared"] and again["splits"] == built["splits"]
    assert "Already prepared" in prepare.format_summary(again)
    os.remove(tmp_path / "gta5/images/00001.png")
    rebuilt = prepare.prepare("gta5", str(tmp_path / "gta5"), data_dir, overwrite=True)
    assert rebuilt["splits"]["train"]["num_examples"] == 2
    assert len(sources.SplitReader("gta5", "train", data_dir)) == 2


# Slow run (10 s): tests/data/test_folder_builder.py::test_command_line runs launch.prepare's
# command line in the default run.
@pytest.mark.slow
def test_command_line_prints_and_writes_the_summary(tmp_path):
    make_cityscapes(tmp_path / "cityscapes", np.random.default_rng(0), zipped=True)
    args = [
        sys.executable,
        "-m",
        "launch.prepare",
        "--dataset=cityscapes",
        f"--manual_dir={tmp_path / 'cityscapes'}",
        f"--data_dir={tmp_path / 'tfds'}",
        f"--summary_json={tmp_path / 'summary.json'}",
    ]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "Split 'train': 4 examples" in result.stdout
    assert "Split 'validation': 2 examples" in result.stdout
    assert "frankfurt_000001_000000_leftImg8bit.png: image without a label" in result.stdout
    with open(tmp_path / "summary.json") as f:
        summary = json.load(f)
    assert summary["tfds_name"] == "cityscapes_fine"
    assert summary["splits"]["train"]["num_examples"] == 4
    assert len(summary["splits"]["train"]["class_pixels"]) == 19

    args[4:6] = [f"--manual_dir={tmp_path / 'missing'}", f"--data_dir={tmp_path / 'tfds2'}"]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert "launch.prepare: error: --manual_dir=" in result.stderr
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_missing_and_empty_manual_dir(tmp_path):
    with pytest.raises(prepare.ManualDataError, match=r"missing does not exist.*GTA5 needs the"):
        prepare.prepare("gta5", str(tmp_path / "missing"), str(tmp_path / "tfds"))
    os.mkdir(tmp_path / "empty")
    with pytest.raises(prepare.ManualDataError, match=r"empty is empty.*synthia-dataset.net"):
        prepare.prepare("synthia", str(tmp_path / "empty"), str(tmp_path / "tfds"))
    with pytest.raises(ValueError, match=r"Unknown dataset 'gta'; prepare one of"):
        prepare.prepare("gta", str(tmp_path), str(tmp_path / "tfds"))


def test_wrong_folder_says_what_was_expected_and_found(tmp_path):
    make_cityscapes(tmp_path / "cityscapes", np.random.default_rng(0), zipped=False)
    with pytest.raises(
        prepare.ManualDataError,
        match=r"GTA5 expects images/NNNNN.png and labels/NNNNN.png in --manual_dir=.*cityscapes, "
        r"but it holds gtFine/, leftImg8bit/. This looks like Cityscapes: use --dataset=cityscapes",
    ):
        prepare.prepare("gta5", str(tmp_path / "cityscapes"), str(tmp_path / "tfds"))
    # The dataset one level down, and GTA5's zips not extracted yet.
    make_gta5(tmp_path / "download/gta5", np.random.default_rng(0))
    with pytest.raises(prepare.ManualDataError, match=r"files seem to be in .*download/gta5"):
        prepare.prepare("gta5", str(tmp_path / "download"), str(tmp_path / "tfds"))
    write(tmp_path / "zips/01_images.zip", b"")
    with pytest.raises(prepare.ManualDataError, match=r"GTA5's downloaded zip parts: extract"):
        prepare.prepare("gta5", str(tmp_path / "zips"), str(tmp_path / "tfds"))


def test_wrong_or_broken_cityscapes_zip(tmp_path):
    root = tmp_path / "cityscapes"
    make_cityscapes(root, np.random.default_rng(0), zipped=True)
    with zipfile.ZipFile(root / "leftImg8bit_trainvaltest.zip", "w") as archive:
        archive.writestr("gtCoarse/train/aachen/aachen_000000_000019_gtCoarse_labelIds.png", b"")
    with pytest.raises(
        prepare.ManualDataError,
        match=r"leftImg8bit_trainvaltest.zip holds no leftImg8bit/\{train,val\}/<city>/"
        r"\*_leftImg8bit.png files \(found: gtCoarse/train/aachen/",
    ):
        prepare.prepare("cityscapes", str(root), str(tmp_path / "tfds"))
    write(root / "leftImg8bit_trainvaltest.zip", b"<html>login required</html>")
    with pytest.raises(prepare.ManualDataError, match=r"is not a readable zip file"):
        prepare.prepare("cityscapes", str(root), str(tmp_path / "tfds"))


def test_8_bit_synthia_labels_are_rejected(tmp_path):
    root = tmp_path / "synthia"
    write(root / "RGB/0000000.png", png_bytes(np.zeros((4, 6, 3), np.uint8)))
    write(root / "GT/LABELS/0000000.png", png_bytes(np.zeros((4, 6), np.uint8)))
    expected = r"GT/LABELS/0000000.png: expected a 16-bit RGB/RGBA SYNTHIA label PNG .* found "
    with pytest.raises(prepare.ManualDataError, match=expected + r"a 8-bit grayscale 6x4 PNG"):
        prepare.prepare("synthia", str(root), str(tmp_path / "tfds"), strict=True)
    with pytest.raises(prepare.ManualDataError, match=r"split 'train': no usable examples"):
        prepare.prepare("synthia", str(root), str(tmp_path / "tfds"))


@pytest.mark.parametrize(
    ("name", "command"),
    [
        ("gta5", "--dataset=gta5"),
        ("synthia_rand_cityscapes", "--dataset=synthia"),
        ("cityscapes_fine", "--dataset=cityscapes"),
        ("cityscapes/semantic_segmentation", "--dataset=cityscapes"),
    ],
)
def test_not_prepared_error_names_the_prepare_command(tmp_path, name, command):
    with pytest.raises(sources.DatasetNotPreparedError) as error:
        sources.get_builder(name, str(tmp_path))
    message = str(error.value)
    assert f"python -m launch.prepare {command} --manual_dir=DIR --data_dir={tmp_path}" in message
    assert "https://" in message and "needs no download" in message
    if name.startswith("cityscapes/"):
        assert "name 'cityscapes_fine' in config.data" in message
