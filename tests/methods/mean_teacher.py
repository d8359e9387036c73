"""A test-only self-training method, written against the public hooks alone (no trainer code):
mean-teacher self-training from offline pseudo labels.

  loss = source CE + lambda_target x CE(student(target), pseudo label where confidence >= t)
  teacher <- momentum x teacher + (1 - momentum) x student   (params; BN statistics copied)

The pseudo labels come from an offline pass of the warm-up model over the target split,
joined to the target batches by example index (`config.data.target.artifacts`); the teacher
is an EMA slot no optimizer sees, and it is the network that is evaluated and checkpointed as
the 'model'. `extra` counts the confident target pixels trained on (per-method state).
"""

import jax
import jax.numpy as jnp

from jaxda.data import labels
from jaxda.losses import segmentation
from jaxda.train import common, methods, spec


def networks(config) -> dict[str, spec.Network]:
    return {"seg": spec.segmenter(config), "teacher": spec.teacher_of(config)}


def init_extra(config) -> dict:
    del config
    return {"confident_pixels": jnp.zeros((), jnp.float32)}


def train_step(state, batch, *, networks, tx, config):
    model, cfg = networks["seg"], config.mean_teacher
    source, target = batch["source"], batch["target"]
    confident = target["confidence"] >= cfg.threshold
    pseudo = jnp.where(confident, target["pseudo_label"], labels.IGNORE_LABEL)

    def loss_fn(seg_params):
        source_up, target_up, batch_stats = common.forward_domains(
            model, seg_params, state.batch_stats, batch, state.step_key()
        )
        loss, metrics = common.supervised_loss(
            source_up, source["label"], common.source_head_weights(config)
        )
        target_loss = segmentation.cross_entropy(target_up["main"], pseudo)
        metrics["loss_pseudo"] = target_loss
        return loss + cfg.lambda_target * target_loss, (batch_stats, metrics)

    (loss, (batch_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params["seg"]
    )
    state = common.apply_gradients(state, {"seg": grads}, batch_stats, tx)
    teacher = common.ema_update(state.teachers["teacher"], state.variables("seg"), cfg.momentum)
    count = state.extra["confident_pixels"] + jnp.sum(confident)
    state = state.replace(teachers={"teacher": teacher}, extra={"confident_pixels": count})
    return state, {"loss": loss, **metrics}


METHOD = spec.Method(
    train_step,
    ("source", "target"),
    networks=networks,
    init_extra=init_extra,
    eval_network="teacher",
)
methods.register("mean_teacher_test", METHOD)
