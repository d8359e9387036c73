"""Registry of training methods: the step function and what each step consumes."""

import dataclasses
from collections.abc import Callable

from jaxda.train import adaptseg, source_only


@dataclasses.dataclass(frozen=True)
class Method:
    """A method's train step and the inputs it needs.

    Attributes:
      train_step: `(state, batch, *, model, discriminator, tx, config) -> (state, metrics)`.
      domains: the batch streams the step reads ('source', 'target').
      discriminator_heads: config -> heads that get an output-space discriminator.
    """

    train_step: Callable
    domains: tuple[str, ...]
    discriminator_heads: Callable = lambda config: ()


METHODS = {
    "source_only": Method(source_only.train_step, ("source",)),
    "adaptseg": Method(adaptseg.train_step, ("source", "target"), adaptseg.discriminator_heads),
}


def get(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r} (config.method); available: {sorted(METHODS)}")
    return METHODS[name]
