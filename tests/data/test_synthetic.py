"""Tests for the synthetic GTA5 -> Cityscapes stand-in benchmark (jaxda.data.synthetic)."""

import numpy as np
import pytest

from jaxda.data import synthetic
from jaxda.data.labels import class_id

H, W = 128, 256
GROUND = np.array([class_id(n) for n in ("road", "sidewalk", "terrain")])


def _scenes(domain, n, split="train", height=H, width=W):
    return [
        synthetic.generate_example(domain, split, i, seed=0, height=height, width=width)
        for i in range(n)
    ]


def _horizon_row(label):
    """Topmost row (fraction of H) where most pixels are ground (road / sidewalk / terrain)."""
    ground = np.isin(label, GROUND).mean(axis=1) > 0.5
    return np.argmax(ground) / label.shape[0]


def test_deterministic():
    a = synthetic.generate_example("target", "train", 7, seed=3, height=H, width=W)
    b = synthetic.generate_example("target", "train", 7, seed=3, height=H, width=W)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize(
    "change",
    [
        {"index": 8},
        {"split": "validation"},
        {"domain": "source"},
        {"seed": 4},
    ],
)
def test_different_arguments_give_different_scenes(change):
    args = {"domain": "target", "split": "train", "index": 7, "seed": 3}
    image, label = synthetic.generate_example(**args, height=H, width=W)
    image2, label2 = synthetic.generate_example(**{**args, **change}, height=H, width=W)
    assert not np.array_equal(image, image2)
    if "domain" not in change:  # the same index in the other domain is another scene too
        assert not np.array_equal(label, label2)


@pytest.mark.parametrize("domain", synthetic.DOMAINS)
@pytest.mark.parametrize("size", [(32, 64), (64, 128), (256, 512), (100, 180)])
def test_shapes_dtypes_and_label_values(domain, size):
    image, label = synthetic.generate_example(
        domain, "validation", 1, seed=0, height=size[0], width=size[1]
    )
    assert image.shape == (*size, 3) and image.dtype == np.uint8
    assert label.shape == size and label.dtype == np.uint8
    assert set(np.unique(label)) <= set(synthetic.SCENE_CLASSES)


@pytest.mark.parametrize("domain", synthetic.DOMAINS)
def test_scene_scales_with_resolution(domain):
    _, small = synthetic.generate_example(domain, "train", 5, seed=1, height=64, width=128)
    _, big = synthetic.generate_example(domain, "train", 5, seed=1, height=256, width=512)
    # Pixel centres of the small grid fall between big pixels 4i+1 and 4i+2.
    assert (small == big[1::4, 1::4]).mean() > 0.95


@pytest.mark.parametrize("domain", synthetic.DOMAINS)
def test_every_scene_class_appears(domain):
    seen = set()
    for _, label in _scenes(domain, 50):
        seen |= set(np.unique(label).tolist())
    assert seen == set(synthetic.SCENE_CLASSES)


def test_target_horizon_is_lower():
    source = np.mean([_horizon_row(label) for _, label in _scenes("source", 30)])
    target = np.mean([_horizon_row(label) for _, label in _scenes("target", 30)])
    assert 0.38 < source < 0.48
    assert target > source + 0.04


def test_target_has_more_local_variance():
    """Within uniform label regions, source is flat-shaded while target is textured/noisy."""

    def local_variation(domain):
        values = []
        for image, label in _scenes(domain, 10):
            x = image.astype(np.float32)
            same = (label[:, 1:] == label[:, :-1])[..., None]
            diff = np.abs(x[:, 1:] - x[:, :-1])
            values.append(diff[np.broadcast_to(same, diff.shape)].mean())
        return np.mean(values)

    source, target = local_variation("source"), local_variation("target")
    assert source < 2.0
    assert target > 3.0 * source + 2.0


def test_target_colours_shift_per_class():
    """Mean class colours move between domains, by different amounts for different classes."""

    def class_means(domain):
        pairs = _scenes(domain, 20)
        images = np.stack([p[0] for p in pairs]).astype(np.float32)
        labels = np.stack([p[1] for p in pairs])
        return {c: images[labels == c].mean(0) for c in synthetic.SCENE_CLASSES}

    source, target = class_means("source"), class_means("target")
    shifts = {c: np.abs(target[c] - source[c]).sum() for c in synthetic.SCENE_CLASSES}
    assert shifts[class_id("vegetation")] > 30 and shifts[class_id("road")] > 20
    assert max(shifts.values()) > 2 * min(shifts.values())  # not one global colour transform
    # Sky stays the brightest region in both domains (class identity partly preserved).
    for means in (source, target):
        assert means[class_id("sky")].sum() > means[class_id("road")].sum()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"domain": "real"}, "domain"),
        ({"split": "test"}, "split"),
        ({"index": -1}, "index"),
        ({"seed": 1.5}, "seed"),
        ({"height": 16}, "height"),
        ({"width": 63}, "width"),
    ],
)
def test_invalid_arguments(kwargs, match):
    args = {"domain": "source", "split": "train", "index": 0, "seed": 0, "height": H, "width": W}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        synthetic.generate_example(args.pop("domain"), args.pop("split"), args.pop("index"), **args)
