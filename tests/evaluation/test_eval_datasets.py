"""config.eval.datasets: --mode=eval on a list of datasets (RobustNet's domain-generalisation
table), checked against a NumPy evaluation of the same checkpoint; the table formatter and the
configs' list."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from configs import common
from jaxda import checkpoints, models
from jaxda import mesh as mesh_lib
from jaxda.data import input_pipeline, synthetic
from jaxda.data import labels as labels_lib
from jaxda.evaluation import datasets as datasets_lib
from jaxda.evaluation import metrics
from jaxda.evaluation import run as eval_run
from jaxda.models.layers import resize_bilinear_align_corners
from tests.conftest import TINY_DATASET, tiny_config

STEP = 3
SOURCE_CLASSES = (0, 2, 8, 10, 13)  # road, building, vegetation, sky, car


@pytest.fixture(scope="module")
def checkpointed(data_dir, tmp_path_factory):
    """(config, workdir, variables): a random tiny network saved as step 3. Its kernels get
    extra noise and its main head is scaled up, so that it predicts many classes with logits of
    order 1 (as initialised: one class, logits ~1e-5) and argmax ties do not occur."""
    workdir = str(tmp_path_factory.mktemp("dg_eval"))
    config = tiny_config("source_only", data_dir=data_dir)
    model = models.build_segmenter(config.model, config.num_classes)
    variables = model.init(jax.random.key(7), jnp.zeros((1, *models.INIT_SIZE, 3)))
    leaves, tree = jax.tree.flatten(variables["params"])
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [
        x + jnp.std(x) * jax.random.normal(k, x.shape) if x.ndim > 1 else x
        for x, k in zip(leaves, keys, strict=True)
    ]
    params = jax.tree.unflatten(tree, leaves)
    params["head_main"] = jax.tree.map(lambda x: x * 1e5, params["head_main"])
    variables = {**variables, "params": params}
    checkpointer = checkpoints.Checkpointer(workdir, keep=1)
    meta = {"model": checkpoints.model_meta(config.model)}
    checkpointer.save(STEP, {"model": variables}, meta)
    checkpointer.wait()
    checkpointer.close()
    return config, workdir, variables


def _numpy_results(config, variables, split: str, size, classes, subsets) -> dict:
    """mIoU (%), subset mIoUs and per-class IoUs of the network on `split`, computed
    without jaxda's pipeline or evaluator: PIL bicubic resize, Caffe BGR mean, the main head
    upsampled (align corners) to the original labels, a NumPy confusion."""
    builder = tfds.builder(TINY_DATASET, data_dir=config.data.data_dir)
    model = models.build_segmenter(config.model, config.num_classes)
    n = config.num_classes
    confusion = np.zeros((n, n), np.int64)
    count = 0
    for example in builder.as_data_source(split):
        image, label = np.asarray(example["image"]), np.asarray(example["label"])[..., 0]
        if size:
            image = np.asarray(Image.fromarray(image).resize(size[::-1], Image.BICUBIC))
        bgr = image[..., ::-1].astype(np.float32) - np.asarray(config.data.image_mean, np.float32)
        logits = model.apply(variables, jnp.asarray(bgr)[None], train=False)["main"]
        prediction = np.asarray(resize_bilinear_align_corners(logits, label.shape)[0]).argmax(-1)
        valid = label < n
        confusion += np.bincount(
            n * label[valid].astype(np.int64) + prediction[valid], minlength=n * n
        ).reshape(n, n)
        count += 1
    true_positive = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, true_positive / union, np.nan)
    out = {
        "miou": 100 * np.nanmean(iou[list(classes)]),
        "pixel_accuracy": 100 * true_positive.sum() / confusion.sum(),
        "num_examples": count,
        "per_class_iou": {labels_lib.CITYSCAPES_CLASSES[c]: 100 * iou[c] for c in classes},
    }
    for name, subset in subsets.items():
        out[f"miou_{name}"] = 100 * np.nanmean(iou[list(subset)])
    return out


def _scalars(directory: str) -> dict[str, float]:
    found = {}
    for name in os.listdir(directory):
        if name.startswith("events.out.tfevents"):
            for event in tf.compat.v1.train.summary_iterator(os.path.join(directory, name)):
                for value in event.summary.value:
                    found[value.tag] = float(tf.make_ndarray(value.tensor))
    return found


def test_eval_mode_evaluates_the_list(checkpointed, capsys):
    config, workdir, variables = checkpointed
    config = config.copy_and_resolve_references()
    datasets = {
        # Native 32x64 input, the benchmark's classes.
        "target": common.dg_eval_dataset(
            TINY_DATASET, "target_validation", classes=synthetic.SCENE_CLASSES, batch_size=8
        ),
        # 16x32 input, logits upsampled to the 32x64 labels; 3 examples in batches of 2.
        "source": common.dg_eval_dataset(
            TINY_DATASET,
            "source_validation",
            size=(16, 32),
            classes=SOURCE_CLASSES,
            class_subsets={"sky_road": (10, 0)},
            batch_size=2,
        ),
        "bdd100k": common.dg_eval_dataset("bdd100k", "validation"),  # Not prepared.
        "nowhere": common.dg_eval_dataset("no_such_dataset", "validation"),  # Not a dataset.
    }
    config.eval.datasets = ml_collections.ConfigDict(datasets)
    config.eval.datasets_order = ("source", "bdd100k", "target")  # 'nowhere' follows.
    results = eval_run.evaluate_checkpoint(config, workdir)

    record = results["datasets"]
    assert record["order"] == ["source", "bdd100k", "target", "nowhere"]
    assert record["step"] == STEP and record["checkpoint"].endswith(f"checkpoints/{STEP}")
    path = os.path.join(workdir, "eval", f"datasets_step_{STEP:07d}.json")
    with open(path) as f:
        assert json.load(f) == json.loads(json.dumps(record))
    listed = record["datasets"]
    assert listed["bdd100k"]["dataset"] == "bdd100k"
    assert "'bdd100k' is not prepared" in listed["bdd100k"]["skipped"]
    assert "'no_such_dataset' is not prepared" in listed["nowhere"]["skipped"]

    expected = {
        "target": _numpy_results(
            config, variables, "target_validation", None, synthetic.SCENE_CLASSES, {}
        ),
        "source": _numpy_results(
            config, variables, "source_validation", (16, 32), SOURCE_CLASSES, {"sky_road": (10, 0)}
        ),
    }
    for name, want in expected.items():
        got = listed[name]
        assert got["num_examples"] == want["num_examples"]
        assert got["miou"] == pytest.approx(want["miou"], abs=1e-6)
        assert got["pixel_accuracy"] == pytest.approx(want["pixel_accuracy"], abs=1e-6)
        assert got.keys() >= {f"miou_{k}" for k in ("sky_road",) if name == "source"}
        assert set(got["per_class_iou"]) == set(want["per_class_iou"])
        for class_name, value in want["per_class_iou"].items():
            if np.isnan(value):
                assert got["per_class_iou"][class_name] is None
            else:
                assert got["per_class_iou"][class_name] == pytest.approx(value, abs=1e-6)
    assert listed["source"]["miou_sky_road"] == pytest.approx(
        expected["source"]["miou_sky_road"], abs=1e-6
    )
    assert listed["source"]["protocol"]["input_size"] == [16, 32]
    # The list's entries do not change the config's own evaluation.
    assert results["protocol"]["dataset"] == TINY_DATASET and "miou_sky_road" not in results

    table = capsys.readouterr().out.split("config.eval.datasets, step 3")[1].splitlines()
    assert table[1].split() == ["dataset", "mIoU", "mIoU-sky_road", "#images"]
    assert table[2].split() == [
        "source",
        f"{expected['source']['miou']:.2f}",
        f"{expected['source']['miou_sky_road']:.2f}",
        "3",
    ]
    assert table[3].split() == ["target", f"{expected['target']['miou']:.2f}", "-", "16"]
    assert table[4] == "  Skipped, not prepared: bdd100k, nowhere. To prepare them:"
    assert table[5].startswith("    bdd100k: Dataset 'bdd100k' is not prepared")

    tags = _scalars(os.path.join(workdir, "eval"))
    assert tags["eval_datasets/target/miou"] == pytest.approx(expected["target"]["miou"], 1e-5)
    assert tags["eval_datasets/source/miou_sky_road"] == pytest.approx(
        expected["source"]["miou_sky_road"], 1e-5
    )
    assert not any(tag.startswith("eval_datasets/bdd100k") for tag in tags)


def test_format_datasets_table():
    results = {
        "cityscapes": {"miou": 37.094, "per_class_iou": {}, "num_examples": 500},
        "mapillary": {"skipped": "Dataset 'mapillary' is not prepared: prepare it."},
        "synthia": {"miou": float("nan"), "miou_16": 33.1, "miou_13": 37.2, "num_examples": 9400},
    }
    assert metrics.format_datasets_table(results, "DG:").splitlines() == [
        "DG:",
        "  dataset         mIoU  mIoU-16  mIoU-13  #images",
        "  cityscapes     37.09        -        -      500",
        "  synthia          n/a    33.10    37.20     9400",
        "  Skipped, not prepared: mapillary. To prepare them:",
        "    mapillary: Dataset 'mapillary' is not prepared: prepare it.",
    ]


def test_row_order_and_entry_configs(data_dir):
    config = tiny_config("source_only", data_dir=data_dir)
    config.eval.datasets = ml_collections.ConfigDict(common.dg_eval_datasets("gta5"))
    assert datasets_lib.ordered_names(config.eval) == sorted(common.dg_eval_datasets("gta5"))
    config.eval.datasets_order = ("gta5", "bdd100k")
    names = datasets_lib.ordered_names(config.eval)
    assert names == ["gta5", "bdd100k", "cityscapes", "mapillary", "synthia"]
    config.eval.datasets_order = ("bdd", "gta5")
    with pytest.raises(ValueError, match=r"unknown: \['bdd'\]"):
        datasets_lib.ordered_names(config.eval)

    synthia = datasets_lib.entry_config(config, "synthia")
    assert synthia.data.eval.name == "synthia_rand_cityscapes" and synthia.eval.classes == ()
    assert dict(synthia.eval.class_subsets) == {
        "16": labels_lib.SYNTHIA_16_CLASSES,
        "13": labels_lib.SYNTHIA_13_CLASSES,
    }
    assert "classes" not in synthia.data.eval and synthia.data.eval.transform == ""
    mapillary = datasets_lib.entry_config(config, "mapillary").data.eval
    assert mapillary.transform == "mapillary" and mapillary.label_size == (1536, 1536)
    assert config.data.eval.name == TINY_DATASET  # The original config is unchanged.


def test_dg_eval_datasets_lists_robustnet_protocols():
    gta5 = common.dg_eval_datasets("gta5")
    assert list(gta5) == ["cityscapes", "bdd100k", "mapillary", "synthia", "gta5"]
    assert [(e.name, e.split, e.subset) for e in gta5.values()] == [
        ("cityscapes_fine", "validation", ""),
        ("bdd100k", "validation", ""),
        ("mapillary", "validation", ""),
        ("synthia_rand_cityscapes", "train", "synthia_robustnet_val"),
        ("gta5", "train", "gta5_robustnet_val"),
    ]
    native = [e for e in gta5.values() if not e.transform]
    assert all(e.size is None and e.label_size is None for e in native) and len(native) == 4
    assert gta5["mapillary"].transform == "mapillary"
    assert gta5["mapillary"].size == gta5["mapillary"].label_size == (1536, 1536)
    assert all(e.classes == () for e in gta5.values())  # All 19 classes.
    assert dict(gta5["synthia"].class_subsets) == {
        "16": labels_lib.SYNTHIA_16_CLASSES,
        "13": labels_lib.SYNTHIA_13_CLASSES,
    }
    cityscapes = common.dg_eval_datasets("cityscapes")
    assert list(cityscapes) == ["bdd100k", "mapillary", "synthia", "gta5", "cityscapes"]
    assert list(common.dg_eval_datasets("synthia"))[-1] == "synthia"
    with pytest.raises(ValueError, match="source"):
        common.dg_eval_datasets("kitti")
    config = common.base_config()
    assert not config.eval.datasets and config.eval.datasets_order == ()
    common.use_dg_evaluation(config, "gta5")
    assert config.eval.datasets_order == tuple(gta5)
    assert datasets_lib.ordered_names(config.eval) == list(gta5)


def test_a_split_the_dataset_lacks_is_an_error_not_a_skip(checkpointed):
    config, _, variables = checkpointed
    config = config.copy_and_resolve_references()
    entry = common.dg_eval_dataset(TINY_DATASET, "validation")  # It has *_validation only.
    config.eval.datasets = ml_collections.ConfigDict({"typo": entry})
    model = models.build_segmenter(config.model, config.num_classes)
    with pytest.raises(ValueError, match="no split 'validation'"):
        datasets_lib.evaluate(model, config, mesh_lib.make_mesh(1), variables, STEP)


def test_mapillary_transform_reaches_the_eval_batches(data_dir):
    """transform='mapillary' (RobustNet: PIL resize to height 1536, centre crop 1536): the
    eval batches equal PIL's resize and crop of the stored 32x64 examples, normalised."""
    config = tiny_config("source_only", data_dir=data_dir)
    entry = common.dg_eval_dataset(
        TINY_DATASET, "source_validation", transform="mapillary", batch_size=2
    )
    config.eval.datasets = ml_collections.ConfigDict({"mapillary_like": entry})
    stream = datasets_lib.entry_config(config, "mapillary_like").data.eval
    reader = input_pipeline.open_reader(stream, config.data)
    count, batches = input_pipeline.eval_iterator(reader, stream, config.data, global_batch_size=2)
    batches = list(batches)
    assert count == 3 and [b["valid"].tolist() for b in batches] == [[True, True], [True, False]]
    stored = tfds.builder(TINY_DATASET, data_dir=data_dir).as_data_source("source_validation")
    mean = np.asarray(config.data.image_mean, np.float32)
    for index in range(count):
        batch = batches[index // 2]
        image = Image.fromarray(np.asarray(stored[index]["image"]))
        label = Image.fromarray(np.asarray(stored[index]["label"])[..., 0])
        # ResizeHeight(1536): width int(64 / 32 * 1536) = 3072; CenterCropPad: x1 = 768.
        box = (768, 0, 768 + 1536, 1536)
        image = np.asarray(image.resize((3072, 1536), Image.BICUBIC).crop(box), np.float32)
        label = np.asarray(label.resize((3072, 1536), Image.NEAREST).crop(box))
        np.testing.assert_array_equal(batch["label"][index % 2], label)
        np.testing.assert_allclose(batch["image"][index % 2], image[..., ::-1] - mean, atol=1e-3)

    wrong = stream.copy_and_resolve_references()
    wrong.size = (512, 1024)
    with pytest.raises(ValueError, match=r"outputs \(1536, 1536\); set size="):
        input_pipeline.eval_iterator(reader, wrong, config.data, global_batch_size=2)
    training = config.data.source.copy_and_resolve_references()
    with training.unlocked():
        training.transform = "mapillary"
    with pytest.raises(ValueError, match="for evaluation streams only"):
        input_pipeline.train_iterator(
            reader, training, config.data, global_batch_size=2, seed=(0, 0), start=0
        )
