"""DA-SAC's whole pipeline on the tiny benchmark (slow): ABN, the importance-weights pass and
SAC in one call, importance sampling from that pass, and a run interrupted in the pass and
inside SAC ends exactly as an uninterrupted one."""

import json
import os

import numpy as np
import pytest

from configs import dasac as dasac_config
from jaxda.train import offline, stages
from tests.conftest import shrink_to_tiny
from tests.methods import interrupt

pytestmark = pytest.mark.slow


def _config(data_dir):
    config = shrink_to_tiny(dasac_config.get_config("synthetic"), data_dir)
    crop = config.data.source.crop_size
    config.sac.teacher_every = 2
    config.stages.sac.total_steps = 6
    config.stages.sac.data.target.size = config.stages.sac.data.target.crop_size = crop
    config.stages.sac.data.source.crop_size = crop
    return config


def test_pipeline_runs_and_resumes_exactly(data_dir, tmp_path, monkeypatch):
    config = _config(data_dir)
    straight_dir, crashed_dir = str(tmp_path / "straight"), str(tmp_path / "crashed")
    straight = stages.run(config, straight_dir)
    counts = offline.load(os.path.join(straight_dir, "is_weights"))["class_pixels"]
    assert counts.shape[1] == config.num_classes and counts.sum() > 0

    # Interrupt the importance pass after its first batch ...
    interrupt.in_offline_pass(monkeypatch, config, crashed_dir, "is_weights")
    assert offline.read_manifest(os.path.join(crashed_dir, "is_weights")) is None
    # ... then, resumed, SAC before its step 3 (after the step-2 checkpoint), then rerun.
    interrupt.in_training(
        monkeypatch, config, crashed_dir, lambda stream: bool(stream.get("group"))
    )
    assert not os.path.exists(os.path.join(crashed_dir, "sac", "results.json"))
    resumed = stages.run(config, crashed_dir)

    assert resumed["final"] == {**straight["final"], "seconds": resumed["final"]["seconds"]}
    for name in ("abn", "sac"):
        with open(os.path.join(straight_dir, name, "results.json")) as f:
            a = json.load(f)["final"]
        with open(os.path.join(crashed_dir, name, "results.json")) as f:
            b = json.load(f)["final"]
        a.pop("seconds"), b.pop("seconds")
        assert a == b, name
    again = offline.load(os.path.join(crashed_dir, "is_weights"))["class_pixels"]
    np.testing.assert_array_equal(again, counts)
