"""MiT / SegFormer / DAFormer / HRDA PyTorch state dicts -> the variables of
`jaxda.models.segformer.SegFormer` and its subclass `jaxda.models.hrda.HRDA` (NumPy only;
`jaxda.interop.convert` reads the files).

A mapping of its own rather than rules in `torch_layouts`: those are built around ResNet
blocks and DeepLab's ASPP heads, while MiT's keys translate one to one by name. Layouts (their
`Layout` entries, descriptions and detection live in `jaxda.interop.layouts`):

  mit        SegFormer's ImageNet encoders `mit_b0.pth` .. `mit_b5.pth`: a raw state dict of
             patch_embed{1..4}.*, block{1..4}.{j}.*, norm{1..4}.* and the 1000-class classifier
             `head.*`, which is skipped (the official code drops it too). Into either decoder;
             the decoder keeps its initialisation.
  segformer  NVlabs SegFormer segmentation checkpoints {'meta', 'state_dict'}: backbone.*,
             decode_head.linear_c{1..4}.proj, linear_fuse.{conv,bn}, linear_pred (decoder
             'mlp'); the unused decode_head.conv_seg is skipped. NVlabs concatenates the stage
             embeddings [c4, c3, c2, c1], jaxda [c1, c2, c3, c4]: linear_fuse's input channels
             are permuted accordingly.
  daformer   DAFormer training checkpoints (the whole UDA wrapper): the student `model.`
             (backbone.*, decode_head.embed_layers / fuse_layer / conv_seg; decoder
             'daformer') is loaded; the EMA teacher `ema_model.*` and the frozen ImageNet copy
             `imnet_model.*` (and MIC's `mic.teacher.ema_model.*`) are ignored. HRDA files
             (decode_head.scale_attention.*) are refused with a pointer to `hrda`.
  hrda       HRDA / MIC(HRDA) training checkpoints, into model 'hrda': the student `model.`
             (backbone.*, decode_head.head.* = DAFormer's head, decode_head.scale_attention.*
             = DAFormer's head with a 1x1 ConvModule `fuse_layer` -> params/head/... and
             params/scale_attention/...; HRDAHead's own conv_seg is deleted by the official
             code, so there is none) is loaded; `ema_model.*`, `imnet_model.*` and MIC's
             second teacher `mic.teacher.ema_model.*` (mask_alpha != 'same') are ignored. A
             bare student state dict (backbone.*, decode_head.*: the official test script
             strips 'model.') loads too.

Encoder keys -> params/backbone/...: patch_embed{i}.proj -> patch_embed{i}/proj,
block{i}.{j}.attn.q -> block{i}_{j}/attn/q, block{i}.{j}.mlp.dwconv.dwconv -> .../mlp/dwconv,
norm{i} -> norm{i}; LayerNorm weight -> scale. Head keys: '.' between a module and its index
becomes '_' (embed_layers.0 -> embed_layers_0); BN weight / bias -> params scale / bias,
running_mean / running_var -> batch_stats mean / var; num_batches_tracked is ignored. Linear
[out, in] -> kernel [in, out]; conv OIHW -> HWIO (depthwise [C, 1, 3, 3] -> [3, 3, 1, C]).
"""

import collections
import re
from collections.abc import Mapping

import numpy as np
from flax import traverse_util

from jaxda.interop.key_names import path_str
from jaxda.interop.layouts import ConversionError, strip_module
from jaxda.interop.torch_layouts import ConversionReport, to_jax_layout, torch_shape

