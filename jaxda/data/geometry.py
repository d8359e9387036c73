"""Moving per-pixel maps between augmented views of one example (pure jax.numpy, jit-able).

`to_strong` moves weak-view maps to ProDA's RandAugment view (`jaxda.data.randaugment`).

A view is described as `jaxda.data.augment` reports it: `box` [N, 4] float32 (y0, x0, y1, x1),
the region of the base frame (the example as it entered augmentation) that the view shows, in
normalised base coordinates (0..1 spans the base image; a padded view reaches beyond), and
`flip` [N] bool, whether the view was then mirrored horizontally. The view is the box resized
to the view's size (then mirrored), so random scale, crop, pad and flip are all captured; the
base frame itself is `BASE_BOX`, unflipped, at any resolution.

Pixel centres follow the half-pixel convention of `tf.image.resize` and PIL: pixel i of an
axis of n pixels spans [i, i + 1) / n. Nearest sampling then reproduces the augmentation's
label resize except where a sample point falls exactly on a pixel edge (e.g. every third row at
scale 2/3), which float rounding may settle either way; bilinear sampling matches
`tf.image.resize(..., "bilinear")` (edges clamped).
Points outside the source frame are invalid and get `fill`.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxda.data.labels import IGNORE_LABEL

BASE_BOX = (0.0, 0.0, 1.0, 1.0)


def _sample_points(src_lo, src_hi, src_n, dst_lo, dst_hi, dst_n, dst_flip):
    """Continuous source coordinates [N, dst_n] (0..src_n spans the source) of the
    destination's pixel centres along one axis, destination mirroring applied."""
    j = jnp.arange(dst_n, dtype=jnp.float32)
    if dst_flip is not None:
        j = jnp.where(dst_flip[:, None], dst_n - 1 - j, j)
    # One affine map, so that equal frames give scale 1 and offset 0 exactly (exact round trips).
    scale = (dst_hi - dst_lo) * src_n / ((src_hi - src_lo) * dst_n)
    offset = (dst_lo - src_lo) * src_n / (src_hi - src_lo)
    return (j + 0.5) * scale[:, None] + offset[:, None]


def _indices(q, n, src_flip, method):
    """Source indices and weights [N, m] of coordinates q [N, m]; mirrors into a flipped source.

    Returns (i0, i1, w1, valid): value = (1 - w1) * map[i0] + w1 * map[i1].
    """
    valid = (q >= 0) & (q < n)
    if method == "nearest":
        i0 = jnp.clip(jnp.floor(q), 0, n - 1).astype(jnp.int32)
        i1, w1 = i0, jnp.zeros_like(q)
    else:
        p = jnp.clip(q - 0.5, 0, n - 1)
        i0 = jnp.floor(p).astype(jnp.int32)
        i1 = jnp.minimum(i0 + 1, n - 1)
        w1 = p - i0
    if src_flip is not None:
        i0 = jnp.where(src_flip[:, None], n - 1 - i0, i0)
        i1 = jnp.where(src_flip[:, None], n - 1 - i1, i1)
    return i0, i1, w1, valid


def _gather(maps, i0, i1, w1, axis, method):
    """Interpolates maps [N, ...] along `axis` at indices [N, m] (vmapped over N)."""
    take = jax.vmap(lambda m, i: jnp.take(m, i, axis=axis - 1))
    if method == "nearest":
        return take(maps, i0)
    shape = [w1.shape[0]] + [1] * (maps.ndim - 1)
    shape[axis] = w1.shape[1]
    w1 = w1.reshape(shape).astype(maps.dtype)
    return take(maps, i0) * (1 - w1) + take(maps, i1) * w1


def _checked(maps, method: str, fill):
    """(maps as an array, fill: IGNORE_LABEL for integer maps and 0 for floats when None);
    raises on an unknown method or bilinear resampling of integer maps."""
    if method not in ("bilinear", "nearest"):
        raise ValueError(f"method must be 'bilinear' or 'nearest', got {method!r}")
    maps = jnp.asarray(maps)
    integer = not jnp.issubdtype(maps.dtype, jnp.inexact)
    if method == "bilinear" and integer:
        raise ValueError(f"bilinear resampling of {maps.dtype} maps; use method='nearest'")
    if fill is None:
        fill = IGNORE_LABEL if integer else 0
    return maps, fill


