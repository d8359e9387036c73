"""PyTorch key names -> jaxda variable paths, per checkpoint layout (NumPy / pure Python, no torch).

Each published code base names its tensors its own way; these functions and tables turn one
name ('layer3.4.bn2.running_var', 'layer5.conv2d_list.2.1.weight', 'aspp.img_conv.0.weight',
SimCLRv2's 'net.3.blocks.0.net.1.0.running_mean') into the path of the matching variable of
jaxda's models (('batch_stats', 'backbone', 'layer3_4', 'bn2', 'var')), or None when the name
has no counterpart. `jaxda.interop.torch_layouts.map_state_dict` uses them; the layouts
themselves are described in `jaxda.interop.layouts`.

RobustNet's normalisation keys (config.model.instance_norm / instance_norm_at):

  layer0.1.{weight,bias}         IBN stem, 7x7 ('affine', 'stem')  -> instance_norm1/{scale,bias}
  layer0.7.{weight,bias}         IBN stem, deep stem               -> instance_norm3/{scale,bias}
  layerK.B.instance_norm_layer.{weight,bias}  IBN after layer K's last block B
                                              -> layerK_B/instance_norm/{scale,bias}

(all under params/backbone). An IBN stem norm has no running statistics; a 'plain' one (IW /
IRW / ISW) has no key at all, nor has a 'plain' `instance_norm_layer`. `file_stem_norms`,
`file_blocks` and `model_stem_norms` tell which a file and a model have, for
`jaxda.interop.norm_check.check_instance_norm`.
"""

import re

_BN_FIELDS = {
    "weight": ("params", "scale"),
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}
_BN = r"(weight|bias|running_mean|running_var)"


def path_str(path: tuple) -> str:
    return "/".join(path)


def backbone_path(name: str) -> tuple | None:
    """jaxda variable path of a backbone tensor name ('layer3.4.bn2.running_var'), or None.

    Stem conv2/bn2/conv3/bn3 exist only in RobustNet's ResNet3X3 (jaxda's `deep_stem`)."""
    if m := re.fullmatch(r"(conv[1-3])\.weight", name):
        return ("params", "backbone", m[1], "kernel")
    if m := re.fullmatch(rf"(bn[1-3])\.{_BN}", name):
        collection, leaf = _BN_FIELDS[m[2]]
        return (collection, "backbone", m[1], leaf)
    if m := re.fullmatch(r"layer([1-4])\.(\d+)\.(.+)", name):
        path = _block_path(m[3])
        return (
            None if path is None else (path[0], "backbone", f"layer{m[1]}_{int(m[2])}", *path[1:])
        )
    return None


def _block_path(name: str) -> tuple | None:
    """(collection, module, leaf) of a bottleneck tensor name ('downsample.1.running_var')."""
    if c := re.fullmatch(r"(conv[1-3]|downsample\.0)\.weight", name):
        return ("params", "downsample" if c[1] == "downsample.0" else c[1], "kernel")
    if c := re.fullmatch(rf"(bn[1-3]|downsample\.1)\.{_BN}", name):
        collection, leaf = _BN_FIELDS[c[2]]
        return (collection, "bn_downsample" if c[1] == "downsample.1" else c[1], leaf)
    if c := re.fullmatch(r"instance_norm_layer\.(weight|bias)", name):  # RobustNet's IBN.
        return ("params", "instance_norm", _BN_FIELDS[c[1]][1])
    return None


# ProDA's head (`layer5`, `Classifier_Module2`) -> `jaxda.models.proda.ProDAHead` modules.
_PRODA_GROUP_NORMS = {"bottleneck.2": "fuse_gn"}
_PRODA_CONVS = {"bottleneck.1": "fuse", "head.1": "classifier"}
_PRODA_LINEARS = {"bottleneck.0.se.0": "se_fc1", "bottleneck.0.se.2": "se_fc2"}


def proda_path(name: str) -> tuple[tuple, str] | None:
    """(jaxda path, group) of a ProDA `layer5.*` / `bn_pretrain.*` name, or None.

    'layer5.conv2d_list.2.1.weight' -> (('params', 'head', 'branch2_gn', 'scale'), 'head');
    'layer5.bottleneck.0.se.0.weight' -> (('params', 'head', 'se_fc1', 'kernel'), 'head')."""
    if m := re.fullmatch(rf"bn_pretrain\.{_BN}", name):
        collection, leaf = _BN_FIELDS[m[1]]
        return (collection, "bn_pretrain", leaf), "bn_pretrain"
    m = re.fullmatch(r"layer5\.(.+)\.(weight|bias)", name)
    if not m:
        return None
    module, field = m[1], m[2]
    if b := re.fullmatch(r"conv2d_list\.(\d+)\.([01])", module):
        norm = b[2] == "1"
        jax_module = f"branch{b[1]}" + ("_gn" if norm else "")
    elif module in _PRODA_GROUP_NORMS:
        norm, jax_module = True, _PRODA_GROUP_NORMS[module]
    elif module in _PRODA_CONVS or module in _PRODA_LINEARS:
        norm, jax_module = False, {**_PRODA_CONVS, **_PRODA_LINEARS}[module]
    else:
        return None
    leaf = ("scale" if norm else "kernel") if field == "weight" else "bias"
    return ("params", "head", jax_module, leaf), "head"


