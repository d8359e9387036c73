"""ProDA's strong view: RandAugmentMC(2, 10) + Cutout, in TensorFlow, with recorded geometry.

`rand_augment_mc` re-implements ProDA's `RandAugmentMC` (itself FixMatch's) on a weak view:
horizontal flip with p 0.5, then `num_ops` ops drawn with replacement from FixMatch's pool of 14,
each with a level v uniform in 1..magnitude-1 and applied with p 0.5 (Rotate, Shear*, Translate*
also draw a sign with p 0.5), then always Cutout: a grey square of side min(h, w) // 3. Every
random choice is a stateless draw from the example's seed (as in `jaxda.data.augment`), so the
view is a pure function of (stream seed, position) and a resumed stream reproduces it.

Every op works on integer-valued images as Pillow 13 does on uint8 (the tests compare each op
with Pillow itself): ImageEnhance (Brightness, Color, Contrast, Sharpness) blends with its
degenerate image in float32 and truncates, as Pillow's `Image.blend`; Sharpness's degenerate is
the SMOOTH filter (kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, rounded, border pixels kept);
Contrast's is the rounded mean of the ITU-R 601 luma image; the affine ops sample bilinearly at
Pillow's pixel centres in float64 and truncate, with edge clamping and `fill` outside the frame.
Remaining differences from Pillow: Sharpness/Color may differ by 1 grey level where float32
rounding in a different summation order crosses an integer (none seen in the tests).

Geometry. The view records `flip` and `matrix` [6] = (a, b, c, d, e, f), the composition of all
affine ops actually applied, mapping a point (x, y) of the strong view to (a x + b y + c,
d x + e y + f) in the flipped weak view, in normalised coordinates (0..1 spans the image; pixel
i of n spans [i, i + 1) / n), so it applies at any resolution (`geometry.to_strong`). As an
image that was translated out of the frame and back keeps the grey band it got on the way,
`frames` [num_ops, 6] records the partial compositions (from op slot s to the last; frames[0]
is `matrix`): a strong point is in-frame only when every one of them lands in [0, 1)^2. `cutout`
[4] is the grey box (y0, x0, y1, x1) in normalised strong coordinates. The label is the weak
label sampled once (nearest) at that composed map, `ignore_label` out of frame and in the
cutout, computed exactly as `geometry.to_strong` does.

Deliberate deviations from ProDA's `label_strong_T` (which moves labels and features of the
weak view to the strong one): it applies the recorded affines in a fixed order (ShearX, ShearY,
TranslateX, TranslateY, Rotate) whatever order the image got them in, keeps only the last
parameter of an op drawn twice, uses torch `affine_grid` conventions (centred, aspect-scaled)
that differ from Pillow's corner-anchored transforms, and blanks the cutout as the half-open box
[x0, x1) while Pillow's rectangle includes x1 and y1. Here the exact sequence is composed and
the box is Pillow's inclusive one, so labels follow the image. The label is resampled once
through the composed map rather than once per op.
"""

import math
from collections.abc import Sequence
from typing import NamedTuple

import tensorflow as tf

from jaxda.data.labels import IGNORE_LABEL

# FixMatch's pool as ProDA uses it: name -> (max_v, bias) of `_float_parameter` /
# `_int_parameter` (None: the op takes no level).
POOL = {
    "AutoContrast": None,
    "Brightness": (0.9, 0.05),
    "Color": (0.9, 0.05),
    "Contrast": (0.9, 0.05),
    "Equalize": None,
    "Identity": None,
    "Posterize": (4, 4),
    "Rotate": (30, 0),
    "Sharpness": (0.9, 0.05),
    "ShearX": (0.3, 0),
    "ShearY": (0.3, 0),
    "Solarize": (256, 0),
    "TranslateX": (0.3, 0),
    "TranslateY": (0.3, 0),
}
OP_NAMES = tuple(POOL)
GEOMETRIC_OPS = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")
_PARAMETER_MAX = 10.0
# Uniform slots: flip, cutout centre (y, x), then per op slot: choice, level, apply, sign.
_FLIP, _CUT_Y, _CUT_X = range(3)
_PER_OP = 4


