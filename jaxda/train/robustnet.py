"""RobustNet (Choi et al., CVPR 2021): domain generalisation by instance whitening.

One SGD step on the source only:
  loss = CE(main upsampled to the labels) + lambda_seg_aux x CE(aux, labels at aux size)
         + whitening.weight x mean over whitened slots of the whitening loss,
with RobustNet's auxiliary labels: nearest-downsampled to the aux logits' grid (PyTorch's
legacy 'nearest'), the logits not upsampled. `config.whitening.kind`:
  ''    none ('base' and 'ibn' networks);
  'iw'  every strict upper-triangle covariance entry, margin 0 (RobustNet's IW, weight 0.8);
  'irw' the same, relaxed: margin = num_off_diagonal // relax_denom (64; weight 0.6);
  'isw' the entries of the ISW mask (`isw_mask`), margin 0, weight 0.6, only after the mask
        pass, which runs once when `(cov_stat_epoch + 1) x epoch_steps` steps are done.
The mask lives in state.extra and the trainer checkpoints the step the pass ran at, so a run
resumed after it never repeats it (and one resumed before it repeats it exactly).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from jaxda import mesh as mesh_lib
from jaxda.losses import segmentation, whitening
from jaxda.models import resnet_torchvision
from jaxda.train import common, isw_mask, spec

KINDS = ("", "iw", "irw", "isw")


def _kind(config: ml_collections.ConfigDict) -> str:
    kind = config.whitening.kind
    if kind not in KINDS:
        raise ValueError(f"config.whitening.kind={kind!r}; use one of {KINDS}")
    if kind and config.model.get("instance_norm") != "plain":
        raise ValueError(
            f"config.whitening.kind={kind!r} whitens the maps of instance normalisation "
            f"without affine: set config.model.instance_norm='plain' (it is "
            f"{config.model.get('instance_norm')!r})"
        )
    return kind


def whitened_channels(config: ml_collections.ConfigDict) -> dict[str, int]:
    """{slot: channels} of the network's whitened maps, in INSTANCE_NORM_SLOTS order."""
    if config.model.get("instance_norm") != "plain":
        return {}
    model = spec.segmenter(config).module
    dummy = jnp.zeros((1, 64, 64, 3), jnp.float32)

    def sown(rng):
        variables = model.init(rng, dummy)
        return common.forward(model, variables, dummy, train=False, features=True)[2]

    shapes = jax.eval_shape(sown, jax.random.key(0))
    prefix = resnet_torchvision.WHITENED_PREFIX
    return {
        slot: shapes[prefix + slot].shape[-1]
        for slot in resnet_torchvision.INSTANCE_NORM_SLOTS
        if prefix + slot in shapes
    }


def mask_step(config: ml_collections.ConfigDict) -> int:
    """The step after which ISW's mask pass runs: (cov_stat_epoch + 1) epochs."""
    w = config.whitening
    return (w.cov_stat_epoch + 1) * w.epoch_steps


def init_extra(config: ml_collections.ConfigDict) -> dict:
    """ISW: {'mask': {slot: [C, C] zeros}, 'ready': False}; other kinds: {}."""
    if _kind(config) != "isw":
        return {}
    if config.total_steps < mask_step(config):
        logging.warning(
            "config.total_steps=%d ends before ISW's mask pass at step %d ((cov_stat_epoch + 1) "
            "x epoch_steps): this run trains without the whitening loss",
            config.total_steps,
            mask_step(config),
        )
    channels = whitened_channels(config)
    masks = {slot: jnp.zeros((c, c), jnp.float32) for slot, c in channels.items()}
    return {"mask": masks, "ready": jnp.zeros((), jnp.bool_)}


def _loss_terms(config, kind: str, extra: dict, channels: int, slot: str):
    """(mask [C, C], margin, num_remove) of one slot."""
    if kind == "isw":
        mask = extra["mask"][slot]
        return mask, 0.0, jnp.sum(mask)
    return whitening.iw_params(channels, config.whitening.relax_denom)


def whitening_term(config, kind: str, extra: dict, sown: dict) -> jax.Array:
    """The whitening loss averaged over the whitened slots (0 before ISW's mask exists)."""
    prefix = resnet_torchvision.WHITENED_PREFIX
    slots = [s for s in resnet_torchvision.INSTANCE_NORM_SLOTS if prefix + s in sown]
    losses = []
    for slot in slots:
        features = sown[prefix + slot]
        mask, margin, num_remove = _loss_terms(config, kind, extra, features.shape[-1], slot)
        losses.append(whitening.whitening_loss(features, mask, margin, num_remove))
    loss = sum(losses) / len(losses)
    if kind == "isw":
        loss = jnp.where(extra["ready"], loss, 0.0)
    return loss


def train_step(state, batch, *, networks, tx, config):
    """One step on `batch['source']` ({'image': [N, H, W, 3], 'label': [N, H, W]})."""
    model = networks["seg"]
    images, labels = batch["source"]["image"], batch["source"]["label"]
    kind = _kind(config)

    def loss_fn(seg_params):
        variables = {"params": seg_params, "batch_stats": state.batch_stats}
        outputs, batch_stats, sown = common.forward(
            model, variables, images, train=True, features=True, rng=state.step_key()
        )
        main = common.upsample({"main": outputs["main"]}, labels.shape[1:3])["main"]
        metrics = {"loss_seg_main": segmentation.cross_entropy(main, labels)}
        loss = metrics["loss_seg_main"]
        if "aux" in outputs and config.loss.lambda_seg_aux:
            aux_labels = segmentation.nearest_labels(labels, outputs["aux"].shape[1:3])
            metrics["loss_seg_aux"] = segmentation.cross_entropy(outputs["aux"], aux_labels)
            loss = loss + config.loss.lambda_seg_aux * metrics["loss_seg_aux"]
        if kind:
            metrics["loss_whitening"] = whitening_term(config, kind, state.extra, sown)
            loss = loss + config.whitening.weight * metrics["loss_whitening"]
        return loss, (batch_stats, metrics)

    (loss, (batch_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params["seg"]
    )
    state = common.apply_gradients(state, {"seg": grads}, batch_stats, tx)
    return state, {"loss": loss, **metrics}


def after_step(state, step: int, *, config, modules, mesh):
    """ISW's mask pass at `mask_step`: (state with the mask, summary scalars), else None."""
    if _kind(config) != "isw" or step != mask_step(config) or bool(state.extra["ready"]):
        return None
    variables = {"params": state.params["seg"], "batch_stats": state.batch_stats}
    slots = list(state.extra["mask"])
    masks, summary = isw_mask.compute_masks(modules["seg"], variables, slots, config, mesh)
    replicated = mesh_lib.replicated(mesh)
    extra = {
        "mask": {s: jax.device_put(masks[s], replicated) for s in slots},
        "ready": jax.device_put(np.asarray(True), replicated),
    }
    return state.replace(extra=extra), summary


METHOD = spec.Method(train_step, init_extra=init_extra, after_step=after_step)
