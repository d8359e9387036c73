"""DA-SAC's groups of views (`group` streams): geometry, noise, determinism, config checks."""

import colorsys

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from configs import common
from jaxda.data import augment, geometry, input_pipeline, view_groups
from tests.conftest import tiny_config

BATCH = 8
CROP = (24, 40)
SEED = (5, 1)
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def _batches(config, start=0, n=1, stream="target"):
    reader = input_pipeline.open_reader(config.data[stream], config.data)
    it = input_pipeline.train_iterator(
        reader, config.data[stream], config.data, global_batch_size=BATCH, seed=SEED, start=start
    )
    return [_grouped(next(it)) for _ in range(n)]


def _grouped(batch: dict) -> dict:
    """The pipeline's view rows [BATCH x T, ...] (T consecutive rows per image, 'index'
    repeated per view) back as [BATCH, T, ...]."""
    if "group" not in batch:
        return batch
    index = batch["index"]
    views = len(index) // BATCH
    assert len(index) == BATCH * views
    np.testing.assert_array_equal(
        index.reshape(BATCH, views), np.repeat(index[::views, None], views, 1)
    )
    group = {k: v.reshape((BATCH, views, *v.shape[1:])) for k, v in batch["group"].items()}
    return {**batch, "group": group, "index": index[::views]}


def _batch(config, start=0):
    return _batches(config, start)[0]


def _config(data_dir, group=None, **stream):
    """Tiny target stream: a scaled-up (never padded) flipped crop as the reference."""
    config = tiny_config(data_dir=data_dir)
    target = config.data.target
    target.random_scale, target.crop_size, target.flip = (1.0, 1.5), CROP, True
    for key, value in stream.items():
        target[key] = value
    if group is not None:
        target.group = group
    return config


def _draws(position: int, t: int, size=CROP, **options) -> view_groups.Draws:
    """View t's draws of the example at stream `position`, as the pipeline seeds them."""
    key = tf.constant(augment.stream_key(SEED))
    seed = augment.view_seed(augment.example_seed(key, position), f"group/{t}")
    options = {**view_groups.GROUP_DEFAULTS, **options}
    return view_groups.draws(seed, t, tf.constant(size), options)


def _bilinear(image: np.ndarray, size) -> np.ndarray:
    """NumPy half-pixel bilinear resize (edges clamped) of [H, W, C]."""
    for axis, n_out in enumerate(size):
        n_in = image.shape[axis]
        p = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        i0 = np.floor(p).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        w = (p - i0).reshape([-1 if a == axis else 1 for a in range(image.ndim)])
        image = np.take(image, i0, axis) * (1 - w) + np.take(image, i1, axis) * w
    return image


