"""Every config and variant builds; bad arguments and missing data give actionable errors."""

import subprocess
import sys

import pytest

from configs import adaptseg, advent, common, maxsquare, minent, oracle, source_only, tent
from jaxda import mesh as mesh_lib
from jaxda.data import sources
from jaxda.train import adversarial as adversarial_lib
from jaxda.train import trainer

VARIANTS = {
    source_only: ["", "synthetic", "source=synthia", "synthetic,model=mit"],
    oracle: ["", "synthetic"],
    adaptseg: [
        "", "synthetic", "single", "ls", "single,ls", "synthetic,single,ls", "source=synthia",
        "source=synthia,single",
    ],
    advent: ["", "synthetic", "source=synthia"],
    minent: ["", "synthetic"],
    maxsquare: ["", "iw", "multi", "iw,multi", "synthetic", "synthetic,iw,multi"],
    tent: ["", "norm", "episodic", "synthetic", "synthetic,norm"],
}  # fmt: skip


@pytest.mark.parametrize(("module", "arg"), [(m, a) for m, args in VARIANTS.items() for a in args])
def test_config_builds(module, arg):
    config = module.get_config(arg)
    setup = trainer.build(config, mesh_lib.make_mesh(1))
    if module is tent:  # Test-time adaptation on the evaluation split.
        assert setup.method.test_time
        # The official Adam settings, whatever the data variant sets for training configs.
        assert (config.optimizer.name, config.optimizer.learning_rate) == ("adam", 1e-3)
        assert config.optimizer.freeze == ((".*",) if "norm" in arg else ())
        assert ("source" in setup.abstract_state.teachers) == ("episodic" in arg)
        return
    adversarial = module in (adaptseg, advent)
    heads = adversarial_lib.discriminator_heads(config) if adversarial else ()
    assert set(setup.abstract_state.params.get("disc", {})) == set(heads)
    if "single" in arg:
        assert heads == ("main",) and "head_aux" not in setup.abstract_state.params["seg"]


def test_published_adaptseg_values():
    config = adaptseg.get_config()
    assert config.adversarial.lambda_adv.to_dict() == {"main": 0.001, "aux": 0.0002}
    assert (config.optimizer.learning_rate, config.disc_optimizer.learning_rate) == (2.5e-4, 1e-4)
    assert (config.total_steps, config.optimizer.decay_steps) == (150_000, 250_000)
    assert config.data.source.size == (720, 1280) and config.data.eval.size == (512, 1024)
    assert config.data.eval.label_size is None  # Original (2048x1024) labels.
    assert oracle.get_config().data.source.split == "train"
    assert oracle.get_config().data.source.name == "cityscapes_fine"
    synthia = adaptseg.get_config("source=synthia")
    assert synthia.data.source.name == "synthia_rand_cityscapes"
    assert synthia.num_classes == 19 and len(synthia.eval.classes) == 16
    assert set(synthia.eval.class_subsets) == {"16", "13", "19"}


def test_unknown_config_argument():
    with pytest.raises(ValueError, match="Unknown config argument 'synthtic'"):
        adaptseg.get_config("synthtic")
    with pytest.raises(ValueError, match="needs a value"):
        common.parse_arg("seed", seed=1)
    with pytest.raises(ValueError, match="Unknown source='cityscapes'"):
        source_only.get_config("source=cityscapes")
    with pytest.raises(ValueError, match="exclude each other"):
        adaptseg.get_config("synthetic,source=synthia")


def test_missing_dataset_error_says_what_to_do(tmp_path):
    with pytest.raises(sources.DatasetNotPreparedError, match=r"gta5.*:synthetic"):
        sources.SplitReader("gta5", "train", str(tmp_path))


