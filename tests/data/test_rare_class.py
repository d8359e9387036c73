"""DAFormer's rare class sampling (jaxda/data/rare_class.py) and the re-drawn crops
(jaxda/data/crop_retry.py): class probabilities and candidates against NumPy, the sampler's
frequencies and exact resume, the pixel-count cache, mmseg's cat_max_ratio rule, the crop
retry against a NumPy re-implementation from the same draws, and a stream through the real
pipeline."""

import io
import itertools
import re

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from scipy import stats

from jaxda.data import (
    augment,
    augment_options,
    crop_retry,
    input_pipeline,
    label_sampling,
    labels,
    rare_class,
)


def _softmax_reference(table: np.ndarray, temperature: float):
    """(classes, P) from per-image counts, written out: f over the classes that occur."""
    n = {c: int(table[:, c].sum()) for c in range(table.shape[1])}
    present = [c for c in sorted(n) if n[c] > 0]
    total = sum(n[c] for c in present)
    logits = np.array([(1 - n[c] / total) / temperature for c in present])
    e = np.exp(logits - logits.max())
    return present, e / e.sum()


def _table(seed=0, num_images=50, num_classes=7) -> np.ndarray:
    """Per-image counts [N, C]: class c has ~ (c + 1)**-2 of the pixels; class 4 never occurs."""
    rng = np.random.default_rng(seed)
    scale = 40000 / (np.arange(num_classes) + 1.0) ** 2
    table = rng.poisson(scale * rng.random((num_images, num_classes)) * 2).astype(np.int64)
    table[rng.random(table.shape) < 0.3] = 0
    table[:, 4] = 0
    return table


def test_class_probabilities_match_numpy_softmax():
    for seed, temperature in ((0, 0.01), (1, 0.05), (2, 1.0)):
        table = _table(seed)
        classes, probs = rare_class.class_probabilities(table, temperature)
        present, expected = _softmax_reference(table, temperature)
        assert classes.tolist() == present and 4 not in present
        np.testing.assert_allclose(probs, expected, rtol=1e-12)
        assert abs(probs.sum() - 1) < 1e-12
        # DAFormer's order (ascending n_c) only permutes the same values.
        order = np.argsort(table[:, present].sum(axis=0), kind="stable")
        np.testing.assert_allclose(np.sort(probs[order]), np.sort(expected), rtol=1e-12)
    # T = 0.01 on GTA-like shares: the rarest class gets the most.
    classes, probs = rare_class.class_probabilities(_table(0), 0.01)
    assert probs[-1] == probs.max() and probs[0] == probs.min()
    with pytest.raises(ValueError, match="No labelled pixel"):
        rare_class.class_probabilities(np.zeros((3, 4), np.int64), 0.01)


def test_candidates_are_strictly_above_min_pixels_and_p_is_renormalised():
    table = np.array(
        [
            [3000, 3001, 10, 0],
            [5000, 2999, 3000, 0],
            [0, 4000, 3000, 7],
        ],
        np.int64,
    )
    got = rare_class.candidates(table, np.arange(4), 3000)
    assert [c.tolist() for c in got] == [[1], [0, 2], [], []]
    # Classes 2 and 3 occur but have no candidate: dropped, P renormalised over 0 and 1.
    plan = rare_class.Plan(table, (0,), temperature=0.5, min_pixels=3000)
    present, p = _softmax_reference(table, 0.5)
    assert present == [0, 1, 2, 3] and plan.classes.tolist() == [0, 1]
    np.testing.assert_allclose(plan.probabilities, p[:2] / p[:2].sum(), rtol=1e-12)
    assert plan.images.tolist() == [1, 0, 2] and plan.start.tolist() == [0, 1, 3]
    with pytest.raises(ValueError, match=r"min_pixels=5000 .*the most is 5000"):
        rare_class.Plan(table, (0,), min_pixels=5000)


def test_sampler_frequencies_match_p_and_images_are_uniform_among_candidates():
    """20,000 positions, fixed seed: every class's frequency within 4 standard errors of P;
    each class's images pass a chi-square test of uniformity (p > 0.001)."""
    table = _table(3)
    plan = rare_class.Plan(table, (7, 1), temperature=0.2, min_pixels=500)
    num = 20000
    drawn = np.array([plan.item(k) for k in range(num)])
    assert len(plan.classes) >= 4 and plan.probabilities.min() > 0.005
    for k, c in enumerate(plan.classes):
        mine = drawn[drawn[:, 0] == c, 1]
        p = plan.probabilities[k]
        assert abs(len(mine) / num - p) <= 4 * np.sqrt(p * (1 - p) / num), c
        allowed = np.flatnonzero(table[:, c] > 500)
        assert set(mine.tolist()) <= set(allowed.tolist())
        observed = np.array([np.sum(mine == i) for i in allowed])
        assert stats.chisquare(observed).pvalue > 1e-3, c
    assert set(drawn[:, 0].tolist()) == set(plan.classes.tolist())