def test_views_are_zoom_crops_of_the_reference(data_dir):
    reference = _batch(_config(data_dir))  # The same stream without `group`.
    group = _batch(_config(data_dir, {"size": 4}))["group"]
    h, w = CROP
    assert group["image"].shape == group["clean"].shape == (BATCH, 4, h, w, 3)
    assert group["label"].shape == group["valid"].shape == (BATCH, 4, h, w)
    assert group["box"].shape == (BATCH, 4, 4) and group["flip"].shape == (BATCH, 4)
    assert group["label"].dtype == np.uint8 and group["valid"].all()
    np.testing.assert_array_equal(group["box"][:, 0], np.tile(augment.BASE_BOX, (BATCH, 1)))
    agreement, noised = [], 0
    for b in range(BATCH):
        ref_image, ref_label = reference["image"][b], reference["label"][b]
        for t in range(4):
            box, flip = group["box"][b, t], group["flip"][b, t]
            label, valid = geometry.to_view(
                ref_label[None], box[None], flip[None], CROP, method="nearest"
            )
            assert np.asarray(valid).all()
            # PIL's nearest sums the step cumulatively in float64, geometry.py multiplies in
            # float32: on exact ties (e.g. a window of 2/3 of the side) they may round apart.
            agreement.append(np.mean(np.asarray(label)[0] == group["label"][b, t]))
            draw = _draws(b, t)
            y0, x0, nh, nw = np.asarray(draw.crop)
            np.testing.assert_allclose(box, [y0 / h, x0 / w, (y0 + nh) / h, (x0 + nw) / w])
            assert bool(draw.flip) == flip
            if t == 0:
                expected = ref_image
                assert float(draw.zoom) == 1.0 and (nh, nw) == CROP
            else:
                s = float(draw.zoom)
                assert 0.5 <= s < 1.0 and (nh, nw) == (int(s * h), int(s * w))
                assert 0 <= y0 <= h - nh and 0 <= x0 <= w - nw
                # Bilinear resizing commutes with the (affine) normalisation.
                window = ref_image[y0 : y0 + nh, x0 : x0 + nw].astype(np.float64)
                expected = _bilinear(window, CROP)
            expected = expected[:, ::-1] if flip else expected
            np.testing.assert_allclose(group["clean"][b, t], expected, atol=2e-3)
            # The student's input is blurred and maybe jittered or grey (radius 0.1 blurs
            # nothing in float32: its kernel's side taps are e**-50).
            noisy = bool(draw.jitter or draw.grey or draw.radius > 0.5)
            diff = np.abs(group["image"][b, t] - group["clean"][b, t]).mean()
            assert diff > 0.05 if noisy else diff < 0.5, (diff, draw)
            noised += noisy
    print(f"view labels vs the reference through box/flip: min {min(agreement):.4f}")
    assert min(agreement) >= 0.97 and np.mean(agreement) >= 0.99
    assert noised >= BATCH
    flips = group["flip"]
    assert 0 < flips.sum() < flips.size and len({tuple(b) for b in group["box"][:, 1]}) == BATCH


@pytest.mark.slow  # ~9 s; by default: test_views' deterministic, resumable views.
def test_groups_are_deterministic_resumable_and_noise_free_when_off(data_dir):
    config = _config(data_dir, {"size": 3})
    first, second = (batch["group"] for batch in _batches(config, 0, 2))
    resumed = _batch(config, start=BATCH)["group"]
    for key in first:
        np.testing.assert_array_equal(resumed[key], second[key])
    # Other positions, other draws.
    assert not np.array_equal(second["box"], first["box"])
    off = {"size": 3, "blur_radius": (), "jitter_prob": 0.0, "greyscale_prob": 0.0}
    clean = _batch(_config(data_dir, off))["group"]
    np.testing.assert_array_equal(clean["image"], clean["clean"])
    # Switching noise off moves no view.
    for key in ("clean", "label", "box", "flip"):
        np.testing.assert_array_equal(clean[key], first[key])


def test_a_stream_with_its_own_statistics_normalises_with_them(data_dir):
    config = tiny_config(data_dir=data_dir)
    default = _batch(config)["image"]
    config.data.target.image_mean, config.data.target.image_std = (
        (10.0, 20.0, 30.0),
        (2.0, 4.0, 8.0),
    )
    own = _batch(config)["image"]
    bgr = default + np.asarray(config.data.image_mean, np.float32)  # Caffe: std 1, BGR.
    expected = (bgr - np.float32([10, 20, 30])) / np.float32([2, 4, 8])
    np.testing.assert_allclose(own, expected, rtol=1e-5, atol=1e-3)
    data = ml_collections.ConfigDict(
        {"bgr": False, "image_mean": (1.0,) * 3, "image_std": (2.0,) * 3}
    )
    stream = common.domain("x", "train")
    assert stream.image_mean is None and stream.image_std is None and not stream.group
    rgb = np.full((2, 2, 3), 9, np.uint8)
    np.testing.assert_allclose(input_pipeline.make_normalizer(data, stream)(rgb), 4.0)
    stream.image_mean = (3.0, 5.0, 7.0)
    np.testing.assert_allclose(input_pipeline.make_normalizer(data, stream)(rgb)[0, 0], [3, 2, 1])


