"""Evaluation-time transforms of decoded (image, label) pairs, as pure TensorFlow functions.

RobustNet's Mapillary Vistas validation protocol (`datasets/__init__.py`: the Mapillary
`val_joint_transform_list`, with `eval_size = 1536`; classes in `transforms/joint_transforms.py`)
applies, to the PIL RGB image and the PIL mode-L train-id label:

1. `ResizeHeight(1536)`: target width `int(w / h * 1536)` (float division, truncated); the
   image is resized with `Image.BICUBIC`, the label with `Image.NEAREST`, to (width, 1536).
2. `CenterCropPad(1536)` (its `ignore_index` left at the default 0): if the resized width w
   (or height h) is below 1536, `ImageOps.expand` pads *both* sides by pad = 1536 - w with
   fill 0 (image black, label 0); then it crops 1536x1536 at x1 = round((w - 1536) / 2),
   y1 = round((h - 1536) / 2) (Python's round: halves to even), computed from the size
   *before* padding, and PIL fills whatever the crop box leaves outside the padded image with
   0. For landscape images (w >= 1536) this is a plain centre crop. For narrower images it
   is not a centred pad: the image's first column lands at x = pad - x1 = pad + round(pad / 2)
   and its last round(pad / 2) columns fall outside the crop, e.g. w = 1000 (pad 536) puts
   columns 0..731 at 804..1535 and loses the other 268. Padded label pixels are 0, i.e.
   train id 0 ('road'), not 255: RobustNet scores them as road.

`resize_height_center_crop_pad(image [H, W, 3] uint8, label [H, W] or [H, W, 1], height=1536,
crop=1536, label_pad=0) -> (image [crop, crop, 3] uint8, label [crop, crop] or [crop, crop, 1])`
reproduces this exactly. PIL's BICUBIC is its separable two-pass filter with 22-bit
fixed-point weights and 8-bit rounding and clipping after each pass, horizontal pass first as
in Pillow 8.1.2 (RobustNet's requirements.txt) through 12.x; Pillow 13 runs the vertical pass
first when the height shrinks by more than twice the width's shrink, which an aspect-keeping
resize to a fixed height does only for images over twice as tall as wide. NEAREST takes PIL's
source pixel `int(s / 2 + i * s)`, s = input / output size, accumulated in float64 as PIL does.
The test compares against PIL itself.
"""

import tensorflow as tf

# PIL's 8-bit resampling: weights in fixed point with 32 - 8 - 2 fraction bits.
_PRECISION_BITS = 22
_BICUBIC_SUPPORT = 2.0
_BICUBIC_A = -0.5


def _bicubic(x: tf.Tensor) -> tf.Tensor:
    """PIL's bicubic kernel (a = -0.5), same float64 operation order as PIL's C code."""
    a = _BICUBIC_A
    x = tf.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return tf.where(x < 1.0, near, tf.where(x < 2.0, far, tf.zeros_like(x)))


