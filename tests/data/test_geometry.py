"""Moving maps between views: `geometry` reproduces what `augment` does to an example."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from jaxda.data import augment, geometry

BASE = (64, 96)


def _blocks(seed: int, shape=BASE, block=16) -> np.ndarray:
    """Label [H, W] uint8 of 16x16 blocks of random classes: boundaries every 16 pixels."""
    grid = (shape[0] // block, shape[1] // block)
    classes = np.random.default_rng(seed).integers(0, 5, grid)
    return np.kron(classes, np.ones((block, block), np.int64)).astype(np.uint8)


def _seed(position: int) -> tf.Tensor:
    return augment.example_seed(tf.constant(augment.stream_key((7, 0))), position)


def _smooth(n: int, shape=BASE, channels=2) -> np.ndarray:
    """[n, H, W, channels] float32 smooth waves (values in -1..1, wavelengths of 60+ pixels)."""
    y, x = np.meshgrid(*(np.arange(s, dtype=np.float32) + 0.5 for s in shape), indexing="ij")
    phases = np.random.default_rng(n).uniform(0, 2 * np.pi, (n, 1, 1, channels))
    rate = np.array([0.1, 0.06], np.float32)[:channels]
    waves = np.sin(y[..., None] * rate + x[..., None] * 0.7 * rate + phases)
    return waves.astype(np.float32)


def _to_view(label, out, **kwargs):
    """Base label [H, W] -> the view of the augmentation output `out` (nearest)."""
    return geometry.to_view(
        jnp.asarray(label)[None],
        jnp.asarray(out.box)[None],
        jnp.asarray(out.flip)[None],
        out.label.shape,
        method="nearest",
        **kwargs,
    )


@pytest.mark.parametrize(
    ("kwargs", "exact"),
    [
        ({"random_scale": (0.5, 2.0), "crop_size": (56, 80), "flip_prob": 0.5}, False),
        ({"random_scale": (0.4, 1.1), "crop_size": (37, 53), "flip_prob": 0.5}, False),
        # Crops longer (padded) along y and shorter along x; no resampling.
        ({"crop_size": (80, 56), "flip_prob": 0.5}, True),
        ({"crop_size": (40, 120), "flip_prob": 0.5, "color_jitter_strength": 0.3}, True),
    ],
)
def test_nearest_to_view_reproduces_the_augmented_label(kwargs, exact):
    equal, flips, padded = [], [], []
    for position in range(24):
        label = _blocks(position)
        image = tf.constant(np.repeat(label[..., None], 3, -1).astype(np.float32))
        out = augment.augment(image, tf.constant(label), _seed(position), base_size=BASE, **kwargs)
        view, valid = _to_view(label, out)
        view, valid, expected = np.asarray(view[0]), np.asarray(valid[0]), out.label.numpy()
        # Padding: same pixels, ignore label.
        np.testing.assert_array_equal(valid, out.valid.numpy())
        assert (view[~valid] == geometry.IGNORE_LABEL).all()
        equal.append((view == expected).mean())
        if exact:
            np.testing.assert_array_equal(view, expected)
        else:
            # A mismatch may only be nearest-neighbour rounding of a sample point that lies
            # (within float error) on a pixel edge: the augmented label is then the label of a
            # base pixel adjacent to the one `to_view` sampled.
            rows, cols = np.meshgrid(*map(np.arange, BASE), indexing="ij")
            index = np.stack([rows, cols], -1).astype(np.int32)
            sampled = np.asarray(_to_view(index, out, fill=0)[0][0])
            for y, x in zip(*np.nonzero(view != expected), strict=True):
                sy, sx = sampled[y, x]
                around = label[max(sy - 1, 0) : sy + 2, max(sx - 1, 0) : sx + 2]
                assert expected[y, x] in around
        flips.append(bool(out.flip))
        padded.append(not valid.all())
    equal = np.array(equal)
    print(f"{kwargs}: label agreement mean {equal.mean():.5f}, min {equal.min():.5f}")
    # Rounding ties cost whole rows or columns of a small view where a block edge crosses them.
    assert equal.mean() >= 0.985 and equal.min() >= 0.9
    assert 0 < sum(flips) < len(flips)
    assert any(padded)


def test_box_of_a_crop_and_photometric_ops_leave_it_alone():
    label = _blocks(0)
    image = tf.constant(np.repeat(label[..., None], 3, -1).astype(np.float32))
    kwargs = {"base_size": BASE, "random_scale": (0.5, 1.5), "crop_size": (48, 64)}
    for position in range(6):
        plain = augment.augment(image, tf.constant(label), _seed(position), **kwargs)
        jittered = augment.augment(
            image, tf.constant(label), _seed(position), blur_prob=1.0, color_jitter_strength=0.4,
            **kwargs,
        )  # fmt: skip
        np.testing.assert_array_equal(plain.box, jittered.box)
        # The box spans crop_size pixels of the scaled image: its size is crop / scaled size.
        factor = 0.5 + np.asarray(augment.uniforms(_seed(position)))[0]
        scaled = np.round(factor * np.array(BASE))
        box = plain.box.numpy()
        np.testing.assert_allclose(box[2:] - box[:2], np.array([48, 64]) / scaled, rtol=1e-5)
    out = augment.augment(image, tf.constant(label), _seed(0), base_size=BASE)
    np.testing.assert_array_equal(out.box, augment.BASE_BOX)
    assert not out.flip


def test_bilinear_matches_tf_resize_and_crop():
    maps = np.random.default_rng(0).normal(size=(3, 30, 40, 2)).astype(np.float32)
    base = jnp.broadcast_to(jnp.array(geometry.BASE_BOX), (3, 4))
    flip = jnp.array([False, True, False])
    for size in ((45, 52), (17, 23)):
        view, valid = geometry.to_view(maps, base, flip, size)
        expected = tf.image.resize(maps, size, method="bilinear").numpy()
        expected[1] = expected[1, :, ::-1]
        np.testing.assert_allclose(view, expected, atol=1e-5)
        assert np.asarray(valid).all()
    # A crop at whole pixels, at its own size: the pixels themselves. Beyond the base: fill.
    box = np.array([[4, 8, 24, 38], [-6, -10, 14, 20], [10, 15, 30, 45]]) / [30, 40, 30, 40]
    view, valid = geometry.to_view(maps, jnp.asarray(box), flip, (20, 30), fill=-7.0)
    view, valid = np.asarray(view), np.asarray(valid)
    # Box corners are rounded to float32: weights off by ~1e-6.
    np.testing.assert_allclose(view[0], maps[0, 4:24, 8:38], atol=1e-5, rtol=1e-5)
    # Flipped: the 10 padded columns on the left of the box end up on the right.
    np.testing.assert_allclose(view[1, 6:, :20], maps[1, :14, :20][:, ::-1], atol=1e-5, rtol=1e-5)
    assert valid[1].sum() == 14 * 20 and (view[1][~valid[1]] == -7).all()
    np.testing.assert_allclose(view[2, :, :25], maps[2, 10:30, 15:40], atol=1e-5, rtol=1e-5)
    assert valid[2].sum() == 20 * 25 and (view[2][~valid[2]] == -7).all()


def test_round_trips():
    maps = _smooth(6)
    # Zoom in and out, inside and partly outside the base frame (padding), flipped or not.
    box = [
        [0.1, 0.2, 0.6, 0.7],
        [0.37, 0.05, 0.93, 0.61],
        [-0.21, -0.13, 0.92, 0.99],
        [-0.6, -0.45, 1.3, 1.45],
        [0.2, 0.15, 0.45, 0.4],
        [0.0, 0.3, 0.8, 1.1],
    ]
    box = jnp.asarray(box, jnp.float32)
    flip = jnp.array([False, True] * 3)
    to_view = jax.jit(geometry.to_view, static_argnames=("out_size", "method", "fill"))
    to_base = jax.jit(geometry.to_base, static_argnames=("base_size", "method", "fill"))
    view, view_valid = to_view(maps, box, flip, (48, 72))
    back, valid = to_base(view, box, flip, BASE)
    back, valid = np.asarray(back), np.asarray(valid)
    # Base pixels whose centre lies in the box are exactly those covered.
    centres = [(np.arange(n) + 0.5) / n for n in BASE]
    for i in range(6):
        b = np.asarray(box[i])
        inside_y = (centres[0] >= b[0]) & (centres[0] < b[2])
        inside_x = (centres[1] >= b[1]) & (centres[1] < b[3])
        np.testing.assert_array_equal(valid[i], inside_y[:, None] & inside_x[None, :])
        assert (back[i][~valid[i]] == 0).all()
    # Covered pixels away from the view's edges (where bilinear sampling clamps) come back with
    # the error of resampling a smooth map twice.
    inner = np.zeros_like(valid)
    for i in range(6):
        ys, xs = np.nonzero(valid[i])
        inner[i, ys.min() + 2 : ys.max() - 1, xs.min() + 2 : xs.max() - 1] = True
    inner &= valid
    error = np.abs(back - maps)[inner]
    print(f"bilinear round trip on covered pixels: max {error.max():.4f}, mean {error.mean():.5f}")
    assert error.max() < 0.02 and error.mean() < 0.004
    assert inner.sum() > 0.5 * valid.sum()
    # The view's padding (outside the base) is invalid and zero.
    assert not np.asarray(view_valid).all()
    # Flip alone and a whole-pixel crop at its own size round trip exactly.
    same = jnp.broadcast_to(jnp.array(geometry.BASE_BOX), (6, 4))
    mirrored, _ = to_view(maps, same, flip, BASE)
    np.testing.assert_array_equal(mirrored[1], maps[1, :, ::-1])
    np.testing.assert_array_equal(to_base(mirrored, same, flip, BASE)[0], maps)
    labels = _blocks(3)[None].repeat(6, 0)
    crop = jnp.asarray(np.array([8, 16, 56, 80]) / np.array(BASE * 2), jnp.float32)[None]
    crop = jnp.broadcast_to(crop, (6, 4))
    cropped, _ = to_view(labels, crop, flip, (48, 64), method="nearest")
    np.testing.assert_array_equal(cropped[0], labels[0, 8:56, 16:80])
    np.testing.assert_array_equal(cropped[1], labels[1, 8:56, 16:80][:, ::-1])
    restored, covered = to_base(cropped, crop, flip, BASE, method="nearest")
    np.testing.assert_array_equal(restored, np.where(covered, labels, 255))
    assert np.asarray(covered).sum() == 6 * 48 * 64


def test_resample_between_views_and_average_in_base():
    maps = _smooth(4)
    boxes = [
        jnp.asarray([[0.0, 0.0, 0.75, 0.6]] * 4, jnp.float32),
        jnp.asarray([[0.25, 0.3, 1.25, 1.1]] * 4, jnp.float32),
    ]
    flips = [jnp.array([False, True, False, True]), jnp.array([True, True, False, False])]
    views = [geometry.to_view(maps, b, f, (96, 96))[0] for b, f in zip(boxes, flips, strict=True)]
    # View 0 -> view 1 directly equals view 0 -> base frame -> view 1, on what both show.
    direct, valid = geometry.resample(views[0], boxes[0], flips[0], boxes[1], flips[1], (96, 96))
    both = np.asarray(valid) & np.asarray(geometry.to_view(maps, boxes[1], flips[1], (96, 96))[1])
    assert both.mean() > 0.15  # The boxes overlap on 0.5 x 0.375 of view 1.
    np.testing.assert_allclose(np.asarray(direct)[both], np.asarray(views[1])[both], atol=0.02)
    mean, count = geometry.average_in_base(views, boxes, flips, BASE)
    count = np.asarray(count)
    assert set(np.unique(count)) == {0, 1, 2}
    assert (np.asarray(mean)[count == 0] == 0).all()
    # Away from the edges of the views and of the base frame, where bilinear samples clamp.
    padded = np.pad(count, ((0, 0), (1, 1), (1, 1)), constant_values=-1)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(1, 2))
    inner = (count > 0) & (windows.min((3, 4)) == windows.max((3, 4)))
    assert inner.sum() > 0.8 * (count > 0).sum()
    np.testing.assert_allclose(np.asarray(mean)[inner], maps[inner], atol=0.004)


def test_bilinear_rejects_integer_maps():
    with pytest.raises(ValueError, match="nearest"):
        geometry.to_view(jnp.zeros((1, 4, 4), jnp.uint8), jnp.zeros((1, 4)), None, (2, 2))
