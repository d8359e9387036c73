"""Source-only training (also the oracle, when the 'source' stream is labelled target data):
CE on the main head + lambda_seg_aux x CE on the aux head."""

import jax

from jaxda.train import common


def train_step(state, batch, *, model, discriminator, tx, config):
    """One SGD step on `batch['source']` ({'image': [N, H, W, 3], 'label': [N, H, W]})."""
    del discriminator  # Not used by this method.
    images, labels = batch["source"]["image"], batch["source"]["label"]

    def loss_fn(seg_params):
        outputs, batch_stats = common.forward(
            model, seg_params, state.batch_stats, images, train=True
        )
        loss, metrics = common.supervised_loss(
            common.upsample(outputs, labels.shape[1:3]), labels, common.source_head_weights(config)
        )
        return loss, (batch_stats, metrics)

    (loss, (batch_stats, metrics)), seg_grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params["seg"]
    )
    grads = {"seg": seg_grads, "disc": common.zeros_like_disc(state.params)}
    return common.apply_gradients(state, grads, batch_stats, tx), {"loss": loss, **metrics}