class _Reader(list):
    """A SplitReader stand-in over encoded labels."""

    name, split, subset, label_key = "fake/1", "train", "", "label"

    def __getitem__(self, index):
        return {"image": b"image%d" % index, "label": super().__getitem__(index)}


def _stream(reader, plan, start, process_slice=slice(0, 4)):
    samples = input_pipeline.sample_indices(
        plan.epoch_length, seed=(1,), start=start, global_batch_size=4, process_slice=process_slice
    )
    for example in label_sampling.examples(reader, samples, plan):
        yield example["position"], example["index"], example["rcs_class"], example["image"]


def test_stream_is_a_pure_function_of_seed_and_position():
    table = _table(4)
    reader = _Reader([b""] * len(table))
    plan = rare_class.Plan(table, (5, 2), temperature=0.2, min_pixels=500)
    num = 4096 + 200  # Crosses a block of draws.
    full = list(itertools.islice(_stream(reader, plan, 0), num))
    assert [p for p, *_ in full] == list(range(num))
    for position, image, c, encoded in full[::97]:
        assert (c, image) == plan.item(position) and encoded == b"image%d" % image
    for start in (1, 4095, 4100):  # A fresh plan, as a resumed run builds it.
        fresh = rare_class.Plan(table, (5, 2), temperature=0.2, min_pixels=500)
        assert list(itertools.islice(_stream(reader, fresh, start), num - start)) == full[start:]
    halves = [
        list(itertools.islice(_stream(reader, plan, 0, s), 300)) for s in (slice(0, 2), slice(2, 4))
    ]
    assert sorted(halves[0] + halves[1]) == full[:600]
    other = rare_class.Plan(table, (5, 3), temperature=0.2, min_pixels=500)
    assert [other.item(k) for k in range(50)] != [plan.item(k) for k in range(50)]


def _png(label: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(label.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_count_cache_is_written_once_reused_and_checked(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    raw = [rng.choice([0, 3, 5, 18, 255], (20, 30)).astype(np.uint8) for _ in range(5)]
    raw[1][:] = 255
    # Stored as Cityscapes label ids: the map brings the train ids back.
    ids = {t: i for i, t in labels.CITYSCAPES_LABEL_TO_TRAIN_ID.items()}
    stored = [np.vectorize(lambda v: ids.get(v, 0))(r).astype(np.uint8) for r in raw]
    reader = _Reader([_png(s) for s in stored])
    lookup = labels.lookup_table(labels.CITYSCAPES_LABEL_TO_TRAIN_ID)
    args = (str(tmp_path), "cityscapes_label_ids", lookup, 19)
    counts = rare_class.cached_counts(reader, *args)
    expected = np.stack([np.bincount(r.ravel(), minlength=256)[:19] for r in raw])
    np.testing.assert_array_equal(counts, expected)
    assert counts.dtype == np.int64 and counts[1].sum() == 0
    path = tmp_path / "rare_class_counts-train-cityscapes_label_ids.npz"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    monkeypatch.setattr(label_sampling, "map_labels", None)  # The second call reads the file.
    np.testing.assert_array_equal(rare_class.cached_counts(reader, *args), counts)
    other = _Reader(reader)
    other.name = "other/1"
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(path))}.*fake/1.*not to .*other/1.*delete"
    ):
        rare_class.cached_counts(other, *args)


