"""DACS's strong augmentation (`jaxda/data/strong_augment.py`) against kornia's functional
ops on random images with fixed parameters (skipped without kornia: it is no dependency of
the library; `pip install kornia`), and against NumPy transcriptions of the kornia formulas
(always run)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxda.data import strong_augment as sa


def _images(seed=0, shape=(2, 9, 14, 3)):
    rng = np.random.default_rng(seed)
    images = rng.uniform(size=shape).astype(np.float32)
    images[0, 0, :3] = [0.5, 0.5, 0.5]  # grey pixels (zero saturation), and black
    images[0, 1, :3] = 0.0
    return images


def _torch(images):
    torch = pytest.importorskip("torch")
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def _back(tensor):
    return tensor.numpy().transpose(0, 2, 3, 1)


def test_kernel_sizes():
    # The largest odd integer <= ceil(0.1 L): 51 for 512 crops, 103 for 1024, 7 x 13 at 64x128.
    assert [sa.blur_kernel_size(n) for n in (512, 1024, 64, 128, 10, 20)] == [51, 103, 7, 13, 1, 1]


def test_colour_ops_match_numpy_transcriptions():
    images = _images()
    np.testing.assert_allclose(
        sa.adjust_brightness(images, 0.1), np.clip(images + 0.1, 0, 1), atol=1e-7
    )
    np.testing.assert_allclose(sa.adjust_contrast(images, 1.2), np.clip(images * 1.2, 0, 1))
    hsv = np.asarray(sa.rgb_to_hsv(images))
    np.testing.assert_allclose(sa.hsv_to_rgb(hsv), images, atol=2e-6)
    # Hue turns rotate the channels of a pure colour: red by 1/3 turn is green.
    red = np.zeros((1, 1, 1, 3), np.float32)
    red[..., 0] = 1.0
    np.testing.assert_allclose(sa.adjust_hue(red, 2 * math.pi / 3), [[[[0, 1, 0]]]], atol=1e-6)
    np.testing.assert_allclose(sa.adjust_hue(red, -2 * math.pi / 3), [[[[0, 0, 1]]]], atol=1e-6)
    # Saturation 0 makes each pixel its maximum channel (kornia's HSV, not a luma grey).
    grey = np.asarray(sa.adjust_saturation(images, 0.0))
    np.testing.assert_allclose(grey, np.repeat(images.max(-1, keepdims=True), 3, -1), atol=1e-6)


def test_blur_matches_numpy():
    images = _images(1, (2, 16, 24, 3))
    sigma = np.array([0.3, 1.1], np.float32)
    out = np.asarray(sa.gaussian_blur(jnp.asarray(images), jnp.asarray(sigma)))
    ky, kx = sa.blur_kernel_size(16), sa.blur_kernel_size(24)
    for b in range(2):
        taps = []
        for k in (ky, kx):
            x = np.arange(k) - k // 2
            g = np.exp(-(x**2) / (2 * np.float64(sigma[b]) ** 2))
            taps.append(g / g.sum())
        kernel = np.outer(*taps)
        padded = np.pad(images[b], ((ky // 2,) * 2, (kx // 2,) * 2, (0, 0)), mode="reflect")
        expected = np.zeros_like(images[b], np.float64)
        for i in range(ky):
            for j in range(kx):
                expected += kernel[i, j] * padded[i : i + 16, j : j + 24]
        np.testing.assert_allclose(out[b], expected, atol=1e-6)


@pytest.fixture(scope="module")
def kornia():
    return pytest.importorskip("kornia")


def test_colour_ops_match_kornia(kornia):
    images = _images()
    x = _torch(images)
    e = kornia.enhance
    pairs = [
        (sa.adjust_brightness(images, 0.15), e.adjust_brightness(x, 0.15)),
        (sa.adjust_brightness(images, -0.2), e.adjust_brightness(x, -0.2)),
        (sa.adjust_contrast(images, 1.25), e.adjust_contrast(x, 1.25)),
        (sa.adjust_contrast(images, 0.8), e.adjust_contrast(x, 0.8)),
        (sa.adjust_saturation(images, 1.2), e.adjust_saturation(x, 1.2)),
        (sa.adjust_saturation(images, 0.75), e.adjust_saturation(x, 0.75)),
        (sa.adjust_hue(images, 0.2 * 2 * math.pi), e.adjust_hue(x, 0.2 * 2 * math.pi)),
        (sa.adjust_hue(images, -0.25 * 2 * math.pi), e.adjust_hue(x, -0.25 * 2 * math.pi)),
        (sa.rgb_to_hsv(images), kornia.color.rgb_to_hsv(x)),
    ]
    for ours, theirs in pairs:
        np.testing.assert_allclose(np.asarray(ours), _back(theirs), atol=2e-6)


def test_jitter_in_a_given_order_matches_kornia(kornia):
    images = _images(2)
    x = _torch(images)
    params = sa.JitterParams(
        brightness=jnp.array([1.1, 0.85]),
        contrast=jnp.array([0.9, 1.2]),
        saturation=jnp.array([1.15, 0.8]),
        hue=jnp.array([-0.1, 0.18]),
        order=jnp.array([[3, 0, 2, 1], [1, 2, 0, 3]]),
    )
    ours = np.asarray(jax.vmap(sa.color_jitter)(jnp.asarray(images), params))
    e = kornia.enhance
    for b in range(2):
        y = x[b : b + 1]
        ops = [
            lambda t, b=b: e.adjust_brightness(t, float(params.brightness[b]) - 1.0),
            lambda t, b=b: e.adjust_contrast(t, float(params.contrast[b])),
            lambda t, b=b: e.adjust_saturation(t, float(params.saturation[b])),
            lambda t, b=b: e.adjust_hue(t, float(params.hue[b]) * 2 * math.pi),
        ]
        for op in np.asarray(params.order[b]):
            y = ops[op](y)
        np.testing.assert_allclose(ours[b], _back(y)[0], atol=5e-6)


def test_blur_matches_kornia(kornia):
    images = _images(3, (2, 20, 30, 3))
    x = _torch(images)
    sigma = np.array([0.4, 1.05], np.float32)
    ours = np.asarray(sa.gaussian_blur(jnp.asarray(images), jnp.asarray(sigma)))
    size = (sa.blur_kernel_size(20), sa.blur_kernel_size(30))
    for b in range(2):
        blur = kornia.filters.GaussianBlur2d(size, (float(sigma[b]),) * 2, border_type="reflect")
        np.testing.assert_allclose(ours[b], _back(blur(x[b : b + 1]))[0], atol=1e-6)


def test_draws_and_apply():
    """Factors in their ranges, orders permutations; on/off switches act on the batch."""
    params = sa.draw(jax.random.key(0), 64, strength=0.2, jitter_prob=0.8, blur_prob=0.5)
    for f in (params.jitter_params.brightness, params.jitter_params.saturation):
        assert float(f.min()) >= 0.8 and float(f.max()) <= 1.2
    assert float(jnp.abs(params.jitter_params.hue).max()) <= 0.2
    np.testing.assert_array_equal(np.sort(params.jitter_params.order, 1), [[0, 1, 2, 3]] * 64)
    assert float(params.sigma.min()) >= 0.15 and float(params.sigma.max()) <= 1.15
    images = jnp.asarray(_images(4, (64, 4, 4, 3)))
    apply = jax.jit(sa.apply)
    off = params._replace(jitter=jnp.asarray(False), blur=jnp.asarray(False))
    np.testing.assert_array_equal(apply(images, off), images)
    on = params._replace(jitter=jnp.asarray(True), blur=jnp.asarray(False))
    expected = jax.jit(jax.vmap(sa.color_jitter))(images, params.jitter_params)
    np.testing.assert_allclose(apply(images, on), expected, atol=2e-6)
    # Over many steps the switches fire with their probabilities.
    switches = jax.jit(
        jax.vmap(lambda k: sa.draw(k, 1, strength=0.2, jitter_prob=0.8, blur_prob=0.5)[:2])
    )(jax.random.split(jax.random.key(1), 2000))
    assert abs(float(jnp.mean(switches[0])) - 0.8) < 0.03
    assert abs(float(jnp.mean(switches[1])) - 0.5) < 0.04