# SimCLRv2-Pytorch (Separius) ResNet names -> torchvision names (selective-kernel-free nets):
# net.0 = Stem(conv, BatchNormRelu, maxpool), net.{1..4} = Blocks, each block's `net` =
# (conv1, BNReLU, conv2, BNReLU, conv3, BN), `projection` = (shortcut conv, BN).
_SIMCLR_BLOCK = {
    "net.0": "conv1",
    "net.1.0": "bn1",
    "net.2": "conv2",
    "net.3.0": "bn2",
    "net.4": "conv3",
    "net.5.0": "bn3",
    "projection.shortcut": "downsample.0",
    "projection.bn.0": "downsample.1",
}


def simclr_to_torchvision(name: str) -> str:
    """'net.3.blocks.0.net.1.0.running_mean' -> 'layer3.0.bn1.running_mean'; other names (the
    torchvision names of ProDA's `['state_dict']` file) are returned unchanged."""
    if m := re.fullmatch(r"net\.0\.(0|1\.0)\.(\w+)", name):
        return f"{'conv1' if m[1] == '0' else 'bn1'}.{m[2]}"
    if m := re.fullmatch(r"net\.([1-4])\.blocks\.(\d+)\.(.+)\.(\w+)", name):
        module = _SIMCLR_BLOCK.get(m[3])
        if module is not None:
            return f"layer{m[1]}.{m[2]}.{module}.{m[4]}"
    return name


def _units(*pairs) -> dict[str, tuple]:
    """{torch module: (jaxda module path, 'conv' | 'bn')} of (conv, bn, jaxda unit) triples;
    a None bn marks a bare conv (a classifier)."""
    table = {}
    for conv, bn, path in pairs:
        if bn is None:
            table[conv] = (path, "conv")
        else:
            table[conv] = ((*path, "conv"), "conv")
            table[bn] = ((*path, "bn"), "bn")
    return table


# DeepLabV3+ heads (docs/methods/checkpoints.md): official module names -> jaxda modules.
_V3PLUS_HEADS = {
    "robustnet": _units(
        ("aspp.img_conv.0", "aspp.img_conv.1", ("aspp", "pool")),
        *(
            (f"aspp.features.{i}.0", f"aspp.features.{i}.1", ("aspp", f"branch{i}"))
            for i in range(4)
        ),
        ("bot_aspp.0", "bot_aspp.1", ("aspp", "project")),
        ("bot_fine.0", "bot_fine.1", ("decoder", "low_level")),
        ("final1.0", "final1.1", ("decoder", "conv1")),
        ("final1.3", "final1.4", ("decoder", "conv2")),
        ("final2.0", None, ("decoder", "classifier")),
        ("dsn.0", "dsn.1", ("head_aux", "unit")),
        ("dsn.4", None, ("head_aux", "classifier")),
    ),
    "jfzhang95": _units(
        *(
            (f"aspp.aspp{i + 1}.atrous_conv", f"aspp.aspp{i + 1}.bn", ("aspp", f"branch{i}"))
            for i in range(4)
        ),
        ("aspp.global_avg_pool.1", "aspp.global_avg_pool.2", ("aspp", "pool")),
        ("aspp.conv1", "aspp.bn1", ("aspp", "project")),
        ("decoder.conv1", "decoder.bn1", ("decoder", "low_level")),
        ("decoder.last_conv.0", "decoder.last_conv.1", ("decoder", "conv1")),
        ("decoder.last_conv.4", "decoder.last_conv.5", ("decoder", "conv2")),
        ("decoder.last_conv.8", None, ("decoder", "classifier")),
    ),
}
# RobustNet's `layer0 = nn.Sequential(conv1, bn1, relu1[, conv2, bn2, relu2, conv3, bn3,
# relu3], maxpool)`: Sequential indices -> torchvision stem names.
_ROBUSTNET_STEM = {"0": "conv1", "1": "bn1", "3": "conv2", "4": "bn2", "6": "conv3", "7": "bn3"}


def v3plus_path(name: str, variant: str) -> tuple[tuple, str] | None:
    """(jaxda path, group) of a DeepLabV3+ tensor name (after 'module.'), or None."""
    backbone_name = None
    if variant == "robustnet":
        if m := re.fullmatch(r"layer0\.(\d+)\.(.+)", name):
            stem = _ROBUSTNET_STEM.get(m[1])
            backbone_name = f"{stem}.{m[2]}" if stem else ""
        elif re.match(r"layer[1-4]\.", name):
            backbone_name = name
    elif name.startswith("backbone."):
        backbone_name = name[len("backbone.") :]
    if backbone_name is not None:
        path = backbone_path(backbone_name)
        return None if path is None else (path, "backbone")
    module, _, field = name.rpartition(".")
    path, kind = _V3PLUS_HEADS[variant].get(module, (None, None))
    if kind == "conv" and field in ("weight", "bias"):
        return ("params", *path, "kernel" if field == "weight" else "bias"), path[0]
    if kind == "bn" and field in _BN_FIELDS:
        collection, leaf = _BN_FIELDS[field]
        return (collection, *path, leaf), path[0]
    return None


