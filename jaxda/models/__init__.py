"""Model registry: networks are built from their config block, and declare their parameter
groups (for learning-rate / weight-decay multipliers) themselves.

A model class registered here implements `from_config(model_config, num_classes)` and has a
`param_groups` class attribute {top-level submodule name: group name}; the optimizer refuses
parameters of a submodule that is not listed, so a new head or decoder can never silently
train at the backbone's learning rate.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections

from jaxda.models import (
    deeplab_v2,
    deeplab_v3plus,
    discriminators,
    hrda,
    layers,
    proda,
    segformer,
)

SEGMENTERS = {
    "deeplab_v2": deeplab_v2.DeepLabV2,
    "deeplabv3plus": deeplab_v3plus.DeepLabV3Plus,
    "proda_deeplab_v2": proda.ProDADeepLabV2,
    "segformer": segformer.SegFormer,  # MiT encoder, config.model.decoder 'daformer' | 'mlp'.
    "hrda": hrda.HRDA,  # SegFormer's keys (decoder 'daformer') + HRDA's (`HRDA.from_config`).
}
DISCRIMINATORS = {"fc": discriminators.FCDiscriminator}
# Spatial size of the dummy input that initialisation traces; parameter shapes do not depend
# on it (the discriminator needs at least 32 px).
INIT_SIZE = (64, 64)


def _lookup(registry: Mapping, name: str, key: str):
    if name not in registry:
        raise ValueError(f"Unknown model name {name!r} ({key}); available: {sorted(registry)}")
    return registry[name]


def build_segmenter(model_config: ml_collections.ConfigDict, num_classes: int):
    """The segmentation network named by `model_config.name`, built from that block."""
    cls = _lookup(SEGMENTERS, model_config.name, "config.model.name")
    return cls.from_config(model_config, num_classes)


def build_discriminator(
    disc_config: ml_collections.ConfigDict,
    model_config: ml_collections.ConfigDict | None = None,
):
    """The output-space discriminator of `config.discriminator` (name 'fc' by default).

    Its convolutions run as `model_config`'s (config.model.conv_impl and dtype: one switch for
    every network of a run); XLA's own in float32 without one.
    """
    cls = _lookup(DISCRIMINATORS, disc_config.get("name", "fc"), "config.discriminator.name")
    convolution = layers.Convolution.from_config(model_config or {})
    return cls.from_config(disc_config, convolution)


def param_groups(module, params: Mapping) -> dict:
    """{top-level name: group} for every top-level entry of `params` of `module`.

    Raises:
      ValueError: naming the submodules that `module.param_groups` does not assign.
    """
    declared = getattr(type(module), "param_groups", None)
    if declared is None:
        raise ValueError(f"{type(module).__name__} declares no `param_groups`")
    missing = sorted(set(params) - set(declared))
    if missing:
        raise ValueError(
            f"{type(module).__name__}.param_groups assigns no group to {missing}: add them "
            "(e.g. 'head' for a new decoder), so that their learning rate is a choice, not a "
            "default"
        )
    return {name: declared[name] for name in params}


def abstract_variables(module, input_channels: int = 3) -> dict:
    """ShapeDtypeStructs of `module.init` on a [1, *INIT_SIZE, input_channels] input."""
    dummy = jnp.zeros((1, *INIT_SIZE, input_channels), jnp.float32)
    return jax.eval_shape(lambda: module.init(jax.random.key(0), dummy))


def network_keys(rng: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(segmentation network key, other networks' key, training-loop key) of a run's seed key.

    The other randomly initialised networks (discriminators, ...) fold the second key with
    their position among them. A converted checkpoint fills what its file lacks from the same
    keys, so it matches what a training run of the config would have drawn.
    """
    seg_key, other_key, loop_key = jax.random.split(rng, 3)
    return seg_key, other_key, loop_key
