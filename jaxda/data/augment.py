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

`augment` also returns where its view lies in the frame it started from (`box`, `flip`), so
that maps of the same example (labels, predictions) can be moved between views with
`jaxda.data.geometry`.
"""

import zlib
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from jaxda.data.labels import IGNORE_LABEL

# Slots of the per-example uniform vector.
_SCALE, _CROP_Y, _CROP_X, _FLIP, _BLUR, _SIGMA, _BRIGHT, _CONTRAST, _SATURATION = range(9)
_NUM_UNIFORMS = 9
# The crop's slots (u_y, u_x), which `crop_retry` reads to re-draw crops.
CROP_SLOTS = (_CROP_Y, _CROP_X)
# The box of a view showing the whole input frame.
BASE_BOX = (0.0, 0.0, 1.0, 1.0)
# ITU-R 601 luma weights (PIL / torchvision greyscale).
_LUMA = (0.299, 0.587, 0.114)


def stream_key(seed: Sequence[int]) -> np.ndarray:
    """[2] int64 key of a stream's augmentations, decorrelated from its shuffling seed."""
    state = np.random.SeedSequence([*seed, 0xA6]).generate_state(2, np.uint32)
    return state.astype(np.int64)


def example_seed(key: tf.Tensor, position: tf.Tensor) -> tf.Tensor:
    """[2] int64 stateless seed of the example at `position` of the stream with `key`."""
    return tf.random.experimental.stateless_fold_in(key, tf.cast(position, tf.int64))


def view_seed(seed: tf.Tensor, view: str) -> tf.Tensor:
    """[2] int64 seed of the named view of the example with `seed` (`example_seed`).

    Keyed by the name, not the view's place in the config, so that adding a view does not
    change the other views' draws.
    """
    return tf.random.experimental.stateless_fold_in(seed, zlib.crc32(view.encode()))


def uniforms(seed: tf.Tensor) -> tf.Tensor:
    """[9] float32 U[0, 1) draws, one per random decision (see the slot constants)."""
    return tf.random.stateless_uniform([_NUM_UNIFORMS], seed=seed)


def _lerp(low: float, high: float, u: tf.Tensor) -> tf.Tensor:
    return low + (high - low) * u


# Fraction bits of Pillow's fixed-point filter weights for 8-bit images (PRECISION_BITS).
PIL_WEIGHT_BITS = 22


def _pil_cubic(x: tf.Tensor) -> tf.Tensor:
    """Pillow's BICUBIC kernel (Keys, a = -0.5, support 2) at |x|, float64, in its op order."""
    a = -0.5
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return tf.where(x < 1.0, near, tf.where(x < 2.0, far, tf.zeros_like(x)))


def bicubic_taps(in_size, out_size) -> tuple[tf.Tensor, tf.Tensor]:
    """(indices, weights), int32 [out_size, K] each: PIL's BICUBIC resampling of one axis.

    Output pixel i = sum_k weights[i, k] * input[indices[i, k]] / 2**PIL_WEIGHT_BITS, with
    Pillow's rules: output pixel centres map to (i + 0.5) * in / out; when downsampling the
    kernel is stretched by in / out (antialiasing); it is cut at the border and renormalised;
    weights are rounded half away from zero to fixed point. Unused taps weigh 0. Works for
    dynamic sizes; in float64 because Pillow computes the weights in double.
    """
    in_size = tf.convert_to_tensor(in_size, tf.int32)
    scale = tf.cast(in_size, tf.float64) / tf.cast(out_size, tf.float64)
    stretch = tf.maximum(scale, 1.0)
    support = 2.0 * stretch
    num_taps = 2 * tf.cast(tf.math.ceil(support), tf.int32) + 1
    center = (tf.cast(tf.range(out_size), tf.float64) + 0.5) * scale
    # Casts truncate, as Pillow's (int)(x + 0.5) does; a negative start is clamped anyway.
    first = tf.maximum(tf.cast(center - support + 0.5, tf.int32), 0)
    stop = tf.minimum(tf.cast(center + support + 0.5, tf.int32), in_size)
    source = first[:, None] + tf.range(num_taps)[None]
    x = tf.abs((tf.cast(source, tf.float64) - center[:, None] + 0.5) * (1.0 / stretch))
    weights = tf.where(source < stop[:, None], _pil_cubic(x), tf.zeros_like(x))
    weights /= tf.reduce_sum(weights, axis=1, keepdims=True)
    magnitude = tf.floor(tf.abs(weights) * 2.0**PIL_WEIGHT_BITS + 0.5)
    fixed = tf.cast(tf.sign(weights) * magnitude, tf.int32)
    return tf.minimum(source, in_size - 1), fixed


