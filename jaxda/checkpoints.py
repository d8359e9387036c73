"""Orbax checkpoints of the whole training state, behind one small class.

A checkpoint step directory holds three items: 'model' (the segmentation network's params and
BN statistics: all that evaluation, prediction and `init_from` need), 'train' (everything
else: discriminators, optimizer states, step, PRNG key) and 'meta' (JSON: step, input-pipeline
positions, the model config it was written for). Orbax writes each step into a temporary
directory and renames it when complete, so a killed run never leaves a half-written checkpoint
that looks valid; only steps orbax committed are ever listed or restored here. A committed step
whose files were damaged later (a full disk, a bad copy) raises CheckpointCorruptError, and
`Checkpointer.restore_latest_intact` resumes from the newest step that still reads back.
"""

import contextlib
import json
import logging as std_logging
import os
import re
import sys
import traceback

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

CHECKPOINT_SUBDIR = "checkpoints"
# Model settings that change how a network trains or computes, not what its parameters mean:
# a checkpoint written under one setting (or before the key existed) restores under another.
TRAINING_ONLY_MODEL_KEYS = frozenset({"bn_mode", "conv_impl", "dtype", "remat", "block_barrier"})
# Orbax finishes every step by writing 'commit_success.txt' into it: before the atomic rename on
# local disks, as the only commit signal where it writes in place (GCS, FUSE mounts). Its
# default discovery on local disks accepts any numbered directory; requiring the file as well
# makes a directory that orbax never finished invisible on every filesystem.
_STEP_NAME_FORMAT = ocp.path.step.standard_name_format(
    temporary_path_cls=ocp.path.atomicity.CommitFileTemporaryPath
)
# Tensorstore errors start with an absl status code; these ones say nothing about the files.
_TRANSIENT_STATUS = frozenset(
    {"ABORTED", "CANCELLED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "UNAVAILABLE"}
)
_STATUS = re.compile(r"([A-Z][A-Z_]+): (.*)", re.DOTALL)
_UNREADABLE_SUFFIX = ".unreadable"


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model or state the config describes."""


class CheckpointCorruptError(CheckpointMismatchError):
    """A committed checkpoint whose files cannot be read back (truncated, damaged, missing).

    A CheckpointMismatchError, so a caller reporting unusable checkpoints catches both.

    Attributes:
      unreadable: {step directory: why it cannot be read}.
      intact_steps: steps of the same checkpoints directory that do read back (when known).
    """

    def __init__(self, message: str, unreadable: dict[str, str], intact_steps=()):
        super().__init__(message)
        self.unreadable = dict(unreadable)
        self.intact_steps = list(intact_steps)


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _causes(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _relative_paths(text: str, step_dir: epath.Path) -> str:
    return text.replace(str(step_dir).rstrip("/") + "/", "")


def _unreadable_reason(exc: BaseException, step_dir: epath.Path) -> str | None:
    """One line on why files under `step_dir` could not be read; None if `exc` is another error
    (a tree or shape mismatch, a bug), which the caller re-raises unchanged."""
    for e in _causes(exc):
        if isinstance(e, json.JSONDecodeError):
            return f"a metadata file is not valid JSON ({e.msg} at character {e.pos})"
        if isinstance(e, UnicodeDecodeError):
            return "a metadata file is not text"
        if isinstance(e, OSError):
            where = f" ({_relative_paths(str(e.filename), step_dir)})" if e.filename else ""
            return f"{e.strerror or e}{where}"
        if isinstance(e, ValueError) and (match := _STATUS.fullmatch(str(e))):
            code, text = match.groups()
            if code in _TRANSIENT_STATUS:
                return None
            text = _relative_paths(text.split(" [tensorstore_spec", 1)[0], step_dir)
            array = re.search(r'Error reading "([^"/]+)/', text)
            files = [f for f in re.findall(r'local file "([^"]+)"', text) if not f.endswith("/")]
            where = [f"array {array[1]}"] if array else []
            where += [f"file {files[-1]}"] if files else []
            detail = text.rsplit(": ", 1)[-1]
            detail = detail if len(detail) <= 160 else detail[:157] + "..."
            return f"{', '.join(where) or 'tensorstore'}: {code}: {detail}"
    return None


def _is_orphan_read_report(unraisable) -> bool:
    if not (
        isinstance(unraisable.exc_value, RuntimeError)
        and str(unraisable.exc_value) == "Event loop is closed"
    ):
        return False
    frames = traceback.extract_tb(unraisable.exc_traceback)
    return any(frame.name == "call_soon_threadsafe" for frame in frames)


class _OrphanReadFilter(std_logging.Filter):
    """Drops asyncio's 'Task/Future exception was never retrieved' for failed tensorstore
    reads."""

    # Held by the instance: tasks can be collected at exit, after module globals are cleared.
    status = _STATUS

    def filter(self, record) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (
            str(record.msg).partition("\n")[0].endswith("exception was never retrieved")
            and isinstance(exc, ValueError)
            and self.status.fullmatch(str(exc)) is not None
        )


def _drop_orphan_read_reports() -> None:
    """Keeps a failed restore from printing one traceback per array (installed once).

    Orbax reads all arrays at once and gives up at the first failure; the other reads then
    report from tensorstore threads into its closed event loop (unraisable errors) or as
    never-retrieved asyncio task errors: hundreds of tracebacks for a real network, some
    before the failure even reaches the caller, all repeating what CheckpointCorruptError
    says. Only those two kinds of report are dropped.
    """
    asyncio_logger = std_logging.getLogger("asyncio")
    if not any(isinstance(f, _OrphanReadFilter) for f in asyncio_logger.filters):
        asyncio_logger.addFilter(_OrphanReadFilter())
    previous = sys.unraisablehook
    if getattr(previous, "drops_orphan_read_reports", False):
        return

    def hook(unraisable):
        if not _is_orphan_read_report(unraisable):
            previous(unraisable)

    hook.drops_orphan_read_reports = True
    sys.unraisablehook = hook


@contextlib.contextmanager
def _reading(step_dir: epath.Path, item: str, error):
    """Turns a failed read of `item` into `error(reason)` (a CheckpointCorruptError), without
    the tensorstore traceback; other exceptions pass through."""
    _drop_orphan_read_reports()
    try:
        yield
    except Exception as e:
        reason = _unreadable_reason(e, step_dir)
        if reason is None:
            raise
        raise error(f"item '{item}', {reason.rstrip('.')}") from None


def model_meta(model_config) -> dict:
    """`config.model` as the JSON dict stored in meta['model'] and compared on restore."""
    if hasattr(model_config, "to_json"):
        return json.loads(model_config.to_json())
    return json.loads(json.dumps(dict(model_config)))


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


def committed_steps(directory) -> list[int]:
    """Steps in a checkpoints directory that orbax finished saving, ascending.

    Orbax's own discovery: a temporary '<step>.orbax-checkpoint-tmp-<time>' directory or a
    numbered directory without orbax's commit marker is never listed.
    """
    directory = epath.Path(os.path.expanduser(str(directory)))
    if not directory.is_dir():
        return []
    return sorted(metadata.step for metadata in _STEP_NAME_FORMAT.find_all(directory))


class Checkpointer:
    """Saves and restores {'model': pytree, 'train': pytree} under `workdir/checkpoints/<step>/`."""

    def __init__(self, workdir: str, *, keep: int = 2):
        self.directory = epath.Path(workdir) / CHECKPOINT_SUBDIR
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(keep),
            cleanup_tmp_directories=True,
            create=True,
            step_name_format=_STEP_NAME_FORMAT,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest committed step; None when there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Committed steps, ascending."""
        return sorted(self._manager.all_steps())

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

    def _read(self, step: int, name: str, args):
        step_dir = self.directory / str(step)

        def error(reason):
            return CheckpointCorruptError(
                f"Checkpoint step {step} in {self.directory} is unreadable: {reason}.",
                {str(step_dir): reason},
            )

        # One item per call, so a failure names the item even when orbax's message does not.
        with _reading(step_dir, name, error):
            return self._manager.restore(step, args=ocp.args.Composite(**{name: args}))[name]

    def restore(self, step: int, abstract_items: dict, model_config: dict) -> tuple[dict, dict]:
        """(items, meta) at `step`, placed as the shapes/shardings of `abstract_items` say.

        Raises CheckpointCorruptError when the step's files cannot be read back.
        """
        meta = self._read(step, "meta", ocp.args.JsonRestore())
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
        items = {
            name: self._read(step, name, ocp.args.StandardRestore(_abstract(tree)))
            for name, tree in abstract_items.items()
        }
        return items, meta

    def restore_latest_intact(
        self, abstract_items: dict, model_config: dict
    ) -> tuple[int, dict, dict] | None:
        """(step, items, meta) of the newest committed step that reads back; None without steps.

        Unreadable newer steps are moved aside to '<step>.unreadable' (a name orbax ignores), so
        the resumed run can save those steps again; a warning names them and the step resumed
        from. Raises CheckpointCorruptError when no step reads back, CheckpointMismatchError
        when the newest readable one does not fit `model_config` or `abstract_items`.
        """
        unreadable = {}
        for step in reversed(self.all_steps()):
            try:
                items, meta = self.restore(step, abstract_items, model_config)
            except CheckpointCorruptError as e:
                unreadable[step] = next(iter(e.unreadable.values()))
                continue
            if unreadable:
                moved = self._set_aside(list(unreadable))
                logging.warning(
                    "Unreadable checkpoint step(s) in %s: %s. Moved aside to %s; resuming from "
                    "step %d, the newest intact one.",
                    self.directory,
                    "; ".join(f"step {s}: {reason}" for s, reason in unreadable.items()),
                    ", ".join(moved),
                    step,
                )
            return step, items, meta
        if not unreadable:
            return None
        raise CheckpointCorruptError(
            f"No checkpoint in {self.directory} can be read back: "
            + "; ".join(f"step {s}: {reason}" for s, reason in unreadable.items())
            + ". Delete those step directories to start the run afresh, or use a new --workdir.",
            {str(self.directory / str(s)): reason for s, reason in unreadable.items()},
        )

    def _set_aside(self, steps: list[int]) -> list[str]:
        """Renames step directories out of orbax's view; returns their new names."""
        key = "_".join(map(str, steps))
        # Every host picks the new names before process 0 renames (and so changes) anything.
        ocp.utils.sync_global_processes(f"jaxda_set_aside_names_{key}")
        names = []
        for step in steps:
            target = self.directory / f"{step}{_UNREADABLE_SUFFIX}"
            n = 1
            while target.exists():
                target = self.directory / f"{step}{_UNREADABLE_SUFFIX}{n}"
                n += 1
            if jax.process_index() == 0:
                (self.directory / str(step)).rename(target)
            names.append(target.name)
        # Other hosts must not list the steps again before the rename.
        ocp.utils.sync_global_processes(f"jaxda_set_aside_{key}")
        self._manager.reload()
        return names

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def _uncommitted_names(root: epath.Path, committed: list[int]) -> list[str]:
    """Names of step-like directories in `root` that orbax did not commit."""
    if not root.is_dir():
        return []
    return sorted(
        p.name
        for p in root.iterdir()
        if p.name[:1].isdigit() and p.is_dir() and p.name not in map(str, committed)
    )


def find_step_dir(path: str, step: int | None = None) -> epath.Path:
    """Resolves a workdir, a checkpoints directory or a step directory to one step directory.

    Only steps that orbax committed count; an unfinished save is never picked.

    Args:
      path: workdir (holding 'checkpoints/'), the checkpoints directory, or one step directory.
      step: the step to use; the latest committed one when None.
    """
    path = epath.Path(os.path.expanduser(str(path)))
    if ocp.path.atomicity.TMP_DIR_SUFFIX in path.name:
        raise FileNotFoundError(
            f"{path} is an unfinished orbax save, not a checkpoint. Pass its workdir instead."
        )
    if (path / "model").exists():
        return path
    root = path / CHECKPOINT_SUBDIR if (path / CHECKPOINT_SUBDIR).exists() else path
    steps = committed_steps(root)
    unfinished = _uncommitted_names(root, steps)
    note = f" (ignored as unfinished or unreadable: {', '.join(unfinished)})" if unfinished else ""
    if not steps:
        raise FileNotFoundError(
            f"No checkpoint found in {path} (looked for step directories in {root}{note}). "
            "Pass a workdir of a finished or running training, or a checkpoint step directory."
        )
    if step is None:
        return root / str(steps[-1])
    if step not in steps:
        raise FileNotFoundError(
            f"No checkpoint for step {step} in {root}; available: {steps}{note}"
        )
    return root / str(step)


def _read_meta(step_dir: epath.Path, error) -> dict:
    if not (step_dir / "meta").exists():
        return {}
    with _reading(step_dir, "meta", error), ocp.Checkpointer(ocp.JsonCheckpointHandler()) as c:
        return c.restore(step_dir / "meta")


def _read_tree(item_dir: epath.Path) -> dict:
    """An item's pytree as stored, as numpy arrays on the host whatever devices wrote it."""
    handler = ocp.PyTreeCheckpointHandler()
    try:
        stored = handler.metadata(item_dir).tree
        restore_args = jax.tree.map(
            lambda m: ocp.RestoreArgs(
                restore_type=np.ndarray if isinstance(m, ocp.metadata.ArrayMetadata) else None
            ),
            stored,
        )
        return handler.restore(item_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    finally:
        handler.close()


def _intact_steps(step_dir: epath.Path) -> list[int]:
    """Committed steps next to `step_dir` (not itself) whose 'model' item reads back."""
    intact = []
    for step in committed_steps(step_dir.parent):
        other = step_dir.parent / str(step)
        if other.name == step_dir.name or not (other / "model").exists():
            continue
        try:
            _read_tree(other / "model")
        except Exception:  # Whatever the cause, that step is no alternative to offer.
            continue
        intact.append(step)
    return intact


def _model_error(step_dir: epath.Path):
    """Builds the error for an unreadable 'model' or 'meta' of a step directory given directly,
    naming the steps beside it that the user can pass instead."""

    def error(reason):
        intact = _intact_steps(step_dir)
        if intact:
            instead = (
                f"Intact steps in {step_dir.parent}: {intact}; pass one of them instead "
                f"(e.g. --config.eval.step={intact[-1]} or {step_dir.parent / str(intact[-1])})."
            )
        else:
            instead = f"No other step in {step_dir.parent} reads back."
        return CheckpointCorruptError(
            f"Checkpoint {step_dir} is unreadable: {reason}.\n{instead}",
            {str(step_dir): reason},
            intact,
        )

    return error


def restore_model_variables(step_dir: epath.Path, abstract_variables: dict, model_config: dict):
    """(variables, meta) of the segmentation network stored in one step directory.

    Raises CheckpointCorruptError naming the step directory and the intact steps beside it
    when its files cannot be read back.
    """
    step_dir = epath.Path(step_dir)
    error = _model_error(step_dir)
    meta = _read_meta(step_dir, error)
    check_model_meta(meta, model_config, str(step_dir))
    with _reading(step_dir, "model", error), ocp.StandardCheckpointer() as ckptr:
        variables = ckptr.restore(step_dir / "model", _abstract(abstract_variables))
    logging.info("Restored model variables from %s", step_dir)
    return variables, meta


def read_model_tree(step_dir) -> tuple[dict, dict]:
    """(variables, meta) of one step directory exactly as stored, without a target tree.

    Variables are nested dicts of numpy arrays on the host (e.g. {'params': {...},
    'batch_stats': {...}}), whatever devices wrote them: for callers that take a part (only
    the backbone, a checkpoint with an extra head) and compare shapes themselves. The model
    config is not checked; meta['model'] holds the one it was written for. Raises
    CheckpointCorruptError as `restore_model_variables`.
    """
    step_dir = epath.Path(os.path.expanduser(str(step_dir)))
    if not (step_dir / "model").exists():
        raise FileNotFoundError(f"{step_dir} holds no 'model' item; see find_step_dir.")
    error = _model_error(step_dir)
    meta = _read_meta(step_dir, error)
    with _reading(step_dir, "model", error):
        variables = _read_tree(step_dir / "model")
    return variables, meta