# RobustNet's normalisation family (`network/Resnet.py`, `--wt_layer`). Its stem norm sits at
# `layer0.<i>`, the BN's place: a BatchNorm2d (weight, bias, running statistics), an affine
# InstanceNorm2d (IBN-Net, code 4: weight and bias, no running statistics) or InstanceWhitening
# (IW / IRW / ISW, codes 1-3: an InstanceNorm2d without affine, no keys). The last block of a
# layer adds `instance_norm_layer` after its residual sum (IBN: weight, bias; IW/IRW/ISW: none).
# jaxda's model replaces `bn<i>` by `instance_norm<i>` ('scale', 'bias' only when affine) and
# adds `layer<K>_<last>/instance_norm`.
STEM_NORMS = {"bn1": 1, "bn2": 4, "bn3": 7}  # Stem norm -> its `layer0` index.


def model_stem_norms(paths) -> dict[str, str]:
    """{'bn1'[, 'bn2', 'bn3']: 'bn' | 'affine' | 'plain'}: what normalises each stem conv of a
    model with these variable paths (a dict or set of path tuples)."""
    deep = any(p[1:3] == ("backbone", "conv2") for p in paths)
    kinds = {}
    for index in (1, 2, 3) if deep else (1,):
        if ("params", "backbone", f"bn{index}", "scale") in paths:
            kinds[f"bn{index}"] = "bn"
        elif ("params", "backbone", f"instance_norm{index}", "scale") in paths:
            kinds[f"bn{index}"] = "affine"
        else:
            kinds[f"bn{index}"] = "plain"
    return kinds


def model_instance_norm_blocks(paths) -> dict[int, int]:
    """{layer: block} of a model's blocks with an affine InstanceNorm (a 'plain' one has no
    variables: it cannot be seen in the paths)."""
    found = {}
    for path in paths:
        if (
            len(path) > 3
            and path[-2:] == ("instance_norm", "scale")
            and (m := re.fullmatch(r"layer(\d)_(\d+)", path[-3]))
        ):
            found[int(m[1])] = int(m[2])
    return found


def file_stem_norms(names) -> dict[str, tuple[str, list[str]]]:
    """{'bn1'[, 'bn2', 'bn3']: (kind, its keys)} of a RobustNet state dict's names (after
    'module.'), for each stem conv the file has; kind 'bn' (running statistics), 'affine'
    (weight and bias only) or 'plain' (no key)."""
    names = set(names)
    deep = "layer0.3.weight" in names or "layer0.6.weight" in names
    norms = {}
    for bn, index in STEM_NORMS.items():
        if (bn == "bn1" or deep) and f"layer0.{index - 1}.weight" in names:
            keys = sorted(n for n in names if re.fullmatch(rf"layer0\.{index}\.{_BN}", n))
            fields = {k.rsplit(".", 1)[1] for k in keys}
            statistics = {"running_mean", "running_var"} & fields
            norms[bn] = ("bn" if statistics else "affine" if fields else "plain", keys)
    return norms


def file_blocks(names) -> tuple[dict[int, int], dict[int, list[int]]]:
    """({layer: number of blocks}, {layer: [blocks with IBN keys]}) of RobustNet names."""
    counts, ibn = {}, {}
    for name in names:
        if m := re.match(r"layer([1-4])\.(\d+)\.", name):
            layer, block = int(m[1]), int(m[2])
            counts[layer] = max(counts.get(layer, 0), block + 1)
            if re.fullmatch(r"layer\d\.\d+\.instance_norm_layer\.(weight|bias)", name):
                ibn.setdefault(layer, set()).add(block)
    return counts, {layer: sorted(b) for layer, b in ibn.items()}


def stem_instance_norm_path(path: tuple, kinds: dict) -> tuple | None:
    """A stem BN variable's path in a model whose `bn<i>` is an InstanceNorm (`kinds` from
    `model_stem_norms`): ('params', 'backbone', 'instance_norm<i>', 'scale' | 'bias') for the
    affine of an 'affine' one, None for what has no counterpart (running statistics, anything
    of a 'plain' one); any other path unchanged."""
    if len(path) != 4 or path[1] != "backbone" or kinds.get(path[2], "bn") == "bn":
        return path
    if kinds[path[2]] == "affine" and path[0] == "params":
        return ("params", "backbone", "instance_norm" + path[2][2:], path[3])
    return None


def blocks(paths) -> dict[int, int]:
    """{layer: number of blocks} of backbone paths."""
    counts = {}
    for path in paths:
        if (
            len(path) > 2
            and path[1] == "backbone"
            and (m := re.fullmatch(r"layer(\d)_(\d+)", path[2]))
        ):
            layer, block = int(m[1]), int(m[2])
            counts[layer] = max(counts.get(layer, 0), block + 1)
    return counts
