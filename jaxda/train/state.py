"""The complete training state: everything a run needs to continue exactly where it stopped.

A method declares its networks by name (`methods.Network`): the trained ones ('seg', 'disc/main'
...) have parameters in `params`, which the optimizer updates; the others ('teacher', an EMA
copy, a frozen source model) keep their whole variables in `teachers`, which no optimizer
sees. Names with '/' nest ('disc/main' is params['disc']['main']). Per-method state
(prototypes, class priors, thresholds, running confusion) lives in `extra`. Checkpoints split
the state generically (`checkpoint_items`), so no field list has to be kept in sync by hand.
"""

import dataclasses

import flax
import jax
import optax
from flax import traverse_util

MODEL_ITEM = "model"  # The evaluated network's variables: what eval, predict and init read.
TRAIN_ITEM = "train"  # Everything else.


def _get(tree: dict, name: str):
    for part in name.split("/"):
        tree = tree[part]
    return tree


def _without(tree: dict, name: str) -> dict:
    """`tree` with the entry at the '/'-path `name` removed (copies along the path only)."""
    head, _, rest = name.partition("/")
    if not rest:
        return {k: v for k, v in tree.items() if k != head}
    return {**tree, head: _without(tree[head], rest)}


def _with(tree: dict, name: str, value) -> dict:
    head, _, rest = name.partition("/")
    return {**tree, head: value if not rest else _with(tree.get(head, {}), rest, value)}


def nest(flat: dict) -> dict:
    """{'seg': a, 'disc/main': b} -> {'seg': a, 'disc': {'main': b}}."""
    return traverse_util.unflatten_dict(flat, sep="/") if flat else {}


@flax.struct.dataclass
class TrainState:
    """One pytree, sharded and checkpointed whole.

    Attributes:
      step: int32 [] number of completed optimizer steps.
      params: {network: params} of the trained networks (nested by '/' in the name).
      model_state: {network: {collection: ...}} non-parameter variables of the trained
        networks (BatchNorm 'batch_stats').
      teachers: {network: variables} of networks no optimizer sees (EMA / teacher copies).
      extra: per-method state (any pytree of arrays).
      opt_state: optax state of the optimizer over `params`.
      rng: uint32 [2] raw PRNG key data (typed keys do not checkpoint), folded with the step.
    """

    step: jax.Array
    params: dict
    model_state: dict
    teachers: dict
    extra: dict
    opt_state: optax.OptState
    rng: jax.Array

    def variables(self, name: str = "seg") -> dict:
        """The variables of network `name`, as `module.apply` takes them."""
        if name in self.teachers:
            return self.teachers[name]
        try:
            collections = _get(self.model_state, name)
        except KeyError:
            collections = {}
        return {"params": _get(self.params, name), **collections}

    def model_variables(self, name: str = "seg") -> dict:
        return self.variables(name)

    @property
    def batch_stats(self) -> dict:
        """BatchNorm statistics of the segmentation network 'seg'."""
        return self.model_state.get("seg", {}).get("batch_stats", {})

    def with_variables(self, name: str, variables: dict, *, teacher: bool = False):
        """A copy with network `name`'s variables replaced; `teacher`: a network no optimizer
        sees (its variables go to `teachers`)."""
        if teacher:
            return self.replace(teachers={**self.teachers, name: variables})
        rest = {k: v for k, v in variables.items() if k != "params"}
        model_state = _with(self.model_state, name, rest) if rest else self.model_state
        return self.replace(
            params=_with(self.params, name, variables["params"]), model_state=model_state
        )

    def checkpoint_items(self, eval_network: str = "seg") -> dict:
        """{'model': variables of `eval_network`, 'train': every other field}.

        The 'model' item alone is what evaluation, prediction and initialisation read; the
        rest is split off field by field, whatever fields the state has.
        """
        train = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if eval_network in self.teachers:
            train["teachers"] = _without(self.teachers, eval_network)
        else:
            train["params"] = _without(self.params, eval_network)
            train["model_state"] = _without(self.model_state, eval_network)
        return {MODEL_ITEM: self.variables(eval_network), TRAIN_ITEM: train}

    @classmethod
    def from_checkpoint_items(cls, items: dict, eval_network: str = "seg", *, teacher=False):
        """Inverse of `checkpoint_items` (`teacher`: `eval_network` is in `teachers`)."""
        state = cls(**items[TRAIN_ITEM])
        return state.with_variables(eval_network, items[MODEL_ITEM], teacher=teacher)

    def step_key(self) -> jax.Array:
        """A typed PRNG key unique to this step."""
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)
