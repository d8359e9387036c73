"""RobustNet instance-whitening pieces against independent NumPy references.

The references are written here in float64 (loops over images and plain NumPy); the exact
1-D k-means is checked against an exhaustive search over contiguous partitions and, where
installed, against the `kmeans1d` package that RobustNet uses.
"""

import itertools

import jax
import numpy as np
import pytest

from jaxda.losses import whitening as wt

_cov = jax.jit(wt.covariance)
_loss = jax.jit(wt.whitening_loss)
_std = jax.jit(wt.instance_standardize)
_accumulate = jax.jit(wt.accumulate_cov_stats)


def _np_std(x):
    x = np.asarray(x, np.float64)
    out = np.empty_like(x)
    for b, c in itertools.product(range(x.shape[0]), range(x.shape[3])):
        v = x[b, :, :, c]
        out[b, :, :, c] = (v - v.mean()) / np.sqrt(((v - v.mean()) ** 2).mean() + 1e-5)
    return out


def _np_cov(f):
    f = np.asarray(f, np.float64)
    b, h, w, c = f.shape
    out = np.empty((b, c, c))
    for i in range(b):
        m = f[i].reshape(h * w, c).T  # [C, HW]
        out[i] = m @ m.T / (h * w - 1) + 1e-5 * np.eye(c)
    return out


def _np_loss(f, mask, margin, num_remove):
    per_image = [max((np.abs(cov * mask).sum() - margin) / num_remove, 0.0) for cov in _np_cov(f)]
    return sum(per_image) / len(per_image), per_image


def _features(rng, b, h=6, w=5, c=7, shared=0.0):
    """Standardised features; `shared` mixes a common signal in (larger covariances)."""
    x = rng.normal(size=(b, h, w, c)) + shared * rng.normal(size=(b, h, w, 1))
    return np.asarray(_std(x.astype(np.float32)))


def test_instance_standardize_matches_numpy():
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(3, 5, 4, 6)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(_std(x)), _np_std(x), atol=1e-5)


def test_instance_standardize_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).normal(-1.0, 0.5, size=(2, 7, 3, 5)).astype(np.float32)
    ref = torch.nn.functional.instance_norm(torch.from_numpy(x).permute(0, 3, 1, 2), eps=1e-5)
    np.testing.assert_allclose(np.asarray(_std(x)), ref.permute(0, 2, 3, 1).numpy(), atol=1e-5)


@pytest.mark.parametrize("b", [1, 2, 5])
def test_covariance_matches_numpy(b):
    f = _features(np.random.default_rng(b), b, shared=0.5)
    np.testing.assert_allclose(np.asarray(_cov(f)), _np_cov(f), atol=1e-5)


@pytest.mark.parametrize("b", [1, 3, 6])
def test_iw_and_irw_losses_match_numpy(b):
    c = 7
    f = _features(np.random.default_rng(10 + b), b, c=c, shared=0.7)
    mask, margin, num_remove = wt.iw_params(c)
    assert (margin, num_remove) == (0.0, 21.0)
    np.testing.assert_array_equal(mask, np.triu(np.ones((c, c)), 1))
    np.testing.assert_allclose(
        _loss(f, mask, margin, num_remove), _np_loss(f, mask, 0, 21)[0], rtol=1e-5
    )
    mask, margin, num_remove = wt.iw_params(c, relax_denom=4.0)
    assert (margin, num_remove) == (5.0, 21.0)  # 21 // 4
    np.testing.assert_allclose(
        _loss(f, mask, margin, num_remove), _np_loss(f, mask, 5, 21)[0], rtol=1e-5
    )


def test_irw_margin_floor_division():
    assert wt.iw_params(64, 2.0)[1:] == (1008.0, 2016.0)
    assert wt.iw_params(64, 32.0)[1:] == (63.0, 2016.0)
    assert wt.iw_params(8, 3.0)[1:] == (9.0, 28.0)


def test_margin_clamps_some_images_to_zero():
    rng = np.random.default_rng(3)
    # Images with increasingly strong shared signal: increasing off-diagonal sums.
    f = np.concatenate([_features(rng, 1, shared=s) for s in (0.0, 0.3, 1.0, 2.0)])
    mask = wt.upper_mask(f.shape[-1])
    sums = [np.abs(cov * mask).sum() for cov in _np_cov(f)]
    margin = float(np.median(sums))
    ref, per_image = _np_loss(f, mask, margin, 21.0)
    assert 0 < per_image.count(0.0) < len(per_image)
    np.testing.assert_allclose(_loss(f, mask, margin, 21.0), ref, rtol=1e-5)


