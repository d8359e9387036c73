"""MinEnt, MaxSquare, TENT / BN-adapt and logit ensembles on tiny networks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import maxsquare, minent, tent
from jaxda import mesh as mesh_lib
from jaxda.evaluation import run as eval_run
from jaxda.models import layers
from jaxda.models.layers import resize_bilinear_align_corners
from jaxda.train import trainer
from tests.conftest import tiny_config
from tests.train.test_steps import _batch, _numpy_log_softmax, _paths


def _tiny(module, arg, data_dir="", **overrides):
    config = module.get_config(f"synthetic{',' + arg if arg else ''}")
    base = tiny_config("source_only", data_dir=data_dir, **overrides)
    for key in ("data", "batch_size", "num_devices", "total_steps", "log_every_steps"):
        config[key] = base[key]
    config.eval_every_steps = config.checkpoint_every_steps = 2
    config.model.width, config.discriminator.width = 4, 4
    return config


def _target_probs(setup, variables, images, head):
    out, _ = setup.model.apply(variables, images, train=True, mutable=["batch_stats"])
    logits = np.asarray(resize_bilinear_align_corners(out[head], (32, 64)), np.float64)
    return np.exp(_numpy_log_softmax(logits))


def _step_metrics(config):
    batch = _batch(config)
    mesh = mesh_lib.make_mesh(1)
    setup = trainer.build(config, mesh)
    state = trainer.init_state(config, setup)
    variables = jax.device_get(state.model_variables())
    _, metrics = trainer.jit_train_step(config, setup)(state, mesh_lib.to_global(batch, mesh))
    return setup, variables, batch, jax.device_get(metrics)


def test_minent_step_has_no_discriminator_and_the_advent_entropy():
    config = _tiny(minent, "")
    setup, variables, batch, metrics = _step_metrics(config)
    assert "disc" not in setup.abstract_state.params and set(setup.networks) == {"seg"}
    for head in ("main", "aux"):
        p = _target_probs(setup, variables, batch["target"]["image"], head)
        expected = -np.sum(p * np.log2(p + 1e-30)) / (p[..., 0].size * np.log2(19))
        assert float(metrics[f"loss_ent_{head}"]) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize(
    "arg",
    [
        # 'iw,multi' runs every term; the plain and IW-only steps are in the slow run.
        pytest.param("", marks=pytest.mark.slow),
        pytest.param("iw", marks=pytest.mark.slow),
        "iw,multi",
    ],
)
def test_maxsquare_step_losses(arg):
    config = _tiny(maxsquare, arg)
    setup, variables, batch, metrics = _step_metrics(config)
    p = _target_probs(setup, variables, batch["target"]["image"], "main")
    if "iw" in arg:
        n, h, w, c = p.shape
        arg_max = p.argmax(-1)
        weights = np.zeros((n, h, w))
        for i in range(n):
            hist = np.bincount(arg_max[i].ravel(), minlength=c).astype(np.float64)
            weights[i] = (1 / np.maximum(hist**0.2 * hist.sum() ** 0.8, 1))[arg_max[i]]
        expected = -np.sum(p**2 * weights[..., None]) / (n * c)
    else:
        expected = -np.mean(p**2) / 2
    assert float(metrics["loss_maxsquare"]) == pytest.approx(expected, rel=1e-4)
    assert ("loss_guidance_aux" in metrics) == ("multi" in arg)
    assert ("head_aux" in setup.abstract_state.params["seg"]) == ("multi" in arg)
    # MaxSquare trains the BN affine parameters except the stem's.
    labels = trainer.optimizers.network_labels(
        setup.model,
        setup.abstract_state.params["seg"],
        "optimizer",
        freeze_bn_affine=False,
        freeze=config.optimizer.freeze,
    )
    flat = _paths(labels)
    assert flat[("backbone", "bn1", "scale")] == "frozen"
    assert flat[("backbone", "layer1_0", "bn1", "scale")] == "optimizer/backbone"


def _tent_step(config, batch):
    """(state before, state after) of one jitted TENT / BN-adapt step on `batch`."""
    mesh = mesh_lib.make_mesh(1)
    setup = trainer.build(config, mesh)
    state = trainer.init_state(config, setup)
    before = jax.device_get(state)
    after, _ = trainer.jit_train_step(config, setup)(state, mesh_lib.to_global(batch, mesh))
    return setup, before, jax.device_get(after)


def _tent_config(norm: bool):
    config = _tiny(tent, "norm" if norm else "")
    config.batch_size = 8
    return config


@pytest.mark.parametrize("norm", [False, True], ids=["tent", "norm"])
def test_tent_step_moves_only_bn_affine_and_scores_before_updating(norm):
    config = _tent_config(norm)
    data = _batch(config)["target"]
    batch = {"eval": {**data, "valid": np.ones(8, bool)}}
    setup, before, after = _tent_step(config, batch)
    for path, start in _paths(before.params["seg"]).items():
        moved = not np.array_equal(start, _paths(after.params["seg"])[path])
        assert moved == (not norm and layers.is_batch_norm_param(path)), path
    # The scored prediction is the pre-update one, with batch statistics.
    variables = before.variables("seg")
    out, _ = setup.model.apply(variables, data["image"], train=True, mutable=["batch_stats"])
    predicted = np.asarray(jnp.argmax(resize_bilinear_align_corners(out["main"], (32, 64)), -1))
    ok = data["label"] != 255
    confusion = after.extra["confusion"]
    assert int(np.trace(confusion)) == int((predicted == data["label"])[ok].sum())
    assert int(confusion.sum()) == int(ok.sum())
    # Running statistics stay those of the starting network.
    for a, b in zip(
        jax.tree.leaves(before.batch_stats), jax.tree.leaves(after.batch_stats), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_tent_padding_enters_neither_bn_statistics_nor_the_entropy():
    """A last batch of 5 images padded to 8 adapts exactly as the 5 images alone would."""
    config = _tent_config(norm=False)
    data = _batch(config)["target"]
    valid = np.arange(8) < 5
    padded = {
        "image": np.where(valid[:, None, None, None], data["image"], 0.0).astype(np.float32),
        "label": np.where(valid[:, None, None], data["label"], 255).astype(np.uint8),
        "valid": valid,
    }
    _, _, with_padding = _tent_step(config, {"eval": padded})
    config.batch_size = 5
    alone = {"eval": {k: v[:5] for k, v in padded.items()}}
    _, before, without_padding = _tent_step(config, alone)
    np.testing.assert_array_equal(
        with_padding.extra["confusion"], without_padding.extra["confusion"]
    )
    np.testing.assert_allclose(
        with_padding.extra["entropy_sum"], without_padding.extra["entropy_sum"], rtol=1e-5
    )
    start, moved = _paths(before.params["seg"]), _paths(without_padding.params["seg"])
    for path, value in _paths(with_padding.params["seg"]).items():
        update, expected = value - start[path], moved[path] - start[path]
        np.testing.assert_allclose(update, expected, atol=1e-3 * np.abs(expected).max() + 1e-9)


# Slow run (16 s): test_tent_padding_enters_neither_bn_statistics_nor_the_entropy runs TENT
# end to end and tests/evaluation covers ensembles in the default run.
@pytest.mark.slow
def test_tent_and_ensemble_end_to_end(data_dir, tmp_path):
    source = str(tmp_path / "source")
    config = tiny_config("source_only", data_dir=data_dir, total_steps=2)
    trained = trainer.train_and_evaluate(config, source)["final"]

    adapt = _tiny(tent, "", data_dir=data_dir)
    adapt.init_from = source
    summary = trainer.train_and_evaluate(adapt, str(tmp_path / "tent"))
    assert summary["method"] == "tent"
    assert summary["starting_checkpoint"]["miou"] == pytest.approx(trained["miou"])
    assert summary["final"]["protocol"]["updates"].startswith("BN scale/offset")
    assert summary["final"]["step"] == 2  # 16 validation images in batches of 8.

    # Logit ensembles: the same checkpoint twice, or a zero-weight second member, change nothing.
    config.eval.ensemble = (f"{source}:0.5", f"{source}:0.5")
    assert eval_run.evaluate_checkpoint(config, source)["miou"] == pytest.approx(trained["miou"])
    config.eval.ensemble = (f"{source}:1", f"{tmp_path / 'nowhere'}:0")
    with pytest.raises(FileNotFoundError, match="No checkpoint found"):
        eval_run.evaluate_checkpoint(config, source)
