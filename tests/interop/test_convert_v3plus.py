"""The converter's DeepLabV3+ layouts (`robustnet`, `deeplabv3plus_jfzhang95`): files written
as the official trainers save them (the PyTorch transcription's weights renamed to the
official keys by this file's own table), converted by `convert.convert_file`, restored and run
against the PyTorch model; layout detection and mismatch errors."""

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import source_only
from jaxda import checkpoints, models
from jaxda.interop import convert, layouts, torch_layouts
from tests.interop import fakes
from tests.models.test_deeplab_v3plus import relative_errors

torch = pytest.importorskip("torch")
ref = pytest.importorskip("jaxda.interop.torch_reference_v3plus")
parity = pytest.importorskip("tests.interop.test_parity")

TOLERANCE = 1e-4
NUM_CLASSES = 5
HEADS = {"head_width": 16, "low_level_width": 8, "aux_width": 16}
# name: (variant, output stride, deep stem, multi-grid, stage sizes, save as)
SETTINGS = {
    # Full-size ResNet-50 forms, for the slow test at 768x768.
    "robustnet_r50_os16": ("robustnet", 16, False, (), (3, 4, 6, 3), "robustnet"),
    "jfzhang95_r50_os16": ("jfzhang95", 16, False, (1, 2, 4), (3, 4, 6, 3), "jfzhang95_trainer"),
    "robustnet_os16": ("robustnet", 16, False, (), (1, 1, 2, 1), "robustnet"),
    "robustnet_os8_deep_stem": ("robustnet", 8, True, (), (1, 1, 2, 1), "robustnet"),
    "jfzhang95_os16": ("jfzhang95", 16, False, (1, 2, 4), (1, 1, 1, 3), "jfzhang95_trainer"),
    "jfzhang95_os8_dataparallel": ("jfzhang95", 8, False, (1, 2, 4), (1, 1, 1, 3), "bare_module"),
}
# RobustNet's `layer0 = Sequential(conv1, bn1, relu[, conv2, bn2, relu, conv3, bn3, relu],
# maxpool)` (docs/methods/checkpoints.md), from the transcription's torchvision stem names.
ROBUSTNET_STEM = {"conv1": 0, "bn1": 1, "conv2": 3, "bn2": 4, "conv3": 6, "bn3": 7}


def _config(name: str, width: int = 4, heads=None):
    variant, output_stride, deep_stem, multi_grid, stage_sizes, _ = SETTINGS[name]
    config = source_only.get_config("synthetic,model=deeplabv3plus")
    config.num_classes = NUM_CLASSES
    config.model.update(
        stage_sizes=stage_sizes,
        width=width,
        output_stride=output_stride,
        deep_stem=deep_stem,
        multi_grid=multi_grid,
        variant=variant,
        aspp_rates=(),
        multi_level=variant == "robustnet",
        dropout=False,
        **(heads or HEADS),
    )
    return config


def randomized_torch_model(**kwargs):
    """The PyTorch transcription (`ref.DeepLabV3PlusTorch(**kwargs)`) with seeded random
    weights and BN statistics calibrated on random images, in evaluation mode."""
    torch.manual_seed(0)
    model = ref.DeepLabV3PlusTorch(**kwargs)
    calibration = torch.randn(2, 3, 40, 56, generator=torch.Generator().manual_seed(1))
    parity.randomize(model, 2, calibration)
    return model.eval()


def _torch_model(name: str, width: int = 4, heads=None):
    variant, output_stride, deep_stem, multi_grid, stage_sizes, _ = SETTINGS[name]
    return randomized_torch_model(
        num_classes=NUM_CLASSES,
        layers=stage_sizes,
        width=width,
        output_stride=output_stride,
        deep_stem=deep_stem,
        multi_grid=multi_grid,
        variant=variant,
        multi_level=variant == "robustnet",
        dropout=False,
        **(heads or HEADS),
    )


def robustnet_names(state_dict: dict) -> dict:
    """The transcription's state dict under RobustNet's names (without 'module.')."""
    out = {}
    for key, value in state_dict.items():
        name = key
        if key.startswith("backbone.layer"):
            name = key[len("backbone.") :]
        elif key.startswith("backbone."):
            module, field = key[len("backbone.") :].split(".")
            name = f"layer0.{ROBUSTNET_STEM[module]}.{field}"
        out[name] = value
    return out


def _official_keys(state_dict: dict, variant: str) -> dict:
    """The transcription's state dict under the official code's names."""
    if variant == "jfzhang95":
        return dict(state_dict)  # Its `backbone.` torchvision names are jfzhang95's.
    return robustnet_names(state_dict)


def robustnet_file(state_dict: dict, command: str) -> dict:
    """What RobustNet's `optimizer.save_weights` writes: DDP ('module.') keys in a dict."""
    return {
        "state_dict": {f"module.{k}": v for k, v in state_dict.items()},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.01}]},
        "scheduler": {"last_epoch": 3},
        "epoch": 3,
        "mean_iu": 0.41,
        "command": command,
    }


