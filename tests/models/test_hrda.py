"""HRDA (jaxda/models/hrda.py, jaxda/losses/hrda.py): the pure pieces against NumPy (crop-box
distribution, the attention fusion with its masking, pasting and upsampling order, sliding
windows averaged on a canvas, the fused + detail loss under a box) and the model's training
and inference forwards against the PyTorch transcription `jaxda.interop.torch_reference_hrda`
(relative error = max |jaxda - torch| / max |torch| < 1e-4), on a tiny MiT: 64 x 64 crops,
32 x 32 HR boxes and windows, LR at 32 x 32.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import common, source_only
from jaxda import models
from jaxda.losses import hrda as hrda_losses
from jaxda.models import hrda

TOLERANCE = 1e-4
NUM_CLASSES = 5
TINY = {"embed_dims": (16, 32, 48, 64), "depths": (1, 1, 1, 1), "num_heads": (1, 2, 3, 4)}
WIDTHS = {"decoder_embed_dim": 16, "decoder_width": 16, "aspp_dilations": (1, 2, 3, 4)}
CROP = (32, 32)
IMAGE = (64, 64)


# --- NumPy references -----------------------------------------------------------------------


def np_resize(x: np.ndarray, size) -> np.ndarray:
    """Bilinear, align_corners=False (half-pixel centres, no antialiasing), [N, H, W, C]."""
    for axis, out in ((1, size[0]), (2, size[1])):
        n = x.shape[axis]
        src = np.maximum((np.arange(out) + 0.5) * n / out - 0.5, 0)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n - 1)
        frac = (src - lo).reshape([-1 if a == axis else 1 for a in range(4)])
        x = np.take(x, lo, axis) * (1 - frac) + np.take(x, hi, axis) * frac
    return x


def np_fuse(lr, hr, att, box, lr_scale=0.5, os=4):
    """HRDAHead.forward's fusion, step by step as the official code orders it."""
    if box is not None:
        y, x = box
        mask = np.zeros((1, *lr.shape[1:3], 1))
        f = int(os / lr_scale)
        mask[:, y // f : (y + hr.shape[1] * os) // f, x // f : (x + hr.shape[2] * os) // f] = 1
        att = att * mask
    lr = (1 - att) * lr
    r = int(1 / lr_scale)
    up = (lr.shape[1] * r, lr.shape[2] * r)
    up_lr, up_att = np_resize(lr, up), np_resize(att, up)
    if box is not None:
        inserted = np.zeros_like(up_lr)
        inserted[:, y // os : y // os + hr.shape[1], x // os : x // os + hr.shape[2]] = hr
        hr = inserted
    return up_att * hr + up_lr, lr


def np_ce(logits, labels, weights):
    """mmseg's CE: up to the labels, -log softmax[label] x weight, mean over all pixels."""
    logits = np_resize(logits, labels.shape[1:3])
    logits = logits - logits.max(-1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    valid = labels != 255
    nll = -np.take_along_axis(log_p, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    return np.mean(np.where(valid, nll * weights, 0))


def np_average(windows, boxes, scale):
    n = windows.shape[0] // len(boxes)
    boxes = [[int(v / scale) for v in b] for b in boxes]
    h, w = max(b[1] for b in boxes), max(b[3] for b in boxes)
    total, count = np.zeros((n, h, w, windows.shape[-1])), np.zeros((h, w))
    for k, (y1, y2, x1, x2) in enumerate(boxes):
        total[:, y1:y2, x1:x2] += windows[k * n : (k + 1) * n]
        count[y1:y2, x1:x2] += 1
    return total / count[None, :, :, None]


# --- pure functions ---------------------------------------------------------------------------


def test_crop_box_offsets_follow_get_crop_bbox():
    """Offsets randint(0, (margin + 1) // 8) * 8: multiples of 8 in 0 .. margin - 8 (the
    official off-by-one: a box at the bottom / right edge is never drawn), all of them."""
    keys = jax.random.split(jax.random.key(0), 4000)
    boxes = np.asarray(jax.vmap(lambda k: hrda.crop_box(k, (1024, 1024), (512, 512)))(keys))
    assert boxes.dtype == np.int32 and boxes.shape == (4000, 2)
    for axis in range(2):
        assert set(boxes[:, axis].tolist()) == set(range(0, 512, 8))  # 64 values, never 512.
    assert abs(boxes.mean() - 252) < 8  # Uniform: mean 504 / 2.
    assert not np.array_equal(boxes[:, 0], boxes[:, 1])  # The axes are drawn independently.
    # Non-square, and a margin that is not a multiple of 8: (100 + 1) // 8 = 12 values.
    boxes = np.asarray(jax.vmap(lambda k: hrda.crop_box(k, (612, 64), (512, 64)))(keys[:500]))
    assert set(boxes[:, 0].tolist()) == set(range(0, 96, 8)) and set(boxes[:, 1]) == {0}


@pytest.mark.parametrize("classwise", [True, False])
@pytest.mark.parametrize("box", [(8, 16), (0, 24), None])
def test_fuse_matches_numpy(box, classwise):
    rng = np.random.default_rng(0)
    lr = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)  # A 64 x 64 image at 0.5, stride 4.
    hr = rng.normal(size=(2, 4, 4, 3) if box else (2, 16, 16, 3)).astype(np.float32)
    att = rng.uniform(size=(2, 8, 8, 3 if classwise else 1)).astype(np.float32)
    fused, lr_w, att_out = jax.jit(hrda.fuse)(lr, hr, att, None if box is None else jnp.array(box))
    want, want_lr = np_fuse(lr, hr, att, box)
    np.testing.assert_allclose(fused, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lr_w, want_lr, rtol=1e-5, atol=1e-6)
    if box is not None:  # A 16 px box at (y, x) covers LR cells y / 8 .. y / 8 + 1.
        y, x = box[0] // 8, box[1] // 8
        assert (np.asarray(att_out)[:, y : y + 2, x : x + 2] > 0).all()
        assert np.asarray(att_out).sum() == pytest.approx(att[:, y : y + 2, x : x + 2].sum())


def test_slide_boxes_and_canvas_average_match_numpy():
    assert len(hrda.slide_boxes((1024, 1024), (512, 512), (256, 256))) == 9
    assert hrda.slide_boxes((1024, 2048), (1024, 1024), (512, 512)) == [
        (0, 1024, 0, 1024), (0, 1024, 512, 1536), (0, 1024, 1024, 2048)
    ]  # fmt: skip
    # The last window shifts back to the border; a window larger than the image shrinks.
    assert hrda.slide_boxes((40, 64), (32, 32), (16, 16))[-1] == (8, 40, 32, 64)
    assert hrda.slide_boxes((24, 64), (32, 64), (16, 32)) == [(0, 24, 0, 64)]
    boxes = hrda.slide_boxes((40, 64), (32, 32), (16, 16))  # 2 x 3 windows.
    rng = np.random.default_rng(1)
    windows = rng.normal(size=(len(boxes) * 2, 8, 8, 3)).astype(np.float32)
    out = hrda.average_windows(jnp.asarray(windows), boxes, scale=4)
    np.testing.assert_allclose(out, np_average(windows, boxes, 4), rtol=1e-6, atol=1e-6)
    images = rng.normal(size=(2, 40, 64, 3)).astype(np.float32)
    crops = np.asarray(hrda.extract_windows(jnp.asarray(images), boxes))
    np.testing.assert_array_equal(crops[2:4], images[:, 0:32, 16:48])  # Window-major.


def test_slide_inference_matches_numpy():
    """Window logits (stride 4) resized to the window, then averaged at full resolution."""
    kernel = np.random.default_rng(2).normal(size=(3, 4)).astype(np.float32)

    def logits_fn(x):  # A position-dependent stand-in for a network: 4 x 4 means -> classes.
        n, h, w, c = x.shape
        return x.reshape(n, h // 4, 4, w // 4, 4, c).mean((2, 4)) @ kernel

    images = np.random.default_rng(3).normal(size=(2, 32, 64, 3)).astype(np.float32)
    out = jax.jit(lambda x: hrda.slide_inference(logits_fn, x, (32, 32), (16, 16)))(images)
    boxes = hrda.slide_boxes((32, 64), (32, 32), (16, 16))
    windows = [np_resize(np.asarray(logits_fn(images[:, a:b, c:d])), (32, 32))
               for a, b, c, d in boxes]  # fmt: skip
    want = np_average(np.concatenate(windows), boxes, 1)
    assert out.shape == (2, 32, 64, 4)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ignore", [False, True])
def test_hrda_loss_matches_numpy(ignore):
    rng = np.random.default_rng(4)
    fused = rng.normal(size=(2, 16, 16, NUM_CLASSES)).astype(np.float32)
    hr = rng.normal(size=(2, 8, 8, NUM_CLASSES)).astype(np.float32)
    lr = rng.normal(size=(2, 8, 8, NUM_CLASSES)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, size=(2, 64, 64))
    if ignore:
        labels[:, :20] = 255  # Partly under the box: ignored pixels count in every mean.
    weights = rng.uniform(size=(2, 64, 64)).astype(np.float32)
    y, x = 16, 8
    outputs = {"main": fused, "hr": hr, "lr": lr}
    loss, terms = jax.jit(
        functools.partial(hrda_losses.hrda_loss, hr_loss_weight=0.1, lr_loss_weight=0.2)
    )(outputs, labels, weights, jnp.array([y, x]))
    crop = np.s_[:, y : y + 32, x : x + 32]
    want = {
        "fused": np_ce(fused, labels, weights),
        "hr": np_ce(hr, labels[crop], weights[crop]),
        "lr": np_ce(lr, labels, weights),
    }
    for name, value in want.items():
        assert float(terms[name]) == pytest.approx(value, rel=1e-5)
    assert float(loss) == pytest.approx(0.7 * want["fused"] + 0.1 * want["hr"] + 0.2 * want["lr"],
                                        rel=1e-5)  # fmt: skip
    # HRDA's weights (0.9 / 0.1); no weights = ones.
    loss, terms = hrda_losses.hrda_loss(outputs, labels, None, jnp.array([y, x]))
    ones = np.ones_like(weights)
    assert set(terms) == {"fused", "hr"}
    assert float(loss) == pytest.approx(
        0.9 * np_ce(fused, labels, ones) + 0.1 * np_ce(hr, labels[crop], ones[crop]), rel=1e-5
    )
    with pytest.raises(ValueError, match="box"):
        hrda_losses.hrda_loss(outputs, labels)


def test_loss_parity_with_torch():
    """The loss of the training forward's outputs, against HRDAHead.losses' transcription."""
    torch = pytest.importorskip("torch")
    ref = pytest.importorskip("jaxda.interop.torch_reference_hrda")
    gen = torch.Generator().manual_seed(5)
    fused, hr = torch.randn(2, 5, 16, 16, generator=gen), torch.randn(2, 5, 8, 8, generator=gen)
    labels = torch.randint(0, 5, (2, 64, 64), generator=gen)
    labels[:, 40:] = 255
    weights = torch.rand(2, 64, 64, generator=gen)
    want = ref.hrda_losses(fused, None, hr, labels, weights, (24, 56, 32, 64))
    loss, _ = hrda_losses.hrda_loss(
        {"main": nhwc(fused), "hr": nhwc(hr)}, jnp.asarray(labels.numpy()),
        jnp.asarray(weights.numpy()), jnp.array([24, 32]),
    )  # fmt: skip
    assert float(loss) == pytest.approx(float(want), rel=1e-5)


# --- the model ----------------------------------------------------------------------------------


def jax_model(**kwargs):
    return hrda.HRDA(
        num_classes=NUM_CLASSES, **TINY, **WIDTHS, drop_path_rate=0.0, attention_embed_dim=12,
        hr_crop_size=CROP, **kwargs,
    )  # fmt: skip


def torch_model(seed: int = 0):
    """(randomised PyTorch HRDA in eval mode, its state dict as numpy)."""
    pytest.importorskip("torch")
    from tests.models.test_mit import randomize

    mit = pytest.importorskip("jaxda.interop.torch_reference_mit")
    ref = pytest.importorskip("jaxda.interop.torch_reference_hrda")
    dims = TINY["embed_dims"]
    backbone = mit.MixVisionTransformerTorch(
        dims, TINY["depths"], TINY["num_heads"], drop_path_rate=0.0
    )
    head = mit.DAFormerHeadTorch(
        dims, NUM_CLASSES, WIDTHS["decoder_embed_dim"], WIDTHS["decoder_width"],
        WIDTHS["aspp_dilations"],
    )  # fmt: skip
    attention = ref.ConvFusionHeadTorch(dims, NUM_CLASSES, 12)
    model = ref.HRDAEncoderDecoderTorch(backbone, ref.HRDAHeadTorch(head, attention), CROP)
    randomize(model, seed)
    # Copies: `.numpy()` shares the buffers, which a training forward updates in place.
    return model, {k: v.numpy().copy() for k, v in model.state_dict().items()}


@functools.cache
def abstract_variables(model):
    return models.abstract_variables(model)


def converted(state_dict: dict, model) -> dict:
    """An HRDA state dict (backbone.*, decode_head.head.*, decode_head.scale_attention.*) as
    the model's variables, by the converter's layout 'hrda'; every variable filled."""
    from jaxda.interop import mit_layout

    loaded, report = mit_layout.map_state_dict(
        state_dict, abstract_variables(model), "hrda", decoder="daformer"
    )
    assert report.missing == [] and report.unexpected == [] and report.skipped == {}
    return traverse_util.unflatten_dict(loaded)


def relative_error(ours, reference) -> float:
    reference = reference.detach().numpy().transpose(0, 2, 3, 1)
    assert np.shape(ours) == reference.shape
    return float(np.abs(np.asarray(ours) - reference).max() / np.abs(reference).max())


def nhwc(x):
    return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


@pytest.mark.parametrize("batch_stats", [False, True])
def test_training_forward_parity(batch_stats):
    """Fused, LR (attention-weighted) and HR logits for two boxes from one compilation;
    with BN on batch statistics also the running statistics, updated LR then HR."""
    torch = pytest.importorskip("torch")
    model = jax_model()
    variables = converted(torch_model()[1], model)
    images = torch.randn(2, 3, *IMAGE, generator=torch.Generator().manual_seed(1))

    @jax.jit
    def forward(variables, x, box):
        return model.apply(variables, x, train=batch_stats, box=box, mutable=["batch_stats"])

    for y, x in ((16, 8), (24, 32)):
        ref_model, _ = torch_model()  # Fresh running statistics for each box.
        if batch_stats:
            ref_model.train()
            ref_model.apply(lambda m: m.eval() if isinstance(m, torch.nn.Dropout2d) else None)
        with torch.no_grad():
            fused, lr, hr = ref_model.forward_train(images, (y, y + 32, x, x + 32))
        out, state = forward(variables, nhwc(images), jnp.array([y, x], jnp.int32))
        want = {"main": fused, "lr": lr, "hr": hr}
        errors = {k: relative_error(out[k], v) for k, v in want.items()}
        assert max(errors.values()) < TOLERANCE, errors
        if batch_stats:  # PyTorch folds the unbiased batch variance in, Flax the biased one:
            # means exactly, variances up to that (n = 128 per channel: 0.8 % of the batch
            # terms).
            torch_stats = converted({k: v.numpy() for k, v in ref_model.state_dict().items()},
                                    model)["batch_stats"]  # fmt: skip
            ours = traverse_util.flatten_dict(state["batch_stats"])
            for path, want in traverse_util.flatten_dict(torch_stats).items():
                rtol = 1e-4 if path[-1] == "mean" else 1e-2
                np.testing.assert_allclose(ours[path], want, rtol=rtol, atol=1e-5)
    assert out["attention"].shape == (2, 8, 8, NUM_CLASSES)
    assert forward._cache_size() == 1


# slide=False (not HRDA's setting) is slow; its default-run twin is slide=True.
@pytest.mark.parametrize("slide", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_inference_forward_parity(slide):
    """No box: HR logits of 9 overlapping 32 x 32 windows averaged on the canvas (or of the
    whole image, the slow twin), the attention unmasked; on a 64 x 96 image, not square."""
    torch = pytest.importorskip("torch")
    ref_model, state_dict = torch_model(seed=3)
    model = jax_model(hr_slide_inference=slide)
    variables = converted(state_dict, model)
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = ref_model.decode(images, slide=slide)
    out, state = jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]))(
        variables, nhwc(images)
    )
    assert relative_error(out["main"], want) < TOLERANCE
    assert set(out) == {"main"} and out["main"].shape == (2, 16, 24, NUM_CLASSES)
    assert state["intermediates"]["stage1"][0].shape == (2, 8, 12, 16)  # The LR features.


def test_config_registry_and_groups():
    config = source_only.get_config("synthetic")
    common.use_mit(config, synthetic=True)
    config.model.update(name="hrda", hr_crop_size=(32, 32), scales=(1.0, 0.5))
    model = models.build_segmenter(config.model, NUM_CLASSES)
    assert isinstance(model, hrda.HRDA) and model.lr_scale == 0.5
    assert model.hr_crop_size == (32, 32) and model.attention_embed_dim == 256
    assert model.depths == (1, 1, 1, 1) and model.attention_classwise
    params = models.abstract_variables(model)["params"]
    assert models.param_groups(model, params) == {
        "backbone": "backbone", "head": "head", "scale_attention": "head"
    }  # fmt: skip
    # Class-agnostic attention: one map.
    agnostic = model.clone(attention_classwise=False)
    kernel = models.abstract_variables(agnostic)["params"]["scale_attention"]["conv_seg"]
    assert kernel["kernel"].shape[-1] == 1
    config.model.scales = (0.5, 0.25)
    with pytest.raises(ValueError, match="scales"):
        models.build_segmenter(config.model, NUM_CLASSES)
    with pytest.raises(ValueError, match="multiple"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 60, 64, 3)))
    with pytest.raises(ValueError, match="hr_crop_size"):
        jax.eval_shape(model.clone(hr_crop_size=(36, 32)).init, jax.random.key(0),
                       jnp.zeros((1, 64, 64, 3)))  # fmt: skip


