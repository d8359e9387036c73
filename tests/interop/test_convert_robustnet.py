"""RobustNet's normalisation family through the converter: IBN ('affine') and IW / IRW / ISW
('plain') files, written as RobustNet's trainer saves them from the PyTorch transcription
(`torch_reference_v3plus`, random weights), converted by `convert.convert_file` (what
`launch.convert` runs), restored and run against PyTorch: logits, the whitened maps and the ISW
loss on them. Then the files whose normalisation differs from the config's are refused."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import source_only
from jaxda import checkpoints, models
from jaxda.interop import convert, layouts, torch_layouts
from jaxda.losses import whitening
from tests.interop import fakes

torch = pytest.importorskip("torch")
ref = pytest.importorskip("jaxda.interop.torch_reference_v3plus")
v3plus = pytest.importorskip("tests.interop.test_convert_v3plus")

TOLERANCE = 1e-4
NUM_CLASSES = 5
# Two blocks in layer1 and layer2: their InstanceNorm sits in block 1, RobustNet's last block
# (its `_make_layer` never gives block 0 one).
STAGE_SIZES = (2, 2, 1, 1)
WIDTH = 8
HEADS = {"head_width": 16, "low_level_width": 8, "aux_width": 16}
SLOTS = ("stem", "layer1", "layer2")  # RobustNet's --wt_layer 0 0 X X X 0 0.


def _config(kind: str, slots=SLOTS, deep_stem=False):
    config = source_only.get_config("synthetic,model=deeplabv3plus")
    config.num_classes = NUM_CLASSES
    config.model.update(
        stage_sizes=STAGE_SIZES,
        width=WIDTH,
        deep_stem=deep_stem,
        variant="robustnet",
        aspp_rates=(),
        multi_level=True,
        dropout=False,
        instance_norm=kind,
        instance_norm_at=slots,
        **HEADS,
    )
    return config


@functools.cache
def _torch_model(kind: str, slots=SLOTS, deep_stem=False):
    model = v3plus.randomized_torch_model(
        num_classes=NUM_CLASSES,
        layers=STAGE_SIZES,
        width=WIDTH,
        deep_stem=deep_stem,
        multi_level=True,
        dropout=False,
        instance_norm=kind,
        instance_norm_at=slots,
        **HEADS,
    )
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():  # IBN's affine away from its (1, 0) init.
        for m in model.modules():
            if isinstance(m, torch.nn.InstanceNorm2d) and m.affine:
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.normal_(0, 0.2, generator=generator)
    return model


def _numpy_sd(kind: str, slots=SLOTS, deep_stem=False) -> dict:
    sd = v3plus.robustnet_names(_torch_model(kind, slots, deep_stem).state_dict())
    return {k: v.numpy() for k, v in sd.items()}


def _save(state_dict: dict, path) -> dict:
    """Writes a file as RobustNet saves one; returns its ('module.') state dict."""
    command = "python train.py --arch network.deepv3.DeepR50V3PlusD --wt_layer 0 0 2 2 2 0 0"
    obj = v3plus.robustnet_file(state_dict, command)
    torch.save(obj, str(path))
    return obj["state_dict"]


def _restore(out: str, config):
    model = models.build_segmenter(config.model, config.num_classes)
    variables, _ = checkpoints.restore_model_variables(
        checkpoints.find_step_dir(out), models.abstract_variables(model),
        checkpoints.model_meta(config.model),
    )  # fmt: skip
    return model, jax.device_get(variables)


def _relative_error(ours, reference) -> float:
    """max |jaxda - torch| / max |torch| of an NHWC jaxda and an NCHW torch tensor."""
    reference = reference.detach().numpy().transpose(0, 2, 3, 1)
    assert np.shape(ours) == reference.shape
    return float(np.abs(np.asarray(ours) - reference).max() / np.abs(reference).max())


def _robustnet_whitening_loss(f_map, mask):
    """RobustNet's `instance_whitening_loss` (network/instance_whitening.py) with ISW's
    arguments (`CovMatrix_ISW.get_mask_matrix`: eye, mask, margin 0, num_sensitive)."""
    b, c, h, w = f_map.shape
    eye = torch.eye(c)
    flat = f_map.contiguous().view(b, c, -1)
    f_cor = torch.bmm(flat, flat.transpose(1, 2)).div(h * w - 1) + 1e-5 * eye
    off_diag_sum = torch.sum(torch.abs(f_cor * mask), dim=(1, 2), keepdim=True) - 0
    loss = torch.clamp(torch.div(off_diag_sum, torch.sum(mask)), min=0)
    return torch.sum(loss) / b


@pytest.mark.parametrize(
    ("kind", "deep_stem"),
    # The deep stem (layer0.7 -> instance_norm3) in the slow run.
    [("plain", False), ("affine", False), pytest.param("affine", True, marks=pytest.mark.slow)],
)
def test_converted_robustnet_file_matches_torch(kind, deep_stem, tmp_path):
    config = _config(kind, deep_stem=deep_stem)
    torch_model = _torch_model(kind, deep_stem=deep_stem)
    sd = _save(_numpy_sd(kind, deep_stem=deep_stem), tmp_path / "best.pth")
    stem = "layer0.7" if deep_stem else "layer0.1"
    # RobustNet's placement: no running statistics at the stem norm; an IN in block 1 only.
    assert not any(k.startswith(f"module.{stem}.running") for k in sd)
    assert ("module.layer1.1.instance_norm_layer.weight" in sd) == (kind == "affine")
    assert not any(re.search(r"layer\d\.0\.instance_norm_layer", k) for k in sd)

    report = convert.convert_file(str(tmp_path / "best.pth"), config, str(tmp_path / "out"))
    assert report.layout == "robustnet"
    assert report.missing == [] and report.unexpected == [] and report.skipped == {}
    tracked = {k for k in sd if k.endswith("num_batches_tracked")}
    assert set(report.loaded) == set(sd) - tracked
    if kind == "affine":
        index = 3 if deep_stem else 1
        assert report.loaded[f"module.{stem}.weight"] == (
            f"params/backbone/instance_norm{index}/scale"
        )
        for layer in (1, 2):
            assert report.loaded[f"module.layer{layer}.1.instance_norm_layer.bias"] == (
                f"params/backbone/layer{layer}_1/instance_norm/bias"
            )
    else:
        assert not any(k.startswith(f"module.{stem}.") for k in sd)

    model, variables = _restore(str(tmp_path / "out"), config)
    x = torch.randn(2, 3, 65, 65, generator=torch.Generator().manual_seed(3)) * 2 + 0.5
    with torch.no_grad():
        aux, main, *w_arr = torch_model(x)
    apply = jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]))
    out, state = apply(variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
    errors = {"main": _relative_error(out["main"], main), "aux": _relative_error(out["aux"], aux)}
    whitened = {k: v[0] for k, v in state["intermediates"].items() if k.startswith("whitened/")}
    if kind == "plain":
        (w_arr,) = w_arr
        assert sorted(whitened) == sorted(f"whitened/{slot}" for slot in SLOTS)
        assert len(w_arr) == len(SLOTS)  # RobustNet's order: stem, layer1, layer2.
        generator = np.random.default_rng(5)
        for slot, f_torch in zip(SLOTS, w_arr, strict=True):
            ours = whitened[f"whitened/{slot}"]
            errors[slot] = _relative_error(ours, f_torch)
            # Instance-normalised: per image and channel mean 0, variance 1.
            np.testing.assert_allclose(f_torch.mean((2, 3)), 0, atol=1e-4)
            np.testing.assert_allclose(f_torch.var((2, 3), unbiased=False), 1, atol=1e-3)
            channels = f_torch.shape[1]
            # An ISW-style mask: a random part of the strict upper triangle.
            mask = np.triu(generator.random((channels, channels)) < 0.3, k=1).astype(np.float32)
            expected = _robustnet_whitening_loss(f_torch, torch.from_numpy(mask)).item()
            loss = float(whitening.whitening_loss(ours, *whitening.isw_params(mask)))
            assert expected > 0.01
            np.testing.assert_allclose(loss, expected, rtol=TOLERANCE)
    else:
        assert w_arr == [] and whitened == {}
    print(f"{kind} deep_stem={deep_stem} relative errors: {errors}")
    assert max(errors.values()) < TOLERANCE, errors


# --- refusals and skips (NumPy state dicts against the model's variable shapes) ------------


@functools.cache
def _abstract(kind: str, slots=SLOTS, deep_stem=False) -> dict:
    config = _config(kind, slots, deep_stem)
    return models.abstract_variables(models.build_segmenter(config.model, config.num_classes))


def _refused(sd, kind, slots=SLOTS, deep_stem=False) -> str:
    with pytest.raises(layouts.ConversionError) as error:
        torch_layouts.map_state_dict(sd, _abstract(kind, slots, deep_stem), "robustnet")
    return str(error.value)


def test_ibn_file_into_other_configs_is_refused(tmp_path):
    """IBN keys at the stem and layer1 / layer2 with instance_norm '' or 'plain'."""
    sd = _numpy_sd("affine")
    for kind in ("", "plain"):
        message = _refused(sd, kind)
        for key in ("layer0.1.weight", "layer1.1.instance_norm_layer", "layer2.1.instance"):
            assert key in message, message
        assert "config.model.instance_norm" in message
        assert "--config.model.instance_norm=affine" in message
    _save(sd, tmp_path / "ibn.pth")  # Through the command line's entry point too.
    with pytest.raises(layouts.ConversionError, match="instance_norm=affine"):
        convert.convert_file(str(tmp_path / "ibn.pth"), _config(""), str(tmp_path / "out"))


def test_batch_norm_stem_into_replaced_stem_is_refused():
    """RobustNet's baseline (a stem BN with running statistics) into IN configs."""
    for kind in ("plain", "affine"):
        message = _refused(_numpy_sd(""), kind, slots=("stem",))
        assert "layer0.1.running_mean" in message and "layer0.1.running_var" in message
        assert "a BatchNorm" in message and "instance_norm=''" in message, message


