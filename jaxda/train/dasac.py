"""DA-SAC (Araslanov and Roth, CVPR 2021): the adaptive-BN baseline and self-supervised
augmentation consistency with a momentum network, as train steps over the generic trainer.

Every value follows docs/methods/dasac.md; `config.sac` holds them. Target batches are groups
of views (`config.data.target.group`, `jaxda.data.view_groups`): per image T views of one
reference crop, each with its `box` and `flip` in that crop, a clean copy (the momentum
network's input) and a copy with photometric noise (the student's); the pipeline flattens
them to [images x T, ...] rows, consecutive T rows per image.

Stage A, `dasac_abn`: source CE, one SGD step, then the target views through the updated
network in training mode without gradient, so that only the BN running statistics see the
target (adaptive BN). Stage B, `dasac_sac`: source CE plus `sac.target_weight` x the
confidence-weighted, class-balanced CE against pseudo labels that the momentum network
(`slow`, evaluation mode) fuses over the views; BN in evaluation mode (bn_mode
'frozen_stats'), its scale and offset still trained.
"""

import jax
import jax.numpy as jnp

from jaxda.data.labels import IGNORE_LABEL
from jaxda.losses import sac as sac_losses
from jaxda.losses import segmentation
from jaxda.train import common, spec


def source_loss(outputs, labels, config) -> jax.Array:
    """CE of the main head upsampled to the labels: averaged over all pixels, ignored ones
    counting 0, as DA-SAC's `reduction='none'` then `.mean()` (`sac.source_mean_all_pixels`),
    or over the labelled pixels."""
    logits = common.upsample(outputs, labels.shape[1:3])["main"]
    if config.sac.source_mean_all_pixels:
        return sac_losses.cross_entropy_all_pixels(logits, labels)
    return segmentation.cross_entropy(logits, labels)


def _target_rows(target: dict) -> dict:
    """The target batch's views {'image', 'clean', 'label', 'valid', 'box', 'flip'} as rows
    [images x T, ...] (a stream without `group`: its images, one clean view each)."""
    if "group" in target:
        return target["group"]
    rows = {"image": target["image"], "clean": target["image"], "label": target["label"]}
    return {**rows, "valid": target["label"] != IGNORE_LABEL}


def _source_update(state, source, model, tx, config):
    """One SGD step on the source CE; returns (state, loss)."""

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        outputs, batch_stats = common.forward(model, variables, source["image"], train=True)
        return source_loss(outputs, source["label"], config), batch_stats

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params["seg"])
    return common.apply_gradients(state, {"seg": grads}, batch_stats, tx), loss


def abn_step(state, batch, *, networks, tx, config):
    """DA-SAC's baseline: the source step, then the target views (student input) through the
    updated network in training mode: only BN's running statistics change."""
    model = networks["seg"]
    state, loss = _source_update(state, batch["source"], model, tx, config)
    target = jax.lax.stop_gradient(_target_rows(batch["target"])["image"])
    _, batch_stats = common.forward(model, state.variables("seg"), target, train=True)
    seg_state = {**state.model_state.get("seg", {}), "batch_stats": batch_stats}
    model_state = {**state.model_state, "seg": seg_state}
    return state.replace(model_state=model_state), {"loss": loss, "loss_source": loss}


def networks_with_teacher(config) -> dict[str, spec.Network]:
    """The student 'seg' and the momentum network 'slow' (DA-SAC's slow_net)."""
    return {"seg": spec.segmenter(config), "slow": spec.teacher_of(config)}


def sac_extra(config) -> dict:
    """{'class_prior' [C] (DA-SAC's running_conf), 'teacher_ready' [] bool (its slow_init):
    False until the first teacher update, which copies the student and resets the prior}."""
    beta = config.sac.threshold_beta
    return {
        "class_prior": jnp.full((config.num_classes,), beta, jnp.float32),
        "teacher_ready": jnp.zeros((), bool),
    }


def _select(flag, a, b):
    return jax.tree.map(lambda x, y: jnp.where(flag, x, y), a, b)


