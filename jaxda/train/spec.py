"""What a method declares: its networks, its train step, its streams and its extra state.

The trainer (`trainer.py`) is generic over these declarations: adding a method that needs a
teacher, discriminators or per-method state touches no trainer code.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import ml_collections

from jaxda import models


@dataclasses.dataclass(frozen=True)
class Network:
    """One network of a method.

    Attributes:
      module: the Flax module.
      input_channels: channels of the dummy input `module.init` traces (3 for images,
        num_classes for output-space discriminators).
      optimizer: the config block that trains it ('optimizer', 'disc_optimizer', ...); None
        for a teacher: checkpointed and restored like the rest, never seen by the optimizer.
      init: default initialisation when `config.init.<name>` is unset: '' (random), or
        'copy:NAME' (the variables of another network, after that one is initialised).
      constant_lr: the block's base learning rate without its poly decay (only for
        replicating Adversarial_DA_Exp's undecayed second discriminator).
    """

    module: Any
    input_channels: int = 3
    optimizer: str | None = "optimizer"
    init: str = ""
    constant_lr: bool = False

    @property
    def is_teacher(self) -> bool:
        return self.optimizer is None


def segmenter(config: ml_collections.ConfigDict, **overrides) -> Network:
    """The segmentation network of config.model, trained by config.optimizer."""
    module = models.build_segmenter(config.model, config.num_classes)
    return Network(module.clone(**overrides) if overrides else module)


def teacher_of(config: ml_collections.ConfigDict, name: str = "seg") -> Network:
    """A teacher with the segmentation network's architecture, initialised as a copy of
    `name` (its updates are the method's: EMA, periodic copies, or none)."""
    module = models.build_segmenter(config.model, config.num_classes)
    return Network(module, optimizer=None, init=f"copy:{name}")


def discriminators(config: ml_collections.ConfigDict, heads) -> dict[str, Network]:
    """{'disc/<head>': output-space discriminator on num_classes maps} for each head."""
    module = models.build_discriminator(config.discriminator, config.model)
    return {f"disc/{head}": Network(module, config.num_classes, "disc_optimizer") for head in heads}


def segmenter_only(config: ml_collections.ConfigDict) -> dict[str, Network]:
    return {"seg": segmenter(config)}


def no_extra(config: ml_collections.ConfigDict) -> dict:
    del config
    return {}


@dataclasses.dataclass(frozen=True)
class Method:
    """A method's train step and everything the generic trainer needs to run it.

    Attributes:
      train_step: `(state, batch, *, networks, tx, config) -> (state, metrics)`; `networks` is
        {name: module}; the batch is {domain: {'image', 'label', 'index', ...}}.
      domains: the config.data streams the step reads ('source', 'target').
      networks: config -> {name: Network}; 'seg' is the segmentation network.
      init_extra: config -> the initial per-method state (a pytree of arrays) in state.extra.
      eval_network: the network that evaluation, prediction and `init_from` use (and the
        checkpoint's 'model' item holds): the student 'seg', or a teacher.
      test_time: adapt on the evaluation split itself: one ordered pass over config.data.eval,
        a step per batch (batches carry 'valid' [b] masks for the padding); the results are
        `online_results(state, config) -> {'confusion': [C, C]}` scored like an evaluation.
      after_step: `(state, step, *, config, modules, mesh) -> None | (state, scalars)`, called
        after every step: a returned state (e.g. ISW's mask, computed by a pass over the
        data at one step) replaces the old one, its scalars are logged and a checkpoint of
        that step is written at once, so a resumed run never repeats the work.
    """

    train_step: Callable
    domains: tuple[str, ...] = ("source",)
    networks: Callable[[ml_collections.ConfigDict], dict[str, Network]] = segmenter_only
    init_extra: Callable[[ml_collections.ConfigDict], dict] = no_extra
    eval_network: str = "seg"
    test_time: bool = False
    online_results: Callable | None = None
    after_step: Callable | None = None
