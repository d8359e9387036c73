"""RobustNet (Choi et al., CVPR 2021) instance-whitening losses as pure functions.

RobustNet instance-normalises (no affine) some early backbone features and penalises the
off-diagonal entries of each image's channel covariance of those features:

- covariance: for one image with features F [C, HW] (not re-centred: the instance norm has
  already removed the mean), cov = F F^T / (HW - 1) + 1e-5 I  (`covariance`);
- loss of one layer: per image, max((sum |cov * M| - margin) / num_remove, 0), averaged over
  the batch (`whitening_loss`); the whitening loss is the mean over the whitened layers.
  IW: M = strict upper triangle, margin 0, num_remove = C(C-1)/2. IRW: the same M with
  margin = floor(C(C-1)/2 / relax_denom) and num_remove = C(C-1)/2 (`iw_params`).
  ISW: M = a mask of "style-sensitive" entries, margin 0, num_remove = sum(M) (`isw_params`).
- ISW mask (host side, NumPy): each batch of the statistics pass holds B photometrically
  transformed images followed by the same B originals; the variance over those 2B images
  (unbiased) of the strict-upper-triangle covariance is summed over the pass's batches and
  divided by their number (`CovStats`, `accumulate_cov_stats`, `mean_variance`). All C*C
  entries of that mean variance (the diagonal and lower triangle are 0) are clustered by
  exact 1-D k-means with k = 3 (`kmeans_1d`, which reproduces the `kmeans1d` package); the
  entries outside the lowest cluster are selected (`select_sensitive`). The pass is repeated
  (10 trials, new random photometric transforms) and each trial's mask is AND-ed with the
  previous one (`and_masks`).

Deliberate differences, all confined to degenerate inputs:
- RobustNet keeps the top-n entries (n = C*C - size of the lowest cluster). An optimal 1-D
  k-means never puts equal values in different clusters when the input has at least k
  distinct values, so those are exactly the entries above the lowest cluster's maximum,
  which is how the mask is computed here: no tie-break between equal variances is needed.
- With fewer than k distinct variances the `kmeans1d` package leaves the lowest clusters
  empty and RobustNet then selects all C*C entries, diagonal included; here the lowest
  non-empty cluster is the insensitive one (an all-zero variance selects nothing).
- An empty mask gives a zero loss, not RobustNet's 0/0 = NaN.

Features are channels-last [B, H, W, C]; the train-step functions are jit-able and compute
in float32 with einsum precision HIGHEST.
"""

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

EPS = 1e-5
_HIGHEST = jax.lax.Precision.HIGHEST


