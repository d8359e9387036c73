"""The optimizer: poly schedule, groups declared by the model (10x heads), weight decay,
frozen BN, Adam for the discriminators, and refusal of parameters without a group."""

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxda import mesh as mesh_lib
from jaxda.train import optimizers, spec, trainer
from tests.conftest import tiny_config


def test_poly_schedule_matches_formula():
    schedule = optimizers.poly_schedule(2.5e-4, 250_000, 0.9)
    for i in (0, 1, 1000, 149_999, 250_000):
        assert float(schedule(i)) == pytest.approx(2.5e-4 * (1 - i / 250_000) ** 0.9, rel=1e-5)


def test_warmup_poly_schedule_matches_mmcv():
    """mmcv's PolyLrUpdaterHook with linear warm-up (DAFormer's poly10warm): the poly rate of
    step i times 1 - (1 - i / 1500)(1 - 1e-6) below 1500 steps, then the poly rate."""
    config = tiny_config("adaptseg")
    opt = config.optimizer
    opt.learning_rate, opt.poly_power, opt.decay_steps = 6e-5, 1.0, 40_000
    opt.warmup_steps, opt.warmup_ratio = 1500, 1e-6
    schedule = optimizers.schedule(config)
    for i in (0, 1, 700, 1499, 1500, 20_000, 39_000):
        poly = 6e-5 * (1 - i / 40_000)
        factor = 1 - (1 - i / 1500) * (1 - 1e-6) if i < 1500 else 1.0
        assert float(schedule(i)) == pytest.approx(poly * factor, rel=1e-5)


def test_adamw_decays_decoupled_as_pytorch():
    """Two AdamW steps of a group at lr x 10 against PyTorch's AdamW formula: theta -= lr wd
    theta, then the bias-corrected Adam step."""
    config = tiny_config("adaptseg")
    opt = config.optimizer
    opt.name, opt.learning_rate, opt.weight_decay = "adamw", 1e-3, 0.01
    opt.beta1, opt.beta2, opt.poly_power = 0.9, 0.999, 0.0
    tx = optimizers._group_transform(config, "optimizer", "head")
    theta = np.array([0.5, -1.0, 2.0])
    params, state = jnp.asarray(theta, jnp.float32), None
    state = tx.init(params)
    m = v = np.zeros(3)
    for t, grad in enumerate((np.array([0.1, -0.2, 0.3]), np.array([-0.4, 0.0, 0.2])), 1):
        updates, state = tx.update(jnp.asarray(grad, jnp.float32), state, params)
        params = params + updates
        lr = 1e-2  # The head's 10x.
        theta = theta * (1 - lr * 0.01)
        m, v = 0.9 * m + 0.1 * grad, 0.999 * v + 0.001 * grad**2
        m_hat, v_hat = m / (1 - 0.9**t), v / (1 - 0.999**t)
        theta = theta - lr * m_hat / (np.sqrt(v_hat) + 1e-8)
        np.testing.assert_allclose(params, theta, rtol=1e-5)


def _setup(config):
    return trainer.build(config, mesh_lib.make_mesh(1))


def test_labels_come_from_the_model_groups():
    config = tiny_config("adaptseg", **{"model.bn_mode": "batch_stats"})
    setup = _setup(config)
    seg = setup.abstract_state.params["seg"]
    labels = optimizers.network_labels(
        setup.networks["seg"].module, seg, "optimizer", freeze_bn_affine=True
    )
    assert labels["backbone"]["layer1_0"]["conv1"]["kernel"] == "optimizer/backbone"
    assert labels["backbone"]["layer1_0"]["bn1"]["scale"] == "frozen"
    assert labels["head_main"]["branch0"]["kernel"] == "optimizer/head"
    assert labels["head_aux"]["branch0"]["kernel"] == "optimizer/head"
    assert labels["head_aux"]["branch0"]["bias"] == "optimizer/head"  # One label per group.
    split = optimizers.network_labels(
        setup.networks["seg"].module, seg, "optimizer", freeze_bn_affine=True, split_biases=True
    )
    assert split["head_aux"]["branch0"]["bias"] == "optimizer/head/bias"
    assert split["head_aux"]["branch0"]["kernel"] == "optimizer/head"
    trained = optimizers.network_labels(
        setup.networks["seg"].module, seg, "optimizer", freeze_bn_affine=False
    )
    assert trained["backbone"]["layer1_0"]["bn1"]["scale"] == "optimizer/backbone"
    only_bn = optimizers.network_labels(
        setup.networks["seg"].module,
        seg,
        "optimizer",
        freeze_bn_affine=False,
        train_only=(r"(.*/)?bn[^/]*/(scale|bias)",),
    )
    assert only_bn["backbone"]["layer1_0"]["bn1"]["scale"] == "optimizer/backbone"
    assert only_bn["backbone"]["layer1_0"]["conv1"]["kernel"] == "frozen"


