"""DA-SAC's offline pass 'dasac_class_pixels' on the tiny dataset: its per-image class pixel
counts are the NumPy bincounts of the same network's (flip-averaged) argmax predictions from
the generic 'predictions' pass, its file is what `importance.load_tables` reads."""

import os

import ml_collections
import numpy as np
import pytest

from jaxda.data import importance
from jaxda.train import dasac_passes, offline, trainer
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def baseline(data_dir, tmp_path_factory):
    """A 4-step source-only run: the network the passes read (after one step it predicts a
    single class everywhere; after four, several, and flipping changes some pixels)."""
    workdir = str(tmp_path_factory.mktemp("baseline"))
    config = tiny_config(
        "source_only", data_dir=data_dir, total_steps=4, eval_every_steps=0, log_every_steps=2
    )
    trainer.train_and_evaluate(config, workdir)
    return config, workdir


def _pass_config(config, workdir, name):
    config = ml_collections.ConfigDict(config.to_dict())
    config.init_from = workdir
    # 12 does not divide the 32 target examples: the last batch is padded.
    config.offline = {"pass": name, "stream": "target", "batch_size": 12, "flip": True}
    return config


def test_class_pixel_counts_match_numpy_counts_of_the_predictions(baseline, tmp_path):
    config, workdir = baseline
    assert offline.PASSES[importance.PASS_NAME] is dasac_passes.run_class_pixels_pass
    out_dir = str(tmp_path / "class_pixels")
    manifest = dasac_passes.run_class_pixels_pass(
        _pass_config(config, workdir, importance.PASS_NAME), out_dir
    )
    predictions_dir = str(tmp_path / "predictions")
    predicted = offline.run_predictions_pass(
        _pass_config(config, workdir, "predictions"), predictions_dir
    )

    counts = np.load(os.path.join(out_dir, importance.COUNTS_FILE))
    labels = offline.load(predictions_dir)["pseudo_label"]  # [32, 32, 64] uint8.
    num_classes = config.num_classes
    assert counts.dtype == np.int32 and counts.shape == (len(labels), num_classes)
    expected = np.stack([np.bincount(p.ravel(), minlength=num_classes) for p in labels])
    np.testing.assert_array_equal(counts, expected)
    assert np.all(counts.sum(1) == labels[0].size)
    assert np.count_nonzero(counts.sum(0)) >= 3  # Several classes: a meaningful comparison.
    assert set(offline.load(out_dir)) == {"class_pixels"}  # Agreement counts: monitoring only.

    summary = manifest["summary"]
    empty = [int(c) for c in np.flatnonzero(expected.sum(0) == 0)]
    assert summary["empty_classes"] == empty and summary["classes_without_pixels"] == len(empty)
    assert summary["class_pixel_totals"] == [int(t) for t in expected.sum(0)]
    assert summary["pseudo_label_accuracy"] == pytest.approx(
        predicted["summary"]["pseudo_label_accuracy"]
    )

    # The pass directory is what the target stream's importance sampling reads.
    tables = importance.load_tables(
        {"weights": out_dir, "uniform_prior": 0.25, "uniform_classes": ()}, len(labels), "target"
    )
    np.testing.assert_array_equal(
        tables, importance.cumulative_tables(importance.class_fractions(expected), 0.25)
    )