def _bicubic_rows(image: tf.Tensor, out_size) -> tf.Tensor:
    """float32 [H, W, C] -> [out_size, W, C]: PIL BICUBIC along axis 0, unrounded.

    One row gather per tap: without XLA (sizes here are random, so compiling per size would
    not pay) this beats gathering all taps at once, which materialises K copies of the image.
    """
    indices, fixed = bicubic_taps(tf.shape(image)[0], out_size)
    weights = tf.cast(fixed, tf.float32) * 2.0**-PIL_WEIGHT_BITS  # Exact: |fixed| < 2**24.
    total = tf.zeros(tf.concat([[out_size], tf.shape(image)[1:]], 0), tf.float32)

    def add_tap(k, total):
        return k + 1, total + tf.gather(image, indices[:, k]) * weights[:, k, None, None]

    return tf.while_loop(lambda k, _: k < tf.shape(indices)[1], add_tap, (0, total))[1]


def resize_bicubic(image: tf.Tensor, size) -> tf.Tensor:
    """float32 [H, W, C] (integer values in [0, 255]) -> float32 [size[0], size[1], C], as
    PIL's `Image.resize(size, BICUBIC)` of the uint8 image before its final rounding.

    Like Pillow (see `input_pipeline.resize_image`): the horizontal pass first, its result
    rounded and clipped to uint8, then the vertical pass (here clipped to [0, 255], not
    rounded). Rounded, it is Pillow's image except where float32 sums break an exact tie of
    the intermediate rounding the other way (<= 0.1% of pixels, by 1-2). Sizes may be dynamic.
    """
    rows_first = tf.transpose(image, [1, 0, 2])
    wide = tf.transpose(_bicubic_rows(rows_first, size[1]), [1, 0, 2])
    wide = tf.clip_by_value(tf.floor(wide + 0.5), 0.0, 255.0)
    return tf.clip_by_value(_bicubic_rows(wide, size[0]), 0.0, 255.0)


def _pil_nearest_indices(in_size, out_size) -> tf.Tensor:
    """int32 [out_size]: the input pixel PIL's NEAREST resize samples for each output pixel.

    Pillow steps the source coordinate by in / out from 0.5 * in / out, adding in double;
    exact ties (e.g. for scales 2/3 or 4/3) depend on that rounding, so the steps are summed
    in the same order (a sequential float64 cumsum) rather than computed as (i + 0.5) * scale.
    Not for XLA, whose cumsum is a parallel scan.
    """
    step = tf.cast(in_size, tf.float64) / tf.cast(out_size, tf.float64)
    steps = tf.concat([[0.5 * step], tf.fill([out_size - 1], step)], 0)
    return tf.cast(tf.math.cumsum(steps), tf.int32)


def resize_nearest(label: tf.Tensor, size) -> tf.Tensor:
    """[H, W, ...] -> [size[0], size[1], ...], as PIL's `Image.resize(size, NEAREST)`.

    tf.image.resize("nearest") picks other pixels on tie rows and columns (every third one at
    scale 1.5 or 0.75) and where float32 rounding crosses a pixel edge.
    """
    shape = tf.shape(label)
    rows = tf.gather(label, _pil_nearest_indices(shape[0], size[0]))
    return tf.gather(rows, _pil_nearest_indices(shape[1], size[1]), axis=1)


