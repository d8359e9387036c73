"""Training streams with several augmented views of each example, placed by `box` and `flip`."""

import io

import numpy as np
import pytest
from PIL import Image

from jaxda.data import augment, geometry, input_pipeline, sources
from tests.conftest import TINY_DATASET, tiny_config

WEAK = {"flip": True}
STRONG = {"random_scale": (0.5, 1.5), "crop_size": (24, 40), "flip": True, "color_jitter": 0.3}
BATCH = 8


def _batches(config, start, n, stream="target", seed=(5, 1)):
    reader = input_pipeline.open_reader(config.data[stream], config.data)
    it = input_pipeline.train_iterator(
        reader, config.data[stream], config.data, global_batch_size=BATCH, seed=seed, start=start
    )
    return [next(it) for _ in range(n)]


def _views_config(data_dir, **views):
    config = tiny_config(data_dir=data_dir)
    config.data.target.views = views
    return config


def _raw_labels(data_dir, start, split="target_train", seed=(5, 1)) -> np.ndarray:
    """[BATCH, H, W] stored labels of the batch at stream position `start` (the base frame)."""
    reader = sources.SplitReader(TINY_DATASET, split, data_dir)
    indices = input_pipeline.sample_indices(
        len(reader), seed=seed, start=start, global_batch_size=BATCH, process_slice=slice(0, 8)
    )
    labels = []
    for _, index in indices:
        labels.append(np.asarray(Image.open(io.BytesIO(reader[index]["label"]))).squeeze())
        if len(labels) == BATCH:
            return np.stack(labels)
    raise AssertionError("unreachable")


def _agreement(a, b, mask) -> float:
    return float((a == b)[mask].mean())


def test_two_views_of_one_example_agree_through_the_base_frame(data_dir):
    config = _views_config(data_dir, weak=WEAK, strong=STRONG)
    batches = _batches(config, 0, 2)
    assert set(batches[0]) >= {"weak", "strong"}
    weak, strong = batches[0]["weak"], batches[0]["strong"]
    assert weak["image"].shape == (BATCH, 32, 64, 3) and strong["image"].shape == (BATCH, 24, 40, 3)
    assert weak["box"].shape == (BATCH, 4) and weak["flip"].shape == (BATCH,)
    agree_views, agree_strong = [], []
    for start, batch in zip((0, BATCH), batches, strict=True):
        weak, strong = batch["weak"], batch["strong"]
        raw = _raw_labels(data_dir, start)
        # Flip only: the weak view's box is the whole frame, and it maps back exactly.
        np.testing.assert_array_equal(weak["box"], np.tile(augment.BASE_BOX, (BATCH, 1)))
        weak_base, weak_valid = geometry.to_base(
            weak["label"], weak["box"], weak["flip"], raw.shape[1:], method="nearest"
        )
        np.testing.assert_array_equal(weak_base, raw)
        assert np.asarray(weak_valid).all()
        # The strong view is the stored label cropped out of `box`, up to nearest rounding.
        view, valid = geometry.to_view(
            raw, strong["box"], strong["flip"], strong["label"].shape[1:], method="nearest"
        )
        view, valid = np.asarray(view), np.asarray(valid)
        np.testing.assert_array_equal(valid, strong["label"] != 255)
        agree_strong.append(_agreement(view, strong["label"], valid))
        # Both views through the base frame, on the base pixels both show.
        strong_base, strong_valid = geometry.to_base(
            strong["label"], strong["box"], strong["flip"], raw.shape[1:], method="nearest"
        )
        both = np.asarray(weak_valid & strong_valid)
        assert both.mean() > 0.2
        agree_views.append(_agreement(np.asarray(weak_base), np.asarray(strong_base), both))
        # Straight from the weak view to the strong one.
        moved, moved_valid = geometry.resample(
            weak["label"],
            weak["box"],
            weak["flip"],
            strong["box"],
            strong["flip"],
            strong["label"].shape[1:],
            method="nearest",
        )
        agree_views.append(_agreement(np.asarray(moved), strong["label"], np.asarray(moved_valid)))
    print(f"strong view vs stored label: {agree_strong}; weak vs strong: {agree_views}")
    assert min(agree_strong) >= 0.97 and np.mean(agree_strong) >= 0.98
    assert min(agree_views) >= 0.95 and np.mean(agree_views) >= 0.97
    flips = np.concatenate([b[v]["flip"] for b in batches for v in ("weak", "strong")])
    assert 0 < flips.sum() < len(flips)


