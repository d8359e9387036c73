"""Entropy quantities of ADVENT (MinEnt, AdvEnt) and TENT.

ADVENT uses base-2 logarithms normalised by log2(C), with the eps inside the log
(docs/methods/advent.md); TENT uses the natural-log Shannon entropy of the softmax
(docs/methods/tent.md).
"""

import jax
import jax.numpy as jnp
import numpy as np

ADVENT_EPS = 1e-30


def weighted_self_information(probs: jax.Array) -> jax.Array:
    """ADVENT's `prob_2_entropy`: -p log2(p + 1e-30) / log2(C), per class.

    Args:
      probs: [batch, height, width, classes] softmax probabilities.

    Returns:
      [batch, height, width, classes] (not summed: AdvEnt's discriminator input).
    """
    num_classes = probs.shape[-1]
    return -probs * jnp.log2(probs + ADVENT_EPS) / np.log2(num_classes)


def normalized_entropy_loss(probs: jax.Array) -> jax.Array:
    """ADVENT's `entropy_loss`: the mean over pixels of the normalised entropy, in [0, 1]."""
    return jnp.mean(jnp.sum(weighted_self_information(probs), axis=-1))


def softmax_entropy(logits: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """TENT's loss for segmentation: natural-log entropy of softmax(logits), mean over N, H, W.

    Args:
      logits: [N, H, W, C].
      valid: optional [N] bool; the mean is over the valid images only (batch padding).
    """
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
    if valid is None:
        return jnp.mean(entropy)
    weights = jnp.broadcast_to(valid[:, None, None], entropy.shape).astype(entropy.dtype)
    return jnp.sum(entropy * weights) / jnp.maximum(jnp.sum(weights), 1.0)