def _save(torch_model, name: str, path) -> dict:
    """Writes the file as the official trainer does; returns its state dict."""
    variant, *_, save_as = SETTINGS[name]
    sd = _official_keys(torch_model.state_dict(), variant)
    if save_as == "robustnet":  # optimizer.py save: DDP keys in a dict.
        obj = robustnet_file(sd, "python train.py --arch network.deepv3.DeepR50V3PlusD")
        sd = obj["state_dict"]
    elif save_as == "jfzhang95_trainer":  # Saver: model.module.state_dict(), no prefix.
        obj = {"epoch": 2, "state_dict": sd, "optimizer": {"state": {}}, "best_pred": 0.3}
    else:  # A bare DataParallel state dict.
        sd = obj = {f"module.{k}": v for k, v in sd.items()}
    torch.save(obj, str(path))
    return sd


def _restore(out: str, config):
    model = models.build_segmenter(config.model, config.num_classes)
    abstract = models.abstract_variables(model)
    variables, _ = checkpoints.restore_model_variables(
        checkpoints.find_step_dir(out), abstract, checkpoints.model_meta(config.model)
    )
    return model, jax.device_get(variables)


FULL_HEADS = {"head_width": 256, "low_level_width": 48, "aux_width": 512}
SMALL = [name for name in SETTINGS if "_r50_" not in name]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["robustnet_r50_os16", "jfzhang95_r50_os16"])
def test_full_size_r50_converted_file_matches_torch_at_768(name, tmp_path):
    """RobustNet's DeepR50V3PlusD16 and jfzhang95's R50 form, full widths, 2 x 768x768."""
    torch_model = _torch_model(name, width=64, heads=FULL_HEADS)
    config = _config(name, width=64, heads=FULL_HEADS)
    _save(torch_model, name, tmp_path / "model.pth")
    report = convert.convert_file(str(tmp_path / "model.pth"), config, str(tmp_path / "out"))
    assert report.missing == [] and report.unexpected == [] and report.skipped == {}
    model, variables = _restore(str(tmp_path / "out"), config)
    x = torch.randn(2, 3, 768, 768, generator=torch.Generator().manual_seed(3)) * 2 + 0.5
    # Two images with different global statistics: the image-pooling BN normalises 2 values
    # per channel, which two draws of one distribution make nearly equal (an ill-conditioned
    # division that amplifies float32 rounding, not a difference between the networks).
    x[1] = x[1] * 3.0 + 2.0
    errors = relative_errors(model, variables, torch_model, x)
    # Batch statistics amplify float32 rounding (BN divides by small batch deviations): read
    # jaxda's error against PyTorch's own float32 error, both against float64.
    float64 = copy.deepcopy(torch_model).double().train()
    with torch.no_grad():
        exact = float64(x.double())[1]
        torch_float32 = torch_model.train()(x)[1]
    torch_model.eval()
    apply = functools.partial(model.apply, train=True, mutable=["batch_stats"])
    ours = jax.jit(apply)(variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))[0]["main"]
    vs_float64 = {
        "jaxda": parity.relative_error(ours, exact),
        "torch_float32": parity.relative_error(torch_float32.numpy().transpose(0, 2, 3, 1), exact),
    }
    print(f"{name} at 768x768, relative errors: {errors}; train main vs float64: {vs_float64}")
    assert max(e for per_head in errors.values() for e in per_head.values()) < TOLERANCE, errors
    assert vs_float64["jaxda"] < 2 * vs_float64["torch_float32"] + 1e-6, vs_float64


@pytest.mark.parametrize("name", SMALL)
def test_converted_file_matches_torch(name, tmp_path):
    torch_model = _torch_model(name)
    config = _config(name)
    sd = _save(torch_model, name, tmp_path / "model.pth")
    report = convert.convert_file(str(tmp_path / "model.pth"), config, str(tmp_path / "out"))

    expected_layout = "robustnet" if SETTINGS[name][0] == "robustnet" else "deeplabv3plus_jfzhang95"
    assert report.layout == expected_layout
    assert report.missing == [] and report.unexpected == [] and report.skipped == {}
    tracked = {k for k in sd if k.endswith("num_batches_tracked")}
    assert set(report.loaded) == set(sd) - tracked
    assert {k for k in report.ignored if k in sd} == tracked

    model, variables = _restore(str(tmp_path / "out"), config)
    x = torch.randn(2, 3, 57, 75, generator=torch.Generator().manual_seed(3)) * 2 + 0.5
    errors = relative_errors(model, variables, torch_model, x)
    print(f"{name} relative errors: {errors}")
    assert max(e for per_head in errors.values() for e in per_head.values()) < TOLERANCE, errors


# --- detection and errors (key lists and NumPy arrays; no files) ----------------------------


@functools.cache
def _keys(name: str) -> tuple:
    model = _torch_model(name)
    return tuple(_official_keys(model.state_dict(), SETTINGS[name][0]))


