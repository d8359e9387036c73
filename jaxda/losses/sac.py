"""DA-SAC (Araslanov & Roth, CVPR 2021) self-supervised loss pieces as pure functions.

Follows the official code (visinf/da-sac, `models/sac.py`) in channels-last JAX. The teacher
(a momentum copy of the network) sees T views of each target image: zoom crops and flips of
one *reference frame*. Its softmax maps are

1. averaged into the moving class prior (`update_class_prior`);
2. zeroed on padding, warped into the reference frame, averaged over the T views and warped
   back to every view (`fuse_views`, da-sac `_refine` with `_avg_pool`);
3. thresholded per view and class relative to the class's peak confidence, with the threshold
   lowered for rare classes (`pseudo_labels`);

and the student is trained with focal-weighted cross-entropy on the pseudo labels, scaled by
the teacher's confidence (`focal_weights`, `confidence_weighted_ce`). The source loss is
`cross_entropy_all_pixels`.

Shapes: maps [N, H, W, C] (N views; consecutive groups of T views belong to one image),
labels [N, H, W] integers (`IGNORE_LABEL` = ignore), pad [N, H, W] bool, prior [C],
affines [N, 2, 3] in PyTorch `F.affine_grid` convention (normalised coordinates in [-1, 1],
x first, align_corners=False). All maths runs in float32; sizes and modes are Python
constants, so every function is jit-able.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxda.data.labels import IGNORE_LABEL

MODES = ("pixel", "broadcast")


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def view_affines(box: jax.Array, flip: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Affine matrices between the reference frame and each view.

    Args:
      box: [N, 4] (y0, x0, y1, x1): the region of the reference frame the view shows, in
        normalised reference coordinates (0..1 spans the reference).
      flip: [N] bool: the view is the box resized to the view size, then mirrored.

    Returns:
      (affine, affine_inv), each [N, 2, 3] float32. `affine` maps reference coordinates to
      view coordinates, so `grid_sample(view_maps, affine, ...)` shows the view in the
      reference frame; `affine_inv` maps view coordinates to reference coordinates.
    """
    y0, x0, y1, x1 = jnp.unstack(_f32(box), axis=-1)
    f = jnp.where(jnp.asarray(flip), -1.0, 1.0).astype(jnp.float32)
    # In [-1, 1] units: box centre c and half-size h; reference r = c + h * (f * u_x, u_y).
    cx, cy = x0 + x1 - 1.0, y0 + y1 - 1.0
    hx, hy = x1 - x0, y1 - y0
    zero = jnp.zeros_like(cx)
    affine_inv = jnp.stack(
        [jnp.stack([f * hx, zero, cx], -1), jnp.stack([zero, hy, cy], -1)], axis=-2
    )
    # Inverse: u_x = f * (r_x - c_x) / h_x (as f = 1 / f), u_y = (r_y - c_y) / h_y.
    affine = jnp.stack(
        [jnp.stack([f / hx, zero, -f * cx / hx], -1), jnp.stack([zero, 1.0 / hy, -cy / hy], -1)],
        axis=-2,
    )
    return affine, affine_inv


def grid_sample(maps: jax.Array, affine: jax.Array, out_size: Sequence[int]) -> jax.Array:
    """PyTorch `F.grid_sample(maps, F.affine_grid(affine, (N, C, h, w)))` in channels-last.

    Bilinear, zeros padding, align_corners=False (both calls): output pixel (i, j) has
    normalised position (x, y) = ((2j + 1) / w - 1, (2i + 1) / h - 1), reads the input at
    `affine @ (x, y, 1)`, and corner taps outside the input contribute 0.

    Args:
      maps: [N, H, W, C] float.
      affine: [N, 2, 3] output -> input normalised coordinates.
      out_size: (h, w) Python ints.

    Returns:
      [N, h, w, C] float32.
    """
    maps = _f32(maps)
    a = _f32(affine)
    n, hi, wi, c = maps.shape
    ho, wo = out_size
    # Output pixel centres times the output size: small integers, hence exact. Expanding
    # ((g + 1) * size_in - 1) / 2 around them keeps the identity and the mirror exact.
    px = (2.0 * jnp.arange(wo, dtype=jnp.float32) + 1.0 - wo)[None, None, :]
    py = (2.0 * jnp.arange(ho, dtype=jnp.float32) + 1.0 - ho)[None, :, None]

    def source(row, size):
        m = a[:, row, :, None, None]
        return (
            m[:, 0] * px * (size / (2.0 * wo))
            + m[:, 1] * py * (size / (2.0 * ho))
            + m[:, 2] * (size / 2.0)
            + (size - 1) / 2.0
        )

    ix, iy = source(0, wi), source(1, hi)  # [N, h, w] input pixel coordinates
    x0, y0 = jnp.floor(ix), jnp.floor(iy)
    wx1, wy1 = ix - x0, iy - y0
    flat = maps.reshape(n, hi * wi, c)
    out = jnp.zeros((n, ho, wo, c), jnp.float32)
    for dy, wy in ((0, 1.0 - wy1), (1, wy1)):
        for dx, wx in ((0, 1.0 - wx1), (1, wx1)):
            yy, xx = y0 + dy, x0 + dx
            inside = (yy >= 0) & (yy < hi) & (xx >= 0) & (xx < wi)
            idx = jnp.clip(yy, 0, hi - 1).astype(jnp.int32) * wi
            idx = idx + jnp.clip(xx, 0, wi - 1).astype(jnp.int32)
            taps = jnp.take_along_axis(flat, idx.reshape(n, -1, 1), axis=1)
            weight = jnp.where(inside, wy * wx, 0.0)  # zeros padding
            out = out + taps.reshape(n, ho, wo, c) * weight[..., None]
    return out


