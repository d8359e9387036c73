"""MiT encoder, SegFormer / DAFormer heads (jaxda/models/mit.py, segformer_heads.py,
segformer.py) against the PyTorch transcription (`jaxda.interop.torch_reference_mit`), with the
weights carried over by the converter's mapping (`jaxda.interop.mit_layout`): stage sizes by
PyTorch's conv arithmetic, numerical parity (relative error = max |jaxda - torch| / max |torch|
< 1e-4; running and batch statistics), stochastic depth, parameter counts and groups, config.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import common, source_only
from jaxda import models
from jaxda.models import mit, segformer

TOLERANCE = 1e-4
NUM_CLASSES = 5
# Small decoders: the structure is the references', the widths are not.
HEAD_WIDTHS = {"decoder_embed_dim": 32, "decoder_width": 24}


def relative_error(ours, reference) -> float:
    """max |ours - reference| / max |reference|; `reference` a NCHW torch tensor."""
    reference = reference.detach().numpy().transpose(0, 2, 3, 1)
    ours = np.asarray(ours)
    assert ours.shape == reference.shape
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def randomize(model, seed: int) -> None:
    """Random weights (fan-in scaled), LayerNorm / BN affine and BN running statistics."""
    torch = pytest.importorskip("torch")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm | torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.normal_(0, 0.1, generator=generator)
            elif isinstance(m, torch.nn.Linear | torch.nn.Conv2d):
                m.weight.normal_(0, m.weight[0].numel() ** -0.5, generator=generator)
                m.bias is None or m.bias.normal_(0, 0.1, generator=generator)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3, generator=generator)
                m.running_var.uniform_(0.5, 2.0, generator=generator)
    model.eval()


def torch_segmenter(variant: str, decoder: str, num_classes: int = NUM_CLASSES, seed: int = 0):
    """(randomised PyTorch EncoderDecoder, its state dict in the layout `decoder`'s files
    have: NVlabs SegFormer for 'mlp', a DAFormer training checkpoint for 'daformer')."""
    ref = pytest.importorskip("jaxda.interop.torch_reference_mit")
    dims, _ = ref.VARIANTS[variant]
    backbone = ref.MixVisionTransformerTorch(*ref.VARIANTS[variant])
    if decoder == "mlp":
        head = ref.SegFormerHeadTorch(dims, HEAD_WIDTHS["decoder_embed_dim"], num_classes)
    else:
        head = ref.DAFormerHeadTorch(
            dims, num_classes, HEAD_WIDTHS["decoder_embed_dim"], HEAD_WIDTHS["decoder_width"]
        )
    model = ref.EncoderDecoderTorch(backbone, head)
    randomize(model, seed)
    state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
    if decoder == "daformer":
        state_dict = {f"model.{k}": v for k, v in state_dict.items()}
    return model, state_dict


def jax_segmenter(variant: str, decoder: str, num_classes: int = NUM_CLASSES, **kwargs):
    dims, depths = mit.VARIANTS[variant]
    return segformer.SegFormer(
        num_classes=num_classes, embed_dims=dims, depths=depths, decoder=decoder,
        **{**HEAD_WIDTHS, **kwargs},
    )  # fmt: skip


@functools.cache
def abstract_variables(model):
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))


def converted(model, state_dict, layout: str, skip_head: bool = False) -> dict:
    """The model's variables from a state dict, by the converter's mapping (no init: every
    variable must come from the file)."""
    from jaxda.interop import mit_layout

    loaded, report = mit_layout.map_state_dict(
        state_dict, abstract_variables(model), layout, decoder=model.decoder,
        skip_head=skip_head,
    )  # fmt: skip
    assert report.unexpected == []
    return traverse_util.unflatten_dict(loaded)


def random_variables(model, seed: int = 0) -> dict:
    """Random variables of the model's shapes, without the (slow to compile) init."""
    leaves, tree = jax.tree.flatten(abstract_variables(model))
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(
        tree, [rng.normal(0, 0.1, s.shape).astype(np.float32) + 1.0 * (s.ndim == 1) for s in leaves]
    )


def _module_attributes(model, class_name: str, attribute: str) -> dict:
    """{'/'-joined module path: attribute} of the submodules of that class that `model.init`
    calls."""
    found = {}

    def record(next_fun, args, kwargs, context):
        module = context.module
        if type(module).__name__ == class_name:
            found["/".join(module.scope.path)] = getattr(module, attribute)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    return found


# --- sizes and structure ----------------------------------------------------------------------


