"""Moving per-pixel maps between augmented views of one example (pure jax.numpy, jit-able).

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
    if method not in ("bilinear", "nearest"):
        raise ValueError(f"method must be 'bilinear' or 'nearest', got {method!r}")
    maps = jnp.asarray(maps)
    integer = not jnp.issubdtype(maps.dtype, jnp.inexact)
    if method == "bilinear" and integer:
        raise ValueError(f"bilinear resampling of {maps.dtype} maps; use method='nearest'")
    if fill is None:
        fill = IGNORE_LABEL if integer else 0
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
