"""Stateless training augmentations applied jointly to an image and its label map.

Every random choice is read from a fixed vector of uniforms drawn with
`tf.random.stateless_uniform` from a per-example seed (`example_seed`: the stream seed folded
with the example's stream position), so an example's augmentation is a pure function of
(stream seed, position) and a resumed stream reproduces it exactly. Each decision owns one
slot of that vector, so switching one augmentation on or off never changes the others' draws.

Images are float32 RGB in [0, 255] (before normalisation), [H, W, 3]; labels are uint8
[H, W]. Geometric ops (scale, crop/pad, flip) move image and label together, with bicubic
resampling for the image and nearest neighbour for the label; photometric ops (colour jitter,
blur) touch the image only.
"""

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

IGNORE_LABEL = 255

# Slots of the per-example uniform vector.
_SCALE, _CROP_Y, _CROP_X, _FLIP, _BLUR, _SIGMA, _BRIGHT, _CONTRAST, _SATURATION = range(9)
_NUM_UNIFORMS = 9
# ITU-R 601 luma weights (PIL / torchvision greyscale).
_LUMA = (0.299, 0.587, 0.114)


def stream_key(seed: Sequence[int]) -> np.ndarray:
    """[2] int64 key of a stream's augmentations, decorrelated from its shuffling seed."""
    state = np.random.SeedSequence([*seed, 0xA6]).generate_state(2, np.uint32)
    return state.astype(np.int64)


def example_seed(key: tf.Tensor, position: tf.Tensor) -> tf.Tensor:
    """[2] int64 stateless seed of the example at `position` of the stream with `key`."""
    return tf.random.experimental.stateless_fold_in(key, tf.cast(position, tf.int64))


def uniforms(seed: tf.Tensor) -> tf.Tensor:
    """[9] float32 U[0, 1) draws, one per random decision (see the slot constants)."""
    return tf.random.stateless_uniform([_NUM_UNIFORMS], seed=seed)


def _lerp(low: float, high: float, u: tf.Tensor) -> tf.Tensor:
    return low + (high - low) * u


