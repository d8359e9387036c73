"""Registry of training methods: the step function and what each step consumes."""

import dataclasses
from collections.abc import Callable

from jaxda.train import adversarial, source_only, target_loss, tent


@dataclasses.dataclass(frozen=True)
class Method:
    """A method's train step and the inputs it needs.

    Attributes:
      train_step: `(state, batch, *, model, discriminator, tx, config) -> (state, metrics)`.
      domains: the batch streams the step reads ('source', 'target').
      discriminator_heads: config -> heads that get an output-space discriminator.
      run: for methods with a loop of their own (test-time adaptation), `(config, workdir)
        -> summary`, called instead of the training loop.
    """

    train_step: Callable | None
    domains: tuple[str, ...]
    discriminator_heads: Callable = lambda config: ()
    run: Callable | None = None


_BOTH = ("source", "target")
METHODS = {
    "source_only": Method(source_only.train_step, ("source",)),
    "adaptseg": Method(
        adversarial.make_train_step("softmax"), _BOTH, adversarial.discriminator_heads
    ),
    "advent": Method(
        adversarial.make_train_step("self_information"), _BOTH, adversarial.discriminator_heads
    ),
    "minent": Method(target_loss.make_train_step(target_loss.minent_loss), _BOTH),
    "maxsquare": Method(target_loss.make_train_step(target_loss.maxsquare_loss), _BOTH),
    "tent": Method(None, (), run=tent.adapt_and_evaluate),
    "bn_adapt": Method(None, (), run=tent.adapt_and_evaluate),
}


def get(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r} (config.method); available: {sorted(METHODS)}")
    return METHODS[name]