def _bicubic_taps(in_size: tf.Tensor, out_size: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """PIL's BICUBIC coefficients for one axis: (first tap [out] int32, weights [out, taps]
    int32 in fixed point), taps = 2 * ceil(support) + 1 (unused taps weigh 0)."""
    scale = tf.cast(in_size, tf.float64) / tf.cast(out_size, tf.float64)
    filter_scale = tf.maximum(scale, 1.0)
    support = _BICUBIC_SUPPORT * filter_scale
    num_taps = tf.cast(tf.math.ceil(support), tf.int32) * 2 + 1
    center = (tf.cast(tf.range(out_size), tf.float64) + 0.5) * scale
    # C's (int) cast truncates towards zero; clamping to the image comes after.
    first = tf.maximum(tf.cast(center - support + 0.5, tf.int32), 0)
    end = tf.minimum(tf.cast(center + support + 0.5, tf.int32), in_size)
    taps = first[:, None] + tf.range(num_taps)[None, :]  # [out, taps] source indices.
    offset = (tf.cast(taps, tf.float64) - center[:, None]) + 0.5
    weights = _bicubic(offset * (1.0 / filter_scale))
    weights = tf.where(taps < end[:, None], weights, 0.0)
    # PIL sums the weights in tap order; a cumulative sum keeps that order (and its rounding).
    total = tf.math.cumsum(weights, axis=1)[:, -1:]
    weights = tf.where(total != 0.0, weights / total, weights)
    scaled = weights * float(1 << _PRECISION_BITS)
    fixed = tf.where(weights < 0.0, scaled - 0.5, scaled + 0.5)  # Then truncated, as in C.
    return first, tf.cast(fixed, tf.int32)


def _bicubic_rows(image: tf.Tensor, out_size) -> tf.Tensor:
    """One PIL 8-bit resampling pass of [H, W, C] uint8 along its rows -> [out_size, W, C]."""
    in_size = tf.shape(image)[0]
    first, weights = _bicubic_taps(in_size, out_size)
    pixels = tf.cast(image, tf.int32)
    last = in_size - 1

    def add_tap(t, total):
        # Taps past the image's end weigh 0; clamping only keeps the gather in range.
        rows = tf.gather(pixels, tf.minimum(first + t, last))
        return t + 1, total + rows * weights[:, t, None, None]

    shape = tf.concat([[out_size], tf.shape(image)[1:]], axis=0)
    start = tf.fill(shape, tf.constant(1 << (_PRECISION_BITS - 1), tf.int32))  # Rounding.
    _, total = tf.while_loop(
        lambda t, _: t < tf.shape(weights)[1], add_tap, (tf.constant(0), start)
    )
    # PIL's clip8: an arithmetic shift, then clipping to 0..255.
    total = tf.bitwise.right_shift(total, _PRECISION_BITS)
    return tf.cast(tf.clip_by_value(total, 0, 255), tf.uint8)


def pil_bicubic_resize(image: tf.Tensor, height, width) -> tf.Tensor:
    """[H, W, C] uint8 -> [height, width, C] uint8, equal to PIL's
    `Image.resize((width, height), Image.BICUBIC)` (horizontal pass first; module docstring)."""
    if image.dtype != tf.uint8:
        raise TypeError(f"pil_bicubic_resize expects a uint8 image, got {image.dtype.name}")
    shape = tf.shape(image)

    def horizontal():  # On the transposed image: gathering whole rows is ~2x faster.
        return tf.transpose(_bicubic_rows(tf.transpose(image, [1, 0, 2]), width), [1, 0, 2])

    out = tf.cond(tf.equal(shape[1], width), lambda: image, horizontal)
    return tf.cond(tf.equal(shape[0], height), lambda: out, lambda: _bicubic_rows(out, height))


def _nearest_indices(in_size: tf.Tensor, out_size: tf.Tensor) -> tf.Tensor:
    """[out_size] int32 source indices of PIL's NEAREST resize along one axis."""
    step = tf.cast(in_size, tf.float64) / tf.cast(out_size, tf.float64)
    # PIL starts at step / 2 and adds step per pixel in float64; a sequential cumulative sum
    # reproduces its rounding (the exact (i + 0.5) * step can differ at integer boundaries).
    steps = tf.concat([[step * 0.5], tf.fill([out_size - 1], step)], axis=0)
    return tf.cast(tf.math.cumsum(steps), tf.int32)


def pil_nearest_resize(label: tf.Tensor, height, width) -> tf.Tensor:
    """[H, W, ...] -> [height, width, ...], equal to PIL's `resize(..., Image.NEAREST)`."""
    shape = tf.shape(label)
    rows = tf.gather(label, _nearest_indices(shape[0], height), axis=0)
    return tf.gather(rows, _nearest_indices(shape[1], width), axis=1)


def resize_height_center_crop_pad(
    image: tf.Tensor, label: tf.Tensor, height: int = 1536, crop: int = 1536, label_pad: int = 0
) -> tuple[tf.Tensor, tf.Tensor]:
    """RobustNet's Mapillary evaluation transform (module docstring), exactly.

    Args:
      image: [H, W, 3] uint8, as decoded.
      label: [H, W] or [H, W, 1] train ids (any integer dtype).
      height: height the pair is resized to, keeping the aspect ratio (RobustNet: 1536).
      crop: side of the square centre crop / pad (RobustNet: 1536).
      label_pad: label of the pixels the pad or crop adds (outside the resized image).
        RobustNet's is 0 (train id 'road'); 255 would leave them out of the scores.

    Returns:
      (image [crop, crop, 3] uint8, label [crop, crop] or [crop, crop, 1], label's dtype);
      the image is 0 outside the resized image.
    """
    shape = tf.shape(image)
    in_height, in_width = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
    width = tf.cast(in_width / in_height * tf.cast(height, tf.float64), tf.int32)  # int(...)
    image = pil_bicubic_resize(image, height, width)
    label = pil_nearest_resize(label, height, width)
    # CenterCropPad: the crop origin in the padded image is x1 (from the unpadded size) plus
    # the pad, so the resized image starts at pad - x1 in the output (rounding halves to
    # even like Python's round; the halves are exact in float64).
    rows, cols = (_paste_offset(size, crop) for size in (height, width))
    image = _paste(image, rows, cols, crop, 0)
    label = _paste(label, rows, cols, crop, label_pad)
    return image, label


def _paste_offset(size, crop: int) -> tf.Tensor:
    """Where CenterCropPad puts the first of `size` pixels along one axis (may be < 0)."""
    size = tf.convert_to_tensor(size, tf.int32)
    pad = tf.maximum(crop - size, 0)
    origin = tf.cast(tf.round(tf.cast(size - crop, tf.float64) / 2.0), tf.int32)
    return pad - origin


def _paste(array: tf.Tensor, rows: tf.Tensor, cols: tf.Tensor, crop: int, fill) -> tf.Tensor:
    """[h, w, ...] placed at (rows, cols) of a [crop, crop, ...] canvas of `fill` (clipped)."""
    shape = tf.shape(array)
    out_rows, out_cols = tf.range(crop) - rows, tf.range(crop) - cols  # Source index per pixel.
    row_ok = (out_rows >= 0) & (out_rows < shape[0])
    col_ok = (out_cols >= 0) & (out_cols < shape[1])
    taken = tf.gather(array, tf.clip_by_value(out_rows, 0, shape[0] - 1), axis=0)
    taken = tf.gather(taken, tf.clip_by_value(out_cols, 0, shape[1] - 1), axis=1)
    inside = row_ok[:, None] & col_ok[None, :]
    inside = tf.reshape(inside, tf.concat([[crop, crop], tf.ones_like(shape[2:])], axis=0))
    return tf.where(inside, taken, tf.cast(fill, array.dtype))
