"""`adversarial.replicate_da_exp_bugs`: each of Adversarial_DA_Exp's three bugs changes the
discriminator losses / learning rates as its code does, against NumPy references."""

import jax
import ml_collections
import numpy as np
import pytest

from jaxda import models
from jaxda.train import adversarial, common, optimizers
from tests.conftest import tiny_config

C = 5


def _numpy_bce(logits, target):
    """BCEWithLogits with a constant label, mean over elements."""
    x = logits.astype(np.float64)
    return float(np.mean(np.maximum(x, 0) - x * target + np.log1p(np.exp(-np.abs(x)))))


@pytest.fixture(scope="module")
def setup():
    disc = models.build_discriminator(ml_collections.ConfigDict({"width": 4}))
    rng = np.random.default_rng(0)
    inputs = {
        domain: {
            h: rng.dirichlet(np.ones(C), (2, 32, 32)).astype(np.float32) for h in ("main", "aux")
        }
        for domain in ("source", "target")
    }
    keys = jax.random.split(jax.random.key(0))
    params = {
        h: disc.init(k, inputs["source"][h])["params"]
        for h, k in zip(("main", "aux"), keys, strict=True)
    }
    return disc, params, inputs


def _d(disc, params, head, x):
    return np.asarray(disc.apply({"params": params[head]}, x))


@pytest.mark.parametrize("bugs", [False, True])
def test_discriminator_losses_with_and_without_the_bugs(setup, bugs):
    disc, params, inputs = setup
    src, tgt = inputs["source"], inputs["target"]
    _, metrics = common.discriminator_loss(disc, params, src, tgt, "bce", da_exp_bugs=bugs)
    for head in ("main", "aux"):
        # Bug 2: D_aux's source term is BCE(D_main(main source softmax), 0).
        source_head = "main" if bugs else head
        source = _numpy_bce(_d(disc, params, source_head, src[source_head]), 0.0)
        # Bug 1: the target term uses the source label 0.
        target = _numpy_bce(_d(disc, params, head, tgt[head]), 0.0 if bugs else 1.0)
        expected = 0.5 * source + 0.5 * target
        assert float(metrics[f"loss_disc_{head}"]) == pytest.approx(expected, rel=1e-5), head


def test_bug_2_source_gradient_goes_to_d_main_not_d_aux(setup):
    disc, params, inputs = setup
    src, tgt = inputs["source"], inputs["target"]

    def aux_loss(p, bugs):
        return common.discriminator_loss(disc, p, src, tgt, "bce", da_exp_bugs=bugs)[1][
            "loss_disc_aux"
        ]

    grads = jax.grad(aux_loss)(params, True)
    # D_main receives the (misplaced) source term's gradient; fixed, D_aux's loss ignores D_main.
    assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(grads["main"]))
    fixed = jax.grad(aux_loss)(params, False)
    assert all(np.abs(g).max() == 0 for g in jax.tree.leaves(fixed["main"]))
    # With the bug, D_aux learns from target inputs only: its source input changes nothing.
    moved = {**src, "aux": src["aux"][::-1]}
    a = common.discriminator_loss(disc, params, src, tgt, "bce", da_exp_bugs=True)[1]
    b = common.discriminator_loss(disc, params, moved, tgt, "bce", da_exp_bugs=True)[1]
    assert float(a["loss_disc_aux"]) == float(b["loss_disc_aux"])


@pytest.mark.parametrize("bugs", [False, True])
def test_bug_3_no_lr_decay_for_the_aux_discriminator(bugs):
    config = tiny_config()
    config.adversarial.replicate_da_exp_bugs = bugs
    config.disc_optimizer.decay_steps = 2  # lr 0 from the third update on.
    networks = adversarial.networks(config)
    assert networks["disc/aux"].constant_lr == bugs and not networks["disc/main"].constant_lr
    disc = networks["disc/main"].module
    x = np.ones((1, 32, 32, config.num_classes), np.float32)
    params = {
        "disc": {
            h: disc.init(jax.random.key(i), x)["params"] for i, h in enumerate(("main", "aux"))
        }
    }
    discs = {k: v for k, v in networks.items() if k.startswith("disc/")}
    tx = optimizers.make_optimizer(config, discs, params)
    state = tx.init(params)
    grads = jax.tree.map(np.ones_like, params)
    for _ in range(3):
        updates, state = tx.update(grads, state, params)
    # Adam's step is ~lr x sign(grad) at a constant gradient: 1e-4 undecayed, 0 after the poly.
    moved = {
        h: max(np.abs(u).max() for u in jax.tree.leaves(updates["disc"][h])) for h in params["disc"]
    }
    assert moved["main"] == 0.0
    if bugs:
        assert moved["aux"] == pytest.approx(config.disc_optimizer.learning_rate, rel=1e-3)
    else:
        assert moved["aux"] == 0.0