def test_options_validation_and_exclusions():
    assert rare_class.stream_options({}, "s") is None
    assert rare_class.stream_options({"min_pixels": 10}, "s") == {
        "temperature": 0.01,
        "min_pixels": 10,
        "min_crop_ratio": 0.5,
    }
    for bad, match in (
        ({"class_temp": 0.01}, r"accepts only .*got \['class_temp'\]"),
        ({"temperature": 0}, "temperature must be > 0; got 0"),
        ({"temperature": "0.1"}, "temperature"),
        ({"min_pixels": 3000.0}, r"min_pixels must be an int >= 0; got 3000\.0"),
        ({"min_pixels": -1}, "min_pixels"),
        ({"min_crop_ratio": -0.5}, r"min_crop_ratio must be >= 0; got -0\.5"),
        ({"min_crop_ratio": True}, "min_crop_ratio"),
    ):
        with pytest.raises(ValueError, match=match):
            rare_class.stream_options(bad, "data stream x:train")

    def stream(**keys):
        config = {"name": "x", "split": "train", "random_scale": (), "crop_size": (16, 16)}
        config.update(flip=False, blur_prob=0.0, blur_sigma=(0.0, 1.0), color_jitter=0.0)
        config.update({"size": None, "rare_class": {}, "crop_cat_max_ratio": 0.0, **keys})
        return ml_collections.ConfigDict(config)

    options = augment_options.stream(stream(rare_class={"min_pixels": 40}, crop_cat_max_ratio=0.75))
    assert options["cat_max_ratio"] == 0.75 and options["rcs_min_crop_pixels"] == 20.0
    off = augment_options.stream(stream(crop_cat_max_ratio=1.0, rare_class={"min_crop_ratio": 0}))
    assert off["cat_max_ratio"] == 0.0 and off["rcs_min_crop_pixels"] is None
    for bad, match in (
        ({"crop_cat_max_ratio": 1.5}, r"crop_cat_max_ratio must be in \[0, 1\] .*got 1\.5"),
        ({"crop_cat_max_ratio": True}, "crop_cat_max_ratio"),
        ({"crop_cat_max_ratio": 0.75, "crop_size": ()}, "needs a random crop"),
        ({"rare_class": {"min_pixel": 3}}, "accepts only"),
    ):
        with pytest.raises(ValueError, match=match):
            augment_options.stream(stream(**bad))
    # A view named like the batch's extra field is refused.
    with pytest.raises(ValueError, match="rcs_class"):
        augment_options.views(stream(views={"rcs_class": {}}))

    def load(**keys):
        config = ml_collections.ConfigDict({"name": "x", "split": "train", **keys})
        return rare_class.load_plan(None, config, None, (0,), lambda _: None)

    assert load(rare_class={}) is None
    with pytest.raises(ValueError, match="rare_class and class_uniform"):
        load(rare_class={"min_pixels": 4}, class_uniform={"tile": 16})
    with pytest.raises(ValueError, match="rare_class and importance"):
        load(rare_class={"min_pixels": 4}, importance={"weights": "w.npy"})


def _mmseg_accepts(crop: np.ndarray, ratio: float) -> bool:
    """mmseg's RandomCrop rule, as written there."""
    values, cnt = np.unique(crop, return_counts=True)
    cnt = cnt[values != 255]
    return len(cnt) > 1 and np.max(cnt) / np.sum(cnt) < ratio


def test_cat_ratio_rule_matches_mmseg():
    rng = np.random.default_rng(0)
    crops = [rng.choice(rng.choice([0, 1, 2, 7, 255], 3), (6, 8)) for _ in range(120)]
    crops += [np.full((4, 4), 255), np.full((4, 4), 3), np.array([[1, 1, 1, 2]])]
    crops += [np.array([[1, 1, 1, 2, 255, 255]]), np.array([[1, 2, 255]])]
    accepted = 0
    for crop in crops:
        counts = np.bincount(crop.ravel(), minlength=256).astype(np.int32)
        for ratio in (0.75, 0.5, 0.9):
            got = bool(crop_retry.cat_ratio_accepts(tf.constant(counts), ratio))
            assert got == _mmseg_accepts(crop, ratio), (crop, ratio)
            accepted += got
    assert 0 < accepted < 3 * len(crops)
    # 3 of 4 pixels is not below 0.75.
    assert not crop_retry.cat_ratio_accepts(
        tf.constant(np.bincount([1, 1, 1, 2], minlength=256)), 0.75
    )


def _window_offset(u: np.float32, length: int, crop: int) -> int:
    """augment.crop's start along one axis: floor(u * (excess + 1)), in float32; 0 if shorter."""
    excess = length - crop
    if excess <= 0:
        return 0
    return min(int(np.float32(u) * np.float32(excess + 1)), excess)


# The draws the reference reads, traced once (eager calls are ~10x slower).
_attempt_seed = tf.function(crop_retry.attempt_seed, autograph=False)
_crop_draw = tf.function(crop_retry.crop_draw, autograph=False)
_uniforms = tf.function(augment.uniforms, autograph=False)