class Strong(NamedTuple):
    """`rand_augment_mc`'s output (shapes for one example)."""

    image: tf.Tensor  # [h, w, 3] float32, integer values in [0, 255].
    label: tf.Tensor  # [h, w] uint8, ignore out of frame and in the cutout.
    flip: tf.Tensor  # [] bool: the weak view was mirrored first.
    matrix: tf.Tensor  # [6] float32: strong -> flipped weak, normalised (module docstring).
    frames: tf.Tensor  # [num_ops, 6] float32: partial compositions; frames[0] == matrix.
    cutout: tf.Tensor  # [4] float32 (y0, x0, y1, x1), normalised strong coords; zeros if none.


def _float_parameter(v: tf.Tensor, max_v: float) -> tf.Tensor:
    return v * max_v / _PARAMETER_MAX


def _int_parameter(v: tf.Tensor, max_v: float) -> tf.Tensor:
    return tf.floor(v * max_v / _PARAMETER_MAX)


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """Pillow's `Image.blend` for factors in [0, 1]: float32 interpolation, truncated."""
    alpha = tf.cast(factor, tf.float32)
    return tf.clip_by_value(tf.floor(degenerate + alpha * (image - degenerate)), 0.0, 255.0)


def _luma(image: tf.Tensor) -> tf.Tensor:
    """[h, w] float32: Pillow's RGB -> L conversion (ITU-R 601, 16-bit fixed point, rounded)."""
    rgb = tf.cast(image, tf.int32)
    weighted = rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000
    return tf.cast(tf.bitwise.right_shift(weighted, 16), tf.float32)


def _apply_lut(image: tf.Tensor, lut: tf.Tensor) -> tf.Tensor:
    """Per-channel lookup: image [h, w, 3], lut [3, 256] -> float32 [h, w, 3]."""
    index = tf.cast(image, tf.int32) + tf.constant([0, 256, 512])
    return tf.cast(tf.gather(tf.reshape(lut, [-1]), index), tf.float32)


def _histograms(image: tf.Tensor) -> tf.Tensor:
    """[3, 256] int32 counts of each channel's values."""
    index = tf.reshape(tf.cast(image, tf.int32) + tf.constant([0, 256, 512]), [-1])
    return tf.reshape(tf.math.bincount(index, minlength=768, maxlength=768), [3, 256])


def auto_contrast(image: tf.Tensor) -> tf.Tensor:
    """ImageOps.autocontrast: each channel's [lo, hi] stretched to [0, 255] (float64 LUT)."""
    present = _histograms(image) > 0
    levels = tf.range(256, dtype=tf.float64)
    lo = tf.reduce_min(tf.where(present, levels, 256.0), axis=1, keepdims=True)
    hi = tf.reduce_max(tf.where(present, levels, -1.0), axis=1, keepdims=True)
    scale = 255.0 / tf.maximum(hi - lo, 1.0)
    # Pillow's int() truncates; flooring differs only below 0, which is clamped anyway.
    lut = tf.clip_by_value(tf.floor(levels * scale + (-lo * scale)), 0.0, 255.0)
    lut = tf.where(hi <= lo, levels, lut)
    return _apply_lut(image, tf.cast(lut, tf.int32))