def _torchvision_keys() -> dict:
    fc = {"fc.weight": np.zeros((10, 128)), "fc.bias": np.zeros(10)}
    return {**fakes.backbone(np.random.default_rng(0)), **fc}


@pytest.mark.parametrize(
    ("keys", "container", "expected"),
    [
        (lambda: ["module." + k for k in _keys("robustnet_os16")], "state_dict", "robustnet"),
        (lambda: _keys("robustnet_os8_deep_stem"), "bare", "robustnet"),
        (lambda: _keys("jfzhang95_os16"), "state_dict", "deeplabv3plus_jfzhang95"),
        (lambda: ["module." + k for k in _keys("jfzhang95_os16")], "bare",
         "deeplabv3plus_jfzhang95"),
        (_torchvision_keys, "bare", "torchvision"),
        (lambda: fakes.prefixed(fakes.backbone(np.random.default_rng(0)), "module."), "bare",
         "torchvision"),
        (lambda: fakes.prefixed(_torchvision_keys(), "module.backbone.model."), "dasac", "dasac"),
        (lambda: fakes.prefixed(fakes.multi_level(np.random.default_rng(0)), "module."),
         "state_dict", "maxsquare"),
    ],
)  # fmt: skip
def test_detection_tells_v3plus_from_other_layouts(keys, container, expected):
    assert layouts.detect_layout(list(keys()), container) == expected


def test_robustnet_layer_names_alone_are_not_torchvision():
    """RobustNet's backbone is torchvision's layer1..4 without the top-level stem."""
    backbone_only = [k for k in _keys("robustnet_os16") if k.startswith(("layer0.", "layer"))]
    assert layouts.detect_layout(backbone_only) == "robustnet"
    heads_only = [k for k in _keys("jfzhang95_os16") if not k.startswith("backbone.")]
    assert layouts.detect_layout(heads_only) == "deeplabv3plus_jfzhang95"


def _numpy_sd(name: str) -> dict:
    model = _torch_model(name)
    sd = _official_keys(model.state_dict(), SETTINGS[name][0])
    return {k: v.numpy() for k, v in sd.items()}


@functools.cache
def _abstract(name: str) -> dict:
    config = _config(name)
    return models.abstract_variables(models.build_segmenter(config.model, config.num_classes))


def test_v3plus_file_for_deeplab_v2_config_is_an_error():
    config = source_only.get_config("synthetic")
    with pytest.raises(layouts.ConversionError, match=r"DeepLabV3\+ checkpoint.*model=deeplabv3"):
        convert.convert_segmenter({"state_dict": _numpy_sd("robustnet_os16")}, config)


def test_deeplab_v2_file_for_v3plus_config_is_an_error():
    sd = fakes.prefixed(fakes.multi_level(np.random.default_rng(0)), "module.")
    with pytest.raises(layouts.ConversionError, match=r"DeepLabV2 checkpoint.*deeplab_v2"):
        convert.convert_segmenter(sd, _config("robustnet_os16"))


def test_variant_mismatch_is_an_error():
    config = _config("jfzhang95_os16")
    with pytest.raises(layouts.ConversionError, match="variant=robustnet"):
        convert.convert_segmenter(_numpy_sd("robustnet_os16"), config)


def test_deep_stem_mismatch_is_an_error():
    with pytest.raises(layouts.ConversionError, match="deep_stem=True"):
        torch_layouts.map_state_dict(
            _numpy_sd("robustnet_os8_deep_stem"), _abstract("robustnet_os16")
        )


def test_robustnet_unknown_keys_are_reported():
    """A key nobody knows is reported as unexpected; the rest loads (the normalisation
    family's keys: tests/interop/test_convert_robustnet.py)."""
    sd = dict(_numpy_sd("robustnet_os16"))
    sd["final3.weight"] = np.zeros((4, 4), np.float32)
    loaded, report = torch_layouts.map_state_dict(sd, _abstract("robustnet_os16"))
    assert report.layout == "robustnet"
    assert report.unexpected == ["final3.weight"]
    np.testing.assert_array_equal(
        loaded[("params", "decoder", "classifier", "kernel")],
        sd["final2.0.weight"].transpose(2, 3, 1, 0),
    )


def test_torchvision_backbone_loads_into_v3plus():
    """An ImageNet ResNet (torchvision names) fills DeepLabV3+'s backbone, heads stay."""
    sd = fakes.backbone(np.random.default_rng(0), stage_sizes=(1, 1, 2, 1), width=4)
    loaded, report = torch_layouts.map_state_dict(sd, _abstract("robustnet_os16"))
    assert report.layout == "torchvision" and report.unexpected == []
    assert {p[1] for p in loaded} == {"backbone"}
    assert all(p.split("/")[1] != "backbone" for p in report.missing)
    np.testing.assert_array_equal(
        loaded[("batch_stats", "backbone", "layer3_1", "bn2", "var")],
        sd["layer3.1.bn2.running_var"],
    )
