"""Per-network, partial initialisation: every method starts from the run its docs name
(`init_from` = a default source-only run), a part can be loaded by regex, a teacher copies,
and shape changes are refused naming the variables."""

import jax
import numpy as np
import pytest
from flax import traverse_util

from configs import adaptseg, advent, maxsquare, minent, tent
from jaxda import checkpoints
from jaxda import mesh as mesh_lib
from jaxda.train import trainer
from tests.conftest import tiny_config
from tests.train.test_adaptation_methods import _tiny


@pytest.fixture(scope="module")
def source_run(data_dir, tmp_path_factory):
    """A default source-only run (multi-level, like the documented init_from source)."""
    workdir = str(tmp_path_factory.mktemp("source_only"))
    config = tiny_config("source_only", data_dir=data_dir, total_steps=2)
    trainer.train_and_evaluate(config, workdir)
    variables, _ = checkpoints.read_model_tree(checkpoints.find_step_dir(workdir))
    return workdir, traverse_util.flatten_dict(variables, sep="/")


def _initial(config, workdir):
    setup = trainer.build(config, mesh_lib.make_mesh(1))
    fresh = jax.device_get(trainer.init_state(config, setup))
    state, meta = trainer._initial_state(config, setup, checkpoints.Checkpointer(workdir))
    return fresh, jax.device_get(state), meta


# Each method config whose docstring says to start from a source-only run.
DOCUMENTED = [
    (maxsquare, ""),  # Single-level: the source run's aux head is ignored.
    (maxsquare, "iw,multi"),
    (tent, ""),
    (tent, "norm"),
    (advent, ""),
    (adaptseg, ""),
    (minent, ""),
]


@pytest.mark.parametrize(("module", "arg"), DOCUMENTED, ids=lambda x: getattr(x, "__name__", x))
def test_each_method_starts_from_its_documented_source(module, arg, source_run, tmp_path):
    workdir, trained = source_run
    config = _tiny(module, arg)
    config.init_from = workdir
    _, state, meta = _initial(config, str(tmp_path / "run"))
    loaded = traverse_util.flatten_dict(state.variables("seg"), sep="/")
    for key, value in loaded.items():
        np.testing.assert_array_equal(value, trained[key], err_msg=key)
    assert ("params/head_aux/branch0/kernel" in loaded) == config.model.multi_level
    assert meta["init"]["seg"].endswith("checkpoints/2")


def test_partial_init_by_regex_and_teacher_copy(source_run, tmp_path):
    workdir, trained = source_run
    config = _tiny(maxsquare, "")
    config.init.seg = (workdir, "(params|batch_stats)/backbone/.*")
    fresh, state, _ = _initial(config, str(tmp_path / "run"))
    loaded = traverse_util.flatten_dict(state.variables("seg"), sep="/")
    initial = traverse_util.flatten_dict(fresh.variables("seg"), sep="/")
    for key, value in loaded.items():
        expected = trained[key] if key.split("/")[1] == "backbone" else initial[key]
        np.testing.assert_array_equal(value, expected, err_msg=key)


def test_shape_changes_are_refused_naming_variables_and_settings(source_run, tmp_path):
    workdir, _ = source_run
    config = _tiny(maxsquare, "")
    config.init_from = workdir
    config.model.aspp_dilations = (1, 2)  # Two ASPP branches where the checkpoint has four:
    config.model.num_aspp_branches = 2  # fine, the two are loaded and the others ignored.
    _initial(config, str(tmp_path / "fewer"))
    config.model.width = 8
    with pytest.raises(checkpoints.CheckpointMismatchError) as error:
        _initial(config, str(tmp_path / "wider"))
    message = str(error.value)
    assert "of another shape (params/backbone/" in message
    assert "width: checkpoint 4 vs config 8" in message
    config.model.width = 4
    config.init_from = ""
    config.init.seg = (workdir, "nothing/.*")
    with pytest.raises(checkpoints.CheckpointMismatchError, match="matches none"):
        _initial(config, str(tmp_path / "none"))
