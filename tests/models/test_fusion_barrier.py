"""layers.fusion_barrier and config.model.block_barrier: exact values, identity gradient, and
fusions of a residual chain that no longer grow with its length (XLA:CPU)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from configs import common
from configs import proda as proda_configs
from jaxda import models
from jaxda.models import layers

NHWC = ("NHWC", "HWIO", "NHWC")


def test_barrier_is_the_identity_bit_for_bit_with_the_identity_gradient():
    special = [0.0, -0.0, 1e-45, -1e-40, 3.4e38, -3.4e38, np.inf, -np.inf, np.nan, 1.0, -2.5]
    rng = np.random.default_rng(0)
    x = np.concatenate([np.array(special, np.float32), rng.standard_normal(53, np.float32)])
    got = np.asarray(jax.jit(layers.fusion_barrier)(jnp.asarray(x)))
    # XLA:CPU's arithmetic flushes subnormals to zero (so does the ReLU before every barrier):
    # the reference is x through one XLA multiplication by a runtime 1.
    ones = jnp.ones(x.shape, jnp.float32)
    expected = np.asarray(jax.jit(lambda a, b: a * b)(jnp.asarray(x), ones))
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))
    normal = np.abs(x) >= np.finfo(np.float32).tiny
    np.testing.assert_array_equal(got[normal].view(np.uint32), x[normal].view(np.uint32))
    weights = rng.standard_normal(x.shape, np.float32)
    finite = jnp.asarray(np.nan_to_num(x, posinf=0.0, neginf=0.0))
    grad = jax.grad(lambda v: jnp.sum(layers.fusion_barrier(v) * weights))(finite)
    np.testing.assert_array_equal(np.asarray(grad), weights)


def _chain_loss(params, x, barrier: bool):
    """relu(BN(conv1x1(x)) + x), len(params) times: ResNet's residual chain in miniature."""
    for kernel in params:
        y = lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=NHWC)
        mean = y.mean((0, 1, 2))
        y = (y - mean) * lax.rsqrt(((y - mean) ** 2).mean((0, 1, 2)) + 1e-5)
        x = jax.nn.relu(y + x)
        x = layers.fusion_barrier(x) if barrier else x
    return jnp.mean(x**2)


def _largest_fusion(blocks: int, barrier: bool) -> int:
    """Operands of the largest fusion in the compiled gradient of a `blocks`-long chain."""
    params = [jnp.full((1, 1, 8, 8), 0.1 * (i + 1), jnp.float32) for i in range(blocks)]
    x = jnp.ones((1, 4, 4, 8), jnp.float32)
    grad = jax.jit(jax.grad(lambda p, x: _chain_loss(p, x, barrier)))
    text = grad.lower(params, x).compile().as_text()
    return max(len(a.split(",")) for a in re.findall(r"= \S+ fusion\(([^)]*)\)", text))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's fusion")
def test_barrier_stops_fusions_growing_with_the_residual_chain():
    plain = {n: _largest_fusion(n, barrier=False) for n in (3, 9)}
    barrier = {n: _largest_fusion(n, barrier=True) for n in (3, 9)}
    # Without it XLA fuses (recomputes) all earlier blocks into each block's sum and mask: if
    # this ever fails, XLA stopped doing so and block_barrier='auto' may be dropped.
    assert plain[9] > plain[3] + 10, plain
    assert barrier[9] == barrier[3] <= plain[3], (barrier, plain)


def test_block_barrier_key_default_resolution_and_validation(monkeypatch):
    c = common.base_config()
    assert c.model.block_barrier == "auto"
    common.use_deeplabv3plus(c)
    assert c.model.block_barrier == "auto"
    assert proda_configs.proda_model(synthetic=False).block_barrier == "auto"
    # The synthetic benchmark's one-block layers keep XLA's fusion (and its numbers).
    common.use_synthetic(c)
    common.use_deeplabv3plus(c, synthetic=True)
    assert c.model.block_barrier == "off"
    assert proda_configs.proda_model(synthetic=True).block_barrier == "off"
    with pytest.raises(ValueError, match=r"config\.model\.block_barrier='yes'"):
        layers.Convolution(block_barrier="yes")
    x = jnp.ones((2, 3))
    auto = layers.Convolution(block_barrier="auto")

    def barriers(convolution):
        jaxpr = jax.make_jaxpr(convolution.block_output)(x).jaxpr
        return sum(eqn.primitive.name.startswith("custom_vjp") for eqn in jaxpr.eqns)

    assert (barriers(auto), barriers(layers.Convolution(block_barrier="off"))) == (1, 0)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert (barriers(auto), barriers(layers.Convolution(block_barrier="on"))) == (0, 1)


@pytest.mark.parametrize(
    "name",
    [
        "deeplab_v2",
        # Slow run (15 s): the same Bottleneck, torchvision form.
        pytest.param("deeplabv3plus", marks=pytest.mark.slow),
    ],
)
def test_networks_values_and_gradients_do_not_depend_on_block_barrier(name):
    c = common.base_config()
    common.use_synthetic(c)
    if name == "deeplabv3plus":
        common.use_deeplabv3plus(c, synthetic=True)
    # Chains of 3 blocks (the synthetic networks have one per layer).
    c.model.width, c.model.multi_level, c.model.stage_sizes = 4, False, (1, 1, 3, 1)
    modules = {}
    for setting in ("on", "off"):
        c.model.block_barrier = setting
        modules[setting] = models.build_segmenter(c.model, 5)
    rng = np.random.default_rng(0)
    abstract = models.abstract_variables(modules["on"])
    variables = jax.tree.map(
        lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), abstract
    )
    images = jnp.asarray(rng.standard_normal((2, 33, 49, 3)), jnp.float32)

    @jax.jit
    def loss_and_grads(params):
        def loss(params, model):
            out, _ = model.apply(
                {**variables, "params": params}, images, train=True, mutable=["batch_stats"]
            )
            return jnp.sum(jnp.sin(3.0 * out["main"]))

        return {k: jax.value_and_grad(loss)(params, m) for k, m in modules.items()}

    results = loss_and_grads(variables["params"])
    on, off = jax.tree.leaves(results["on"]), jax.tree.leaves(results["off"])
    # Fused differently, XLA rounds differently, and batch-statistics BN amplifies it: the
    # gradient of a bias feeding a BN is 0 up to such rounding. Tolerance: 1e-4 of the largest
    # gradient entry.
    scale = max(float(np.max(np.abs(leaf))) for leaf in off[1:])
    np.testing.assert_allclose(np.asarray(on[0]), np.asarray(off[0]), rtol=1e-4)
    for a, b in zip(on[1:], off[1:], strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4 * scale)
