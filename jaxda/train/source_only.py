"""Source-only training (also the oracle, when the 'source' stream is labelled target data):
CE on the main head + lambda_seg_aux x CE on the aux head."""

import jax

from jaxda.train import common


def train_step(state, batch, *, networks, tx, config):
    """One SGD step on `batch['source']` ({'image': [N, H, W, 3], 'label': [N, H, W]})."""
    model = networks["seg"]
    images, labels = batch["source"]["image"], batch["source"]["label"]

    def loss_fn(seg_params):
        variables = {"params": seg_params, "batch_stats": state.batch_stats}
        outputs, batch_stats = common.forward(
            model, variables, images, train=True, rng=state.step_key()
        )
        loss, metrics = common.supervised_loss(
            common.upsample(outputs, labels.shape[1:3]), labels, common.source_head_weights(config)
        )
        return loss, (batch_stats, metrics)

    (loss, (batch_stats, metrics)), seg_grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params["seg"]
    )
    state = common.apply_gradients(state, {"seg": seg_grads}, batch_stats, tx)
    return state, {"loss": loss, **metrics}
