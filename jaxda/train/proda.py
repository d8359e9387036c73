"""ProDA (Zhang et al., CVPR 2021): stage 1 (prototypical pseudo-label denoising with an EMA
teacher) and stages 2/3 (self-distillation), as train steps over the generic trainer.

The warm-up is AdaptSegNet's step with ProDA's discriminator and LS-GAN (`configs/proda.py`),
and the offline passes (soft pseudo labels, prototypes, hard pseudo labels) are in
`proda_passes.py`. Every value follows docs/methods/proda.md; `config.proda` holds them.

Target batches have views (`config.data.target.views`): 'weak' (random scale, crop, flip: the
view trained on), 'full' (the whole frame, stage 1's teacher input) and 'strong' (RandAugment
and cutout on top of the weak view, `jaxda.data.randaugment`). Maps move between them with
`jaxda.data.geometry`: base frame -> weak view with `to_view`, weak -> strong with
`to_strong`. ProDA computes its pseudo-label losses at a quarter of the crop's resolution.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxda import models
from jaxda.data import geometry
from jaxda.data.labels import IGNORE_LABEL
from jaxda.losses import proda as proda_losses
from jaxda.losses import segmentation
from jaxda.models.layers import resize_bilinear_align_corners
from jaxda.train import common, spec

PROTOTYPES_FILE = "prototypes.npy"  # Written beside a converted ProDA checkpoint.


def _teacher_module(config):
    """The teacher's architecture: the student's, with `proda.teacher_bn_clr` (ProDA's
    --ema_bn: the stage-1 model has no bn_pretrain, the stage-2 model has one)."""
    module = models.build_segmenter(config.model, config.num_classes)
    return module.clone(bn_clr=config.proda.teacher_bn_clr)


def stage1_networks(config) -> dict[str, spec.Network]:
    """The student 'seg' and its EMA teacher 'ema' (starting as a copy of the student)."""
    return {"seg": spec.segmenter(config), "ema": spec.teacher_of(config)}


def distillation_networks(config) -> dict[str, spec.Network]:
    """The student 'seg' and the previous stage's fixed model 'teacher' (`init.teacher`)."""
    return {
        "seg": spec.segmenter(config),
        "teacher": spec.Network(_teacher_module(config), optimizer=None),
    }


def _load_prototypes(path: str, num_classes: int, width: int) -> np.ndarray:
    """[K, D] float32 prototypes: `path` is a prototypes pass's directory, a converted ProDA
    checkpoint's directory (both hold prototypes.npy) or a .npy file."""
    if not path:
        raise ValueError(
            "ProDA's stage 1 needs prototypes: set config.proda.prototypes to the prototypes "
            "pass's directory (e.g. 'stage:prototypes') or to a converted ProDA checkpoint "
            f"directory (its {PROTOTYPES_FILE})"
        )
    if os.path.isdir(path):
        path = os.path.join(path, PROTOTYPES_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"No prototypes at {path}: run the prototypes stage first, or point "
            "config.proda.prototypes at a converted ProDA checkpoint directory"
        )
    prototypes = np.load(path).astype(np.float32)
    if prototypes.shape != (num_classes, width):
        raise ValueError(
            f"{path} holds prototypes of shape {prototypes.shape}; this model needs "
            f"({num_classes}, {width}) (num_classes, model.head_width)"
        )
    return prototypes


def stage1_extra(config) -> dict:
    """{'prototypes' [K, D], 'prototype_counts' [K]}: ProDA's objective vectors, updated by
    an EMA every step. The counts start at 0: ProDA's stage 1 builds a new model whose counts
    are zeros (the offline pass's counts are not saved), and with start_mean=False they only
    matter through the cap."""
    prototypes = _load_prototypes(
        config.proda.prototypes, config.num_classes, config.model.head_width
    )
    return {
        "prototypes": jnp.asarray(prototypes),
        "prototype_counts": jnp.zeros((config.num_classes,), jnp.float32),
    }


def _quarter(shape) -> tuple[int, int]:
    """ProDA's loss grid: a quarter of the (height, width) of an [N, H, W, ...] input."""
    return shape[1] // 4, shape[2] // 4


def _to_grid(x: jax.Array, size) -> jax.Array:
    return resize_bilinear_align_corners(x, size)


def _nearest(labels: jax.Array, size) -> jax.Array:
    return jax.image.resize(labels, labels.shape[:1] + tuple(size), "nearest")