def test_plain_file_into_batch_norm_or_ibn_config_is_refused():
    sd = _numpy_sd("plain")
    message = _refused(sd, "")
    assert "no layer0.1.* key" in message and "--config.model.instance_norm=plain" in message
    message = _refused(sd, "affine")
    assert "params/backbone/layer1_1/instance_norm" in message, message
    assert "params/backbone/layer2_1/instance_norm" in message
    # The slot set matters for the stem: 'plain' without 'stem' keeps the BN.
    assert "layer0.1" in _refused(sd, "plain", slots=("layer1", "layer2"))


def test_ibn_slots_mismatch_is_refused():
    sd = _numpy_sd("affine")
    message = _refused(sd, "affine", slots=("stem", "layer1"))
    assert "layer2.1.instance_norm_layer" in message and "instance_norm_at" in message
    assert "('stem', 'layer1', 'layer2')" in message, message


def test_deep_stem_in_at_its_first_norms_is_refused():
    """RobustNet's R101 GTAV scripts (--wt_layer 2 2 0 ...): IN at layer0.1 and layer0.4, a BN
    at layer0.7; jaxda's 'stem' slot is the last stem norm only."""
    sd = {
        k: v
        for k, v in _numpy_sd("", deep_stem=True).items()
        if not k.startswith(("layer0.1.", "layer0.4."))
    }
    message = _refused(sd, "", deep_stem=True)
    assert "layer0.1 (the stem's bn1)" in message and "layer0.4 (the stem's bn2)" in message
    assert "No config fits" in message and "positions 0 / 1" in message, message
    # Another stem altogether is the depth check's error, not a normalisation one.
    message = _refused(_numpy_sd("affine", deep_stem=True), "affine")
    assert "deep_stem=True" in message and "instance_norm" not in message, message


