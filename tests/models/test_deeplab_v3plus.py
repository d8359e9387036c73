"""DeepLabV3+ (jaxda/models/deeplab_v3plus.py) against the PyTorch transcription
(`jaxda.interop.torch_reference_v3plus`): grid sizes by PyTorch's arithmetic, numerical parity
with weights carried over (relative error < 1e-4, running and batch statistics), parameter
groups, dropout and config plumbing. Tiny widths keep it fast.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import adaptseg, common, source_only
from jaxda import models
from jaxda.models import deeplab_v3plus, layers, resnet_torchvision
from jaxda.train import optimizers

TOLERANCE = 1e-4
# Small heads: the structure is the references', the widths are not.
HEADS = {"head_width": 32, "low_level_width": 8, "aux_width": 16}
# (variant, output stride, deep stem, multi-grid, stage sizes): RobustNet's R50 (D16) and
# R101 (ResNet3X3, D) forms and jfzhang95's multi-grid ResNet at both output strides.
SETTINGS = {
    "robustnet_os16": ("robustnet", 16, False, (), (1, 1, 2, 1)),
    "robustnet_os8_deep_stem": ("robustnet", 8, True, (), (1, 1, 2, 1)),
    "jfzhang95_os16_multi_grid": ("jfzhang95", 16, False, (1, 2, 4), (1, 1, 1, 3)),
    "jfzhang95_os8_multi_grid": ("jfzhang95", 8, False, (1, 2, 4), (1, 1, 1, 3)),
}


def _kwargs(name: str, width: int = 8, dropout: bool = False) -> dict:
    variant, output_stride, deep_stem, multi_grid, stage_sizes = SETTINGS[name]
    return {
        "width": width,
        "output_stride": output_stride,
        "deep_stem": deep_stem,
        "multi_grid": multi_grid,
        "variant": variant,
        "multi_level": variant == "robustnet",
        "dropout": dropout,
        "stage_sizes": stage_sizes,
        **HEADS,
    }


def _jax_model(name: str, num_classes: int = 5, **kwargs) -> deeplab_v3plus.DeepLabV3Plus:
    return deeplab_v3plus.DeepLabV3Plus(num_classes=num_classes, **_kwargs(name, **kwargs))


def _torch_model(name: str, num_classes: int = 5, **kwargs):
    ref = pytest.importorskip("jaxda.interop.torch_reference_v3plus")
    kw = _kwargs(name, **kwargs)
    return ref.DeepLabV3PlusTorch(num_classes=num_classes, layers=kw.pop("stage_sizes"), **kw)


# --- (a) grid sizes ----------------------------------------------------------------------------

SIZES = [(17, 139), (32, 33), (64, 65), (97, 128), (139, 17), (512, 768), (1024, 2048)]


@functools.cache
def _abstract_variables(name):
    model = _jax_model(name, width=4)
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 33, 33, 3)))


def _jax_shapes(name, size) -> dict[str, tuple]:
    model = _jax_model(name, width=4)
    x = jax.ShapeDtypeStruct((1, *size, 3), jnp.float32)
    out, state = jax.eval_shape(
        lambda v, x: model.apply(v, x, mutable=["intermediates"]), _abstract_variables(name), x
    )
    shapes = {k: v.shape[1:3] for k, v in out.items()}
    shapes.update({k: v[0].shape[1:3] for k, v in state["intermediates"].items()})
    return shapes


@pytest.mark.parametrize("name", SETTINGS)
def test_grid_sizes_follow_pytorch(name):
    torch = pytest.importorskip("torch")
    torch_model = _torch_model(name, width=4).eval()
    features = {}
    for layer in ("layer1", "layer2", "layer3", "layer4"):
        getattr(torch_model.backbone, layer).register_forward_hook(
            lambda m, i, out, layer=layer: features.__setitem__(layer, tuple(out.shape[2:]))
        )
    for size in SIZES:
        with torch.no_grad():
            aux, main = torch_model(torch.zeros(1, 3, *size))
        expected = dict(features)
        expected["main"] = tuple(main.shape[2:])
        if aux is not None:
            expected["aux"] = tuple(aux.shape[2:])
        assert _jax_shapes(name, size) == expected, (name, size)
        output_stride = SETTINGS[name][1]
        closed_form = [resnet_torchvision.feature_sizes(n, output_stride) for n in size]
        for layer in ("layer1", "layer2", "layer3", "layer4"):
            assert expected[layer] == tuple(c[layer] for c in closed_form), (size, layer)


def test_published_resnet101_os8_grids_and_channels():
    """RobustNet's R101 (deep stem, OS8) at the Cityscapes size, by the closed form."""
    model = deeplab_v3plus.DeepLabV3Plus(
        num_classes=19, stage_sizes=resnet_torchvision.STAGE_SIZES[101], deep_stem=True,
        output_stride=8,
    )  # fmt: skip
    x = jax.ShapeDtypeStruct((1, 1024, 2048, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    out, state = jax.eval_shape(
        lambda v, x: model.apply(v, x, mutable=["intermediates"]), variables, x
    )
    sizes = [resnet_torchvision.feature_sizes(n, 8) for n in (1024, 2048)]
    assert out["main"].shape == (1, sizes[0]["layer1"], sizes[1]["layer1"], 19) == (1, 256, 512, 19)
    assert out["aux"].shape == (1, 128, 256, 19)
    channels = {k: v[0].shape[-1] for k, v in state["intermediates"].items()}
    assert channels == {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}
    assert variables["params"]["backbone"]["conv3"]["kernel"].shape == (3, 3, 64, 128)
    assert len([k for k in variables["params"]["backbone"] if k.startswith("layer3_")]) == 23


# --- (b) numerical parity ---------------------------------------------------------------------

# Official head module names (torch_reference_v3plus) -> jaxda paths.
_ROBUSTNET = {
    "aspp.img_conv.0": ("aspp", "pool", "conv"),
    "aspp.img_conv.1": ("aspp", "pool", "bn"),
    **{f"aspp.features.{i}.0": ("aspp", f"branch{i}", "conv") for i in range(4)},
    **{f"aspp.features.{i}.1": ("aspp", f"branch{i}", "bn") for i in range(4)},
    "bot_aspp.0": ("aspp", "project", "conv"),
    "bot_aspp.1": ("aspp", "project", "bn"),
    "bot_fine.0": ("decoder", "low_level", "conv"),
    "bot_fine.1": ("decoder", "low_level", "bn"),
    "final1.0": ("decoder", "conv1", "conv"),
    "final1.1": ("decoder", "conv1", "bn"),
    "final1.3": ("decoder", "conv2", "conv"),
    "final1.4": ("decoder", "conv2", "bn"),
    "final2.0": ("decoder", "classifier"),
    "dsn.0": ("head_aux", "unit", "conv"),
    "dsn.1": ("head_aux", "unit", "bn"),
    "dsn.4": ("head_aux", "classifier"),
}
_JFZHANG95 = {
    **{f"aspp.aspp{i + 1}.atrous_conv": ("aspp", f"branch{i}", "conv") for i in range(4)},
    **{f"aspp.aspp{i + 1}.bn": ("aspp", f"branch{i}", "bn") for i in range(4)},
    "aspp.global_avg_pool.1": ("aspp", "pool", "conv"),
    "aspp.global_avg_pool.2": ("aspp", "pool", "bn"),
    "aspp.conv1": ("aspp", "project", "conv"),
    "aspp.bn1": ("aspp", "project", "bn"),
    "decoder.conv1": ("decoder", "low_level", "conv"),
    "decoder.bn1": ("decoder", "low_level", "bn"),
    "decoder.last_conv.0": ("decoder", "conv1", "conv"),
    "decoder.last_conv.1": ("decoder", "conv1", "bn"),
    "decoder.last_conv.4": ("decoder", "conv2", "conv"),
    "decoder.last_conv.5": ("decoder", "conv2", "bn"),
    "decoder.last_conv.8": ("decoder", "classifier"),
}


def _flax_path(name: str) -> tuple[str, ...]:
    if not name.startswith("backbone."):
        return {**_ROBUSTNET, **_JFZHANG95}[name]
    parts = name.split(".")[1:]
    if len(parts) == 1:  # Stem.
        return ("backbone", parts[0])
    block = f"{parts[0]}_{parts[1]}"
    if parts[2] == "downsample":
        return ("backbone", block, "downsample" if parts[3] == "0" else "bn_downsample")
    return ("backbone", block, parts[2])


def _to_flax(torch_model) -> dict:
    """{'params', 'batch_stats'} of jaxda's model from the torch model's modules."""
    nn = pytest.importorskip("torch").nn
    variables = {"params": {}, "batch_stats": {}}

    def put(collection, path, leaf, value):
        tree = variables[collection]
        for part in path:
            tree = tree.setdefault(part, {})
        tree[leaf] = jnp.asarray(value.detach().numpy())

    for name, m in torch_model.named_modules():
        if isinstance(m, nn.Conv2d):
            path = _flax_path(name)
            put("params", path, "kernel", m.weight.permute(2, 3, 1, 0))
            if m.bias is not None:
                put("params", path, "bias", m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            path = _flax_path(name)
            put("params", path, "scale", m.weight)
            put("params", path, "bias", m.bias)
            put("batch_stats", path, "mean", m.running_mean)
            put("batch_stats", path, "var", m.running_var)
    return variables


def relative_errors(model, variables, torch_model, x) -> dict:
    """{'eval' | 'train': {head: relative error}} of the JAX model against the PyTorch
    transcription on NCHW input `x`, with running statistics and with batch statistics."""
    parity = pytest.importorskip("tests.interop.test_parity")
    torch = pytest.importorskip("torch")
    x_nhwc = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
    errors = {}
    for mode in ("eval", "train"):
        torch_model.train(mode == "train")
        with torch.no_grad():
            aux, main = torch_model(x)
        torch_model.eval()
        if mode == "eval":
            out = jax.jit(model.apply)(variables, x_nhwc)
        else:
            apply = functools.partial(model.apply, train=True, mutable=["batch_stats"])
            out, _ = jax.jit(apply)(variables, x_nhwc)
        torch_out = {"main": main} | ({} if aux is None else {"aux": aux})
        assert set(out) == set(torch_out)
        errors[mode] = {k: parity.relative_error(out[k], v) for k, v in torch_out.items()}
    return errors


@pytest.mark.parametrize("name", SETTINGS)
def test_parity_with_torch(name):
    torch = pytest.importorskip("torch")
    parity = pytest.importorskip("tests.interop.test_parity")
    torch.manual_seed(0)
    torch_model = _torch_model(name, num_classes=19)
    generator = torch.Generator().manual_seed(1)
    calibration = torch.randn(2, 3, 70, 90, generator=generator) * 2 + 0.5
    parity.randomize(torch_model, 2, calibration)
    variables = _to_flax(torch_model)
    model = _jax_model(name, num_classes=19)
    expected = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    shapes = lambda tree: jax.tree.map(lambda a: a.shape, tree)  # noqa: E731
    assert shapes(variables) == shapes(expected)  # Every parameter carried over, none extra.

    x = torch.randn(2, 3, 65, 97, generator=generator) * 2 + 0.5
    errors = relative_errors(model, variables, torch_model, x)
    print(f"{name} relative errors: {errors}")
    for mode, per_head in errors.items():
        for head, error in per_head.items():
            assert error < TOLERANCE, (mode, head, errors)


# --- (c) parameter groups, dropout, config ------------------------------------------------------


@pytest.mark.parametrize("name", ["robustnet_os16", "jfzhang95_os16_multi_grid"])
def test_param_groups_cover_every_parameter(name):
    model = _jax_model(name, width=4)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 33, 33, 3)))["params"]
    labels = optimizers.network_labels(model, params, "optimizer", freeze_bn_affine=False)
    by_top = {}
    for path, label in jax.tree_util.tree_flatten_with_path(labels)[0]:
        by_top.setdefault(optimizers.path_names(path)[0], set()).add(label)
    assert by_top.pop("backbone") == {"optimizer/backbone"}
    assert set(by_top) == ({"aspp", "decoder", "head_aux"} & set(params))
    assert all(groups == {"optimizer/head"} for groups in by_top.values())
    # Frozen BN affine finds every BN: its scale and bias, and nothing else.
    frozen = optimizers.network_labels(model, params, "optimizer", freeze_bn_affine=True)
    flat = jax.tree_util.tree_flatten_with_path(frozen)[0]
    for path, label in flat:
        names = optimizers.path_names(path)
        is_bn = layers.is_batch_norm_param(names)
        assert (label == optimizers.FROZEN) == is_bn, names
        assert is_bn == (names[-2].startswith("bn") and names[-1] in ("scale", "bias"))


