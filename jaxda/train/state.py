"""The complete training state: everything a run needs to continue exactly where it stopped."""

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """One pytree, checkpointed whole.

    Attributes:
      step: int32 [] number of completed optimizer steps.
      params: {'seg': segmentation params, 'disc': {head name: discriminator params}}.
      batch_stats: BatchNorm running statistics of the segmentation network.
      opt_state: optax state of `optimizers.make_optimizer` (all parameter groups).
      rng: uint32 [2] raw PRNG key data (typed keys do not checkpoint), folded with the step.
    """

    step: jax.Array
    params: dict
    batch_stats: dict
    opt_state: optax.OptState
    rng: jax.Array

    def model_variables(self) -> dict:
        """The segmentation network's variables, as `model.apply` takes them."""
        return {"params": self.params["seg"], "batch_stats": self.batch_stats}

    def checkpoint_items(self) -> dict:
        """{'model': variables for inference/init, 'train': the rest} (see jaxda.checkpoints)."""
        train = {
            "step": self.step,
            "disc": self.params["disc"],
            "opt_state": self.opt_state,
            "rng": self.rng,
        }
        return {"model": self.model_variables(), "train": train}

    @classmethod
    def from_checkpoint_items(cls, items: dict) -> "TrainState":
        model, train = items["model"], items["train"]
        return cls(
            step=train["step"],
            params={"seg": model["params"], "disc": train["disc"]},
            batch_stats=model.get("batch_stats", {}),
            opt_state=train["opt_state"],
            rng=train["rng"],
        )

    def step_key(self) -> jax.Array:
        """A typed PRNG key unique to this step."""
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)


def create(
    rng: jax.Array,
    *,
    model,
    discriminator,
    discriminator_heads: tuple[str, ...],
    num_classes: int,
    tx: optax.GradientTransformation,
    init_size: tuple[int, int] = (64, 64),
) -> TrainState:
    """Initialises every network and optimizer state from one typed key.

    Args:
      rng: typed PRNG key (`jax.random.key(seed)`).
      model: the segmentation network.
      discriminator: the discriminator module (one instance per head in `discriminator_heads`).
      discriminator_heads: model heads that get an output-space discriminator, e.g. ('main',).
      num_classes: channels of the discriminator input.
      init_size: (height, width) of the dummy input; parameter shapes do not depend on it.
    """
    model_key, disc_key, loop_key = jax.random.split(rng, 3)
    dummy = jnp.zeros((1, *init_size, 3), jnp.float32)
    variables = model.init(model_key, dummy, train=False)
    disc_params = {}
    for i, head in enumerate(discriminator_heads):
        disc_input = jnp.zeros((1, *init_size, num_classes), jnp.float32)
        disc_params[head] = discriminator.init(jax.random.fold_in(disc_key, i), disc_input)[
            "params"
        ]
    params = {"seg": variables["params"], "disc": disc_params}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        rng=jax.random.key_data(loop_key),
    )