def scale_factor(u: tf.Tensor, random_scale: Sequence[float]) -> tf.Tensor | float:
    """The random scale factor of an example with `uniforms` u: U(min, max); 1 without."""
    return _lerp(*random_scale, u[_SCALE]) if random_scale else 1.0


def scaled_size(factor: tf.Tensor, base_size: tf.Tensor | Sequence[int]) -> tf.Tensor:
    """int32 [2]: round(factor * base_size), at least 1: the size `scale` resizes to."""
    return tf.maximum(tf.cast(tf.round(factor * tf.cast(base_size, tf.float32)), tf.int32), 1)


def scale(
    image: tf.Tensor, label: tf.Tensor, factor: tf.Tensor, base_size: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """Resizes image (PIL bicubic, clipped to [0, 255]) and label (PIL nearest) to
    round(factor * base_size)."""
    size = scaled_size(factor, base_size)
    return resize_bicubic(image, size), resize_nearest(label, size)


def crop_window(
    shape: tf.Tensor,
    crop_size: Sequence[int],
    u_y: tf.Tensor,
    u_x: tf.Tensor,
    centroid: tf.Tensor | None = None,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Where `crop` cuts an input of `shape` ([2+] (height, width, ...)): (offsets int32 [2]
    of the cut's top-left pixel, extent int32 [2] of the cut, padding int32 [2, 2] to reach
    crop_size). The label counts of retried crops (`crop_retry`) read it without cutting."""
    offsets, paddings = [], []
    for axis, u in enumerate((u_y, u_x)):
        excess = shape[axis] - crop_size[axis]
        room = tf.abs(excess)
        offset = tf.minimum(tf.cast(u * tf.cast(room + 1, tf.float32), tf.int32), room)
        start = offset
        if centroid is not None:
            size = crop_size[axis]
            draw = tf.minimum(tf.cast(u * float(size + 1), tf.int32), size)
            covering = tf.clip_by_value(centroid[axis] - size + draw, 0, tf.maximum(excess, 0))
            start = tf.where(centroid[axis] >= 0, covering, offset)
        offsets.append(tf.where(excess > 0, start, 0))
        before = tf.where(excess < 0, offset, 0)
        paddings.append(tf.stack([before, tf.maximum(-excess, 0) - before]))
    extent = tf.minimum(shape[:2], tf.constant(crop_size, tf.int32))
    return tf.stack(offsets), extent, tf.stack(paddings)


def crop(
    image: tf.Tensor,
    label: tf.Tensor,
    crop_size: Sequence[int],
    u_y: tf.Tensor,
    u_x: tf.Tensor,
    centroid: tf.Tensor | None = None,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """Random crop_size window; returns (image, label, padding [2, 2] for `pad`, start [2]).

    Along an axis longer than the crop the window starts at floor(u * (excess + 1)); along a
    shorter one the whole axis is kept and will be placed at that offset inside the padded
    crop. The crop is returned unpadded so that blur never mixes padding into the image.
    start: int32 (y, x) of the padded window's top-left pixel in the input, negative where
    the window pads.

    centroid: optional int32 [2] (y, x), a pixel of the input (negative: none). Along an axis
    longer than the crop the start is then RobustNet's (its RandomCrop with a centroid):
    c - crop + floor(u * (crop + 1)), i.e. uniform over the integers [c - crop, c], clamped
    into [0, excess]. The window [start, start + crop) holds c except after the draw c - crop
    (probability 1 / (crop + 1) when not clamped), which leaves c just past its far edge, as in
    RobustNet. A shorter axis is kept whole, so it holds c anyway.
    """
    offsets, extent, paddings = crop_window(tf.shape(label), crop_size, u_y, u_x, centroid)
    image = tf.slice(image, [offsets[0], offsets[1], 0], [extent[0], extent[1], 3])
    label = tf.slice(label, offsets, extent)
    return image, label, paddings, offsets - paddings[:, 0]


def scale_centroid(
    centroid: tf.Tensor, base_size: tf.Tensor | Sequence[int], factor, shape: tf.Tensor
) -> tf.Tensor:
    """int32 [2] (y, x): a centroid moved into the image about to be cropped.

    centroid: int [4] (y, x, height, width): pixel (y, x) of the base frame measured at
    height x width (the original label; the base frame may be resized from it); y < 0: none,
    kept as -1. factor: the random scale factor (1 without random scaling); the base frame is
    resized to factor x base_size. As RobustNet: int(c * scale), with scale = factor x base /
    measured size, unrounded, in float64. Clamped into `shape` (the scaled image: its size is
    rounded here, truncated in RobustNet), which the scaled centroid may otherwise leave by a
    pixel.
    """
    centroid = tf.cast(centroid, tf.float64)
    base = tf.cast(base_size, tf.float64)
    scale = tf.cast(factor, tf.float64) * (base / centroid[2:])
    scaled = tf.cast(tf.floor(centroid[:2] * scale), tf.int32)
    scaled = tf.clip_by_value(scaled, 0, shape[:2] - 1)
    return tf.where(centroid[:2] >= 0, scaled, -1)


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


class Augmented(NamedTuple):
    """`augment`'s output: the view and where it lies in the input ("base") frame.

    box and flip apply to any map of the example: the view is the base frame's region `box`
    resized to the view's size, then mirrored horizontally if `flip` (see jaxda.data.geometry).
    """

    image: tf.Tensor  # [h, w, 3] float32 in [0, 255].
    label: tf.Tensor  # [h, w] uint8.
    valid: tf.Tensor | None  # [h, w] bool, False on padding; None without crop_size.
    # [4] float32 (y0, x0, y1, x1) in normalised base coordinates (0..1 spans the base image;
    # beyond where the view pads).
    box: tf.Tensor
    flip: tf.Tensor  # [] bool.


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
    centroid: tf.Tensor | None = None,
    crop_uniforms: tf.Tensor | None = None,
) -> Augmented:
    """Scale -> crop -> photometric -> pad -> flip of an image [H, W, 3] and label [H, W].

    base_size: (height, width) that `random_scale` factors multiply. valid: [h, w] bool, False
    on padding, when crop_size is set (the caller zeroes the normalised image there).
    centroid: optional int [4] (y, x, height, width) (`scale_centroid`; y < 0: none): the
    crop covers the scaled centroid as RobustNet's class-uniform crops (`crop`). None, or no
    crop_size, leaves every draw as without it. crop_uniforms: optional float32 [2] (u_y, u_x)
    replacing the seed's crop draws (a crop re-drawn by `crop_retry`).
    """
    u = uniforms(seed)
    factor = scale_factor(u, random_scale)
    if random_scale:
        image, label = scale(image, label, factor, base_size)
    padding = None
    box = tf.constant(BASE_BOX)
    if crop_size:
        # Normalised by the scaled size: scaling maps the base frame onto the scaled image.
        scaled_size = tf.cast(tf.shape(label), tf.float32)
        if centroid is not None:
            centroid = scale_centroid(centroid, base_size, factor, tf.shape(label))
        u_crop = tf.gather(u, CROP_SLOTS) if crop_uniforms is None else crop_uniforms
        image, label, padding, start = crop(image, label, crop_size, u_crop[0], u_crop[1], centroid)
        start = tf.cast(start, tf.float32)
        end = start + tf.constant(crop_size, tf.float32)
        box = tf.concat([start / scaled_size, end / scaled_size], 0)
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
    do_flip = tf.constant(False)
    if flip_prob:
        do_flip = u[_FLIP] < flip_prob
        image, label = flip([image, label], do_flip)
        if valid is not None:
            (valid,) = flip([valid], do_flip)
    return Augmented(image, label, valid, box, do_flip)
