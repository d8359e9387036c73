"""MaxSquare losses (Chen et al., ICCV 2019) as the official code computes them
(docs/methods/maxsquare.md)."""

import jax
import jax.numpy as jnp

from jaxda.data.labels import IGNORE_LABEL


def max_square(probs: jax.Array) -> jax.Array:
    """-(1/2) mean over N, H, W, C of p^2 ([batch, height, width, classes] probabilities)."""
    return -0.5 * jnp.mean(jnp.square(probs))


def image_wise_max_square(probs: jax.Array, ratio: float = 0.2) -> jax.Array:
    """Class-balanced MaxSquare: -sum(p^2 * w) / (N * C), no 1/2.

    Each pixel's weight comes from its argmax class c in its own image:
    w_c = 1 / max(n_c^ratio * n_pixels^(1 - ratio), 1), with n_c the number of pixels of the
    image predicted as c. Weights carry no gradient, as in the official code.
    """
    batch, height, width, num_classes = probs.shape
    predicted = jnp.argmax(probs, axis=-1)  # [N, H, W]
    counts = jnp.sum(jax.nn.one_hot(predicted, num_classes, dtype=jnp.float32), axis=(1, 2))
    class_weights = 1.0 / jnp.maximum(counts**ratio * (height * width) ** (1.0 - ratio), 1.0)
    pixel_weights = jnp.take_along_axis(
        class_weights[:, None, None, :], predicted[..., None], axis=-1
    )  # [N, H, W, 1]
    pixel_weights = jax.lax.stop_gradient(pixel_weights)
    return -jnp.sum(jnp.square(probs) * pixel_weights) / (batch * num_classes)


def multi_level_guidance_labels(
    probs_main: jax.Array, probs_aux: jax.Array, threshold: float = 0.95
) -> jax.Array:
    """MaxSquare's self-produced guidance for the aux head: argmax of the averaged heads where
    either head is confident above `threshold`, else ignore. [N, H, W, C] x2 -> [N, H, W]."""
    fused = jnp.argmax((probs_main + probs_aux) / 2, axis=-1)
    confident = (jnp.max(probs_main, axis=-1) > threshold) | (
        jnp.max(probs_aux, axis=-1) > threshold
    )
    return jax.lax.stop_gradient(jnp.where(confident, fused, IGNORE_LABEL))
