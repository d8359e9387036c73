"""fast_conv (config.model.conv_impl='fast') against lax.conv_general_dilated.

Tolerance: the forward and dX are XLA's own ops, compared exactly. dW sums the same
N x ho x wo (x taps) float32 products in another order, so it differs by rounding: about
sqrt(terms) x 6e-8 of the sum's magnitude, far below rtol 1e-5. An entry whose terms nearly
cancel can have a large *relative* error, so the absolute tolerance is 1e-5 of the array's
largest entry (`_close`).
"""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from configs import common
from configs import proda as proda_configs
from jaxda import models
from jaxda.models import fast_conv, layers
from jaxda.train import spec as spec_lib

NHWC = ("NHWC", "HWIO", "NHWC")


def _close(actual, expected, rtol=1e-5):
    expected = np.asarray(expected)
    atol = rtol * max(float(np.max(np.abs(expected))), 1e-30)
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol, atol=atol)


def _pads(p):
    return p if isinstance(p, str | tuple) else ((p, p), (p, p))


# (kernel, stride, dilation, padding, input height x width): the networks' convolutions on
# small maps. Dilations 12..24 on a 9x11 map leave taps that read only padding (skipped).
CASES = [
    (1, 1, 1, 0, (9, 11)),  # Bottleneck 1x1.
    (1, 2, 1, 0, (9, 11)),  # Caffe layer2 stride-2 1x1, downsample.
    (1, 1, 1, "SAME", (6, 7)),  # DeepLabV3+ classifiers (Flax's default padding).
    (3, 1, 1, 1, (9, 11)),
    (3, 2, 1, 1, (9, 11)),  # torchvision stride-2 3x3, deep stem.
    (3, 2, 1, 1, (10, 12)),  # Even sizes: the last row/column is never read.
    *((3, 1, d, d, (9, 11)) for d in (2, 6, 24)),  # Dilated layers, ASPP.
    # The other ASPP dilations: in the slow run.
    *(pytest.param(3, 1, d, d, (9, 11), marks=pytest.mark.slow) for d in (4, 12, 18)),
    (3, 1, 1, "SAME", (8, 8)),
    (3, 1, 3, ((2, 4), (0, 1)), (9, 11)),  # Asymmetric explicit padding.
    (7, 2, 1, 3, (16, 20)),  # ResNet stem.
    (4, 2, 1, 1, (16, 20)),  # AdaptSegNet discriminator.
]


