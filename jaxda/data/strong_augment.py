"""DACS's strong augmentation of the mixed images, on the device inside the train step:
kornia's ColorJitter, then kornia's GaussianBlur2d, with kornia's semantics (not
torchvision's, not `jaxda.data.augment`'s).

The official codes call kornia (0.5.8 in DAFormer's pins) once per mixed image:

* colour jitter, applied to the whole batch or to none of it: one U(0, 1) draw per step,
  jitter iff it exceeds the official `color_jitter_probability` (0.2), i.e. with probability
  `jitter_prob` = 0.8. Per image, s the strength (DACS 0.25, DAFormer 0.2):
  brightness b ~ U(1 - s, 1 + s), *additive*: clip(x + b - 1, 0, 1);
  contrast c ~ U(1 - s, 1 + s), *plain product* (no mean blending): clip(c x, 0, 1);
  saturation t ~ U(1 - s, 1 + s): RGB -> HSV, S <- clip(t S, 0, 1), back;
  hue h ~ U(-s, s): H (radians) <- fmod(H + 2 pi h, 2 pi), back;
  the four in a random order, a permutation drawn per image (kornia's randperm(4));
* Gaussian blur, likewise on or off for the batch (one draw, probability `blur_prob` 0.5),
  sigma ~ U(0.15, 1.15) per image, the same on both axes; kernel sizes from the image: per
  axis of length L, the largest odd integer <= ceil(0.1 L) (51 for 512); taps
  exp(-x^2 / 2 sigma^2) normalised, x = -(k // 2) .. k // 2; borders reflected (no edge
  repeat).

Images here are [B, H, W, 3] floats in [0, 1]; channel 0 is taken as red, as kornia does:
DACS fed it BGR tensors, so its saturation and hue acted on swapped channels (the caller
decides the channel order, `jaxda.train.dacs`). The draws come from one JAX key, so they are
a pure function of the step; they cannot reproduce PyTorch's random streams.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

TWO_PI = 2.0 * math.pi
HSV_EPS = 1e-8  # kornia's rgb_to_hsv eps, added to the maximum before dividing.
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


def rgb_to_hsv(image: jax.Array, eps: float = HSV_EPS) -> jax.Array:
    """kornia.color.rgb_to_hsv on [..., 3] channels-last: H in [0, 2 pi), S and V in [0, 1].

    The hue's sextant is that of the first maximal channel (torch.max's tie rule)."""
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    maximum = jnp.max(image, axis=-1)
    delta = maximum - jnp.min(image, axis=-1)
    s = delta / jnp.where(maximum == 0, 1.0, maximum + eps)
    delta = jnp.where(delta == 0, 1.0, delta)
    rc, gc, bc = maximum - r, maximum - g, maximum - b
    h = jnp.where(
        (r >= g) & (r >= b),
        bc - gc,
        jnp.where(g >= b, rc - bc + 2.0 * delta, gc - rc + 4.0 * delta),
    )
    h = TWO_PI * jnp.mod(h / delta / 6.0, 1.0)
    h = jnp.where(h >= TWO_PI, 0.0, h)
    return jnp.stack([h, s, maximum], axis=-1)


def hsv_to_rgb(image: jax.Array) -> jax.Array:
    """kornia.color.hsv_to_rgb on [..., 3] channels-last (any real hue: it is taken mod 2 pi)."""
    h, s, v = image[..., 0] / TWO_PI, image[..., 1], image[..., 2]
    sextant = jnp.mod(jnp.floor(h * 6.0), 6.0)
    f = jnp.mod(h * 6.0, 6.0) - sextant
    p, q, t = v * (1.0 - s), v * (1.0 - f * s), v * (1.0 - (1.0 - f) * s)
    sextant = jnp.clip(sextant.astype(jnp.int32), 0, 5)
    table = jnp.stack(
        [
            jnp.stack([v, q, p, p, t, v], -1),
            jnp.stack([t, v, v, q, p, p], -1),
            jnp.stack([p, p, t, v, v, q], -1),
        ],
        axis=-1,
    )  # [..., 6 sextants, 3 channels]
    return jnp.take_along_axis(table, sextant[..., None, None], axis=-2)[..., 0, :]


def adjust_brightness(image: jax.Array, factor) -> jax.Array:
    """kornia's additive brightness: clip(x + factor, 0, 1) (ColorJitter passes b - 1)."""
    return jnp.clip(image + factor, 0.0, 1.0)


def adjust_contrast(image: jax.Array, factor) -> jax.Array:
    """kornia's contrast: clip(factor x, 0, 1), no blending with the mean."""
    return jnp.clip(image * factor, 0.0, 1.0)


def adjust_saturation(image: jax.Array, factor) -> jax.Array:
    """kornia's saturation: S <- clip(factor S, 0, 1) in HSV."""
    h, s, v = jnp.moveaxis(rgb_to_hsv(image), -1, 0)
    return hsv_to_rgb(jnp.stack([h, jnp.clip(s * factor, 0.0, 1.0), v], axis=-1))


def adjust_hue(image: jax.Array, factor) -> jax.Array:
    """kornia 0.5.8's hue: H <- fmod(H + factor, 2 pi), factor in radians (ColorJitter
    passes 2 pi h); fmod may leave a negative hue, which `hsv_to_rgb` wraps."""
    h, s, v = jnp.moveaxis(rgb_to_hsv(image), -1, 0)
    return hsv_to_rgb(jnp.stack([jnp.fmod(h + factor, TWO_PI), s, v], axis=-1))


