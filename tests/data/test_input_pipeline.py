"""Training streams are deterministic and resumable; evaluation covers each example once."""

import io

import jax
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from jaxda.data import augment, input_pipeline, sources
from tests.conftest import TINY_DATASET, tiny_config


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_sample_indices_resume_and_epochs():
    full = input_pipeline.sample_indices(
        10, seed=(3, 0), start=0, global_batch_size=4, process_slice=slice(0, 4)
    )
    stream = [index for _, index in _take(full, 30)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]  # A new permutation every epoch.
    resumed = input_pipeline.sample_indices(
        10, seed=(3, 0), start=12, global_batch_size=4, process_slice=slice(0, 4)
    )
    assert [index for _, index in _take(resumed, 18)] == stream[12:]


def test_process_slices_partition_the_global_batch():
    def stream(process_slice):
        it = input_pipeline.sample_indices(
            7, seed=(1, 1), start=4, global_batch_size=4, process_slice=process_slice
        )
        return _take(it, 6)

    first, second = stream(slice(0, 2)), stream(slice(2, 4))
    merged = sorted(first + second)
    whole = stream(slice(0, 4)) + _take(
        input_pipeline.sample_indices(
            7, seed=(1, 1), start=10, global_batch_size=4, process_slice=slice(0, 4)
        ),
        6,
    )
    assert merged == sorted(whole)


def _decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def test_train_iterator_is_deterministic_resumable_and_normalised(data_dir):
    config = tiny_config(data_dir=data_dir)

    def batches(start, n):
        reader = input_pipeline.open_reader(config.data.source, config.data)
        it = input_pipeline.train_iterator(
            reader, config.data.source, config.data, global_batch_size=8, seed=(5, 0), start=start
        )
        return _take(it, n)

    first = batches(0, 3)
    np.testing.assert_array_equal(batches(0, 3)[2]["image"], first[2]["image"])
    np.testing.assert_array_equal(batches(16, 1)[0]["label"], first[2]["label"])

    # Image = BGR(pixel) - Caffe mean, label = the stored train ids, for the sampled example.
    reader = sources.SplitReader(TINY_DATASET, "source_train", data_dir)
    sample = next(
        input_pipeline.sample_indices(
            len(reader), seed=(5, 0), start=0, global_batch_size=8, process_slice=slice(0, 8)
        )
    )[1]
    raw = reader[sample]
    expected = _decode(raw["image"])[..., ::-1].astype(np.float32) - np.array(
        config.data.image_mean, np.float32
    )
    np.testing.assert_allclose(first[0]["image"][0], expected, atol=1e-4)
    np.testing.assert_array_equal(first[0]["label"][0], _decode(raw["label"]).squeeze())
    # `index` names each example's place in the split, for joining per-example results.
    assert first[0]["index"].dtype == np.int64 and first[0]["index"][0] == sample
    for batch in first:
        for label, index in zip(batch["label"], batch["index"], strict=True):
            np.testing.assert_array_equal(label, _decode(reader[index]["label"]).squeeze())


def test_eval_iterator_pads_with_ignore_and_covers_every_example(data_dir):
    config = tiny_config(data_dir=data_dir)
    reader = input_pipeline.open_reader(config.data.eval, config.data)
    count, batches = input_pipeline.eval_iterator(
        reader, config.data.eval, config.data, global_batch_size=6
    )
    batches = list(batches)
    assert count == 16 and len(batches) == 3
    labels = np.concatenate([b["label"] for b in batches])
    assert (labels[16:] == 255).all() and (batches[-1]["image"][4:] == 0).all()
    reader = sources.SplitReader(TINY_DATASET, "target_validation", data_dir)
    for i in range(16):
        np.testing.assert_array_equal(labels[i], _decode(reader[i]["label"]).squeeze())


def test_resize_and_label_map():
    table = input_pipeline._label_table("cityscapes_label_ids")
    assert table[7] == 0 and table[33] == 18 and table[0] == 255 and table[34] == 255


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _pil_resize(array: np.ndarray, size, resample) -> np.ndarray:
    return np.asarray(Image.fromarray(array).resize((size[1], size[0]), resample))


def _pil_bicubic_by_axis(array: np.ndarray, size) -> np.ndarray:
    """PIL BICUBIC resizing the width, then the height: the classic Pillow order. (Pillow 13
    sometimes starts with the height when it shrinks more than the width.)"""
    wide = _pil_resize(array, (array.shape[0], size[1]), Image.BICUBIC)
    return _pil_resize(wide, size, Image.BICUBIC)


# (input (height, width), size): Cityscapes and GTA5 to their training sizes, SYNTHIA at its
# own size, and an upsampling.
RESIZES = [
    ((1024, 2048), (512, 1024)),
    ((1052, 1914), (720, 1280)),
    ((760, 1280), (760, 1280)),
    ((360, 640), (720, 1280)),
]