def test_views_with_and_without_random_scale_share_the_base_frame(data_dir):
    # With `size`, an unscaled view is resized to it while a scaled one resamples the stored
    # image by factor x size: both boxes are in the same normalised coordinates.
    config = _views_config(data_dir, weak=WEAK, strong={**STRONG, "crop_size": (12, 20)})
    config.data.target.size = (16, 32)
    batch = _batches(config, 0, 1)[0]
    raw = _raw_labels(data_dir, 0)
    for name, exact in (("weak", True), ("strong", False)):
        view = batch[name]
        expected, valid = geometry.to_view(
            raw, view["box"], view["flip"], view["label"].shape[1:], method="nearest"
        )
        agreement = _agreement(np.asarray(expected), view["label"], np.asarray(valid))
        print(f"{name} view with size=(16, 32) vs stored label: {agreement:.4f}")
        assert agreement == 1.0 if exact else agreement >= 0.97, (name, agreement)
    assert batch["weak"]["label"].shape == (BATCH, 16, 32)


def test_views_are_independent_deterministic_and_resumable(data_dir):
    config = _views_config(data_dir, a=STRONG, b=STRONG)
    first = _batches(config, 0, 3)
    resumed = _batches(config, 2 * BATCH, 1)[0]
    for view in ("a", "b"):
        for key in ("image", "label", "box", "flip"):
            np.testing.assert_array_equal(resumed[view][key], first[2][view][key])
    # Same options, own draws.
    assert not np.array_equal(first[0]["a"]["box"], first[0]["b"]["box"])
    # A view's draws depend on its name only: adding a view changes no other view.
    more = _views_config(data_dir, a=STRONG, b=STRONG, c=WEAK)
    again = _batches(more, 0, 1)[0]
    for view in ("a", "b"):
        np.testing.assert_array_equal(again[view]["image"], first[0][view]["image"])
    np.testing.assert_array_equal(again["c"]["box"], np.tile(augment.BASE_BOX, (BATCH, 1)))


def test_streams_without_views_report_their_geometry(data_dir):
    config = tiny_config(data_dir=data_dir)
    plain = _batches(config, 0, 1, stream="source")[0]
    np.testing.assert_array_equal(plain["box"], np.tile(augment.BASE_BOX, (BATCH, 1)))
    assert not plain["flip"].any()
    for key, value in STRONG.items():
        config.data.source[key] = value
    batch = _batches(config, 0, 1, stream="source", seed=(5, 0))[0]
    assert set(batch) >= {"image", "label", "box", "flip"}
    # The label is the stored label seen through box and flip.
    raw = _raw_labels(data_dir, 0, split="source_train", seed=(5, 0))
    view, valid = geometry.to_view(raw, batch["box"], batch["flip"], (24, 40), method="nearest")
    view, valid = np.asarray(view), np.asarray(valid)
    np.testing.assert_array_equal(view[~valid], 255)
    assert _agreement(view, batch["label"], np.ones_like(valid)) >= 0.97
    assert 0 < batch["flip"].sum() < BATCH


def test_view_keys_are_checked(data_dir):
    config = _views_config(data_dir, weak={"size": (16, 16)})
    with pytest.raises(ValueError, match=r"view 'weak'.*unknown: \['size'\]"):
        _batches(config, 0, 0)
    config = _views_config(data_dir, weak={"random_scale": (0.5, 1.5)})
    with pytest.raises(ValueError, match="needs crop_size or size"):
        _batches(config, 0, 0)
