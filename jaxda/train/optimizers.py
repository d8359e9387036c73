"""Optimizers of the DeepLabV2-era methods, as one optax transformation over all parameters.

Segmentation network: SGD (momentum 0.9, weight decay 5e-4) with a poly schedule; the heads
learn 10x faster; frozen BN affine parameters get no update and no weight decay (PyTorch
leaves them out of the optimizer). Discriminators: Adam with the same poly decay.
"""

import re
from collections.abc import Callable, Sequence

import jax
import ml_collections
import optax

from jaxda.models import layers


def poly_schedule(base_lr: float, decay_steps: int, power: float) -> optax.Schedule:
    """lr_i = base_lr * (1 - i / decay_steps) ** power, i = 0, 1, ... (0 after decay_steps)."""
    return optax.polynomial_schedule(base_lr, 0.0, power, decay_steps)


def _path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in path)


def param_labels(freeze_bn_affine: bool, freeze: Sequence[str] = ()) -> Callable[[dict], dict]:
    """Labels each parameter 'backbone', 'head', 'frozen' or 'disc' (optax.partition).

    Heads are the top-level modules of the segmentation network whose name starts with 'head'.
    `freeze` holds regular expressions matched against the '/'-joined path of a segmentation
    parameter (e.g. 'backbone/bn1/.*': MaxSquare freezes only the stem BN).
    """
    patterns = [re.compile(p) for p in freeze]

    def label(path, _):
        names = _path_names(path)
        if names[0] == "disc":
            return "disc"
        seg_path = names[1:]
        joined = "/".join(seg_path)
        if (freeze_bn_affine and layers.is_batch_norm_param(seg_path)) or any(
            p.fullmatch(joined) for p in patterns
        ):
            return "frozen"
        return "head" if seg_path[0].startswith("head") else "backbone"

    return lambda params: jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The optimizer for TrainState.params from `config.optimizer` and `config.disc_optimizer`."""
    opt = config.optimizer
    seg_schedule = segmentation_schedule(config)

    def sgd(multiplier: float) -> optax.GradientTransformation:
        return optax.chain(
            optax.add_decayed_weights(opt.weight_decay),
            optax.sgd(lambda count: multiplier * seg_schedule(count), momentum=opt.momentum),
        )

    dopt = config.disc_optimizer
    disc_schedule = poly_schedule(
        dopt.learning_rate, dopt.decay_steps or config.total_steps, dopt.poly_power
    )
    transforms = {
        "backbone": sgd(1.0),
        "head": sgd(opt.head_lr_multiplier),
        "frozen": optax.set_to_zero(),
        "disc": optax.adam(disc_schedule, b1=dopt.beta1, b2=dopt.beta2),
    }
    freeze = config.model.bn_mode in ("batch_stats", "frozen")
    return optax.partition(transforms, param_labels(freeze, opt.freeze))


def segmentation_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """The backbone learning rate by optimizer step (heads: x `head_lr_multiplier`)."""
    opt = config.optimizer
    return poly_schedule(opt.learning_rate, opt.decay_steps or config.total_steps, opt.poly_power)