def _strong(maps: jax.Array, strong: dict, fill, method: str) -> tuple[jax.Array, jax.Array]:
    """(maps of the weak view moved into the strong view, valid [N, h, w])."""
    return geometry.to_strong(
        maps,
        strong["flip"],
        strong["matrix"],
        strong["cutout"],
        fill=fill,
        method=method,
        frames=strong["frames"],
    )


def _student_losses(model, params, batch_stats, source, image, pseudo, cfg, keys):
    """The student on the source batch, then on a target view `image` [N, H, W, 3] (BN
    statistics updated by both, in that order): (source CE at the label size, the pseudo-label
    loss at a quarter of the view (`proda.rce`: symmetric CE, else CE), the view's logits
    [N, H/4, W/4, C], new batch_stats)."""
    variables = {"params": params, "batch_stats": batch_stats}
    outputs, batch_stats = common.forward(
        model, variables, source["image"], train=True, rng=keys[0]
    )
    source_logits = common.upsample(outputs, source["label"].shape[1:3])["main"]
    source_loss = segmentation.cross_entropy(source_logits, source["label"])
    variables = {"params": params, "batch_stats": batch_stats}
    outputs, batch_stats = common.forward(model, variables, image, train=True, rng=keys[1])
    logits = _to_grid(outputs["main"], _quarter(image.shape))
    if cfg.rce:
        pseudo_loss = proda_losses.symmetric_cross_entropy(
            logits, pseudo, cfg.rce_alpha, cfg.rce_beta
        )
    else:
        pseudo_loss = segmentation.cross_entropy(logits, pseudo)
    return source_loss, pseudo_loss, logits, batch_stats


