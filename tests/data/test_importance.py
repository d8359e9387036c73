"""DA-SAC's importance sampling (jaxda/data/importance.py) against direct NumPy formulas and
da-sac's bisect_left draw; its statistics over a sampled stream; exact resume; load errors."""

import bisect
import itertools
import json
import os

import numpy as np
import pytest

from jaxda.data import importance, input_pipeline


def _counts(rng, n=6, c=3):
    counts = rng.integers(0, 100, (n, c))
    counts[0, 1] = 0  # An image without a class.
    return counts


def _expected_p(counts, prior, uniform_classes=()):
    """[C, N] p_c(i) written out: u / N + (1 - u) * counts / class total; 1 / N if uniform."""
    n, c = counts.shape
    p = np.zeros((c, n))
    for k in range(c):
        total = counts[:, k].sum()
        for i in range(n):
            if k in uniform_classes or total == 0:
                p[k, i] = 1 / n
            else:
                p[k, i] = prior / n + (1 - prior) * counts[i, k] / total
    return p


def test_fractions_and_tables_match_numpy():
    rng = np.random.default_rng(0)
    counts = _counts(rng, 7, 5)
    fractions = importance.class_fractions(counts)
    assert fractions.dtype == np.float64 and fractions.shape == (7, 5)
    np.testing.assert_allclose(fractions, counts / counts.sum(0, keepdims=True), rtol=1e-15)
    tables = importance.cumulative_tables(fractions, 0.25, uniform_classes=(3,))
    assert tables.shape == (5, 7) and tables.dtype == np.float64
    expected = _expected_p(counts, 0.25, uniform_classes=(3,))
    np.testing.assert_allclose(np.diff(tables, prepend=0, axis=1), expected, atol=1e-15)
    np.testing.assert_array_equal(tables[:, -1], 1.0)  # Exactly.
    np.testing.assert_allclose(tables[3], np.arange(1, 8) / 7)  # The uniform class.