def test_stage_sizes_follow_pytorch_conv_arithmetic():
    assert mit.stage_sizes(512, 512) == [(128, 128), (64, 64), (32, 32), (16, 16)]
    assert mit.stage_sizes(1052, 1914)[0] == (263, 479)
    assert [h for h, _ in mit.stage_sizes(1052, 1)] == [263, 132, 66, 33]
    model = jax_segmenter("b0", "daformer")
    for size in ((72, 88), (1024, 2048), (33, 97)):
        out, state = jax.eval_shape(
            lambda v, x: model.apply(v, x, mutable=["intermediates"]),
            abstract_variables(model),
            jax.ShapeDtypeStruct((1, *size, 3), jnp.float32),
        )
        expected = mit.stage_sizes(*size)
        got = [state["intermediates"][f"stage{k}"][0].shape[1:3] for k in range(1, 5)]
        assert got == expected
        # ceil(n / 4), then ceil(n / 2) per stage.
        assert expected[0] == (-(-size[0] // 4), -(-size[1] // 4))
        assert out["main"].shape == (1, *expected[0], NUM_CLASSES)


def _parameter_counts(variant: str) -> dict[str, int]:
    model = jax_segmenter(variant, "daformer", 19, decoder_embed_dim=256, decoder_width=256)
    params = abstract_variables(model)["params"]
    return {k: sum(x.size for x in jax.tree.leaves(v)) for k, v in params.items()}


def test_parameter_counts_match_the_published_ones():
    """B0 and B1 encoders; DAFormer's head on B1-B5's widths (B5's encoder: the slow test)."""
    assert _parameter_counts("b0")["backbone"] == 3_319_392
    assert _parameter_counts("b1") == {"backbone": 13_151_424, "head": 3_712_275}
    model = jax_segmenter("b1", "daformer")
    groups = models.param_groups(model, abstract_variables(model)["params"])
    assert groups == {"backbone": "backbone", "head": "head"}


@pytest.mark.slow
def test_mit_b5_parameter_count():
    assert _parameter_counts("b5") == {"backbone": 81_443_008, "head": 3_712_275}


def test_layer_norm_epsilons_are_the_official_ones():
    model = mit.MixVisionTransformer(embed_dims=(8, 8, 8, 8), depths=(1, 1, 1, 1),
                                     num_heads=(1, 1, 1, 1))  # fmt: skip
    epsilons = _module_attributes(model, "LayerNorm", "epsilon")
    assert epsilons["patch_embed1/norm"] == epsilons["block1_0/attn/norm"] == 1e-5
    assert epsilons["block1_0/norm1"] == epsilons["block4_0/norm2"] == epsilons["norm4"] == 1e-6
    assert "block4_0/attn/norm" not in epsilons  # sr_ratio 1: no reduction.


# --- numerical parity ---------------------------------------------------------------------------


def test_mit_b0_encoder_parity():
    """All four stage maps at 64x64, from an ImageNet-style encoder file (layout 'mit', with
    its classifier). The segmenter test below compares them at 72x88 too."""
    torch = pytest.importorskip("torch")
    ref = pytest.importorskip("jaxda.interop.torch_reference_mit")
    torch.manual_seed(0)
    encoder = ref.MixVisionTransformerTorch(*ref.VARIANTS["b0"], num_classes=10)
    randomize(encoder, 1)
    state_dict = {k: v.numpy() for k, v in encoder.state_dict().items()}
    model = jax_segmenter("b0", "daformer")
    variables = converted(model, state_dict, "mit")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = encoder(x)
    jax_encoder = mit.MixVisionTransformer(*mit.VARIANTS["b0"])
    out = jax.jit(jax_encoder.apply)(
        {"params": variables["params"]["backbone"]}, jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
    )
    errors = {i: relative_error(out[f"stage{i}"], v) for i, v in enumerate(expected, 1)}
    assert max(errors.values()) < TOLERANCE, errors


LAYOUTS = {"mlp": "segformer", "daformer": "daformer"}


@pytest.mark.parametrize(
    ("variant", "decoder", "size"),
    [
        ("b0", "mlp", (72, 88)),
        ("b0", "daformer", (72, 88)),
        pytest.param("b5", "daformer", (96, 128), marks=pytest.mark.slow),
    ],
)
def test_segmenter_parity(variant, decoder, size):
    """Encoder + head on an input that is not a multiple of 32: logits and the sown stage
    maps, from a file in NVlabs' SegFormer layout (whose concatenation order differs) or
    DAFormer's."""
    torch = pytest.importorskip("torch")
    torch_model, state_dict = torch_segmenter(variant, decoder)
    model = jax_segmenter(variant, decoder)
    variables = converted(model, state_dict, LAYOUTS[decoder])
    batch = 2 if variant == "b0" else 1
    x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        stages = torch_model.backbone(x)
        logits = torch_model.decode_head(stages)
    out, state = jax.jit(functools.partial(model.apply, mutable=["intermediates"]))(
        variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
    )
    errors = {"logits": relative_error(out["main"], logits)}
    for i, stage in enumerate(stages, 1):
        errors[f"stage{i}"] = relative_error(state["intermediates"][f"stage{i}"][0], stage)
    assert max(errors.values()) < TOLERANCE, errors


def test_daformer_head_parity_with_batch_statistics():
    """The head alone (its ConvModules are the MLP head's too) with BN on batch statistics,
    and the running statistics it updates. PyTorch folds the unbiased batch variance into
    running_var, Flax the biased one: the expected value converts with (n - 1) / n."""
    torch = pytest.importorskip("torch")
    from jaxda.models import segformer_heads

    torch_model, state_dict = torch_segmenter("b0", "daformer")
    variables = converted(jax_segmenter("b0", "daformer"), state_dict, "daformer")
    generator = torch.Generator().manual_seed(5)
    sizes, dims = mit.stage_sizes(72, 88), mit.VARIANTS["b0"][0]
    features = [
        torch.randn(2, c, *s, generator=generator) for c, s in zip(dims, sizes, strict=True)
    ]
    head = torch_model.decode_head.train()
    head.dropout.eval()
    with torch.no_grad():
        logits = head(features)
    jax_head = segformer_heads.DAFormerHead(
        NUM_CLASSES, HEAD_WIDTHS["decoder_embed_dim"], HEAD_WIDTHS["decoder_width"],
        use_running_average=False,
    )  # fmt: skip
    head_variables = {k: v["head"] for k, v in variables.items()}
    out, state = jax.jit(functools.partial(jax_head.apply, mutable=["batch_stats"]))(
        head_variables, [jnp.asarray(f.numpy().transpose(0, 2, 3, 1)) for f in features]
    )
    errors = {"logits": relative_error(out, logits)}
    torch_stats = converted(jax_segmenter("b0", "daformer"), {
        f"model.{k}": v.numpy() for k, v in torch_model.state_dict().items()
    }, "daformer")["batch_stats"]["head"]  # fmt: skip
    n = 2 * sizes[0][0] * sizes[0][1]  # Elements per channel: every BN runs at stage 1's grid.
    flat = traverse_util.flatten_dict
    before, torch_new = flat(head_variables["batch_stats"]), flat(torch_stats)
    for path, ours in flat(state["batch_stats"]).items():
        want = torch_new[path]
        if path[-1] == "var":
            want = 0.9 * before[path] + (want - 0.9 * before[path]) * (n - 1) / n
        errors["/".join(path)] = float(np.abs(ours - want).max() / np.abs(want).max())
    assert max(errors.values()) < TOLERANCE, errors


# --- stochastic depth, dropout, precision, config ----------------------------------------------


def test_drop_path_rates_follow_linspace():
    for depths in (mit.VARIANTS["b5"][1], mit.VARIANTS["b0"][1], (1, 1, 1, 1)):
        rates = mit.drop_path_rates(depths, 0.1)
        assert [len(r) for r in rates] == list(depths)
        np.testing.assert_allclose(np.concatenate(rates), np.linspace(0, 0.1, sum(depths)))
    rates = mit.drop_path_rates(mit.VARIANTS["b5"][1], 0.1)
    assert rates[0][0] == 0.0 and rates[3][-1] == pytest.approx(0.1)
    assert rates[2][0] == pytest.approx(0.1 * 9 / 51)  # Block 9 of 52 (3 + 6 before it).
    # The blocks get these rates.
    model = mit.MixVisionTransformer(embed_dims=(8, 8, 8, 8), depths=(1, 2, 1, 1),
                                     num_heads=(1, 1, 1, 1), drop_path_rate=0.2)  # fmt: skip
    seen = _module_attributes(model, "DropPath", "rate")
    seen = {name.removesuffix("/DropPath_0"): rate for name, rate in seen.items()}
    assert seen == pytest.approx({"block1_0": 0.0, "block2_0": 0.05, "block2_1": 0.1,
                                  "block3_0": 0.15, "block4_0": 0.2})  # fmt: skip


def _synthetic_model(**overrides):
    config = source_only.get_config("synthetic")
    common.use_mit(config, synthetic=True)
    config.model.update(overrides)
    return models.build_segmenter(config.model, NUM_CLASSES)


@functools.cache
def _synthetic_apply(**overrides):
    """(jitted apply(variables, x, rng, train=...) -> logits, random variables) of the tiny
    synthetic model (MLP decoder: the same dropout, fewer ops to compile)."""
    model = _synthetic_model(decoder="mlp", **overrides)
    apply = jax.jit(
        lambda v, x, rng, train: model.apply(
            v, x, train=train, rngs=None if rng is None else {"dropout": rng}
        )["main"],
        static_argnames="train",
    )
    return apply, random_variables(model)


X_SMALL = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)


def test_stochastic_depth_and_dropout_only_in_training_with_a_key():
    # BN on running statistics: training differs from evaluation only by what is dropped.
    apply, variables = _synthetic_apply(drop_path_rate=0.5, bn_mode="frozen")
    eval_out = apply(variables, X_SMALL, None, train=False)
    train_a = apply(variables, X_SMALL, jax.random.key(1), train=True)
    train_b = apply(variables, X_SMALL, jax.random.key(2), train=True)
    assert not np.allclose(train_a, eval_out, atol=1e-4)
    assert not np.allclose(train_a, train_b, atol=1e-4)
    np.testing.assert_array_equal(apply(variables, X_SMALL, jax.random.key(1), train=True), train_a)
    # Without a key nothing is dropped (DAFormer's teacher: BN in training mode, no dropout):
    # the traced computation draws no random numbers (cheaper than compiling it).
    model = _synthetic_model(decoder="mlp", drop_path_rate=0.5)

    def primitives(rngs) -> str:  # The printed jaxpr, nested computations included.
        return str(jax.make_jaxpr(
            lambda v: model.apply(v, X_SMALL, train=True, rngs=rngs, mutable=["batch_stats"])
        )(variables))  # fmt: skip

    assert "random_bits" in primitives({"dropout": jax.random.key(1)})
    assert "random_bits" not in primitives(None)


def test_config_helper():
    config = source_only.get_config("")
    common.use_mit(config)
    model = models.build_segmenter(config.model, 19)
    assert (model.embed_dims, model.depths, model.decoder) == (
        (64, 128, 320, 512),
        (3, 6, 40, 3),
        "daformer",
    )
    assert model.decoder_embed_dim == 256 and model.drop_path_rate == 0.1
    assert config.data.bgr is False and config.data.image_std == (58.395, 57.12, 57.375)
    common.use_mit(config, "b0", "mlp")
    assert models.build_segmenter(config.model, 19).decoder_embed_dim == 256
    common.use_mit(config, "b2", "mlp")
    assert models.build_segmenter(config.model, 19).decoder_embed_dim == 768
    config.model.variant = "b6"
    with pytest.raises(ValueError, match="variant='b6'"):
        models.build_segmenter(config.model, 19)
    small = _synthetic_model()
    assert small.depths == (1, 1, 1, 1) and small.convolution.impl == common.SYNTHETIC_CONV_IMPL
    with pytest.raises(ValueError, match="decoder='fpn'"):
        jax.eval_shape(_synthetic_model(decoder="fpn").init, jax.random.key(0),
                       jnp.zeros((1, 64, 64, 3)))  # fmt: skip


def test_mixed_precision_and_remat():
    apply, variables = _synthetic_apply(drop_path_rate=0.5, bn_mode="frozen")
    full = apply(variables, X_SMALL, None, train=False)
    half_apply, _ = _synthetic_apply(drop_path_rate=0.5, bn_mode="frozen", dtype="bfloat16")
    half = half_apply(variables, X_SMALL, None, train=False)
    assert half.dtype == jnp.float32 and full.shape == (2, 16, 16, NUM_CLASSES)
    assert 0 < float(jnp.abs(half - full).max() / jnp.abs(full).max()) < 0.05
    # Remat keeps the parameters (checkpoints load either way) and traces a gradient; its
    # numbers are the slow test's.
    small, remat = _synthetic_model(), _synthetic_model(remat=True)
    assert jax.tree.map(jnp.shape, abstract_variables(remat)) == jax.tree.map(
        jnp.shape, abstract_variables(small)
    )
    variables = random_variables(small)
    grads = jax.eval_shape(
        jax.grad(lambda p: remat.apply({**variables, "params": p}, X_SMALL, train=True,
                                       mutable=["batch_stats"])[0]["main"].sum()),
        variables["params"],
    )  # fmt: skip
    assert jax.tree.structure(grads) == jax.tree.structure(variables["params"])


@pytest.mark.slow
def test_remat_gradients_equal_plain_ones():
    small, remat = _synthetic_model(), _synthetic_model(remat=True)
    variables = random_variables(small)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 128, 3)), jnp.float32)
    grads = [
        jax.jit(jax.grad(lambda p, m=m: m.apply({**variables, "params": p}, x)["main"].sum()))(
            variables["params"]
        )
        for m in (small, remat)
    ]
    # Relative to the largest gradient: some are zero but for rounding (the key bias, whose
    # shift of all logits of a query the softmax removes).
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads[0]))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)