def stage1_step(state, batch, *, networks, tx, config):
    """ProDA's `step`: source CE, rectified pseudo labels on the weak view (symmetric CE and
    the regulariser), prototype consistency between the teacher's weak view and the
    student's strong view; then the prototype EMA and the teacher EMA."""
    model, cfg = networks["seg"], config.proda
    source, target = batch["source"], batch["target"]
    weak, full, strong = target["weak"], target["full"], target["strong"]
    prototypes = state.extra["prototypes"]
    keys = jax.random.split(state.step_key(), 4)
    grid = _quarter(weak["image"].shape)

    # The EMA teacher on the whole frame, at a quarter of its resolution. ProDA never puts it
    # in evaluation mode (batch statistics, active dropout): `teacher_train_mode`.
    train_mode = cfg.teacher_train_mode
    outputs, _, sown = common.forward(
        networks["ema"], state.teachers["ema"], full["image"], train=train_mode,
        features=True, rng=keys[0],
    )  # fmt: skip
    full_grid = _quarter(full["image"].shape)
    teacher_feature = _to_grid(sown["feature"], full_grid)
    teacher_logits = _to_grid(outputs["main"], full_grid)

    # Into the weak view (ProDA's full2weak), then rectify the soft pseudo labels.
    soft, _ = geometry.to_view(target["soft"].astype(jnp.float32), weak["box"], weak["flip"], grid)
    feature, valid = geometry.to_view(teacher_feature, weak["box"], weak["flip"], grid)
    distances = proda_losses.prototype_distances(feature, prototypes)
    if cfg.rectify:
        weights = proda_losses.rectification_weights(distances, cfg.temperature)
        pseudo = proda_losses.rectify(soft, weights, cfg.train_threshold)
    else:
        pseudo = jnp.argmax(soft, axis=-1)
    pseudo = jnp.where(valid, pseudo, IGNORE_LABEL)
    # The teacher's distances in the strong view; cutout and out-of-frame pixels are masked.
    strong_distances, strong_valid = _strong(distances, strong, 0.0, "nearest")
    strong_valid &= _strong(valid.astype(jnp.float32), strong, 0.0, "nearest")[0] > 0.5
    strong_distances = jax.lax.stop_gradient(strong_distances)

    def loss_fn(params):
        source_loss, pseudo_loss, logits, batch_stats = _student_losses(
            model, params, state.batch_stats, source, weak["image"], pseudo, cfg, keys[1:3]
        )
        if cfg.regular_weight:
            regular = proda_losses.regulariser(logits, cfg.regular_type)
            pseudo_loss = pseudo_loss + cfg.regular_weight * regular
        consistency = jnp.zeros((), jnp.float32)
        if cfg.consistency_weight:
            variables = {"params": params, "batch_stats": batch_stats}
            _, batch_stats, strong_sown = common.forward(
                model, variables, strong["image"], train=True, features=True, rng=keys[3]
            )
            consistency = proda_losses.prototype_consistency(
                _to_grid(strong_sown["feature"], grid),
                strong_distances,
                strong_valid,
                prototypes,
                cfg.temperature,
            )
        loss = source_loss + pseudo_loss + cfg.consistency_weight * consistency
        metrics = {
            "loss_source": source_loss,
            "loss_pseudo": pseudo_loss,
            "loss_consistency": consistency,
        }
        return loss, (batch_stats, metrics)

    (loss, (batch_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params["seg"]
    )
    state = common.apply_gradients(state, {"seg": grads}, batch_stats, tx)

    # Prototype EMA from the teacher's whole-frame features and its own argmax.
    vectors, present = proda_losses.class_mean_features(
        jax.lax.stop_gradient(teacher_feature), teacher_logits, cfg.prototype_min_pixels
    )
    prototypes, counts = proda_losses.update_prototypes_ema(
        prototypes,
        state.extra["prototype_counts"],
        vectors,
        present,
        cfg.prototype_momentum,
        cfg.prototype_count_cap,
    )
    teacher = common.ema_update(
        state.teachers["ema"], state.variables("seg"), cfg.ema_momentum, batch_stats="copy"
    )
    state = state.replace(
        teachers={"ema": teacher},
        extra={"prototypes": prototypes, "prototype_counts": counts},
    )
    labels = _nearest(weak["label"], grid)
    metrics["pseudo_label_accuracy"] = common.pseudo_label_accuracy(pseudo, labels)
    unrectified = jnp.where(valid, jnp.argmax(soft, axis=-1), IGNORE_LABEL)
    metrics["pseudo_label_accuracy_unrectified"] = common.pseudo_label_accuracy(unrectified, labels)
    return state, {"loss": loss, **metrics}


def distillation_step(state, batch, *, networks, tx, config):
    """ProDA's `step_distillation`: source CE; CE on the strong view against the previous
    stage's hard pseudo labels (confidence > `proda.hard_threshold`, moved into the strong
    view); plus `proda.distillation_weight` x the distillation term against the fixed
    teacher's strong-view prediction (`proda.distillation`: 'proda' as published, or 'kl')."""
    model, cfg = networks["seg"], config.proda
    source, target = batch["source"], batch["target"]
    weak, strong = target["weak"], target["strong"]
    keys = jax.random.split(state.step_key(), 2)
    grid = _quarter(strong["image"].shape)

    hard = jnp.where(
        target["confidence"].astype(jnp.float32) > cfg.hard_threshold,
        target["pseudo_label"].astype(jnp.int32),
        IGNORE_LABEL,
    )
    hard, _ = geometry.to_view(hard, weak["box"], weak["flip"], grid, method="nearest")
    hard = _strong(hard, strong, IGNORE_LABEL, "nearest")[0].astype(jnp.int32)
    teacher_out, _ = common.forward(
        networks["teacher"], state.teachers["teacher"], strong["image"], train=False
    )
    teacher_logits = jax.lax.stop_gradient(_to_grid(teacher_out["main"], grid))

    def loss_fn(params):
        source_loss, pseudo_loss, logits, batch_stats = _student_losses(
            model, params, state.batch_stats, source, strong["image"], hard, cfg, keys
        )
        distill = proda_losses.distillation(logits, teacher_logits, cfg.distillation)
        loss = source_loss + pseudo_loss + cfg.distillation_weight * distill
        metrics = {"loss_source": source_loss, "loss_pseudo": pseudo_loss, "loss_distill": distill}
        return loss, (batch_stats, metrics)

    (loss, (batch_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params["seg"]
    )
    state = common.apply_gradients(state, {"seg": grads}, batch_stats, tx)
    labels = _strong(_nearest(weak["label"], grid), strong, IGNORE_LABEL, "nearest")[0]
    metrics["pseudo_label_accuracy"] = common.pseudo_label_accuracy(hard, labels)
    metrics["pseudo_label_coverage"] = jnp.mean(hard != IGNORE_LABEL)
    return state, {"loss": loss, **metrics}


_BOTH = ("source", "target")
STAGE1 = spec.Method(
    stage1_step, _BOTH, networks=stage1_networks, init_extra=stage1_extra, eval_network="seg"
)
DISTILLATION = spec.Method(distillation_step, _BOTH, networks=distillation_networks)
