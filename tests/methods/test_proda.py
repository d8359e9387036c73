"""ProDA's train steps on the tiny benchmark: 1 vs 8 devices, the EMA teacher and the
prototype EMA inside stage 1 against NumPy, the distillation step's losses, and the stage
configs (`configs/proda.py`)."""

import jax
import numpy as np
import pytest

from configs import proda as proda_config
from jaxda import mesh as mesh_lib
from jaxda.data import input_pipeline
from jaxda.losses import proda as proda_losses
from jaxda.train import common, stages, trainer
from tests.conftest import TINY_DATASET
from tests.train.test_steps import _run, one_and_eight_devices

NUM_CLASSES = 19


def _config(stage: str, data_dir: str, tmp_path, num_devices: int = 1):
    config = proda_config.get_config("synthetic")
    for stream in ("source", "target", "eval"):
        config.data[stream].name = TINY_DATASET
    config.data.data_dir = data_dir
    config.model.width = 4
    config.discriminator.width = 4
    config.batch_size = 8
    config.num_devices = num_devices
    config = stages.stage_config(config, stage, str(tmp_path))
    crop = (32, 64)  # The tiny dataset's images are 32x64.
    for stream in (config.data.source, config.data.target):
        stream.size = crop
        stream.crop_size = crop
    config.data.target.views.weak.crop_size = crop
    prototypes = np.random.default_rng(0).normal(size=(NUM_CLASSES, 32)).astype(np.float32)
    np.save(tmp_path / "prototypes.npy", prototypes)
    config.proda.prototypes = str(tmp_path / "prototypes.npy")
    return config


def _batches(config, num_steps: int, seed: int = 0):
    """Host batches from the real input pipeline, with random base-frame artifacts."""
    rng = np.random.default_rng(seed)
    streams = {}
    for position, domain in enumerate(("source", "target")):
        reader = input_pipeline.open_reader(config.data[domain], config.data)
        streams[domain] = input_pipeline.train_iterator(
            reader,
            config.data[domain],
            config.data,
            global_batch_size=8,
            seed=(1, position),
            start=0,
        )
    batches = []
    for _ in range(num_steps):
        batch = {d: next(s) for d, s in streams.items()}
        n = config.batch_size
        batch["target"]["soft"] = rng.dirichlet(np.ones(NUM_CLASSES), (n, 5, 9)).astype(np.float32)
        batch["target"]["pseudo_label"] = rng.integers(0, NUM_CLASSES, (n, 32, 64), np.uint8)
        batch["target"]["confidence"] = rng.uniform(0.9, 1.0, (n, 32, 64)).astype(np.float16)
        batches.append(batch)
    return batches


# Slow: ~1 min for both; the default run checks 1 vs 8 devices on DA-SAC's teacher step and
# the adversarial / source-only steps (tests/train/test_steps.py).
@pytest.mark.slow
@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_one_and_eight_devices_give_the_same_losses(stage, data_dir, tmp_path):
    config = _config(stage, data_dir, tmp_path)
    batches = _batches(config, 2)
    _, state1, state8 = one_and_eight_devices(config, batches)
    if stage == "stage1":
        np.testing.assert_allclose(
            state8.extra["prototypes"], state1.extra["prototypes"], rtol=1e-5, atol=1e-7
        )


@pytest.mark.slow  # ~20 s each: ProDA's step tests run with its pipeline in the slow run.
def test_stage1_updates_teacher_and_prototypes_as_ema(data_dir, tmp_path):
    """teacher' = 0.999 teacher + 0.001 student' with the student's BN statistics; the
    prototypes move by the EMA of the teacher's class means (computed here again from the
    teacher's forward pass, with NumPy's sequential update)."""
    config = _config("stage1", data_dir, tmp_path)
    config.proda.prototype_momentum = 0.1  # Large enough to see.
    config.proda.prototype_min_pixels = 1
    config.proda.teacher_train_mode = False  # Deterministic teacher outputs to recompute.
    (batch,) = _batches(config, 1)
    before, after, (metrics,) = _run(config, [batch], 1)
    for key in ("loss_source", "loss_pseudo", "loss_consistency"):
        assert np.isfinite(metrics[key]) and metrics[key] > 0, key
    teacher, student = after.teachers["ema"], after.variables("seg")
    expected = jax.tree.map(
        lambda t, s: 0.999 * t + 0.001 * s,
        before.teachers["ema"]["params"],
        student["params"],
    )
    for a, b in zip(jax.tree.leaves(teacher["params"]), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(
        jax.tree.leaves(teacher["batch_stats"]),
        jax.tree.leaves(student["batch_stats"]),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)

    setup = trainer.build(config, mesh_lib.make_mesh(1))
    outputs, _, sown = common.forward(
        setup.networks["ema"].module, before.teachers["ema"], batch["target"]["full"]["image"],
        train=False, features=True,
    )  # fmt: skip
    size = tuple(s // 4 for s in batch["target"]["full"]["image"].shape[1:3])
    feature = np.asarray(common.upsample({"f": sown["feature"]}, size)["f"], np.float64)
    logits = np.asarray(common.upsample(outputs, size)["main"])
    prototypes = np.array(before.extra["prototypes"], np.float64)
    argmax = logits.argmax(-1)
    for n in range(len(argmax)):
        for k in range(NUM_CLASSES):
            mask = argmax[n] == k
            if mask.sum() >= 1:
                mean = feature[n][mask].mean(0)
                prototypes[k] = 0.9 * prototypes[k] + 0.1 * mean
    np.testing.assert_allclose(after.extra["prototypes"], prototypes, rtol=2e-4, atol=2e-5)
    assert np.any(after.extra["prototype_counts"] > 0)


@pytest.mark.slow
def test_distillation_step_losses_match_the_loss_functions(data_dir, tmp_path):
    """The step's distillation term equals `proda_losses.distillation` of the student's and
    the fixed teacher's strong-view logits at a quarter of the crop; the teacher never
    changes; stage 2's student has bn_clr (ProDA's SimCLR student), its teacher has not."""
    config = _config("stage2", data_dir, tmp_path)
    config.model.dropout = False  # So that the student's forward can be recomputed.
    (batch,) = _batches(config, 1)
    before, after, (metrics,) = _run(config, [batch], 1)
    for a, b in zip(
        jax.tree.leaves(before.teachers["teacher"]), jax.tree.leaves(after.teachers["teacher"]),
        strict=True,
    ):  # fmt: skip
        np.testing.assert_array_equal(a, b)
    assert "bn_pretrain" in before.params["seg"]
    assert "bn_pretrain" not in before.teachers["teacher"]["params"]
    setup = trainer.build(config, mesh_lib.make_mesh(1))
    image = batch["target"]["strong"]["image"]
    size = tuple(s // 4 for s in image.shape[1:3])
    teacher, _ = common.forward(
        setup.networks["teacher"].module, before.teachers["teacher"], image, train=False
    )
    student, _ = common.forward(setup.model, before.variables("seg"), image, train=True)
    expected = {
        kind: float(
            proda_losses.distillation(
                common.upsample(student, size)["main"], common.upsample(teacher, size)["main"], kind
            )
        )
        for kind in ("proda", "kl")
    }
    np.testing.assert_allclose(metrics["loss_distill"], expected["proda"], rtol=1e-4)
    assert expected["kl"] != pytest.approx(expected["proda"])
    assert 0 < metrics["pseudo_label_coverage"] <= 1
