"""Layers against independent NumPy re-implementations of the PyTorch semantics."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxda.models import deeplab_v2, layers


def _numpy_resize_align_corners(x, out_h, out_w):
    """Loop transcription of PyTorch upsample_bilinear2d with align_corners=True."""
    n, in_h, in_w, c = x.shape
    out = np.zeros((n, out_h, out_w, c), np.float64)
    scale_h = (in_h - 1) / (out_h - 1) if out_h > 1 else 0.0
    scale_w = (in_w - 1) / (out_w - 1) if out_w > 1 else 0.0
    for oy in range(out_h):
        sy = oy * scale_h
        y0 = int(sy)
        y1 = y0 + (1 if y0 < in_h - 1 else 0)
        ly = sy - y0
        for ox in range(out_w):
            sx = ox * scale_w
            x0 = int(sx)
            x1 = x0 + (1 if x0 < in_w - 1 else 0)
            lx = sx - x0
            out[:, oy, ox] = (1 - ly) * ((1 - lx) * x[:, y0, x0] + lx * x[:, y0, x1]) + ly * (
                (1 - lx) * x[:, y1, x0] + lx * x[:, y1, x1]
            )
    return out


@pytest.mark.parametrize(
    ("in_hw", "out_hw"),
    [((9, 17), (64, 128)), ((5, 7), (33, 65)), ((4, 6), (4, 6)), ((6, 9), (3, 4))],
)
def test_resize_matches_pytorch_align_corners(in_hw, out_hw):
    x = np.random.default_rng(0).normal(size=(2, *in_hw, 3)).astype(np.float32)
    got = np.asarray(layers.resize_bilinear_align_corners(jnp.asarray(x), out_hw))
    np.testing.assert_allclose(got, _numpy_resize_align_corners(x, *out_hw), rtol=1e-5, atol=1e-5)


def test_resize_keeps_corners_exactly():
    x = np.random.default_rng(1).normal(size=(1, 5, 9, 2)).astype(np.float32)
    got = np.asarray(layers.resize_bilinear_align_corners(jnp.asarray(x), (17, 33)))
    for (gy, gx), (sy, sx) in zip(
        [(0, 0), (0, -1), (-1, 0), (-1, -1)], [(0, 0), (0, -1), (-1, 0), (-1, -1)], strict=True
    ):
        np.testing.assert_allclose(got[0, gy, gx], x[0, sy, sx], rtol=1e-6)


def _numpy_max_pool_ceil(x, k, s, p):
    """PyTorch MaxPool2d(k, s, p, ceil_mode=True) by its documented output-size rule."""
    n, h, w, c = x.shape

    def out_size(size):
        out = int(np.ceil((size + 2 * p - k) / s)) + 1
        if (out - 1) * s >= size + p:
            out -= 1
        return out

    oh, ow = out_size(h), out_size(w)
    out = np.full((n, oh, ow, c), -np.inf)
    for i in range(oh):
        for j in range(ow):
            y0, x0 = i * s - p, j * s - p
            ys = slice(max(y0, 0), min(y0 + k, h))
            xs = slice(max(x0, 0), min(x0 + k, w))
            out[:, i, j] = x[:, ys, xs].max(axis=(1, 2))
    return out


@pytest.mark.parametrize("size", [(8, 8), (9, 13), (32, 64), (33, 65), (2, 3)])
def test_max_pool_ceil_matches_pytorch(size):
    x = np.random.default_rng(2).normal(size=(1, *size, 2)).astype(np.float32)
    got = np.asarray(layers.max_pool_ceil(jnp.asarray(x), 3, 2, 1))
    np.testing.assert_array_equal(got, _numpy_max_pool_ceil(x, 3, 2, 1))


def _torch_conv_out(n, k, s, p, d=1):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def _pytorch_deeplab_grid(n):
    """conv1 7x7/s2/p3 -> ceil-mode maxpool 3/s2/p1 -> layer2's 1x1/s2/p0 conv."""
    n = _torch_conv_out(n, 7, 2, 3)
    pooled = int(np.ceil((n + 2 - 3) / 2)) + 1
    if (pooled - 1) * 2 >= n + 1:
        pooled -= 1
    return _torch_conv_out(pooled, 1, 2, 0)


def test_output_size_matches_pytorch_arithmetic():
    for n in [*range(17, 140), 512, 720, 1024, 1280, 2048]:
        assert deeplab_v2.output_size(n) == _pytorch_deeplab_grid(n), n
    assert (deeplab_v2.output_size(512), deeplab_v2.output_size(1024)) == (65, 129)
    assert (deeplab_v2.output_size(720), deeplab_v2.output_size(1280)) == (91, 161)


def test_is_batch_norm_param():
    assert layers.is_batch_norm_param(("backbone", "layer1_0", "bn1", "scale"))
    assert layers.is_batch_norm_param(("backbone", "layer1_0", "bn_downsample", "bias"))
    assert not layers.is_batch_norm_param(("backbone", "layer1_0", "conv1", "kernel"))
    assert not layers.is_batch_norm_param(("head_main", "branch0", "bias"))


@pytest.mark.parametrize(
    ("in_hw", "out_hw"), [((9, 17), (36, 68)), ((5, 7), (33, 65)), ((16, 24), (7, 9))]
)
def test_half_pixel_resize_matches_torch_interpolate(in_hw, out_hw):
    """`resize_bilinear` against PyTorch itself: F.interpolate(bilinear, align_corners=False),
    upsampling and (non-antialiased) downsampling."""
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(2).normal(size=(2, *in_hw, 3)).astype(np.float32)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(x).permute(0, 3, 1, 2), size=out_hw, mode="bilinear", align_corners=False
    )
    got = np.asarray(layers.resize_bilinear(jnp.asarray(x), out_hw))
    np.testing.assert_allclose(got, expected.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-5)