def scale(
    image: tf.Tensor, label: tf.Tensor, factor: tf.Tensor, base_size: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """Resizes image (bicubic, clipped to [0, 255]) and label (nearest) to factor * base_size."""
    size = tf.maximum(tf.cast(tf.round(factor * tf.cast(base_size, tf.float32)), tf.int32), 1)
    image = tf.clip_by_value(tf.image.resize(image, size, method="bicubic"), 0.0, 255.0)
    label = tf.image.resize(label[..., None], size, method="nearest")[..., 0]
    return image, label


def crop(
    image: tf.Tensor, label: tf.Tensor, crop_size: Sequence[int], u_y: tf.Tensor, u_x: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Random crop_size window; returns (image, label, padding [2, 2]) for `pad`.

    Along an axis longer than the crop the window starts at floor(u * (excess + 1)); along a
    shorter one the whole axis is kept and will be placed at that offset inside the padded
    crop. The crop is returned unpadded so that blur never mixes padding into the image.
    """
    shape = tf.shape(label)
    offsets, paddings = [], []
    for axis, u in enumerate((u_y, u_x)):
        excess = shape[axis] - crop_size[axis]
        room = tf.abs(excess)
        offset = tf.minimum(tf.cast(u * tf.cast(room + 1, tf.float32), tf.int32), room)
        offsets.append(tf.where(excess > 0, offset, 0))
        before = tf.where(excess < 0, offset, 0)
        paddings.append(tf.stack([before, tf.maximum(-excess, 0) - before]))
    extent = tf.minimum(shape, tf.constant(crop_size, tf.int32))
    image = tf.slice(image, [offsets[0], offsets[1], 0], [extent[0], extent[1], 3])
    label = tf.slice(label, offsets, extent)
    return image, label, tf.stack(paddings)


def pad(
    image: tf.Tensor, label: tf.Tensor, padding: tf.Tensor, crop_size: Sequence[int]
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Pads to crop_size: (image [h, w, 3] zero-padded, label IGNORE-padded, valid [h, w])."""
    valid = tf.pad(tf.ones_like(label, tf.bool), padding, constant_values=False)
    image = tf.pad(image, tf.concat([padding, [[0, 0]]], 0))
    label = tf.pad(label, padding, constant_values=IGNORE_LABEL)
    image.set_shape([*crop_size, 3])
    label.set_shape(crop_size)
    valid.set_shape(crop_size)
    return image, label, valid


def flip(tensors: Sequence[tf.Tensor], do_flip: tf.Tensor) -> list[tf.Tensor]:
    """Mirrors every [H, W, ...] tensor horizontally when `do_flip`."""
    return [tf.cond(do_flip, lambda t=t: tf.reverse(t, [1]), lambda t=t: t) for t in tensors]


def _grey(image: tf.Tensor) -> tf.Tensor:
    return tf.tensordot(image, tf.constant(_LUMA, tf.float32), 1)[..., None]


def color_jitter(image: tf.Tensor, strength: float, u: tf.Tensor) -> tf.Tensor:
    """Brightness, contrast, saturation factors ~ U(1 - s, 1 + s), in that order.

    u: [3] uniforms. As torchvision's ColorJitter, but in a fixed order; contrast blends with
    the mean grey level, saturation with the pixel's grey value.
    """
    f = _lerp(1.0 - strength, 1.0 + strength, u)
    image = tf.clip_by_value(image * f[0], 0.0, 255.0)
    mean = tf.reduce_mean(_grey(image))
    image = tf.clip_by_value((image - mean) * f[1] + mean, 0.0, 255.0)
    grey = _grey(image)
    return tf.clip_by_value((image - grey) * f[2] + grey, 0.0, 255.0)


def gaussian_blur(image: tf.Tensor, sigma: tf.Tensor, max_sigma: float) -> tf.Tensor:
    """Separable Gaussian blur with std `sigma` (PIL's GaussianBlur radius), symmetric edges.

    The kernel has the static radius ceil(3 * max_sigma); sigma -> 0 gives the identity.
    """
    radius = max(int(np.ceil(3.0 * max_sigma)), 1)
    x = tf.range(-radius, radius + 1, dtype=tf.float32)
    weights = tf.exp(-tf.square(x) / (2.0 * tf.square(tf.maximum(sigma, 1e-3))))
    weights /= tf.reduce_sum(weights)
    # Symmetric padding keeps the blur flip-equivariant and mimics PIL's edge extension.
    padded = tf.pad(image, [[radius, radius], [radius, radius], [0, 0]], mode="SYMMETRIC")
    kernel = tf.tile(weights[:, None, None, None], [1, 1, 3, 1])  # [k, 1, 3, 1]
    out = tf.nn.depthwise_conv2d(padded[None], kernel, [1, 1, 1, 1], "VALID")
    out = tf.nn.depthwise_conv2d(out, tf.transpose(kernel, [1, 0, 2, 3]), [1, 1, 1, 1], "VALID")
    return out[0]


def augment(
    image: tf.Tensor,
    label: tf.Tensor,
    seed: tf.Tensor,
    *,
    base_size: tf.Tensor | Sequence[int],
    random_scale: Sequence[float] = (),
    crop_size: Sequence[int] = (),
    flip_prob: float = 0.0,
    blur_prob: float = 0.0,
    blur_sigma: Sequence[float] = (0.0, 1.0),
    color_jitter_strength: float = 0.0,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor | None]:
    """Scale -> crop -> photometric -> pad -> flip; returns (image, label, valid or None).

    base_size: (height, width) that `random_scale` factors multiply. valid: [h, w] bool, False
    on padding, when crop_size is set (the caller zeroes the normalised image there).
    """
    u = uniforms(seed)
    if random_scale:
        image, label = scale(image, label, _lerp(*random_scale, u[_SCALE]), base_size)
    padding = None
    if crop_size:
        image, label, padding = crop(image, label, crop_size, u[_CROP_Y], u[_CROP_X])
    if color_jitter_strength:
        image = color_jitter(image, color_jitter_strength, u[_BRIGHT : _SATURATION + 1])
    if blur_prob and blur_sigma[1] > 0:
        sigma = _lerp(*blur_sigma, u[_SIGMA])
        image = tf.cond(
            u[_BLUR] < blur_prob, lambda: gaussian_blur(image, sigma, blur_sigma[1]), lambda: image
        )
    valid = None
    if crop_size:
        image, label, valid = pad(image, label, padding, crop_size)
    if flip_prob:
        do_flip = u[_FLIP] < flip_prob
        image, label = flip([image, label], do_flip)
        if valid is not None:
            (valid,) = flip([valid], do_flip)
    return image, label, valid