MIT_LAYOUTS = ("mit", "segformer", "daformer", "hrda")
MODEL = "segformer"  # config.model.name of `jaxda.models.segformer.SegFormer`.
HRDA_MODEL = "hrda"  # config.model.name of `jaxda.models.hrda.HRDA`.
MODELS = (MODEL, HRDA_MODEL)
# layout -> the config.model.decoder whose parameters the file's head fills ('' = no head);
# HRDA's `head` and `scale_attention` are both DAFormer heads.
DECODERS = {"mit": "", "segformer": "mlp", "daformer": "daformer", "hrda": "daformer"}
# layout -> (encoder key prefix, decoder key prefix); `prefixes` resolves HRDA's.
PREFIXES = {
    "mit": ("", None),
    "segformer": ("backbone.", "decode_head."),
    "daformer": ("model.backbone.", "model.decode_head."),
    "hrda": ("model.backbone.", "model.decode_head."),
}
# The marker of HRDA's head: HRDAHead holds the scale attention beside the DAFormer head.
HRDA_MARKER = "decode_head.scale_attention."
# layout -> [(regex, reason)] of keys that are recognised and not loaded.
SKIP = {
    "mit": [
        (r"head\.(weight|bias)", "MiT's ImageNet classifier (1000 classes): not part of the "
         "segmentation network (the official code drops it, load_state_dict(strict=False))"),
    ],
    "segformer": [
        (r"decode_head\.conv_seg\.(weight|bias)", "mmseg's BaseDecodeHead.conv_seg, unused by "
         "SegFormer's head (its classifier is linear_pred)"),
    ],
    "daformer": [],
    "hrda": [],
}  # fmt: skip
_UDA_WRAPPER = [  # DAFormer's DACS and its descendants (HRDA, MIC) save the whole UDA module.
    (r"ema_model\..*", "the EMA teacher (the student `model.` is converted)"),
    (r"imnet_model\..*", "the frozen ImageNet model (its encoder: the feature distance)"),
    (r"mic\.teacher\.ema_model\..*", "MIC's own EMA teacher (mask_alpha != 'same')"),
]
IGNORE = {"mit": [], "segformer": [], "daformer": _UDA_WRAPPER, "hrda": _UDA_WRAPPER}
_NUM_BATCHES_TRACKED = "BatchNorm step counter (unused by jaxda)"
_BN_FIELDS = {
    "weight": ("params", "scale"),
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}
_PARAM = r"(weight|bias)"
_BN = r"(weight|bias|running_mean|running_var)"


def encoder_path(name: str) -> tuple | None:
    """'block3.17.attn.kv.weight' -> ('params', 'backbone', 'block3_17', 'attn', 'kv',
    'kernel'); None for a name that is not an encoder tensor."""
    if m := re.fullmatch(rf"patch_embed([1-4])\.(proj|norm)\.{_PARAM}", name):
        module, leaf = m[2], m[3]
        return ("params", "backbone", f"patch_embed{m[1]}", module, _leaf(module, leaf))
    if m := re.fullmatch(rf"norm([1-4])\.{_PARAM}", name):
        return ("params", "backbone", f"norm{m[1]}", _leaf("norm", m[2]))
    m = re.fullmatch(
        rf"block([1-4])\.(\d+)\.(norm1|norm2|attn\.(?:q|kv|sr|norm|proj)|"
        rf"mlp\.(?:fc1|fc2|dwconv\.dwconv))\.{_PARAM}",
        name,
    )
    if m:
        modules = m[3].replace("dwconv.dwconv", "dwconv").split(".")
        block = f"block{m[1]}_{int(m[2])}"
        return ("params", "backbone", block, *modules, _leaf(modules[-1], m[4]))
    return None


def _leaf(module: str, field: str) -> str:
    if field == "bias":
        return "bias"
    return "scale" if module.startswith("norm") else "kernel"


def _conv_or_bn(modules: tuple, kind: str, field: str, root: str = "head") -> tuple | None:
    """A ConvModule's conv (weight only) or bn tensor, under the head module `root`."""
    if kind == "bn":
        collection, leaf = _BN_FIELDS[field]
        return (collection, root, *modules, "bn", leaf)
    return ("params", root, *modules, "conv", "kernel") if field == "weight" else None


def decoder_path(name: str, layout: str) -> tuple | None:
    """Variable path of a decode-head tensor name (without 'decode_head.') of a file of
    `layout` ('segformer', 'daformer' or 'hrda'), or None."""
    if layout == "segformer":
        return _segformer_path(name)
    if layout == "daformer":
        return _daformer_path(name)
    if name.startswith("head."):
        return _daformer_path(name.removeprefix("head."))
    if name.startswith("scale_attention."):
        return _conv_fusion_path(name.removeprefix("scale_attention."), "scale_attention")
    return None


def _embed_or_classifier(name: str, root: str) -> tuple | None:
    if m := re.fullmatch(rf"embed_layers\.(\d)\.proj\.{_PARAM}", name):
        return ("params", root, f"embed_layers_{m[1]}", _leaf("proj", m[2]))
    if m := re.fullmatch(rf"conv_seg\.{_PARAM}", name):
        return ("params", root, "conv_seg", _leaf("conv", m[1]))
    return None


def _conv_fusion_path(name: str, root: str) -> tuple | None:
    """`segformer_heads.ConvFusionHead` (HRDA's scale attention): DAFormer's head whose
    fuse_layer is a single 1x1 ConvModule."""
    if m := re.fullmatch(rf"fuse_layer\.(conv|bn)\.{_BN}", name):
        return _conv_or_bn(("fuse_layer",), m[1], m[2], root)
    return _embed_or_classifier(name, root)