class _NewDecoder(nn.Module):
    """A model whose 'decoder' submodule has no declared parameter group."""

    param_groups: ClassVar[dict[str, str]] = {"backbone": "backbone"}

    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, name="decoder")(nn.Dense(2, name="backbone")(x))


class _GroupedDecoder(_NewDecoder):
    param_groups: ClassVar[dict[str, str]] = {"backbone": "backbone", "decoder": "decoder"}


def test_a_parameter_without_a_group_is_refused():
    module = _NewDecoder()
    params = module.init(jax.random.key(0), jnp.zeros((1, 3)))["params"]
    with pytest.raises(ValueError, match=r"assigns no group to \['decoder'\]"):
        optimizers.network_labels(module, params, "optimizer", freeze_bn_affine=False)
    # Declared, but the config gives the group no learning rate: refused too.
    config = tiny_config("source_only")
    networks = {"seg": spec.Network(_GroupedDecoder())}
    with pytest.raises(ValueError, match=r"lr_multipliers has no entry for .*'decoder'"):
        optimizers.make_optimizer(config, networks, {"seg": params})
    config.optimizer.lr_multipliers.decoder = 10.0
    optimizers.make_optimizer(config, networks, {"seg": params})


def test_two_sgd_steps_match_pytorch_formula():
    """PyTorch SGD: g += wd * p; buf = m * buf + g; p -= lr_i * buf; heads at 10 x lr_i."""
    config = tiny_config("adaptseg", **{"optimizer.weight_decay": 0.1, "total_steps": 10})
    config.model.bn_mode = "batch_stats"
    setup = _setup(config)
    tx = setup.tx
    params = jax.tree.map(lambda x: jnp.ones(x.shape, x.dtype), setup.abstract_state.params)
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


@pytest.mark.parametrize("mode", ["copy", "ema", "keep"])
def test_ema_update(mode):
    from jaxda.train import common

    rng = np.random.default_rng(0)
    teacher, student = (
        {"params": {"w": rng.normal(size=3)}, "batch_stats": {"mean": rng.normal(size=3)}}
        for _ in range(2)
    )
    new = common.ema_update(teacher, student, 0.99, batch_stats=mode)
    np.testing.assert_allclose(
        new["params"]["w"], 0.99 * teacher["params"]["w"] + 0.01 * student["params"]["w"]
    )
    t, s = teacher["batch_stats"]["mean"], student["batch_stats"]["mean"]
    expected = {"copy": s, "keep": t, "ema": 0.99 * t + 0.01 * s}[mode]
    np.testing.assert_allclose(new["batch_stats"]["mean"], expected)


def test_dasac_parameter_groups_after_sgd_steps():
    """DA-SAC's groups (basenet.parameter_groups): backbone weights 1x with weight decay,
    backbone biases (BN offsets included) 2x without, head weights 10x with, head biases 20x
    without; BN scales are weights; bn_mode 'frozen_stats' trains the BN affine; constant lr."""
    config = tiny_config("source_only", **{"optimizer.weight_decay": 0.1, "total_steps": 10})
    config.model.bn_mode = "frozen_stats"
    config.model.multi_level = False
    config.optimizer.poly_power = 0.0
    config.optimizer.bias_lr_multiplier = 2.0
    config.optimizer.bias_weight_decay = False
    setup = _setup(config)
    params = jax.tree.map(lambda x: jnp.ones(x.shape, x.dtype), setup.abstract_state.params)
    state = setup.tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    for _ in range(2):
        updates, state = setup.tx.update(grads, state, params)
        params = jax.tree.map(lambda a, u: a + u, params, updates)

    def reference(multiplier, decay):
        """PyTorch SGD(momentum 0.9) for two steps at a constant lr from p = 1, grad 0.5."""
        p, buf = 1.0, 0.0
        for _ in range(2):
            buf = 0.9 * buf + 0.5 + decay * p
            p -= multiplier * config.optimizer.learning_rate * buf
        return p

    seg = params["seg"]
    bn = seg["backbone"]["layer1_0"]["bn1"]
    expected = {
        "backbone conv": (seg["backbone"]["layer1_0"]["conv1"]["kernel"], reference(1, 0.1)),
        "BN scale": (bn["scale"], reference(1, 0.1)),
        "BN offset": (bn["bias"], reference(2, 0.0)),
        "head weight": (seg["head_main"]["branch0"]["kernel"], reference(10, 0.1)),
        "head bias": (seg["head_main"]["branch0"]["bias"], reference(20, 0.0)),
    }
    for name, (value, want) in expected.items():
        np.testing.assert_allclose(value, want, rtol=1e-6, err_msg=name)
    assert "head_aux" not in seg