# Slow run (7 s): test_train_steps_pass_a_dropout_key covers dropout in the default run.
@pytest.mark.slow
def test_dropout_needs_rng_and_is_random():
    model = _jax_model("jfzhang95_os16_multi_grid", width=4, dropout=True)
    x = jax.random.normal(jax.random.key(1), (2, 33, 41, 3))
    variables = model.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="rngs"):
        jax.eval_shape(lambda: model.apply(variables, x, train=True, mutable=["batch_stats"]))

    @jax.jit
    def run(key):
        apply = functools.partial(model.apply, train=True, mutable=["batch_stats"])
        return apply(variables, x, rngs={"dropout": key})[0]["main"]

    first, second = run(jax.random.key(0)), run(jax.random.key(1))
    assert not np.allclose(first, second)
    np.testing.assert_array_equal(first, run(jax.random.key(0)))


def test_jfzhang95_refuses_multi_level():
    model = deeplab_v3plus.DeepLabV3Plus(variant="jfzhang95", multi_level=True, width=4)
    with pytest.raises(ValueError, match="multi_level"):
        model.init(jax.random.key(0), jnp.zeros((1, 33, 33, 3)))


@pytest.mark.parametrize("module", [source_only, adaptseg])
def test_model_argument_builds_deeplabv3plus(module):
    config = module.get_config("synthetic,model=deeplabv3plus")
    assert config.model.name == "deeplabv3plus"
    model = models.build_segmenter(config.model, config.num_classes)
    assert isinstance(model, deeplab_v3plus.DeepLabV3Plus)
    assert (model.stage_sizes, model.width, model.aspp_rates) == ((1, 1, 1, 1), 8, (1, 2, 3))
    variables = models.abstract_variables(model)
    assert set(models.param_groups(model, variables["params"])) == {
        "backbone", "aspp", "decoder", "head_aux",
    }  # fmt: skip
    assert module.get_config().model.name == "deeplab_v2"
    full = common.base_config()
    common.use_deeplabv3plus(full)
    published = models.build_segmenter(full.model, 19)
    assert (published.stage_sizes, published.output_stride, published.aspp_rates) == (
        (3, 4, 6, 3), 16, (),
    )  # fmt: skip
    with pytest.raises(ValueError, match="model"):
        module.get_config("model=deeplab_v4")


def test_train_steps_pass_a_dropout_key():
    """With dropout on, a train step runs (the trainer passes a 'dropout' key) and two steps
    from the same state with different step keys differ only through dropout."""

    from jaxda import mesh as mesh_lib
    from jaxda.train import trainer
    from tests.conftest import tiny_config

    config = tiny_config("source_only")
    common.use_deeplabv3plus(config, synthetic=True)
    config.model.dropout = True
    mesh = mesh_lib.make_mesh(1)
    setup = trainer.build(config, mesh)
    rng = np.random.default_rng(0)
    batch = {
        "source": {
            "image": rng.normal(size=(8, 32, 64, 3)).astype(np.float32),
            "label": rng.integers(0, 19, size=(8, 32, 64)).astype(np.uint8),
        }
    }
    step = trainer.jit_train_step(config, setup)
    losses = []
    for seed_rng in (0, 1):
        state = trainer.init_state(config, setup)
        state = state.replace(rng=jax.random.key_data(jax.random.key(seed_rng)))
        _, metrics = step(state, mesh_lib.to_global(batch, mesh))
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all() and losses[0] != losses[1]