@pytest.mark.parametrize("kernel,stride,dilation,padding,size", CASES)
def test_values_and_gradients_match_lax(kernel, stride, dilation, padding, size):
    rng = np.random.default_rng(kernel * 100 + dilation)
    x = jnp.asarray(rng.standard_normal((2, *size, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((kernel, kernel, 4, 3)), jnp.float32)
    numbers = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
    args = ((stride, stride), _pads(padding))
    kwargs = dict(rhs_dilation=(dilation, dilation), dimension_numbers=numbers)
    methods = ("auto", "taps", "xcol", "dycol", "dytaps") if kernel > 1 else ("auto",)

    @jax.jit
    def outputs_and_gradients(x, w, dy):
        """{method: (y, dx, dw)}; 'lax' is lax.conv_general_dilated itself."""
        result = {}
        for method in ("lax", *methods):
            if method == "lax":
                f = lambda x, w: lax.conv_general_dilated(x, w, *args, **kwargs)  # noqa: E731
            else:
                f = functools.partial(fast_conv.conv_general_dilated, window_strides=args[0],
                                      padding=args[1], **kwargs, method=method)  # fmt: skip
            y, f_vjp = jax.vjp(f, x, w)
            result[method] = (y, *f_vjp(dy))
        return result

    out_shape = jax.eval_shape(lambda: lax.conv_general_dilated(x, w, *args, **kwargs)).shape
    dy = jnp.asarray(rng.standard_normal(out_shape), jnp.float32)
    result = outputs_and_gradients(x, w, dy)
    y, dx, dw = result.pop("lax")
    for method, (fast_y, fast_dx, fast_dw) in result.items():
        np.testing.assert_array_equal(fast_y, y, err_msg=method)
        np.testing.assert_array_equal(fast_dx, dx, err_msg=method)
        _close(fast_dw, dw)


def test_taps_reading_only_padding_are_skipped_and_zero():
    # Dilation 24 on 9 rows: only the centre tap of each axis reads real pixels.
    taps = fast_conv.axis_taps(9, 9, 3, 1, 24, 24)
    assert [t.hi > t.lo for t in taps] == [False, True, False]
    # Dilation 6 on 9 rows: the outer taps see 3 of the 9 output rows.
    taps = fast_conv.axis_taps(9, 9, 3, 1, 6, 6)
    assert [(t.lo, t.hi, t.start) for t in taps] == [(6, 9, 0), (0, 9, 0), (0, 3, 6)]
    # Stride 2, pad 1, 10 rows -> 5 outputs: tap 0 reads rows 1, 3, ..., from output 1 on.
    taps = fast_conv.axis_taps(10, 5, 3, 2, 1, 1)
    assert [(t.lo, t.hi, t.start) for t in taps] == [(1, 5, 1), (0, 5, 0), (0, 5, 1)]
    x = jnp.ones((1, 9, 9, 2))
    dy = jnp.ones((1, 9, 9, 3))
    spec = fast_conv.ConvSpec((1, 1), ((24, 24), (24, 24)), (24, 24))
    expected = np.zeros((3, 3, 2, 3), np.float32)
    expected[1, 1] = 81.0
    for method in ("taps", "xcol", "dycol", "dytaps"):
        dw = fast_conv.weight_gradient(x, dy, (3, 3, 2, 3), spec, method)
        np.testing.assert_array_equal(dw, expected, err_msg=method)


def _fallback_cases():
    x = jnp.ones((2, 6, 7, 4))
    w = jnp.ones((3, 3, 2, 4))
    nhwc = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
    yield "groups", (x, w, (1, 1), "SAME"), dict(dimension_numbers=nhwc, feature_group_count=2)
    w = jnp.ones((3, 3, 4, 4))
    pads = ((1, 1), (1, 1))
    yield "lhs_dilation", (x, w, (1, 1), pads), dict(dimension_numbers=nhwc, lhs_dilation=(2, 2))
    yield (
        "bfloat16",
        (x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), (1, 1), "SAME"),
        dict(dimension_numbers=nhwc),
    )
    yield "negative padding", (x, w, (1, 1), ((-1, 1), (1, 1))), dict(dimension_numbers=nhwc)
    xc = jnp.ones((2, 4, 6, 7))
    yield "NCHW", (xc, jnp.ones((4, 4, 3, 3)), (1, 1), "SAME"), {}


def _spec_defaults(kwargs):
    return (
        kwargs.get("lhs_dilation"), kwargs.get("rhs_dilation"), kwargs.get("dimension_numbers"),
        kwargs.get("feature_group_count", 1), 1, None, None,
    )  # fmt: skip


@pytest.mark.parametrize("name,args,kwargs", list(_fallback_cases()))
def test_unsupported_calls_fall_back_to_lax(name, args, kwargs):
    assert fast_conv.fast_spec(*args, *_spec_defaults(kwargs), method="auto") is None, name
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(args[0].shape), args[0].dtype)
    w = jnp.asarray(rng.standard_normal(args[1].shape), args[1].dtype)
    grads = [
        jax.grad(lambda x, w, f=f: jnp.sum(f(x, w, *args[2:], **kwargs) ** 2), (0, 1))(x, w)
        for f in (lax.conv_general_dilated, fast_conv.conv_general_dilated)
    ]
    for a, b in zip(*grads, strict=True):
        np.testing.assert_array_equal(a, b)


def test_supported_call_takes_the_custom_vjp():
    x, w = jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 2))
    numbers = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
    jaxpr = jax.make_jaxpr(
        lambda w: fast_conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=numbers)
    )(w)
    assert "custom_vjp_call" in str(jaxpr)
    with pytest.raises(ValueError, match="method"):
        fast_conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=numbers, method="?")