def _daformer_path(name: str) -> tuple | None:
    if path := _embed_or_classifier(name, "head"):
        return path
    if m := re.fullmatch(rf"fuse_layer\.bottleneck\.(conv|bn)\.{_BN}", name):
        return _conv_or_bn(("fuse_layer", "bottleneck"), m[1], m[2])
    m = re.fullmatch(
        rf"fuse_layer\.aspp_modules\.(\d+)\.((?:depthwise_conv|pointwise_conv)\.)?"
        rf"(conv|bn)\.{_BN}",
        name,
    )
    if not m:
        return None
    modules = ("fuse_layer", f"aspp_modules_{m[1]}")
    if m[2]:
        modules = (*modules, m[2][:-1])
    return _conv_or_bn(modules, m[3], m[4])


def _segformer_path(name: str) -> tuple | None:
    if m := re.fullmatch(rf"linear_c([1-4])\.proj\.{_PARAM}", name):
        return ("params", "head", f"linear_c{m[1]}", _leaf("proj", m[2]))
    if m := re.fullmatch(rf"linear_pred\.{_PARAM}", name):
        return ("params", "head", "linear_pred", _leaf("conv", m[1]))
    if m := re.fullmatch(rf"linear_fuse\.(conv|bn)\.{_BN}", name):
        return _conv_or_bn(("linear_fuse",), m[1], m[2])
    return None


