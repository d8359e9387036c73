"""Checkpoint discovery, damaged-checkpoint handling and partial reads, on small pytrees."""

import asyncio
import glob
import logging
import os
import shutil
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxda import checkpoints

MODEL_CONFIG = {"depth": 101, "width": 4}
STEPS = (2, 4, 6)


def _items(step: int) -> dict:
    """A training state of recognisable values; the kernel is random and big enough (4.6 KB)
    that orbax stores its data outside the ocdbt tree nodes, like real weights."""
    kernel = np.random.default_rng(step).normal(size=(3, 3, 8, 16)).astype(np.float32)
    return {
        "model": {
            "params": {
                "conv": {
                    "kernel": kernel,
                    "bias": np.arange(16, dtype=np.float32) + step,
                },
            },
            "batch_stats": {"bn": {"mean": jnp.full((16,), step / 2, jnp.bfloat16)}},
        },
        "train": {"step": np.asarray(step, np.int32), "mu": np.arange(6, dtype=np.float32) * step},
    }


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> str:
    """A workdir with committed steps 2, 4 and 6 (written once, copied by each test)."""
    workdir = str(tmp_path_factory.mktemp("pristine") / "run")
    checkpointer = checkpoints.Checkpointer(workdir, keep=len(STEPS))
    for step in STEPS:
        checkpointer.save(step, _items(step), {"model": MODEL_CONFIG, "data_position": step * 8})
    checkpointer.wait()
    checkpointer.close()
    return workdir


@pytest.fixture
def workdir(pristine, tmp_path) -> str:
    path = str(tmp_path / "run")
    shutil.copytree(pristine, path)
    return path


def _step_dir(workdir: str, step) -> str:
    return os.path.join(workdir, checkpoints.CHECKPOINT_SUBDIR, str(step))


def _truncate(workdir: str, step: int, items=("model", "train")) -> None:
    """Cuts every data file of `items` in half, as a full disk or an interrupted copy does."""
    for item in items:
        pattern = os.path.join(_step_dir(workdir, step), item, "**", "d", "*")
        files = glob.glob(pattern, recursive=True)
        assert files
        for f in files:
            os.truncate(f, os.path.getsize(f) // 2)


def _abstract_items() -> dict:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _items(0))


def _assert_tree_equal(actual, expected) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert a.dtype == e.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def _assert_short(error: Exception) -> None:
    message = str(error)
    assert len(message.splitlines()) <= 2
    assert "tensorstore_spec" not in message
    # No chained tensorstore traceback printed under it.
    assert error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__


def test_restore_latest_intact_falls_back_past_a_corrupted_step(workdir, caplog):
    _truncate(workdir, 6)
    checkpointer = checkpoints.Checkpointer(workdir, keep=len(STEPS))
    with caplog.at_level(logging.WARNING):
        step, items, meta = checkpointer.restore_latest_intact(_abstract_items(), MODEL_CONFIG)
    assert step == 4
    assert meta["step"] == 4 and meta["data_position"] == 32
    _assert_tree_equal(items, _items(4))
    warning = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "step 6: item 'model'" in warning
    assert "resuming from step 4" in warning
    # Moved out of orbax's view, so the resumed run can write step 6 again.
    assert os.path.isdir(_step_dir(workdir, "6.unreadable"))
    assert checkpointer.all_steps() == [2, 4]
    checkpointer.save(6, _items(60), {"model": MODEL_CONFIG})
    checkpointer.wait()
    assert checkpointer.all_steps() == [2, 4, 6]
    assert checkpoints.find_step_dir(workdir).name == "6"


def test_restore_latest_intact_raises_when_every_step_is_corrupted(workdir):
    for step in STEPS:
        _truncate(workdir, step, items=("train",))
    checkpointer = checkpoints.Checkpointer(workdir)
    with pytest.raises(checkpoints.CheckpointCorruptError) as info:
        checkpointer.restore_latest_intact(_abstract_items(), MODEL_CONFIG)
    message = str(info.value)
    assert "No checkpoint in" in message
    for step in STEPS:
        assert f"step {step}: item 'train', array " in message
    assert sorted(info.value.unreadable) == [_step_dir(workdir, s) for s in STEPS]
    assert isinstance(info.value, checkpoints.CheckpointMismatchError)
    _assert_short(info.value)
    assert checkpointer.all_steps() == list(STEPS)  # Nothing is moved when nothing is resumed.


