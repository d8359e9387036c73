"""Adaptation by a loss on the target predictions alone: MinEnt (ADVENT, Vu et al. CVPR 2019)
and MaxSquare (Chen et al. ICCV 2019), with the source CE beside it (see
docs/methods/advent.md and docs/methods/maxsquare.md).

Both take the softmax of the target logits upsampled to the input size; one optimizer step
per iteration, source and target gradients summed.
"""

import jax

from jaxda.losses import entropy, maxsquare, segmentation
from jaxda.train import common


def minent_loss(target_logits, config):
    """sum_head lambda_ent[head] * normalised entropy (base 2) of softmax(target logits)."""
    total, metrics = 0.0, {}
    for head, weight in config.minent.lambda_ent.items():
        if weight and head in target_logits:
            loss = entropy.normalized_entropy_loss(jax.nn.softmax(target_logits[head], axis=-1))
            metrics[f"loss_ent_{head}"] = loss
            total = total + weight * loss
    return total, metrics


def maxsquare_loss(target_logits, config):
    """lambda_target * (image-wise) MaxSquare on the main head, plus the multi-level guidance:
    lambda_seg_aux * lambda_target * CE(aux logits, fused confident argmax of both heads)."""
    cfg = config.maxsquare
    probs = jax.nn.softmax(target_logits["main"], axis=-1)
    if cfg.image_wise:
        loss = maxsquare.image_wise_max_square(probs, cfg.image_wise_ratio)
    else:
        loss = maxsquare.max_square(probs)
    metrics = {"loss_maxsquare": loss}
    total = cfg.lambda_target * loss
    if cfg.multi_level_guidance:
        if "aux" not in target_logits:
            raise ValueError("maxsquare.multi_level_guidance needs model.multi_level=True")
        guidance = maxsquare.multi_level_guidance_labels(
            probs, jax.nn.softmax(target_logits["aux"], axis=-1), cfg.guidance_threshold
        )
        guided = segmentation.cross_entropy(target_logits["aux"], guidance)
        metrics["loss_guidance_aux"] = guided
        total = total + config.loss.lambda_seg_aux * cfg.lambda_target * guided
    return total, metrics


def make_train_step(target_loss_fn):
    """A step minimising source CE + `target_loss_fn(target logits, config)`."""

    def train_step(state, batch, *, networks, tx, config):
        model = networks["seg"]
        labels = batch["source"]["label"]

        def loss_fn(seg_params):
            source_up, target_up, batch_stats = common.forward_domains(
                model, seg_params, state.batch_stats, batch, state.step_key()
            )
            seg_loss, metrics = common.supervised_loss(
                source_up, labels, common.source_head_weights(config)
            )
            target_loss, target_metrics = target_loss_fn(target_up, config)
            return seg_loss + target_loss, (batch_stats, {**metrics, **target_metrics})

        (loss, (batch_stats, metrics)), seg_grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params["seg"]
        )
        state = common.apply_gradients(state, {"seg": seg_grads}, batch_stats, tx)
        return state, {"loss": loss, **metrics}

    return train_step