def test_switchable_whitening_is_refused():
    sd = dict(_numpy_sd(""))
    sd["layer1.1.instance_norm_layer.sw_mean_weight"] = np.ones(2, np.float32)
    assert "switchable whitening" in _refused(sd, "")


def test_whitening_state_is_skipped_with_its_reason():
    """RobustNet keeps ISW's mask outside the state dict; a file holding such tensors anyway
    loads, with them skipped."""
    sd = dict(_numpy_sd("plain"))
    extra = {
        "cov_matrix_layer.0.mask_matrix": np.eye(8, dtype=np.float32),
        "cov_matrix_layer.0.var_matrix": np.zeros((8, 8), np.float32),
        "layer1.1.instance_norm_layer.instance_standardization.running_mean": np.zeros(32),
    }
    loaded, report = torch_layouts.map_state_dict({**sd, **extra}, _abstract("plain"))
    assert report.layout == "robustnet" and report.unexpected == []
    assert sorted(report.skipped) == sorted(extra)
    assert "ISW mask" in report.skipped["cov_matrix_layer.0.mask_matrix"]
    np.testing.assert_array_equal(
        loaded[("params", "backbone", "layer2_1", "conv3", "kernel")],
        sd["layer2.1.conv3.weight"].transpose(2, 3, 1, 0),
    )


def test_imagenet_stem_bn_into_replaced_stem():
    """An ImageNet ResNet (torchvision names): RobustNet's `forgiving_state_restore` loads
    bn1's weight and bias into an IBN stem by name and drops the rest."""
    sd = fakes.backbone(np.random.default_rng(0), stage_sizes=STAGE_SIZES, width=WIDTH)
    loaded, report = torch_layouts.map_state_dict(sd, _abstract("affine"))
    assert report.layout == "torchvision" and report.unexpected == []
    np.testing.assert_array_equal(
        loaded[("params", "backbone", "instance_norm1", "scale")], sd["bn1.weight"]
    )
    np.testing.assert_array_equal(
        loaded[("params", "backbone", "instance_norm1", "bias")], sd["bn1.bias"]
    )
    assert sorted(report.skipped) == ["bn1.running_mean", "bn1.running_var"]
    assert "layer1_1/instance_norm/scale" in " ".join(report.missing)
    _, report = torch_layouts.map_state_dict(sd, _abstract("plain"))
    fields = ("weight", "bias", "running_mean", "running_var")
    assert sorted(report.skipped) == sorted(f"bn1.{f}" for f in fields)
    assert "has no parameters" in report.skipped["bn1.weight"]
    assert not any("bn1" in p for p in report.missing)