def test_auto_method_at_the_networks_shapes():
    spec = fast_conv.ConvSpec((1, 1), ((6, 6), (6, 6)), (6, 6))
    assert fast_conv.choose_method(None, (3, 3, 2048, 19), spec) == "dycol"  # ASPP.
    assert fast_conv.choose_method(None, (3, 3, 512, 512), spec) == "dytaps"  # layer4.
    assert fast_conv.choose_method(None, (3, 3, 64, 64), spec) == "xla"  # layer1.
    strided = fast_conv.ConvSpec((2, 2), ((1, 1), (1, 1)), (1, 1))
    assert fast_conv.choose_method(None, (7, 7, 3, 64), strided) == "xla"  # Stem.
    assert fast_conv.choose_method(None, (3, 3, 256, 256), strided) == "xla"
    assert fast_conv.choose_method(None, (4, 4, 512, 1), strided) == "taps"  # D classifier.


def test_config_keys_default_and_validation(monkeypatch):
    c = common.base_config()
    assert (c.model.conv_impl, c.model.dtype, c.model.remat) == ("auto", "float32", False)
    common.use_deeplabv3plus(c)
    assert (c.model.conv_impl, c.model.dtype, c.model.remat) == ("auto", "float32", False)
    assert proda_configs.proda_model(synthetic=False).conv_impl == "auto"
    # The synthetic benchmark's small networks keep XLA's own (configs/common.py says why).
    common.use_synthetic(c)
    assert c.model.conv_impl == "xla"
    common.use_deeplabv3plus(c, synthetic=True)
    assert c.model.conv_impl == "xla"
    assert proda_configs.proda_model(synthetic=True).conv_impl == "xla"
    with pytest.raises(ValueError, match="conv_impl='cudnn'"):
        layers.Convolution("cudnn")
    # 'auto': fast_conv on CPU (this machine), XLA's own on GPU and TPU.
    auto = layers.Convolution("auto")
    assert auto.resolved_impl() == "fast"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert auto.resolved_impl() == "xla"


def _model_config(name: str):
    """A tiny config.model of `name` (one block per layer, width 4)."""
    c = common.base_config()
    common.use_synthetic(c)
    if name == "deeplabv3plus":
        common.use_deeplabv3plus(c, synthetic=True)
    elif name == "proda_deeplab_v2":
        c.model = proda_configs.proda_model(synthetic=True)
        c.model.dropout = False
    c.model.width = 4
    return c.model


def _count_convs(jaxpr, inside_custom_vjp=False, counts=None):
    """{'native': convs outside fast_conv's custom VJP, 'fast': its custom VJP calls}."""
    counts = counts if counts is not None else {"native": 0, "fast": 0}
    for eqn in jaxpr.eqns:
        # Custom VJP calls around a convolution (not layers.fusion_barrier's).
        custom = eqn.primitive.name.startswith("custom_vjp") and "conv_general_dilated" in str(
            eqn.params.get("call_jaxpr", "")
        )
        if custom:
            counts["fast"] += 1
        elif eqn.primitive.name == "conv_general_dilated" and not inside_custom_vjp:
            counts["native"] += 1
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                _count_convs(inner, inside_custom_vjp or custom, counts)
    return counts


@pytest.mark.parametrize("name", ["deeplab_v2", "deeplabv3plus", "proda_deeplab_v2"])
def test_every_conv_follows_the_config_key_and_parameters_do_not_change(name):
    model_config = _model_config(name)
    images = jax.ShapeDtypeStruct((2, 33, 49, 3), jnp.float32)
    counts, trees = {}, {}
    for impl in ("xla", "fast"):
        model_config.conv_impl = impl
        model_config.remat = impl == "fast"  # Recomputation changes no variable either.
        model = models.build_segmenter(model_config, 5)
        trees[impl] = models.abstract_variables(model)
        jaxpr = jax.make_jaxpr(lambda v, x, m=model: m.apply(v, x, train=False))(
            trees[impl], images
        )
        counts[impl] = _count_convs(jaxpr.jaxpr)
    # Same variables (names, shapes, dtypes): checkpoints depend on neither conv_impl nor remat.
    assert trees["xla"] == trees["fast"]
    assert counts["xla"]["fast"] == 0 and counts["xla"]["native"] > 0
    assert counts["fast"] == {"native": 0, "fast": counts["xla"]["native"]}


