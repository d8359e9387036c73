"""Evaluate a saved checkpoint (`--mode=eval`): restore with orbax, evaluate, report."""

import dataclasses
import os
from typing import Any

import jax
import ml_collections

from jaxda import checkpoints, models
from jaxda import mesh as mesh_lib
from jaxda.evaluation import datasets as datasets_lib
from jaxda.evaluation import evaluator as evaluator_lib
from jaxda.evaluation import inference, metrics


@dataclasses.dataclass(frozen=True)
class Networks:
    """Restored networks: one checkpoint, or the members of a logit ensemble."""

    model: Any
    members: list  # Variables of each network, replicated over the mesh.
    weights: list[float]
    step_dirs: list[str]
    step: int  # The checkpoint's step; 0 for an ensemble.
    is_ensemble: bool


def restore_networks(config: ml_collections.ConfigDict, workdir: str, mesh) -> Networks:
    """The checkpoint of step `config.eval.step` (latest when None) in `workdir`, or, with
    `config.eval.ensemble` ('WORKDIR:WEIGHT' entries), the latest checkpoints of those
    workdirs with their weights; variables replicated over `mesh`."""
    model = models.build_segmenter(config.model, config.num_classes)
    abstract = mesh_lib.replicate_abstract(models.abstract_variables(model), mesh)
    model_config = checkpoints.model_meta(config.model)
    if not config.eval.ensemble:
        step_dir = checkpoints.find_step_dir(workdir, config.eval.step)
        variables, meta = checkpoints.restore_model_variables(step_dir, abstract, model_config)
        step = int(meta.get("step", step_dir.name if step_dir.name.isdigit() else 0))
        return Networks(model, [variables], [1.0], [str(step_dir)], step, is_ensemble=False)
    members, weights, dirs = [], [], []
    for entry in config.eval.ensemble:
        path, _, weight = entry.rpartition(":")
        if not path:
            raise ValueError(f"config.eval.ensemble entry {entry!r} must be 'WORKDIR:WEIGHT'")
        step_dir = checkpoints.find_step_dir(path)
        variables, _ = checkpoints.restore_model_variables(step_dir, abstract, model_config)
        members.append(variables)
        weights.append(float(weight))
        dirs.append(str(step_dir))
    return Networks(model, members, weights, dirs, 0, is_ensemble=True)


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Evaluates the networks of `restore_networks` with config.eval.mode; results go to
    `workdir/eval/eval_mode_{step_NNNNNNN|ensemble}[_MODE].json` (no suffix for 'whole').

    With config.eval.datasets, each of those datasets is evaluated next (`datasets.evaluate`):
    one table, `workdir/eval/datasets_{step_NNNNNNN|ensemble}[_MODE].json`, TensorBoard
    scalars in workdir/eval; the returned results then hold that record under 'datasets'.
    """
    inference.Settings.from_config(config.eval)  # Wrong settings fail before the restore.
    if config.eval.get("datasets"):
        datasets_lib.ordered_names(config.eval)  # A wrong row order fails before the restore.
    mesh = mesh_lib.make_mesh(config.num_devices or None)
    networks = restore_networks(config, workdir, mesh)
    evaluator = evaluator_lib.Evaluator(networks.model, config, mesh)
    # Other inference modes get their own file next to the protocol's 'whole' one.
    suffix = "" if config.eval.mode == "whole" else f"_{config.eval.mode}"
    if networks.is_ensemble:
        results = evaluator.run(networks.members, 0, networks.weights)
        results["ensemble"] = [
            {"checkpoint": d, "weight": w}
            for d, w in zip(networks.step_dirs, networks.weights, strict=True)
        ]
        name, title = f"eval_mode_ensemble{suffix}.json", "Target mIoU of the logit ensemble:"
        run_name, variables = "ensemble", networks.members
    else:
        step = networks.step
        results = evaluator.run(networks.members[0], step)
        results["checkpoint"] = networks.step_dirs[0]
        name = f"eval_mode_step_{step:07d}{suffix}.json"
        title = f"Target mIoU of the checkpoint of step {step}:"
        run_name, variables = f"step_{step:07d}", networks.members[0]
    if jax.process_index() == 0:  # Every process computed the same results.
        evaluator_lib.write_results(results, os.path.join(workdir, "eval", name))
    print(metrics.format_table(results, title))
    if config.eval.get("datasets"):
        listed = datasets_lib.evaluate(
            networks.model, config, mesh, variables, networks.step, networks.weights
        )
        what = "the logit ensemble" if networks.is_ensemble else f"step {networks.step}"
        results["datasets"] = datasets_lib.report(
            listed,
            workdir,
            f"datasets_{run_name}{suffix}.json",
            networks.step,
            f"config.eval.datasets, {what} ({config.eval.mode} inference):",
            {k: results[k] for k in ("checkpoint", "ensemble") if k in results},
        )
    return results
