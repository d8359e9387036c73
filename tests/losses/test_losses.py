"""Losses against NumPy implementations of the formulas in docs/methods/."""

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


def _softmax_np(logits):
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_advent_entropy_matches_numpy():
    from jaxda.losses import entropy

    logits = np.random.default_rng(2).normal(size=(2, 5, 7, 19)) * 3
    p = _softmax_np(logits)
    n, h, w, c = p.shape
    # ADVENT's utils/func.py, transcribed to NHWC with NumPy.
    self_info = -p * np.log2(p + 1e-30) / np.log2(c)
    loss = -np.sum(p * np.log2(p + 1e-30)) / (n * h * w * np.log2(c))
    p32 = jnp.asarray(p, jnp.float32)
    np.testing.assert_allclose(entropy.weighted_self_information(p32), self_info, atol=1e-6)
    assert float(entropy.normalized_entropy_loss(p32)) == pytest.approx(loss, rel=1e-5)
    assert 0 < loss < 1


def test_tent_entropy_matches_numpy():
    from jaxda.losses import entropy

    logits = np.random.default_rng(3).normal(size=(2, 4, 6, 5)) * 2
    p = _softmax_np(logits)
    expected = np.mean(-np.sum(p * np.log(p), axis=-1))  # natural log, mean over N, H, W
    got = float(entropy.softmax_entropy(jnp.asarray(logits, jnp.float32)))
    assert got == pytest.approx(expected, rel=1e-5)


def test_max_square_matches_numpy():
    from jaxda.losses import maxsquare

    p = _softmax_np(np.random.default_rng(4).normal(size=(2, 5, 7, 19)) * 3)
    expected = -np.mean(p**2) / 2
    got = float(maxsquare.max_square(jnp.asarray(p, jnp.float32)))
    assert got == pytest.approx(expected, rel=1e-5)


def test_image_wise_max_square_matches_numpy():
    from jaxda.losses import maxsquare

    rng = np.random.default_rng(5)
    logits = rng.normal(size=(3, 6, 8, 5)) * 3
    logits[0, :, :, 2] += 6  # Image 0 mostly class 2: its pixels get small weights.
    p = _softmax_np(logits)
    n, h, w, c = p.shape
    weights = np.zeros((n, h, w))
    for i in range(n):  # The official loop: torch.histc over the argmax, per image.
        arg = p[i].argmax(-1)
        hist = np.array([(arg == k).sum() for k in range(c)], np.float64)
        w_c = 1 / np.maximum(hist**0.2 * hist.sum() ** 0.8, 1)
        weights[i] = w_c[arg]
    expected = -np.sum(p**2 * weights[..., None]) / (n * c)
    got = float(maxsquare.image_wise_max_square(jnp.asarray(p, jnp.float32), ratio=0.2))
    assert got == pytest.approx(expected, rel=1e-5)


def test_multi_level_guidance_labels():
    from jaxda.losses import maxsquare

    rng = np.random.default_rng(6)
    main = _softmax_np(rng.normal(size=(2, 6, 8, 4)) * 6)
    aux = _softmax_np(rng.normal(size=(2, 6, 8, 4)) * 6)
    fused = ((main + aux) / 2).argmax(-1)
    confident = (main.max(-1) > 0.95) | (aux.max(-1) > 0.95)
    expected = np.where(confident, fused, 255)
    got = maxsquare.multi_level_guidance_labels(jnp.asarray(main), jnp.asarray(aux), 0.95)
    np.testing.assert_array_equal(got, expected)
    assert 0 < confident.mean() < 1  # Both branches of the rule are exercised.