def test_views_of_a_padded_reference_through_coordinate_labels():
    """Each label pixel encodes its reference coordinates: every view pixel says where it
    came from, so views are checked against geometry.py pixel by pixel."""
    h, w = 12, 20
    ys, xs = np.mgrid[:h, :w]
    valid = xs < 17  # Padding on the right, as a crop of a narrow image.
    label = np.where(valid, ys * w + xs, 255).astype(np.uint8)
    image = np.random.default_rng(0).uniform(0, 255, (h, w, 3)).astype(np.float32)
    image[~valid] = 0.0
    options = {**view_groups.GROUP_DEFAULTS, "size": 4}
    exact, total = 0, 0
    for seed in range(6):
        group = view_groups.make_group(
            tf.constant(image), tf.constant(label), tf.constant(valid), tf.constant([seed, 3]),
            options, lambda x: x + 1.0,
        )  # fmt: skip
        group = {k: np.asarray(v) for k, v in group.items()}
        assert group["label"].shape == (4, h, w)
        coordinates = np.stack([ys, xs], -1).astype(np.float32)
        where, inside = geometry.to_view(
            np.broadcast_to(coordinates, (4, h, w, 2)), group["box"], group["flip"], (h, w),
            method="nearest",
        )  # fmt: skip
        where, inside = np.asarray(where).astype(int), np.asarray(inside)
        assert inside.all()
        shown = group["valid"]
        np.testing.assert_array_equal(group["label"][~shown], 255)
        assert (group["image"][~shown] == 0).all() and (group["clean"][~shown] == 0).all()
        assert (group["clean"][shown] >= 1).all()  # Normalised (+1) where valid.
        came_from = np.stack([group["label"] // w, group["label"] % w], -1)
        # Tie rounding (see the test above) moves a sample by at most one pixel.
        offset = np.abs(came_from - where)[shown]
        assert offset.max() <= 1
        exact += (offset.max(-1) == 0).sum()
        total += shown.sum()
        assert np.mean(valid[where[..., 0], where[..., 1]] == shown) >= 0.97
    print(f"exact source pixels: {exact / total:.4f}")
    assert exact / total >= 0.97


def _jitter_numpy(image, op, factor):
    grey = (image @ LUMA)[..., None]
    if op == "brightness":
        out = image * factor
    elif op == "contrast":
        out = (image - grey.mean()) * factor + grey.mean()
    elif op == "saturation":
        out = (image - grey) * factor + grey
    else:
        hsv = [colorsys.rgb_to_hsv(*(p / 255.0)) for p in image.reshape(-1, 3)]
        rgb = [colorsys.hsv_to_rgb((hh + factor) % 1.0, s, v) for hh, s, v in hsv]
        out = np.reshape(rgb, image.shape) * 255.0
    return np.clip(out, 0, 255)


def test_color_jitter_greyscale_and_noise_match_numpy():
    image = np.random.default_rng(1).uniform(0, 255, (8, 9, 3)).astype(np.float32)
    names = ("brightness", "contrast", "saturation", "hue")
    factors = np.float32([1.3, 0.7, 1.4, 0.08])
    for i, name in enumerate(names):
        got = view_groups.JITTER_OPS[i](tf.constant(image), factors[i])
        np.testing.assert_allclose(got, _jitter_numpy(image, name, factors[i]), atol=0.02)
    grey = view_groups.greyscale(tf.constant(image))
    np.testing.assert_allclose(grey, np.repeat((image @ LUMA)[..., None], 3, -1), atol=1e-3)
    results = []
    for order in ((0, 1, 2, 3), (3, 2, 1, 0), (2, 0, 3, 1)):
        expected = image
        for i in order:
            expected = _jitter_numpy(expected, names[i], factors[i])
        got = view_groups.color_jitter(tf.constant(image), tf.constant(factors), tf.constant(order))
        np.testing.assert_allclose(got, expected, atol=0.05)
        results.append(np.asarray(got))
    assert np.abs(results[0] - results[1]).max() > 1.0  # The order matters.
    # Blur, then jitter (if drawn), then greyscale (if drawn).
    options = view_groups.GROUP_DEFAULTS
    draw = _draws(0, 1)._replace(
        jitter=tf.constant(True), grey=tf.constant(True), order=tf.constant([3, 2, 1, 0])
    )
    blurred = augment.gaussian_blur(tf.constant(image), draw.radius, 2.0)
    expected = view_groups.greyscale(view_groups.color_jitter(blurred, draw.factors, draw.order))
    np.testing.assert_allclose(view_groups.noise(tf.constant(image), draw, options), expected)
    # RobustNet's photometric copy: jitter, then blur (greyscale still last).
    options = {**options, "blur_after_jitter": True}
    jittered = view_groups.color_jitter(tf.constant(image), draw.factors, draw.order)
    expected = view_groups.greyscale(augment.gaussian_blur(jittered, draw.radius, 2.0))
    got = view_groups.noise(tf.constant(image), draw, options)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    blurred_first = view_groups.noise(tf.constant(image), draw, view_groups.GROUP_DEFAULTS)
    assert np.abs(np.asarray(got) - np.asarray(blurred_first)).max() > 0.5  # Order matters.


def test_draws_follow_their_distributions():
    draws = [_draws(position, 1 + position % 3) for position in range(240)]
    orders = [tuple(np.asarray(d.order)) for d in draws]
    assert all(sorted(order) == [0, 1, 2, 3] for order in orders)
    assert len(set(orders)) >= 20  # Of 24 permutations.
    factors = np.stack([np.asarray(d.factors) for d in draws])
    assert (factors[:, :3] >= 0.6).all() and (factors[:, :3] <= 1.4).all()
    assert (np.abs(factors[:, 3]) <= 0.1).all() and factors[:, 3].min() < -0.05
    radius = np.array([float(d.radius) for d in draws])
    assert radius.min() >= 0.1 and radius.max() <= 2.0
    zoom = np.array([float(d.zoom) for d in draws])
    assert zoom.min() >= 0.5 and zoom.max() < 1.0 and zoom.std() > 0.1
    for field, p in (("jitter", 0.5), ("grey", 0.2), ("flip", 0.5)):
        rate = np.mean([bool(getattr(d, field)) for d in draws])
        assert abs(rate - p) < 0.1, (field, rate)
    # s = 1 keeps the whole reference.
    full = _draws(3, 2, zoom=(1.0, 1.0))
    np.testing.assert_array_equal(full.crop, [0, 0, *CROP])


@pytest.mark.parametrize(
    ("group", "match"),
    [
        ({"zom": (0.5, 1.0)}, r"unknown group keys \['zom'\]"),
        ({"size": 0}, r"group\.size=0; set it to the number of views"),
        ({"zoom": (0.5, 1.5)}, r"group\.zoom=\(0\.5, 1\.5\); use \(min, max\)"),
        ({"blur_radius": (2.0, 1.0)}, r"group\.blur_radius"),
        ({"jitter_prob": 1.5}, r"group\.jitter_prob=1\.5"),
        ({"hue": 0.7}, r"group\.hue"),
        ({"flip": 1}, r"group\.flip"),
    ],
)
def test_group_config_errors_name_the_key(group, match):
    stream = common.domain("tiny", "target_train")
    stream.group = group
    with pytest.raises(ValueError, match="data stream tiny:target_train: " + match):
        view_groups.group_options(stream)


def test_group_excludes_views_and_strong(data_dir):
    config = _config(data_dir, {"size": 2})
    config.data.target.views = {"weak": {"flip": True}}
    with pytest.raises(ValueError, match="group cannot be combined with views or strong"):
        _batch(config)
    options = view_groups.group_options(_config(data_dir, {"zoom": (0.8, 0.9)}).data.target)
    assert options == {**view_groups.GROUP_DEFAULTS, "zoom": (0.8, 0.9)}
