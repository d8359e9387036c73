"""Pixel-wise segmentation losses."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxda.data.labels import IGNORE_LABEL


def cross_entropy(
    logits: jax.Array, labels: jax.Array, ignore_label: int = IGNORE_LABEL
) -> jax.Array:
    """Softmax cross-entropy averaged over the labelled pixels (PyTorch `ignore_index`).

    Args:
      logits: [batch, height, width, classes].
      labels: [batch, height, width] integer class ids; `ignore_label` pixels are skipped.

    Returns:
      Scalar mean over valid pixels; 0 when no pixel is labelled (AdaptSegNet's
      `CrossEntropy2d` returns zeros then, where PyTorch's built-in CE would give NaN).
    """
    labels = labels.astype(jnp.int32)
    valid = labels != ignore_label
    safe_labels = jnp.where(valid, labels, 0)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
    count = jnp.sum(valid)
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(count, 1)


def nearest_labels(labels: jax.Array, size) -> jax.Array:
    """Labels [N, H, W] resized to `size` (h, w) as PyTorch's F.interpolate(mode='nearest'):
    output pixel i reads input floor(i x in / out) (float32 scale), clamped; not the
    half-pixel rule of jax.image.resize. RobustNet's auxiliary labels."""
    rows = [_nearest_index(n, m) for n, m in zip(labels.shape[1:3], size, strict=True)]
    return labels[:, rows[0]][:, :, rows[1]]


def _nearest_index(in_size: int, out_size: int) -> np.ndarray:
    scale = np.float32(in_size) / np.float32(out_size)
    index = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(index, in_size - 1)
