"""Evaluate a saved checkpoint (`--mode=eval`): restore with orbax, evaluate, report."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections

from jaxda import checkpoints, models
from jaxda import mesh as mesh_lib
from jaxda.evaluation import evaluator as evaluator_lib
from jaxda.evaluation import metrics


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Evaluates the checkpoint of step `config.eval.step` (latest when None) in `workdir`,
    or, with `config.eval.ensemble` ('WORKDIR:WEIGHT' entries), the weighted logit average of
    the latest checkpoints of those workdirs; results go to `workdir/eval/`."""
    mesh = mesh_lib.make_mesh(config.num_devices or None)
    model = models.build_segmenter(config.model, config.num_classes)
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False)
    )
    replicated = mesh_lib.replicated(mesh)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract
    )
    model_config = json.loads(config.model.to_json())
    if config.eval.ensemble:
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
        results = evaluator_lib.Evaluator(model, config, mesh).run(members, 0, weights)
        results["ensemble"] = [
            {"checkpoint": d, "weight": w} for d, w in zip(dirs, weights, strict=True)
        ]
        name, title = "eval_mode_ensemble.json", "Target mIoU of the logit ensemble:"
    else:
        step_dir = checkpoints.find_step_dir(workdir, config.eval.step)
        variables, meta = checkpoints.restore_model_variables(step_dir, abstract, model_config)
        step = int(meta.get("step", step_dir.name if step_dir.name.isdigit() else 0))
        results = evaluator_lib.Evaluator(model, config, mesh).run(variables, step)
        results["checkpoint"] = str(step_dir)
        name = f"eval_mode_step_{step:07d}.json"
        title = f"Target mIoU of the checkpoint of step {step}:"
    evaluator_lib.write_results(results, os.path.join(workdir, "eval", name))
    print(metrics.format_table(results, title))
    return results
