"""The training loop shared by every method.

Order of events at start: 1. if the workdir holds a checkpoint, resume from the latest one
(state, step and input-pipeline position); 2. else initialise, then load the segmentation
network from `config.init_from` when given; 3. else train from scratch.
"""

import collections
import dataclasses
import functools
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, periodic_actions

from jaxda import checkpoints, models
from jaxda import mesh as mesh_lib
from jaxda.data import input_pipeline
from jaxda.evaluation import evaluator as evaluator_lib
from jaxda.evaluation import metrics as metrics_lib
from jaxda.train import methods, optimizers
from jaxda.train import state as state_lib

EVAL_SUBDIR = "eval"
RESULTS_FILE = "results.json"


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; training stopped before saving anything after it."""


def _model_meta(config) -> dict:
    return json.loads(config.model.to_json())


def _is_step(step: int, every: int, total: int) -> bool:
    return step == total or (every > 0 and step % every == 0)


def _load_eval_history(workdir: str) -> list[dict]:
    directory = os.path.join(workdir, EVAL_SUBDIR)
    if not os.path.isdir(directory):
        return []
    history = []
    for name in sorted(os.listdir(directory)):
        if name.startswith("step_") and name.endswith(".json"):
            with open(os.path.join(directory, name)) as f:
                history.append(json.load(f))
    return history


def _write_eval(writer, results: dict, workdir: str) -> None:
    step = results["step"]
    evaluator_lib.write_results(
        results, os.path.join(workdir, EVAL_SUBDIR, f"step_{step:07d}.json")
    )
    scalars = {"eval/miou": results["miou"], "eval/pixel_accuracy": results["pixel_accuracy"]}
    for key, value in results.items():
        if key.startswith("miou_"):
            scalars[f"eval/{key}"] = value
    for name, value in results["per_class_iou"].items():
        if value is not None:
            scalars[f"eval/iou/{name}"] = value
    writer.write_scalars(step, scalars)


def _evaluate(evaluator, writer, variables, step: int, workdir: str) -> dict:
    """Evaluates, writes the results (JSON, scalars) and the prediction images; returns them."""
    results, images = evaluator.run_with_visuals(variables, step)
    _write_eval(writer, results, workdir)
    if images:
        writer.write_images(step, images)
    return results


def summarize_run(history: list[dict], total_steps: int) -> dict:
    """Final-checkpoint results and, separately labelled, the best evaluation on the val split."""
    final = next((r for r in history if r["step"] == total_steps), None)
    summary = {"final": final}
    if history:
        best = max(history, key=lambda r: r["miou"])
        summary["selected_on_validation"] = {
            "note": "best of the periodic evaluations on the evaluation split itself: an "
            "optimistic, selected number, not a held-out result; report 'final'",
            "step": best["step"],
            "miou": best["miou"],
            "evaluated_steps": [r["step"] for r in history],
        }
    return summary


def _check_finite(step: int, metrics: dict, last_checkpoint: int | None) -> None:
    bad = {k: float(v) for k, v in metrics.items() if not np.isfinite(v)}
    if bad:
        where = (
            f"the last checkpoint (step {last_checkpoint}) is intact"
            if last_checkpoint is not None
            else "no checkpoint had been written yet"
        )
        raise NonFiniteLossError(
            f"Non-finite loss at step {step}: {bad}. Training stopped and nothing from this step "
            f"was saved; {where}. Lower the learning rate or the adversarial weights, check the "
            "input data, then rerun the same command to resume."
        )


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a config builds: networks, method, optimizer and the abstract (shape-only) state."""

    model: Any
    discriminator: Any
    method: methods.Method
    tx: optax.GradientTransformation
    init_fn: Callable[[jax.Array], state_lib.TrainState]
    abstract_state: state_lib.TrainState  # ShapeDtypeStructs, replicated over the mesh.


def build(config: ml_collections.ConfigDict, mesh) -> Setup:
    """Builds the networks, method and optimizer of `config` for `mesh`."""
    model = models.build_segmenter(config.model, config.num_classes)
    discriminator = models.build_discriminator(config.discriminator)
    method = methods.get(config.method)
    tx = optimizers.make_optimizer(config)
    init_fn = functools.partial(
        state_lib.create,
        model=model,
        discriminator=discriminator,
        discriminator_heads=method.discriminator_heads(config),
        num_classes=config.num_classes,
        tx=tx,
    )
    replicated = mesh_lib.replicated(mesh)
    abstract = jax.eval_shape(init_fn, jax.random.key(config.seed))
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract
    )
    return Setup(model, discriminator, method, tx, init_fn, abstract)


def init_state(config: ml_collections.ConfigDict, setup: Setup) -> state_lib.TrainState:
    """A fresh state from `config.seed`, replicated over the mesh of `setup.abstract_state`."""
    key = jax.random.key(config.seed)
    shardings = jax.tree.map(lambda x: x.sharding, setup.abstract_state)
    init = jax.jit(setup.init_fn, out_shardings=shardings)
    # Initialisation runs once: XLA:CPU's default optimisation makes compiling the PRNG calls
    # of every layer take ~10 s, level 0 takes ~2 s (same random bits, negligible run time).
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    return init.lower(key).compile(compiler_options=options)(key)


def jit_train_step(config: ml_collections.ConfigDict, setup: Setup):
    """The method's step as `jax.jit((state, batch) -> (state, metrics))`, state donated.

    The batch is a pytree of global arrays sharded over the mesh's 'data' axis; the state
    stays replicated and the metrics come back replicated.
    """
    shardings = jax.tree.map(lambda x: x.sharding, setup.abstract_state)
    replicated = jax.tree.leaves(shardings)[0]
    step = functools.partial(
        setup.method.train_step,
        model=setup.model,
        discriminator=setup.discriminator,
        tx=setup.tx,
        config=config,
    )
    return jax.jit(step, donate_argnums=(0,), out_shardings=(shardings, replicated))


