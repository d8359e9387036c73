"""DACS's train step (`jaxda/train/dacs.py`) on the tiny benchmark: its loss against the
source CE and the weighted mixed CE computed here from the step's own draws, the teacher
against the EMA formula over several steps, DAFormer's feature distance and pseudo-label crop
against separate forward passes and NumPy, the configs, and a run interrupted after a
checkpoint ending exactly as an uninterrupted one (`configs/dacs.py`)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import dacs as dacs_config
from configs import daformer as daformer_config
from configs import hrda as hrda_config
from configs import mic as mic_config
from jaxda import checkpoints
from jaxda import mesh as mesh_lib
from jaxda.data import input_pipeline, masking, mixing
from jaxda.data.labels import IGNORE_LABEL
from jaxda.losses import feature_distance
from jaxda.models import layers
from jaxda.train import common, dacs, initialization, trainer
from jaxda.train import state as state_lib
from tests.conftest import shrink_to_tiny
from tests.losses.test_feature_distance import numpy_downscale, numpy_masked_distance


def _config(data_dir, **overrides):
    config = shrink_to_tiny(dacs_config.get_config("synthetic"), data_dir)
    config.batch_size = 4
    for key, value in overrides.items():
        config.dacs[key] = value
    return config


def _batches(config, num_steps: int):
    streams = {
        domain: input_pipeline.train_iterator(
            input_pipeline.open_reader(config.data[domain], config.data),
            config.data[domain],
            config.data,
            global_batch_size=config.batch_size,
            seed=(1, position),
            start=0,
        )
        for position, domain in enumerate(("source", "target"))
    }
    return [{d: next(s) for d, s in streams.items()} for _ in range(num_steps)]


def _ema(alpha, teacher, student):
    return jax.tree.map(lambda a, b: alpha * a + (1 - alpha) * b, teacher, student)


def _np(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(tree))


def _ce(logits, labels, weights=None):
    """NumPy CE per pixel x weight, summed over labelled pixels / all pixels."""
    logits = np.asarray(logits, np.float64)
    log_p = logits - logits.max(-1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(-1, keepdims=True))
    valid = labels != IGNORE_LABEL
    nll = -np.take_along_axis(log_p, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    weights = np.ones(labels.shape) if weights is None else weights
    return np.sum(np.where(valid, nll * weights, 0.0)) / labels.size


def _forward(setup):
    """The segmentation network in training mode (the teacher shares its architecture)."""
    model = setup.modules["seg"]
    return jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))


def _expected_losses(config, forward, state, teacher, batch):
    """(source CE, mixed CE) recomputed outside the step: NumPy losses, the networks applied
    directly (`forward`), the ClassMix and augmentation draws from the step's own key."""
    source, target = batch["source"], batch["target"]
    size = target["image"].shape[1:3]
    up = lambda x: np.asarray(layers.resize_bilinear(x["main"], size), np.float64)  # noqa: E731
    logits, _ = forward(teacher, target["image"])
    p = np.exp(up(logits) - up(logits).max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    pseudo = p.argmax(-1)
    q = np.mean(p.max(-1) >= config.dacs.pseudo_threshold)
    assert 0 < q < 1
    mix_key, _, _ = jax.random.split(state.step_key(), 3)
    mask_key, strong_key = jax.random.split(mix_key)
    mask, _ = mixing.classmix_masks(mask_key, jnp.asarray(source["label"]), 19)
    m = np.asarray(mask)
    image = np.where(m[..., None], source["image"], target["image"])
    image = dacs.strong_transform(strong_key, jnp.asarray(image), config)
    label = np.where(m, source["label"], pseudo)
    weight = np.where(m, 1.0, q)

    student = state.variables("seg")
    out, updates = forward(student, source["image"])
    loss_source = _ce(up(out), np.asarray(source["label"]).astype(np.int64))
    variables = {"params": student["params"], **updates}
    out, _ = forward(variables, image)
    return loss_source, _ce(up(out), label.astype(np.int64), weight)


@pytest.mark.parametrize("timing", ["before", pytest.param("after", marks=pytest.mark.slow)])
def test_step_losses_and_ema_teacher(data_dir, timing):
    """Three steps from step 5 (alpha_t = 5/6, 6/7, 7/8 with alpha 0.9) and a teacher apart
    from the student: the first step's losses equal the ones recomputed here; after every
    step the teacher is alpha_t x teacher + (1 - alpha_t) x student (the student before the
    step for DAFormer's 'before', after it for DACS's 'after'), BN statistics kept."""
    config = _config(data_dir, ema_timing=timing, alpha=0.9)
    setup = trainer.build(config, mesh_lib.make_mesh(1))
    state = trainer.init_state(config, setup)
    rng = np.random.default_rng(0)
    teacher = jax.tree.map(
        lambda x: x + 0.1 * rng.normal(size=x.shape).astype(np.float32), state.teachers["teacher"]
    )
    state = state.replace(step=jnp.asarray(5, jnp.int32), teachers={"teacher": teacher})
    # As the trainer holds it (else the second call compiles the step again).
    state = jax.device_put(state, jax.tree.map(lambda x: x.sharding, setup.abstract_state))
    batches = _batches(config, 3)
    # A randomly initialised network is never 0.968 sure: the median of the teacher's maximum
    # probabilities as threshold gives a confidence weight strictly between 0 and 1.
    forward = _forward(setup)
    logits, _ = forward(teacher, batches[0]["target"]["image"])
    top = jnp.max(jax.nn.softmax(logits["main"], axis=-1), axis=-1)
    config.dacs.pseudo_threshold = float(jnp.median(top))
    step_fn = trainer.jit_train_step(config, setup)
    expected_teacher = _np(teacher["params"])
    teacher_stats = _np(teacher["batch_stats"])
    for i, batch in enumerate(batches):
        t = 5 + i
        alpha = min(1 - 1 / (t + 1), 0.9)
        before = jax.device_get(state)
        if i == 0 and timing == "before":
            ema = _ema(alpha, expected_teacher, _np(before.params["seg"]))
            ema = jax.tree.map(lambda x: x.astype(np.float32), ema)
            teacher_vars = {"params": ema, "batch_stats": before.teachers["teacher"]["batch_stats"]}
            expected = _expected_losses(config, forward, before, teacher_vars, batch)
        state, metrics = step_fn(state, batch)
        student = _np(before.params["seg"] if timing == "before" else state.params["seg"])
        expected_teacher = _ema(alpha, expected_teacher, student)
        got = _np(state.teachers["teacher"])
        pairs = zip(jax.tree.leaves(got["params"]), jax.tree.leaves(expected_teacher), strict=True)
        for a, b in pairs:
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        pairs = zip(
            jax.tree.leaves(got["batch_stats"]), jax.tree.leaves(teacher_stats), strict=True
        )
        for a, b in pairs:
            np.testing.assert_array_equal(a, b)
        assert float(metrics["ema_momentum"]) == pytest.approx(alpha)
        if i == 0 and timing == "before":
            loss_source, loss_mix = expected
            assert float(metrics["loss_source"]) == pytest.approx(loss_source, rel=1e-4)
            assert float(metrics["loss_mix"]) == pytest.approx(loss_mix, rel=1e-4)
            assert float(metrics["loss"]) == pytest.approx(loss_source + loss_mix, rel=1e-4)


@pytest.mark.slow  # ~30 s; by default test_feature_distance_wiring traces the step with MIC
# on, tests/data/test_masking.py checks the masks (the slow FD step test checks MIC's loss too).
def test_mic_adds_the_weighted_ce_of_masked_target_images(data_dir):
    """With MIC on (weight 0.5, blocks of 8): loss_masked is the CE of the student on the
    jittered, blurred, block-masked target images against the teacher's pseudo labels and the
    confidence weight (NumPy), and the loss adds 0.5 x it to the source and mixed CEs."""
    config = _config(data_dir)
    config.dacs.mic.update(weight=0.5, block_size=8)
    setup = trainer.build(config, mesh_lib.make_mesh(1))
    state = trainer.init_state(config, setup)
    state = jax.device_put(state, jax.tree.map(lambda x: x.sharding, setup.abstract_state))
    batch = _batches(config, 1)[0]
    forward = _forward(setup)
    teacher = dacs.teacher_update(
        state.teachers["teacher"], state.variables("seg"), state.step, config.dacs.alpha
    )
    logits, _ = forward(teacher, batch["target"]["image"])
    top = jnp.max(jax.nn.softmax(logits["main"], axis=-1), axis=-1)
    config.dacs.pseudo_threshold = float(jnp.median(top))
    before = jax.device_get(state)  # The step donates its input state.
    _, metrics = trainer.jit_train_step(config, setup)(state, batch)

    size = batch["target"]["image"].shape[1:3]
    p = np.asarray(jax.nn.softmax(layers.resize_bilinear(logits["main"], size), -1), np.float64)
    pseudo, q = p.argmax(-1), np.mean(p.max(-1) >= config.dacs.pseudo_threshold)
    mic_key, _ = jax.random.split(jax.random.fold_in(before.step_key(), dacs._MIC_KEY_TAG))
    strong_key, mask_key = jax.random.split(mic_key)
    image = dacs.strong_transform(strong_key, jnp.asarray(batch["target"]["image"]), config, True)
    keep = np.asarray(masking.block_mask(mask_key, config.batch_size, size, 8, 0.7))
    assert 0.5 < 1 - keep.mean() < 0.9
    out, _ = forward(before.variables("seg"), np.where(keep[..., None], image, 0.0))
    up = np.asarray(layers.resize_bilinear(out["main"], size))
    expected = _ce(up, pseudo, np.full(pseudo.shape, q))
    assert float(metrics["loss_masked"]) == pytest.approx(expected, rel=1e-4)
    total = metrics["loss_source"] + metrics["loss_mix"] + 0.5 * metrics["loss_masked"]
    assert float(metrics["loss"]) == pytest.approx(float(total), rel=1e-6)


def _fd_config(data_dir, model="mit", **feature_distance):
    """The tiny config with DAFormer's additions on: FD weight 0.5 (100 x DAFormer's, to weigh
    in the gradient) on the tiny MiT's stride-4 'stage1' (its 'stage4' grid of 32 x 64 crops
    is 1 x 2, too coarse for thing patches), the thing classes; 3 / 5 rows cropped; MIC off."""
    arg = "synthetic,model=mit" if model == "mit" else "synthetic"
    config = shrink_to_tiny(dacs_config.get_config(arg), data_dir)
    config.batch_size = 4
    config.dacs.feature_distance.update({"weight": 0.5, "layer": "stage1", **feature_distance})
    config.dacs.pseudo_ignore_top, config.dacs.pseudo_ignore_bottom = 3, 5
    return config


@pytest.mark.slow  # 85-125 s on 2 busy cores (MiT compiles); twin: test_feature_distance_wiring
def test_feature_distance_and_pseudo_label_crop_step(data_dir):
    """The step's losses with FD, the crop and MIC on equal ones recomputed from separate
    forward passes and NumPy: FD between the student's training-mode 'stage1' features on the
    source batch (the source CE's forward, its dropout key) and the frozen network's
    evaluation-mode ones, over the patches whose 4 x 4 labels are >= 75% a thing class; the
    mixed CE with the pseudo weight 0 on the 3 top and 5 bottom rows, 1 on pasted source
    pixels; MIC's CE with the cropped weights (MIC's code); the logged confidence weight is
    the share over all target pixels. Over two steps 'imnet' (outside the optimizer) stays as
    it was, bit for bit, while the student moves."""
    config = _fd_config(data_dir)
    config.dacs.mic.update(weight=0.25, block_size=8)
    setup = trainer.build(config, mesh_lib.make_mesh(1))
    state = trainer.init_state(config, setup)
    assert set(state.teachers) == {"teacher", "imnet"} and "imnet" not in state.params
    # The frozen copy apart from the student (at init they are equal: FD would be 0).
    rng = np.random.default_rng(0)
    for a, b in zip(
        *map(jax.tree.leaves, (state.teachers["imnet"], state.variables())), strict=True
    ):
        np.testing.assert_array_equal(a, b)  # A copy of the student's initialisation.
    imnet = jax.device_get(state.teachers["imnet"])  # On the host: the step donates the state.
    noise = lambda x: x + 0.05 * rng.normal(size=x.shape).astype(x.dtype)  # noqa: E731
    imnet = {**imnet, "params": jax.tree.map(noise, imnet["params"])}
    state = state.replace(teachers={**state.teachers, "imnet": imnet})
    state = jax.device_put(state, jax.tree.map(lambda x: x.sharding, setup.abstract_state))
    batches = _batches(config, 2)
    source, target = batches[0]["source"], batches[0]["target"]
    model = setup.modules["seg"]
    student = jax.device_get(state.variables("seg"))  # Step 0: the teacher becomes it.
    size = target["image"].shape[1:3]
    up = lambda x: np.asarray(layers.resize_bilinear(x["main"], size), np.float64)  # noqa: E731
    # One compiled training-mode forward with features for the student's passes (and the
    # teacher's: at step 0 it is the student, run without dropout).
    forward = jax.jit(
        lambda v, x, rngs: model.apply(
            v, x, train=True, mutable=["batch_stats", "intermediates"], rngs=rngs
        )
    )
    logits, _ = forward(student, target["image"], {})
    p = np.exp(up(logits) - up(logits).max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    # A randomly initialised network is never 0.968 sure: the threshold is the middle of the
    # widest gap between neighbours in the middle half of the sorted maximum probabilities (a
    # confidence weight strictly between 0 and 1 that float32 rounding cannot change).
    top = np.sort(p.max(-1).ravel())
    middle = top[top.size // 4 : 3 * top.size // 4]
    k = int(np.argmax(np.diff(middle)))
    config.dacs.pseudo_threshold = float(middle[k] + middle[k + 1]) / 2
    q = np.mean(p.max(-1) >= config.dacs.pseudo_threshold)
    assert 0 < q < 1
    mix_key, source_key, mixed_key = jax.random.split(state.step_key(), 3)
    mask_key, strong_key = jax.random.split(mix_key)
    m = np.asarray(mixing.classmix_masks(mask_key, jnp.asarray(source["label"]), 19)[0])
    image = np.where(m[..., None], source["image"], target["image"])
    image = dacs.strong_transform(strong_key, jnp.asarray(image), config)
    pseudo_weight = np.full(m.shape, q)
    pseudo_weight[:, :3] = pseudo_weight[:, -5:] = 0.0
    weight = np.where(m, 1.0, pseudo_weight)
    label = np.where(m, source["label"], p.argmax(-1)).astype(np.int64)

    out, updates = forward(student, source["image"], {"dropout": source_key})
    loss_source = _ce(up(out), np.asarray(source["label"]).astype(np.int64))
    _, frozen = model.apply(jax.device_get(imnet), source["image"], mutable=["intermediates"])
    patches = numpy_downscale(source["label"], 4, 0.75, 19)
    fd, count = numpy_masked_distance(
        updates["intermediates"]["stage1"][0],
        frozen["intermediates"]["stage1"][0],
        np.isin(patches, feature_distance.THING_CLASSES),
    )
    assert 0 < count < patches.size and fd > 0
    variables = {"params": student["params"], "batch_stats": updates["batch_stats"]}
    out, _ = forward(variables, image, {"dropout": mixed_key})
    loss_mix = _ce(up(out), label, weight)
    mic_key, masked_key = jax.random.split(jax.random.fold_in(state.step_key(), dacs._MIC_KEY_TAG))
    strong_key, mask_key = jax.random.split(mic_key)
    masked = dacs.strong_transform(strong_key, jnp.asarray(target["image"]), config, True)
    keep = np.asarray(masking.block_mask(mask_key, config.batch_size, size, 8, 0.7))
    out, _ = forward(variables, np.where(keep[..., None], masked, 0.0), {"dropout": masked_key})
    loss_masked = _ce(up(out), p.argmax(-1), pseudo_weight)

    step_fn = trainer.jit_train_step(config, setup)
    state, metrics = step_fn(state, batches[0])
    assert float(metrics["loss_source"]) == pytest.approx(loss_source, rel=1e-4)
    assert float(metrics["loss_feature_distance"]) == pytest.approx(fd, rel=1e-4)
    assert int(metrics["feature_distance_patches"]) == count
    assert float(metrics["loss_mix"]) == pytest.approx(loss_mix, rel=1e-4)
    assert float(metrics["confidence_weight"]) == pytest.approx(q, rel=1e-6)
    assert float(metrics["loss_masked"]) == pytest.approx(loss_masked, rel=1e-4)
    expected = loss_source + loss_mix + 0.5 * fd + 0.25 * loss_masked
    assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-4)
    state, _ = step_fn(state, batches[1])
    state = jax.device_get(state)
    for a, b in zip(jax.tree.leaves(state.teachers["imnet"]), jax.tree.leaves(imnet), strict=True):
        np.testing.assert_array_equal(a, b)
    moved = jax.tree.leaves(state.params["seg"]), jax.tree.leaves(student["params"])
    assert any(not np.array_equal(a, b) for a, b in zip(*moved, strict=True))


def _traced_metrics(config, batch_size=4, crop=(32, 64)):
    """The step's metric shapes, traced on shapes only (nothing compiles or runs)."""
    setup = trainer.build(config, mesh_lib.make_mesh(1))
    stream = {
        "image": jax.ShapeDtypeStruct((batch_size, *crop, 3), jnp.float32),
        "label": jax.ShapeDtypeStruct((batch_size, *crop), jnp.uint8),
    }
    step = functools.partial(
        setup.method.train_step, networks=setup.modules, tx=setup.tx, config=config
    )
    _, metrics = jax.eval_shape(step, setup.abstract_state, {"source": stream, "target": stream})
    return setup, metrics


def test_feature_distance_wiring(data_dir):
    """Default-run twin of the step test above, traced on shapes (the tiny DeepLabV2 traces in
    half the MiT's time; classes=() as its grid cannot take DAFormer's mask, which
    tests/losses/test_feature_distance.py checks): with the weight on, the networks gain
    'imnet', a teacher slot (no optimizer) initialised as a copy of 'seg' after any load, and
    the step logs the term and its patch count; '' picks the last stage, an unknown layer is
    named."""
    config = _fd_config(data_dir, model="deeplab_v2", layer="", classes=())
    config.dacs.mic.update(weight=1.0, block_size=8)  # MIC's pass traces too.
    setup, metrics = _traced_metrics(config)
    assert metrics["loss_masked"].shape == ()
    assert set(setup.networks) == {"seg", "teacher", "imnet"}
    assert setup.networks["imnet"].is_teacher and setup.networks["imnet"].init == "copy:seg"
    assert "imnet" in setup.abstract_state.teachers and "imnet" not in setup.abstract_state.params
    assert metrics["loss_feature_distance"].shape == metrics["feature_distance_patches"].shape == ()
    # Copies are made after loads: with init_from, 'imnet' starts as the loaded weights.
    config = _fd_config(data_dir)
    config.init_from = "/imagenet"
    assert list(initialization.sources(config, setup.networks).items()) == [
        ("seg", "/imagenet"),
        ("teacher", "copy:seg"),
        ("imnet", "copy:seg"),
    ]
    layer = functools.partial(common.feature_layer, key="config.dacs.feature_distance.layer")
    sown = {"layer1": 0, "layer4": 0}
    assert layer({"stage1": 0, "stage4": 0}, "") == "stage4"
    assert layer(sown, "") == layer(sown, "layer4") == "layer4"
    with pytest.raises(ValueError, match=r"distance.layer='stage9'.*'layer4'"):
        layer(sown, "stage9")
    with pytest.raises(ValueError, match=r"layer='': the network sows \['feature'\]"):
        layer({"feature": 0}, "")


def test_configs_build():
    for arg in ("", "synthetic,model=mit"):
        config = dacs_config.get_config(arg)
        setup = trainer.build(config, mesh_lib.make_mesh(1))
        assert set(setup.networks) == {"seg", "teacher"}
        assert "head_aux" not in setup.abstract_state.params["seg"]
        # DAFormer's additions are off (DACS), their keys at DAFormer's other values.
        cfg, fd = config.dacs, config.dacs.feature_distance
        assert (fd.weight, cfg.pseudo_ignore_top, cfg.pseudo_ignore_bottom) == (0.0, 0, 0)
        assert tuple(fd.classes) == (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)
        assert (fd.min_ratio, fd.layer) == (0.75, "")
    daformer, original = dacs_config.get_config(), dacs_config.get_config("original")
    assert (daformer.optimizer.name, daformer.optimizer.learning_rate) == ("adamw", 6e-5)
    assert (original.optimizer.name, original.optimizer.learning_rate) == ("sgd", 2.5e-4)
    assert (daformer.dacs.classmix_pool, original.dacs.classmix_pool) == ("batch", "sample")
    assert daformer.dacs.strong.jitter_strength == 0.2
    assert original.dacs.strong.jitter_strength == 0.25
    assert (daformer.model.num_aspp_branches, original.model.num_aspp_branches) == (4, 2)
    assert daformer.data.source.crop_size == daformer.data.target.crop_size == (512, 512)
    assert dacs_config.get_config("source=synthia").data.source.size == (760, 1280)
    with pytest.raises(ValueError, match="model="):
        dacs_config.get_config("model=deeplabv3plus")


def test_daformer_and_mic_configs():
    """DAFormer's final values over DACS's, MIC's on top; the frozen copy is a third network."""
    config = daformer_config.get_config()
    setup = trainer.build(config, mesh_lib.make_mesh(1))
    assert set(setup.networks) == {"seg", "teacher", "imnet"}
    assert config.model.name == "segformer" and config.model.variant == "b5"
    assert (config.dacs.alpha, config.dacs.feature_distance.weight) == (0.999, 0.005)
    assert (config.dacs.pseudo_ignore_top, config.dacs.pseudo_ignore_bottom) == (15, 120)
    assert config.data.source.rare_class.to_dict() == {
        "temperature": 0.01, "min_pixels": 3000, "min_crop_ratio": 0.5,
    }  # fmt: skip
    assert config.data.source.crop_cat_max_ratio == 0.75
    assert config.optimizer.no_weight_decay == (r"backbone/.*norm.*",)
    assert config.dacs.mic.weight == 0.0
    mic = mic_config.get_config()
    assert (mic.dacs.mic.weight, mic.dacs.mic.block_size, mic.dacs.mic.ratio) == (1.0, 32, 0.7)
    assert mic_config.get_config("synthetic").dacs.mic.block_size == 4
    assert daformer_config.get_config("source=synthia").data.source.size == (760, 1280)
    assert tuple(daformer_config.get_config("model=deeplab_v2").dacs.feature_distance.classes) == ()
    with pytest.raises(ValueError, match="base='hrda'"):
        mic_config.get_config("base=hrda")


def test_hrda_config():
    """HRDA's values over DAFormer's: its network, the 2x resolution, 1024 crops, rare-class
    crops needing 4x the pixels, the rows of its pseudo-label margins, slide evaluation."""
    config = hrda_config.get_config()
    config.model.variant = "b0"  # The networks' structure, in a quarter of B5's tracing time.
    setup = trainer.build(config, mesh_lib.make_mesh(1))
    assert set(setup.abstract_state.params["seg"]) == {"backbone", "head", "scale_attention"}
    assert set(setup.networks) == {"seg", "teacher", "imnet"}
    assert config.data.source.size == (1407, 2560) and config.data.target.size == (1024, 2048)
    assert config.data.source.crop_size == config.data.target.crop_size == (1024, 1024)
    assert config.data.source.rare_class.min_crop_ratio == 2.0
    assert (config.dacs.pseudo_ignore_top, config.dacs.pseudo_ignore_bottom) == (30, 240)
    assert (config.eval.mode, config.eval.slide_window) == ("slide", (1024, 1024))
    assert (config.model.hr_crop_size, config.model.hr_loss_weight) == ((512, 512), 0.1)
    synthetic = hrda_config.get_config("synthetic")
    assert synthetic.data.source.name.endswith("128x256")
    assert hrda_config.get_config("source=synthia").data.source.size == (1520, 2560)


def test_hrda_student_pass_draws_a_box_and_takes_the_fused_and_detail_loss():
    """`student_pass` on HRDA: the detail box comes from the pass's key (offsets multiples of
    8), the loss is 0.9 x CE(fused) + 0.1 x CE(detail under the box) against NumPy, and two
    keys give two boxes."""
    from jaxda import models
    from jaxda.models import hrda as hrda_model

    config = hrda_config.get_config("synthetic")
    config.model.hr_crop_size = (16, 16)
    model = models.build_segmenter(config.model, config.num_classes)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(2, 32, 64, 3)), jnp.float32)
    labels = rng.integers(0, 19, size=(2, 32, 64)).astype(np.uint8)
    weights = rng.random((2, 32, 64)).astype(np.float32)
    variables = jax.jit(model.init)(jax.random.key(0), images)
    student_pass = jax.jit(
        lambda key: dacs.student_pass(
            model, variables, images, labels, weights, rng=key, config=config
        )
    )
    apply = jax.jit(
        lambda box, key: model.apply(
            variables, images, train=True, box=box, mutable=["batch_stats"], rngs={"dropout": key}
        )
    )
    boxes = set()
    for seed in (1, 2, 3):
        key = jax.random.key(seed)
        loss, _, _, terms = student_pass(key)
        box = hrda_model.crop_box(jax.random.fold_in(key, dacs._BOX_KEY_TAG), (32, 64), (16, 16))
        y, x = (int(v) for v in box)
        assert y % 8 == 0 and x % 8 == 0
        boxes.add((y, x))
        out, _ = apply(box, key)
        fused = np.asarray(layers.resize_bilinear(out["main"], (32, 64)))
        hr = np.asarray(layers.resize_bilinear(out["hr"], (16, 16)))
        under = (slice(None), slice(y, y + 16), slice(x, x + 16))
        expected_hr = _ce(hr, labels[under].astype(np.int64), weights[under])
        expected = 0.9 * _ce(fused, labels.astype(np.int64), weights) + 0.1 * expected_hr
        assert float(terms["loss_hr"]) == pytest.approx(expected_hr, rel=1e-4)
        assert float(loss) == pytest.approx(expected, rel=1e-4)
    assert len(boxes) > 1


