"""DACS's self-training pieces as pure functions: the teacher's pseudo labels and their
confidence weight, DAFormer's crop of that weight, the pixel-weighted cross-entropy of the
mixed images, and the EMA teacher's momentum schedule.

Shapes: probabilities / logits [B, H, W, C], labels and weights [B, H, W]; IGNORE_LABEL
pixels count in no loss. All maths in float32.
"""

import jax
import jax.numpy as jnp

from jaxda.data.labels import IGNORE_LABEL

SCOPES = ("batch", "image")


def pseudo_labels(
    probs: jax.Array, threshold: float, *, scope: str = "batch"
) -> tuple[jax.Array, jax.Array]:
    """(labels [B, H, W] int32, weights [B, H, W] float32) of the teacher's softmax.

    Labels: argmax over the classes. Weights: DACS's `threshold_uniform`, the share q of
    pixels whose maximum probability is >= `threshold` (0.968), the same value on every pixel:
    over the whole batch (`scope='batch'`, both official codes: one scalar per step) or per
    image ('image'). Every pixel of the target crop counts (it has no ignore region; DAFormer
    computes q before zeroing the rows its pseudo-label crop removes).
    """
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r}: use one of {SCOPES}")
    probs = probs.astype(jnp.float32)
    confident = (jnp.max(probs, axis=-1) >= threshold).astype(jnp.float32)
    axes = (0, 1, 2) if scope == "batch" else (1, 2)
    share = jnp.mean(confident, axis=axes, keepdims=True)
    labels = jnp.argmax(probs, axis=-1).astype(jnp.int32)
    return labels, jnp.broadcast_to(share, labels.shape)


def crop_weights(weights: jax.Array, top: int, bottom: int) -> jax.Array:
    """DAFormer's pseudo-label crop: the weights [B, H, W] with the first `top` and the last
    `bottom` rows set to 0 (DAFormer: 15 and 120 of its 512-row Cityscapes crops, "regions
    with potential rectification artifacts", where pseudo labels drift). Applied after the
    confidence weight (computed over all rows) and before mixing (pasted source pixels keep
    weight 1); 0 and 0 return `weights` itself."""
    if top < 0 or bottom < 0:
        raise ValueError(f"pseudo-label crop rows top={top}, bottom={bottom}: use counts >= 0")
    if not top and not bottom:
        return weights
    rows = jnp.arange(weights.shape[1])
    keep = (rows >= top) & (rows < weights.shape[1] - bottom)
    return jnp.where(keep[None, :, None], weights, 0.0).astype(weights.dtype)


def weighted_cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
    """sum over labelled pixels of weight x (-log softmax[label]) / number of ALL pixels
    (PyTorch `cross_entropy(reduction='none', ignore_index=255) * weight` then `.mean()`:
    ignored pixels count 0 in the sum and 1 in the count).

    Args:
      logits: [B, H, W, C]; labels: [B, H, W] (IGNORE_LABEL skipped); weights: [B, H, W].
    """
    labels = labels.astype(jnp.int32)
    valid = labels != IGNORE_LABEL
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    safe = jnp.where(valid, labels, 0)
    nll = -jnp.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]
    return jnp.mean(jnp.where(valid, nll * weights.astype(jnp.float32), 0.0))


def ema_momentum(step, alpha: float) -> jax.Array:
    """alpha_t = min(1 - 1 / (t + 1), alpha): 0 at t = 0 (the teacher becomes the student),
    then rising to `alpha` (0.99 from t = 99 on for alpha 0.99)."""
    t = jnp.asarray(step, jnp.float32)
    return jnp.minimum(1.0 - 1.0 / (t + 1.0), alpha)