def teacher_update(state, config):
    """DA-SAC's `_momentum_update`, before this step's teacher forward: the first call copies
    the student and resets the class prior to beta; afterwards, every `sac.teacher_every`
    iterations (counted within an epoch of `sac.epoch_steps` steps when set, as DA-SAC's loop
    index restarts each epoch), teacher = momentum x teacher + (1 - momentum) x student for
    every parameter and BN statistic. Returns (teacher variables, class prior, updated flag)."""
    cfg = config.sac
    step = state.step
    index = step % cfg.epoch_steps if cfg.epoch_steps else step
    due = index % cfg.teacher_every == 0
    ready = state.extra["teacher_ready"]
    student, teacher = state.variables("seg"), state.teachers["slow"]
    averaged = common.ema_update(teacher, student, cfg.teacher_momentum, batch_stats="ema")
    teacher = _select(ready, _select(due, averaged, teacher), student)
    prior = jnp.where(ready, state.extra["class_prior"], cfg.threshold_beta)
    return teacher, prior, due | ~ready


def pseudo_label_metrics(pseudo, labels, valid) -> dict:
    """Accuracy of the pseudo labels against the target labels where both exist (monitoring
    only: no loss sees target labels) and coverage: the share of valid pixels labelled."""
    labelled = pseudo != IGNORE_LABEL
    return {
        "pseudo_label_accuracy": common.pseudo_label_accuracy(pseudo, labels),
        "pseudo_label_coverage": jnp.sum(labelled & valid) / jnp.maximum(jnp.sum(valid), 1),
    }


def sac_step(state, batch, *, networks, tx, config):
    """DA-SAC's iteration (`train.py::train_epoch`, `models/sac.py::SAC.forward`): the teacher
    update, the momentum network's fused pseudo labels, then one SGD step on source CE +
    `sac.target_weight` x the confidence-weighted focal CE."""
    cfg, model = config.sac, networks["seg"]
    source, views = batch["source"], _target_rows(batch["target"])
    num_views = config.data.target.group.size if "group" in batch["target"] else 1
    size = views["image"].shape[1:3]
    pad = ~views["valid"]

    teacher, prior, updated = teacher_update(state, config)
    logits, _ = common.forward(networks["slow"], teacher, views["clean"], train=False)
    probs = jax.nn.softmax(common.upsample(logits, size)["main"].astype(jnp.float32), -1)
    prior = sac_losses.update_class_prior(prior, probs, cfg.threshold_beta, cfg.prior_momentum)
    if cfg.fuse_views:
        affine, affine_inv = sac_losses.view_affines(views["box"], views["flip"])
        probs, _ = sac_losses.fuse_views(probs, affine, affine_inv, pad, num_views)
    else:
        probs = probs * (~pad)[..., None]
    pseudo, confidence = sac_losses.pseudo_labels(
        probs,
        prior,
        pad,
        upper=cfg.confidence_upper,
        lower=cfg.confidence_lower,
        beta=cfg.threshold_beta,
        discount=cfg.threshold_discount,
    )
    class_weights = sac_losses.focal_weights(prior, cfg.focal_power)
    pseudo, confidence = jax.lax.stop_gradient((pseudo, confidence))

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        outputs, batch_stats = common.forward(model, variables, source["image"], train=True)
        loss_source = source_loss(outputs, source["label"], config)
        variables = {"params": params, "batch_stats": batch_stats}
        outputs, batch_stats = common.forward(model, variables, views["image"], train=True)
        loss_self = sac_losses.confidence_weighted_ce(
            common.upsample(outputs, size)["main"],
            pseudo,
            class_weights,
            confidence,
            mode=cfg.confidence_weighting,
            group=cfg.confidence_group,
        )
        loss = loss_source + cfg.target_weight * loss_self
        return loss, (batch_stats, {"loss_source": loss_source, "loss_self": loss_self})

    (loss, (batch_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params["seg"]
    )
    state = common.apply_gradients(state, {"seg": grads}, batch_stats, tx)
    state = state.replace(
        teachers={"slow": teacher},
        extra={"class_prior": prior, "teacher_ready": jnp.ones((), bool)},
    )
    metrics.update(pseudo_label_metrics(pseudo, views["label"], views["valid"]))
    metrics["teacher_updated"] = updated.astype(jnp.float32)
    metrics["class_prior_max"] = jnp.max(prior)
    return state, {"loss": loss, **metrics}


_BOTH = ("source", "target")
ABN = spec.Method(abn_step, _BOTH)
SAC = spec.Method(sac_step, _BOTH, networks=networks_with_teacher, init_extra=sac_extra)
