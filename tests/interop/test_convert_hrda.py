"""The converter's layout 'hrda' (HRDA / MIC(HRDA) training checkpoints, `jaxda.interop.
mit_layout`): a tiny-MiT HRDA transcription's (`jaxda.interop.torch_reference_hrda`) state dict,
wrapped as the official UDA module saves it (model. / ema_model. / imnet_model., MIC's
mic.teacher.ema_model.) and written with torch.save, converted, restored into jaxda's HRDA with
every key accounted for and run against the transcription (relative error = max |jaxda -
torch| / max |torch| < 1e-4); files of another model, variant or class count refused with the
keys."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common, source_only
from jaxda import models
from jaxda.interop import convert, layouts, mit_layout
from tests.interop.test_convert_mit import _assert_loaded_equal, _restore

torch = pytest.importorskip("torch")
ref = pytest.importorskip("jaxda.interop.torch_reference_hrda")
mit_ref = pytest.importorskip("jaxda.interop.torch_reference_mit")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOLERANCE = 1e-4
NUM_CLASSES = 5
CROP = (32, 32)  # HR box and inference windows on 64 x 64 images; LR at 32 x 32.
# XLA's lowest optimisation level roughly halves the forward's compilation on CPU (2-4 s
# against 8 s on 2 busy cores); the parity holds at either level.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
# The tiny HRDA of `_config` (also the command-line test's config file).
CONFIG_FILE = """
from configs import common, source_only


def get_config(arg=None):
    config = source_only.get_config("synthetic")
    common.use_mit(config, "b0", synthetic=True)
    config.num_classes = 5
    config.model.update(name="hrda", hr_crop_size=(32, 32), attention_embed_dim=16)
    return config
"""


def _config(name: str = "hrda"):
    """The synthetic config's tiny MiT with DAFormer's head; HRDA's keys for name 'hrda'."""
    config = source_only.get_config("synthetic")
    common.use_mit(config, "b0", synthetic=True)
    config.num_classes = NUM_CLASSES
    if name == "hrda":
        config.model.update(name="hrda", hr_crop_size=CROP, attention_embed_dim=16)
    return config


def _torch_hrda(model_config, seed: int = 0):
    """The PyTorch HRDA of `model_config`'s widths, randomised, in eval mode."""
    from tests.models.test_mit import randomize

    m = model_config
    backbone = mit_ref.MixVisionTransformerTorch(
        m.embed_dims, m.depths, m.num_heads, drop_path_rate=0.0
    )
    head = mit_ref.DAFormerHeadTorch(
        m.embed_dims, NUM_CLASSES, m.decoder_embed_dim, m.decoder_width, m.aspp_dilations
    )
    attention = ref.ConvFusionHeadTorch(m.embed_dims, NUM_CLASSES, m.attention_embed_dim)
    model = ref.HRDAEncoderDecoderTorch(backbone, ref.HRDAHeadTorch(head, attention), CROP)
    randomize(model, seed)
    return model


def _training_file(student: dict, mic: bool = False) -> tuple[dict, dict]:
    """(file object, its flat state dict) as DACS' UDA module saves it (mmcv's
    save_checkpoint): the student under model., a teacher and the ImageNet copy with other
    values (so that a mix-up shows in the numbers), MIC's own teacher when `mic`."""
    others = {k: v + 1 if v.is_floating_point() else v for k, v in student.items()}
    prefixes = ["ema_model.", "imnet_model."] + (["mic.teacher.ema_model."] if mic else [])
    state_dict = {f"model.{k}": v.clone() for k, v in student.items()}
    for prefix in prefixes:
        state_dict |= {f"{prefix}{k}": v.clone() for k, v in others.items()}
    meta = {"iter": 40000, "CLASSES": list("abcde")}
    return {"meta": meta, "state_dict": state_dict, "optimizer": {"state": {}}}, state_dict


def _relative_error(ours, reference) -> float:
    reference = reference.detach().numpy().transpose(0, 2, 3, 1)
    assert np.shape(ours) == reference.shape
    return float(np.abs(np.asarray(ours) - reference).max() / np.abs(reference).max())


def _nhwc(x):
    return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


