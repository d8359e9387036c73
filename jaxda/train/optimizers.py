"""One optax transformation over the parameters of every trained network of a method.

Each trained network names its config block (`spec.Network.optimizer`): 'optimizer' (the
segmentation network: SGD, momentum 0.9, weight decay 5e-4, poly schedule; or DAFormer's
AdamW with a linear warm-up, `name='adamw'`, `warmup_steps`) or 'disc_optimizer' (Adam, poly).
Within a network, the model declares its parameter groups
(`jaxda.models.param_groups`: 'backbone', 'head', ...) and the block gives each group its
learning-rate and weight-decay multipliers; a group without a multiplier is an error, never a
silent 1x. Frozen BN affine parameters (`layers.frozen_bn_affine`) and the block's
`freeze` regexes get no update and no weight decay (PyTorch leaves them out of its optimizer).
Biases (conv biases and BN offsets: parameters named 'bias') may get their own learning-rate
factor and no weight decay (`bias_lr_multiplier`, `bias_weight_decay`; DA-SAC: 2x, none).
Parameters matching the block's `no_weight_decay` regexes keep their group's learning rate
without weight decay (DAFormer: the encoder's LayerNorms).
"""

import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxda import models
from jaxda.models import layers
from jaxda.train import state as state_lib

FROZEN = "frozen"
CONSTANT = "constant"  # Label suffix of groups of a `constant_lr` network.
BIAS = "bias"  # Label suffix of the biases of a group.
NO_DECAY = "nodecay"  # Label suffix of a group's parameters without weight decay.


def poly_schedule(base_lr: float, decay_steps: int, power: float) -> optax.Schedule:
    """lr_i = base_lr * (1 - i / decay_steps) ** power, i = 0, 1, ... (0 after decay_steps)."""
    return optax.polynomial_schedule(base_lr, 0.0, power, decay_steps)


def warmup_poly_schedule(
    base_lr: float, decay_steps: int, power: float, warmup_steps: int, warmup_ratio: float
) -> optax.Schedule:
    """mmcv's PolyLrUpdaterHook with linear warm-up: the poly value of step i times
    1 - (1 - i / warmup_steps) (1 - warmup_ratio) for i < warmup_steps (the warm-up multiplies
    the already decayed rate; step 0 runs at warmup_ratio x base_lr), then the poly value."""
    poly = poly_schedule(base_lr, decay_steps, power)

    def learning_rate(count):
        count = jnp.asarray(count, jnp.float32)
        # = 1 - (1 - i / w)(1 - ratio), written without float32 cancellation near i = 0.
        factor = warmup_ratio + (1.0 - warmup_ratio) * count / warmup_steps
        return poly(count) * jnp.where(count < warmup_steps, factor, 1.0)

    return learning_rate


def schedule(config: ml_collections.ConfigDict, block: str = "optimizer") -> optax.Schedule:
    """The base learning rate of config.<block> by optimizer step (groups: x multiplier):
    poly, with the block's linear warm-up when `warmup_steps` > 0."""
    opt = config[block]
    decay_steps = opt.decay_steps or config.total_steps
    if opt.get("warmup_steps", 0):
        return warmup_poly_schedule(
            opt.learning_rate,
            decay_steps,
            opt.poly_power,
            opt.warmup_steps,
            opt.get("warmup_ratio", 1e-6),
        )
    return poly_schedule(opt.learning_rate, decay_steps, opt.poly_power)


def path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in path)


def network_labels(
    module,
    params: Mapping,
    block: str,
    *,
    freeze_bn_affine: bool,
    freeze=(),
    train_only=(),
    split_biases: bool = False,
    no_decay=(),
) -> dict:
    """Labels '<block>/<group>' or 'frozen' for every parameter of one network; with
    `split_biases`, parameters named 'bias' get '<block>/<group>/bias' (their own lr factor
    and weight decay; without it the optimizer state keeps the one-label-per-group layout).

    Args:
      module / params: the network and its params (groups from `module.param_groups`).
      freeze: regexes over '/'-joined parameter paths (e.g. 'backbone/bn1/.*') never updated.
      train_only: if given, regexes of the only parameters updated (TENT: BN scale/offset).
      no_decay: regexes of parameters without weight decay ('<label>/nodecay').
    """
    groups = models.param_groups(module, params)
    frozen = [re.compile(p) for p in freeze]
    only = [re.compile(p) for p in train_only]
    undecayed = [re.compile(p) for p in no_decay]

    def label(path, _):
        names = path_names(path)
        joined = "/".join(names)
        if (
            (freeze_bn_affine and layers.is_batch_norm_param(names))
            or any(p.fullmatch(joined) for p in frozen)
            or (only and not any(p.fullmatch(joined) for p in only))
        ):
            return FROZEN
        suffix = f"/{BIAS}" if split_biases and names[-1] == "bias" else ""
        if any(p.fullmatch(joined) for p in undecayed):
            suffix += f"/{NO_DECAY}"
        return f"{block}/{groups[names[0]]}{suffix}"

    return jax.tree_util.tree_map_with_path(label, params)


