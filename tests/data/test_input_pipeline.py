"""Training streams are deterministic and resumable; evaluation covers each example once."""

import io

import numpy as np
from PIL import Image

from jaxda.data import input_pipeline, sources
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