def update_class_prior(
    prior: jax.Array,
    probs: jax.Array,
    beta: float,
    momentum: float,
    tolerance: float = 1e-8,
) -> jax.Array:
    """Moving class prior (da-sac `_update_running_conf`).

    The prior starts filled with `beta`; a class still exactly at `beta` that the batch
    predicts (mean probability > tolerance) first takes the batch mean, then every class
    moves by the momentum average. da-sac feeds the teacher's softmax before padding is zeroed.

    Args:
      prior: [C].
      probs: [N, H, W, C] teacher probabilities.

    Returns:
      The new prior [C].
    """
    prior = _f32(prior)
    probs_avg = jnp.mean(_f32(probs), axis=(0, 1, 2))
    fresh = (probs_avg > tolerance) & (prior == beta)
    prior = jnp.where(fresh, probs_avg, prior)
    return momentum * prior + (1.0 - momentum) * probs_avg


def fuse_views(
    probs: jax.Array,
    affine: jax.Array,
    affine_inv: jax.Array,
    pad: jax.Array,
    num_views: int,
    tolerance: float = 0.1,
) -> tuple[jax.Array, jax.Array]:
    """Multi-view teacher fusion (da-sac `_refine` with `_avg_pool`).

    Args:
      probs: [N, h, w, C] teacher probabilities; views n*T .. n*T + T - 1 share a reference.
      affine, affine_inv: [N, 2, 3] from `view_affines`.
      pad: [N, h, w] bool, padding pixels of each view (their probabilities are dropped).
      num_views: T, Python int dividing N.
      tolerance: reference pixels whose summed probability mass is not above it are dropped.

    Returns:
      (refined [N, h, w, C]: the views' average warped back to each view, 0 where no view
      covers it; count [N, h, w]: summed mass of the group in the reference frame, i.e. the
      number of views covering each reference pixel, fractional at edges).
    """
    n, h, w, c = probs.shape
    if n % num_views:
        raise ValueError(f"{n} views do not split into groups of num_views={num_views}")
    probs = _f32(probs) * (1.0 - _f32(pad))[..., None]
    aligned = grid_sample(probs, affine, (h, w))
    # da-sac weights with the *inverse* warp of ones (as published); ~1 almost everywhere.
    valid = grid_sample(jnp.ones((n, h, w, 1), jnp.float32), affine_inv, (h, w))
    total = jnp.sum((aligned * valid).reshape(-1, num_views, h, w, c), axis=1)
    count = jnp.sum(total, axis=-1)  # [G, h, w]
    mask = (count > tolerance).astype(jnp.float32)
    avg = total / jnp.maximum(count, 1e-3)[..., None]
    avg = jnp.repeat(avg, num_views, axis=0)
    mask = jnp.repeat(mask, num_views, axis=0)[..., None]
    refined = grid_sample(avg, affine_inv, (h, w)) * grid_sample(mask, affine_inv, (h, w))
    return refined, jnp.repeat(count, num_views, axis=0)


