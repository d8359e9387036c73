"""Inference modes on toy apply functions and a tiny DeepLabV2: whole, slide, multiscale, flip."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common
from jaxda.data import input_pipeline
from jaxda.data import labels as labels_lib
from jaxda.evaluation import inference, visualize
from jaxda.models import deeplab_v2
from jaxda.models.layers import resize_bilinear_align_corners

NUM_CLASSES = 5


def _images(shape=(2, 24, 40, 3), seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _pooled_linear(images):
    """A toy network at output stride 4: 4x4 average pooling, then a linear map to classes."""
    n, h, w, c = images.shape
    pooled = images[:, : h // 4 * 4, : w // 4 * 4].reshape(n, h // 4, 4, w // 4, 4, c)
    kernel = jnp.arange(c * NUM_CLASSES, dtype=jnp.float32).reshape(c, NUM_CLASSES) / 7 - 1
    return pooled.mean((2, 4)) @ kernel


def _per_pixel(images):
    """Translation equivariant, output at the input resolution: a 1x1 'convolution'."""
    kernel = jnp.sin(jnp.arange(images.shape[-1] * NUM_CLASSES, dtype=jnp.float32))
    return images @ kernel.reshape(images.shape[-1], NUM_CLASSES)


def _softmax_of_whole(apply_fn, images, out_size):
    return jax.nn.softmax(inference.whole(apply_fn, images, out_size), axis=-1)


@pytest.fixture(scope="module")
def tiny_model():
    model = deeplab_v2.DeepLabV2(
        num_classes=NUM_CLASSES, stage_sizes=(1, 1, 1, 1), width=4, aspp_dilations=(1, 2, 3, 4)
    )
    variables = model.init(jax.random.key(1), jnp.zeros((1, 32, 64, 3)), train=False)
    return jax.jit(lambda x: model.apply(variables, x, train=False)["main"])


def test_window_starts_and_counts():
    assert inference.window_starts(10, 4, 3) == [0, 3, 6]
    assert inference.window_starts(11, 4, 3) == [0, 3, 6, 7]  # The last aligned to the edge.
    assert inference.window_starts(5, 8, 2) == [0]  # A window larger than the input: clipped.
    counts = inference.window_counts((11, 10), (4, 4), (3, 3))
    np.testing.assert_array_equal(counts[0], [1, 1, 1, 2, 1, 1, 2, 1, 1, 1])
    np.testing.assert_array_equal(counts[:, 0], [1, 1, 1, 2, 1, 1, 2, 2, 2, 2, 1])
    assert counts.min() >= 1


def test_settings_validation_and_protocol():
    with pytest.raises(ValueError, match=r"config\.eval\.mode='tiles'"):
        inference.Settings(mode="tiles")
    with pytest.raises(ValueError, match="uncovered"):
        inference.Settings(mode="slide", slide_window=(8, 8), slide_stride=(4, 9))
    with pytest.raises(ValueError, match="positive"):
        inference.Settings(mode="multiscale", scales=(1.0, 0.0))
    config = common.base_config()
    assert inference.Settings.from_config(config.eval).protocol() == {"mode": "whole"}
    config.eval.mode = "multiscale"
    protocol = inference.Settings.from_config(config.eval).protocol()
    assert protocol["scales"] == [0.75, 1.0, 1.25, 1.5] and protocol["flip"] is False


@pytest.mark.parametrize("window", [(24, 40), (64, 64)])
def test_slide_with_one_window_equals_whole(window):
    images = _images()
    slid = inference.slide(_pooled_linear, images, (24, 40), window, (8, 8))
    expected = _softmax_of_whole(_pooled_linear, images, (24, 40))
    np.testing.assert_allclose(slid, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.argmax(slid, -1), np.argmax(expected, -1))


def test_slide_with_one_window_equals_whole_on_a_network(tiny_model):
    images = _images((1, 32, 64, 3))
    slid = inference.slide(tiny_model, images, (32, 64), (32, 64), (16, 16))
    expected = _softmax_of_whole(tiny_model, images, (32, 64))
    np.testing.assert_allclose(slid, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.argmax(slid, -1), np.argmax(expected, -1))


def test_overlapping_windows_of_an_equivariant_function_equal_whole():
    images = _images()
    slid = inference.slide(_per_pixel, images, (24, 40), (10, 16), (4, 6))
    np.testing.assert_allclose(
        slid, _softmax_of_whole(_per_pixel, images, (24, 40)), rtol=1e-5, atol=1e-6
    )
    # Upsampling the input-size probability map to a larger label size.
    slid = inference.slide(_per_pixel, images, (48, 80), (10, 16), (4, 6))
    expected = resize_bilinear_align_corners(
        _softmax_of_whole(_per_pixel, images, (24, 40)), (48, 80)
    )
    np.testing.assert_allclose(slid, expected, rtol=1e-5, atol=1e-6)


def test_slide_divides_by_the_window_count():
    constant = jnp.array([0.5, -1.0, 2.0, 0.0, 1.0])

    def apply_fn(images):  # Constant logits on a stride-8 grid.
        n, h, w, _ = images.shape
        grid = (deeplab_v2.output_size(h), deeplab_v2.output_size(w), NUM_CLASSES)
        return jnp.broadcast_to(constant, (n, *grid))

    probs = inference.slide(apply_fn, _images(), (30, 50), (16, 16), (5, 7))
    expected = np.broadcast_to(jax.nn.softmax(constant), (2, 30, 50, NUM_CLASSES))
    np.testing.assert_allclose(probs, expected, rtol=1e-6, atol=1e-7)


def test_modes_compile_once_per_input_shape():
    traces = []

    def apply_fn(images):
        traces.append(images.shape)
        return _pooled_linear(images)

    settings = inference.Settings(mode="slide", slide_window=(16, 16), slide_stride=(8, 12))
    fn = jax.jit(lambda x: inference.scores(apply_fn, x, (24, 40), settings))
    fn(_images(seed=1))
    count = len(traces)
    assert count <= 2  # eval_shape + one scan body, however many windows.
    fn(_images(seed=2))
    assert len(traces) == count
    fn(_images((2, 32, 48, 3)))  # Another input shape: traced (and compiled) again.
    assert len(traces) > count


def test_multiscale_at_scale_one_without_flip_equals_whole():
    images = _images()
    probs = inference.multiscale(_pooled_linear, images, (24, 40), (1.0,), flip=False)
    np.testing.assert_allclose(
        probs, _softmax_of_whole(_pooled_linear, images, (24, 40)), rtol=1e-6, atol=1e-7
    )
    settings = inference.Settings(mode="multiscale", scales=(0.75, 1.0, 1.5), flip=True)
    probs = inference.probabilities(_pooled_linear, images, (30, 50), settings)
    assert probs.shape == (2, 30, 50, NUM_CLASSES)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    assert inference.scaled_size((24, 40), 0.75) == (18, 30)


def test_flip_is_flipped_back():
    def apply_fn(images):  # Logits increasing left -> right, more steeply for higher classes.
        n, h, w, _ = images.shape
        x = jnp.linspace(-1.0, 1.0, w)[None, None, :, None]
        return jnp.broadcast_to(x * jnp.arange(NUM_CLASSES, dtype=jnp.float32), (n, h, w, 5))

    images = _images()
    plain = inference.multiscale(apply_fn, images, (24, 40), (1.0,), flip=False)
    assert not np.allclose(plain, jnp.flip(plain, 2), atol=1e-3)
    averaged = inference.multiscale(apply_fn, images, (24, 40), (1.0,), flip=True)
    np.testing.assert_allclose(averaged, jnp.flip(averaged, 2), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(averaged, (plain + jnp.flip(plain, 2)) / 2, rtol=1e-6, atol=1e-7)


def test_flip_averaging_on_a_network(tiny_model):
    half = _images((1, 32, 32, 3), seed=3)
    symmetric = jnp.concatenate([half, jnp.flip(half, 2)], axis=2)
    plain = inference.multiscale(tiny_model, symmetric, (32, 64), (1.0,), flip=False)
    averaged = inference.multiscale(tiny_model, symmetric, (32, 64), (1.0,), flip=True)
    # flip(x) == x, so the flipped pass is the plain one flipped back.
    np.testing.assert_allclose(averaged, (plain + jnp.flip(plain, 2)) / 2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(averaged, jnp.flip(averaged, 2), rtol=1e-5, atol=1e-6)
    # Flip averaging makes any network flip-equivariant: F(flip(x)) == flip(F(x)).
    images = _images((1, 32, 64, 3), seed=4)
    for scales in [(1.0,), (0.75, 1.25)]:
        direct = inference.multiscale(tiny_model, images, (32, 64), scales, flip=True)
        mirrored = inference.multiscale(tiny_model, jnp.flip(images, 2), (32, 64), scales, True)
        np.testing.assert_allclose(jnp.flip(mirrored, 2), direct, rtol=1e-5, atol=1e-6)


def test_ensemble_apply_fn_sums_weighted_logits():
    class Toy:
        def apply(self, variables, images, train):
            assert not train
            return {"main": images * variables["scale"], "aux": images}

    members = [{"scale": 1.0}, {"scale": 3.0}]
    images = _images((1, 4, 4, 3))
    apply_fn = inference.ensemble_apply_fn(Toy(), members, jnp.array([0.25, 0.5]), "main")
    np.testing.assert_allclose(apply_fn(images), images * 1.75, rtol=1e-6)
    with pytest.raises(ValueError, match="heads \\['aux', 'main'\\]"):
        inference.ensemble_apply_fn(Toy(), members, [1.0, 1.0], "side")(images)


def test_label_ids_and_visuals():
    train_ids = np.arange(labels_lib.NUM_CLASSES, dtype=np.uint8)
    label_ids = labels_lib.train_ids_to_label_ids(train_ids)
    assert label_ids.dtype == np.uint8
    table = labels_lib.lookup_table(labels_lib.CITYSCAPES_LABEL_TO_TRAIN_ID)
    np.testing.assert_array_equal(table[label_ids], train_ids)

    data = ml_collections.ConfigDict(common.NORMALIZATIONS["caffe_bgr"])
    rgb = np.random.default_rng(0).integers(0, 256, (2, 8, 12, 3), dtype=np.uint8)
    normalized = input_pipeline.make_normalizer(data)(rgb).numpy()
    np.testing.assert_array_equal(input_pipeline.denormalize(normalized, data), rgb)
    predictions = np.zeros((2, 16, 24), np.uint8)
    labels = np.full((2, 16, 24), 255, np.uint8)
    panels = visualize.panels(normalized, predictions, labels, data)
    assert panels.shape == (2, 16, 72, 3) and panels.dtype == np.uint8
    assert (panels[:, :, 24:48] == labels_lib.CITYSCAPES_PALETTE[0]).all()
    assert (panels[:, :, 48:] == 0).all()  # Ignored ground truth is black.
    blend = visualize.overlay(rgb, np.zeros_like(rgb), 0.25)
    np.testing.assert_array_equal(blend, np.round(rgb * 0.75).astype(np.uint8))
