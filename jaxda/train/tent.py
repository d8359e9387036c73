"""TENT (Wang et al., ICLR 2021) for segmentation, and its BN-statistics baseline ('norm').

Test-time adaptation of a trained network on the evaluation stream itself, online: each batch
is normalised with its own BN statistics, predicted (the prediction that is scored), and then,
for TENT, the BN scale and offset take one Adam step on the entropy of that same forward pass
(natural log, mean over N, H, W). 'norm' only swaps in the batch statistics: no parameter
changes. `episodic` resets the parameters after every batch. The official code covers CIFAR
only (methods.md 6); this is the segmentation port its issues ask for.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from jaxda import checkpoints, models
from jaxda import mesh as mesh_lib
from jaxda.data import input_pipeline
from jaxda.data import labels as labels_lib
from jaxda.evaluation import evaluator as evaluator_lib
from jaxda.evaluation import metrics
from jaxda.losses import entropy
from jaxda.models import layers
from jaxda.models.layers import resize_bilinear_align_corners

RESULTS_FILE = "results.json"


def bn_only_optimizer(tent_config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam on BatchNorm scale/offset; every other parameter gets no update."""

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: (
                "bn"
                if layers.is_batch_norm_param(tuple(str(getattr(k, "key", k)) for k in path))
                else "frozen"
            ),
            params,
        )

    adam = optax.adam(tent_config.learning_rate, b1=tent_config.beta1, b2=tent_config.beta2)
    return optax.partition({"bn": adam, "frozen": optax.set_to_zero()}, labels)


def adapt_step(params, opt_state, batch_stats, images, labels, *, model, tx, config):
    """Predict with batch statistics, score, then (TENT) update the BN affine parameters.

    Returns:
      (params, opt_state, [C, C] int32 confusion of the pre-update prediction, entropy loss).
    """

    def loss_fn(p):
        # Batch statistics only: the running-average updates are computed and discarded.
        outputs, _ = model.apply(
            {"params": p, "batch_stats": batch_stats}, images, train=True, mutable=["batch_stats"]
        )
        logits = outputs[config.eval.head]
        return entropy.softmax_entropy(logits), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    predictions = jnp.argmax(resize_bilinear_align_corners(logits, labels.shape[1:3]), axis=-1)
    confusion = metrics.confusion_matrix(labels, predictions, config.num_classes)
    if config.tent.update_bn_affine:
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return params, opt_state, confusion, loss


def adapt_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Adapts the network of `config.init_from` online on the evaluation split; reports the
    adapted (online) mIoU as 'final' and the starting checkpoint's as 'starting_checkpoint'."""
    if not config.init_from:
        raise ValueError(
            "TENT and BN-adapt adapt a trained network: pass --config.init_from=WORKDIR (e.g. a "
            "configs/source_only.py run with the same model settings)."
        )
    if config.eval.mode != "whole":
        raise ValueError(
            f"config.eval.mode={config.eval.mode!r}: TENT and BN-adapt predict (and adapt on) "
            "whole-image passes; use config.eval.mode='whole'"
        )
    os.makedirs(workdir, exist_ok=True)
    mesh = mesh_lib.make_mesh(config.num_devices or None)
    mesh_lib.check_batch_size(config.batch_size, mesh)
    # Test-time adaptation always normalises with batch statistics, whatever the training did.
    model = models.build_segmenter(config.model, config.num_classes).clone(train_batch_stats=True)
    evaluator = evaluator_lib.Evaluator(model, config, mesh)
    replicated = mesh_lib.replicated(mesh)
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False)
    )
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract
    )
    step_dir = checkpoints.find_step_dir(config.init_from)
    variables, meta = checkpoints.restore_model_variables(
        step_dir, abstract, json.loads(config.model.to_json())
    )
    starting = evaluator.run(variables, int(meta.get("step", 0)))

    tx = bn_only_optimizer(config.tent)
    step = jax.jit(
        functools.partial(adapt_step, model=model, tx=tx, config=config),
        donate_argnums=(0, 1),
        out_shardings=replicated,
    )
    initial_params = variables["params"]
    params = jax.tree.map(jnp.copy, initial_params)
    opt_state = tx.init(params)
    reader = input_pipeline.open_reader(config.data.eval, config.data)
    num_examples, batches = input_pipeline.eval_iterator(
        reader, config.data.eval, config.data, global_batch_size=config.batch_size
    )
    confusion = np.zeros((config.num_classes, config.num_classes), np.int64)
    losses = []
    for local_batch in batches:
        batch = mesh_lib.to_global(local_batch, mesh)
        params, opt_state, batch_confusion, loss = step(
            params, opt_state, variables["batch_stats"], batch["image"], batch["label"]
        )
        confusion += np.asarray(jax.device_get(batch_confusion), np.int64)
        losses.append(float(loss))
        if config.tent.episodic:
            params, opt_state = jax.tree.map(jnp.copy, initial_params), tx.init(initial_params)

    names = labels_lib.CITYSCAPES_CLASSES[: config.num_classes]
    adapted = metrics.summarize(
        confusion, names, evaluator.evaluated_classes, dict(config.eval.class_subsets or {})
    )
    adapted.update(
        step=len(losses),
        num_examples=num_examples,
        mean_entropy=float(np.mean(losses)),
        protocol={
            **evaluator.protocol,
            "online": "each batch predicted with its own BN statistics, scored, then adapted",
            "batch_size": config.batch_size,
            "updates": "BN scale/offset, Adam" if config.tent.update_bn_affine else "none (norm)",
            "episodic": bool(config.tent.episodic),
        },
    )
    summary = {"method": config.method, "final": adapted, "starting_checkpoint": starting}
    summary["starting_checkpoint"]["checkpoint"] = str(step_dir)
    evaluator_lib.write_results(summary, os.path.join(workdir, RESULTS_FILE))
    logging.info(
        "Online %s over %d batches: mIoU %.2f", config.method, len(losses), adapted["miou"]
    )
    print(metrics.format_table(starting, f"Starting checkpoint ({step_dir}):"))
    print(metrics.format_table(adapted, f"Adapted online ({config.method}):"))
    return summary