def resample(
    maps: jax.Array,
    src_box: jax.Array,
    src_flip: jax.Array | None,
    dst_box: jax.Array,
    dst_flip: jax.Array | None,
    out_size: Sequence[int],
    *,
    method: str = "bilinear",
    fill: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Maps [N, H, W, ...] of the view (src_box, src_flip) -> the view (dst_box, dst_flip).

    Args:
      maps: [N, H, W, ...] in the source view (e.g. a teacher's softmax on the weak view).
      src_box, dst_box: [N, 4] (y0, x0, y1, x1) in normalised base coordinates.
      src_flip, dst_flip: [N] bool, or None for unflipped.
      out_size: (height, width) of the destination maps.
      method: 'bilinear' (soft maps, features; floating maps only) or 'nearest' (labels).
      fill: value of destination pixels the source does not cover; None: `IGNORE_LABEL` for
        integer maps, 0 otherwise.

    Returns:
      (maps [N, height, width, ...], valid [N, height, width] bool: covered by the source).
    """
    maps, fill = _checked(maps, method, fill)
    src_box = jnp.asarray(src_box, jnp.float32)
    dst_box = jnp.asarray(dst_box, jnp.float32)
    height, width = maps.shape[1:3]
    qy = _sample_points(*src_box[:, ::2].T, height, *dst_box[:, ::2].T, out_size[0], None)
    qx = _sample_points(*src_box[:, 1::2].T, width, *dst_box[:, 1::2].T, out_size[1], dst_flip)
    y0, y1, wy, valid_y = _indices(qy, height, None, method)
    x0, x1, wx, valid_x = _indices(qx, width, src_flip, method)
    out = _gather(_gather(maps, y0, y1, wy, 1, method), x0, x1, wx, 2, method)
    valid = valid_y[:, :, None] & valid_x[:, None, :]
    mask = valid.reshape(valid.shape + (1,) * (maps.ndim - 3))
    return jnp.where(mask, out, jnp.asarray(fill, out.dtype)), valid


def _base_boxes(n: int) -> jax.Array:
    return jnp.broadcast_to(jnp.asarray(BASE_BOX, jnp.float32), (n, 4))


def to_view(
    maps: jax.Array,
    box: jax.Array,
    flip: jax.Array | None,
    out_size: Sequence[int],
    *,
    method: str = "bilinear",
    fill: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Base-frame maps [N, H, W, ...] -> (maps [N, h, w, ...] as the view shows them, valid
    [N, h, w]); see `resample`. With method='nearest', labels land where the augmentation puts
    them and padding gets `IGNORE_LABEL` (for integer maps)."""
    base = _base_boxes(maps.shape[0])
    return resample(maps, base, None, box, flip, out_size, method=method, fill=fill)


def to_base(
    maps: jax.Array,
    box: jax.Array,
    flip: jax.Array | None,
    base_size: Sequence[int],
    *,
    method: str = "bilinear",
    fill: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """View maps [N, h, w, ...] -> (maps [N, H, W, ...] in the base frame at base_size, valid
    [N, H, W]: False where the view does not show the base pixel); see `resample`."""
    base = _base_boxes(maps.shape[0])
    return resample(maps, box, flip, base, None, base_size, method=method, fill=fill)


def average_in_base(
    maps: Sequence[jax.Array],
    boxes: Sequence[jax.Array],
    flips: Sequence[jax.Array | None],
    base_size: Sequence[int],
) -> tuple[jax.Array, jax.Array]:
    """Fuses soft maps of several views in the base frame (DA-SAC's multi-view pseudo labels).

    maps: one [N, h_v, w_v, C] float map per view, with its box [N, 4] and flip [N].
    Returns (mean [N, H, W, C] over the views covering each base pixel, 0 where none does;
    count [N, H, W] int32 of those views).
    """
    total, count = 0.0, 0
    for view_maps, box, flip in zip(maps, boxes, flips, strict=True):
        based, valid = to_base(view_maps, box, flip, base_size)
        total = total + based  # `to_base` fills uncovered pixels with 0.
        count = count + valid.astype(jnp.int32)
    mean = total / jnp.maximum(count, 1)[..., None]
    return mean, count


def _strong_points(matrix, frames, cutout, flip, height, width):
    """Sample points of a strong view's pixel centres in the flipped-back weak view.

    Per example: matrix [6], frames [K, 6], cutout [4], flip []. Returns (qy, qx) [h, w] in
    weak pixel units (0..n spans the axis) and valid [h, w]. The float32 arithmetic is the
    one `randaugment.warp_nearest` uses, so both pick the same pixels.
    """
    y = ((jnp.arange(height, dtype=jnp.float32) + 0.5) / height)[:, None]
    x = ((jnp.arange(width, dtype=jnp.float32) + 0.5) / width)[None, :]
    valid = jnp.ones((height, width), bool)
    for k in range(frames.shape[0]):
        m = frames[k]
        fx, fy = m[0] * x + m[1] * y + m[2], m[3] * x + m[4] * y + m[5]
        valid &= (fx >= 0) & (fx < 1) & (fy >= 0) & (fy < 1)
    xs = matrix[0] * x + matrix[1] * y + matrix[2]
    ys = matrix[3] * x + matrix[4] * y + matrix[5]
    xs = jnp.where(flip, 1.0 - xs, xs)
    qx, qy = xs * width, ys * height
    valid &= (qx >= 0) & (qx < width) & (qy >= 0) & (qy < height)
    valid &= ~((y >= cutout[0]) & (y < cutout[2]) & (x >= cutout[1]) & (x < cutout[3]))
    return qy, qx, valid


def _sample_strong(one_map, matrix, frames, cutout, flip, method):
    """One weak map [h, w, ...] -> (strong map [h, w, ...] unfilled, valid [h, w])."""
    height, width = one_map.shape[:2]
    qy, qx, valid = _strong_points(matrix, frames, cutout, flip, height, width)
    if method == "nearest":
        iy = jnp.clip(jnp.floor(qy), 0, height - 1).astype(jnp.int32)
        ix = jnp.clip(jnp.floor(qx), 0, width - 1).astype(jnp.int32)
        return one_map[iy, ix], valid
    # Bilinear between pixel centres, edges clamped (as `resample` and Pillow).
    py = jnp.clip(qy - 0.5, 0, height - 1)
    px = jnp.clip(qx - 0.5, 0, width - 1)
    y0, x0 = jnp.floor(py).astype(jnp.int32), jnp.floor(px).astype(jnp.int32)
    y1, x1 = jnp.minimum(y0 + 1, height - 1), jnp.minimum(x0 + 1, width - 1)
    extra = (1,) * (one_map.ndim - 2)
    wy = (py - y0).reshape(py.shape + extra).astype(one_map.dtype)
    wx = (px - x0).reshape(px.shape + extra).astype(one_map.dtype)
    top = one_map[y0, x0] * (1 - wx) + one_map[y0, x1] * wx
    bottom = one_map[y1, x0] * (1 - wx) + one_map[y1, x1] * wx
    return top * (1 - wy) + bottom * wy, valid


def to_strong(
    maps: jax.Array,
    flip: jax.Array,
    matrix: jax.Array,
    cutout: jax.Array,
    *,
    fill: float | None = None,
    method: str = "nearest",
    frames: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Weak-view maps -> ProDA's strong view (`jaxda.data.randaugment`), at any resolution.

    The strong image was made as flip -> affine ops -> cutout, so each strong pixel centre is
    taken back through the cutout (`fill` inside), the composed affine `matrix` and the flip
    to a point of the weak view, which is sampled there. Everything is in normalised
    coordinates, so maps at 1/4 of the image's resolution work as well as full-size ones.

    Args:
      maps: [N, h, w] or [N, h, w, C] maps of the weak view (labels, soft maps, features).
      flip: [N] bool, matrix: [N, 6] float32, cutout: [N, 4] float32 (y0, x0, y1, x1): the
        strong view's `flip`, `matrix`, `cutout`.
      fill: value of strong pixels out of the weak frame or in the cutout; None:
        `IGNORE_LABEL` for integer maps, 0 otherwise.
      method: 'nearest' (labels; the same pixels as the strong label of `rand_augment_mc`) or
        'bilinear' (floating maps only).
      frames: [N, K, 6] the strong view's `frames`; with them a pixel is also out of frame when
        an intermediate op had moved it out (a grey band in the image). None: `matrix` only.

    Returns:
      (maps [N, h, w, ...] in the strong view, valid [N, h, w] bool: False where `fill`ed).
    """
    maps, fill = _checked(maps, method, fill)
    matrix = jnp.asarray(matrix, jnp.float32)
    if frames is None:
        frames = matrix[:, None]
    sample = jax.vmap(lambda m, a, f, c, fl: _sample_strong(m, a, f, c, fl, method))
    out, valid = sample(
        maps, matrix, jnp.asarray(frames, jnp.float32), jnp.asarray(cutout, jnp.float32), flip
    )
    mask = valid.reshape(valid.shape + (1,) * (maps.ndim - 3))
    return jnp.where(mask, out, jnp.asarray(fill, out.dtype)), valid
