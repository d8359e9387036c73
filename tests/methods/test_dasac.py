"""DA-SAC's train steps on the tiny benchmark: the momentum network's cadence against NumPy,
1 vs 8 devices, the SAC step's loss against the loss functions on the step's own tensors,
and the ABN step's target-only BN update (`configs/dasac.py`, `jaxda/train/dasac.py`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import dasac as dasac_config
from jaxda import mesh as mesh_lib
from jaxda import models
from jaxda.data import input_pipeline
from jaxda.losses import sac as sac_losses
from jaxda.train import common, dasac, stages, trainer
from tests.conftest import TINY_DATASET
from tests.train.test_steps import _run, one_and_eight_devices

CROP = (32, 64)  # The tiny dataset's images.


def _config(stage: str, data_dir: str, tmp_path, **sac):
    config = dasac_config.get_config("synthetic")
    for stream in ("source", "target", "eval"):
        config.data[stream].name = TINY_DATASET
    config.data.data_dir = data_dir
    config.model.width = 4
    config.num_devices = 1
    config = stages.stage_config(config, stage, str(tmp_path))
    for stream in (config.data.source, config.data.target):
        stream.size = stream.crop_size = CROP
    config.data.target.importance.weights = ""  # Uniform sampling here.
    config.sac.update(sac)
    return config


def _batches(config, num_steps: int):
    """Host batches from the real input pipeline (source images, target view groups)."""
    streams = {
        domain: input_pipeline.train_iterator(
            input_pipeline.open_reader(config.data[domain], config.data),
            config.data[domain],
            config.data,
            global_batch_size=trainer.stream_batch_size(config, domain),
            seed=(1, position),
            start=0,
        )
        for position, domain in enumerate(("source", "target"))
    }
    return [{d: next(s) for d, s in streams.items()} for _ in range(num_steps)]


def _state(config):
    setup = trainer.build(config, mesh_lib.make_mesh(1))
    return setup, trainer.init_state(config, setup)


def _leaves(tree):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


# Slow run (12 s): the default run checks one SAC step against the losses; this, the
# momentum network's cadence over several steps.
@pytest.mark.slow
def test_teacher_update_cadence(data_dir, tmp_path):
    """The first call copies the student and resets the class prior to beta; afterwards the
    teacher moves as 0.99 teacher + 0.01 student (parameters and BN statistics) at
    iterations 0, 100, 200, ... of each epoch of `sac.epoch_steps` steps, and only then."""
    config = _config("sac", data_dir, tmp_path, epoch_steps=150, teacher_every=100)
    config.sac.teacher_momentum = 0.99
    _, state = _state(config)
    rng = np.random.default_rng(0)
    noisy = lambda tree: jax.tree.map(  # noqa: E731
        lambda x: x + rng.normal(size=x.shape).astype(np.float32), tree
    )
    state = state.replace(
        teachers={"slow": noisy(state.teachers["slow"])},
        extra={"class_prior": jnp.full((19,), 0.3), "teacher_ready": jnp.asarray(False)},
    )
    state = state.with_variables("seg", noisy(state.variables("seg")))
    student, old = _leaves(state.variables("seg")), _leaves(state.teachers["slow"])

    # First call (step 17: a resumed run mid-epoch too): a copy, the prior reset to beta.
    teacher, prior, updated = dasac.teacher_update(state.replace(step=jnp.asarray(17)), config)
    for a, b in zip(_leaves(teacher), student, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(prior, np.full(19, 1e-3, np.float32))
    assert bool(updated)

    ready = state.replace(extra={**state.extra, "teacher_ready": jnp.asarray(True)})
    for step, due in [(0, True), (1, False), (99, False), (100, True), (149, False),
                      (150, True), (200, False), (250, True), (300, True)]:  # fmt: skip
        teacher, prior, updated = dasac.teacher_update(
            ready.replace(step=jnp.asarray(step)), config
        )
        assert bool(updated) == due, step
        np.testing.assert_array_equal(prior, np.full(19, 0.3, np.float32))
        for a, t, s in zip(_leaves(teacher), old, student, strict=True):
            np.testing.assert_allclose(a, 0.99 * t + 0.01 * s if due else t, rtol=1e-6, atol=1e-6)


# ~25 s each; the default run keeps AdaptSegNet's 1-vs-8 test (tests/train/test_steps.py).
@pytest.mark.parametrize("stage", [pytest.param(s, marks=pytest.mark.slow) for s in ("abn", "sac")])
def test_one_and_eight_devices_give_the_same_losses(stage, data_dir, tmp_path):
    config = _config(stage, data_dir, tmp_path, teacher_every=1)
    batches = _batches(config, 2)
    if stage == "sac":  # 2 images x 4 views: the 8 view rows shard over 8 devices.
        assert batches[0]["target"]["group"]["image"].shape[0] == 8
    _, state1, state8 = one_and_eight_devices(config, batches)
    if stage == "sac":
        np.testing.assert_allclose(
            state8.extra["class_prior"], state1.extra["class_prior"], rtol=1e-5, atol=1e-7
        )


def _confident(variables, batch, tmp_path):
    """The network's variables with BN statistics measured on the target views (as after
    ABN: at initialisation the running statistics are (0, 1) and the outputs ~0) and the
    head scaled up, so that some pixels pass DA-SAC's confidence thresholds."""
    abn_model = models.build_segmenter(_config("abn", "", tmp_path).model, 19)
    images = batch["target"]["group"]["clean"]
    statistics = jax.jit(lambda v: common.forward(abn_model, v, images, train=True)[1])
    for _ in range(40):  # BN momentum 0.9: the statistics converge to the batch's.
        variables = {**variables, "batch_stats": statistics(variables)}
    head = jax.tree.map(lambda x: 40 * x, variables["params"]["head_main"])
    return {**variables, "params": {**variables["params"], "head_main": head}}


