"""DAFormer's ImageNet feature distance pieces (`jaxda/losses/feature_distance.py`) against
NumPy references written from DAFormer's PyTorch (`downscale_label_ratio`, `masked_feat_dist`):
the label downscaling (ignore as an extra class, the 0.75 threshold, ties to the first
maximum), the size check, the thing-class mask, and the masked mean with its empty case."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxda.data.labels import IGNORE_LABEL
from jaxda.losses import feature_distance as fd
from jaxda.models import deeplab_v2


def numpy_downscale(labels, scale, min_ratio, num_classes, ignore=IGNORE_LABEL):
    """DAFormer's `downscale_label_ratio` patch by patch: one-hot with `ignore` as class
    `num_classes`, average over each scale x scale patch (the remainder dropped), the first
    maximum, ignore where it is the ignore class or its share is < min_ratio."""
    labels = np.asarray(labels)
    batch, height, width = labels.shape
    out = np.empty((batch, height // scale, width // scale), np.int64)
    for b, i, j in np.ndindex(out.shape):
        patch = labels[b, i * scale : (i + 1) * scale, j * scale : (j + 1) * scale]
        patch = np.where(patch == ignore, num_classes, patch)
        shares = np.bincount(patch.ravel(), minlength=num_classes + 1) / patch.size
        best = int(np.argmax(shares))  # NumPy's argmax, as torch.max: the first maximum.
        keep = best != num_classes and shares[best] >= min_ratio
        out[b, i, j] = best if keep else ignore
    return out


def numpy_masked_distance(student, frozen, mask):
    distance = np.sqrt(np.sum((np.float64(student) - np.float64(frozen)) ** 2, axis=-1))
    return distance[mask].mean() if mask.any() else 0.0, int(mask.sum())


def _blocky_labels(seed, shape=(2, 12, 20), scale=4, num_classes=5):
    """Labels whose scale x scale patches are mostly one class, with a random share of pixels
    changed (to other classes or IGNORE_LABEL), so shares fall on both sides of 0.75."""
    rng = np.random.default_rng(seed)
    batch, height, width = shape
    base = rng.integers(0, num_classes, size=(batch, height // scale + 1, width // scale + 1))
    labels = np.repeat(np.repeat(base, scale, 1), scale, 2)[:, :height, :width]
    noise = rng.integers(0, num_classes + 1, size=shape)
    noise = np.where(noise == num_classes, IGNORE_LABEL, noise)
    rate = rng.choice([0.0, 0.15, 0.4], size=(batch, height // scale + 1, width // scale + 1))
    rate = np.repeat(np.repeat(rate, scale, 1), scale, 2)[:, :height, :width]
    return np.where(rng.uniform(size=shape) < rate, noise, labels).astype(np.uint8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_downscale_label_ratio_matches_numpy(seed):
    labels = _blocky_labels(seed)
    expected = numpy_downscale(labels, 4, 0.75, 5)
    got = np.asarray(fd.downscale_label_ratio(jnp.asarray(labels), 4, 0.75, 5))
    assert got.shape == (2, 3, 5)
    np.testing.assert_array_equal(got, expected)
    # Both outcomes occur: kept classes and patches ignored for their ratio.
    assert (expected != IGNORE_LABEL).any() and (expected == IGNORE_LABEL).any()


def test_downscale_label_ratio_threshold_ignore_and_ties():
    """2 x 2 patches: exactly 0.75 is kept, 0.5 is not; a majority of IGNORE_LABEL is
    ignored; ties go to the lowest class, the ignore class (the last) losing every tie;
    a remainder row and column (5 x 7 input) are dropped, as by avg_pool2d."""
    i = IGNORE_LABEL
    patches = [
        [[3, 3], [3, 1]],  # 3: share 0.75 -> 3.
        [[3, 3], [1, 2]],  # 0.5 -> ignored.
        [[i, i], [i, 2]],  # Ignore wins -> ignored.
        [[4, 2], [2, 4]],  # Tie 2 / 4 -> 2 (with min_ratio 0.5).
        [[i, 4], [4, i]],  # Tie 4 / ignore -> 4 (with min_ratio 0.5).
        [[i, 1], [1, 1]],  # 1: share 0.75, an ignored pixel counting against it -> 1.
    ]
    labels = np.full((1, 5, 7), 0, np.int32)
    for k, patch in enumerate(patches):
        r, c = divmod(k, 3)
        labels[0, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2] = patch
    labels[0, 4, :] = labels[0, :, 6] = 1  # Dropped remainder.
    got = np.asarray(fd.downscale_label_ratio(jnp.asarray(labels), 2, 0.75, 5))
    np.testing.assert_array_equal(got, [[[3, i, i], [i, i, 1]]])
    got = np.asarray(fd.downscale_label_ratio(jnp.asarray(labels), 2, 0.5, 5))
    np.testing.assert_array_equal(got, [[[3, 3, i], [2, 4, 1]]])
    np.testing.assert_array_equal(got, numpy_downscale(labels, 2, 0.5, 5))
    with pytest.raises(ValueError, match="factor > 1"):
        fd.downscale_label_ratio(jnp.asarray(labels), 1, 0.75, 5)


def test_label_scale_is_daformers_and_names_the_sizes():
    assert fd.label_scale((512, 1024), (16, 32)) == 32  # MiT stage 4 of a 512 x 1024 crop.
    assert fd.label_scale((512, 512), (64, 64)) == 8
    assert fd.label_scale((520, 520), (17, 17)) == 30  # DAFormer: 520 // 30 = 17 fits.
    # The library's DeepLabV2 grid (PyTorch's arithmetic): 512 // 65 = 7, 512 // 7 = 73.
    grid = deeplab_v2.output_size(512), deeplab_v2.output_size(512)
    with pytest.raises(ValueError, match=r"512x512 .* 512 // 65 = 7 to 73x73.* grid 65x65"):
        fd.label_scale((512, 512), grid)
    grid = deeplab_v2.output_size(32), deeplab_v2.output_size(64)  # The tests' tiny crops.
    with pytest.raises(ValueError, match=r"64 // 9 = 7 to 4x9.* grid 5x9"):
        fd.label_scale((32, 64), grid)
    with pytest.raises(ValueError, match="grid 16x16"):  # Width fits, height does not.
        fd.label_scale((256, 512), (16, 16))
    with pytest.raises(ValueError, match="= 1 to"):  # DAFormer asserts scale > 1.
        fd.label_scale((16, 32), (16, 32))


def test_patch_mask_selects_the_thing_class_patches():
    labels = _blocky_labels(3, shape=(2, 16, 24), num_classes=19)
    labels[0, :4, :4] = IGNORE_LABEL
    patches = numpy_downscale(labels, 4, 0.75, 19)
    expected = np.isin(patches, fd.THING_CLASSES)
    got = np.asarray(fd.patch_mask(jnp.asarray(labels), (4, 6), fd.THING_CLASSES, 0.75, 19))
    np.testing.assert_array_equal(got, expected)
    assert expected.any() and not expected.all() and not got[0, 0, 0]
    # Empty classes: every patch (DAFormer's classes=None), any sizes, the labels unread.
    np.testing.assert_array_equal(fd.patch_mask(jnp.asarray(labels), (5, 7), (), 0.75, 19), True)
    assert fd.patch_mask(jnp.asarray(labels), (5, 7), None, 0.75, 19).shape == (2, 5, 7)
    with pytest.raises(ValueError, match="grid 5x7"):
        fd.patch_mask(jnp.asarray(labels), (5, 7), fd.THING_CLASSES, 0.75, 19)


def test_masked_feature_distance_matches_numpy_and_is_zero_when_empty():
    rng = np.random.default_rng(4)
    student = rng.normal(size=(2, 3, 4, 6)).astype(np.float32)
    frozen = rng.normal(size=(2, 3, 4, 6)).astype(np.float32)
    mask = rng.uniform(size=(2, 3, 4)) < 0.4
    value, count = fd.masked_feature_distance(student, frozen, mask)
    expected, expected_count = numpy_masked_distance(student, frozen, mask)
    assert float(value) == pytest.approx(expected, rel=1e-6) and int(count) == expected_count
    value, count = fd.masked_feature_distance(student, frozen, np.ones((2, 3, 4), bool))
    assert float(value) == pytest.approx(
        numpy_masked_distance(student, frozen, np.ones((2, 3, 4), bool))[0]
    )
    # No patch: DAFormer's mean is NaN; here 0 with count 0, and a zero gradient.
    value, count = fd.masked_feature_distance(student, frozen, np.zeros((2, 3, 4), bool))
    assert (float(value), int(count)) == (0.0, 0)
    with pytest.raises(ValueError, match=r"mask \(2, 3\)"):
        fd.masked_feature_distance(student, frozen, np.ones((2, 3), bool))


def test_masked_feature_distance_gradient():
    """d FD / d student = mask x (s - f) / ||s - f|| / count, and 0 (not NaN) where the
    features are equal, as PyTorch's norm backward (the student starts as the frozen net)."""
    rng = np.random.default_rng(5)
    frozen = rng.normal(size=(1, 2, 3, 4)).astype(np.float32)
    student = frozen + rng.normal(size=frozen.shape).astype(np.float32)
    student[0, 0, 0] = frozen[0, 0, 0]  # Equal features on a masked patch.
    mask = np.array([[[True, True, False], [True, False, True]]])

    def loss(s):
        return fd.masked_feature_distance(s, jnp.asarray(frozen), jnp.asarray(mask))[0]

    grad = np.asarray(jax.grad(loss)(jnp.asarray(student)))
    diff = np.float64(student) - frozen
    norm = np.linalg.norm(diff, axis=-1, keepdims=True)
    expected = np.where(mask[..., None] & (norm > 0), diff / np.maximum(norm, 1e-30), 0) / 4
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)
    assert np.isfinite(np.asarray(jax.grad(loss)(jnp.asarray(frozen)))).all()
