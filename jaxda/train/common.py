"""Pieces shared by every method's train step: forward passes, upsampling, the supervised
loss, the output-space adversarial and discriminator losses, and the parameter update.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

from jaxda.losses import adversarial, segmentation
from jaxda.models.layers import resize_bilinear_align_corners
from jaxda.train.state import TrainState


def forward(model, seg_params, batch_stats, images, *, train: bool):
    """Runs the segmentation network; in training mode BN may update its running statistics.

    Returns:
      ({head: [N, h, w, classes] logits at stride 8}, new batch_stats).
    """
    variables = {"params": seg_params, "batch_stats": batch_stats}
    if train:
        outputs, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
        return outputs, updates.get("batch_stats", batch_stats)
    return model.apply(variables, images, train=False), batch_stats


def forward_domains(model, seg_params, batch_stats, batch):
    """Source then target through the network in training mode, upsampled as the methods do.

    Both domains pass through the same BN layers in order, as in the PyTorch loops: with batch
    statistics each is normalised by its own batch and both update the running averages.
    Source logits go to the label size, target logits to the input size (AdaptSegNet, ADVENT,
    MaxSquare all do this).

    Returns:
      ({head: [N, H, W, C] source logits}, {head: target logits}, new batch_stats).
    """
    source, target = batch["source"], batch["target"]
    source_out, batch_stats = forward(model, seg_params, batch_stats, source["image"], train=True)
    target_out, batch_stats = forward(model, seg_params, batch_stats, target["image"], train=True)
    source_up = upsample(source_out, source["label"].shape[1:3])
    return source_up, upsample(target_out, target["image"].shape[1:3]), batch_stats


def source_head_weights(config) -> dict[str, float]:
    """CE weight per head on labelled data: 1 for main, `loss.lambda_seg_aux` for aux."""
    return {"main": 1.0, "aux": config.loss.lambda_seg_aux}


def upsample(outputs: Mapping[str, jax.Array], size: tuple[int, int]) -> dict[str, jax.Array]:
    """Upsamples every head's logits to `size` (align_corners=True, as the methods do)."""
    return {head: resize_bilinear_align_corners(x, size) for head, x in outputs.items()}


def supervised_loss(
    logits: Mapping[str, jax.Array], labels: jax.Array, head_weights: Mapping[str, float]
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """sum_head weight * CE(logits[head], labels); heads with weight 0 are skipped.

    Args:
      logits: {head: [N, H, W, classes]} at label resolution.
      labels: [N, H, W] train ids, 255 ignored.
      head_weights: e.g. {'main': 1.0, 'aux': 0.1}.
    """
    total, metrics = 0.0, {}
    for head, weight in head_weights.items():
        if weight and head in logits:
            loss = segmentation.cross_entropy(logits[head], labels)
            metrics[f"loss_seg_{head}"] = loss
            total = total + weight * loss
    return total, metrics


def generator_adversarial_loss(
    discriminator, disc_params, target_inputs, weights, gan: str
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """sum_head weight * GAN(D_head(target input), 'source'): fool the frozen discriminators.

    Gradients reach the segmentation network through `target_inputs`; callers differentiate
    with respect to the segmentation parameters only, so the discriminators stay fixed.

    Args:
      target_inputs: {head: [N, H, W, C]} discriminator inputs computed from target outputs.
      weights: {head: lambda_adv}.
    """
    total, metrics = 0.0, {}
    for head, inputs in target_inputs.items():
        logits = discriminator.apply({"params": disc_params[head]}, inputs)
        loss = adversarial.gan_loss(gan, logits, adversarial.SOURCE_LABEL)
        metrics[f"loss_adv_{head}"] = loss
        total = total + weights[head] * loss
    return total, metrics


def discriminator_loss(
    discriminator, disc_params, source_inputs, target_inputs, gan: str
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """sum_head 0.5 GAN(D(source), 0) + 0.5 GAN(D(target), 1) on stop-gradient inputs."""
    total, metrics = 0.0, {}
    for head in target_inputs:
        params = {"params": disc_params[head]}
        source = discriminator.apply(params, jax.lax.stop_gradient(source_inputs[head]))
        target = discriminator.apply(params, jax.lax.stop_gradient(target_inputs[head]))
        loss = 0.5 * adversarial.gan_loss(gan, source, adversarial.SOURCE_LABEL)
        loss = loss + 0.5 * adversarial.gan_loss(gan, target, adversarial.TARGET_LABEL)
        metrics[f"loss_disc_{head}"] = loss
        total = total + loss
    return total, metrics


def apply_gradients(
    state: TrainState, grads: dict, batch_stats, tx: optax.GradientTransformation
) -> TrainState:
    """One optimizer update of all parameter groups (all gradients taken at the old params)."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats,
        opt_state=opt_state,
    )


def zeros_like_disc(params: dict) -> dict:
    """Zero gradients for the discriminators (methods that do not train them)."""
    return jax.tree.map(jnp.zeros_like, params["disc"])
