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
from jaxda.train import tent as tent_lib
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
    assert setup.abstract_state.params["disc"] == {} and not setup.method.discriminator_heads(
        config
    )
    for head in ("main", "aux"):
        p = _target_probs(setup, variables, batch["target"]["image"], head)
        expected = -np.sum(p * np.log2(p + 1e-30)) / (p[..., 0].size * np.log2(19))
        assert float(metrics[f"loss_ent_{head}"]) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("arg", ["", "iw", "iw,multi"])
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
    labels = trainer.optimizers.param_labels(False, config.optimizer.freeze)(
        setup.abstract_state.params
    )
    flat = _paths(labels["seg"])
    assert flat[("backbone", "bn1", "scale")] == "frozen"
    assert flat[("backbone", "layer1_0", "bn1", "scale")] == "backbone"


@pytest.mark.parametrize("update", [True, False], ids=["tent", "norm"])
def test_tent_step_moves_only_bn_affine_and_scores_before_updating(update):
    config = tiny_config("source_only")
    config.method = "tent" if update else "bn_adapt"
    config.tent = tent.get_config("synthetic").tent
    config.tent.update_bn_affine = update
    model = trainer.build(config, mesh_lib.make_mesh(1)).model.clone(train_batch_stats=True)
    images = jnp.asarray(_batch(config)["target"]["image"])
    labels = jnp.asarray(_batch(config)["target"]["label"])
    variables = model.init(jax.random.key(0), images, train=False)
    tx = tent_lib.bn_only_optimizer(config.tent)
    params, _opt_state, confusion, _ = jax.jit(
        lambda p, o, s, x, y: tent_lib.adapt_step(p, o, s, x, y, model=model, tx=tx, config=config)
    )(variables["params"], tx.init(variables["params"]), variables["batch_stats"], images, labels)
    for path, before in _paths(variables["params"]).items():
        moved = not np.array_equal(before, _paths(params)[path])
        assert moved == (update and layers.is_batch_norm_param(path)), path
    # The scored prediction is the pre-update one, with batch statistics.
    out, _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
    predicted = jnp.argmax(resize_bilinear_align_corners(out["main"], (32, 64)), -1)
    ok = np.asarray(labels) != 255
    assert int(np.trace(np.asarray(confusion))) == int((np.asarray(predicted) == labels)[ok].sum())


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
