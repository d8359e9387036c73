"""The converter's MiT layouts (`mit`, `segformer`, `daformer`; `jaxda.interop.mit_layout`):
files written as the official code saves them (state dicts of the PyTorch transcription
`jaxda.interop.torch_reference_mit`, with random tensors), converted by `convert.convert_file` /
`launch.convert`, restored and compared tensor by tensor; layout detection; every key
accounted for; mismatches refused with the keys and shapes."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from configs import common, source_only
from jaxda import checkpoints, models
from jaxda.interop import convert, layouts, mit_layout

torch = pytest.importorskip("torch")
ref = pytest.importorskip("jaxda.interop.torch_reference_mit")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM_CLASSES = 5
# The synthetic config's tiny MiT (`configs.common.use_mit(..., synthetic=True)`).
TINY = {"embed_dims": (16, 32, 48, 64), "depths": (1, 1, 1, 1), "num_heads": (1, 2, 3, 4)}
CONFIG_FILE = """
from configs import common, source_only


def get_config(arg=None):
    config = source_only.get_config("synthetic")
    common.use_mit(config, {variant!r})
    config.num_classes = {num_classes}
    return config
"""


def _config(variant="b5", decoder="daformer", synthetic=False):
    config = source_only.get_config("synthetic")
    common.use_mit(config, variant, decoder, synthetic=synthetic)
    config.num_classes = NUM_CLASSES
    return config


def _random_state_dict(module, seed=0) -> dict:
    """The module's state dict with every tensor redrawn (so that no two are equal)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
        for k, v in module.state_dict().items()
    }


def _encoder_file(seed=0, variant=None) -> dict:
    """An ImageNet `mit_b*.pth`-style raw state dict: encoder + 1000-class `head`."""
    shape = ref.VARIANTS[variant] if variant else (TINY["embed_dims"], TINY["depths"])
    encoder = ref.MixVisionTransformerTorch(
        *shape, num_heads=TINY["num_heads"] if variant is None else (1, 2, 5, 8),
        num_classes=1000,
    )  # fmt: skip
    return _random_state_dict(encoder, seed)


def _restore(out, config):
    model = models.build_segmenter(config.model, config.num_classes)
    variables, meta = checkpoints.restore_model_variables(
        checkpoints.find_step_dir(out), models.abstract_variables(model),
        json.loads(config.model.to_json()),
    )  # fmt: skip
    return jax.device_get(variables), meta


def _torch_layout(value: np.ndarray) -> np.ndarray:
    if value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    return value.T if value.ndim == 2 else value


def _assert_loaded_equal(report, variables, state_dict):
    flat = {"/".join(p): v for p, v in traverse_util.flatten_dict(variables).items()}
    for key, path in report.loaded.items():
        np.testing.assert_array_equal(
            _torch_layout(np.asarray(flat[path])), state_dict[key].numpy(), err_msg=key
        )


def _check_encoder_file_report(report, state_dict):
    assert report.layout == "mit" and report.container == "bare"
    assert set(report.skipped) == {"head.weight", "head.bias"}
    assert "ImageNet classifier" in report.skipped["head.weight"]
    assert report.unexpected == [] and report.ignored == {}
    assert set(report.loaded) | set(report.skipped) == set(state_dict)
    assert all(p.startswith("params/backbone/") for p in report.loaded.values())
    # The file fills the whole encoder; the decoder keeps the config's initialisation.
    assert report.missing and all(p.split("/")[1] == "head" for p in report.missing)


def test_encoder_file_converts_and_restores(tmp_path):
    state_dict = _encoder_file()
    path = str(tmp_path / "mit_tiny.pth")
    torch.save(state_dict, path)
    config = _config("b0", synthetic=True)
    out = str(tmp_path / "out")

    report = convert.convert_file(path, config, out)

    _check_encoder_file_report(report, state_dict)
    assert report.loaded["block1.0.attn.kv.weight"] == "params/backbone/block1_0/attn/kv/kernel"
    assert report.loaded["block2.0.mlp.dwconv.dwconv.weight"] == (
        "params/backbone/block2_0/mlp/dwconv/kernel"
    )
    variables, meta = _restore(out, config)
    _assert_loaded_equal(report, variables, state_dict)
    # The decoder is what a training run of the config draws.
    initial = convert.init_segmenter(config)
    for a, b in zip(jax.tree.leaves(variables["params"]["head"]),
                    jax.tree.leaves(initial["params"]["head"]), strict=True):  # fmt: skip
        np.testing.assert_array_equal(a, b)
    assert meta["layout"] == "mit" and meta["report"]["skipped"] == report.skipped
    assert "head.weight" in report.format()