def instance_standardize(x: jax.Array, eps: float = EPS) -> jax.Array:
    """InstanceNorm2d(affine=False): [B, H, W, C] -> [B, H, W, C], biased variance over H*W."""
    x = jnp.asarray(x).astype(jnp.float32)
    mean = jnp.mean(x, axis=(1, 2), keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=(1, 2), keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def covariance(f: jax.Array) -> jax.Array:
    """Per-image channel covariance [B, C, C] of f [B, H, W, C] (not re-centred, + 1e-5 I)."""
    f = jnp.asarray(f).astype(jnp.float32)
    b, h, w, c = f.shape
    flat = f.reshape(b, h * w, c)
    cov = jnp.einsum("bnc,bnd->bcd", flat, flat, precision=_HIGHEST) / (h * w - 1)
    return cov + EPS * jnp.eye(c, dtype=jnp.float32)


def whitening_loss(
    f: jax.Array, mask: jax.Array, margin: float | jax.Array, num_remove_cov: float | jax.Array
) -> jax.Array:
    """Instance-whitening loss of one layer: scalar float32.

    Args:
      f: [B, H, W, C] instance-standardised features.
      mask: [C, C] entries of the covariance that are penalised (0/1).
      margin, num_remove_cov: scalars (see `iw_params`, `isw_params`).
    """
    cov = covariance(f)
    masked = jnp.sum(jnp.abs(cov * jnp.asarray(mask, jnp.float32)), axis=(1, 2)) - margin
    # num_remove_cov < 1 only for an empty mask, whose masked sum is 0: loss 0 instead of NaN.
    per_image = jnp.maximum(masked / jnp.maximum(jnp.asarray(num_remove_cov, jnp.float32), 1), 0)
    return jnp.mean(per_image)


def upper_mask(num_channels: int) -> np.ndarray:
    """[C, C] float32 strict upper triangle of ones."""
    return np.triu(np.ones((num_channels, num_channels), np.float32), k=1)


def iw_params(num_channels: int, relax_denom: float = 0.0) -> tuple[np.ndarray, float, float]:
    """(mask [C, C], margin, num_remove_cov) of IW (relax_denom 0) or IRW (relax_denom > 0)."""
    num_off = num_channels * (num_channels - 1) / 2
    # RobustNet: float tensor `//` float, i.e. Python's floor division of floats.
    margin = float(num_off // relax_denom) if relax_denom else 0.0
    return upper_mask(num_channels), margin, float(num_off)


def isw_params(mask: np.ndarray | jax.Array) -> tuple[np.ndarray, float, float]:
    """(mask [C, C] float32, margin 0, num_remove_cov = number of selected entries) of ISW."""
    mask = np.asarray(mask, np.float32)
    return mask, 0.0, float(mask.sum())


def covariance_variance(f_pairs: jax.Array) -> jax.Array:
    """[C, C] unbiased variance over the 2B images of f_pairs [2B, H, W, C] of their
    strict-upper-triangle covariance (0 on and below the diagonal)."""
    c = f_pairs.shape[-1]
    upper = covariance(f_pairs) * jnp.triu(jnp.ones((c, c), jnp.float32), k=1)
    return jnp.var(upper, axis=0, ddof=1)


@flax.struct.dataclass
class CovStats:
    """Running sum of `covariance_variance` over a statistics pass (checkpointable arrays).

    Attributes:
      var_sum: [C, C] float32 sum of the per-batch variances.
      count: [] int32 number of batches summed.
    """

    var_sum: jax.Array
    count: jax.Array


def init_cov_stats(num_channels: int) -> CovStats:
    """Empty statistics for a layer with C channels."""
    return CovStats(
        var_sum=jnp.zeros((num_channels, num_channels), jnp.float32),
        count=jnp.zeros((), jnp.int32),
    )


def accumulate_cov_stats(stats: CovStats, f_pairs: jax.Array) -> CovStats:
    """Add one pair batch [2B, H, W, C] ([photometric; original]) to the statistics."""
    return CovStats(stats.var_sum + covariance_variance(f_pairs), stats.count + 1)


def mean_variance(stats: CovStats) -> np.ndarray:
    """[C, C] float32 mean of the accumulated variances (host side)."""
    count = int(stats.count)
    if count == 0:
        raise ValueError("no batch was accumulated")
    return np.asarray(stats.var_sum, np.float32) / np.float32(count)


def _layer(prev: np.ndarray, m: int, cost) -> tuple[np.ndarray, np.ndarray]:
    """Best split for every row of layer m (m clusters over values 0..i, i >= m - 1).

    D_m(i) = min_j prev(j - 1) + cost(j, i) over j in [m - 1, i]; the leftmost minimiser is
    monotone in i, so rows are solved by divide and conquer, one vectorised pass per level.
    Returns (D_m [d], opt [d]).
    """
    d = prev.size
    best_cost = np.full(d, np.inf)
    opt = np.zeros(d, np.int64)
    lo, hi = np.array([m - 1]), np.array([d - 1])
    olo, ohi = lo.copy(), hi.copy()
    while lo.size:
        mid = (lo + hi) // 2
        length = np.minimum(ohi, mid) - olo + 1
        start = np.concatenate([[0], np.cumsum(length)[:-1]])
        total = int(length.sum())
        seg = np.repeat(np.arange(mid.size), length)
        j = np.arange(total) - start[seg] + olo[seg]
        vals = prev[j - 1] + cost(j, mid[seg])
        mins = np.minimum.reduceat(vals, start)
        first = np.minimum.reduceat(np.where(vals == mins[seg], np.arange(total), total), start)
        best = j[first]
        best_cost[mid], opt[mid] = mins, best
        left, right = lo < mid, mid < hi
        lo, hi = (
            np.concatenate([lo[left], mid[right] + 1]),
            np.concatenate([mid[left] - 1, hi[right]]),
        )
        olo, ohi = (
            np.concatenate([olo[left], best[right]]),
            np.concatenate([best[left], ohi[right]]),
        )
    return best_cost, opt


def _optimal_starts(v: np.ndarray, w: np.ndarray, k: int) -> np.ndarray:
    """First index of each of the k clusters of sorted distinct values v with weights w."""
    zero = np.zeros(1)
    s0, s1, s2 = (np.concatenate([zero, np.cumsum(a)]) for a in (w, w * v, w * v * v))

    def cost(j, i):  # within-cluster sum of squares of values j..i (inclusive)
        m, t = s0[i + 1] - s0[j], s1[i + 1] - s1[j]
        return s2[i + 1] - s2[j] - t * t / m

    d = v.size
    prev, opts = cost(np.zeros(d, np.int64), np.arange(d)), []
    for m in range(2, k):
        prev, opt = _layer(prev, m, cost)
        opts.append(opt)
    starts = np.zeros(k, np.int64)
    if k > 1:
        j = np.arange(k - 1, d)
        starts[k - 1] = j[np.argmin(prev[j - 1] + cost(j, d - 1))]
        for m in range(k - 1, 1, -1):
            starts[m - 1] = opts[m - 2][starts[m] - 1]
    return starts


def kmeans_1d(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact (least within-cluster sum of squares) 1-D k-means, like the `kmeans1d` package.

    Args:
      values: [n] finite numbers; k: number of clusters (at most n are used).

    Returns:
      labels [n] int64, cluster 0 holding the smallest values, and centroids [min(k, n)]
      float64. Equal values always share a cluster. Among equally good partitions, the
      highest cluster starts at the smallest value possible, then the next one, and so on
      (as `kmeans1d` resolves exact ties). With d < min(k, n) distinct values, each gets its
      own cluster numbered k - d .. k - 1 and the lower clusters are empty with centroid 0,
      as in `kmeans1d`.
    """
    x = np.asarray(values, np.float64).ravel()
    if x.size == 0 or k < 1 or not np.all(np.isfinite(x)):
        raise ValueError("kmeans_1d needs k >= 1 and a non-empty array of finite values")
    k = min(k, x.size)
    uniq, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    d = uniq.size
    if d <= k:
        centroids = np.zeros(k)
        centroids[k - d :] = uniq
        return inverse.astype(np.int64) + (k - d), centroids
    # Sums of squares are shift invariant: centring keeps the prefix sums accurate.
    starts = _optimal_starts(uniq - x.mean(), counts.astype(np.float64), k)
    labels = (np.searchsorted(starts, np.arange(d), side="right") - 1)[inverse].astype(np.int64)
    centroids = np.bincount(labels, weights=x, minlength=k) / np.bincount(labels, minlength=k)
    return labels, centroids


def select_sensitive(variance: np.ndarray, k: int = 3) -> np.ndarray:
    """[C, C] float32 mask of the entries of variance [C, C] above the lowest k-means cluster."""
    variance = np.asarray(variance)
    flat = variance.astype(np.float64).ravel()
    labels, _ = kmeans_1d(flat, k)
    threshold = flat[labels == labels.min()].max()
    return (flat > threshold).reshape(variance.shape).astype(np.float32)


def and_masks(previous: np.ndarray | None, new: np.ndarray) -> np.ndarray:
    """[C, C] float32 entries selected in both masks (`new` alone when previous is None)."""
    new = np.asarray(new) > 0
    if previous is not None:
        new &= np.asarray(previous) > 0
    return new.astype(np.float32)