def _check_report(report, state_dict, student_prefix="model."):
    """Every tensor of the student loaded, everything else ignored with the reason."""
    assert report.layout == "hrda"
    assert report.missing == [] and report.unexpected == [] and report.skipped == {}
    tracked = {k for k in state_dict if k.endswith("num_batches_tracked")}
    student = {k for k in state_dict if k.startswith(student_prefix)} - tracked
    assert set(report.loaded) == student
    assert set(report.ignored) - {"meta", "optimizer"} == set(state_dict) - student
    prefix = student_prefix
    assert report.loaded[f"{prefix}decode_head.scale_attention.fuse_layer.bn.running_var"] == (
        "batch_stats/scale_attention/fuse_layer/bn/var"
    )
    assert report.loaded[f"{prefix}decode_head.scale_attention.embed_layers.3.proj.weight"] == (
        "params/scale_attention/embed_layers_3/kernel"
    )
    assert report.loaded[f"{prefix}decode_head.head.fuse_layer.bottleneck.conv.weight"] == (
        "params/head/fuse_layer/bottleneck/conv/kernel"
    )
    assert report.loaded[f"{prefix}backbone.block4.0.attn.kv.weight"] == (
        "params/backbone/block4_0/attn/kv/kernel"
    )


def test_mic_hrda_file_converts_restores_and_matches_torch(tmp_path):
    """A MIC(HRDA) `iter_40000.pth`: converted, restored; the training forward with a box
    (fused, attention-weighted LR and HR logits, BN on running statistics) matches."""
    config = _config()
    torch_model = _torch_hrda(config.model)
    obj, state_dict = _training_file(torch_model.state_dict(), mic=True)
    path = str(tmp_path / "iter_40000.pth")
    torch.save(obj, path)
    out = str(tmp_path / "out")

    report = convert.convert_file(path, config, out)

    _check_report(report, state_dict)
    assert report.container == "state_dict"
    assert "EMA teacher" in report.ignored["ema_model.backbone.norm1.weight"]
    assert "ImageNet" in report.ignored["imnet_model.decode_head.head.conv_seg.weight"]
    assert "MIC" in report.ignored["mic.teacher.ema_model.backbone.norm1.weight"]
    variables, meta = _restore(out, config)
    assert meta["layout"] == "hrda" and meta["model"]["name"] == "hrda"
    _assert_loaded_equal(report, variables, state_dict)

    model = models.build_segmenter(config.model, config.num_classes)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    y, x = 16, 8
    with torch.no_grad():
        fused, lr, hr = torch_model.forward_train(images, (y, y + CROP[0], x, x + CROP[1]))
    forward = jax.jit(lambda v, i, b: model.apply(v, i, box=b), compiler_options=FAST_COMPILE)
    ours = forward(variables, _nhwc(images), jnp.array([y, x], jnp.int32))
    want = {"main": fused, "lr": lr, "hr": hr}
    errors = {k: _relative_error(ours[k], v) for k, v in want.items()}
    assert max(errors.values()) < TOLERANCE, errors


def test_layout_detection_and_the_bare_student():
    """'hrda' is detected in a training checkpoint and in the bare student (the official test
    script strips 'model.'), before 'segformer' / 'daformer', whose keys HRDA's start as."""
    config = _config()
    student = _torch_hrda(config.model).state_dict()
    flat, container, _ = layouts.unwrap(_training_file(student)[0])
    assert layouts.detect_layout(list(flat), container) == "hrda"
    assert layouts.detect_layout(list(student)) == "hrda"
    target = models.abstract_variables(models.build_segmenter(config.model, NUM_CLASSES))
    _, report = mit_layout.map_state_dict(
        {f"module.{k}": v for k, v in student.items()}, target, "hrda", decoder="daformer"
    )
    _check_report(report, {f"module.{k}": v for k, v in student.items()}, "module.")


