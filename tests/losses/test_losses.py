"""Losses against NumPy implementations of the formulas in methods.md."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxda.losses import adversarial, segmentation


def _numpy_ce(logits, labels, ignore=255):
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    valid = labels != ignore
    if not valid.any():
        return 0.0
    picked = np.take_along_axis(log_probs, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    return float(-picked[valid].mean())


def test_cross_entropy_ignores_255():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 7, 9, 5)).astype(np.float32) * 3
    labels = rng.integers(0, 5, size=(2, 7, 9))
    labels[rng.random(labels.shape) < 0.3] = 255
    got = float(segmentation.cross_entropy(jnp.asarray(logits), jnp.asarray(labels, jnp.uint8)))
    assert got == pytest.approx(_numpy_ce(logits, labels), rel=1e-5)
    # Changing logits at ignored pixels changes nothing.
    logits2 = np.where((labels == 255)[..., None], 100.0, logits).astype(np.float32)
    got2 = float(segmentation.cross_entropy(jnp.asarray(logits2), jnp.asarray(labels)))
    assert got2 == pytest.approx(got, rel=1e-6)


def test_cross_entropy_all_ignored_is_zero():
    logits = jnp.ones((1, 3, 3, 4))
    labels = jnp.full((1, 3, 3), 255, jnp.int32)
    assert float(segmentation.cross_entropy(logits, labels)) == 0.0


@pytest.mark.parametrize("target", [0.0, 1.0])
def test_gan_losses_match_numpy(target):
    x = np.random.default_rng(1).normal(size=(2, 4, 6, 1)).astype(np.float32) * 4
    sigmoid = 1 / (1 + np.exp(-x.astype(np.float64)))
    bce = -np.mean(target * np.log(sigmoid) + (1 - target) * np.log(1 - sigmoid))
    assert float(adversarial.gan_loss("bce", jnp.asarray(x), target)) == pytest.approx(bce, 1e-5)
    ls = np.mean((x.astype(np.float64) - target) ** 2)
    assert float(adversarial.gan_loss("ls", jnp.asarray(x), target)) == pytest.approx(ls, 1e-5)


def test_bce_is_stable_for_large_logits():
    x = jnp.array([[-200.0, 200.0]])
    assert float(adversarial.bce_with_logits(x, 1.0)) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="Unknown GAN loss"):
        adversarial.gan_loss("wgan", x, 1.0)