@pytest.mark.parametrize("b", [2, 4])
def test_isw_loss_matches_numpy(b):
    c = 7
    rng = np.random.default_rng(20 + b)
    f = _features(rng, b, c=c, shared=0.5)
    mask = (np.triu(rng.random((c, c)), 1) > 0.6).astype(np.float32)
    m, margin, num_remove = wt.isw_params(mask)
    assert margin == 0.0 and num_remove == mask.sum() > 0
    np.testing.assert_allclose(
        _loss(f, m, margin, num_remove), _np_loss(f, mask, 0, num_remove)[0], rtol=1e-5
    )


def test_empty_isw_mask_gives_zero_loss():
    f = _features(np.random.default_rng(4), 2)
    assert float(_loss(f, *wt.isw_params(np.zeros((7, 7))))) == 0.0


def test_covariance_variance_and_accumulator():
    rng = np.random.default_rng(5)
    c = 6
    batches = [_features(rng, 4, c=c, shared=0.3) for _ in range(3)]
    upper = np.triu(np.ones((c, c)), 1)
    refs = [np.var(_np_cov(f) * upper, axis=0, ddof=1) for f in batches]
    np.testing.assert_allclose(wt.covariance_variance(batches[0]), refs[0], rtol=1e-4, atol=1e-9)
    stats = wt.init_cov_stats(c)
    for f in batches:
        stats = _accumulate(stats, f)
    assert int(stats.count) == 3 and stats.var_sum.dtype == np.float32
    np.testing.assert_allclose(wt.mean_variance(stats), np.mean(refs, axis=0), rtol=1e-4, atol=1e-9)
    with pytest.raises(ValueError):
        wt.mean_variance(wt.init_cov_stats(c))


def _best_partitions(x, k):
    """Costs of every partition of sorted x into k non-empty contiguous runs: (cost, starts)."""
    n = x.size
    out = []
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        cost = sum(((x[a:z] - x[a:z].mean()) ** 2).sum() for a, z in itertools.pairwise(bounds))
        out.append((cost, bounds))
    return sorted(out)


def _cost(x, labels):
    return sum(((x[labels == c] - x[labels == c].mean()) ** 2).sum() for c in np.unique(labels))


@pytest.mark.parametrize("k", [2, 3, 4])
def test_kmeans_1d_matches_exhaustive_search(k):
    rng = np.random.default_rng(k)
    unique_checked = 0
    for seed in range(60):
        n = int(rng.integers(k + 2, 31 if k < 4 else 19))
        x = rng.normal(size=n) if seed % 3 else rng.integers(0, 8, n).astype(np.float64)
        if np.unique(x).size < k:
            continue
        labels, centroids = wt.kmeans_1d(x, k)
        order = np.argsort(x, kind="stable")
        ranked = _best_partitions(x[order], k)
        best = ranked[0][0]
        np.testing.assert_allclose(_cost(x, labels), best, rtol=1e-9, atol=1e-12)
        assert np.all(np.diff(centroids) > 0)
        for c in range(k):
            np.testing.assert_allclose(centroids[c], x[labels == c].mean(), rtol=1e-12)
        if ranked[1][0] > best + 1e-9 * (1 + best):  # unique optimum: compare labels
            ref = np.empty(n, np.int64)
            for c, (a, z) in enumerate(itertools.pairwise(ranked[0][1])):
                ref[order[a:z]] = c
            np.testing.assert_array_equal(labels, ref)
            unique_checked += 1
    assert unique_checked > 20