def test_other_models_variants_and_class_counts_are_refused():
    config = _config()
    obj, _ = _training_file(_torch_hrda(config.model).state_dict())

    # An HRDA file for SegFormer / DAFormer, with the keys that show it.
    with pytest.raises(convert.ConversionError) as error:
        convert.convert_segmenter(obj, _config("segformer"))
    message = str(error.value)
    assert "HRDA / MIC(HRDA) checkpoint (layout 'hrda'" in message
    assert "model.decode_head.head.conv_seg.bias" in message
    assert "--config.model.name=hrda" in message
    # ... read as a DAFormer file (--layout=daformer).
    with pytest.raises(convert.ConversionError, match="--layout=hrda"):
        convert.convert_segmenter(obj, config, layout="daformer")
    # ... and with --skip_head its encoder alone loads into SegFormer.
    segformer = models.build_segmenter(_config("segformer").model, NUM_CLASSES)
    flat, _, _ = layouts.unwrap(obj)
    _, report = mit_layout.map_state_dict(
        flat, models.abstract_variables(segformer), "hrda", decoder="daformer", skip_head=True
    )
    assert report.unexpected == [] and "model.decode_head.scale_attention.conv_seg.weight" in (
        report.skipped
    )
    assert all(p.startswith("params/backbone/") for p in report.loaded.values())

    # A DAFormer file for HRDA.
    backbone = mit_ref.MixVisionTransformerTorch(
        config.model.embed_dims, config.model.depths, config.model.num_heads
    )
    head = mit_ref.DAFormerHeadTorch(config.model.embed_dims, NUM_CLASSES, 32, 32, (1, 2, 3, 4))
    daformer, _ = _training_file(mit_ref.EncoderDecoderTorch(backbone, head).state_dict())
    with pytest.raises(convert.ConversionError) as error:
        convert.convert_segmenter(daformer, config)
    message = str(error.value)
    assert "DAFormer checkpoint without HRDA's scale attention (layout 'daformer'" in message
    assert "model.decode_head.conv_seg.bias" in message and "--skip_head" in message

    # Another encoder: the variant and the keys with both shapes.
    b0 = _config()
    b0.model.update(embed_dims=None, depths=None, num_heads=None)
    with pytest.raises(convert.ConversionError) as error:
        convert.convert_segmenter(obj, b0)
    message = str(error.value)
    assert "The file's encoder is a custom MiT" in message and "model MiT-B0" in message
    assert "model.backbone.patch_embed1.proj.weight: file (16, 3, 7, 7), model (32, 3, 7, 7)" in (
        message
    )
    # Another class count, or a class-agnostic attention.
    config.num_classes = 19
    with pytest.raises(convert.ConversionError) as error:
        convert.convert_segmenter(obj, config)
    message = str(error.value)
    assert "model.decode_head.scale_attention.conv_seg.weight: file (5, 16, 1, 1), model " in (
        message
    )
    assert "attention_classwise" in message
    config.num_classes = NUM_CLASSES
    config.model.attention_classwise = False
    with pytest.raises(convert.ConversionError, match=r"conv_seg\.bias: file \(5,\), model \(1,\)"):
        convert.convert_segmenter(obj, config)


# A subprocess (~16 s); default-run twin: test_mic_hrda_file_converts_restores_and_matches_torch.
@pytest.mark.slow
def test_hrda_file_through_the_command_line(tmp_path):
    """`launch.convert` detects the layout; the converted network's inference forward (HR
    slide windows averaged on the canvas, no box) matches the transcription's."""
    config = _config()
    torch_model = _torch_hrda(config.model, seed=2)
    obj, state_dict = _training_file(torch_model.state_dict())
    path = str(tmp_path / "iter_40000.pth")
    torch.save(obj, path)
    config_file = tmp_path / "hrda_config.py"
    config_file.write_text(CONFIG_FILE)
    out = str(tmp_path / "out")
    args = [sys.executable, "-m", "launch.convert", f"--from={path}",
            f"--config={config_file}", f"--out={out}"]  # fmt: skip
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "layout: hrda" in result.stdout
    assert "scale_attention" in result.stdout

    variables, meta = _restore(out, config)
    report = convert.ConversionReport(**meta["report"])
    _check_report(report, state_dict)
    _assert_loaded_equal(report, variables, state_dict)
    model = models.build_segmenter(config.model, config.num_classes)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = torch_model.decode(images)
    ours = jax.jit(model.apply, compiler_options=FAST_COMPILE)(variables, _nhwc(images))
    assert _relative_error(ours["main"], want) < TOLERANCE