def _initial_state(config, setup: Setup, checkpointer):
    latest = checkpointer.latest_step()
    if latest is not None:
        items, meta = checkpointer.restore(
            latest, setup.abstract_state.checkpoint_items(), _model_meta(config)
        )
        logging.info("Resuming from step %d (%s)", latest, checkpointer.directory)
        return state_lib.TrainState.from_checkpoint_items(items), meta
    state = init_state(config, setup)
    if config.init_from:
        step_dir = checkpoints.find_step_dir(config.init_from)
        variables, _ = checkpoints.restore_model_variables(
            step_dir, setup.abstract_state.model_variables(), _model_meta(config)
        )
        state = state.replace(
            params={**state.params, "seg": variables["params"]},
            batch_stats=variables.get("batch_stats", state.batch_stats),
        )
        logging.info("Initialised the segmentation network from %s", step_dir)
    return state, {}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains `config.method`, evaluating and checkpointing periodically; returns the summary."""
    method = methods.get(config.method)
    if method.run is not None:  # Test-time adaptation: a loop of its own.
        return method.run(config, workdir)
    os.makedirs(workdir, exist_ok=True)
    mesh = mesh_lib.make_mesh(config.num_devices or None)
    mesh_lib.check_batch_size(config.batch_size, mesh)
    setup = build(config, mesh)
    method = setup.method
    # Open every dataset before the expensive initialisation, so missing data fails at once.
    readers = {d: input_pipeline.open_reader(config.data[d], config.data) for d in method.domains}
    evaluator = evaluator_lib.Evaluator(setup.model, config, mesh)
    checkpointer = checkpoints.Checkpointer(workdir, keep=config.keep_checkpoints)
    state, meta = _initial_state(config, setup, checkpointer)
    start_step = int(state.step)
    positions = {d: start_step * config.batch_size for d in method.domains}
    for domain, saved in meta.get("data_position", {}).items():
        if saved != positions.get(domain, saved):
            raise checkpoints.CheckpointMismatchError(
                f"Checkpoint of step {start_step} recorded {domain} stream position {saved}, but "
                f"step x batch_size = {positions[domain]}: config.batch_size changed since it "
                "was written. Resume with the original batch size or use a new workdir."
            )
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))

    streams = {
        domain: input_pipeline.train_iterator(
            readers[domain],
            config.data[domain],
            config.data,
            global_batch_size=config.batch_size,
            seed=(config.seed, stream),
            start=positions[domain],
        )
        for stream, domain in enumerate(method.domains)
    }
    train_step = jit_train_step(config, setup)
    writer = metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() > 0, asynchronous=True
    )
    report = periodic_actions.ReportProgress(
        num_train_steps=config.total_steps, writer=writer, every_steps=config.log_every_steps
    )
    learning_rate = optimizers.segmentation_schedule(config)
    history = [r for r in _load_eval_history(workdir) if r["step"] <= start_step]
    last_checkpoint = checkpointer.latest_step()
    window = collections.defaultdict(list)
    for group, params in setup.abstract_state.params.items():
        count = sum(x.size for x in jax.tree.leaves(params))
        logging.info("Parameters of %s: %s", group, f"{count:,}")
    logging.info(
        "Training %s from step %d to %d on %d device(s), global batch %d",
        config.method,
        start_step,
        config.total_steps,
        mesh.size,
        config.batch_size,
    )
    try:
        for step in range(start_step + 1, config.total_steps + 1):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                batch = mesh_lib.to_global({d: next(s) for d, s in streams.items()}, mesh)
                state, metrics = train_step(state, batch)
            metrics = jax.device_get(metrics)
            _check_finite(step, metrics, last_checkpoint)
            for key, value in metrics.items():
                window[key].append(float(value))
            report(step)
            if _is_step(step, config.log_every_steps, config.total_steps):
                scalars = {f"train/{k}": float(np.mean(v)) for k, v in window.items()}
                scalars["train/learning_rate"] = float(learning_rate(step - 1))
                writer.write_scalars(step, scalars)
                logging.info(
                    "step %d: %s", step, ", ".join(f"{k[6:]}={v:.4g}" for k, v in scalars.items())
                )
                window.clear()
            if _is_step(step, config.checkpoint_every_steps, config.total_steps):
                meta = {
                    "data_position": {d: step * config.batch_size for d in method.domains},
                    "model": _model_meta(config),
                    "method": config.method,
                }
                checkpointer.save(step, state.checkpoint_items(), meta)
                last_checkpoint = step
            if _is_step(step, config.eval_every_steps, config.total_steps):
                history.append(_evaluate(evaluator, writer, state.model_variables(), step, workdir))
    finally:
        checkpointer.wait()
        checkpointer.close()
        writer.flush()

    if not history or history[-1]["step"] != config.total_steps:
        # Resumed after the last step had already been trained: evaluate its checkpoint again.
        step = int(state.step)
        history.append(_evaluate(evaluator, writer, state.model_variables(), step, workdir))
    writer.close()
    summary = {"method": config.method, **summarize_run(history, config.total_steps)}
    evaluator_lib.write_results(summary, os.path.join(workdir, RESULTS_FILE))
    final = summary["final"]
    print(metrics_lib.format_table(final, f"Target mIoU at the final step {final['step']}:"))
    if "selected_on_validation" in summary:
        sel = summary["selected_on_validation"]
        print(
            f"  (selected on the validation split, optimistic: step {sel['step']} "
            f"mIoU {sel['miou']:.2f})"
        )
    return summary
