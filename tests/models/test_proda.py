"""ProDA's DeepLabV2 (jaxda/models/proda.py) against the PyTorch transcription
(`jaxda.interop.torch_reference_proda`): grid sizes, numerical parity with weights carried over
key by key from ProDA's state-dict names (relative error < 1e-4, running and batch statistics),
parameter groups, the sown feature and dropout. Tiny widths keep it fast.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxda import models
from jaxda.models import deeplab_v2, proda
from jaxda.train import optimizers

TOLERANCE = 1e-4
STAGE_SIZES, WIDTH, HEAD_WIDTH, NUM_CLASSES = (1, 1, 1, 1), 8, 64, 5


def _model(**kwargs) -> proda.ProDADeepLabV2:
    settings = dict(
        num_classes=NUM_CLASSES, stage_sizes=STAGE_SIZES, width=WIDTH, head_width=HEAD_WIDTH
    )
    return proda.ProDADeepLabV2(**{**settings, **kwargs})


def _variables(model, size=(33, 33)):
    return jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, *size, 3)))


@pytest.mark.parametrize("size", [(33, 47), (64, 65), (97, 131)])
def test_grid_matches_deeplab_v2(size):
    model = _model()
    x = jax.ShapeDtypeStruct((2, *size, 3), jnp.float32)
    out = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), jnp.zeros(x.shape)))
    outputs, _ = out
    expected = tuple(deeplab_v2.output_size(n) for n in size)
    assert outputs["main"].shape == (2, *expected, NUM_CLASSES)
    v2 = deeplab_v2.DeepLabV2(num_classes=NUM_CLASSES, stage_sizes=STAGE_SIZES, width=WIDTH)
    v2_out = jax.eval_shape(lambda: v2.init_with_output(jax.random.key(0), jnp.zeros(x.shape)))
    assert v2_out[0]["main"].shape == outputs["main"].shape


def test_sown_feature_and_layers():
    model = _model()

    def sown():  # Shapes only: traced, not run.
        variables = _variables(model)
        return model.apply(variables, jnp.zeros((2, 41, 57, 3)), mutable=["intermediates"])[1]

    state = jax.eval_shape(sown)
    inter = state["intermediates"]
    assert set(inter) == {"layer1", "layer2", "layer3", "layer4", "feature"}
    (feature,) = inter["feature"]
    grid = tuple(deeplab_v2.output_size(n) for n in (41, 57))
    assert feature.shape == (2, *grid, HEAD_WIDTH)


def test_param_groups_cover_every_parameter():
    model = _model(bn_clr=True)
    params = jax.eval_shape(lambda: _variables(model))["params"]
    assert set(params) == {"backbone", "bn_pretrain", "head"}
    labels = optimizers.network_labels(model, params, "segmenter", freeze_bn_affine=False)
    flat = {"/".join(optimizers.path_names(p)): v for p, v in _flatten_with_path(labels)}
    assert all(v.startswith("segmenter/") for v in flat.values())
    assert {v for k, v in flat.items() if not k.startswith("backbone/")} == {"segmenter/head"}
    assert {v for k, v in flat.items() if k.startswith("backbone/")} == {"segmenter/backbone"}


def _flatten_with_path(tree):
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def test_from_config_and_registry():
    config = ml_collections.ConfigDict(
        dict(name="proda_deeplab_v2", depth=101, width=8, head_width=64, bn_clr=True, dropout=False)
    )
    model = models.build_segmenter(config, 19)
    assert isinstance(model, proda.ProDADeepLabV2)
    assert model.stage_sizes == (3, 4, 23, 3) and model.bn_clr and not model.dropout
    assert model.head_width == 64 and model.train_batch_stats


def test_dropout_needs_rng_and_drops_channels():
    model = _model()
    variables = _variables(model)
    x = jax.random.normal(jax.random.key(1), (2, 41, 57, 3))
    with pytest.raises(ValueError, match="dropout"):
        model.apply(variables, x, train=True, mutable=["batch_stats"])
    _, state = jax.jit(
        lambda v, x, key: model.apply(
            v, x, train=True, rngs={"dropout": key}, mutable=["batch_stats", "intermediates"]
        )
    )(variables, x, jax.random.key(2))
    (feature,) = state["intermediates"]["feature"]
    # Dropout2d: a channel of an image is zero everywhere or nowhere.
    zero = np.asarray(feature == 0)
    per_channel = zero.all(axis=(1, 2))
    assert per_channel.any() and (zero.any(axis=(1, 2)) == per_channel).all()


# --- Parity against the PyTorch transcription.


def _flax_path(torch_name: str) -> tuple[str, tuple[str, ...], str]:
    """ProDA state-dict name -> (collection, Flax module path, leaf); leaf None: skipped.

    'layer3.0.downsample.1.running_mean' -> ('batch_stats', ('backbone', 'layer3_0',
    'bn_downsample'), 'mean'); 'layer5.conv2d_list.2.1.weight' -> ('params', ('head',
    'branch2_gn'), 'scale').
    """
    *modules, leaf = torch_name.split(".")
    if modules[0] == "layer5":
        rest = modules[1:]
        if rest[0] == "conv2d_list":
            path = ("head", f"branch{rest[1]}" + ("_gn" if rest[2] == "1" else ""))
        elif rest[0] == "bottleneck" and rest[1] == "0":
            path = ("head", {"0": "se_fc1", "2": "se_fc2"}[rest[3]])
        elif rest[0] == "bottleneck":
            path = ("head", {"1": "fuse", "2": "fuse_gn"}[rest[1]])
        else:
            assert rest == ["head", "1"], torch_name
            path = ("head", "classifier")
        is_norm = path[1].endswith("_gn")
        weight = "scale" if is_norm else "kernel"
        return "params", path, {"weight": weight, "bias": "bias"}[leaf]
    if modules[0] == "bn_pretrain":
        path = ("bn_pretrain",)
    elif modules[0] in ("conv1", "bn1"):
        path = ("backbone", modules[0])
    else:
        block = f"{modules[0]}_{modules[1]}"
        if modules[2] == "downsample":
            name = "downsample" if modules[3] == "0" else "bn_downsample"
        else:
            name = modules[2]
        path = ("backbone", block, name)
    if path[-1].startswith("bn"):
        leaves = {
            "weight": ("params", "scale"),
            "bias": ("params", "bias"),
            "running_mean": ("batch_stats", "mean"),
            "running_var": ("batch_stats", "var"),
            "num_batches_tracked": (None, None),
        }
        collection, name = leaves[leaf]
        return collection, path, name
    return "params", path, {"weight": "kernel", "bias": "bias"}[leaf]


def _carry_over(state_dict, variables) -> dict:
    """Flax variables with every torch tensor placed; asserts each Flax leaf is set once."""
    flat = {
        (c, *k): v
        for c in ("params", "batch_stats")
        for k, v in _flat_dict(variables.get(c, {})).items()
    }
    placed = {}
    for name, tensor in state_dict.items():
        collection, path, leaf = _flax_path(name)
        if collection is None:
            continue
        value = tensor.detach().numpy()
        if value.ndim == 4:  # OIHW -> HWIO.
            value = value.transpose(2, 3, 1, 0)
        elif value.ndim == 2:  # Linear [out, in] -> Dense [in, out].
            value = value.T
        key = (collection, *path, leaf)
        assert key in flat, (name, key)
        assert key not in placed, name
        assert flat[key].shape == value.shape, (name, flat[key].shape, value.shape)
        placed[key] = jnp.asarray(value)
    assert set(placed) == set(flat), sorted(set(flat) - set(placed))
    out = {}
    for (collection, *path), value in placed.items():
        node = out.setdefault(collection, {})
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def _flat_dict(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) or hasattr(v, "items"):
            out.update(_flat_dict(v, (*prefix, k)))
        else:
            out[(*prefix, k)] = v
    return out


def assert_matches_transcription(model, variables, torch_model, x, bn_clr) -> None:
    """The JAX ProDA network's logits and feature against the PyTorch transcription's on x
    [N, 3, H, W], in evaluation and training mode (batch statistics; dropout off both sides)."""
    import torch

    from tests.interop.test_parity import relative_error

    x_nhwc = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
    errors = {}
    for mode in ("eval", "train"):
        torch_model.train(mode == "train")
        torch_model.layer5.head[0].eval()  # Batch statistics, but no dropout.
        with torch.no_grad():
            expected = torch_model(x)
        torch_model.eval()
        out, state = model.apply(
            variables, x_nhwc, train=mode == "train", mutable=["intermediates", "batch_stats"]
        )
        (feature,) = state["intermediates"]["feature"]
        errors[mode] = {
            "main": relative_error(out["main"], expected["out"]),
            "feature": relative_error(feature, expected["feat"]),
        }
    print(f"relative errors (bn_clr={bn_clr}): {errors}")
    for per_output in errors.values():
        for name, error in per_output.items():
            assert error < TOLERANCE, (name, errors)


def randomize_head(torch_model, generator, torch):
    """GroupNorm affine and SE linears drawn at random (`randomize` covers convs and BN)."""
    with torch.no_grad():
        for m in torch_model.layer5.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.normal_(0, 0.2, generator=generator)
            elif isinstance(m, torch.nn.Linear):
                m.weight.normal_(0, (2 / m.weight.shape[1]) ** 0.5, generator=generator)
                m.bias.normal_(0, 0.5, generator=generator)


@pytest.mark.parametrize("bn_clr", [False, True], ids=["plain", "bn_clr"])
def test_parity_with_torch_transcription(bn_clr):
    torch = pytest.importorskip("torch")
    reference = pytest.importorskip("jaxda.interop.torch_reference_proda")
    from tests.interop.test_parity import randomize

    torch.manual_seed(0)
    torch_model = reference.ProDADeepLabV2Torch(
        NUM_CLASSES, STAGE_SIZES, WIDTH, HEAD_WIDTH, bn_clr=bn_clr
    )
    generator = torch.Generator().manual_seed(1)
    calibration = torch.randn(2, 3, 90, 120, generator=generator) * 2 + 0.5
    # All five head branches are trained layers: none is redrawn as an untrained one.
    randomize(torch_model, 2, calibration, untrained_branches_from=5)
    randomize_head(torch_model, generator, torch)
    x = torch.randn(2, 3, 97, 131, generator=generator) * 2 + 0.5

    # Dropout off so that the batch-statistics pass is deterministic on both sides.
    model = _model(bn_clr=bn_clr, dropout=False)
    variables = _carry_over(torch_model.state_dict(), _variables(model))
    assert_matches_transcription(model, variables, torch_model, x, bn_clr)
