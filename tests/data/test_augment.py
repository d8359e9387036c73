"""Training augmentations: image and label stay aligned, padding is ignored, draws are stateless."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from jaxda.data import augment, input_pipeline, sources
from tests.conftest import TINY_DATASET, tiny_config

# Class c is drawn in colour PALETTE[c], so the label is a pointwise function of the image.
PALETTE = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200], [220, 220, 40]], np.float32)
ALL_ON = {"random_scale": (0.75, 1.5), "crop_size": (40, 48), "flip": True}
ALL_ON |= {"blur_prob": 0.5, "color_jitter": 0.3}


def _blocks(seed: int, shape=(64, 96), block=16) -> tuple[tf.Tensor, tf.Tensor]:
    """Image [H, W, 3] of constant 16x16 blocks of random classes, and its label [H, W]."""
    grid = (shape[0] // block, shape[1] // block)
    classes = np.random.default_rng(seed).integers(0, len(PALETTE), grid)
    label = np.kron(classes, np.ones((block, block), np.int64)).astype(np.uint8)
    return tf.constant(PALETTE[label]), tf.constant(label)


def _seed(position: int, stream=(0, 0)) -> tf.Tensor:
    return augment.example_seed(tf.constant(augment.stream_key(stream)), position)


def _decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def _batches(config, stream, start, n, seed=(5, 0)):
    reader = input_pipeline.open_reader(config.data[stream], config.data)
    it = input_pipeline.train_iterator(
        reader, config.data[stream], config.data, global_batch_size=8, seed=seed, start=start
    )
    return [next(it) for _ in range(n)]


def test_geometric_ops_keep_image_and_label_aligned():
    image, label = _blocks(0)
    kwargs = {"base_size": (64, 96), "random_scale": (0.75, 1.5), "crop_size": (56, 80)}
    interior_fraction, flipped = [], []
    for position in range(12):
        out_image, out_label, valid, *_ = augment.augment(
            image, label, _seed(position), flip_prob=0.5, **kwargs
        )
        unflipped = augment.augment(image, label, _seed(position), **kwargs)[1]
        flipped.append(not np.array_equal(out_label, unflipped))
        out_image, out_label = out_image.numpy(), out_label.numpy()
        assert out_image.shape == (56, 80, 3) and out_label.shape == (56, 80)
        assert (out_label[~valid.numpy()] == 255).all()
        # Away from block edges (bicubic ringing, +-1 px nearest/bicubic disagreement), the
        # image must show exactly the colour of the label's class.
        windows = np.lib.stride_tricks.sliding_window_view(out_label, (7, 7))
        interior = (windows.min((2, 3)) == windows.max((2, 3))) & (windows[..., 3, 3] != 255)
        centre = out_image[3:-3, 3:-3]
        np.testing.assert_allclose(
            centre[interior], PALETTE[windows[..., 3, 3][interior]], atol=0.5
        )
        interior_fraction.append(interior.mean())
    assert np.mean(interior_fraction) > 0.3
    assert 0 < sum(flipped) < len(flipped)  # Both flipped and unflipped examples were checked.


def test_crop_pads_label_with_ignore_and_image_with_zero():
    image, label = tf.fill([5, 6, 3], 7.0), tf.fill([5, 6], tf.constant(3, tf.uint8))
    for position in range(4):
        out_image, out_label, valid, *_ = augment.augment(
            image, label, _seed(position), base_size=(5, 6), crop_size=(8, 10), flip_prob=0.5
        )
        valid = valid.numpy()
        rows, cols = np.flatnonzero(valid.any(1)), np.flatnonzero(valid.any(0))
        assert valid.sum() == 30 and len(rows) == 5 and len(cols) == 6  # One 5x6 block.
        np.testing.assert_array_equal(out_label.numpy(), np.where(valid, 3, 255))
        np.testing.assert_array_equal(out_image.numpy()[..., 0], np.where(valid, 7.0, 0.0))


def test_pipeline_padding_is_zero_after_normalisation(data_dir):
    config = tiny_config(data_dir=data_dir, **{"data.source.crop_size": (40, 80)})
    batch = _batches(config, "source", 0, 1)[0]  # 32x64 examples in a 40x80 crop.
    for image, label in zip(batch["image"], batch["label"], strict=True):
        pad_rows = (label == 255).all(1) & (image == 0).all((1, 2))
        pad_cols = (label == 255).all(0) & (image == 0).all((0, 2))
        assert pad_rows.sum() == 8 and pad_cols.sum() == 16
        assert (image[~pad_rows][:, ~pad_cols] != 0).any(-1).all()


def test_augmentation_is_deterministic_and_resumable(data_dir):
    config = tiny_config(data_dir=data_dir)
    for key, value in ALL_ON.items():
        config.data.source[key] = value
    first = _batches(config, "source", 0, 3)
    again = _batches(config, "source", 0, 3)
    resumed = _batches(config, "source", 16, 1)[0]
    for key in ("image", "label"):
        for a, b in zip(first, again, strict=True):
            np.testing.assert_array_equal(a[key], b[key])
        np.testing.assert_array_equal(resumed[key], first[2][key])
    assert first[0]["image"].shape == (8, 40, 48, 3) and first[0]["label"].shape == (8, 40, 48)
    # Another stream seed draws other augmentations (and another order).
    other = _batches(config, "source", 0, 1, seed=(5, 1))[0]
    assert not np.array_equal(other["image"], first[0]["image"])


def test_different_positions_draw_different_augmentations():
    image, label = _blocks(1)
    kwargs = {"base_size": (64, 96), "random_scale": (0.5, 2.0), "crop_size": (40, 56)}
    outputs = [augment.augment(image, label, _seed(p), **kwargs)[0].numpy() for p in range(8)]
    for i in range(8):
        for j in range(i):
            assert not np.array_equal(outputs[i], outputs[j])


def test_flip_happens_about_half_the_time():
    ramp = tf.range(6, dtype=tf.float32)
    image, label = tf.tile(ramp[None, :, None], [2, 1, 3]), tf.zeros([2, 6], tf.uint8)
    key = tf.constant(augment.stream_key((3, 0)))

    def first_pixel(position):
        seed = augment.example_seed(key, position)
        return augment.augment(image, label, seed, base_size=(2, 6), flip_prob=0.5)[0][0, 0, 0]

    firsts = np.array(list(tf.data.Dataset.range(400).map(first_pixel).as_numpy_iterator()))
    assert set(np.unique(firsts)) == {0.0, 5.0}
    assert 0.4 < (firsts == 5.0).mean() < 0.6


def test_photometric_ops_touch_the_image_only():
    image, label = _blocks(2)
    out_image, out_label, valid, *_ = augment.augment(
        image, label, _seed(0), base_size=(64, 96), blur_prob=1.0, color_jitter_strength=0.4
    )
    assert valid is None
    np.testing.assert_array_equal(out_label, label)
    out_image = out_image.numpy()
    assert out_image.min() >= 0 and out_image.max() <= 255
    assert np.abs(out_image - image.numpy()).max() > 1
    # A blur of std 0 is the identity; the kernel is normalised.
    np.testing.assert_array_equal(augment.gaussian_blur(image, tf.constant(0.0), 1.0), image)
    flat = augment.gaussian_blur(tf.fill([8, 8, 3], 100.0), tf.constant(0.7), 1.0)
    np.testing.assert_allclose(flat, 100.0, rtol=1e-5)


def test_defaults_are_off_and_bit_identical_to_the_plain_pipeline(data_dir):
    config = tiny_config(data_dir=data_dir)
    source = config.data.source
    assert not (source.random_scale or source.crop_size or source.flip)
    assert not (source.blur_prob or source.color_jitter)
    batch = _batches(config, "source", 0, 1)[0]
    reader = sources.SplitReader(TINY_DATASET, "source_train", data_dir)
    indices = input_pipeline.sample_indices(
        len(reader), seed=(5, 0), start=0, global_batch_size=8, process_slice=slice(0, 8)
    )
    mean = np.array(config.data.image_mean, np.float32)
    for image, label, (_, index) in zip(batch["image"], batch["label"], indices, strict=False):
        raw = reader[index]
        np.testing.assert_array_equal(image, _decode(raw["image"])[..., ::-1] - mean)
        np.testing.assert_array_equal(label, _decode(raw["label"]).squeeze())


def test_eval_is_never_augmented(data_dir):
    config = tiny_config(data_dir=data_dir)
    for key, value in ALL_ON.items():
        config.data.eval[key] = value
    reader = input_pipeline.open_reader(config.data.eval, config.data)
    _, batches = input_pipeline.eval_iterator(
        reader, config.data.eval, config.data, global_batch_size=8
    )
    labels = next(batches)["label"]
    for i in range(8):
        np.testing.assert_array_equal(labels[i], _decode(reader[i]["label"]).squeeze())


def test_config_validation_names_the_keys(data_dir):
    config = tiny_config(data_dir=data_dir, **{"data.source.random_scale": (0.5, 1.5)})
    assert config.data.source.size is None
    with pytest.raises(ValueError, match=r"random_scale=\(0.5, 1.5\) needs crop_size or size"):
        _batches(config, "source", 0, 0)
    config.data.source.random_scale = (1.5, 0.5)
    with pytest.raises(ValueError, match="random_scale must be"):
        _batches(config, "source", 0, 0)
    config.data.source.random_scale, config.data.source.crop_size = (), (32,)
    with pytest.raises(ValueError, match="crop_size must be"):
        _batches(config, "source", 0, 0)
    # random_scale with a size is cropped back to that size.
    config.data.source.crop_size, config.data.source.random_scale = (), (0.5, 1.5)
    config.data.source.size = (24, 40)
    assert _batches(config, "source", 0, 1)[0]["label"].shape == (8, 24, 40)


def _pil_resize(array: np.ndarray, size, resample) -> np.ndarray:
    return np.asarray(Image.fromarray(array).resize((int(size[1]), int(size[0])), resample))


@pytest.mark.parametrize(
    ("shape", "base_size", "factor"),
    [
        ((1052, 1914), (720, 1280), 0.5),  # GTA5 frames, random scale of the 1280x720 size.
        ((1052, 1914), (720, 1280), 0.75),
        ((1052, 1914), (720, 1280), 1.5),
        ((1024, 2048), (512, 1024), 0.75),  # Cityscapes: tie rows for nearest at 4/3, 8/3.
        ((1024, 2048), (512, 1024), 1.5),
    ],
)
def test_scale_matches_pil(shape, base_size, factor):
    # Uniform noise: detail at every pixel. The old tf.image.resize bicubic differed from PIL
    # by a mean 18-44 grey levels when downsampling (no antialiasing) and 0.27 (max 23) when
    # upsampling; tf nearest picked other label pixels on a third of the rows at 0.75 and 1.5.
    rng = np.random.default_rng(int(factor * 4))
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    label = rng.integers(0, 19, shape, dtype=np.uint8)
    out_image, out_label = augment.scale(
        tf.constant(image, tf.float32), tf.constant(label), tf.constant(factor), base_size
    )
    size = [round(factor * n) for n in base_size]
    assert out_image.shape == (*size, 3) and out_label.shape == tuple(size)
    out_image = out_image.numpy()
    assert out_image.min() >= 0 and out_image.max() <= 255
    # Float, not rounded; rounded it is PIL's uint8 image up to float32 rounding at exact ties.
    diff = np.abs(np.floor(out_image + 0.5) - _pil_resize(image, size, Image.BICUBIC))
    assert diff.mean() < 0.005 and diff.max() <= 2
    np.testing.assert_array_equal(out_label, _pil_resize(label, size, Image.NEAREST))