def test_restore_latest_intact_without_checkpoints_returns_none(tmp_path):
    checkpointer = checkpoints.Checkpointer(str(tmp_path / "new"))
    assert checkpointer.restore_latest_intact(_abstract_items(), MODEL_CONFIG) is None


@pytest.mark.parametrize("item", ["model", "train", "meta"])
def test_restore_names_the_step_and_the_unreadable_item(workdir, item):
    if item == "meta":
        os.truncate(os.path.join(_step_dir(workdir, 6), "meta", "metadata"), 0)
    else:
        _truncate(workdir, 6, items=(item,))
    with pytest.raises(checkpoints.CheckpointCorruptError) as info:
        checkpoints.Checkpointer(workdir).restore(6, _abstract_items(), MODEL_CONFIG)
    assert str(info.value).startswith(
        f"Checkpoint step 6 in {os.path.join(workdir, 'checkpoints')} is unreadable: "
        f"item '{item}', "
    )
    _assert_short(info.value)


@pytest.mark.parametrize("reader", ["restore_model_variables", "read_model_tree"])
def test_unreadable_step_dir_error_lists_the_intact_steps(workdir, reader):
    _truncate(workdir, 6)
    _truncate(workdir, 2)
    step_dir = checkpoints.find_step_dir(workdir, 6)
    with pytest.raises(checkpoints.CheckpointCorruptError) as info:
        if reader == "restore_model_variables":
            abstract = _abstract_items()["model"]
            checkpoints.restore_model_variables(step_dir, abstract, MODEL_CONFIG)
        else:
            checkpoints.read_model_tree(step_dir)
    first, second = str(info.value).splitlines()
    assert first.startswith(f"Checkpoint {step_dir} is unreadable: item 'model', array ")
    # Step 2 is damaged too, so only step 4 is offered.
    assert second.startswith(f"Intact steps in {step_dir.parent}: [4];")
    assert "--config.eval.step=4" in second
    assert info.value.intact_steps == [4]
    _assert_short(info.value)


def test_a_mismatch_is_not_reported_as_corruption(workdir):
    abstract = _abstract_items()["model"]
    abstract["params"]["head"] = jax.ShapeDtypeStruct((3,), jnp.float32)
    with pytest.raises(ValueError, match=r"(?i)structure") as info:
        checkpoints.restore_model_variables(
            checkpoints.find_step_dir(workdir), abstract, MODEL_CONFIG
        )
    assert not isinstance(info.value, checkpoints.CheckpointCorruptError)


def test_uncommitted_steps_are_never_chosen(workdir):
    root = os.path.join(workdir, checkpoints.CHECKPOINT_SUBDIR)
    # An orbax temporary directory, caught after it wrote its commit file but before the rename.
    tmp = os.path.join(root, "8.orbax-checkpoint-tmp-1767225600000000")
    shutil.copytree(_step_dir(workdir, 6), tmp)
    # A numbered directory orbax never finished (it writes in place on GCS and FUSE mounts).
    shutil.copytree(_step_dir(workdir, 6), _step_dir(workdir, 10))
    os.remove(os.path.join(_step_dir(workdir, 10), "commit_success.txt"))

    assert checkpoints.committed_steps(root) == list(STEPS)
    assert checkpoints.find_step_dir(workdir).name == "6"
    assert checkpoints.find_step_dir(root).name == "6"
    with pytest.raises(FileNotFoundError, match=r"available: \[2, 4, 6\] \(ignored as unfinished"):
        checkpoints.find_step_dir(workdir, 10)
    with pytest.raises(FileNotFoundError, match="unfinished orbax save"):
        checkpoints.find_step_dir(tmp)
    checkpointer = checkpoints.Checkpointer(workdir, keep=len(STEPS))
    assert checkpointer.all_steps() == list(STEPS)
    assert checkpointer.latest_step() == 6
    step, _, _ = checkpointer.restore_latest_intact(_abstract_items(), MODEL_CONFIG)
    assert step == 6