def _reference_choose(label, seed, base_size, crop_size, random_scale, ratio, rcs_class, threshold):
    """DAFormer's retry around mmseg's RandomCrop in NumPy / PIL, from the same draws:
    returns (run seed, crop draw, attempt, draw, window of the scaled label)."""
    for attempt in range(crop_retry.MAX_CHECKS + 1):
        run_seed = _attempt_seed(seed, tf.constant(attempt))
        scaled = label
        if random_scale:
            low, high = random_scale
            u = _uniforms(run_seed).numpy()[0]
            factor = np.float32(low) + np.float32(high - low) * u
            size = np.round(factor * np.array(base_size, np.float32)).astype(int)
            size = (int(max(size[1], 1)), int(max(size[0], 1)))  # PIL: (width, height).
            scaled = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
        for draw in range(crop_retry.MAX_CHECKS + 1):
            u = _crop_draw(run_seed, tf.constant(draw)).numpy()
            y, x = (_window_offset(u[a], scaled.shape[a], crop_size[a]) for a in (0, 1))
            window = scaled[y : y + crop_size[0], x : x + crop_size[1]]
            if not ratio or draw == crop_retry.MAX_CHECKS or _mmseg_accepts(window, ratio):
                break
        if threshold is None or attempt == crop_retry.MAX_CHECKS:
            break
        if np.sum(window == rcs_class) > threshold:
            break
    return run_seed.numpy(), u, attempt, draw, window


def _scene(shape=(48, 80)) -> np.ndarray:
    """Mostly road (0), sidewalk (1) bottom-left, 255 on top, a rare class 5 in a 10x12 box."""
    label = np.zeros(shape, np.uint8)
    label[:4] = 255
    label[20:, :30] = 1
    label[6:16, 60:72] = 5
    return label


def test_crop_retry_matches_a_numpy_reimplementation():
    """Per example seed: the (run, crop) that `choose` keeps is the reference's, and the view
    `augment_view` returns is that window of the scaled label (flipped where drawn)."""
    label = _scene()
    sizes = {"base_size": (48, 80), "crop_size": (16, 24), "random_scale": (0.75, 1.25)}
    key = tf.constant(augment.stream_key((2, 0)))

    # Traced, as in the tf.data decode (and ~10x faster than eager while loops); no autograph:
    # the code has no Python control flow on tensors, and converting it takes seconds.
    @tf.function(autograph=False)
    def choose(seed, ratio, rcs_class, threshold):
        return crop_retry.choose(
            tf.constant(label),
            seed,
            cat_max_ratio=ratio,
            rcs_class=rcs_class,
            rcs_min_crop_pixels=threshold,
            **sizes,
        )

    @tf.function(autograph=False)
    def augment_view(seed):
        return crop_retry.augment_view(
            tf.zeros([48, 80, 3]),
            tf.constant(label),
            seed,
            flip_prob=0.5,
            cat_max_ratio=0.75,
            rcs_min_crop_pixels=30.0,
            rcs_class=tf.constant(5, tf.int64),
            **sizes,
        )

    def both(seed, ratio, rcs_class, threshold):
        """(choose's (seed, crop draw), the reference's (seed, draw, attempt, draw, window))."""
        got = choose(seed, ratio, rcs_class, threshold)
        ref = _reference_choose(label, seed, *sizes.values(), ratio, rcs_class, threshold)
        np.testing.assert_array_equal(got[0].numpy(), ref[0])
        np.testing.assert_array_equal(got[1].numpy(), ref[1])
        return ref

    attempts, draws, hits, plain_hits = [], [], 0, 0
    for position in range(40):
        seed = augment.example_seed(key, position)
        *_, attempt, draw, window = both(seed, 0.75, 5, 30.0)
        attempts.append(attempt)
        draws.append(draw)
        hits += np.sum(window == 5) > 30
        plain_hits += np.sum(both(seed, 0.0, None, None)[4] == 5) > 30
        out = augment_view(seed)
        view = out.label.numpy()
        np.testing.assert_array_equal(view[:, ::-1] if out.flip else view, window)
    # The loops ran: retried runs and re-drawn crops.
    assert 0 < np.mean(np.array(attempts) > 0) < 1 and max(draws) > 0
    assert hits > 2 * plain_hits and hits >= 0.7 * 40
    # Rules that never pass: the 11th run, or crop draw, is kept unchecked.
    last = crop_retry.MAX_CHECKS
    for position in range(2):
        seed = augment.example_seed(key, position)
        assert both(seed, 0.0, 5, 1e9)[2:4] == (last, 0)
        assert both(seed, 0.01, None, None)[2:4] == (0, last)
        assert both(seed, 0.01, 5, 1e9)[2:4] == (last, last)