def pseudo_labels(
    refined: jax.Array,
    prior: jax.Array,
    pad: jax.Array,
    *,
    upper: float,
    lower: float,
    beta: float,
    discount: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Per-view, per-class adaptive thresholds (da-sac `_pseudo_labels_probs`).

    A pixel keeps its argmax class y if its confidence is above
    max(lower, upper * peak[n, y] * (1 - exp(-prior_y / beta))), peak[n, y] being the highest
    confidence of class y in view n (0 if absent); the discount lowers the threshold of rare
    classes. Padding pixels get `IGNORE_LABEL`.

    Args:
      refined: [N, h, w, C] fused teacher probabilities.
      prior: [C] moving class prior.
      pad: [N, h, w] bool.
      discount: Python bool, apply the rare-class discount.

    Returns:
      (labels [N, h, w] int32, conf [N, h, w]: max probability, not masked).
    """
    refined = _f32(refined)
    num_classes = refined.shape[-1]
    conf = jnp.max(refined, axis=-1)
    y = jnp.argmax(refined, axis=-1).astype(jnp.int32)  # first index on ties, as torch.max
    onehot = y[..., None] == jnp.arange(num_classes)
    peak = jnp.max(jnp.where(onehot, conf[..., None], 0.0), axis=(1, 2))  # [N, C]
    thr = peak * upper
    if discount:
        thr = thr * (1.0 - jnp.exp(-_f32(prior) / beta))
    thr = jnp.maximum(thr, lower)
    pixel_thr = jnp.take_along_axis(thr[:, None, None, :], y[..., None], axis=-1)[..., 0]
    keep = (conf > pixel_thr) & ~jnp.asarray(pad, bool)
    return jnp.where(keep, y, IGNORE_LABEL).astype(jnp.int32), conf


def focal_weights(prior: jax.Array, power: float) -> jax.Array:
    """Class weights [C] of da-sac's focal CE: (1 - max(prior, 0)) ** power."""
    return (1.0 - jnp.maximum(_f32(prior), 0.0)) ** power


def _nll(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(-log_softmax at the label [N, H, W], valid [N, H, W], safe labels)."""
    labels = jnp.asarray(labels).astype(jnp.int32)
    valid = labels != IGNORE_LABEL
    safe = jnp.where(valid, labels, 0)
    logp = jax.nn.log_softmax(_f32(logits), axis=-1)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    return nll, valid, safe


def confidence_weighted_ce(
    logits: jax.Array,
    labels: jax.Array,
    class_weights: jax.Array,
    conf: jax.Array,
    *,
    mode: str,
    group: int = 2,
) -> jax.Array:
    """Student loss on pseudo labels scaled by teacher confidence (da-sac `_focal_ce_conf`).

    Per pixel l = -class_weights[y] * log_softmax(logits)[y], 0 where y is ignored (as
    `F.cross_entropy(weight=..., ignore_index=255, reduction='none')`).

    mode 'pixel': mean of l * conf over all pixels.
    mode 'broadcast': the published code multiplies l [B, H, W] by conf [B, 1, H, W], which
      broadcasts to [B, B, H, W] (B = views per GPU): every view's loss is scaled by every
      view's confidence. Per chunk of `group` consecutive views that is the mean over pixels
      of mean_j l[j] * mean_i conf[i]; the chunks are then averaged (as DDP averages GPUs).

    Args:
      logits: [N, H, W, C] student logits.
      labels: [N, H, W] pseudo labels.
      class_weights: [C], e.g. `focal_weights(prior, 3)`.
      conf: [N, H, W] teacher confidence.
      mode: 'pixel' or 'broadcast' (Python str).
      group: views per GPU for 'broadcast' (Python int dividing N).

    Returns:
      Scalar loss.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    n, h, w = labels.shape
    if mode == "broadcast" and n % group:
        raise ValueError(f"{n} views do not split into chunks of group={group}")
    nll, valid, safe = _nll(logits, labels)
    loss = jnp.where(valid, _f32(class_weights)[safe] * nll, 0.0)
    conf = _f32(conf)
    if mode == "pixel":
        return jnp.mean(loss * conf)
    loss = jnp.mean(loss.reshape(-1, group, h, w), axis=1)
    conf = jnp.mean(conf.reshape(-1, group, h, w), axis=1)
    return jnp.mean(loss * conf)


def cross_entropy_all_pixels(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """da-sac's source CE: sum over labelled pixels of -log_softmax[y] / number of ALL pixels
    (`reduction='none'` then `.mean()`: ignored pixels count as 0).

    Args:
      logits: [N, H, W, C]; labels: [N, H, W] (`IGNORE_LABEL` skipped).
    """
    nll, valid, _ = _nll(logits, labels)
    return jnp.mean(jnp.where(valid, nll, 0.0))
