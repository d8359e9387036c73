"""TENT (Wang et al., ICLR 2021) for segmentation, and its BN-statistics baseline ('norm').

Test-time adaptation of a trained network on the evaluation stream itself, online: each batch
is normalised with its own BN statistics, predicted (the prediction that is scored), and then,
for TENT, the BN scale and offset take one Adam step on the entropy of that same forward pass
(natural log, mean over N, H, W). 'norm' only swaps in the batch statistics: no parameter
changes (config.optimizer.freeze = everything). `episodic` resets the parameters after every
batch. The padding of a last, partial batch enters neither the BN statistics nor the entropy.
The official code covers CIFAR only (docs/methods/tent.md); this is the segmentation port its
issues ask for.

It runs in the generic trainer as a `test_time` method: the stream is one ordered pass over
the evaluation split, a step per batch, checkpointed and resumable like any training.
"""

import jax
import jax.numpy as jnp

from jaxda.evaluation import metrics
from jaxda.losses import entropy
from jaxda.models.layers import resize_bilinear_align_corners
from jaxda.train import common, spec

SOURCE = "source"  # The starting network, kept for episodic resets.


def networks(config) -> dict[str, spec.Network]:
    nets = {"seg": spec.segmenter(config, train_batch_stats=True)}
    if config.tent.episodic:
        nets[SOURCE] = spec.teacher_of(config)
    return nets


def init_extra(config) -> dict:
    c = config.num_classes
    return {"confusion": jnp.zeros((c, c), jnp.int32), "entropy_sum": jnp.zeros((), jnp.float32)}


def adapt_step(state, batch, *, networks, tx, config):
    """Predict with batch statistics, score, then (TENT) update the BN affine parameters.

    batch['eval']: {'image': [N, H, W, 3], 'label': [N, H', W'], 'valid': [N] bool}.
    """
    model = networks["seg"]
    images, labels, valid = (batch["eval"][k] for k in ("image", "label", "valid"))

    def loss_fn(params):
        # Batch statistics only: the running-average updates are computed and discarded.
        outputs, _ = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            bn_mask=valid,
            mutable=["batch_stats"],
        )
        logits = outputs[config.eval.head]
        return entropy.softmax_entropy(logits, valid), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params["seg"])
    predictions = jnp.argmax(resize_bilinear_align_corners(logits, labels.shape[1:3]), axis=-1)
    confusion = metrics.confusion_matrix(labels, predictions, config.num_classes)
    state = common.apply_gradients(state, {"seg": grads}, {}, tx)
    if config.tent.episodic:
        params = state.teachers[SOURCE]["params"]
        state = state.replace(params={**state.params, "seg": params}, opt_state=tx.init(params))
    extra = {
        "confusion": state.extra["confusion"] + confusion,
        "entropy_sum": state.extra["entropy_sum"] + loss,
    }
    return state.replace(extra=extra), {"loss_entropy": loss}


def online_results(state, config) -> dict:
    return {
        "confusion": state.extra["confusion"],
        "mean_entropy": state.extra["entropy_sum"] / jnp.maximum(state.step, 1),
        "protocol": {
            "online": "each batch predicted with its own BN statistics, scored, then adapted",
            "batch_size": config.batch_size,
            "updates": "none (norm)" if config.method == "bn_adapt" else "BN scale/offset, Adam",
            "episodic": bool(config.tent.episodic),
        },
    }