def _methods(stride_1: str):
    """A `choose_method` giving `stride_1` to stride-1 k x k convs, 'xcol' to strided ones
    (at the tests' tiny widths 'auto' would pick 'xla' for all)."""
    return lambda x_shape, kernel_shape, spec: stride_1 if spec.strides == (1, 1) else "xcol"


@pytest.mark.parametrize(
    "name,stride_1",
    [
        ("deeplab_v2", "taps"),
        # Slow run (5 s): the same custom VJP through the other network.
        pytest.param("deeplabv3plus", "dycol", marks=pytest.mark.slow),
    ],
)
def test_network_gradients_match(name, stride_1, monkeypatch):
    """The gradient of a training-mode forward (batch-statistics BN) w.r.t. every parameter."""
    monkeypatch.setattr(fast_conv, "choose_method", _methods(stride_1))
    model_config = _model_config(name)
    # One head (compile time); DeepLabV2's ASPP with taps reading only padding on its 5x7 map.
    model_config.multi_level = False
    if name == "deeplab_v2":
        model_config.aspp_dilations, model_config.num_aspp_branches = (2, 6), 2
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((2, 33, 49, 3)), jnp.float32)
    modules = {}
    for impl in ("xla", "fast"):
        model_config.conv_impl = impl
        # The custom VJP under recomputation (config.model.remat) too.
        model_config.remat = impl == "fast" and name == "deeplab_v2"
        modules[impl] = models.build_segmenter(model_config, 5)
    # Random values of the (shared) variable tree: no initialisation to compile.
    abstract = models.abstract_variables(modules["xla"])
    variables = jax.tree.map(
        lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), abstract
    )

    @jax.jit
    def gradients(params):
        def loss(params, model):
            out, _ = model.apply(
                {**variables, "params": params}, images, train=True, mutable=["batch_stats"]
            )
            return sum(jnp.sum(jnp.sin(3.0 * logits)) for logits in out.values())

        return {impl: jax.grad(loss)(params, m) for impl, m in modules.items()}

    grads = gradients(variables["params"])
    flat_fast = flax.traverse_util.flatten_dict(grads["fast"])
    # Batch-statistics BN divides by small per-channel spreads: rounding grows, hence 1e-4.
    for path, value in flax.traverse_util.flatten_dict(grads["xla"]).items():
        _close(flat_fast[path], value, rtol=1e-4)


@pytest.mark.parametrize("style", ["adaptseg", "proda"])
def test_discriminators_follow_the_model_switch(style, monkeypatch):
    monkeypatch.setattr(fast_conv, "choose_method", _methods("taps"))
    c = common.base_config()
    c.discriminator.width = 4
    c.discriminator.style = style
    c.model.conv_impl = "fast"
    (network,) = spec_lib.discriminators(c, ("main",)).values()
    assert network.module.convolution == layers.Convolution("fast", block_barrier="auto")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 64, 64, 5)), jnp.float32)
    abstract = models.abstract_variables(network.module, 5)
    params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), abstract)

    @jax.jit
    def gradients(params):
        def loss(params, disc):
            return jnp.sum(jnp.sin(disc.apply(params, x)))

        return [
            jax.grad(loss)(params, network.module.clone(convolution=layers.Convolution(impl)))
            for impl in ("xla", "fast")
        ]

    grads = gradients(params)
    for a, b in zip(jax.tree.leaves(grads[1]), jax.tree.leaves(grads[0]), strict=True):
        _close(a, b)