def test_a_class_without_pixels_is_sampled_uniformly():
    counts = np.array([[5, 0, 1], [0, 0, 2], [3, 0, 0], [1, 0, 9]])
    fractions = importance.class_fractions(counts)
    np.testing.assert_array_equal(fractions[:, 1], 0)  # No division by zero.
    tables = importance.cumulative_tables(fractions, 0.25)
    np.testing.assert_allclose(tables[1], [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(np.diff(tables, prepend=0, axis=1), _expected_p(counts, 0.25))
    # With no prior the other classes never draw the images without their pixels.
    np.testing.assert_allclose(
        np.diff(importance.cumulative_tables(fractions, 0.0)[0]), [0, 3 / 9, 1 / 9]
    )


def test_invalid_tables_arguments_are_refused():
    fractions = importance.class_fractions(np.ones((3, 2)))
    with pytest.raises(ValueError, match="uniform_classes"):
        importance.cumulative_tables(fractions, 0.25, uniform_classes=(2,))
    with pytest.raises(ValueError, match="uniform_prior"):
        importance.cumulative_tables(fractions, 1.5)
    with pytest.raises(ValueError, match="sum to 1"):
        importance.cumulative_tables(np.ones((3, 2)), 0.25)
    with pytest.raises(ValueError, match="non-negative"):
        importance.class_fractions(-np.ones((3, 2)))


def test_draw_is_bisect_left_at_the_boundaries():
    # Weights [0.25, 0, 0.5, 0.25]: image 1 has none.
    counts = np.array([[1], [0], [2], [1]])
    tables = importance.cumulative_tables(importance.class_fractions(counts), 0.0)
    np.testing.assert_array_equal(tables[0], [0.25, 0.25, 0.75, 1.0])
    cases = {0.0: 0, 0.1: 0, 0.25: 0, np.nextafter(0.25, 1): 2, 0.75: 2, 0.7500001: 3}
    cases[np.nextafter(1.0, 0)] = 3
    for u, index in cases.items():
        assert importance.draw(tables, 0, u) == index, u
        assert bisect.bisect_left(list(tables[0]), u) == index, u


def _stream(tables, seed, start, global_batch_size=4, process_slice=slice(0, 4)):
    samples = input_pipeline.sample_indices(
        tables.shape[1],
        seed=seed,
        start=start,
        global_batch_size=global_batch_size,
        process_slice=process_slice,
    )
    return importance.importance_indices(samples, tables, seed)


def test_sampled_stream_statistics_match_the_distributions():
    """N = 6 images, C = 3 classes (class 2 uniform), u = 0.25, 30,000 positions."""
    n, c, num, prior = 6, 3, 30_000, 0.25
    counts = np.array([[10, 0, 4], [30, 5, 4], [0, 5, 4], [60, 0, 4], [0, 80, 4], [0, 10, 4]])
    tables = importance.cumulative_tables(importance.class_fractions(counts), prior, (2,))
    seed = (7, 1)
    positions, drawn = zip(*itertools.islice(_stream(tables, seed, 0), num), strict=True)
    assert positions == tuple(range(num))
    # The class of each position is its shuffled index % C (recomputed from sample_indices).
    shuffled = [i for _, i in itertools.islice(_stream_indices(n, seed), num)]
    classes = np.array(shuffled) % c
    drawn = np.array(drawn)
    # Class frequencies: every epoch visits each of the 6 indices once, so each class gets
    # exactly 2 of every 6 positions: 1 / C with no sampling error (tolerance 0).
    np.testing.assert_array_equal(np.bincount(classes, minlength=c), [num // c] * c)
    # Per class, the images' frequencies vs p_c = u / N + (1 - u) * frac (uniform for class 2):
    # each is a binomial proportion over m = 10,000 draws, std sqrt(p (1 - p) / m) <= 0.005;
    # allowed: 5 std per cell (with a fixed seed the test is deterministic anyway).
    expected = _expected_p(counts, prior, uniform_classes=(2,))
    for k in range(c):
        picks = drawn[classes == k]
        m = len(picks)
        frequency = np.bincount(picks, minlength=n) / m
        tolerance = 5 * np.sqrt(expected[k] * (1 - expected[k]) / m)
        assert np.all(np.abs(frequency - expected[k]) <= tolerance), (k, frequency, expected[k])
    # Image 3 (60 of class 0's 100 pixels) dominates class 0; image 2 (none) only gets u / N.
    assert expected[0, 3] == pytest.approx(0.25 / 6 + 0.75 * 0.6)
    assert expected[0, 2] == pytest.approx(0.25 / 6)


def _stream_indices(n, seed):
    return input_pipeline.sample_indices(
        n, seed=seed, start=0, global_batch_size=4, process_slice=slice(0, 4)
    )


def test_resume_continues_the_same_sequence_and_processes_agree():
    counts = np.random.default_rng(3).integers(0, 50, (10, 4))
    tables = importance.cumulative_tables(importance.class_fractions(counts), 0.25)
    seed = (1234, 1)
    full = list(itertools.islice(_stream(tables, seed, 0), 200))
    for k in (1, 37, 120):
        assert list(itertools.islice(_stream(tables, seed, k), 200 - k)) == full[k:]
    # Two processes of a global batch of 4, each reading its half: the same draws.
    halves = [
        list(itertools.islice(_stream(tables, seed, 0, 4, s), 100))
        for s in (slice(0, 2), slice(2, 4))
    ]
    assert sorted(halves[0] + halves[1]) == full
    # Another seed: another sequence.
    other = list(itertools.islice(_stream(tables, (1234, 2), 0), 200))
    assert [i for _, i in other] != [i for _, i in full]


def _write_pass(path, counts, manifest=True):
    os.makedirs(path)
    np.save(os.path.join(path, importance.COUNTS_FILE), counts)
    if manifest:
        with open(os.path.join(path, importance.MANIFEST_FILE), "w") as f:
            json.dump({"num_examples": len(counts), "outputs": {"class_pixels": {}}}, f)


def test_load_tables_from_a_pass_or_a_file(tmp_path):
    counts = np.random.default_rng(4).integers(0, 50, (5, 3)).astype(np.int32)
    config = {"weights": str(tmp_path / "pass"), "uniform_prior": 0.5, "uniform_classes": (1,)}
    _write_pass(config["weights"], counts)
    tables = importance.load_tables(config, 5, "target")
    expected = importance.cumulative_tables(importance.class_fractions(counts), 0.5, (1,))
    np.testing.assert_array_equal(tables, expected)
    np.save(tmp_path / "counts.npy", counts)
    config["weights"] = str(tmp_path / "counts.npy")
    np.testing.assert_array_equal(importance.load_tables(config, 5, "target"), expected)
    assert importance.load_tables({"weights": ""}, 5, "target") is None
    assert importance.load_tables({}, 5, "target") is None


def test_load_tables_errors(tmp_path):
    counts = np.ones((5, 3), np.int32)
    incomplete = str(tmp_path / "incomplete")
    _write_pass(incomplete, counts, manifest=False)
    with pytest.raises(FileNotFoundError, match=r"incomplete.*manifest.json.*dasac_class_pixels"):
        importance.load_tables({"weights": incomplete}, 5, "target")
    other = str(tmp_path / "other_pass")
    _write_pass(other, counts)
    os.remove(os.path.join(other, importance.COUNTS_FILE))
    with pytest.raises(FileNotFoundError, match=r"class_pixels\.npy"):
        importance.load_tables({"weights": other}, 5, "target")
    complete = str(tmp_path / "complete")
    _write_pass(complete, counts)
    with pytest.raises(ValueError, match=r"5 images.*has 6.*'target'|'target'.*5 images.*has 6"):
        importance.load_tables({"weights": complete}, 6, "target")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        importance.load_tables({"weights": str(tmp_path / "missing.npy")}, 5, "target")
    for name, bad, match in (("negative", -counts, "negative"), ("flat", counts[0], "shape")):
        np.save(tmp_path / f"{name}.npy", bad)
        with pytest.raises(ValueError, match=match):
            importance.load_tables({"weights": str(tmp_path / f"{name}.npy")}, 5, "target")


def test_training_stream_draws_by_importance(data_dir, tmp_path):
    """config.data.<stream>.importance in the real pipeline: with no uniform prior, each
    class's images are drawn in proportion to their share of its pixels, so a class whose
    pixels all lie in one image always yields that image; resume gives the same draws."""
    from tests.conftest import tiny_config

    config = tiny_config(data_dir=data_dir)
    stream = config.data.target
    reader = input_pipeline.open_reader(stream, config.data)
    n = len(reader)
    counts = np.zeros((n, 2), np.int64)
    counts[3, 0] = 50  # Class 0: image 3 only.
    counts[[5, 7], 1] = 10  # Class 1: images 5 and 7, half and half.
    np.save(tmp_path / "counts.npy", counts)
    stream.importance = {"weights": str(tmp_path / "counts.npy"), "uniform_prior": 0.0}

    def indices(start, steps):
        batches = input_pipeline.train_iterator(
            reader, stream, config.data, global_batch_size=4, seed=(3, 1), start=start
        )
        return np.concatenate([next(batches)["index"] for _ in range(steps)])

    drawn = indices(0, 30)
    classes = (
        np.concatenate([input_pipeline._permutation(n, (3, 1), e) for e in range(-(-120 // n))])[
            :120
        ]
        % 2
    )  # The class of each position: its shuffled index % C.
    assert set(drawn[classes == 0]) == {3}
    assert set(drawn[classes == 1]) == {5, 7}
    assert 0.3 < np.mean(drawn[classes == 1] == 5) < 0.7
    np.testing.assert_array_equal(indices(40, 5), drawn[40:60])
