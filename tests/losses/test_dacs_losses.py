"""DACS's loss pieces (`jaxda/losses/dacs.py`) against NumPy: pseudo labels and their
confidence weight, DAFormer's pseudo-label crop, the pixel-weighted CE over all pixels, the
EMA momentum's warm-up."""

import numpy as np
import pytest

from jaxda.data.labels import IGNORE_LABEL
from jaxda.losses import dacs


def _probs(seed=0, shape=(3, 5, 7, 4)):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=shape) * rng.choice([1.0, 8.0], size=(*shape[:3], 1))
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("scope", ["batch", "image"])
def test_pseudo_labels_and_confidence_weight(scope):
    probs = _probs()
    labels, weights = dacs.pseudo_labels(probs, 0.968, scope=scope)
    np.testing.assert_array_equal(labels, probs.argmax(-1))
    confident = probs.max(-1) >= 0.968
    assert 0 < confident.mean() < 1
    if scope == "batch":  # Both official codes: one share over all target pixels of the batch.
        expected = np.full(probs.shape[:3], confident.mean())
    else:
        expected = np.broadcast_to(confident.mean((1, 2))[:, None, None], probs.shape[:3])
    np.testing.assert_allclose(weights, expected, rtol=1e-6)


def test_crop_weights_zeroes_exactly_the_top_and_bottom_rows():
    """DAFormer's `pseudo_weight[:, :top, :] = 0` and `[:, -bottom:, :] = 0` (each only when
    > 0); the confidence weight of the kept rows is the one computed over all pixels."""
    probs = _probs(shape=(2, 9, 5, 4))
    _, weights = dacs.pseudo_labels(probs, 0.968)
    q = np.mean(probs.max(-1) >= 0.968)
    got = np.asarray(dacs.crop_weights(weights, 2, 3))
    expected = np.full((2, 9, 5), q, np.float32)
    expected[:, :2] = 0
    expected[:, -3:] = 0
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(dacs.crop_weights(weights, 0, 4)[:, :5], weights[:, :5])
    np.testing.assert_array_equal(dacs.crop_weights(weights, 4, 0)[:, 4:], weights[:, 4:])
    assert dacs.crop_weights(weights, 0, 0) is weights  # Off: the weights themselves.
    np.testing.assert_array_equal(dacs.crop_weights(weights, 5, 5), 0.0)  # All rows.
    with pytest.raises(ValueError, match="bottom=-1"):
        dacs.crop_weights(weights, 0, -1)


def test_weighted_cross_entropy_averages_over_all_pixels():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 4, 5, 6)).astype(np.float32)
    labels = rng.integers(0, 6, size=(2, 4, 5))
    labels[0, 0] = IGNORE_LABEL
    weights = rng.uniform(size=(2, 4, 5)).astype(np.float32)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    valid = labels != IGNORE_LABEL
    nll = -np.take_along_axis(log_p, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    expected = np.sum(np.where(valid, nll * weights, 0)) / labels.size
    got = dacs.weighted_cross_entropy(logits, labels, weights)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_ema_momentum_warm_up():
    steps = np.arange(8)
    got = np.asarray(dacs.ema_momentum(steps, 0.7))
    np.testing.assert_allclose(got, np.minimum(1 - 1 / (steps + 1), 0.7), rtol=1e-6)
    assert got[0] == 0.0 and float(dacs.ema_momentum(10_000, 0.99)) == pytest.approx(0.99)
