"""End to end on the tiny dataset: train, checkpoint, evaluate, resume, init_from, NaN stop."""

import json
import os

import jax
import numpy as np
import pytest

from jaxda import checkpoints
from jaxda import mesh as mesh_lib
from jaxda.data import input_pipeline
from jaxda.evaluation import evaluator as evaluator_lib
from jaxda.evaluation import run as eval_run
from jaxda.train import methods, reporting, source_only, spec, trainer
from tests.conftest import tiny_config


def _params_of(workdir, config, step=None):
    mesh = mesh_lib.make_mesh(1)
    setup = trainer.build(config, mesh)
    variables, _ = checkpoints.restore_model_variables(
        checkpoints.find_step_dir(workdir, step),
        setup.abstract_state.model_variables(),
        checkpoints.model_meta(config.model),
    )
    return jax.device_get(variables)


def test_train_evaluate_and_resume(data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    config = tiny_config(data_dir=data_dir)
    summary = trainer.train_and_evaluate(config, workdir)

    final = summary["final"]
    assert final["step"] == 4 and 0.0 <= final["miou"] <= 100.0
    assert set(final["per_class_iou"]) >= {"road", "sky", "car"}
    assert summary["selected_on_validation"]["evaluated_steps"] == [2, 4]
    assert sorted(os.listdir(os.path.join(workdir, "eval"))) == [
        "step_0000002.json",
        "step_0000004.json",
    ]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
    assert checkpoints.Checkpointer(workdir).all_steps() == [2, 4]
    with open(os.path.join(workdir, "results.json")) as f:
        assert json.load(f)["final"]["miou"] == final["miou"]

    # --mode=eval restores the latest checkpoint and reproduces the final mIoU.
    evaluated = eval_run.evaluate_checkpoint(config, workdir)
    assert evaluated["step"] == 4
    assert evaluated["miou"] == pytest.approx(final["miou"], abs=0.01)
    config.eval.step = 2
    with open(os.path.join(workdir, "eval", "step_0000002.json")) as f:
        at_two = json.load(f)
    assert eval_run.evaluate_checkpoint(config, workdir)["miou"] == pytest.approx(at_two["miou"])
    config.eval.step = None

    # The same command again: nothing left to train, same answer.
    assert trainer.train_and_evaluate(config, workdir)["final"]["miou"] == final["miou"]


class _Crash(Exception):
    pass


def test_crash_and_resume_equals_uninterrupted_run(data_dir, tmp_path, monkeypatch):
    config = tiny_config(data_dir=data_dir, total_steps=6)
    straight_dir, crashed_dir = str(tmp_path / "straight"), str(tmp_path / "crashed")
    straight = trainer.train_and_evaluate(config, straight_dir)

    # Crash while fetching the batch of step 6, i.e. before step 5 runs (the trainer transfers
    # one batch ahead), after the step-4 checkpoint; then rerun.
    make_iterator = input_pipeline.train_iterator

    def crashing_iterator(*args, **kwargs):
        iterator = make_iterator(*args, **kwargs)
        for _ in range(5):
            yield next(iterator)
        raise _Crash

    monkeypatch.setattr(input_pipeline, "train_iterator", crashing_iterator)
    with pytest.raises(_Crash):
        trainer.train_and_evaluate(config, crashed_dir)
    monkeypatch.setattr(input_pipeline, "train_iterator", make_iterator)
    assert checkpoints.Checkpointer(crashed_dir).all_steps() == [2, 4]
    resumed = trainer.train_and_evaluate(config, crashed_dir)

    assert resumed["final"] == {**straight["final"], "seconds": resumed["final"]["seconds"]}
    for a, b in zip(
        jax.tree.leaves(_params_of(crashed_dir, config)),
        jax.tree.leaves(_params_of(straight_dir, config)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # ~20 s; by default: test_initialization's refusals naming variables,
# test_convert's test_trainer_init_from_accepts_the_converted_checkpoint.
def test_init_from_and_model_mismatch(data_dir, tmp_path):
    source = str(tmp_path / "source_only")
    config = tiny_config("source_only", data_dir=data_dir, total_steps=2)
    trainer.train_and_evaluate(config, source)
    trained = _params_of(source, config)

    adapt = tiny_config("adaptseg", data_dir=data_dir, init_from=source)
    mesh = mesh_lib.make_mesh(1)
    setup = trainer.build(adapt, mesh)
    ckptr = checkpoints.Checkpointer(str(tmp_path / "adapt"))
    state, _ = trainer._initial_state(adapt, setup, ckptr)
    for a, b in zip(
        jax.tree.leaves(trained["params"]), jax.tree.leaves(state.params["seg"]), strict=True
    ):
        np.testing.assert_array_equal(a, b)

    wider = tiny_config("adaptseg", data_dir=data_dir, init_from=source, **{"model.width": 8})
    with pytest.raises(checkpoints.CheckpointMismatchError, match="width: checkpoint 4"):
        trainer._initial_state(wider, trainer.build(wider, mesh), ckptr)


def test_model_meta_check_ignores_training_only_keys():
    saved = {"model": {"depth": 101, "width": 64, "bn_mode": "batch_stats"}}
    # bn_mode changes how a network trains, not what its parameters mean (e.g. MaxSquare
    # fine-tuning an AdaptSegNet-trained network), whichever side it is on.
    checkpoints.check_model_meta(saved, {"depth": 101, "width": 64, "bn_mode": "train"}, "ckpt")
    checkpoints.check_model_meta(saved, {"depth": 101, "width": 64}, "ckpt")
    with pytest.raises(checkpoints.CheckpointMismatchError, match="depth: checkpoint 101 vs"):
        checkpoints.check_model_meta(saved, {"depth": 50, "width": 64, "bn_mode": "train"}, "x")


def _nan_at_step_3(state, batch, **kwargs):
    state, metrics = source_only.train_step(state, batch, **kwargs)
    poisoned = jax.numpy.where(state.step == 3, jax.numpy.nan, metrics["loss"])
    return state, {**metrics, "loss": poisoned}


def test_nan_loss_stops_and_keeps_last_checkpoint(data_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(methods.METHODS, "nan_test", spec.Method(_nan_at_step_3))
    workdir = str(tmp_path / "nan")
    config = tiny_config("source_only", data_dir=data_dir, total_steps=6)
    config.method = "nan_test"
    config.checkpoint_every_steps = 1
    with pytest.raises(trainer.NonFiniteLossError, match=r"step 3.*last checkpoint \(step 2\)"):
        trainer.train_and_evaluate(config, workdir)
    assert checkpoints.Checkpointer(workdir).all_steps() == [1, 2]
    restored = _params_of(workdir, config)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored))


@pytest.mark.slow  # ~11 s; by default: test_train_evaluate_and_resume's selection record.
def test_selection_split_for_periodic_evaluations(data_dir, tmp_path):
    """With config.data.selection, periodic evaluations (and the labelled selection) use it,
    and 'final' is the last step scored once on config.data.eval."""
    workdir = str(tmp_path / "run")
    config = tiny_config("source_only", data_dir=data_dir)
    config.data.selection = config.data.eval.copy_and_resolve_references()
    config.data.selection.split = "target_train"
    summary = trainer.train_and_evaluate(config, workdir)
    selected = summary["selected_on_validation"]
    assert selected["protocol"]["split"] == "target_train"
    assert "selection split" in selected["note"]
    final = summary["final"]
    assert final["step"] == 4 and final["protocol"]["split"] == "target_validation"
    history = reporting.load_eval_history(workdir)
    assert [r["protocol"]["split"] for r in history] == ["target_train"] * 2
    # The final number is the evaluation split's score of the last checkpoint.
    mesh = mesh_lib.make_mesh(1)
    model = trainer.build(config, mesh).model
    variables = _params_of(workdir, config, 4)
    expected = evaluator_lib.Evaluator(model, config, mesh).run(variables, 4)
    assert final["miou"] == pytest.approx(expected["miou"], abs=1e-9)
    assert final["miou"] != pytest.approx(history[-1]["miou"], abs=1e-9)
