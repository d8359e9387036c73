"""`jaxda.interop.torch_layouts` on fabricated state dicts (NumPy only, no torch needed)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxda.interop import aspp_detection, layouts, torch_layouts
from jaxda.interop.layouts import ConversionError
from jaxda.models import deeplab_v2, discriminators
from tests.interop import fakes


@functools.cache
def _target(num_classes=19, branches=4, multi_level=True, width=4):
    model = deeplab_v2.DeepLabV2(
        num_classes=num_classes,
        stage_sizes=(1, 1, 1, 1),
        width=width,
        aspp_dilations=(1, 2, 3, 4),
        num_aspp_branches=branches,
        multi_level=multi_level,
    )
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))


def _disc_target(in_channels=19, width=4):
    disc = discriminators.FCDiscriminator(width=width)
    return jax.eval_shape(lambda: disc.init(jax.random.key(0), jnp.zeros((1, 64, 64, in_channels))))


def _rng():
    return np.random.default_rng(0)


def test_multi_level_values_land_where_they_should():
    sd = fakes.multi_level(_rng())
    loaded, report = torch_layouts.map_state_dict(sd, _target())
    assert report.layout == "deeplab_multi"
    kernel = loaded[("params", "backbone", "layer3_0", "conv2", "kernel")]
    np.testing.assert_array_equal(kernel, sd["layer3.0.conv2.weight"].transpose(2, 3, 1, 0))
    down = loaded[("params", "backbone", "layer2_0", "downsample", "kernel")]
    np.testing.assert_array_equal(down, sd["layer2.0.downsample.0.weight"].transpose(2, 3, 1, 0))
    bn = {
        "scale": ("params", "weight"),
        "bias": ("params", "bias"),
        "mean": ("batch_stats", "running_mean"),
        "var": ("batch_stats", "running_var"),
    }
    for leaf, (collection, torch_name) in bn.items():
        got = loaded[(collection, "backbone", "layer4_0", "bn_downsample", leaf)]
        np.testing.assert_array_equal(got, sd[f"layer4.0.downsample.1.{torch_name}"])
        got = loaded[(collection, "backbone", "bn1", leaf)]
        np.testing.assert_array_equal(got, sd[f"bn1.{torch_name}"])
    aux = loaded[("params", "head_aux", "branch3", "kernel")]
    np.testing.assert_array_equal(aux, sd["layer5.conv2d_list.3.weight"].transpose(2, 3, 1, 0))
    main = loaded[("params", "head_main", "branch1", "bias")]
    np.testing.assert_array_equal(main, sd["layer6.conv2d_list.1.bias"])
    assert aux.shape == (3, 3, 64, 19) and main.dtype == np.float32
    # Every variable comes from the file; every file key is loaded or ignored.
    assert report.missing == [] and report.unexpected == [] and report.skipped == {}
    assert len(loaded) == len(traverse_util.flatten_dict(_target()))
    assert set(report.loaded) | set(report.ignored) == set(sd)
    assert report.ignored["layer1.0.bn2.num_batches_tracked"].startswith("BatchNorm step")
    assert report.loaded["layer6.conv2d_list.0.weight"] == "params/head_main/branch0/kernel"
    assert report.aspp["detected"] == 4


def test_missing_and_unexpected_keys_are_reported_by_name():
    sd = fakes.multi_level(_rng(), tracked=False)
    del sd["layer2.0.bn3.running_var"], sd["layer6.conv2d_list.2.bias"]
    sd["layer2.0.extra.weight"] = np.zeros(3, np.float32)
    sd["something_else"] = np.zeros(3, np.float32)
    _, report = torch_layouts.map_state_dict(sd, _target())
    assert sorted(report.missing) == [
        "batch_stats/backbone/layer2_0/bn3/var",
        "params/head_main/branch2/bias",
    ]
    assert report.unexpected == ["layer2.0.extra.weight", "something_else"]
    text = report.format()
    for name in [*report.missing, *report.unexpected]:
        assert name in text
    assert "not understood" in text


def test_head_shape_mismatch_is_an_error_unless_skip_head():
    sd = fakes.multi_level(_rng(), classes=16)
    with pytest.raises(ConversionError) as error:
        torch_layouts.map_state_dict(sd, _target())
    message = str(error.value)
    assert "layer6.conv2d_list.0.weight: file (16, 128, 3, 3), model (19, 128, 3, 3)" in message
    assert "layer5.conv2d_list.0.bias: file (16,), model (19,)" in message
    assert "--skip_head" in message

    loaded, report = torch_layouts.map_state_dict(sd, _target(), skip_head=True)
    assert not any(path[1].startswith("head_") for path in loaded)
    assert len(report.skipped) == 16 and "layer6.conv2d_list.3.weight" in report.skipped
    assert "params/head_main/branch0/kernel" in report.missing
    assert "params/head_aux/branch3/bias" in report.missing
    assert not any(p.startswith("params/backbone") for p in report.missing)


def test_backbone_mismatches_are_errors():
    sd = fakes.multi_level(_rng(), width=8)
    with pytest.raises(ConversionError, match=r"conv1\.weight: file \(8, 3, 7, 7\), model \(4"):
        torch_layouts.map_state_dict(sd, _target(), skip_head=True)
    deeper = {**fakes.backbone(_rng(), stage_sizes=(1, 1, 2, 1)), "fc.weight": np.zeros(2)}
    with pytest.raises(ConversionError, match=r"\(1, 1, 2, 1\) blocks.*\(1, 1, 1, 1\)"):
        torch_layouts.map_state_dict(deeper, _target())


@pytest.mark.parametrize(
    ("make", "container", "layout"),
    [
        (
            lambda r: fakes.prefixed(fakes.backbone(r, tracked=False), "Scale."),
            "bare",
            "deeplab_init",
        ),
        (fakes.multi_level, "bare", "deeplab_multi"),
        (lambda r: fakes.prefixed(fakes.multi_level(r), "module."), "bare", "maxsquare"),
        (fakes.multi_level, "state_dict", "maxsquare"),
        (lambda r: {**fakes.backbone(r), **fakes.head(r, "layer5", 128)}, "bare", "deeplab_single"),
        (lambda r: {**fakes.backbone(r), "layer5.head.1.weight": np.zeros(1)}, "bare", "proda"),
        (fakes.backbone, "proda", "proda"),
        (lambda r: fakes.prefixed(fakes.backbone(r), "module.backbone.model."), "bare", "dasac"),
        (lambda r: {**fakes.backbone(r), "fc.weight": np.zeros(1)}, "bare", "torchvision"),
        (fakes.discriminator, "bare", "disc_adaptseg"),
        (lambda r: fakes.discriminator(r, names=("0", "2", "4", "6", "8")), "bare", "disc_advent"),
    ],
)
def test_layout_detection(make, container, layout):
    assert layouts.detect_layout(list(make(_rng())), container) == layout


def test_unknown_or_wrong_layout_asks_for_layout_flag():
    with pytest.raises(ConversionError, match="pass --layout=one of"):
        layouts.detect_layout(["encoder.weight", "decoder.bias"])
    with pytest.raises(ConversionError, match="No tensor of the file matches layout 'dasac'"):
        torch_layouts.map_state_dict(fakes.multi_level(_rng()), _target(), "dasac")


def test_containers_are_unwrapped_and_their_entries_named():
    sd = {"conv1.weight": np.zeros((4, 3, 7, 7), np.float32)}
    proda = {
        "ResNet101": {"model_state": sd, "objective_vectors": np.zeros((19, 256))},
        "iter": 5,
        "best_iou": 0.4,
    }
    assert layouts.unwrap(proda) == (
        sd,
        "proda",
        ["ResNet101.objective_vectors", "best_iou", "iter"],
    )
    dasac = {"model": sd, "opt": {"state": {}}, "score": 0.3, "epoch": 40}
    assert layouts.unwrap(dasac) == (sd, "dasac", ["epoch", "opt", "score"])
    maxsquare = {"epoch": 1, "iteration": 2, "state_dict": sd, "optimizer": {}, "best_MIou": 0.1}
    assert layouts.unwrap(maxsquare)[1:] == (
        "state_dict",
        ["best_MIou", "epoch", "iteration", "optimizer"],
    )
    assert layouts.unwrap(sd) == (sd, "bare", [])
    with pytest.raises(ConversionError, match="Cannot find a state dict"):
        layouts.unwrap({"net": {"a": 1}, "epoch": 3})


def test_deeplab_init_skips_a_21_class_head_and_needs_no_num_batches_tracked():
    sd = fakes.prefixed(
        {**fakes.backbone(_rng(), tracked=False), **fakes.head(_rng(), "layer5", 128, 21)},
        "Scale.",
    )
    loaded, report = torch_layouts.map_state_dict(sd, _target())
    assert report.layout == "deeplab_init" and report.ignored == {}
    assert len(report.skipped) == 8
    assert (
        "(21, 128, 3, 3) differs from the model's (19, 128, 3, 3)"
        in (report.skipped["Scale.layer5.conv2d_list.0.weight"])
    )
    np.testing.assert_array_equal(
        loaded[("batch_stats", "backbone", "layer1_0", "bn_downsample", "var")],
        sd["Scale.layer1.0.downsample.1.running_var"],
    )
    assert sorted(report.missing) == sorted(
        f"params/{h}/branch{i}/{leaf}"
        for h in ("head_aux", "head_main")
        for i in range(4)
        for leaf in ("bias", "kernel")
    )
    # A 19-class head in an init file loads as the main head.
    sd19 = fakes.prefixed({**fakes.backbone(_rng()), **fakes.head(_rng(), "layer5", 128)}, "Scale.")
    loaded, report = torch_layouts.map_state_dict(sd19, _target())
    assert report.loaded["Scale.layer5.conv2d_list.2.weight"] == "params/head_main/branch2/kernel"


def test_dasac_ignores_teacher_and_loads_its_single_head_as_main():
    student = {**fakes.backbone(_rng()), **fakes.head(_rng(), "layer5", 128)}
    sd = {
        **fakes.prefixed(student, "module.backbone.model."),
        **fakes.prefixed(student, "module.slow_net.model."),
        "module.running_conf": np.zeros(19, np.float32),
        "module.slow_init": np.zeros(1, np.float32),
    }
    _, report = torch_layouts.map_state_dict(sd, _target(), container="dasac")
    assert report.layout == "dasac"
    assert report.ignored["module.running_conf"] == "da-sac's running class confidence"
    assert report.ignored["module.slow_net.model.layer4.0.conv3.weight"].endswith("(slow_net)")
    assert report.loaded["module.backbone.model.layer5.conv2d_list.0.weight"] == (
        "params/head_main/branch0/kernel"
    )
    # The multi-level model's aux head is not in the file: kept at its initialisation.
    assert sorted(report.missing) == sorted(
        f"params/head_aux/branch{i}/{leaf}" for i in range(4) for leaf in ("bias", "kernel")
    )
    assert report.unexpected == []


def test_proda_loads_the_backbone_only():
    sd = {
        **fakes.backbone(_rng()),
        "layer5.conv2d_list.0.0.weight": np.zeros((256, 128, 1, 1), np.float32),
        "layer5.bottleneck.1.weight": np.zeros((256, 1280, 3, 3), np.float32),
        "layer5.head.1.weight": np.zeros((19, 256, 1, 1), np.float32),
        "bn_pretrain.weight": np.zeros(3, np.float32),
    }
    _, report = torch_layouts.map_state_dict(
        sd, _target(), container="proda", container_entries=("iter", "ResNet101.objective_vectors")
    )
    assert set(report.skipped) == {
        "layer5.conv2d_list.0.0.weight",
        "layer5.bottleneck.1.weight",
        "layer5.head.1.weight",
    }
    assert "no DeepLabV2 counterpart" in report.skipped["layer5.head.1.weight"]
    assert {"iter", "ResNet101.objective_vectors", "bn_pretrain.weight"} <= set(report.ignored)
    assert all(p.startswith("params/head_") for p in report.missing)
    assert len(report.missing) == 16


def test_torchvision_ignores_fc():
    sd = {**fakes.backbone(_rng()), "fc.weight": np.zeros((1000, 128)), "fc.bias": np.zeros(1000)}
    _, report = torch_layouts.map_state_dict(sd, _target())
    assert report.layout == "torchvision"
    assert report.ignored["fc.weight"] == "torchvision's ImageNet classifier"
    assert len(report.missing) == 16 and report.unexpected == []


def test_single_level_model_skips_the_aux_head():
    sd = fakes.multi_level(_rng())
    _, report = torch_layouts.map_state_dict(sd, _target(multi_level=False))
    assert report.skipped["layer5.conv2d_list.0.weight"].endswith("multi_level=False)")
    assert report.missing == []


@pytest.mark.parametrize("names", [fakes.DISC_MODULES, ("0", "2", "4", "6", "8")])
def test_discriminator_layouts(names):
    sd = fakes.discriminator(_rng(), names=names)
    loaded, report = torch_layouts.map_state_dict(sd, _disc_target())
    assert report.missing == [] and report.unexpected == []
    np.testing.assert_array_equal(
        loaded[("params", "conv3", "kernel")], sd[f"{names[2]}.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(loaded[("params", "classifier", "bias")], sd[f"{names[4]}.bias"])
    with pytest.raises(ConversionError, match=r"file \(4, 19, 4, 4\), model \(4, 16, 4, 4\)"):
        torch_layouts.map_state_dict(sd, _disc_target(in_channels=16))
    with pytest.raises(ConversionError, match="describes a discriminator"):
        torch_layouts.map_state_dict(sd, _target(), report.layout)


def _branches(rng, trained, shape=(19, 2048, 3, 3)):
    fan_in = np.prod(shape[1:])
    out = {}
    for i in range(4):
        if i in trained:
            # A head after training: weight decay and gradients move its scale by a few %.
            weight = rng.normal(0, 0.0093, shape)
            bias = rng.normal(0, 0.05, shape[0])
        else:
            weight = rng.normal(0, 0.01, shape)
            bias = rng.uniform(-1, 1, shape[0]) / np.sqrt(fan_in)
        out[i] = (weight.astype(np.float32), bias.astype(np.float32))
    return out


@pytest.mark.parametrize(
    ("trained", "expected"), [((0, 1), 2), ((0, 1, 2, 3), 4), ((), None), ((0, 2), None)]
)
def test_aspp_detector_on_published_head_shapes(trained, expected):
    detected, stats = aspp_detection.detect_aspp_branches(_branches(_rng(), trained))
    assert detected == expected
    assert [s["looks_untrained"] for s in stats] == [i not in trained for i in range(4)]


def test_aspp_detector_thresholds():
    rng = _rng()
    fresh = rng.normal(0, 0.01, (19, 2048, 3, 3))
    assert aspp_detection.looks_like_deeplab_init(fresh)[0]
    assert not aspp_detection.looks_like_deeplab_init(fresh * 1.03)[0]  # std off by 3 %
    assert not aspp_detection.looks_like_deeplab_init(fresh + 2e-4)[0]  # mean off by 2e-4
    assert not aspp_detection.looks_like_deeplab_init(fresh, np.full(19, 0.01))[0]  # bias
    # A tiny test head (19 x 64 x 3 x 3) gets wider, sampling-based tolerances.
    assert aspp_detection.looks_like_deeplab_init(rng.normal(0, 0.01, (19, 64, 3, 3)))[0]


def test_aspp_disagreement_with_the_config():
    bugged = fakes.multi_level(_rng(), trained_branches=2)
    with pytest.raises(ConversionError) as error:
        torch_layouts.map_state_dict(bugged, _target(branches=4))
    assert "trained with 2 ASPP branches" in str(error.value)
    assert "--config.model.num_aspp_branches=2" in str(error.value)
    assert "--skip_aspp_check" in str(error.value)
    # The matching config loads branches 0 and 1 and skips the untrained 2 and 3.
    loaded, report = torch_layouts.map_state_dict(bugged, _target(branches=2))
    assert report.aspp["detected"] == 2 and report.missing == []
    assert "num_aspp_branches=2" in report.skipped["layer6.conv2d_list.3.weight"]
    assert ("params", "head_main", "branch2", "kernel") not in loaded
    # Overriding the check loads all four into a 4-branch model.
    _, report = torch_layouts.map_state_dict(bugged, _target(branches=4), check_aspp=False)
    assert len(report.loaded) == len(traverse_util.flatten_dict(_target(branches=4)))

    trained = fakes.multi_level(_rng())
    with pytest.raises(ConversionError, match=r"--config\.model\.num_aspp_branches=4"):
        torch_layouts.map_state_dict(trained, _target(branches=2))