@pytest.mark.parametrize("module", [source_only, adaptseg, oracle])
def test_published_configs_stop_at_once_without_data(module, tmp_path):
    config = module.get_config()
    config.data.data_dir = str(tmp_path / "empty")
    config.num_devices = 1
    with pytest.raises(sources.DatasetNotPreparedError, match=r"needs no download"):
        trainer.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_command_line_key_is_an_error(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.main",
            "--config=configs/adaptseg.py:synthetic",
            f"--workdir={tmp_path}",
            "--config.adversarial.lamda_adv=1",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "lamda_adv" in result.stderr


@pytest.mark.parametrize(
    ("module", "arg"),
    [
        # All in the slow run (10 s each): the DeepLabV3+ model tests and its converter tests
        # cover the network in the default run.
        pytest.param(adaptseg, "", marks=pytest.mark.slow),
        pytest.param(advent, "", marks=pytest.mark.slow),
        pytest.param(source_only, "", marks=pytest.mark.slow),
        pytest.param(oracle, "", marks=pytest.mark.slow),
        pytest.param(minent, "", marks=pytest.mark.slow),
        pytest.param(maxsquare, "iw,multi", marks=pytest.mark.slow),
        pytest.param(tent, "", marks=pytest.mark.slow),
    ],
    ids=lambda x: getattr(x, "__name__", x),
)
def test_every_method_trains_on_deeplabv3plus(module, arg):
    """model=deeplabv3plus: the method's step runs on DeepLabV3+ (a tiny one) and its losses
    are finite; the discriminators see the same head outputs as on DeepLabV2."""
    import jax
    import numpy as np

    config = module.get_config(",".join(filter(None, ["synthetic", arg, "model=deeplabv3plus"])))
    config.num_devices, config.batch_size = 1, 2
    config.model.width, config.model.head_width = 4, 16
    mesh = mesh_lib.make_mesh(1)
    setup = trainer.build(config, mesh)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 64, 64, 3)).astype(np.float32) * 50
    labels = rng.integers(0, 19, size=(2, 64, 64)).astype(np.uint8)
    domain = {"image": images, "label": labels}
    batch = {"source": domain, "target": domain, "eval": {**domain, "valid": np.ones(2, bool)}}
    batch = {d: batch[d] for d in (("eval",) if setup.method.test_time else setup.method.domains)}
    state = trainer.init_state(config, setup)
    state, metrics = trainer.jit_train_step(config, setup)(state, mesh_lib.to_global(batch, mesh))
    metrics = jax.device_get(metrics)
    assert int(state.step) == 1 and all(np.isfinite(v).all() for v in metrics.values())
    if module in (adaptseg, advent):
        assert {"loss_adv_main", "loss_adv_aux"} <= set(metrics)


@pytest.mark.parametrize("arg", ["", "synthetic", "source=synthia"])
def test_dasac_stage_configs(arg, tmp_path):
    """configs/dasac.py: ABN, the importance-weights pass, SAC; each training stage builds
    (SAC with the momentum network and its state); `:stage=sac` with a top-level init_from
    starts SAC from that run instead of the workdir's abn stage."""
    from configs import dasac
    from jaxda.train import stages

    config = dasac.get_config(arg)
    assert config.stage_order == ("abn", "is_weights", "sac")
    workdir = str(tmp_path)
    abn = stages.stage_config(config, "abn", workdir)
    assert abn.method == "dasac_abn" and abn.model.bn_mode == "train"
    setup = trainer.build(abn, mesh_lib.make_mesh(1))
    assert set(setup.abstract_state.params["seg"]) == {"backbone", "head_main"}
    sac = stages.stage_config(config, "sac", workdir)
    assert sac.model.bn_mode == "frozen_stats" and sac.init.seg == f"{workdir}/abn"
    assert sac.data.target.importance.weights == f"{workdir}/is_weights"
    assert sac.data.target.group.size == 4 and sac.data.target.batch_size == 2
    setup = trainer.build(sac, mesh_lib.make_mesh(1))
    assert set(setup.abstract_state.teachers) == {"slow"}
    assert set(setup.abstract_state.extra) == {"class_prior", "teacher_ready"}
    if arg == "source=synthia":
        assert sac.data.target.importance.uniform_classes == (9, 14, 16)
    alone = dasac.get_config(",".join(filter(None, [arg, "stage=sac"])))
    alone.init_from = "/runs/abn"
    sac = stages.stage_config(alone, "sac", workdir)
    assert sac.init_from == "/runs/abn" and "seg" not in sac.init


@pytest.mark.parametrize(
    "name",
    ["adaptseg", "advent", "minent", "maxsquare", "source_only", "oracle", "tent", "proda",
     "dasac", "robustnet"],
)  # fmt: skip
def test_folders_variant_reads_the_folder_datasets(name, tmp_path):
    """`:folders` of every method: the folder datasets at FOLDER_SIZE, the class set from the
    datasets, no published-dataset leftovers; an unprepared one names the prepare command."""
    import importlib

    from jaxda.data import classes

    module = importlib.import_module(f"configs.{name}")
    config = module.get_config("folders")
    source = ("folder/target", "train") if name == "oracle" else common.FOLDER_STREAMS["source"]
    assert (config.data.source.name, config.data.source.split) == source
    assert (config.data.eval.name, config.data.eval.split) == common.FOLDER_STREAMS["eval"]
    assert config.data.source.size == config.data.eval.size == common.FOLDER_SIZE
    assert config.data.source.random_scale and not config.data.source.subset
    assert config.num_classes == 0 and config.eval.classes == () and not config.eval.datasets
    config.data.data_dir = str(tmp_path)
    with pytest.raises(sources.DatasetNotPreparedError, match="--dataset=folder --name="):
        classes.resolve(config)
    with pytest.raises(ValueError, match="`folders` excludes"):
        module.get_config("folders,synthetic")
