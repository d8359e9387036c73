"""On a tiny trained checkpoint: TensorBoard prediction images, --mode=eval in every inference
mode (and with logit ensembles), and --mode=predict's files."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from jaxda.data import labels as labels_lib
from jaxda.evaluation import predict as predict_lib
from jaxda.evaluation import run as eval_run
from jaxda.models.deeplab_v2 import output_size
from jaxda.models.layers import resize_bilinear_align_corners
from jaxda.train import trainer
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """(config, workdir, summary) of a 2-step source-only run on the tiny dataset."""
    workdir = str(tmp_path_factory.mktemp("trained"))
    config = tiny_config("source_only", data_dir=data_dir, total_steps=2, **{"eval.num_visuals": 3})
    summary = trainer.train_and_evaluate(config, workdir)
    return config, workdir, summary


def _image_summaries(workdir: str) -> dict[str, list]:
    found = {}
    for name in os.listdir(workdir):
        if name.startswith("events.out.tfevents"):
            for event in tf.compat.v1.train.summary_iterator(os.path.join(workdir, name)):
                for value in event.summary.value:
                    if value.metadata.plugin_data.plugin_name == "images":
                        found.setdefault(value.tag, []).append((event.step, value))
    return found


def test_training_writes_prediction_images(trained):
    _, workdir, summary = trained
    images = _image_summaries(workdir)
    assert [step for step, _ in images["eval/predictions"]] == [2]
    tensor = tf.make_ndarray(images["eval/predictions"][0][1].tensor)
    # [width, height, PNG x 3]: input | prediction | ground truth of 3 examples, 32x64 each.
    assert tensor[:2].astype(int).tolist() == [192, 32] and len(tensor) == 2 + 3
    png = tf.io.decode_png(tensor[2]).numpy()
    ground_truth = png[:, 128:]
    assert set(map(tuple, ground_truth.reshape(-1, 3))) <= {
        (0, 0, 0),
        *map(tuple, labels_lib.CITYSCAPES_PALETTE),
    }
    assert summary["final"]["protocol"]["mode"] == "whole"


def test_eval_modes(trained):
    config, workdir, summary = trained
    whole = summary["final"]
    config = config.copy_and_resolve_references()
    # A window covering the 32x64 input is whole-image inference (labels at the input size).
    config.eval.mode = "slide"
    config.eval.slide_window = (32, 64)
    one_window = eval_run.evaluate_checkpoint(config, workdir)
    assert one_window["miou"] == pytest.approx(whole["miou"], abs=1e-6)
    config.eval.slide_window, config.eval.slide_stride = (16, 32), (8, 16)
    slid = eval_run.evaluate_checkpoint(config, workdir)
    assert slid["protocol"]["mode"] == "slide" and slid["protocol"]["slide_stride"] == [8, 16]
    with open(os.path.join(workdir, "eval", "eval_mode_step_0000002_slide.json")) as f:
        assert json.load(f)["protocol"]["slide_window"] == [16, 32]

    config.eval.mode = "multiscale"
    config.eval.scales, config.eval.flip = (0.75, 1.0), True
    multi = eval_run.evaluate_checkpoint(config, workdir)
    assert multi["protocol"]["mode"] == "multiscale" and multi["protocol"]["flip"] is True
    assert 0.0 <= multi["miou"] <= 100.0
    # A logit ensemble of the checkpoint with itself changes nothing, in any mode.
    config.eval.ensemble = (f"{workdir}:0.5", f"{workdir}:0.5")
    ensemble = eval_run.evaluate_checkpoint(config, workdir)
    assert ensemble["miou"] == pytest.approx(multi["miou"], abs=1e-6)
    assert ensemble["protocol"]["scales"] == [0.75, 1.0]
    assert os.path.exists(os.path.join(workdir, "eval", "eval_mode_ensemble_multiscale.json"))


def _write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tf.io.encode_png(array).numpy())


def test_predict_writes_every_file(trained, tmp_path):
    config, workdir, _ = trained
    config = config.copy_and_resolve_references()
    config.data.eval.size = (32, 64)  # The network input; outputs are at the original sizes.
    rng = np.random.default_rng(0)
    inputs = tmp_path / "images"
    originals = {
        "a": rng.integers(0, 256, (40, 56, 3), dtype=np.uint8),
        "sub/b": rng.integers(0, 256, (24, 36, 3), dtype=np.uint8),
    }
    _write_png(inputs / "a.png", originals["a"])
    (inputs / "sub").mkdir()
    (inputs / "sub" / "b.jpg").write_bytes(tf.io.encode_jpeg(originals["sub/b"]).numpy())
    (inputs / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    manifest = predict_lib.predict(config, workdir, str(inputs), str(out), save_logits=True)
    assert manifest["num_images"] == 2 and manifest["protocol"]["mode"] == "whole"
    assert (out / "predict.json").exists() and not (out / "notes_color.png").exists()

    train_id_of_label_id = labels_lib.lookup_table(labels_lib.CITYSCAPES_LABEL_TO_TRAIN_ID)
    grid = (output_size(32), output_size(64), config.num_classes)
    for name, original in originals.items():
        size = original.shape[:2]
        read = lambda suffix, name=name: tf.io.decode_png(  # noqa: E731
            (out / f"{name}_{suffix}.png").read_bytes()
        ).numpy()
        color, overlay, label_ids = read("color"), read("overlay"), read("labelIds")
        assert color.shape == overlay.shape == (*size, 3) and label_ids.shape == (*size, 1)
        assert label_ids.dtype == np.uint8
        label_ids = label_ids[..., 0]
        assert set(np.unique(label_ids)) <= set(labels_lib.CITYSCAPES_TRAIN_ID_TO_LABEL_ID.values())
        # The colour PNG decoded through the palette gives the same class per pixel.
        matches = (color[:, :, None] == labels_lib.CITYSCAPES_PALETTE[None, None]).all(-1)
        assert (matches.sum(-1) == 1).all()
        from_color = matches.argmax(-1)
        np.testing.assert_array_equal(train_id_of_label_id[label_ids], from_color)
        # Logits on the stride-8 grid of the 32x64 network input; upsampled, they give the
        # prediction.
        logits = np.load(out / f"{name}_logits.npy")
        assert logits.shape == grid and logits.dtype == np.float32
        upsampled = resize_bilinear_align_corners(jnp.asarray(logits)[None], size)[0]
        np.testing.assert_array_equal(np.argmax(upsampled, -1), from_color)
        image = predict_lib.read_image(next(inputs.glob(f"{name}.*")))
        blend = np.round(0.5 * image.astype(np.float32) + 0.5 * color).astype(np.uint8)
        np.testing.assert_array_equal(overlay, blend)

    # One file, another mode, no logits.
    config.eval.mode, config.eval.scales, config.eval.flip = "multiscale", (1.0,), True
    single = tmp_path / "single"
    predict_lib.predict(config, workdir, str(inputs / "a.png"), str(single))
    assert sorted(os.listdir(single)) == [
        "a_color.png",
        "a_labelIds.png",
        "a_overlay.png",
        "predict.json",
    ]


def test_predict_errors_name_the_file(trained, tmp_path):
    config, workdir, _ = trained
    with pytest.raises(FileNotFoundError, match="nowhere"):
        predict_lib.predict(config, workdir, str(tmp_path / "nowhere"), str(tmp_path / "out"))
    _write_png(tmp_path / "in" / "good.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "in" / "zbad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"zbad\.png.*1 of 2 images were written"):
        predict_lib.predict(config, workdir, str(tmp_path / "in"), str(tmp_path / "out"))
    (tmp_path / "in" / "good.jpg").write_bytes(tf.io.encode_jpeg(np.zeros((8, 8, 3), np.uint8)))
    with pytest.raises(ValueError, match="same outputs"):
        predict_lib.find_images(str(tmp_path / "in"))