def equalize(image: tf.Tensor) -> tf.Tensor:
    """ImageOps.equalize (Pillow 13: step = (count - count of the top level) // 255)."""
    hist = _histograms(image)
    levels = tf.range(256)
    top = tf.reduce_max(tf.where(hist > 0, levels, -1), axis=1)
    top_count = tf.gather(hist, top, batch_dims=1)
    step = (tf.reduce_sum(hist, axis=1) - top_count) // 255
    start = tf.cumsum(hist, axis=1, exclusive=True) + (step // 2)[:, None]
    # Pillow's `point` clips LUT entries to 255.
    lut = tf.minimum(start // tf.maximum(step, 1)[:, None], 255)
    distinct = tf.reduce_sum(tf.cast(hist > 0, tf.int32), axis=1)
    lut = tf.where(((distinct <= 1) | (step == 0))[:, None], levels, lut)
    return _apply_lut(image, lut)


def posterize(image: tf.Tensor, bits: tf.Tensor) -> tf.Tensor:
    """ImageOps.posterize: keep the top `bits` bits of each value."""
    mask = 256 - tf.bitwise.left_shift(1, 8 - tf.cast(bits, tf.int32))
    return tf.cast(tf.bitwise.bitwise_and(tf.cast(image, tf.int32), mask), tf.float32)


def solarize(image: tf.Tensor, threshold: tf.Tensor) -> tf.Tensor:
    """ImageOps.solarize: invert the values >= threshold."""
    return tf.where(image < tf.cast(threshold, tf.float32), image, 255.0 - image)


def smooth(image: tf.Tensor) -> tf.Tensor:
    """ImageFilter.SMOOTH: 3x3 kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 in float32,
    rounded; Pillow copies the border rows and columns unfiltered."""
    k, k5 = tf.constant(1.0 / 13.0, tf.float32), tf.constant(5.0 / 13.0, tf.float32)
    h, w = tf.shape(image)[0], tf.shape(image)[1]

    def row(dy, centre):
        band = image[dy : h - 2 + dy]
        return band[:, :-2] * k + band[:, 1:-1] * centre + band[:, 2:] * k

    inner = tf.floor(row(0, k) + row(1, k5) + row(2, k) + 0.5)
    inner = tf.pad(tf.clip_by_value(inner, 0.0, 255.0), [[1, 1], [1, 1], [0, 0]])
    rows, cols = tf.range(h)[:, None], tf.range(w)[None, :]
    border = (rows == 0) | (rows == h - 1) | (cols == 0) | (cols == w - 1)
    return tf.where(border[..., None], image, inner)


def brightness(image, factor):
    return _blend(tf.zeros_like(image), image, factor)


def color(image, factor):
    return _blend(tf.tile(_luma(image)[..., None], [1, 1, 3]), image, factor)


def contrast(image, factor):
    mean = tf.floor(tf.reduce_mean(tf.cast(_luma(image), tf.float64)) + 0.5)
    return _blend(tf.fill(tf.shape(image), tf.cast(mean, tf.float32)), image, factor)


def sharpness(image, factor):
    return _blend(smooth(image), image, factor)


def pil_affine(image: tf.Tensor, coeffs: Sequence[tf.Tensor], fill: float) -> tf.Tensor:
    """`Image.transform(size, AFFINE, coeffs, BILINEAR, fillcolor=fill)` of image [h, w, 3].

    coeffs (a, b, c, d, e, f): output pixel centre (x, y) samples the input at (a x + b y + c,
    d x + e y + f) in pixel units, bilinearly with clamped edges, in float64 and truncated as
    Pillow does; outside [0, w) x [0, h) the output is `fill`.
    """
    a, b, c, d, e, f = (tf.cast(t, tf.float64) for t in coeffs)
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    x = tf.cast(tf.range(w), tf.float64)[None, :] + 0.5
    y = tf.cast(tf.range(h), tf.float64)[:, None] + 0.5
    xin, yin = a * x + b * y + c, d * x + e * y + f
    inside = (xin >= 0) & (xin < tf.cast(w, tf.float64)) & (yin >= 0)
    inside &= yin < tf.cast(h, tf.float64)
    xin, yin = xin - 0.5, yin - 0.5
    x0, y0 = tf.floor(xin), tf.floor(yin)
    dx, dy = (xin - x0)[..., None], (yin - y0)[..., None]
    # Clamp before the int cast so far-away (filled) points cannot overflow.
    x0 = tf.cast(tf.clip_by_value(x0, -1.0, tf.cast(w, tf.float64)), tf.int32)
    y0 = tf.cast(tf.clip_by_value(y0, -1.0, tf.cast(h, tf.float64)), tf.int32)
    xs = [tf.clip_by_value(x0 + i, 0, w - 1) for i in (0, 1)]
    ys = [tf.clip_by_value(y0 + i, 0, h - 1) for i in (0, 1)]
    source = tf.cast(image, tf.float64)

    def at(yy, xx):
        return tf.gather_nd(source, tf.stack([yy, xx], axis=-1))

    top = at(ys[0], xs[0]) + (at(ys[0], xs[1]) - at(ys[0], xs[0])) * dx
    bottom = at(ys[1], xs[0]) + (at(ys[1], xs[1]) - at(ys[1], xs[0])) * dx
    value = tf.cast(tf.floor(top + (bottom - top) * dy), tf.float32)
    return tf.where(inside[..., None], value, tf.constant(fill, tf.float32))


def _rotation_table(magnitude: int) -> tf.Tensor:
    """[magnitude, 2, 2] float64 (cos, sin) of Pillow's `rotate` matrix for level v and sign
    (-1, +1), computed as Pillow does (angle % 360, radians, rounded to 15 decimals)."""
    table = []
    for v in range(magnitude):
        row = []
        for sign in (-1, 1):
            angle = -math.radians((sign * int(v * 30 / _PARAMETER_MAX)) % 360.0)
            row.append((round(math.cos(angle), 15), round(math.sin(angle), 15)))
        table.append(row)
    return tf.constant(table, tf.float64)


def _pixel_matrix(name: str, image: tf.Tensor, v: tf.Tensor, sign: tf.Tensor, magnitude: int):
    """Pillow's (a, b, c, d, e, f) of the geometric op `name` at level v with sign ±1."""
    shape = tf.cast(tf.shape(image), tf.float64)
    h, w = shape[0], shape[1]
    zero, one = tf.constant(0.0, tf.float64), tf.constant(1.0, tf.float64)
    if name == "Rotate":
        cos_sin = _rotation_table(magnitude)[tf.cast(v, tf.int32), tf.cast(sign > 0, tf.int32)]
        cos, sin = cos_sin[0], cos_sin[1]
        cx, cy = w / 2.0, h / 2.0
        c = cos * -cx + sin * -cy + 0.0 + cx
        f = -sin * -cx + cos * -cy + 0.0 + cy
        return cos, sin, c, -sin, cos, f
    amount = sign * _float_parameter(v, POOL[name][0])
    if name == "ShearX":
        return one, amount, zero, zero, one, zero
    if name == "ShearY":
        return one, zero, zero, amount, one, zero
    # int(v * size): a whole number of pixels, truncated towards zero.
    if name == "TranslateX":
        return one, zero, tf.cast(tf.cast(amount * w, tf.int32), tf.float64), zero, one, zero
    return one, zero, zero, zero, one, tf.cast(tf.cast(amount * h, tf.int32), tf.float64)


def _normalised(coeffs, image: tf.Tensor) -> tf.Tensor:
    """[3, 3] float64: the pixel-unit map `coeffs` in normalised coordinates (S^-1 P S)."""
    a, b, c, d, e, f = coeffs
    shape = tf.cast(tf.shape(image), tf.float64)
    h, w = shape[0], shape[1]
    rows = [tf.stack([a, b * h / w, c / w]), tf.stack([d * w / h, e, f / h])]
    return tf.stack([*rows, tf.constant([0.0, 0.0, 1.0], tf.float64)])


def apply_op(
    name: str, image: tf.Tensor, v, sign=1.0, *, magnitude: int = 10, fill: float = 127
) -> tuple[tf.Tensor, tf.Tensor]:
    """One pool op at level v (1..magnitude-1) with sign ±1 (geometric ops only), as ProDA
    calls it. Returns (image [h, w, 3] float32, normalised strong -> input map [3, 3] float64)."""
    v = tf.cast(v, tf.float64)
    sign = tf.cast(sign, tf.float64)
    identity = tf.eye(3, dtype=tf.float64)
    if name in GEOMETRIC_OPS:
        coeffs = _pixel_matrix(name, image, v, sign, magnitude)
        return pil_affine(image, coeffs, fill), _normalised(coeffs, image)
    if name in ("Brightness", "Color", "Contrast", "Sharpness"):
        max_v, bias = POOL[name]
        factor = _float_parameter(v, max_v) + bias
        op = {"Brightness": brightness, "Color": color, "Contrast": contrast}.get(name, sharpness)
        return op(image, factor), identity
    point_ops = {
        "Posterize": lambda: posterize(image, _int_parameter(v, 4) + 4),
        "Solarize": lambda: solarize(image, 256 - _int_parameter(v, 256)),
        "AutoContrast": lambda: auto_contrast(image),
        "Equalize": lambda: equalize(image),
        "Identity": lambda: image,
    }
    if name not in point_ops:
        raise ValueError(f"Unknown op {name!r}; the pool is {OP_NAMES}")
    return point_ops[name](), identity


def cutout_box(size: tf.Tensor, u_y: tf.Tensor, u_x: tf.Tensor) -> tf.Tensor:
    """[4] int32 (y0, x0, y1, x1): ProDA's CutoutAbs(img, min(w, h) // 3) box, inclusive of
    y1 and x1 as Pillow's `ImageDraw.rectangle` draws it (they may be h or w: clipped)."""
    h, w = size[0], size[1]
    side = tf.cast(tf.minimum(h, w) // 3, tf.float64)
    corners = []
    for u, n in ((u_y, h), (u_x, w)):
        start = u * tf.cast(n, tf.float64) - side / 2.0
        start = tf.cast(tf.maximum(tf.constant(0.0, tf.float64), start), tf.int32)
        corners.append((start, tf.minimum(n, start + tf.cast(side, tf.int32))))
    return tf.stack([corners[0][0], corners[1][0], corners[0][1], corners[1][1]])


def warp_nearest(
    maps: tf.Tensor,
    flip: tf.Tensor,
    matrix: tf.Tensor,
    frames: tf.Tensor,
    cutout: tf.Tensor,
    fill,
) -> tf.Tensor:
    """A weak-view map [h, w] or [h, w, C] -> the strong view at the same size, nearest.

    The same float32 arithmetic as `geometry.to_strong`: destination pixel centres in
    normalised coordinates, through `matrix` (and `frames` for validity), mirrored if `flip`,
    scaled to source pixels and floored; `fill` out of frame and inside `cutout`.
    """
    shape = tf.shape(maps)
    h, w = shape[0], shape[1]
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    y = ((tf.cast(tf.range(h), tf.float32) + 0.5) / hf)[:, None]
    x = ((tf.cast(tf.range(w), tf.float32) + 0.5) / wf)[None, :]
    valid = tf.ones([h, w], tf.bool)
    for k in range(frames.shape[0]):
        m = frames[k]
        fx, fy = m[0] * x + m[1] * y + m[2], m[3] * x + m[4] * y + m[5]
        valid &= (fx >= 0) & (fx < 1) & (fy >= 0) & (fy < 1)
    xs, ys = matrix[0] * x + matrix[1] * y + matrix[2], matrix[3] * x + matrix[4] * y + matrix[5]
    xs = tf.where(flip, 1.0 - xs, xs)
    qx, qy = xs * wf, ys * hf
    valid &= (qx >= 0) & (qx < wf) & (qy >= 0) & (qy < hf)
    valid &= ~((y >= cutout[0]) & (y < cutout[2]) & (x >= cutout[1]) & (x < cutout[3]))
    ix = tf.cast(tf.clip_by_value(tf.floor(qx), 0.0, wf - 1.0), tf.int32)
    iy = tf.cast(tf.clip_by_value(tf.floor(qy), 0.0, hf - 1.0), tf.int32)
    out = tf.gather_nd(maps, tf.stack([iy, ix], axis=-1))
    mask = valid if maps.shape.rank == 2 else valid[..., None]
    return tf.where(mask, out, tf.cast(fill, maps.dtype))


class Draws(NamedTuple):
    """Every random choice of one strong view (`draws`)."""

    flip: tf.Tensor  # [] bool.
    ops: tf.Tensor  # [num_ops] int32 index into OP_NAMES (random.choices, with replacement).
    levels: tf.Tensor  # [num_ops] float64 in 1..magnitude-1 (np.random.randint(1, m)).
    applied: tf.Tensor  # [num_ops] bool, each with p 0.5.
    signs: tf.Tensor  # [num_ops] float64 ±1 (used by the geometric ops only).
    cutout_centre: tf.Tensor  # [2] float64 (y, x) uniforms in [0, 1).


def draws(seed: tf.Tensor, num_ops: int = 2, magnitude: int = 10) -> Draws:
    """The strong view's random choices, each from its own slot of one stateless uniform
    vector: a function of `seed` alone."""
    u = tf.random.stateless_uniform([3 + _PER_OP * num_ops], seed=seed, dtype=tf.float64)
    per_op = tf.reshape(u[3:], [num_ops, _PER_OP])
    ops = tf.minimum(tf.cast(per_op[:, 0] * len(OP_NAMES), tf.int32), len(OP_NAMES) - 1)
    levels = tf.minimum(1.0 + tf.floor(per_op[:, 1] * (magnitude - 1)), magnitude - 1.0)
    signs = tf.where(per_op[:, 3] < 0.5, -1.0, 1.0)
    cutout_centre = tf.stack([u[_CUT_Y], u[_CUT_X]])
    return Draws(u[_FLIP] < 0.5, ops, levels, per_op[:, 2] < 0.5, signs, cutout_centre)


def rand_augment_mc(
    image: tf.Tensor,
    label: tf.Tensor,
    seed: tf.Tensor,
    *,
    num_ops: int = 2,
    magnitude: int = 10,
    cutout: bool = True,
    fill: int = 127,
    ignore_label: int = IGNORE_LABEL,
    ops: Sequence[tuple[str, int, int]] | None = None,
    flip: bool | None = None,
) -> Strong:
    """ProDA's `RandAugmentMC(num_ops, magnitude)` of a weak view, with its geometry.

    Args:
      image: [h, w, 3] float (or uint8) RGB in [0, 255]; rounded to integers first, since
        ProDA's ops work on uint8 Pillow images.
      label: [h, w] uint8 of the same view.
      seed: [2] int64 stateless seed of this example's strong view.
      num_ops, magnitude: ProDA's n = 2 and m = 10 (levels are drawn from 1..m-1).
      cutout: draw ProDA's Cutout (grey `fill`, ignore label) after the ops.
      fill: grey level of out-of-frame and cutout pixels (ProDA: 127).
      ignore_label: label of out-of-frame and cutout pixels.
      ops: for tests: the (name, level, sign) ops to apply, in order and all of them, instead
        of drawing them (then `frames` has len(ops) rows).
      flip: for tests: force the flip (None: draw it).

    Returns:
      `Strong` (image, label, flip, matrix, frames, cutout); see the module docstring.
    """
    if num_ops < 1 or not 2 <= magnitude <= 10:
        raise ValueError(f"need num_ops >= 1 and 2 <= magnitude <= 10; got {num_ops}, {magnitude}")
    image = tf.clip_by_value(tf.round(tf.cast(image, tf.float32)), 0.0, 255.0)
    drawn = draws(seed, num_ops, magnitude)
    do_flip = drawn.flip if flip is None else tf.constant(bool(flip))
    shape = image.shape
    image = tf.cond(do_flip, lambda: tf.reverse(image, [1]), lambda: image)

    maps = []
    if ops is not None:
        for name, v, sign in ops:
            image, step = apply_op(name, image, v, sign, magnitude=magnitude, fill=fill)
            maps.append(step)
    else:
        for slot in range(num_ops):
            # An op that is not applied is the identity (no pixels touched, identity map).
            identity = OP_NAMES.index("Identity")
            choice = tf.where(drawn.applied[slot], drawn.ops[slot], identity)
            level, sign = drawn.levels[slot], drawn.signs[slot]
            branches = [
                lambda name=name, image=image, level=level, sign=sign: apply_op(
                    name, image, level, sign, magnitude=magnitude, fill=fill
                )
                for name in OP_NAMES
            ]
            image, step = tf.switch_case(choice, branches)
            image = tf.ensure_shape(image, shape)
            maps.append(step)
    # frames[s]: strong -> the input of op slot s (ops after s applied backwards).
    total, frames = tf.eye(3, dtype=tf.float64), []
    for step in reversed(maps):
        total = step @ total
        frames.insert(0, tf.reshape(total[:2], [6]))
    frames = tf.cast(tf.stack(frames) if frames else tf.zeros([0, 6], tf.float64), tf.float32)
    matrix = tf.cast(tf.reshape(total[:2], [6]), tf.float32)

    size = tf.shape(image)[:2]
    box = tf.zeros([4], tf.float32)
    if cutout:
        pixels = cutout_box(size, drawn.cutout_centre[0], drawn.cutout_centre[1])
        rows, cols = tf.range(size[0])[:, None], tf.range(size[1])[None, :]
        inside = (rows >= pixels[0]) & (rows <= pixels[2]) & (cols >= pixels[1])
        inside &= cols <= pixels[3]
        image = tf.where(inside[..., None], tf.constant(fill, tf.float32), image)
        # Inclusive pixel box -> half-open normalised box.
        ends = tf.minimum(pixels[2:] + 1, size)
        box = tf.cast(tf.concat([pixels[:2], ends], 0), tf.float32) / tf.cast(
            tf.tile(size, [2]), tf.float32
        )
    strong_label = warp_nearest(label, do_flip, matrix, frames, box, ignore_label)
    # Static shapes for batching: the view keeps the weak view's size.
    image = tf.ensure_shape(image, shape)
    strong_label = tf.ensure_shape(strong_label, label.shape)
    return Strong(image, strong_label, do_flip, matrix, frames, box)


# Keys of a training stream's `strong` config, with their defaults (ProDA's RandAugmentMC(2, 10);
# `of`: the view it is made from, '' for a stream without views).
STRONG_DEFAULTS = {"num_ops": 2, "magnitude": 10, "cutout": True, "fill": 127, "of": ""}


def stream_options(strong, views: dict | None, name: str) -> dict | None:
    """Validated {'of': view name or '', **`rand_augment_mc` keywords} of a stream's `strong`
    config (a mapping; missing keys take `STRONG_DEFAULTS`); None when it is None or empty.

    views: the stream's views by name, or None without views. name: the stream, for errors.
    """
    if not strong:
        return None
    unknown = sorted(set(strong.keys()) - set(STRONG_DEFAULTS))
    if unknown:
        raise ValueError(f"{name}: unknown strong keys {unknown}; known: {list(STRONG_DEFAULTS)}")
    options = {**STRONG_DEFAULTS, **dict(strong.items())}
    of = options["of"]
    if views is None and of:
        raise ValueError(f"{name}: strong.of={of!r} names a view, but the stream has no views")
    if views is not None:
        if of not in views:
            raise ValueError(
                f"{name}: strong.of={of!r} must name one of the stream's views {sorted(views)}"
            )
        if "strong" in views:
            raise ValueError(f"{name}: a view named 'strong' clashes with the strong view's key")
    if int(options["num_ops"]) < 1 or not 2 <= int(options["magnitude"]) <= 10:
        raise ValueError(f"{name}: need strong.num_ops >= 1 and 2 <= strong.magnitude <= 10")
    if not 0 <= int(options["fill"]) <= 255:
        raise ValueError(f"{name}: strong.fill must be a grey level in [0, 255]")
    return {
        "of": of,
        "num_ops": int(options["num_ops"]),
        "magnitude": int(options["magnitude"]),
        "cutout": bool(options["cutout"]),
        "fill": int(options["fill"]),
    }