def _nvlabs_fuse_order(weight: np.ndarray) -> np.ndarray:
    """linear_fuse.conv.weight [E, 4E, 1, 1] with inputs [c4, c3, c2, c1] -> [c1, .., c4]."""
    e = weight.shape[0]
    blocks = weight.reshape(e, 4, weight.shape[1] // 4, *weight.shape[2:])
    return blocks[:, ::-1].reshape(weight.shape)


def encoder_structure(paths) -> tuple[int, ...]:
    """Blocks per stage (0 when absent) of encoder variable paths (('params', 'backbone',
    'block3_17', ...))."""
    counts = collections.Counter()
    for path in paths:
        if len(path) > 2 and (m := re.fullmatch(r"block([1-4])_(\d+)", path[2])):
            counts[int(m[1])] = max(counts[int(m[1])], int(m[2]) + 1)
    return tuple(counts.get(stage, 0) for stage in range(1, 5))


def _variant_name(depths, dims) -> str:
    from jaxda.models import mit  # Import here: models pull in JAX, this module is NumPy.

    for name, (variant_dims, variant_depths) in mit.VARIANTS.items():
        if tuple(variant_depths) == tuple(depths) and tuple(variant_dims) == tuple(dims):
            return f"MiT-{name.upper()}"
    return "a custom MiT"


def _embed_dims(shapes: Mapping[int, tuple]) -> tuple:
    return tuple(shapes.get(stage, (0,))[0] for stage in range(1, 5))


def map_state_dict(
    state_dict: Mapping[str, object],
    target: Mapping,
    layout: str,
    *,
    decoder: str,
    container: str = "bare",
    container_entries=(),
    skip_head: bool = False,
) -> tuple[dict, ConversionReport]:
    """Maps a flat PyTorch state dict of a MiT layout onto SegFormer (or HRDA) variables.

    Args:
      state_dict: name -> array (PyTorch layouts); a leading 'module.' is stripped.
      target: the model's variables or their shapes ({'params', 'batch_stats'}); HRDA's
        have 'scale_attention' beside 'head'.
      layout: one of `MIT_LAYOUTS`.
      decoder: the model's config.model.decoder ('daformer' or 'mlp').
      container / container_entries: from `layouts.unwrap`, for the report.
      skip_head: load the encoder only (a file whose head has another class count or
        another decoder); its head keys are skipped.

    Returns:
      ({variable path: float32 array, Flax layout}, report): every key of the file is loaded,
      skipped or ignored with the reason, or listed as unexpected.

    Raises:
      ConversionError: another decoder than the file's (without skip_head), an HRDA file for
        a SegFormer or a SegFormer / DAFormer file for an HRDA (`check_model`), an encoder of
        another shape (naming its variant, the keys and both shapes), a head of another shape
        (another class count: pass --skip_head or set --config.num_classes).
    """
    if layout not in MIT_LAYOUTS:
        raise ConversionError(f"{layout!r} is not a MiT layout ({MIT_LAYOUTS})")
    names = {key: strip_module(key) for key in state_dict}
    targets = traverse_util.flatten_dict(target)
    hrda_model = any(p[1] == "scale_attention" for p in targets)
    check_model(layout, HRDA_MODEL if hrda_model else MODEL, names.values(), skip_head)
    encoder_prefix, head_prefix = prefixes(layout, names.values())
    file_decoder = DECODERS[layout]
    has_head = bool(head_prefix) and any(n.startswith(head_prefix) for n in names.values())
    if has_head and file_decoder != decoder and not skip_head:
        raise ConversionError(
            f"The file's decode head is {_HEAD_TITLES[layout]} (layout {layout!r}), "
            f"the config's config.model.decoder={decoder!r}: pass "
            f"--config.model.decoder={file_decoder}, or --skip_head to load the encoder only."
        )
    report = ConversionReport(layout=layout, container=container)
    for entry in container_entries:
        report.ignored[entry] = f"{container} checkpoint entry (not network weights)"
    entries = {}  # path -> (key, value in PyTorch layout)
    for key, name in names.items():
        reason = next((r for p, r in IGNORE[layout] if re.fullmatch(p, name)), None)
        if reason is None and name.endswith("num_batches_tracked"):
            reason = _NUM_BATCHES_TRACKED
        if reason is not None:
            report.ignored[key] = reason
            continue
        reason = next((r for p, r in SKIP[layout] if re.fullmatch(p, name)), None)
        if reason is not None:
            report.skipped[key] = reason
            continue
        path = None
        if name.startswith(encoder_prefix):
            path = encoder_path(name[len(encoder_prefix) :])
        if path is None and head_prefix and name.startswith(head_prefix):
            if skip_head:
                report.skipped[key] = "--skip_head: the decoder keeps its initialisation"
                continue
            path = decoder_path(name[len(head_prefix) :], layout)
        if path is None:
            report.unexpected.append(key)
            continue
        value = np.asarray(state_dict[key])
        if layout == "segformer" and path[2:] == ("linear_fuse", "conv", "kernel"):
            value = _nvlabs_fuse_order(value)
        entries[path] = (key, value)

    head_unknown = [k for k in report.unexpected if names[k].startswith(head_prefix or "\0")]
    if head_unknown:  # Else the decoder would silently keep its initialisation.
        raise ConversionError(
            f"The file's decode head is not {_HEAD_TITLES[layout]} as layout "
            f"{layout!r} expects: {len(head_unknown)} key(s) not understood, e.g. "
            f"{head_unknown[:3]}. Pass --skip_head to load the encoder only."
        )
    _check_encoder(entries, targets)
    _check_shapes(entries, targets)
    loaded = {}
    for path, (key, value) in entries.items():
        if path not in targets:
            report.unexpected.append(key)
            continue
        dtype = getattr(targets[path], "dtype", np.float32)
        # A copy: the arrays must not alias the caller's (e.g. a live torch model's) memory.
        loaded[path] = np.array(to_jax_layout(value), dtype=dtype, order="C", copy=True)
        report.loaded[key] = path_str(path)
    report.missing = [path_str(p) for p in targets if p not in loaded]
    report.unexpected = sorted(report.unexpected)
    if not loaded:
        raise ConversionError(
            f"No tensor of the file matches layout {layout!r} (keys not understood, e.g. "
            f"{report.unexpected[:4]})."
        )
    if not any(p[1] == "head" for p in loaded):
        report.notes.append("the decoder is not in the file: it keeps its initialisation")
    if layout == "segformer" and not skip_head:
        report.notes.append(
            "linear_fuse's input channels were reordered from NVlabs' [c4, c3, c2, c1] to "
            "jaxda's [c1, c2, c3, c4]"
        )
    if report.unexpected:
        report.notes.append(
            f"{len(report.unexpected)} key(s) were not understood in layout {layout!r} and "
            "were not loaded"
        )
    return loaded, report


_FILE_TITLES = {"segformer": "NVlabs SegFormer", "daformer": "DAFormer"}
_HEAD_TITLES = {
    "segformer": "SegFormer's all-MLP head",
    "daformer": "DAFormer's head",
    "hrda": "HRDA's (a DAFormer head and the scale attention, a DAFormer head with a 1x1 conv "
    "fusion; HRDA on DeepLabV2 is not modelled)",
}


def prefixes(layout: str, names) -> tuple[str, str | None]:
    """(encoder, decoder) key prefixes of a file of `layout` with these (module-stripped)
    names: an HRDA file is a training checkpoint (`model.`) or the bare student."""
    if layout == "hrda" and not any(n.startswith("model.") for n in names):
        return "backbone.", "decode_head."
    return PREFIXES[layout]


def check_model(layout: str, model_name: str, names, skip_head: bool = False) -> None:
    """Raises ConversionError, naming the keys that show it, when an HRDA file meets a
    SegFormer / DAFormer model (config.model.name 'segformer') or a SegFormer / DAFormer
    file an HRDA model ('hrda'): the heads differ (HRDA's sit under decode_head.head and
    decode_head.scale_attention). With `skip_head` the encoder alone loads into either.
    Also an HRDA file read with another layout (--layout), which would misread its head."""
    names = sorted(names)
    marked = [n for n in names if HRDA_MARKER in n]
    if marked and layout not in ("mit", "hrda"):
        raise ConversionError(
            f"The file is an HRDA / MIC(HRDA) checkpoint ({marked[0]}, ...), not of layout "
            f"{layout!r}: convert it with --layout=hrda (or without --layout) into an HRDA "
            "config (config.model.name='hrda')."
        )
    if layout == "mit" or model_name not in MODELS or skip_head:
        return
    if (layout == "hrda") == (model_name == HRDA_MODEL):
        return
    head_prefix = prefixes(layout, names)[1] or "\0"
    head = [n for n in names if n.startswith(head_prefix)][:3]
    if layout == "hrda":
        raise ConversionError(
            f"The file is an HRDA / MIC(HRDA) checkpoint (layout 'hrda': {head}, ...), the "
            f"config's model SegFormer / DAFormer (config.model.name={model_name!r}), which "
            "has no scale attention: pass --config.model.name=hrda (its defaults, e.g. "
            "attention_embed_dim 256, are the official ones), or --skip_head to load the "
            "encoder only."
        )
    raise ConversionError(
        f"The file is a {_FILE_TITLES[layout]} checkpoint without HRDA's scale attention "
        f"(layout {layout!r}, no decode_head.scale_attention.* key; its head: {head}, ...), "
        "the config's model HRDA (config.model.name='hrda'): convert it with a SegFormer / "
        "DAFormer config (config.model.name='segformer'), or pass --skip_head to load the "
        "encoder only (the heads keep their initialisation)."
    )


def _check_encoder(entries: dict, targets: dict) -> None:
    """Raises when the file's encoder has other depths or widths than the model's, naming
    both variants and the first keys whose shapes differ."""
    in_file = {p: v for p, (_, v) in entries.items() if p[1] == "backbone"}
    if not in_file:
        return
    file_depths, model_depths = encoder_structure(in_file), encoder_structure(targets)

    def widths(shapes):
        return _embed_dims({int(p[2][-1]): s for p, s in shapes.items() if p[2].startswith("norm")})

    file_dims = widths({p: v.shape for p, v in in_file.items() if p[-1] == "scale"})
    model_dims = widths({p: torch_shape(t.shape) for p, t in targets.items()
                         if p[1] == "backbone" and p[-1] == "scale"})  # fmt: skip
    if file_depths == model_depths and file_dims == model_dims:
        return
    problems = [
        f"  {entries[p][0]}: file {tuple(v.shape)}, model {torch_shape(targets[p].shape)}"
        for p, v in in_file.items()
        if p in targets and tuple(v.shape) != torch_shape(targets[p].shape)
    ][:6]
    if file_depths != model_depths:
        problems.append(f"  blocks per stage: file {file_depths}, model {model_depths}")
    file_variant = _variant_name(file_depths, file_dims)
    hint = (
        f"pass --config.model.variant={file_variant[4:].lower()}"
        if file_variant.startswith("MiT-")
        else "set --config.model.embed_dims / depths to the file's"
    )
    raise ConversionError(
        f"The file's encoder is {file_variant} (depths {file_depths}, widths {file_dims}), the "
        f"config's model {_variant_name(model_depths, model_dims)} (depths {model_depths}, "
        f"widths {model_dims}):\n" + "\n".join(problems) + f"\n{hint}."
    )


def _check_shapes(entries: dict, targets: dict) -> None:
    problems = [
        (key, tuple(value.shape), torch_shape(targets[path].shape), path[1])
        for path, (key, value) in entries.items()
        if path in targets and tuple(value.shape) != torch_shape(targets[path].shape)
    ]
    if problems:
        lines = "\n".join(f"  {k}: file {a}, model {b}" for k, a, b, _ in problems[:10])
        keys = "config.model.decoder_embed_dim / decoder_width"
        if any(module == "scale_attention" for *_, module in problems):
            keys += " / attention_embed_dim / attention_classwise"
        raise ConversionError(
            f"Shape mismatch (PyTorch layout [out, in, kh, kw]):\n{lines}\nThe decoder "
            "differs (another class count or width?): pass --skip_head to load the encoder "
            f"only, or set --config.num_classes / {keys} to the file's."
        )