def test_sac_step_matches_the_loss_functions(data_dir, tmp_path):
    """One SAC step from the ABN-like start: the momentum network becomes a copy of the
    student (first call), the prior is reset and updated from its probabilities, and the
    step's losses equal the loss functions applied to the networks' outputs."""
    config = _config("sac", data_dir, tmp_path)
    (batch,) = _batches(config, 1)
    setup, state = _state(config)
    state = state.with_variables("seg", _confident(state.variables("seg"), batch, tmp_path))
    before = jax.device_get(state)
    step = trainer.jit_train_step(config, setup)
    after, metrics = jax.device_get(step(state, mesh_lib.to_global(batch, mesh_lib.make_mesh(1))))
    student = before.variables("seg")
    for a, b in zip(_leaves(after.teachers["slow"]), _leaves(student), strict=True):
        np.testing.assert_array_equal(a, b)
    assert bool(after.extra["teacher_ready"]) and metrics["teacher_updated"] == 1

    model, cfg, views = setup.networks["seg"].module, config.sac, batch["target"]["group"]
    size = views["image"].shape[1:3]
    logits, _ = common.forward(model, student, views["clean"], train=False)
    probs = jax.nn.softmax(common.upsample(logits, size)["main"], -1)
    prior = sac_losses.update_class_prior(jnp.full((19,), 1e-3), probs, 1e-3, 0.99)
    np.testing.assert_allclose(after.extra["class_prior"], prior, rtol=1e-5, atol=1e-8)
    pad = ~views["valid"]
    affine, affine_inv = sac_losses.view_affines(views["box"], views["flip"])
    fused, _ = sac_losses.fuse_views(probs, affine, affine_inv, pad, 4)
    pseudo, conf = sac_losses.pseudo_labels(
        fused, prior, pad, upper=0.75, lower=0.2, beta=1e-3, discount=True
    )
    assert 0 < np.mean(pseudo != 255) < 1  # Some pixels labelled, some not.
    outputs, batch_stats = common.forward(model, student, batch["source"]["image"], train=True)
    source = sac_losses.cross_entropy_all_pixels(
        common.upsample(outputs, size)["main"], batch["source"]["label"]
    )
    variables = {**student, "batch_stats": batch_stats}
    outputs, _ = common.forward(model, variables, views["image"], train=True)
    weights = sac_losses.focal_weights(prior, 3.0)
    target = sac_losses.confidence_weighted_ce(
        common.upsample(outputs, size)["main"], pseudo, weights, conf, mode="broadcast", group=2
    )
    np.testing.assert_allclose(metrics["loss_source"], source, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_self"], target, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], source + cfg.target_weight * target, rtol=1e-5)
    labelled = pseudo != 255
    np.testing.assert_allclose(
        metrics["pseudo_label_coverage"], np.sum(labelled & views["valid"]) / views["valid"].sum()
    )
    # BN in evaluation mode ('frozen_stats'): its statistics never move, its affine does.
    for a, b in zip(_leaves(after.batch_stats), _leaves(before.batch_stats), strict=True):
        np.testing.assert_array_equal(a, b)
    bn = ("backbone", "layer1_0", "bn1")
    moved = [after.params["seg"], before.params["seg"]]
    for part in bn:
        moved = [m[part] for m in moved]
    assert not np.allclose(moved[0]["bias"], moved[1]["bias"])


# Slow run (12 s): the default run checks the SAC step; the ABN stage runs in the slow
# pipeline test too.
@pytest.mark.slow
def test_abn_step_adapts_only_bn_statistics_to_the_target(data_dir, tmp_path):
    """ABN: one SGD step on the source CE; the target batch then passes through the updated
    network in training mode, so only the BN running statistics see it."""
    config = _config("abn", data_dir, tmp_path)
    (batch,) = _batches(config, 1)
    before, after, (metrics,) = _run(config, [batch], 1)
    setup, _ = _state(config)
    model = setup.networks["seg"].module
    outputs, source_stats = common.forward(
        model, before.variables("seg"), batch["source"]["image"], train=True
    )
    loss = sac_losses.cross_entropy_all_pixels(
        common.upsample(outputs, CROP)["main"], batch["source"]["label"]
    )
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
    updated = {"params": after.params["seg"], "batch_stats": source_stats}
    _, target_stats = common.forward(model, updated, batch["target"]["image"], train=True)
    for a, b in zip(_leaves(after.batch_stats), _leaves(target_stats), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(_leaves(target_stats), _leaves(source_stats), strict=True):
        assert not np.allclose(a, b)  # The target moved them.