def _segmentation_file(decoder: str, seed: int = 0):
    """(file object, flat state dict of the student) of an NVlabs SegFormer ('mlp') or a
    DAFormer training ('daformer') checkpoint of the tiny MiT."""
    backbone = ref.MixVisionTransformerTorch(TINY["embed_dims"], TINY["depths"], TINY["num_heads"])
    if decoder == "mlp":
        head = ref.SegFormerHeadTorch(TINY["embed_dims"], 32, NUM_CLASSES)
    else:
        head = ref.DAFormerHeadTorch(TINY["embed_dims"], NUM_CLASSES, 32, 32, (1, 2, 3, 4))
    state_dict = _random_state_dict(ref.EncoderDecoderTorch(backbone, head), seed)
    meta = {"iter": 40000, "CLASSES": list("abcde")}
    if decoder == "mlp":
        return {"meta": meta, "state_dict": state_dict}, state_dict
    wrapper = {f"model.{k}": v for k, v in state_dict.items()}
    wrapper |= {f"ema_model.{k}": v for k, v in state_dict.items()}
    wrapper |= {f"imnet_model.{k}": v for k, v in state_dict.items()}
    return {"meta": meta, "state_dict": wrapper, "optimizer": {"state": {}}}, wrapper


@pytest.mark.parametrize("decoder", ["mlp", "daformer"])
def test_segmentation_checkpoints_map_every_key(decoder):
    """NVlabs SegFormer and DAFormer checkpoints: the student's every tensor is loaded, the
    rest skipped or ignored with the reason (the mapping alone; `convert_file` is tested
    above, the numbers in tests/models/test_mit.py)."""
    obj, state_dict = _segmentation_file(decoder)
    flat, container, others = layouts.unwrap(obj)
    layout = layouts.detect_layout(list(flat), container)
    assert layout == {"mlp": "segformer", "daformer": "daformer"}[decoder]
    model = models.build_segmenter(_config(decoder=decoder, synthetic=True).model, NUM_CLASSES)
    loaded, report = mit_layout.map_state_dict(
        flat, models.abstract_variables(model), layout, decoder=decoder,
        container=container, container_entries=others,
    )  # fmt: skip
    assert report.missing == [] and report.unexpected == []
    accounted = set(report.loaded) | set(report.skipped) | set(report.ignored)
    assert accounted == set(state_dict) | set(others)
    tracked = {k for k in state_dict if k.endswith("num_batches_tracked")}
    if decoder == "mlp":
        assert set(report.skipped) == {"decode_head.conv_seg.weight", "decode_head.conv_seg.bias"}
        assert set(report.ignored) == {"meta"} | tracked
        # NVlabs concatenates [c4, c3, c2, c1]: the input blocks are reversed.
        weight = state_dict["decode_head.linear_fuse.conv.weight"].numpy()[:, :, 0, 0]
        kernel = loaded[("params", "head", "linear_fuse", "conv", "kernel")][0, 0]
        np.testing.assert_array_equal(kernel[:32], weight[:, 96:].T)
        np.testing.assert_array_equal(kernel[96:], weight[:, :32].T)
    else:
        assert report.skipped == {}
        ema = {k for k in state_dict if k.startswith(("ema_model.", "imnet_model."))}
        assert set(report.ignored) == {"meta", "optimizer"} | ema | tracked
        assert "EMA teacher" in report.ignored["ema_model.backbone.norm1.weight"]
        assert all(k.startswith("model.") for k in report.loaded)
        bn = "model.decode_head.fuse_layer.aspp_modules.1.depthwise_conv.bn.running_var"
        assert report.loaded[bn] == (
            "batch_stats/head/fuse_layer/aspp_modules_1/depthwise_conv/bn/var"
        )
        np.testing.assert_array_equal(
            loaded[("batch_stats", "head", "fuse_layer", "aspp_modules_1", "depthwise_conv",
                    "bn", "var")], state_dict[bn].numpy(),
        )  # fmt: skip