def test_no_weight_decay_regexes_keep_the_group_lr_without_decay():
    """AdamW (lr 1e-3, wd 0.1) from p = 1, grad 0.5: matched parameters (here the BN of
    each block's first conv) take the plain bias-corrected Adam step, the others also the
    decoupled decay lr x wd x p; both at their group's learning rate (head 10x)."""
    config = tiny_config("source_only", **{"model.bn_mode": "train"})
    opt = config.optimizer
    opt.name, opt.learning_rate, opt.weight_decay, opt.poly_power = "adamw", 1e-3, 0.1, 0.0
    opt.beta1, opt.beta2 = 0.9, 0.999
    opt.no_weight_decay = (r"backbone/.*/bn1/.*",)
    setup = _setup(config)
    params = jax.tree.map(lambda x: jnp.ones(x.shape, x.dtype), setup.abstract_state.params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    updates, _ = setup.tx.update(grads, setup.tx.init(params), params)
    seg = jax.tree.map(lambda p, u: p + u, params, updates)["seg"]
    step = 0.5 / (np.sqrt(0.25) + 1e-8)  # m_hat / (sqrt(v_hat) + eps) after one step.
    block = seg["backbone"]["layer1_0"]
    expected = {
        "bn1 scale (no decay)": (block["bn1"]["scale"], 1 - 1e-3 * step),
        "bn1 offset (no decay)": (block["bn1"]["bias"], 1 - 1e-3 * step),
        "bn2 scale": (block["bn2"]["scale"], 1 - 1e-3 * 0.1 - 1e-3 * step),
        "conv1 kernel": (block["conv1"]["kernel"], 1 - 1e-3 * 0.1 - 1e-3 * step),
        "head kernel (10x)": (seg["head_main"]["branch0"]["kernel"], 1 - 1e-2 * (0.1 + step)),
    }
    for name, (value, want) in expected.items():
        np.testing.assert_allclose(value, want, rtol=1e-6, err_msg=name)


def test_daformer_recipe_exempts_exactly_the_mit_layer_norms_from_weight_decay():
    """configs/dacs.py's DAFormer recipe on MiT: every LayerNorm scale / offset of the encoder
    (mmcv's 'norm' key) and nothing else, the head's BN included, is labelled without decay."""
    import flax.linen as nn_

    from configs import dacs
    from jaxda import models

    config = dacs.get_config("model=mit,mit_variant=b0")
    module = models.build_segmenter(config.model, config.num_classes)
    params = models.abstract_variables(module)["params"]
    labels = optimizers.network_labels(
        module,
        params,
        "optimizer",
        freeze_bn_affine=False,
        no_decay=tuple(config.optimizer.no_weight_decay),
    )
    undecayed = {
        "/".join(optimizers.path_names(path))
        for path, label in jax.tree_util.tree_flatten_with_path(labels)[0]
        if label.endswith(optimizers.NO_DECAY)
    }
    # Independently: the parameters of the LayerNorm modules, found by module type.
    layer_norms = set()

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn_.LayerNorm):
            layer_norms.add("/".join(context.module.path))
        return next_fun(*args, **kwargs)

    with nn_.intercept_methods(record):
        models.abstract_variables(module)
    expected = {f"{m}/{leaf}" for m in layer_norms for leaf in ("scale", "bias")}
    assert expected and undecayed == expected
    # MiT-B0: 4 patch embeddings, 8 blocks x (2 + attention's reduction norm where sr > 1:
    # stages 1-3), 4 stage norms.
    assert len(layer_norms) == 4 + 2 * 8 + 6 + 4


def test_unknown_bn_mode_is_refused():
    config = tiny_config("source_only", **{"model.bn_mode": "eval"})
    with pytest.raises(ValueError, match=r"bn_mode='eval'; use one of .*frozen_stats"):
        _setup(config)
