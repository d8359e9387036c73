"""ProDA checkpoints (whole network, `bn_pretrain`, prototypes) and the SimCLR initialisation
through `jaxda.interop`: fabricated tiny state dicts, NumPy-only where possible; the `.pkl`
round trip and the parity against the PyTorch transcription (`torch_reference_proda`) need
torch and skip without it."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from jaxda import models
from jaxda.interop import convert, layouts, torch_layouts
from jaxda.interop.layouts import ConversionError
from jaxda.models import proda
from tests.conftest import tiny_config
from tests.interop import fakes
from tests.models import test_proda as test_proda_model

STAGE_SIZES, WIDTH, HEAD_WIDTH, NUM_CLASSES = (1, 1, 1, 1), 4, 64, 19


def _rng(seed=0):
    return np.random.default_rng(seed)


def _config(bn_clr=False, width=WIDTH, **model):
    config = tiny_config()
    config.model = ml_collections.ConfigDict(
        {
            "name": "proda_deeplab_v2",
            "depth": 101,
            "stage_sizes": STAGE_SIZES,
            "width": width,
            "head_width": HEAD_WIDTH,
            "bn_clr": bn_clr,
            "dropout": True,
            **model,
        }
    )
    return config


@functools.cache
def _target(bn_clr=False):
    model = proda.ProDADeepLabV2(
        num_classes=NUM_CLASSES,
        stage_sizes=STAGE_SIZES,
        width=WIDTH,
        head_width=HEAD_WIDTH,
        bn_clr=bn_clr,
    )
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))


def _proda_sd(bn_clr=False, seed=0):
    return fakes.proda(_rng(seed), STAGE_SIZES, WIDTH, NUM_CLASSES, HEAD_WIDTH, bn_clr=bn_clr)


# --- NumPy only.


@pytest.mark.parametrize("bn_clr", [False, True], ids=["plain", "bn_clr"])
def test_proda_layout_loads_the_whole_network(bn_clr):
    sd = _proda_sd(bn_clr)
    loaded, report = torch_layouts.map_state_dict(
        sd, _target(bn_clr), container="proda", container_entries=("iter",)
    )
    assert report.layout == "proda"
    assert report.missing == [] and report.unexpected == [] and report.skipped == {}
    assert set(report.ignored) == {"iter"} | {k for k in sd if k.endswith("num_batches_tracked")}
    flat = {"/".join(p): v for p, v in loaded.items()}
    expected = {
        "params/head/branch0/kernel": sd["layer5.conv2d_list.0.0.weight"].transpose(2, 3, 1, 0),
        "params/head/branch3/bias": sd["layer5.conv2d_list.3.0.bias"],
        "params/head/branch2_gn/scale": sd["layer5.conv2d_list.2.1.weight"],
        "params/head/branch4_gn/bias": sd["layer5.conv2d_list.4.1.bias"],
        "params/head/se_fc1/kernel": sd["layer5.bottleneck.0.se.0.weight"].T,
        "params/head/se_fc2/kernel": sd["layer5.bottleneck.0.se.2.weight"].T,
        "params/head/se_fc2/bias": sd["layer5.bottleneck.0.se.2.bias"],
        "params/head/fuse/kernel": sd["layer5.bottleneck.1.weight"].transpose(2, 3, 1, 0),
        "params/head/fuse_gn/scale": sd["layer5.bottleneck.2.weight"],
        "params/head/classifier/kernel": sd["layer5.head.1.weight"].transpose(2, 3, 1, 0),
        "batch_stats/backbone/layer4_0/bn_downsample/var": sd["layer4.0.downsample.1.running_var"],
    }
    if bn_clr:
        expected["params/bn_pretrain/scale"] = sd["bn_pretrain.weight"]
        expected["batch_stats/bn_pretrain/mean"] = sd["bn_pretrain.running_mean"]
    for path, value in expected.items():
        np.testing.assert_array_equal(flat[path], value, err_msg=path)
    assert "bn_pretrain" in report.format() or not bn_clr
    assert "head" in report.format().split("loaded:")[1].split("\n")[0]


def test_proda_layout_into_deeplab_v2_still_loads_the_backbone_only():
    deeplab = models.abstract_variables(models.build_segmenter(tiny_config().model, NUM_CLASSES), 3)
    sd = _proda_sd(bn_clr=True)
    _, report = torch_layouts.map_state_dict(sd, deeplab, container="proda")
    assert all(k.startswith("layer5.") for k in report.skipped)
    assert len(report.skipped) == sum(k.startswith("layer5.") for k in sd)
    assert "bn_pretrain.weight" in report.ignored
    assert all(p.startswith("params/head_") for p in report.missing)


@pytest.mark.parametrize("file_bn_clr", [False, True])
def test_bn_clr_mismatch_names_the_flag(file_bn_clr):
    sd = _proda_sd(bn_clr=file_bn_clr)
    flag = f"pass --config.model.bn_clr={file_bn_clr}"
    with pytest.raises(ConversionError, match=flag):
        torch_layouts.map_state_dict(sd, _target(not file_bn_clr), container="proda")
    obj = {"ResNet101": {"model_state": sd, "objective_vectors": np.zeros((19, HEAD_WIDTH))}}
    with pytest.raises(ConversionError, match=flag):  # Before the network is initialised.
        convert.convert_segmenter(obj, _config(bn_clr=not file_bn_clr))


def test_proda_head_shape_mismatch_and_skip_head():
    sd = fakes.proda(_rng(), STAGE_SIZES, WIDTH, 16, HEAD_WIDTH)
    with pytest.raises(ConversionError, match=r"layer5\.head\.1\.weight: file \(16, 64, 1, 1\)"):
        torch_layouts.map_state_dict(sd, _target(), "proda")
    _, report = torch_layouts.map_state_dict(sd, _target(), "proda", skip_head=True)
    assert report.missing and all(p.startswith("params/head/") for p in report.missing)
    assert report.skipped["layer5.bottleneck.0.se.0.weight"].startswith("--skip_head")


def test_a_proda_file_for_deeplabv3plus_says_what_to_pass():
    with pytest.raises(ConversionError, match="proda_deeplab_v2"):
        layouts.check_model("proda", "deeplabv3plus")
    layouts.check_model("proda", "deeplab_v2")
    layouts.check_model("proda", "proda_deeplab_v2")


def _simclr_files(rng):
    """ProDA's {'state_dict': torchvision names} and SimCLRv2-Pytorch's {'resnet', 'head'}."""
    backbone = fakes.backbone(rng, STAGE_SIZES, WIDTH)
    fc = {"fc.weight": rng.normal(size=(1000, WIDTH * 32)), "fc.bias": np.zeros(1000)}
    torchvision_sd = {**backbone, **fc}
    separius = fakes.simclrv2_pytorch(torchvision_sd)
    head = {"layers.0.weight": np.zeros((4, 4), np.float32)}
    return backbone, {"state_dict": torchvision_sd}, {"resnet": separius, "head": head}


@pytest.mark.parametrize("bn_clr", [False, True], ids=["plain", "bn_clr"])
@pytest.mark.parametrize(
    "form, layout, expected_layout",
    [
        ("proda_state_dict", None, "torchvision"),
        ("proda_state_dict", "simclr", "simclr"),
        ("simclrv2_pytorch", None, "simclr"),
    ],
)
def test_simclr_loads_the_backbone_and_keeps_the_head_at_init(
    form, layout, expected_layout, bn_clr
):
    backbone, proda_file, separius_file = _simclr_files(_rng())
    obj = proda_file if form == "proda_state_dict" else separius_file
    config = _config(bn_clr=bn_clr)
    variables, report = convert.convert_segmenter(obj, config, layout=layout)
    assert report.layout == expected_layout and report.unexpected == []
    assert set(report.loaded.values()) == {
        "/".join(p)
        for p in traverse_util.flatten_dict(convert.init_segmenter(config))
        if p[1] == "backbone"
    }
    assert len(report.loaded) == sum(not k.endswith("num_batches_tracked") for k in backbone)
    assert {p.split("/")[1] for p in report.missing} == {"head"} | (
        {"bn_pretrain"} if bn_clr else set()
    )
    assert {k for k in report.ignored if k.endswith(("fc.weight", "fc.bias"))}
    np.testing.assert_array_equal(
        variables["params"]["backbone"]["layer3_0"]["conv2"]["kernel"],
        backbone["layer3.0.conv2.weight"].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        variables["batch_stats"]["backbone"]["layer2_0"]["bn_downsample"]["mean"],
        backbone["layer2.0.downsample.1.running_mean"],
    )
    initial = convert.init_segmenter(config)
    for name in ("head", "bn_pretrain") if bn_clr else ("head",):
        for a, b in zip(
            jax.tree.leaves(variables["params"][name]),
            jax.tree.leaves(initial["params"][name]),
            strict=True,
        ):
            np.testing.assert_array_equal(a, b)
    text = report.format()
    assert "loaded: " in text and "backbone" in text and "ProDA head is not in the file" in text
    if bn_clr:
        assert "bn_pretrain is not in the file" in text


def test_simclr_selective_kernel_is_refused():
    sd = {"net.0.0.weight": np.zeros((32, 3, 3, 3)), "net.1.blocks.0.net.2.mixing_conv.0.weight": 0}
    with pytest.raises(ConversionError, match="selective-kernel"):
        torch_layouts.map_state_dict(sd, _target(), "simclr")


# --- With torch: the `.pkl` round trip and the parity test.


def _torch():
    return pytest.importorskip("torch")


def _tensors(sd):
    torch = _torch()
    return {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}


@pytest.mark.parametrize("bn_clr", [False, True], ids=["warmup", "stage3_bn_clr"])
def test_proda_pkl_converts_whole_and_writes_prototypes(bn_clr, tmp_path):
    torch = _torch()
    sd = _proda_sd(bn_clr)
    prototypes = _rng(1).normal(size=(NUM_CLASSES, HEAD_WIDTH)).astype(np.float32)
    disc = {"conv1.weight": torch.zeros(4, NUM_CLASSES, 4, 4)}
    obj = {
        "ResNet101": {
            "model_state": _tensors(sd),
            "objective_vectors": torch.from_numpy(prototypes),
        },
        "FCDiscriminator": {"model_state": disc, "objective_vectors": torch.zeros(1)},
        "iter": 2000,
        "best_iou": 0.45,
    }
    path = str(tmp_path / "from_gta5_to_cityscapes_on_deeplab101_best_model_warmup.pkl")
    torch.save(obj, path)
    out = tmp_path / "out"
    config = _config(bn_clr=bn_clr)

    report = convert.convert_file(path, config, str(out))

    assert report.layout == "proda" and report.container == "proda"
    assert report.missing == [] and report.unexpected == [] and report.skipped == {}
    assert (
        "FCDiscriminator" in report.ignored and "discriminator" in report.ignored["FCDiscriminator"]
    )
    assert "ResNet101.objective_vectors" not in report.ignored
    written = np.load(out / convert.PROTOTYPES_FILE)
    assert written.dtype == np.float32
    np.testing.assert_array_equal(written, prototypes)
    assert report.prototypes == str(out / convert.PROTOTYPES_FILE)
    assert f"written to {out / convert.PROTOTYPES_FILE}" in report.format()
    assert os.path.isdir(out / "checkpoints" / "0" / "model")


def test_proda_pkl_into_deeplab_v2_writes_no_prototypes(tmp_path):
    torch = _torch()
    obj = {
        "ResNet101": {"model_state": _tensors(_proda_sd()), "objective_vectors": torch.ones(19, 64)}
    }
    path = str(tmp_path / "proda.pkl")
    torch.save(obj, path)
    report = convert.convert_file(path, tiny_config(), str(tmp_path / "out"))
    assert report.prototypes == ""
    assert "not written" in report.ignored["ResNet101.objective_vectors"]
    assert not os.path.exists(tmp_path / "out" / convert.PROTOTYPES_FILE)


@pytest.mark.parametrize("bn_clr", [False, True], ids=["plain", "bn_clr"])
def test_converted_proda_file_matches_the_torch_transcription(bn_clr):
    torch = _torch()
    reference = pytest.importorskip("jaxda.interop.torch_reference_proda")
    from tests.interop.test_parity import randomize

    width = 8
    torch.manual_seed(0)
    torch_model = reference.ProDADeepLabV2Torch(
        NUM_CLASSES, STAGE_SIZES, width, HEAD_WIDTH, bn_clr=bn_clr
    )
    generator = torch.Generator().manual_seed(1)
    calibration = torch.randn(2, 3, 72, 88, generator=generator) * 2 + 0.5
    randomize(torch_model, 2, calibration, untrained_branches_from=5)
    test_proda_model.randomize_head(torch_model, generator, torch)
    x = torch.randn(2, 3, 65, 81, generator=generator) * 2 + 0.5

    obj = {
        "ResNet101": {"model_state": torch_model.state_dict(), "objective_vectors": None},
        "iter": 1,
    }
    config = _config(bn_clr=bn_clr, width=width, dropout=False)
    variables, report = convert.convert_segmenter(obj, config)
    assert report.missing == [] and report.unexpected == []
    model = models.build_segmenter(config.model, config.num_classes)
    test_proda_model.assert_matches_transcription(model, variables, torch_model, x, bn_clr)


@pytest.mark.slow  # Two subprocesses; test_convert.py covers the command line by default.
def test_command_line_proda_and_simclr(tmp_path):
    torch = _torch()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sd = fakes.proda(_rng(), STAGE_SIZES, 8, NUM_CLASSES, 256)
    pkl = str(tmp_path / "warmup.pkl")
    vectors = torch.randn(NUM_CLASSES, 256)
    torch.save({"ResNet101": {"model_state": _tensors(sd), "objective_vectors": vectors}}, pkl)
    simclr = str(tmp_path / "r101_1x_sk0.pth")
    backbone = fakes.backbone(_rng(), STAGE_SIZES, 8)
    torch.save({"state_dict": _tensors({**backbone, "fc.bias": np.zeros(1000)})}, simclr)

    def run(path, out, *extra):
        args = [
            sys.executable,
            "-m",
            "launch.convert",
            f"--from={path}",
            "--config=configs/adaptseg.py:synthetic",
            "--config.model.name=proda_deeplab_v2",
            f"--out={out}",
            *extra,
        ]
        return subprocess.run(args, cwd=root, capture_output=True, text=True, check=False)

    result = run(pkl, tmp_path / "proda")
    assert result.returncode == 0, result.stderr
    assert "layout: proda" in result.stdout
    assert "missing, kept at their initialisation: 0" in result.stdout
    assert f"written to {tmp_path / 'proda' / convert.PROTOTYPES_FILE}" in result.stdout
    np.testing.assert_array_equal(
        np.load(tmp_path / "proda" / convert.PROTOTYPES_FILE), vectors.numpy()
    )

    result = run(simclr, tmp_path / "simclr", "--layout=simclr")
    assert result.returncode == 0, result.stderr
    assert "layout: simclr" in result.stdout and "fc.bias" in result.stdout
    assert "the ProDA head is not in the file" in result.stdout