def test_only_uncommitted_steps_is_no_checkpoint(tmp_path):
    root = tmp_path / "run" / checkpoints.CHECKPOINT_SUBDIR
    (root / "3.orbax-checkpoint-tmp-5").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"ignored as unfinished or unreadable: 3\.orbax"):
        checkpoints.find_step_dir(str(tmp_path / "run"))


def test_read_model_tree_returns_the_stored_arrays_exactly(workdir):
    variables, meta = checkpoints.read_model_tree(checkpoints.find_step_dir(workdir, 4))
    _assert_tree_equal(variables, _items(4)["model"])
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(variables))
    assert meta["step"] == 4 and meta["model"] == MODEL_CONFIG


def test_step_dir_and_network_only_checkpoint_are_found(workdir, tmp_path):
    step_dir = checkpoints.find_step_dir(_step_dir(workdir, 4))
    assert str(step_dir) == _step_dir(workdir, 4)
    # The layout jaxda.interop.convert writes: one step holding only 'model' and 'meta'.
    out = str(tmp_path / "converted")
    checkpointer = checkpoints.Checkpointer(out, keep=1)
    checkpointer.save(0, {"model": _items(9)["model"]}, {"model": MODEL_CONFIG})
    checkpointer.wait()
    checkpointer.close()
    step_dir = checkpoints.find_step_dir(out)
    assert step_dir.name == "0"
    variables, meta = checkpoints.restore_model_variables(
        step_dir, _abstract_items()["model"], MODEL_CONFIG
    )
    _assert_tree_equal(variables, _items(9)["model"])
    assert meta["step"] == 0


def _unraisable(exc: BaseException):
    return types.SimpleNamespace(
        exc_type=type(exc),
        exc_value=exc,
        exc_traceback=exc.__traceback__,
        err_msg=None,
        object=None,
    )


def test_only_orbax_orphan_read_reports_are_silenced(workdir, monkeypatch, caplog):
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    _truncate(workdir, 6)
    with pytest.raises(checkpoints.CheckpointCorruptError):
        checkpoints.read_model_tree(checkpoints.find_step_dir(workdir, 6))
    # What a read left running by the failed restore reports: its loop is closed by then.
    loop = asyncio.new_event_loop()
    loop.close()
    with pytest.raises(RuntimeError, match="Event loop is closed") as orphan:
        loop.call_soon_threadsafe(print)
    sys.unraisablehook(_unraisable(orphan.value))
    assert not [u for u in reported if "Event loop is closed" in str(u.exc_value)]
    try:
        raise RuntimeError("Event loop is closed")  # Same words, another origin: still shown.
    except RuntimeError as e:
        other = e
    sys.unraisablehook(_unraisable(other))
    assert reported[-1].exc_value is other
    # The same reads can also surface as asyncio errors nobody retrieved.
    asyncio_logger = logging.getLogger("asyncio")
    for exc in (ValueError('DATA_LOSS: Error reading "params.w/.zarray"'), ValueError("other")):
        asyncio_logger.error(
            "Task exception was never retrieved\nfuture: <Task>", exc_info=(ValueError, exc, None)
        )
    assert [r.exc_info[1].args[0] for r in caplog.records if r.name == "asyncio"] == ["other"]


def test_model_check_ignores_compute_settings_but_names_architecture_changes():
    """conv_impl, dtype, remat, block_barrier and bn_mode change how the same parameters are
    computed or trained: a checkpoint restores under other values, or from before the keys
    existed. An architecture key is refused, named."""
    saved = {"name": "deeplab_v2", "depth": 101, "bn_mode": "batch_stats"}
    config = {**saved, "conv_impl": "fast", "dtype": "bfloat16", "remat": True}
    checkpoints.check_model_meta({"model": saved}, {**config, "block_barrier": "on"}, "W")
    with pytest.raises(checkpoints.CheckpointMismatchError, match="depth: checkpoint 101 vs"):
        checkpoints.check_model_meta({"model": saved}, {**config, "depth": 50}, "W")
