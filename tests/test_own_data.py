"""Own domains end to end: folder datasets with their own class set train, evaluate and predict
with a head of that many classes, and the built-in benchmark exported to folders trains to the
same numbers as the built-in dataset."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from benchmarks import export_synthetic_folders
from jaxda.data import classes, prepare, sources
from jaxda.data.builders import folder
from jaxda.evaluation import predict as predict_lib
from jaxda.evaluation import run as eval_run
from jaxda.train import stages
from tests.conftest import TINY_DATASET, tiny_config

FIVE = {
    "names": ["sky", "building", "tree", "car", "road"],
    "colors": [[70, 130, 180], [70, 70, 70], [107, 142, 35], [0, 0, 142], [128, 64, 128]],
}


def _scene(rng, height=32, width=64):
    """(image [H, W, 3] uint8, label [H, W] class ids): five horizontal bands, each class
    with its own noisy colour, band borders moved per image."""
    cuts = np.sort(rng.integers(2, height - 2, 4))
    label = np.searchsorted(cuts, np.arange(height), side="right")[:, None].repeat(width, 1)
    base = np.array([[90, 140, 200], [120, 110, 100], [60, 150, 50], [200, 40, 40], [80, 80, 90]])
    image = base[label] + rng.normal(0, 12, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8), label.astype(np.uint8)


def _write_folder(root, rng, count, labelled, colours=False):
    (root / "images").mkdir(parents=True)
    if labelled:
        (root / "labels").mkdir()
    for i in range(count):
        image, label = _scene(rng)
        Image.fromarray(image).save(root / "images" / f"{i:03d}.png")
        if labelled:
            encoded = np.array(FIVE["colors"], np.uint8)[label] if colours else label
            Image.fromarray(encoded).save(root / "labels" / f"{i:03d}.png")


@pytest.fixture(scope="module")
def five_class_datasets(data_dir, tmp_path_factory):
    """folder/five_source (colour labels), folder/five_target: 'train' unlabelled, 'validation'
    labelled (train ids), both prepared with the same 5-class classes.json."""
    root = tmp_path_factory.mktemp("own_data")
    (root / "classes.json").write_text(json.dumps(FIVE))
    rng = np.random.default_rng(0)
    _write_folder(root / "source", rng, 16, labelled=True, colours=True)
    _write_folder(root / "target" / "train", rng, 16, labelled=False)
    _write_folder(root / "target" / "validation", rng, 8, labelled=True)
    common = {
        "images": "images/*.png",
        "labels": "labels/{stem}.png",
        "classes": str(root / "classes.json"),
    }
    source = folder.FolderOptions(name="five_source", label_format="colors", **common)
    target = folder.FolderOptions(
        name="five_target", split_folders="train:train,validation:validation", **common
    )
    summaries = [
        prepare.prepare("folder", str(root / "source"), data_dir, folder=source),
        prepare.prepare("folder", str(root / "target"), data_dir, folder=target),
    ]
    return root, summaries


def _five_class_config(data_dir, **overrides):
    config = tiny_config("adaptseg", data_dir=data_dir, total_steps=4, **overrides)
    for stream, name, split in (
        ("source", "folder/five_source", "train"),
        ("target", "folder/five_target", "train"),
        ("eval", "folder/five_target", "validation"),
    ):
        config.data[stream].name, config.data[stream].split = name, split
    config.num_classes = 0  # Follow the datasets.
    config.eval.classes = ()
    return config


def test_five_classes_train_evaluate_and_predict(five_class_datasets, data_dir, tmp_path):
    _, summaries = five_class_datasets
    assert summaries[0]["classes"] == FIVE["names"]
    assert summaries[1]["splits"]["train"]["labelled"] is False
    workdir = str(tmp_path / "run")
    summary = stages.run(_five_class_config(data_dir), workdir)
    final = summary["final"]
    # A 5-way head: the per-class table is the dataset's five classes, nothing else.
    assert list(final["per_class_iou"]) == FIVE["names"]
    assert final["protocol"]["evaluated_classes"] == FIVE["names"]
    with open(f"{workdir}/config.json") as f:
        saved = json.load(f)
    assert saved["num_classes"] == 5 and saved["class_names"] == FIVE["names"]

    # --mode=eval and --mode=predict take the class set from the datasets as training did.
    config, eval_dir = stages.for_checkpoint(_five_class_config(data_dir), workdir)
    assert eval_run.evaluate_checkpoint(config, eval_dir)["miou"] == pytest.approx(final["miou"])
    image, _ = _scene(np.random.default_rng(5))
    Image.fromarray(image).save(tmp_path / "photo.png")
    out = tmp_path / "predicted"
    manifest = predict_lib.predict(config, eval_dir, str(tmp_path / "photo.png"), str(out))
    assert manifest["classes"] == FIVE["names"]
    ids = np.asarray(Image.open(out / "photo_classIds.png"))
    color = np.asarray(Image.open(out / "photo_color.png"))
    assert not (out / "photo_labelIds.png").exists()  # Cityscapes label ids mean nothing here.
    assert ids.shape == image.shape[:2] and ids.max() < 5
    np.testing.assert_array_equal(color, np.array(FIVE["colors"], np.uint8)[ids])


def test_class_sets_must_agree(five_class_datasets, data_dir):
    config = _five_class_config(data_dir)
    config.data.eval.name, config.data.eval.split = TINY_DATASET, "target_validation"
    with pytest.raises(ValueError) as error:
        classes.resolve(config)
    message = str(error.value)
    assert "config.data.eval ('synthetic_shift/tiny', classes from cityscapes" in message
    assert "folder/five_source" in message and "classes.json" in message
    config = _five_class_config(data_dir)
    config.num_classes = 19
    with pytest.raises(ValueError, match=r"num_classes=19, but .* has 5 classes"):
        classes.resolve(config)


@pytest.fixture(scope="module")
def exported(data_dir, tmp_path_factory):
    """The tiny benchmark exported to folders and prepared through the folder path."""
    out = tmp_path_factory.mktemp("exported")
    export_synthetic_folders.export(str(out), data_dir, dataset=TINY_DATASET)
    options = export_synthetic_folders.folder_options("tiny_export")
    prepare.prepare("folder", str(out / "source"), data_dir, folder=options["source"])
    prepare.prepare("folder", str(out / "target"), data_dir, folder=options["target"])
    return export_synthetic_folders.folder_streams("tiny_export")


def _decoded(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def test_exported_benchmark_holds_the_same_examples(exported, data_dir):
    """Every stream reads the built-in examples in the built-in order: images byte for byte,
    the same label pixels (the unlabelled target 'train' split: all ignore)."""
    original_splits = {
        "source": "source_train",
        "target": "target_train",
        "eval": "target_validation",
    }
    for stream, (name, split) in exported.items():
        reader = sources.SplitReader(name, split, data_dir)
        original = sources.SplitReader(TINY_DATASET, original_splits[stream], data_dir)
        assert len(reader) == len(original) > 0
        for i in range(len(reader)):
            assert reader[i]["image"] == original[i]["image"]
            label = _decoded(reader[i]["label"])
            if stream == "target":
                assert label.shape == _decoded(original[i]["label"]).shape and (label == 255).all()
            else:
                np.testing.assert_array_equal(label, _decoded(original[i]["label"]))


@pytest.mark.slow  # Two trainings (30 s); the cheap twin above checks the examples they read.
def test_exported_benchmark_trains_like_the_built_in_dataset(exported, data_dir, tmp_path):
    """The same examples in the same order give the same losses and mIoU, to the last bit."""
    built_in = stages.run(tiny_config("adaptseg", data_dir=data_dir), str(tmp_path / "built_in"))
    config = tiny_config("adaptseg", data_dir=data_dir)
    for stream, (name, split) in exported.items():
        config.data[stream].name, config.data[stream].split = name, split
    folders = stages.run(config, str(tmp_path / "folders"))
    assert folders["final"]["miou"] == built_in["final"]["miou"]
    assert folders["final"]["per_class_iou"] == built_in["final"]["per_class_iou"]
