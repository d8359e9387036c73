"""GAN losses on discriminator logits (AdaptSegNet, ADVENT).

Domain labels follow AdaptSegNet: source = 0, target = 1. Every loss is a mean over the whole
discriminator output map, as PyTorch's `BCEWithLogitsLoss` / `MSELoss` compute it.
"""

import jax
import jax.numpy as jnp

SOURCE_LABEL = 0.0
TARGET_LABEL = 1.0


def bce_with_logits(logits: jax.Array, target: float) -> jax.Array:
    """Mean binary cross-entropy of sigmoid(logits) against a constant 0/1 target."""
    logits = logits.astype(jnp.float32)
    # log(1 + exp(-|x|)) form: stable for large |logits|, as PyTorch's implementation.
    return jnp.mean(jnp.maximum(logits, 0) - logits * target + jnp.log1p(jnp.exp(-jnp.abs(logits))))


def least_squares(logits: jax.Array, target: float) -> jax.Array:
    """LS-GAN loss: mean squared error of the raw logits against the 0/1 target."""
    return jnp.mean(jnp.square(logits.astype(jnp.float32) - target))


GAN_LOSSES = {"bce": bce_with_logits, "ls": least_squares}


def gan_loss(kind: str, logits: jax.Array, target: float) -> jax.Array:
    """The GAN loss named `kind` ('bce' or 'ls')."""
    if kind not in GAN_LOSSES:
        raise ValueError(f"Unknown GAN loss {kind!r}; use one of {sorted(GAN_LOSSES)}")
    return GAN_LOSSES[kind](logits, target)
