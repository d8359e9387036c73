"""RobustNet's class-uniform sampling (jaxda/data/class_uniform.py): centroids against scipy and
NumPy, the centroid cache, the epoch plan's counts and exact resume, the centroid-covering crop
against RobustNet's rule, and a class-uniform stream through the real pipeline."""

import io
import itertools

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from scipy import ndimage

from jaxda.data import augment, class_uniform, input_pipeline, label_sampling, labels


def _png(label: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(label.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _label(seed=0, shape=(40, 70)) -> np.ndarray:
    """Rectangles of classes 0..6 over a random background of 0..5 and 255 (ignore)."""
    rng = np.random.default_rng(seed)
    label = rng.choice([0, 1, 2, 3, 4, 5, 255], shape).astype(np.uint8)
    for c in range(7):
        y, x = rng.integers(0, shape[0] - 6), rng.integers(0, shape[1] - 6)
        label[y : y + rng.integers(2, 9), x : x + rng.integers(2, 12)] = c
    return label


def _centroids_scipy(label, tile, num_classes):
    """RobustNet's loop: whole tiles row by row, `class_id in patch`, scipy's centre of mass."""
    out = []
    for y0 in range(0, label.shape[0] // tile * tile, tile):
        for x0 in range(0, label.shape[1] // tile * tile, tile):
            patch = label[y0 : y0 + tile, x0 : x0 + tile]
            for c in range(num_classes):
                if c in patch:
                    cy, cx = ndimage.center_of_mass((patch == c).astype(int))
                    out.append((c, int(cx) + x0, int(cy) + y0))
    return out


def _centroids_numpy(label, tile, num_classes):
    """The same from the pixel coordinates' means, tile by tile."""
    out = []
    for ty, tx in itertools.product(range(label.shape[0] // tile), range(label.shape[1] // tile)):
        patch = label[ty * tile : (ty + 1) * tile, tx * tile : (tx + 1) * tile]
        for c in sorted(set(patch.ravel().tolist()) & set(range(num_classes))):
            ys, xs = np.nonzero(patch == c)
            out.append((c, int(xs.mean()) + tx * tile, int(ys.mean()) + ty * tile))
    return out


def test_tile_centroids_match_scipy_and_numpy():
    for seed in range(3):
        label = _label(seed)  # 40x70: whole 16-tiles cover rows 0..31, columns 0..63.
        label[32:, :] = 6  # Class 6 only outside the whole tiles (and in its rectangle).
        label[:, 64:] = 6
        for tile, num_classes in ((16, 7), (8, 6), (40, 7)):
            got = class_uniform.tile_centroids(label, tile, num_classes)
            assert got == _centroids_scipy(label, tile, num_classes)
            assert got == _centroids_numpy(label, tile, num_classes)
    # Two tiles; class 1 an L shape whose centre of mass (truncated) is off the class.
    label = np.full((8, 16), 255, np.uint8)
    label[0:8, 0] = label[7, 0:8] = 1
    label[2:4, 9:12] = 0
    got = class_uniform.tile_centroids(label, 8, 19)
    assert got == [(1, 1, 5), (0, 10, 2)]  # (class, x, y); x = 28 / 15, y = 77 / 15.
    assert label[5, 1] == 255
    assert class_uniform.tile_centroids(label, 9, 19) == []  # No whole tile.


class _Reader(list):
    """A SplitReader stand-in over encoded labels."""

    name, split, subset, label_key = "fake/1", "train", "", "label"

    def __getitem__(self, index):
        return {"image": b"image%d" % index, "label": super().__getitem__(index)}


def test_centroid_table_is_cached_and_checked(tmp_path, monkeypatch):
    raw = [_label(s, (32, 48)) for s in range(4)]
    raw[2][:] = 255  # No class at all.
    # Stored as Cityscapes label ids: train id t is label id ids[t]; the map brings them back.
    ids = {t: i for i, t in labels.CITYSCAPES_LABEL_TO_TRAIN_ID.items()}
    stored = [np.vectorize(lambda v: ids.get(v, 0))(r).astype(np.uint8) for r in raw]
    reader = _Reader([_png(s) for s in stored])
    lookup = labels.lookup_table(labels.CITYSCAPES_LABEL_TO_TRAIN_ID)
    table = class_uniform.cached_table(reader, str(tmp_path), "cityscapes_label_ids", 16, lookup)
    rows = [(i, *c) for i, r in enumerate(raw) for c in class_uniform.tile_centroids(r, 16, 19)]
    expected = np.array(rows).T
    for column, values in zip(("image", "class_id", "x", "y"), expected, strict=True):
        np.testing.assert_array_equal(getattr(table, column), values)
    np.testing.assert_array_equal(table.label_size, [[32, 48]] * 4)
    assert 2 not in table.image and len(table.image) > 20
    # Cached: the second call reads the file.
    assert len(list(tmp_path.glob("class_centroids-train-cityscapes_label_ids-tile16.npz"))) == 1
    monkeypatch.setattr(class_uniform, "compute_table", None)
    again = class_uniform.cached_table(reader, str(tmp_path), "cityscapes_label_ids", 16, lookup)
    for a, b in zip(table, again, strict=True):
        np.testing.assert_array_equal(a, b)
    # A cache of another dataset or split under this name is refused.
    other = _Reader(reader)
    other.name = "other/1"
    with pytest.raises(ValueError, match=r"belongs to .*fake/1.*not to .*other/1.*delete"):
        class_uniform.cached_table(other, str(tmp_path), "cityscapes_label_ids", 16, lookup)
    shorter = _Reader(list(reader)[:3])
    with pytest.raises(ValueError, match=r"'num_images': 4.*not to .*'num_images': 3"):
        class_uniform.cached_table(shorter, str(tmp_path), "cityscapes_label_ids", 16, lookup)


def _table(num_images=40, per_class=(2, 10, 0, 1, 6), seed=0) -> class_uniform.CentroidTable:
    """A hand-made table: class c has per_class[c] centroids on random images."""
    rng = np.random.default_rng(seed)
    rows = [
        (rng.integers(num_images), c, rng.integers(100), rng.integers(50))
        for c, n in enumerate(per_class)
        for _ in range(n)
    ]
    rows.sort(key=lambda r: r[0])  # Image order, as computed.
    columns = np.array(rows, np.int32).T
    return class_uniform.CentroidTable(*columns, np.tile([[50, 100]], (num_images, 1)))


def test_epoch_plan_counts_follow_robustnet():
    table = _table()
    # N = 40, C = 5, p = 0.5: int(40 * 0.5 / 5) = 4 per class, 40 - 20 = 20 random images.
    assert class_uniform.epoch_counts(40, 5, 0.5) == (20, 4)
    assert class_uniform.epoch_counts(2975, 19, 0.5) == (2975 - 78 * 19, 78)
    items = class_uniform.build_epoch(table, 5, 0.5, (1, 2), 0)
    # Class 2 has no centroid: skipped, so 20 + 4 * 4 items.
    assert len(items.image) == 36
    assert class_uniform.Plan(table, 0.5, (1, 2), num_classes=5).epoch_length == 36
    rand = slice(0, 20)
    assert len(set(items.image[rand].tolist())) == 20  # Distinct random images ...
    assert set(items.class_id[rand]) == set(items.y[rand]) == set(items.x[rand]) == {-1}
    blocks = {c: slice(20 + 4 * k, 24 + 4 * k) for k, c in enumerate((0, 1, 3, 4))}
    for c, block in blocks.items():
        assert set(items.class_id[block]) == {c}
        centroids = {
            (i, y, x)
            for i, k, x, y in zip(table.image, table.class_id, table.x, table.y, strict=True)
            if k == c
        }
        picked = list(zip(items.image[block], items.y[block], items.x[block], strict=True))
        assert set(picked) <= centroids
        if len(centroids) >= 4:
            assert len(set(picked)) == 4  # A shuffled list, no repeats ...
        else:  # ... wrapping around when shorter: each centroid equally often, in a cycle.
            n = len(centroids)
            assert set(picked[:n]) == centroids and picked == (picked[:n] * 4)[:4]


def test_epoch_plan_is_a_pure_function_of_seed_and_epoch():
    table = _table()
    first = class_uniform.build_epoch(table, 5, 0.5, (1, 2), 3)
    same = class_uniform.build_epoch(table, 5, 0.5, (1, 2), 3)
    for a, b in zip(first, same, strict=True):
        np.testing.assert_array_equal(a, b)
    for seed, epoch in (((1, 2), 4), ((1, 3), 3)):
        other = class_uniform.build_epoch(table, 5, 0.5, seed, epoch)
        assert not np.array_equal(first.image, other.image)
        assert not np.array_equal(first.x, other.x)


def _stream(reader, plan, seed, start, process_slice=slice(0, 4)):
    samples = input_pipeline.sample_indices(
        plan.epoch_length,
        seed=seed,
        start=start,
        global_batch_size=4,
        process_slice=process_slice,
    )
    for example in label_sampling.examples(reader, samples, plan):
        yield example["position"], example["index"], tuple(example["centroid"].tolist())


def test_stream_items_resume_exactly_and_match_a_recomputation():
    table = _table(num_images=30, per_class=(3, 7, 0, 1, 5))
    reader = _Reader([b""] * 30)
    seed = (5, 1)
    plan = class_uniform.Plan(table, 0.5, seed, num_classes=5)
    length = plan.epoch_length  # 30 - 15 + 3 * 4 = 27: positions 0..99 span 4 epochs.
    assert length == 27
    full = list(itertools.islice(_stream(reader, plan, seed, 0), 100))
    for position, image, centroid in full:  # From scratch: epoch list, then its permutation.
        epoch = position // length
        items = class_uniform.build_epoch(table, 5, 0.5, seed, epoch)
        k = input_pipeline._permutation(length, seed, epoch)[position % length]
        assert image == items.image[k]
        assert centroid == (items.y[k], items.x[k], 50, 100)
    for start in (1, 26, 27, 61):  # A fresh plan, as a resumed run builds it.
        fresh = class_uniform.Plan(table, 0.5, seed, num_classes=5)
        assert (
            list(itertools.islice(_stream(reader, fresh, seed, start), 100 - start)) == full[start:]
        )
    halves = [
        list(itertools.islice(_stream(reader, plan, seed, 0, s), 50))
        for s in (slice(0, 2), slice(2, 4))
    ]
    assert sorted(halves[0] + halves[1]) == full
    # Each epoch: every item of its list once.
    epoch = sorted((i, c) for p, i, c in full if p // length == 1)
    items = class_uniform.build_epoch(table, 5, 0.5, seed, 1)
    listed = [(i, (y, x, 50, 100)) for i, y, x in zip(items.image, items.y, items.x, strict=True)]
    assert epoch == sorted(listed)


def _starts(shape, crop_size, centroid, m=3):
    """The crop starts over a grid of u: m per RobustNet draw d in 0..crop (and per axis)."""
    image = tf.zeros([*shape, 3])
    label = tf.zeros(shape, tf.uint8)
    starts = []
    for axis in (0, 1):
        n = (crop_size[axis] + 1) * m
        axis_starts = []
        for i in range(n):
            u = [0.5, 0.5]
            u[axis] = (i + 0.5) / n  # floor(u * (crop + 1)) = i // m.
            start = augment.crop(image, label, crop_size, *map(tf.constant, u), centroid)[3]
            axis_starts.append(int(start[axis]))
        starts.append(axis_starts)
    return starts


def test_crop_covers_the_centroid_with_robustnets_start_distribution():
    shape, crop_size = (10, 30), (6, 8)
    for cy, cx in ((0, 0), (3, 5), (9, 29), (5, 12), (7, 22)):
        starts = _starts(shape, crop_size, tf.constant([cy, cx]))
        for axis, c in enumerate((cy, cx)):
            size, excess = crop_size[axis], shape[axis] - crop_size[axis]
            # RobustNet: x1 = randint(c - tw, c), then min(max_x, max(0, x1)).
            expected = [
                min(excess, max(0, c - size + d)) for d in range(size + 1) for _ in range(3)
            ]
            assert sorted(starts[axis]) == sorted(expected)
            assert all(0 <= s <= excess and s <= c <= s + size for s in starts[axis])
            # c lies inside [s, s + size) except after the draw c - size (left unclamped).
            outside = [s for s in starts[axis] if s + size == c]
            assert len(outside) == (3 if c - size >= 0 else 0)
    # No centroid (-1): the plain draws; an axis shorter than the crop keeps its padding draws.
    plain = _starts(shape, crop_size, None)
    assert _starts(shape, crop_size, tf.constant([-1, -1])) == plain
    assert (
        _starts((4, 30), crop_size, tf.constant([2, 5]))[0] == _starts((4, 30), crop_size, None)[0]
    )


def _blocks(shape=(36, 60), block=6, seed=0):
    classes = np.random.default_rng(seed).integers(0, 19, (shape[0] // block, shape[1] // block))
    label = np.kron(classes, np.ones((block, block), np.int64)).astype(np.uint8)
    return tf.constant(np.stack([label] * 3, -1).astype(np.float32)), tf.constant(label)


def test_augment_crops_around_the_scaled_centroid():
    image, label = _blocks()
    crop_size, low_high = (16, 20), (0.6, 1.6)
    key = tf.constant(augment.stream_key((9, 0)))
    kwargs = {"random_scale": low_high, "crop_size": crop_size}
    for position in range(24):
        seed = augment.example_seed(key, position)
        cy, cx = (7 * position) % 36, (13 * position) % 60
        # Measured at twice the base frame's size: moved to the base frame first.
        centroid = tf.constant([2 * cy, 2 * cx, 72, 120])
        out = augment.augment(image, label, seed, base_size=(36, 60), centroid=centroid, **kwargs)
        factor = np.float32(low_high[0]) + np.float32(1.0) * augment.uniforms(seed).numpy()[0]
        scaled_size = np.round(factor * np.array([36, 60], np.float32)).astype(int)
        scaled_label = augment.resize_nearest(label, scaled_size).numpy()
        expected = np.floor(np.array([cy, cx]) * np.float64(factor)).astype(int)
        expected = np.minimum(expected, scaled_size - 1)
        start = np.round(out.box.numpy()[:2] * scaled_size).astype(int)
        for axis in (0, 1):
            if scaled_size[axis] > crop_size[axis]:
                assert start[axis] <= expected[axis] <= start[axis] + crop_size[axis]
                assert 0 <= start[axis] <= scaled_size[axis] - crop_size[axis]
        inside = expected - start
        if np.all((inside >= 0) & (inside < crop_size)) and np.all(scaled_size >= crop_size):
            assert out.label.numpy()[tuple(inside)] == scaled_label[tuple(expected)]
        # A centroid of -1 draws exactly as no centroid.
        none = augment.augment(
            image, label, seed, base_size=(36, 60), centroid=tf.constant([-1, -1, 36, 60]), **kwargs
        )
        plain = augment.augment(image, label, seed, base_size=(36, 60), **kwargs)
        for a, b in zip(none, plain, strict=True):
            np.testing.assert_array_equal(a, b)


def test_options_validation():
    assert class_uniform.stream_options({}, "s") is None
    assert class_uniform.stream_options({"tile": 16}, "s") == {"fraction": 0.5, "tile": 16}
    assert class_uniform.stream_options({"fraction": 1}, "s") == {"fraction": 1.0, "tile": 1024}
    for bad, match in (
        ({"pct": 0.5}, "accepts only"),
        ({"fraction": 0.0}, "fraction"),
        ({"fraction": 1.5}, "fraction"),
        ({"tile": 0}, "tile"),
        ({"tile": 16.0}, "tile"),
        ({"tile": True}, "tile"),
    ):
        with pytest.raises(ValueError, match=match):
            class_uniform.stream_options(bad, "data stream x:train")


def _decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def test_class_uniform_stream_through_the_pipeline(data_dir):
    """The tiny benchmark's 32 target images (32x64), fraction 1, tile 16: int(32 / 19) = 1
    item per class present and 32 - 19 = 13 random ones per epoch; crops of 16x24, no scale.

    Exact: each position's image and centroid are the recomputed plan's; the crop lies in the
    image and holds the centroid (or has it just past its far edge); where it holds it, the
    crop's label there is the original label there. Not exact (a centre of mass can fall off
    its class): the label at the centroid is the planned class for most centroid items."""
    from tests.conftest import tiny_config

    config = tiny_config(data_dir=data_dir)
    stream = config.data.target
    stream.crop_size, stream.flip = (16, 24), False
    stream.class_uniform = {"tile": 16, "fraction": 1.0}
    reader = input_pipeline.open_reader(stream, config.data)
    originals = [_decode(reader[i]["label"]) for i in range(len(reader))]
    present = {c for lab in originals for c, *_ in class_uniform.tile_centroids(lab, 16, 19)}
    seed = (3, 1)
    plan = class_uniform.load_plan(reader, stream, config.data, seed, input_pipeline._label_table)
    assert plan.epoch_length == 13 + len(present)

    batches = input_pipeline.train_iterator(
        reader, stream, config.data, global_batch_size=8, seed=seed, start=0
    )
    num = 8 * (-(-2 * plan.epoch_length // 8))  # Two epochs.
    got = [next(batches) for _ in range(num // 8)]
    index, box, crops = (np.concatenate([b[k] for b in got]) for k in ("index", "box", "label"))
    on_class = centroid_items = 0
    for position in range(num):
        epoch, offset = divmod(position, plan.epoch_length)
        items = class_uniform.build_epoch(plan.table, 19, 1.0, seed, epoch)
        k = input_pipeline._permutation(plan.epoch_length, seed, epoch)[offset]
        assert index[position] == items.image[k]
        if items.class_id[k] < 0:
            continue
        centroid_items += epoch < 2
        c = np.array([items.y[k], items.x[k]])
        original = originals[items.image[k]]
        assert (items.class_id[k], items.x[k], items.y[k]) in _centroids_scipy(original, 16, 19)
        start = np.round(box[position, :2] * [32, 64]).astype(int)
        assert np.all((start >= 0) & (start <= [16, 40]))
        end = start + np.array([16, 24])
        assert np.all((start <= c) & (c <= end))
        if np.all(c < end):
            assert crops[position][tuple(c - start)] == original[tuple(c)]
            on_class += original[tuple(c)] == items.class_id[k]
    assert centroid_items == 2 * len(present)
    assert on_class > centroid_items / 2
    # Resumed mid-stream: the same batches.
    resumed = input_pipeline.train_iterator(
        reader, stream, config.data, global_batch_size=8, seed=seed, start=16
    )
    np.testing.assert_array_equal(next(resumed)["label"], got[2]["label"])


def test_scaled_stream_crops_cover_the_scaled_centroid(data_dir):
    """Images resized to 24x48 (from 32x64) and scaled by U(0.75, 1.25): the crop covers the
    centroid at floor(c * factor * 24 / 32), the factor recomputed from the example's draws."""
    from tests.conftest import tiny_config

    config = tiny_config(data_dir=data_dir)
    stream = config.data.target
    stream.size, stream.random_scale, stream.crop_size = (24, 48), (0.75, 1.25), (16, 24)
    stream.class_uniform = {"tile": 16, "fraction": 1.0}
    reader = input_pipeline.open_reader(stream, config.data)
    seed = (4, 1)
    plan = class_uniform.load_plan(reader, stream, config.data, seed, input_pipeline._label_table)
    batches = input_pipeline.train_iterator(
        reader, stream, config.data, global_batch_size=8, seed=seed, start=0
    )
    box = np.concatenate([next(batches)["box"] for _ in range(3)])
    items = class_uniform.build_epoch(plan.table, 19, 1.0, seed, 0)
    order = input_pipeline._permutation(plan.epoch_length, seed, 0)
    key = tf.constant(augment.stream_key(seed))
    checked = 0
    for position in range(min(24, plan.epoch_length)):
        k = order[position]
        if items.class_id[k] < 0:
            continue
        u = augment.uniforms(augment.example_seed(key, position)).numpy()[0]
        factor = np.float32(0.75) + np.float32(0.5) * u
        scaled_size = np.round(factor * np.array([24, 48], np.float32)).astype(int)
        c = np.floor(np.array([items.y[k], items.x[k]]) * (np.float64(factor) * 0.75))
        c = np.minimum(c.astype(int), scaled_size - 1)
        start = np.round(box[position, :2] * scaled_size).astype(int)
        for axis, crop in enumerate((16, 24)):
            if scaled_size[axis] > crop:
                assert start[axis] <= c[axis] <= start[axis] + crop
                assert 0 <= start[axis] <= scaled_size[axis] - crop
                checked += 1
    assert checked >= 10


def test_load_plan_errors(data_dir):
    from tests.conftest import tiny_config

    config = tiny_config(data_dir=data_dir)
    stream = config.data.target
    reader = input_pipeline.open_reader(stream, config.data)

    def load():
        return class_uniform.load_plan(reader, stream, config.data, (1,), lambda _: None)

    assert load() is None  # Off by default.
    stream.class_uniform = {"tile": 16}
    with pytest.raises(ValueError, match="crop_size"):
        load()
    stream.crop_size = (16, 16)
    stream.class_uniform.tile = 64  # 32x64 labels: no whole 64x64 tile.
    with pytest.raises(ValueError, match=r"no class-uniform centroids.*tile=64.*\(32, 64\)"):
        load()
    stream.class_uniform.tile = 16
    stream.importance = {"weights": "counts.npy"}
    with pytest.raises(ValueError, match="exclude"):
        load()
