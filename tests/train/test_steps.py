"""Train steps on a tiny network: which parameters each loss moves, and 1 vs 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxda import mesh as mesh_lib
from jaxda.models import layers
from jaxda.train import trainer
from tests.conftest import tiny_config


def _batch(config, *, ignore_labels=False, seed=0):
    rng = np.random.default_rng(seed)
    n, (h, w) = config.batch_size, (32, 64)

    def domain():
        labels = rng.choice(np.array([0, 1, 2, 8, 10, 13], np.uint8), size=(n, h, w))
        if ignore_labels:
            labels[:] = 255
        return {"image": rng.normal(size=(n, h, w, 3)).astype(np.float32) * 50, "label": labels}

    return {"source": domain(), "target": domain()}


def _run(config, batches, num_devices=1):
    mesh = mesh_lib.make_mesh(num_devices)
    setup = trainer.build(config, mesh)
    state = trainer.init_state(config, setup)
    before = jax.device_get(state)
    step = trainer.jit_train_step(config, setup)
    history = []
    for batch in batches:
        state, metrics = step(state, mesh_lib.to_global(batch, mesh))
        history.append(jax.device_get(metrics))
    return before, jax.device_get(state), history


def one_and_eight_devices(config, batches):
    """(initial state, state after 1 device, after 8) of the same batches; asserts the same
    metric names and values at every step (up to reduction-order rounding)."""
    initial, state1, history1 = _run(config, batches, 1)
    _, state8, history8 = _run(config, batches, 8)
    assert jax.device_count() == 8
    for m1, m8 in zip(history1, history8, strict=True):
        assert m1.keys() == m8.keys()
        for key in m1:
            np.testing.assert_allclose(m8[key], m1[key], rtol=2e-4, atol=1e-6, err_msg=key)
    return initial, state1, state8


def _changed(a, b):
    return jax.tree.map(lambda x, y: not np.array_equal(x, y), a, b)


def _paths(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(str(getattr(k, "key", k)) for k in path): v for path, v in flat}


def test_discriminator_loss_moves_only_discriminators():
    # No labelled pixel (CE = 0), no adversarial term, no weight decay: only D losses remain.
    config = tiny_config(**{"optimizer.weight_decay": 0.0})
    config.adversarial.lambda_adv = {"main": 0.0, "aux": 0.0}
    before, after, history = _run(config, [_batch(config, ignore_labels=True)])
    seg_moved = _paths(_changed(before.params["seg"], after.params["seg"]))
    assert not any(seg_moved.values())
    disc_moved = _paths(_changed(before.params["disc"], after.params["disc"]))
    assert all(disc_moved.values()) and len(disc_moved) == 20  # 2 heads x 5 convs x (w, b).
    assert history[0]["loss_disc_main"] > 0


@pytest.mark.slow  # ~25 s; the discriminator-side counterpart runs by default.
def test_adversarial_loss_moves_only_segmentation():
    config = tiny_config(**{"optimizer.weight_decay": 0.0, "model.bn_mode": "batch_stats"})
    batches = [_batch(config, ignore_labels=True)]
    config.disc_optimizer.learning_rate = 0.0
    before, after, _ = _run(config, batches)
    assert not any(jax.tree.leaves(_changed(before.params["disc"], after.params["disc"])))
    seg_moved = _paths(_changed(before.params["seg"], after.params["seg"]))
    for path, moved in seg_moved.items():
        # Frozen BN affine stays; every conv and head weight gets the adversarial gradient.
        assert moved == (not layers.is_batch_norm_param(path)), path
    # The discriminators' update does not depend on the adversarial weight.
    config.disc_optimizer.learning_rate = 1e-4
    _, with_adv, _ = _run(config, batches)
    config.adversarial.lambda_adv = {"main": 0.0, "aux": 0.0}
    _, without_adv, _ = _run(config, batches)
    for a, b in zip(
        jax.tree.leaves(with_adv.params["disc"]),
        jax.tree.leaves(without_adv.params["disc"]),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # ~20 s; by default: test_optimizers' frozen-affine labels, test_models'
# test_batch_norm_modes (statistics move in training mode).
def test_frozen_bn_affine_does_not_move_but_statistics_do():
    config = tiny_config(**{"model.bn_mode": "batch_stats"})
    before, after, _ = _run(config, [_batch(config), _batch(config, seed=1)])
    for path, moved in _paths(_changed(before.params["seg"], after.params["seg"])).items():
        assert moved == (not layers.is_batch_norm_param(path)), path
    assert all(jax.tree.leaves(_changed(before.batch_stats, after.batch_stats)))
    # Fully frozen BN: running statistics stay too.
    config.model.bn_mode = "frozen"
    before, after, _ = _run(config, [_batch(config)])
    assert not any(jax.tree.leaves(_changed(before.batch_stats, after.batch_stats)))


@pytest.mark.parametrize(
    "method", ["adaptseg", pytest.param("source_only", marks=pytest.mark.slow)]
)
def test_one_and_eight_devices_give_the_same_losses(method):
    config = tiny_config(method)
    batches = [_batch(config, seed=s) for s in range(3)]
    initial, state1, state8 = one_and_eight_devices(config, batches)
    # Parameters: the same update up to reduction-order rounding, which BN's backward pass
    # (sums of terms of both signs) amplifies to ~0.1% of the update on this tiny network.
    # Per-device BN statistics or a per-device loss mean would differ at order 1.
    seg1, seg8 = _paths(state1.params["seg"]), _paths(state8.params["seg"])
    for path, start in _paths(initial.params["seg"]).items():
        update1, update8 = seg1[path] - start, seg8[path] - start
        assert np.abs(update8 - update1).max() <= 0.02 * np.abs(update1).max() + 1e-7, path


def test_step_compiles_once():
    config = tiny_config("source_only")
    mesh = mesh_lib.make_mesh(1)
    setup = trainer.build(config, mesh)
    state = trainer.init_state(config, setup)
    step = trainer.jit_train_step(config, setup)
    for seed in range(3):
        state, _ = step(state, mesh_lib.to_global(_batch(config, seed=seed), mesh))
    assert step._cache_size() == 1
    assert int(state.step) == 3
    assert jnp.issubdtype(state.rng.dtype, jnp.uint32)


def _numpy_log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _numpy_bce(logits, target):
    p = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))
    return float(-np.mean(target * np.log(p) + (1 - target) * np.log(1 - p)))


def _numpy_self_information(p):
    """ADVENT's prob_2_entropy in NumPy: -p log2(p + 1e-30) / log2(C), per channel."""
    return (-p * np.log2(p + 1e-30) / np.log2(p.shape[-1])).astype(np.float32)


