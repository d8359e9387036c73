"""A method with a teacher, per-method state, stages and an offline pass, added without
trainer code (tests/methods/mean_teacher.py + mean_teacher_config.py): it trains through its
stages, and a run interrupted in the offline pass and in self-training resumes exactly."""

import os

import jax
import numpy as np
import pytest

from jaxda import checkpoints
from jaxda import mesh as mesh_lib
from jaxda.evaluation import run as eval_run
from jaxda.train import offline, stages, trainer
from tests.conftest import tiny_config
from tests.methods import interrupt, mean_teacher_config


def _config(data_dir):
    config = mean_teacher_config.get_config()
    base = tiny_config("source_only", data_dir=data_dir, total_steps=4)
    for key in ("data", "batch_size", "num_devices", "total_steps", "log_every_steps"):
        config[key] = base[key]
    config.eval_every_steps = config.checkpoint_every_steps = 2
    config.model.width = 4
    config.mean_teacher.threshold = 0.057  # A 4-step warm-up is barely above 1/19.
    return config


def _state_of(workdir, config):
    """The self-training stage's restored TrainState (student, teacher, extra)."""
    stage = stages.stage_config(config, "self_training", workdir)
    setup = trainer.build(stage, mesh_lib.make_mesh(1))
    ckptr = checkpoints.Checkpointer(os.path.join(workdir, "self_training"))
    state, _ = trainer._initial_state(stage, setup, ckptr)
    ckptr.close()
    return jax.device_get(state)


@pytest.mark.slow  # ~1 min; the stage machinery also runs in the ProDA / DA-SAC pipelines.
def test_mean_teacher_stages_train_and_resume_exactly(data_dir, tmp_path, monkeypatch):
    config = _config(data_dir)
    straight_dir, crashed_dir = str(tmp_path / "straight"), str(tmp_path / "crashed")
    straight = stages.run(config, straight_dir)

    # The offline pass: one pseudo label per target example, from the warm-up checkpoint.
    manifest = offline.read_manifest(os.path.join(straight_dir, "pseudo_labels"))
    assert manifest["source"]["checkpoint"].endswith(os.path.join("warmup", "checkpoints", "4"))
    outputs = offline.load(os.path.join(straight_dir, "pseudo_labels"))
    assert outputs["pseudo_label"].shape == (32, 32, 64) == outputs["confidence"].shape
    # The teacher is what is evaluated and checkpointed as the model.
    state = _state_of(straight_dir, config)
    stage = stages.stage_config(config, "self_training", straight_dir)
    evaluated = eval_run.evaluate_checkpoint(stage, os.path.join(straight_dir, "self_training"))
    assert evaluated["miou"] == pytest.approx(straight["final"]["miou"], abs=1e-6)
    assert float(state.extra["confident_pixels"]) > 0
    student, teacher = state.variables("seg"), state.variables("teacher")
    pairs = zip(jax.tree.leaves(student["params"]), jax.tree.leaves(teacher["params"]), strict=True)
    assert any(not np.array_equal(a, b) for a, b in pairs)

    # Interrupt the offline pass after its first batch ...
    interrupt.in_offline_pass(monkeypatch, config, crashed_dir, "pseudo_labels")
    assert offline.read_manifest(os.path.join(crashed_dir, "pseudo_labels")) is None
    with pytest.raises(offline.IncompletePassError):
        offline.load(os.path.join(crashed_dir, "pseudo_labels"))

    # ... then self-training before its step 3 (after the step-2 checkpoint), then rerun.
    interrupt.in_training(monkeypatch, config, crashed_dir, lambda stream: stream.artifacts)
    assert checkpoints.Checkpointer(os.path.join(crashed_dir, "self_training")).all_steps() == [2]
    resumed = stages.run(config, crashed_dir)

    assert resumed["final"] == {**straight["final"], "seconds": resumed["final"]["seconds"]}
    for name, values in offline.load(os.path.join(crashed_dir, "pseudo_labels")).items():
        np.testing.assert_array_equal(values, outputs[name], err_msg=name)
    again = _state_of(crashed_dir, config)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)


# Slow run (10 s): the example method; its pipeline test runs there too.
@pytest.mark.slow
def test_teacher_is_the_ema_of_the_student(data_dir):
    """One step: teacher' = m teacher + (1 - m) student' (params), student' BN statistics."""
    config = stages.stage_config(_config(data_dir), "self_training", "/unused")
    config.data.target.artifacts = ""
    mesh = mesh_lib.make_mesh(1)
    setup = trainer.build(config, mesh)
    state = trainer.init_state(config, setup)
    teacher = jax.device_get(state.teachers["teacher"])
    rng = np.random.default_rng(0)
    batch = {
        domain: {
            "image": rng.normal(size=(8, 32, 64, 3)).astype(np.float32),
            "label": rng.integers(0, 19, size=(8, 32, 64)).astype(np.uint8),
            "pseudo_label": rng.integers(0, 19, size=(8, 32, 64)).astype(np.uint8),
            "confidence": rng.uniform(size=(8, 32, 64)).astype(np.float16),
        }
        for domain in ("source", "target")
    }
    after, _ = trainer.jit_train_step(config, setup)(state, mesh_lib.to_global(batch, mesh))
    after = jax.device_get(after)
    m = config.mean_teacher.momentum
    expected = jax.tree.map(
        lambda t, s: m * t + (1 - m) * s, teacher["params"], after.params["seg"]
    )
    for a, b in zip(
        jax.tree.leaves(after.teachers["teacher"]["params"]), jax.tree.leaves(expected), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(
        jax.tree.leaves(after.teachers["teacher"]["batch_stats"]),
        jax.tree.leaves(after.batch_stats),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    expected_count = float((batch["target"]["confidence"] >= config.mean_teacher.threshold).sum())
    assert float(after.extra["confident_pixels"]) == expected_count