class JitterParams(NamedTuple):
    """One image's colour jitter: factors [] each (hue in turns, not radians), order [4]."""

    brightness: jax.Array
    contrast: jax.Array
    saturation: jax.Array
    hue: jax.Array
    order: jax.Array


def color_jitter(image: jax.Array, params: JitterParams) -> jax.Array:
    """kornia's ColorJitter of one [H, W, 3] image in [0, 1]: the four operations in
    `params.order` (0 brightness, 1 contrast, 2 saturation, 3 hue)."""
    operations = [
        lambda x: adjust_brightness(x, params.brightness - 1.0),
        lambda x: adjust_contrast(x, params.contrast),
        lambda x: adjust_saturation(x, params.saturation),
        lambda x: adjust_hue(x, TWO_PI * params.hue),
    ]
    for slot in range(4):
        image = jax.lax.switch(params.order[slot], operations, image)
    return image


def blur_kernel_size(length: int) -> int:
    """DACS's kernel size for an axis of `length` pixels: the largest odd <= ceil(0.1 L)."""
    c = math.ceil(0.1 * length)
    return c if c % 2 else c - 1


def gaussian_kernel(size: int, sigma: jax.Array) -> jax.Array:
    """kornia's get_gaussian_kernel1d for odd `size`: [..., size] normalised taps."""
    x = jnp.arange(size, dtype=jnp.float32) - size // 2
    sigma = jnp.asarray(sigma, jnp.float32)[..., None]
    taps = jnp.exp(-(x**2) / (2.0 * sigma**2))
    return taps / jnp.sum(taps, axis=-1, keepdims=True)


def _filter_axis(images: jax.Array, taps: jax.Array, axis: int) -> jax.Array:
    """Correlates [B, H, W, C] images with per-image taps [B, k] along `axis` (1 or 2),
    borders reflected (PyTorch / numpy 'reflect')."""
    size = taps.shape[-1]
    pad = [(0, 0)] * images.ndim
    pad[axis] = (size // 2, size // 2)
    padded = jnp.pad(images, pad, mode="reflect")
    length = images.shape[axis]
    out = jnp.zeros_like(images)
    for i in range(size):
        window = jax.lax.slice_in_dim(padded, i, i + length, axis=axis)
        out = out + taps[:, i, None, None, None] * window
    return out


def gaussian_blur(images: jax.Array, sigma: jax.Array) -> jax.Array:
    """kornia's GaussianBlur2d((k_y, k_x), (sigma, sigma), 'reflect') of [B, H, W, C] images,
    one sigma [B] per image, kernel sizes `blur_kernel_size` of the height and width."""
    ky, kx = (blur_kernel_size(n) for n in images.shape[1:3])
    out = _filter_axis(images, gaussian_kernel(ky, sigma), axis=1)
    return _filter_axis(out, gaussian_kernel(kx, sigma), axis=2)


class StrongParams(NamedTuple):
    """One step's draws: jitter / blur on or off for the batch ([] bool), per-image jitter
    parameters (JitterParams of [B] factors and [B, 4] orders) and blur sigmas [B]."""

    jitter: jax.Array
    blur: jax.Array
    jitter_params: JitterParams
    sigma: jax.Array


def draw(
    key: jax.Array,
    batch: int,
    *,
    strength: float,
    jitter_prob: float,
    blur_prob: float,
    sigma_range: tuple[float, float] = (0.15, 1.15),
) -> StrongParams:
    """The step's random draws for a batch of `batch` mixed images.

    Args:
      strength: s of every jitter factor (brightness, contrast and saturation in
        U(max(0, 1 - s), 1 + s), hue in U(-s, s) turns).
      jitter_prob / blur_prob: probability that the batch is jittered / blurred (the
        official code's `u > 0.2` and `u > 0.5`: 0.8 and 0.5).
    """
    keys = jax.random.split(key, 8)
    low, high = max(0.0, 1.0 - strength), 1.0 + strength

    def factor(k):
        return jax.random.uniform(k, (batch,), minval=low, maxval=high)

    order = jax.vmap(lambda k: jax.random.permutation(k, 4))(jax.random.split(keys[6], batch))
    jitter = JitterParams(
        brightness=factor(keys[0]),
        contrast=factor(keys[1]),
        saturation=factor(keys[2]),
        hue=jax.random.uniform(keys[3], (batch,), minval=-strength, maxval=strength),
        order=order.astype(jnp.int32),
    )
    u_jitter, u_blur = jax.random.uniform(keys[4], (2,))
    return StrongParams(
        jitter=u_jitter < jitter_prob,
        blur=u_blur < blur_prob,
        jitter_params=jitter,
        sigma=jax.random.uniform(keys[5], (batch,), minval=sigma_range[0], maxval=sigma_range[1]),
    )


def apply(images: jax.Array, params: StrongParams, *, blur: bool = True) -> jax.Array:
    """Jitter then blur [B, H, W, 3] images in [0, 1] as `params` say (`blur`: whether the
    configuration has blur at all)."""
    images = jax.lax.cond(
        params.jitter,
        lambda x: jax.vmap(color_jitter)(x, params.jitter_params),
        lambda x: x,
        images,
    )
    if blur:
        images = jax.lax.cond(
            params.blur, lambda x: gaussian_blur(x, params.sigma), lambda x: x, images
        )
    return images
