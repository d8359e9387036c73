"""config.model.dtype='bfloat16' (mixed precision) against float32.

bfloat16 keeps 8 significant bits (relative rounding 2^-9 = 0.2%). Each convolution rounds its
input and kernel once and its sum of products once. Through a tiny DeepLabV2 (stem, 4 blocks,
two ASPP heads) with BN on running statistics, the logits differ from float32 by 1.5-2.6% of
their norm and the whole parameter gradient by 1.5% (cosine 0.9999), measured; the tolerances
below leave a factor of 2-3. They would fail if a convolution's result stayed bfloat16 or if
gradients did not pass through the casts. With batch-statistics BN this width-4 network is too
ill-conditioned for a useful bound (even float32 rounding differences grow a thousandfold
there, see test_fast_conv's 1e-4); whether bfloat16 trains as well is measured on the
synthetic benchmark instead (README).
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from configs import common
from jaxda import models
from jaxda.models import layers
from jaxda.train import spec as spec_lib

REL_TOL = 5e-2  # ||bfloat16 - float32|| / ||float32|| of the logits and of the gradient.
MIN_COSINE = 0.999  # Cosine between the bfloat16 and the float32 gradient.


def _relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


def _cosine(a, b) -> float:
    a, b = np.ravel(np.asarray(a, np.float64)), np.ravel(np.asarray(b, np.float64))
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("impl", ["xla", "fast"])
def test_convolution_computes_in_bfloat16_and_returns_float32(impl):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 9, 11, 8)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 8, 5)), jnp.float32)
    numbers = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    args = ((1, 1), ((2, 2), (2, 2)))
    kwargs = dict(rhs_dilation=(2, 2), dimension_numbers=numbers)
    convolution = layers.Convolution(impl, "bfloat16")
    y = convolution(x, w, *args, **kwargs)
    bf16 = jnp.bfloat16
    expected = lax.conv_general_dilated(x.astype(bf16), w.astype(bf16), *args, **kwargs)
    assert y.dtype == jnp.float32
    np.testing.assert_array_equal(y, expected.astype(jnp.float32))
    # The convolution itself runs on bfloat16 operands (not float32 ones rounded afterwards).
    jaxpr = str(jax.make_jaxpr(lambda x, w: convolution(x, w, *args, **kwargs))(x, w))
    assert "bf16[2,9,11,8]" in jaxpr and "bf16[3,3,8,5]" in jaxpr
    # Gradients come back float32, through the casts.
    grads = jax.grad(lambda x, w: jnp.sum(convolution(x, w, *args, **kwargs) ** 2), (0, 1))(x, w)
    assert [g.dtype for g in grads] == [jnp.float32, jnp.float32]
    with pytest.raises(ValueError, match="dtype='float16'"):
        layers.Convolution(impl, "float16")


def _tiny_deeplab(dtype: str):
    c = common.base_config()
    common.use_synthetic(c)
    c.model.width = 4
    c.model.dtype = dtype
    return models.build_segmenter(c.model, 5)


def test_bfloat16_network_agrees_with_float32_and_keeps_float32_state():
    modules = {dtype: _tiny_deeplab(dtype) for dtype in ("float32", "bfloat16")}
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.standard_normal((2, 33, 49, 3)), jnp.float32)
    variables = jax.jit(modules["float32"].init, static_argnames="train")(
        jax.random.key(0), images, train=False
    )
    # Same variables, all float32: a checkpoint loads under either dtype.
    abstract = models.abstract_variables(modules["float32"])
    assert models.abstract_variables(modules["bfloat16"]) == abstract
    assert {leaf.dtype for leaf in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.float32)}
    labels = jnp.asarray(rng.integers(0, 5, (2, 5, 7)))

    @jax.jit
    def outputs_and_gradients(params):
        def loss(params, model):
            out = model.apply({**variables, "params": params}, images, train=False)
            per_head = [optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                        for logits in out.values()]  # fmt: skip
            return sum(per_head), out

        results = {}
        for dtype, model in modules.items():
            grads, out = jax.grad(loss, has_aux=True)(params, model)
            _, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
            results[dtype] = (out, grads, updates)
        return results

    results = outputs_and_gradients(variables["params"])
    out32, grads32, _ = results["float32"]
    out16, grads16, stats16 = results["bfloat16"]
    for head in out32:
        assert out16[head].dtype == jnp.float32
        assert 0 < _relative_error(out16[head], out32[head]) < REL_TOL, head
    # BatchNorm statistics are computed and kept in float32.
    assert {leaf.dtype for leaf in jax.tree.leaves(stats16)} == {jnp.dtype(jnp.float32)}
    flat32 = flax.traverse_util.flatten_dict(grads32)
    flat16 = flax.traverse_util.flatten_dict(grads16)
    assert {value.dtype for value in flat16.values()} == {jnp.dtype(jnp.float32)}
    all16 = np.concatenate([np.ravel(flat16[path]) for path in flat32])
    all32 = np.concatenate([np.ravel(value) for value in flat32.values()])
    assert 0 < _relative_error(all16, all32) < REL_TOL
    assert _cosine(all16, all32) > MIN_COSINE


def test_discriminators_follow_the_model_dtype():
    c = common.base_config()
    c.discriminator.width = 4
    c.model.dtype = "bfloat16"
    (network,) = spec_lib.discriminators(c, ("main",)).values()
    assert network.module.convolution == layers.Convolution("auto", "bfloat16", "auto")
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 32, 32, 5)), jnp.float32)
    params = jax.tree.map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype),
        models.abstract_variables(network.module, 5),
    )
    full = network.module.clone(convolution=layers.Convolution("auto", "float32"))
    out16, out32 = network.module.apply(params, x), full.apply(params, x)
    assert out16.dtype == jnp.float32
    assert 0 < _relative_error(out16, out32) < REL_TOL