def test_no_rule_leaves_the_augmentation_unchanged():
    label = tf.constant(_scene())
    kwargs = {
        "base_size": (48, 80),
        "crop_size": (16, 24),
        "random_scale": (0.75, 1.25),
        "flip_prob": 0.5,
    }
    key = tf.constant(augment.stream_key((2, 0)))
    for position in range(3):
        seed = augment.example_seed(key, position)
        image = tf.random.stateless_uniform([48, 80, 3], seed=seed, maxval=255.0)
        plain = augment.augment(image, label, seed, **kwargs)
        for rules in ({}, {"rcs_class": tf.constant(5, tf.int64)}, {"rcs_min_crop_pixels": 1.0}):
            got = crop_retry.augment_view(image, label, seed, **rules, **kwargs)
            for a, b in zip(plain, got, strict=True):
                np.testing.assert_array_equal(a, b)
        # A rule that accepts the first draw gives the same view too.
        kept = crop_retry.augment_view(
            image, label, seed, rcs_class=tf.constant(-1), rcs_min_crop_pixels=1.0, **kwargs
        )
        for a, b in zip(plain, kept, strict=True):
            np.testing.assert_array_equal(a, b)


def _decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def test_rare_class_stream_through_the_pipeline(data_dir):
    """The tiny benchmark's source images (32x64), 16x24 crops, flips,
    cat_max_ratio 0.75, RCS with min_pixels 40 (threshold 20): each position's image and
    'rcs_class' are the plan's, its crop is the NumPy reference's, and it resumes exactly."""
    from tests.conftest import tiny_config

    config = tiny_config(data_dir=data_dir)
    stream = config.data.source
    # No random scale: the retry test above covers it exactly (traced); it is left out here to
    # keep this test's two decode traces short.
    stream.crop_size, stream.flip = (16, 24), True
    stream.rare_class = {"min_pixels": 40, "temperature": 0.1}
    stream.crop_cat_max_ratio = 0.75
    reader = input_pipeline.open_reader(stream, config.data)
    seed = (3, 0)
    plan = rare_class.load_plan(reader, stream, config.data, seed, input_pipeline._label_table)
    assert len(plan.classes) >= 5
    batches = input_pipeline.train_iterator(
        reader, stream, config.data, global_batch_size=8, seed=seed, start=0
    )
    got = [next(batches) for _ in range(2)]
    key = tf.constant(augment.stream_key(seed))
    for position in range(16):
        batch, row = got[position // 8], position % 8
        class_id, image = plan.item(position)
        assert batch["index"][row] == image and batch["rcs_class"][row] == class_id
        label = _decode(reader[image]["label"])
        *_, window = _reference_choose(
            label,
            augment.example_seed(key, position),
            label.shape,
            (16, 24),
            (),
            0.75,
            class_id,
            20.0,
        )
        view = batch["label"][row]
        np.testing.assert_array_equal(view[:, ::-1] if batch["flip"][row] else view, window)
    assert got[0]["rcs_class"].dtype == np.int64
    resumed = input_pipeline.train_iterator(
        reader, stream, config.data, global_batch_size=8, seed=seed, start=8
    )
    again = next(resumed)
    for name in ("label", "index", "rcs_class", "image"):
        np.testing.assert_array_equal(again[name], got[1][name])


def test_group_batches_repeat_the_rare_class_per_view():
    """DA-SAC's groups flatten to rows of views: 'rcs_class' is repeated per view, as 'index'."""
    from jaxda.data import view_groups

    batch = {
        "group": {"image": tf.zeros([2, 3, 4, 4, 3]), "label": tf.zeros([2, 3, 4, 4], tf.uint8)},
        "index": tf.constant([7, 9], tf.int64),
        "rcs_class": tf.constant([5, 12], tf.int64),
    }
    rows = view_groups.flatten_batch(batch)
    assert rows["group"]["image"].shape == (6, 4, 4, 3)
    assert rows["index"].numpy().tolist() == [7, 7, 7, 9, 9, 9]
    assert rows["rcs_class"].numpy().tolist() == [5, 5, 5, 12, 12, 12]