def test_mismatches_are_refused_with_keys_and_shapes():
    b0 = _encoder_file(variant="b0")
    with pytest.raises(convert.ConversionError) as error:
        convert.convert_segmenter(b0, _config("b5"))
    message = str(error.value)
    assert "The file's encoder is MiT-B0" in message and "config's model MiT-B5" in message
    assert "patch_embed1.proj.weight: file (32, 3, 7, 7), model (64, 3, 7, 7)" in message
    assert "blocks per stage: file (2, 2, 2, 2), model (3, 6, 40, 3)" in message
    assert "--config.model.variant=b0" in message

    # A decoder of the other kind, or of another class count.
    obj, _ = _segmentation_file("mlp")
    with pytest.raises(convert.ConversionError, match=r"--config\.model\.decoder=mlp"):
        convert.convert_segmenter(obj, _config("b0", "daformer", synthetic=True))
    config = _config("b0", "mlp", synthetic=True)
    config.num_classes = 19
    with pytest.raises(
        convert.ConversionError, match=r"decode_head\.linear_pred\.weight: file \(5, 32, 1, 1\)"
    ):
        convert.convert_segmenter(obj, config)
    # A head jaxda does not model (DAFormer's port of SegFormer's head names its embeddings
    # `linear_c.{i}`): refused rather than left at its initialisation, unless --skip_head.
    flat, _, _ = layouts.unwrap(obj)
    port = {k.replace("linear_c1.", "linear_c.0."): v for k, v in flat.items()}
    with pytest.raises(convert.ConversionError, match=r"decode_head\.linear_c\.0\.proj"):
        convert.convert_segmenter(port, config)
    model = models.build_segmenter(config.model, config.num_classes)
    _, report = mit_layout.map_state_dict(
        port, models.abstract_variables(model), "segformer", decoder="mlp", skip_head=True
    )
    assert report.unexpected == [] and "decode_head.linear_c.0.proj.weight" in report.skipped
    # Another network's file, or a MiT file for another network.
    resnet = {"conv1.weight": np.zeros((64, 3, 7, 7)), "bn1.weight": np.zeros(64)}
    with pytest.raises(convert.ConversionError, match="loads only the MiT layouts"):
        convert.convert_segmenter(resnet, _config("b0", synthetic=True))
    deeplab = source_only.get_config("synthetic")
    with pytest.raises(convert.ConversionError, match=r"config\.model\.name='segformer'"):
        convert.convert_segmenter(b0, deeplab)
    hrda = {
        "model.backbone.patch_embed1.proj.weight": np.zeros((16, 3, 7, 7)),
        "model.decode_head.scale_attention.conv_seg.weight": np.zeros((5, 64, 1, 1)),
    }
    # (tests/interop/test_convert_hrda.py has HRDA's refusals, on full files.)
    with pytest.raises(convert.ConversionError, match=r"HRDA.*--config\.model\.name=hrda"):
        convert.convert_segmenter(hrda, _config("b0", synthetic=True))


@pytest.mark.slow  # MiT-B5's init takes about a minute on 2 CPU cores; a subprocess.
def test_mit_b5_file_through_the_command_line(tmp_path):
    state_dict = _encoder_file(variant="b5")
    path = str(tmp_path / "mit_b5.pth")
    torch.save(state_dict, path)
    config_file = tmp_path / "mit_config.py"
    config_file.write_text(CONFIG_FILE.format(variant="b5", num_classes=19))
    out = str(tmp_path / "out")
    args = [sys.executable, "-m", "launch.convert", f"--from={path}",
            f"--config={config_file}", f"--out={out}"]  # fmt: skip
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "layout: mit" in result.stdout
    assert f"loaded: {len(state_dict) - 2} tensors (backbone {len(state_dict) - 2})" in (
        result.stdout
    )
    assert "head.weight, head.bias" in result.stdout

    config = source_only.get_config("synthetic")
    common.use_mit(config, "b5")
    config.num_classes = 19
    variables, meta = _restore(out, config)
    report = convert.ConversionReport(**meta["report"])
    _check_encoder_file_report(report, state_dict)
    _assert_loaded_equal(report, variables, state_dict)
    assert len(report.loaded) == len(state_dict) - 2
