"""The DeepLabV2 optimizer: poly schedule, 10x heads, weight decay, frozen BN, Adam for D."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxda.train import optimizers
from tests.conftest import tiny_config


def test_poly_schedule_matches_formula():
    schedule = optimizers.poly_schedule(2.5e-4, 250_000, 0.9)
    for i in (0, 1, 1000, 149_999, 250_000):
        assert float(schedule(i)) == pytest.approx(2.5e-4 * (1 - i / 250_000) ** 0.9, rel=1e-5)


def _params():
    return {
        "seg": {
            "backbone": {
                "layer1_0": {
                    "conv1": {"kernel": jnp.ones((2,))},
                    "bn1": {"scale": jnp.ones((2,)), "bias": jnp.ones((2,))},
                }
            },
            "head_main": {"branch0": {"kernel": jnp.ones((2,))}},
        },
        "disc": {"main": {"conv1": {"kernel": jnp.ones((2,))}}},
    }


def test_param_labels():
    labels = optimizers.param_labels(freeze_bn_affine=True)(_params())
    assert labels["seg"]["backbone"]["layer1_0"]["conv1"]["kernel"] == "backbone"
    assert labels["seg"]["backbone"]["layer1_0"]["bn1"]["scale"] == "frozen"
    assert labels["seg"]["head_main"]["branch0"]["kernel"] == "head"
    assert labels["disc"]["main"]["conv1"]["kernel"] == "disc"
    trained = optimizers.param_labels(freeze_bn_affine=False)(_params())
    assert trained["seg"]["backbone"]["layer1_0"]["bn1"]["scale"] == "backbone"


def test_two_sgd_steps_match_pytorch_formula():
    """PyTorch SGD: g += wd * p; buf = m * buf + g; p -= lr_i * buf; heads at 10 x lr_i."""
    config = tiny_config("adaptseg", **{"optimizer.weight_decay": 0.1, "total_steps": 10})
    config.model.bn_mode = "batch_stats"
    tx = optimizers.make_optimizer(config)
    params = _params()
    state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    lr = [config.optimizer.learning_rate * (1 - i / 10) ** 0.9 for i in range(2)]
    p, buf = 1.0, 0.0
    p_head, buf_head = 1.0, 0.0
    for i in range(2):
        updates, state = tx.update(grads, state, params)
        params = jax.tree.map(lambda a, u: a + u, params, updates)
        buf = 0.9 * buf + 0.5 + 0.1 * p
        p -= lr[i] * buf
        buf_head = 0.9 * buf_head + 0.5 + 0.1 * p_head
        p_head -= 10 * lr[i] * buf_head
    seg = params["seg"]
    np.testing.assert_allclose(seg["backbone"]["layer1_0"]["conv1"]["kernel"], p, rtol=1e-6)
    np.testing.assert_allclose(seg["head_main"]["branch0"]["kernel"], p_head, rtol=1e-6)
    np.testing.assert_array_equal(seg["backbone"]["layer1_0"]["bn1"]["scale"], 1.0)
    # Adam's first step moves every parameter by ~lr regardless of the gradient scale.
    disc = params["disc"]["main"]["conv1"]["kernel"]
    d_lr = config.disc_optimizer.learning_rate
    d_lr2 = d_lr * (1 - 1 / 10) ** 0.9
    np.testing.assert_allclose(1.0 - disc, d_lr + d_lr2, rtol=1e-3)
