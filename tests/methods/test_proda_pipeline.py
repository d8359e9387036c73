"""ProDA's whole pipeline on the tiny benchmark (slow): eight stages in one call, and a run
interrupted in the hard-label pass and inside stage 1 ends exactly as an uninterrupted one."""

import json
import os

import numpy as np
import pytest

from configs import proda as proda_config
from jaxda.train import offline, stages
from tests.conftest import shrink_to_tiny
from tests.methods import interrupt

pytestmark = pytest.mark.slow


def _config(data_dir):
    config = shrink_to_tiny(proda_config.get_config("synthetic"), data_dir)
    crop = config.data.source.crop_size
    config.discriminator.width = 4
    config.batch_size = 8
    config.offline.epochs = 2
    for name in ("stage1", "stage2", "stage3"):
        config.stages[name].total_steps = 4
        config.stages[name].data.target.views.weak.crop_size = crop
    return config


def test_pipeline_runs_and_resumes_exactly(data_dir, tmp_path, monkeypatch):
    config = _config(data_dir)
    straight_dir, crashed_dir = str(tmp_path / "straight"), str(tmp_path / "crashed")
    straight = stages.run(config, straight_dir)
    for name in config.stage_order:
        assert stages.is_finished(
            stages.stage_config(config, name, straight_dir), os.path.join(straight_dir, name)
        ), name
    prototypes = offline.load_reduced(os.path.join(straight_dir, "prototypes"))["prototypes"]
    assert prototypes.shape == (config.num_classes, config.model.head_width)

    # Interrupt stage 1 before its step 3 (after the step-2 checkpoint) ...
    interrupt.in_training(
        monkeypatch,
        config,
        crashed_dir,
        lambda stream: stream.get("strong") and "soft_labels" in stream.get("artifacts"),
    )
    assert not os.path.exists(os.path.join(crashed_dir, "stage1", "results.json"))

    # ... then, resumed, the first hard-label pass after its first batch, then rerun.
    interrupt.in_offline_pass(monkeypatch, config, crashed_dir, "hard_labels1")
    assert os.path.exists(os.path.join(crashed_dir, "stage1", "results.json"))
    assert offline.read_manifest(os.path.join(crashed_dir, "hard_labels1")) is None
    resumed = stages.run(config, crashed_dir)

    assert resumed["final"] == {**straight["final"], "seconds": resumed["final"]["seconds"]}
    for name in config.stage_order:
        straight_results = os.path.join(straight_dir, name, "results.json")
        if os.path.exists(straight_results):
            with open(straight_results) as f:
                a = json.load(f)["final"]
            with open(os.path.join(crashed_dir, name, "results.json")) as f:
                b = json.load(f)["final"]
            a.pop("seconds"), b.pop("seconds")
            assert a == b, name
        else:
            for output, values in offline.load(os.path.join(straight_dir, name)).items():
                again = offline.load(os.path.join(crashed_dir, name))[output]
                np.testing.assert_array_equal(again, values, err_msg=f"{name}/{output}")