def _group_transform(
    config: ml_collections.ConfigDict,
    block: str,
    group: str,
    constant: bool = False,
    bias: bool = False,
    no_decay: bool = False,
) -> optax.GradientTransformation:
    opt = config[block]
    multipliers = dict(opt.lr_multipliers)
    if group not in multipliers:
        raise ValueError(
            f"config.{block}.lr_multipliers has no entry for the parameter group {group!r} "
            f"(it has {sorted(multipliers)}); add one, e.g. {group}=1.0"
        )
    multiplier = multipliers[group] * (opt.get("bias_lr_multiplier", 1.0) if bias else 1.0)
    base = optax.constant_schedule(opt.learning_rate) if constant else schedule(config, block)
    learning_rate = lambda count: multiplier * base(count)  # noqa: E731
    weight_decay = opt.get("weight_decay", 0.0) * dict(opt.get("weight_decay_multipliers", {})).get(
        group, 1.0
    )
    if (bias and not opt.get("bias_weight_decay", True)) or no_decay:
        weight_decay = 0.0
    if opt.name == "sgd":
        update = optax.sgd(learning_rate, momentum=opt.momentum)
    elif opt.name == "adam":
        update = optax.adam(learning_rate, b1=opt.beta1, b2=opt.beta2)
    elif opt.name == "adamw":
        # PyTorch's AdamW: decoupled decay theta -= lr x wd x theta beside the Adam step.
        eps = opt.get("eps", 1e-8)
        b1, b2 = opt.beta1, opt.beta2
        return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    else:
        raise ValueError(f"config.{block}.name={opt.name!r}: use 'sgd', 'adam' or 'adamw'")
    if not weight_decay:
        return update
    return optax.chain(optax.add_decayed_weights(weight_decay), update)


def make_optimizer(
    config: ml_collections.ConfigDict, networks: Mapping, params: Mapping
) -> optax.GradientTransformation:
    """The optimizer of `params` ({network: params}, nested by '/') of the trained networks.

    Args:
      networks: {name: spec.Network} of the method.
      params: the (abstract) params pytree the optimizer will see.
    """
    labels, groups = {}, set()
    freeze_bn = layers.frozen_bn_affine(config.model.get("bn_mode", "train"))
    for name, network in networks.items():
        if network.is_teacher:
            continue
        opt = config[network.optimizer]
        tree = params
        for part in name.split("/"):
            tree = tree[part]
        labels[name] = network_labels(
            network.module,
            tree,
            network.optimizer,
            freeze_bn_affine=freeze_bn and network.optimizer == "optimizer",
            freeze=tuple(opt.get("freeze", ())),
            train_only=tuple(opt.get("train_only", ())),
            split_biases=opt.get("bias_lr_multiplier", 1.0) != 1.0
            or not opt.get("bias_weight_decay", True),
            no_decay=tuple(opt.get("no_weight_decay", ())),
        )
        if network.constant_lr:
            labels[name] = jax.tree.map(
                lambda x: x if x == FROZEN else f"{x}/{CONSTANT}", labels[name]
            )
        groups.update(x for x in jax.tree.leaves(labels[name]) if x != FROZEN)
    transforms = {FROZEN: optax.set_to_zero()}
    for label in sorted(groups):
        block, group, *flags = label.split("/")
        transforms[label] = _group_transform(
            config,
            block,
            group,
            constant=CONSTANT in flags,
            bias=BIAS in flags,
            no_decay=NO_DECAY in flags,
        )
    return optax.partition(transforms, state_lib.nest(labels))