@pytest.mark.parametrize(("shape", "size"), RESIZES)
def test_resize_image_equals_pil_bicubic(shape, size):
    # Uniform noise has detail at every pixel: it shows aliasing (the old tf.image.resize
    # bicubic: mean |diff| 21-24 grey levels at these downsamplings) and the clipping of
    # Pillow's intermediate uint8 image (mean 0.3, max 20 when upsampling).
    image = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    resized = input_pipeline.resize_image(tf.constant(image), size).numpy()
    np.testing.assert_array_equal(resized, _pil_resize(image, size, Image.BICUBIC))
    # Labels: PIL NEAREST picks the same pixels.
    label = image[..., 0]
    np.testing.assert_array_equal(
        augment.resize_nearest(tf.constant(label), size).numpy(),
        _pil_resize(label, size, Image.NEAREST),
    )


class _PngReader:
    """A split of encoded examples of mixed sizes, read like `sources.SplitReader`."""

    def __init__(self, shapes, seed=0):
        rng = np.random.default_rng(seed)
        self.images = [rng.integers(0, 256, (*s, 3), dtype=np.uint8) for s in shapes]
        self.labels = [rng.integers(0, 19, s, dtype=np.uint8) for s in shapes]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return {"image": _png(self.images[index]), "label": _png(self.labels[index])}


# Runs of equal shapes of lengths 4, 1, 2, 3 and 1.
MIXED_SHAPES = [(6, 8)] * 4 + [(5, 7)] + [(6, 8)] * 2 + [(9, 4)] * 3 + [(5, 7)]


def _mixed_eval(config, reader, global_batch_size):
    count, batches = input_pipeline.eval_iterator(
        reader, config.data.eval, config.data, global_batch_size=global_batch_size
    )
    assert count == len(reader)
    return list(batches)


def _real(batches, key):
    """The valid examples' `key` arrays, in batch order; padding must be zero / ignore."""
    out = []
    for batch in batches:
        valid = batch["valid"]
        assert valid.dtype == bool
        assert (batch["label"][~valid] == 255).all() and (batch["image"][~valid] == 0).all()
        out += list(batch[key][valid])
    return out


def test_eval_iterator_batches_mixed_sizes_and_marks_padding(data_dir):
    config = tiny_config(data_dir=data_dir)
    reader = _PngReader(MIXED_SHAPES)
    batches = _mixed_eval(config, reader, global_batch_size=2)
    # Runs of 4, 1, 2, 3, 1 equal shapes: a batch ends at each shape change.
    full, short = [True, True], [True, False]
    assert [b["valid"].tolist() for b in batches] == [full, full, short, full, full, short, short]
    mean = np.array(config.data.image_mean, np.float32)
    labels, images = _real(batches, "label"), _real(batches, "image")
    assert len(labels) == len(images) == len(reader)
    for i in range(len(reader)):
        np.testing.assert_array_equal(labels[i], reader.labels[i])
        np.testing.assert_allclose(images[i], reader.images[i][..., ::-1] - mean, atol=1e-4)

    # With an input size only the labels keep their sizes; images are resized as by PIL.
    config.data.eval.size = (4, 6)
    batches = _mixed_eval(config, reader, global_batch_size=2)
    assert [b["valid"].tolist() for b in batches] == [full, full, short, full, full, short, short]
    assert all(b["image"].shape == (2, 4, 6, 3) for b in batches)
    for i, image in enumerate(_real(batches, "image")):
        expected = _pil_bicubic_by_axis(reader.images[i], (4, 6))
        np.testing.assert_allclose(image, expected[..., ::-1] - mean, atol=1e-4)


def test_eval_iterator_processes_agree_on_mixed_sizes(data_dir, monkeypatch):
    config = tiny_config(data_dir=data_dir)
    reader = _PngReader(MIXED_SHAPES, seed=1)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    per_process = []
    for process in range(2):
        monkeypatch.setattr(jax, "process_index", lambda process=process: process)
        per_process.append(_mixed_eval(config, reader, global_batch_size=4))
    # One global batch per run of equal shapes; each process holds half of it.
    assert len(per_process[0]) == len(per_process[1]) == 5
    labels = []
    for first, second in zip(*per_process, strict=True):
        assert first["image"].shape == second["image"].shape == (2, *first["image"].shape[1:])
        assert first["label"].shape == second["label"].shape
        labels += _real([first], "label") + _real([second], "label")
    assert len(labels) == len(reader)
    for label, expected in zip(labels, reader.labels, strict=True):
        np.testing.assert_array_equal(label, expected)