@pytest.mark.parametrize(
    ("x", "k", "labels", "centroids"),
    [
        ([0, 1, 2, 3], 3, [0, 1, 2, 2], [0, 1, 2.5]),  # tie: the top cluster takes more
        ([3, 1, 0, 4], 3, [2, 1, 0, 2], [0, 1, 3.5]),
        ([0.0] * 5, 3, [2] * 5, [0, 0, 0]),  # fewer distinct values than k: low ones empty
        ([1, 1, 0, 0, 0], 3, [2, 2, 1, 1, 1], [0, 0, 1]),
        ([5, 2], 3, [1, 0], [2, 5]),  # k > n: n clusters
    ],
)
def test_kmeans_1d_ties_and_degenerate_inputs(x, k, labels, centroids):
    got_labels, got_centroids = wt.kmeans_1d(np.asarray(x, np.float64), k)
    np.testing.assert_array_equal(got_labels, labels)
    np.testing.assert_allclose(got_centroids, centroids)


def test_kmeans_1d_rejects_bad_input():
    for x, k in [([], 3), ([1.0, np.nan], 2), ([1.0], 0)]:
        with pytest.raises(ValueError):
            wt.kmeans_1d(np.asarray(x, np.float64), k)


def test_kmeans_1d_matches_kmeans1d_package():
    kmeans1d = pytest.importorskip("kmeans1d")
    rng = np.random.default_rng(7)
    inputs = [
        rng.normal(size=2000),
        rng.lognormal(size=1999),
        np.round(rng.normal(size=2001), 1),  # many duplicates
        np.abs(rng.normal(size=2000)) ** 3,
    ]
    # An ISW-like variance: 512 x 512, zero on and below the diagonal.
    var = np.abs(rng.standard_t(3, size=(512, 512))) * np.triu(np.ones((512, 512)), 1)
    inputs.append(var.astype(np.float32).ravel())
    for x in inputs:
        for k in (3, 5) if x.size < 10_000 else (3,):
            labels, centroids = wt.kmeans_1d(x, k)
            ref = kmeans1d.cluster(x, k)
            np.testing.assert_array_equal(labels, ref.clusters)
            np.testing.assert_allclose(centroids, ref.centroids, rtol=1e-10)


def test_select_sensitive_is_robustnets_top_n_rule():
    rng = np.random.default_rng(8)
    c = 32
    var = (rng.lognormal(size=(c, c)) * np.triu(np.ones((c, c)), 1)).astype(np.float32)
    mask = wt.select_sensitive(var)
    labels, _ = wt.kmeans_1d(var.ravel(), 3)
    num_sensitive = c * c - np.sum(labels == 0)  # RobustNet: top-n of the flat variance
    ref = np.zeros(c * c, np.float32)
    ref[np.argsort(-var.ravel(), kind="stable")[:num_sensitive]] = 1
    np.testing.assert_array_equal(mask.ravel(), ref)
    assert mask.dtype == np.float32 and 0 < mask.sum() < c * (c - 1) / 2
    assert not np.any(np.tril(mask))
    assert wt.select_sensitive(np.zeros((c, c))).sum() == 0


def _pair_batch(rng, pairs, b=4, hw=32, c=8):
    """[2B, hw, hw, C]: B photometric copies, then the B originals. Channel pair (i, j, rho)
    is correlated with coefficient rho in the photometric copies only; all other channels
    are the same noise in both copies."""
    original = rng.normal(size=(b, hw, hw, c))
    photometric = original.copy()
    for i, j, rho in pairs:
        photometric[..., j] = rho * original[..., i] + np.sqrt(1 - rho**2) * original[..., j]
    return _std(np.concatenate([photometric, original]).astype(np.float32))


def _trial_mask(rng, pairs, batches=2):
    stats = wt.init_cov_stats(8)
    for _ in range(batches):
        stats = _accumulate(stats, _pair_batch(rng, pairs))
    return wt.select_sensitive(wt.mean_variance(stats))


def _entries(mask):
    return sorted(zip(*np.nonzero(mask), strict=True))


def test_isw_mask_finds_style_sensitive_pairs_and_and_over_trials():
    rng = np.random.default_rng(9)
    first = _trial_mask(rng, [(1, 5, 0.9), (2, 6, -0.6)])
    assert _entries(first) == [(1, 5), (2, 6)]
    second = _trial_mask(rng, [(1, 5, 0.9), (3, 7, 0.6)])
    assert _entries(second) == [(1, 5), (3, 7)]
    mask = wt.and_masks(wt.and_masks(None, first), second)
    assert _entries(mask) == [(1, 5)] and mask.dtype == np.float32
    assert wt.isw_params(mask)[2] == 1.0
