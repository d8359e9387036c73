"""Tiny GTA5 -> Cityscapes and SYNTHIA -> Cityscapes runs from data prepared by the builders,
evaluated with the full-resolution protocol (input resized, logits upsampled to the labels)."""

import numpy as np
import pytest

from configs import source_only
from jaxda.data import labels, prepare
from jaxda.train import trainer
from tests.data.test_builders import CS_TABLE, make_cityscapes, make_gta5, make_synthia


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """data_dir with GTA5, SYNTHIA and Cityscapes (64x128, zipped) prepared from tiny files."""
    root = tmp_path_factory.mktemp("real")
    rng = np.random.default_rng(0)
    make_gta5(root / "gta5", rng)
    make_synthia(root / "synthia", rng)
    pairs = make_cityscapes(root / "cityscapes", rng, zipped=True, size=(64, 128))
    data_dir = str(root / "tfds")
    for name in ("gta5", "synthia", "cityscapes"):
        prepare.prepare(name, str(root / name), data_dir)
    return data_dir, pairs


def _tiny(config, data_dir):
    config.data.data_dir = data_dir
    config.model.stage_sizes = (1, 1, 1, 1)
    config.model.width = 4
    config.model.aspp_dilations = (1, 2, 3, 4)
    config.discriminator.width = 4
    config.num_devices = 1
    config.batch_size = 2
    config.total_steps = 2
    config.log_every_steps = config.eval_every_steps = config.checkpoint_every_steps = 2
    config.data.source.size = (32, 48)
    config.data.target.size = config.data.eval.size = (32, 64)
    config.data.eval.batch_size = 2
    return config


def test_gta5_to_cityscapes_evaluates_at_full_label_resolution(prepared, tmp_path):
    data_dir, pairs = prepared
    # Source only: the same GTA5 -> Cityscapes data and protocol without discriminators to compile.
    config = _tiny(source_only.get_config(), data_dir)
    final = trainer.train_and_evaluate(config, str(tmp_path / "run"))["final"]
    assert final["step"] == 2 and final["num_examples"] == 2
    protocol = final["protocol"]
    assert protocol["dataset"] == "cityscapes_fine" and protocol["input_size"] == [32, 64]
    assert protocol["label_size"] == "original" and protocol["head"] == "main"
    # Every labelled pixel of the 64x128 validation labels was scored.
    val_labels = [CS_TABLE[raw] for _, raw in pairs["validation"].values()]
    assert final["labelled_pixels"] == sum(int((lab != 255).sum()) for lab in val_labels)
    assert len(final["per_class_iou"]) == 19 and "miou_13" not in final


def test_synthia_run_reports_miou_16_and_13(prepared, tmp_path):
    data_dir, _ = prepared
    config = _tiny(source_only.get_config("source=synthia"), data_dir)
    final = trainer.train_and_evaluate(config, str(tmp_path / "run"))["final"]
    names16 = [labels.CITYSCAPES_CLASSES[c] for c in labels.SYNTHIA_16_CLASSES]
    assert list(final["per_class_iou"]) == names16
    assert final["miou"] == pytest.approx(final["miou_16"])
    values13 = [
        final["per_class_iou"][labels.CITYSCAPES_CLASSES[c]] for c in labels.SYNTHIA_13_CLASSES
    ]
    assert final["miou_13"] == pytest.approx(
        np.nanmean([np.nan if v is None else v for v in values13])
    )
    assert "miou_19" in final
