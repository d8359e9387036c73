"""`jaxda.interop.convert` and `launch.convert` on files in the released checkpoints' on-disk
formats (fabricated with torch.save, tiny networks)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxda import checkpoints, models
from jaxda import mesh as mesh_lib
from jaxda.interop import convert
from jaxda.train import trainer
from tests.conftest import tiny_config
from tests.interop import fakes

torch = pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tensors(sd: dict) -> dict:
    return {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}


def _restore(out, config):
    model = models.build_segmenter(config.model, config.num_classes)
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False)
    )
    variables, meta = checkpoints.restore_model_variables(
        checkpoints.find_step_dir(out), abstract, json.loads(config.model.to_json())
    )
    return jax.device_get(variables), meta


def _kernel(sd, key):
    return sd[key].transpose(2, 3, 1, 0)


def _student(rng, single_head=True):
    heads = fakes.head(rng, "layer5", 128) if single_head else {}
    return {**fakes.backbone(rng), **heads}


def _bare(sd):
    return _tensors(sd), sd


def _deeplab_init(r):
    head = fakes.head(r, "layer5", 128, classes=21)
    return _bare(fakes.prefixed({**fakes.backbone(r, tracked=False), **head}, "Scale."))


def _maxsquare_wrapped(r):
    sd = fakes.prefixed(fakes.multi_level(r, trained_branches=2), "module.")
    wrapped = {
        "epoch": 3,
        "iteration": 1000,
        "state_dict": _tensors(sd),
        "optimizer": {"state": {}, "param_groups": [{"lr": 2.5e-4}]},
        "best_MIou": 0.41,
    }
    return wrapped, sd


def _proda(r):
    sd = {
        **fakes.backbone(r),
        "layer5.conv2d_list.0.0.weight": np.zeros((256, 128, 1, 1), np.float32),
        "layer5.conv2d_list.0.1.weight": np.ones(256, np.float32),
        "layer5.head.1.weight": np.zeros((19, 256, 1, 1), np.float32),
    }
    resnet = {"model_state": _tensors(sd), "objective_vectors": torch.zeros(19, 256)}
    return {"ResNet101": resnet, "iter": 1000, "best_iou": 0.5}, sd


def _dasac(r):
    student = _student(r)
    sd = {
        **fakes.prefixed(student, "module.backbone.model."),
        **fakes.prefixed(student, "module.slow_net.model."),
        "module.running_conf": np.zeros(19, np.float32),
        "module.slow_init": np.zeros(1, np.float32),
    }
    return {"model": _tensors(sd), "opt": {}, "score": 0.4, "epoch": 136}, sd


def _torchvision(r):
    fc = {"fc.weight": np.zeros((1000, 128), np.float32), "fc.bias": np.zeros(1000, np.float32)}
    return _bare({**fakes.backbone(r), **fc})


# name: (file name, make(rng) -> (object to torch.save, flat NumPy state dict with the file's
# keys), config overrides, {file key: jaxda variable path holding it}, {report group: names})
CASES = {
    "deeplab_init_legacy": (
        "DeepLab_resnet_pretrained_init.pth",
        _deeplab_init,
        {},
        {
            "Scale.layer2.0.conv1.weight": ("params", "backbone", "layer2_0", "conv1", "kernel"),
            "Scale.bn1.running_mean": ("batch_stats", "backbone", "bn1", "mean"),
        },
        {
            "skipped": ["Scale.layer5.conv2d_list.0.weight"],
            "missing": ["params/head_main/branch0/kernel"],
        },
    ),
    "adaptseg_multi_bugged": (
        "GTA2Cityscapes_multi.pth",
        lambda r: _bare(fakes.multi_level(r, trained_branches=2)),
        {"model.num_aspp_branches": 2},
        {
            "layer6.conv2d_list.1.weight": ("params", "head_main", "branch1", "kernel"),
            "layer5.conv2d_list.0.bias": ("params", "head_aux", "branch0", "bias"),
            "layer1.0.downsample.1.weight": (
                "params",
                "backbone",
                "layer1_0",
                "bn_downsample",
                "scale",
            ),
        },
        {"skipped": ["layer6.conv2d_list.2.weight"], "ignored": ["bn1.num_batches_tracked"]},
    ),
    "maxsquare_wrapped": (
        "GTA5_source_best.pth",
        _maxsquare_wrapped,
        {"model.num_aspp_branches": 2},
        {"module.layer4.0.conv3.weight": ("params", "backbone", "layer4_0", "conv3", "kernel")},
        {"ignored": ["optimizer", "best_MIou", "epoch", "iteration"]},
    ),
    "maxsquare_bare": (
        "maxsquare_bare.pth",
        lambda r: _bare(fakes.prefixed(fakes.multi_level(r), "module.")),
        {},
        {"module.layer5.conv2d_list.3.weight": ("params", "head_aux", "branch3", "kernel")},
        {},
    ),
    "proda_pkl": (
        "from_gta5_to_cityscapes_on_deeplabv2_best_model.pkl",
        _proda,
        {},
        {"layer3.0.bn2.running_var": ("batch_stats", "backbone", "layer3_0", "bn2", "var")},
        {
            "skipped": ["layer5.head.1.weight", "layer5.conv2d_list.0.1.weight"],
            "ignored": ["ResNet101.objective_vectors", "iter", "best_iou"],
            "missing": ["params/head_main/branch0/kernel", "params/head_aux/branch3/bias"],
        },
    ),
    "dasac": (
        "final_e136.pth",
        _dasac,
        {},
        {
            "module.backbone.model.layer5.conv2d_list.2.weight": (
                "params",
                "head_main",
                "branch2",
                "kernel",
            )
        },
        {
            "ignored": ["module.slow_init", "module.slow_net.model.conv1.weight", "opt"],
            "missing": ["params/head_aux/branch0/kernel"],
        },
    ),
    "torchvision": (
        "resnet101-63fe2227.pth",
        _torchvision,
        {},
        {"layer2.0.conv2.weight": ("params", "backbone", "layer2_0", "conv2", "kernel")},
        {"ignored": ["fc.weight", "fc.bias"], "missing": ["params/head_main/branch3/bias"]},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_segmentation_files_convert_and_restore(case, tmp_path):
    filename, make, overrides, expected, checks = CASES[case]
    obj, sd = make(np.random.default_rng(0))
    path = str(tmp_path / filename)
    torch.save(obj, path)
    config = tiny_config(**overrides)
    out = str(tmp_path / "out")

    report = convert.convert_file(path, config, out)

    variables, meta = _restore(out, config)
    for key, variable in expected.items():
        value = sd[key].transpose(2, 3, 1, 0) if sd[key].ndim == 4 else sd[key]
        got = variables
        for part in variable:
            got = got[part]
        np.testing.assert_array_equal(got, value, err_msg=key)
    for group, names in checks.items():
        listed = getattr(report, group)
        for name in names:
            assert name in listed, (group, name)
    assert report.unexpected == []
    assert meta["step"] == 0 and meta["converted_from"] == path
    assert meta["model"] == json.loads(config.model.to_json())
    assert meta["report"]["layout"] == report.layout
    assert sorted(meta["report"]["missing"]) == sorted(report.missing)
    assert os.path.isdir(os.path.join(out, "checkpoints", "0", "model"))


@pytest.mark.parametrize("names", [fakes.DISC_MODULES, ("0", "2", "4", "6", "8")])
def test_discriminator_files(names, tmp_path):
    sd = fakes.discriminator(np.random.default_rng(0), names=names)
    path = str(tmp_path / "disc.pth")
    torch.save(_tensors(sd), path)
    config = tiny_config()
    report = convert.convert_file(path, config, str(tmp_path / "out"))
    assert report.layout == ("disc_adaptseg" if names[0] == "conv1" else "disc_advent")
    params, meta = convert.restore_discriminator(str(tmp_path / "out"), config)
    np.testing.assert_array_equal(params["conv2"]["kernel"], _kernel(sd, f"{names[1]}.weight"))
    np.testing.assert_array_equal(params["classifier"]["bias"], sd[f"{names[4]}.bias"])
    assert meta["layout"] == report.layout
    assert meta["discriminator"] == {"width": 4, "style": "adaptseg"}
    assert not os.path.exists(tmp_path / "out" / "checkpoints")


def test_errors_name_the_key_and_what_to_pass(tmp_path):
    path = str(tmp_path / "sixteen.pth")
    sd = fakes.multi_level(np.random.default_rng(0), classes=16)
    torch.save(_tensors(sd), path)
    config = tiny_config()
    with pytest.raises(convert.ConversionError, match=r"layer6\.conv2d_list\.0\.weight: file "):
        convert.convert_file(path, config, str(tmp_path / "a"))
    assert not os.path.exists(tmp_path / "a" / "checkpoints")
    report = convert.convert_file(path, config, str(tmp_path / "b"), skip_head=True)
    assert "params/head_main/branch0/kernel" in report.missing
    with pytest.raises(convert.ConversionError, match="already exists"):
        convert.convert_file(path, config, str(tmp_path / "b"), skip_head=True)


def test_trainer_init_from_accepts_the_converted_checkpoint(tmp_path):
    """A da-sac file (no aux head) into a multi-level config: the backbone and main head come
    from the file, the aux head is the one a fresh training run of the config draws."""
    student = _student(np.random.default_rng(0))
    path = str(tmp_path / "baseline_abn_e040.pth")
    torch.save({"model": _tensors(fakes.prefixed(student, "module.backbone.model."))}, path)
    out = str(tmp_path / "converted")
    config = tiny_config(init_from=out)
    convert.convert_file(path, config, out)

    mesh = mesh_lib.make_mesh(1)
    setup = trainer.build(config, mesh)
    fresh = jax.device_get(trainer.init_state(config, setup))
    state, _ = trainer._initial_state(
        config, setup, checkpoints.Checkpointer(str(tmp_path / "run"))
    )
    seg = jax.device_get(state.params["seg"])
    np.testing.assert_array_equal(
        seg["backbone"]["layer3_0"]["conv1"]["kernel"], _kernel(student, "layer3.0.conv1.weight")
    )
    np.testing.assert_array_equal(
        jax.device_get(state.batch_stats)["backbone"]["bn1"]["var"], student["bn1.running_var"]
    )
    np.testing.assert_array_equal(
        seg["head_main"]["branch0"]["kernel"], _kernel(student, "layer5.conv2d_list.0.weight")
    )
    for a, b in zip(
        jax.tree.leaves(seg["head_aux"]),
        jax.tree.leaves(fresh.params["seg"]["head_aux"]),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)

    # Training with the converted directory as the workdir is a clear error, not a crash.
    with pytest.raises(checkpoints.CheckpointMismatchError, match="init_from="):
        trainer._initial_state(config, setup, checkpoints.Checkpointer(out))


@pytest.mark.slow  # Subprocesses (~15 s); the converter itself is tested in-process above.
def test_command_line(tmp_path):
    sd = fakes.multi_level(np.random.default_rng(0), width=8)
    path = str(tmp_path / "advent.pth")
    torch.save(_tensors(sd), path)
    args = [
        sys.executable,
        "-m",
        "launch.convert",
        f"--from={path}",
        "--config=configs/adaptseg.py:synthetic",
        f"--out={tmp_path / 'out'}",
    ]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "layout: deeplab_multi" in result.stdout
    assert "loaded: 101 tensors (backbone 85, head_aux 8, head_main 8)" in result.stdout
    assert os.path.isdir(tmp_path / "out" / "checkpoints" / "0" / "model")

    args[-1] = f"--out={tmp_path / 'out2'}"
    result = subprocess.run(
        [*args, "--config.model.num_aspp_branches=2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "launch.convert: error: The checkpoint's heads look trained with 4" in result.stderr
    assert "Traceback" not in result.stderr


def test_converted_arrays_do_not_alias_the_torch_tensors():
    state_dict = _tensors(fakes.multi_level(np.random.default_rng(0)))
    variables, _ = convert.convert_segmenter(state_dict, tiny_config())
    before = variables["batch_stats"]["backbone"]["bn1"]["mean"].copy()
    state_dict["bn1.running_mean"] += 1.0  # As a BN forward in train mode does in place.
    np.testing.assert_array_equal(variables["batch_stats"]["backbone"]["bn1"]["mean"], before)
