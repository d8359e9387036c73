"""Orbax checkpoints of the whole training state, behind one small class.

A checkpoint step directory holds three items: 'model' (the segmentation network's params and
BN statistics: all that evaluation, prediction and `init_from` need), 'train' (everything
else: discriminators, optimizer states, step, PRNG key) and 'meta' (JSON: step, input-pipeline
positions, the model config it was written for). Orbax writes each step into a temporary
directory and renames it when complete, so a killed run never leaves a half-written checkpoint
that looks valid.
"""

import os

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

CHECKPOINT_SUBDIR = "checkpoints"
# Model settings that change how a network trains, not what its parameters mean.
TRAINING_ONLY_MODEL_KEYS = frozenset({"bn_mode"})


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model or state the config describes."""


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def check_model_meta(meta: dict, model_config: dict, where: str) -> None:
    """Raises CheckpointMismatchError naming the model settings that differ."""
    saved = meta.get("model")
    if saved is None:
        return
    differ = {
        k: (saved.get(k), model_config.get(k))
        for k in sorted((set(saved) | set(model_config)) - TRAINING_ONLY_MODEL_KEYS)
        if saved.get(k) != model_config.get(k)
    }
    if differ:
        details = ", ".join(
            f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in differ.items()
        )
        raise CheckpointMismatchError(
            f"The checkpoint in {where} was written for another model ({details}). "
            "Use the config it was trained with, or another workdir."
        )


class Checkpointer:
    """Saves and restores {'model': pytree, 'train': pytree} under `workdir/checkpoints/<step>/`."""

    def __init__(self, workdir: str, *, keep: int = 2):
        self.directory = epath.Path(workdir) / CHECKPOINT_SUBDIR
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(keep),
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, items: dict, meta: dict) -> None:
        """Starts an asynchronous save at `step` (see `wait`).

        Args:
          items: {'model': segmentation variables, 'train': the rest of the training state}.
          meta: JSON-able facts about the run (pipeline positions, model config).
        """
        args = ocp.args.Composite(
            **{name: ocp.args.StandardSave(tree) for name, tree in items.items()},
            meta=ocp.args.JsonSave({**meta, "step": int(step)}),
        )
        self._manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_items: dict, model_config: dict) -> tuple[dict, dict]:
        """(items, meta) at `step`, placed as the shapes/shardings of `abstract_items` say."""
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = meta["meta"]
        step_dir = self.directory / str(step)
        check_model_meta(meta, model_config, str(step_dir))
        missing = [name for name in abstract_items if not (step_dir / name).exists()]
        if missing:
            raise CheckpointMismatchError(
                f"The checkpoint in {step_dir} has no {missing} item: it holds only a network "
                "(e.g. written by launch.convert), not a training state to resume. Start a "
                "run from it with --config.init_from=" + str(self.directory.parent) + " and a "
                "new --workdir, or evaluate it with --mode=eval."
            )
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    name: ocp.args.StandardRestore(_abstract(tree))
                    for name, tree in abstract_items.items()
                }
            ),
        )
        return {name: restored[name] for name in abstract_items}, meta

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def find_step_dir(path: str, step: int | None = None) -> epath.Path:
    """Resolves a workdir, a checkpoints directory or a step directory to one step directory.

    Args:
      path: workdir (holding 'checkpoints/'), the checkpoints directory, or one step directory.
      step: the step to use; the latest when None.
    """
    path = epath.Path(os.path.expanduser(str(path)))
    if (path / "model").exists():
        return path
    root = path / CHECKPOINT_SUBDIR if (path / CHECKPOINT_SUBDIR).exists() else path
    steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []
    if not steps:
        raise FileNotFoundError(
            f"No checkpoint found in {path} (looked for step directories in {root}). "
            "Pass a workdir of a finished or running training, or a checkpoint step directory."
        )
    if step is None:
        return root / str(steps[-1])
    if step not in steps:
        raise FileNotFoundError(f"No checkpoint for step {step} in {root}; available: {steps}")
    return root / str(step)


def restore_model_variables(step_dir: epath.Path, abstract_variables: dict, model_config: dict):
    """(variables, meta) of the segmentation network stored in one step directory."""
    meta = {}
    if (step_dir / "meta").exists():
        with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as json_checkpointer:
            meta = json_checkpointer.restore(step_dir / "meta")
    check_model_meta(meta, model_config, str(step_dir))
    with ocp.StandardCheckpointer() as ckptr:
        variables = ckptr.restore(step_dir / "model", _abstract(abstract_variables))
    logging.info("Restored model variables from %s", step_dir)
    return variables, meta
