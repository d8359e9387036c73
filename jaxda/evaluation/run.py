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
    """Evaluates the checkpoint of step `config.eval.step` (latest when None) in `workdir`."""
    mesh = mesh_lib.make_mesh(config.num_devices or None)
    model = models.build_segmenter(config.model, config.num_classes)
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False)
    )
    replicated = mesh_lib.replicated(mesh)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract
    )
    step_dir = checkpoints.find_step_dir(workdir, config.eval.step)
    variables, meta = checkpoints.restore_model_variables(
        step_dir, abstract, json.loads(config.model.to_json())
    )
    step = int(meta.get("step", step_dir.name if step_dir.name.isdigit() else 0))
    results = evaluator_lib.Evaluator(model, config, mesh).run(variables, step)
    results["checkpoint"] = str(step_dir)
    evaluator_lib.write_results(
        results, os.path.join(workdir, "eval", f"eval_mode_step_{step:07d}.json")
    )
    print(metrics.format_table(results, f"Target mIoU of the checkpoint of step {step}:"))
    return results