class _Crash(Exception):
    pass


def _restored(config, workdir):
    setup = trainer.build(config, mesh_lib.make_mesh(1))
    checkpointer = checkpoints.Checkpointer(workdir)
    items, _ = checkpointer.restore(
        checkpointer.latest_step(),
        setup.checkpoint_items(setup.abstract_state),
        checkpoints.model_meta(config.model),
    )
    checkpointer.close()
    return jax.device_get(setup.from_checkpoint_items(items))


@pytest.mark.slow  # ~1 min each: three short runs with evaluations; the default run tests the
# steps (DACS, MIC, and the feature distance's wiring) and test_rare_class the sampling.
@pytest.mark.parametrize("name", ["dacs", "daformer", "mic", "hrda"])
def test_runs_and_resumes_exactly(data_dir, tmp_path, monkeypatch, name):
    """The synthetic config end to end on the tiny dataset; a run crashed after its step-2
    checkpoint and rerun ends with the same results, student and teacher (and DAFormer's
    frozen copy), bit for bit."""
    module = {"dacs": dacs_config, "daformer": daformer_config, "mic": mic_config}.get(name)
    module = module or hrda_config
    config = shrink_to_tiny(module.get_config("synthetic"), data_dir)
    config.batch_size = 4
    config.dacs.pseudo_threshold = 0.968
    config.total_steps = 4
    straight_dir, crashed_dir = str(tmp_path / "straight"), str(tmp_path / "crashed")
    straight = trainer.train_and_evaluate(config, straight_dir)
    assert 0 <= straight["final"]["miou"] <= 100

    make_iterator = input_pipeline.train_iterator

    def crashing_iterator(*args, **kwargs):
        iterator = make_iterator(*args, **kwargs)
        for _ in range(3):  # The batches of steps 1-3 (one ahead): crash before step 3.
            yield next(iterator)
        raise _Crash

    monkeypatch.setattr(input_pipeline, "train_iterator", crashing_iterator)
    with pytest.raises(_Crash):
        trainer.train_and_evaluate(config, crashed_dir)
    monkeypatch.setattr(input_pipeline, "train_iterator", make_iterator)
    assert checkpoints.Checkpointer(crashed_dir).all_steps() == [2]
    resumed = trainer.train_and_evaluate(config, crashed_dir)

    assert resumed["final"] == {**straight["final"], "seconds": resumed["final"]["seconds"]}
    a, b = _restored(config, crashed_dir), _restored(config, straight_dir)
    assert isinstance(a, state_lib.TrainState) and int(a.step) == 4
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
