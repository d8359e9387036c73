"""A run killed with SIGKILL after a checkpoint and restarted with the same command finishes
with exactly the metrics and parameters of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxda import checkpoints
from jaxda import mesh as mesh_lib
from jaxda.train import trainer
from tests.conftest import TINY_DATASET, tiny_config


def _command(workdir, data_dir):
    flags = {
        "data.source.name": TINY_DATASET,
        "data.target.name": TINY_DATASET,
        "data.eval.name": TINY_DATASET,
        "data.data_dir": data_dir,
        "data.eval.batch_size": 8,
        "model.width": 4,
        "discriminator.width": 4,
        "num_devices": 1,
        "total_steps": 30,
        "checkpoint_every_steps": 5,
        "eval_every_steps": 30,
        "log_every_steps": 5,
    }
    return [
        sys.executable, "-m", "launch.main", "--config=configs/adaptseg.py:synthetic",
        f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in flags.items()),
    ]  # fmt: skip


def _final_params(workdir, data_dir):
    config = tiny_config(data_dir=data_dir)
    setup = trainer.build(config, mesh_lib.make_mesh(1))
    variables, _ = checkpoints.restore_model_variables(
        checkpoints.find_step_dir(workdir),
        setup.abstract_state.model_variables(),
        checkpoints.model_meta(config.model),
    )
    return jax.device_get(variables)


def _results(workdir):
    with open(os.path.join(workdir, "results.json")) as f:
        final = json.load(f)["final"]
    final.pop("seconds")
    return final


@pytest.mark.slow  # ~1 min: two training processes; resume is also tested in-process.
def test_sigkill_then_rerun_matches_uninterrupted(data_dir, tmp_path):
    env = {**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    subprocess.run(_command(straight, data_dir), env=env, check=True, capture_output=True)

    process = subprocess.Popen(
        _command(killed, data_dir), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    first_checkpoint = os.path.join(killed, "checkpoints", "5")
    deadline = time.time() + 300
    while not os.path.isdir(first_checkpoint) and process.poll() is None:
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not os.path.exists(os.path.join(killed, "results.json"))

    rerun = subprocess.run(
        _command(killed, data_dir), env=env, check=True, capture_output=True, text=True
    )
    assert "Resuming from step" in rerun.stderr
    assert _results(killed) == _results(straight)
    for a, b in zip(
        jax.tree.leaves(_final_params(killed, data_dir)),
        jax.tree.leaves(_final_params(straight, data_dir)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
