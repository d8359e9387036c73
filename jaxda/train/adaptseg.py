"""AdaptSegNet (Tsai et al., CVPR 2018): multi-level output-space adversarial adaptation.

One step reproduces the PyTorch iteration (methods.md section 1): source CE; the adversarial
loss of the target predictions through the frozen discriminators, with the "source" label; the
discriminators trained on the detached softmax of the upsampled source and target predictions;
then all optimizers step, every gradient taken at the parameters of the start of the step.
"""

import jax

from jaxda.train import common


def discriminator_heads(config) -> tuple[str, ...]:
    """Heads with an output-space discriminator: main, plus aux for multi-level models."""
    return ("main", "aux") if config.model.multi_level else ("main",)


def train_step(state, batch, *, model, discriminator, tx, config):
    """One AdaptSegNet iteration on {'source': {image, label}, 'target': {image}}."""
    source, target = batch["source"], batch["target"]
    labels = source["label"]
    heads = discriminator_heads(config)
    head_weights = {"main": 1.0, "aux": config.loss.lambda_seg_aux}
    adv_weights = {head: config.adaptseg.lambda_adv[head] for head in heads}
    gan = config.adaptseg.gan

    def loss_fn(seg_params):
        # Source then target through the same BN layers, as the PyTorch loop does: with batch
        # statistics, each domain is normalised by its own batch and both update the averages.
        source_out, batch_stats = common.forward(
            model, seg_params, state.batch_stats, source["image"], train=True
        )
        target_out, batch_stats = common.forward(
            model, seg_params, batch_stats, target["image"], train=True
        )
        # AdaptSegNet upsamples source logits to the label size, target logits to the input
        # size; the discriminators see softmax maps at that full resolution.
        source_up = common.upsample(source_out, labels.shape[1:3])
        target_up = common.upsample(target_out, target["image"].shape[1:3])
        source_maps = common.softmax_maps({h: source_up[h] for h in heads})
        target_maps = common.softmax_maps({h: target_up[h] for h in heads})
        seg_loss, metrics = common.supervised_loss(source_up, labels, head_weights)
        adv_loss, adv_metrics = common.generator_adversarial_loss(
            discriminator, state.params["disc"], target_maps, adv_weights, gan
        )
        aux = (batch_stats, source_maps, target_maps, {**metrics, **adv_metrics})
        return seg_loss + adv_loss, aux

    (loss, (batch_stats, source_maps, target_maps, metrics)), seg_grads = jax.value_and_grad(
        loss_fn, has_aux=True
    )(state.params["seg"])

    def disc_loss_fn(disc_params):
        return common.discriminator_loss(discriminator, disc_params, source_maps, target_maps, gan)

    (disc_loss, disc_metrics), disc_grads = jax.value_and_grad(disc_loss_fn, has_aux=True)(
        state.params["disc"]
    )
    grads = {"seg": seg_grads, "disc": disc_grads}
    metrics = {"loss": loss + disc_loss, "loss_generator": loss, **metrics, **disc_metrics}
    return common.apply_gradients(state, grads, batch_stats, tx), metrics