def _numpy_mse(logits, target):
    return np.mean(np.square(logits.astype(np.float64) - target))


@pytest.mark.parametrize(
    ("method", "disc_input", "proda"),
    [
        ("adaptseg", lambda p: p, False),
        # The same step with another discriminator input / GAN loss: in the slow run (the
        # self-information and LS-GAN losses also have unit tests in tests/losses).
        pytest.param("advent", _numpy_self_information, False, marks=pytest.mark.slow),
        pytest.param("adaptseg", lambda p: p, True, marks=pytest.mark.slow),
    ],
    ids=["adaptseg_softmax", "advent_self_information", "proda_warmup"],
)
def test_adversarial_losses_match_an_independent_computation(method, disc_input, proda):
    """The step's reported losses, recomputed from separate forward passes and NumPy: the
    discriminators see the softmax (AdaptSegNet) or its C-channel self-information (AdvEnt);
    ProDA's warm-up: its discriminator, LS-GAN and no 1/2 on the discriminator loss."""
    from jaxda.models.layers import resize_bilinear_align_corners

    config = tiny_config()
    config.method = method
    config.adversarial.lambda_adv = {"main": 0.3, "aux": 0.05}
    gan_loss, disc_weight = _numpy_bce, 0.5
    if proda:
        config.discriminator.style = "proda"
        config.adversarial.gan = "ls"
        config.adversarial.discriminator_loss_weight = disc_weight = 1.0
        gan_loss = _numpy_mse
    batch = _batch(config)
    mesh = mesh_lib.make_mesh(1)
    setup = trainer.build(config, mesh)
    state = trainer.init_state(config, setup)
    variables, disc = jax.device_get(state.model_variables()), jax.device_get(state.params["disc"])
    _, metrics = trainer.jit_train_step(config, setup)(state, mesh_lib.to_global(batch, mesh))

    def outputs(images):  # Batch statistics: running averages do not enter the outputs.
        out, _ = setup.model.apply(variables, images, train=True, mutable=["batch_stats"])
        return {k: np.asarray(resize_bilinear_align_corners(v, (32, 64))) for k, v in out.items()}

    def d_logits(head, probs):
        return np.asarray(setup.discriminator.apply({"params": disc[head]}, probs))

    source, target = outputs(batch["source"]["image"]), outputs(batch["target"]["image"])
    labels = batch["source"]["label"].astype(np.int64)
    expected = {}
    for head in ("main", "aux"):
        log_p = _numpy_log_softmax(source[head])
        expected[f"loss_seg_{head}"] = -np.take_along_axis(log_p, labels[..., None], -1).mean()
        p_source = disc_input(np.exp(_numpy_log_softmax(source[head])).astype(np.float32))
        p_target = disc_input(np.exp(_numpy_log_softmax(target[head])).astype(np.float32))
        assert p_target.shape[-1] == config.num_classes  # C-channel maps in both methods.
        expected[f"loss_adv_{head}"] = gan_loss(d_logits(head, p_target), 0.0)
        expected[f"loss_disc_{head}"] = disc_weight * gan_loss(
            d_logits(head, p_source), 0.0
        ) + disc_weight * gan_loss(d_logits(head, p_target), 1.0)
    expected["loss_generator"] = (
        expected["loss_seg_main"]
        + 0.1 * expected["loss_seg_aux"]
        + 0.3 * expected["loss_adv_main"]
        + 0.05 * expected["loss_adv_aux"]
    )
    for key, value in expected.items():
        assert float(metrics[key]) == pytest.approx(value, rel=2e-4), key