def test_training_forward_has_gradients_for_every_parameter():
    """Traced only (no compilation): the box's dynamic slices keep the gradient path."""
    model = jax_model()
    variables = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), abstract_variables(model))

    def loss(params, box):
        out, _ = model.apply({**variables, "params": params}, jnp.ones((2, *IMAGE, 3)),
                             train=True, box=box, mutable=["batch_stats"])  # fmt: skip
        labels = jnp.zeros((2, *IMAGE), jnp.int32)
        return hrda_losses.hrda_loss(out, labels, None, box)[0]

    grads = jax.eval_shape(jax.grad(loss), variables["params"], jnp.zeros(2, jnp.int32))
    assert jax.tree.structure(grads) == jax.tree.structure(variables["params"])


@pytest.mark.slow
def test_bn_mask_selects_images_for_the_window_statistics():
    """Default-run twin: test_training_forward_parity[True] (batch statistics, no mask).
    Without a box and on batch statistics (DAFormer's teacher), `bn_mask` [1, 0] normalises
    every window batch by the first image's windows only: its logits are those of that image
    alone."""
    model = jax_model()
    variables = converted(torch_model()[1], model)
    images = np.random.default_rng(6).normal(size=(2, *IMAGE, 3)).astype(np.float32)
    apply = jax.jit(
        lambda v, x, mask: model.apply(v, x, train=True, bn_mask=mask, mutable=["batch_stats"])
    )
    masked, _ = apply(variables, images, jnp.array([1.0, 0.0]))
    alone, _ = apply(variables, images[:1], None)
    np.testing.assert_allclose(masked["main"][:1], alone["main"], rtol=1e-4, atol=1e-4)
