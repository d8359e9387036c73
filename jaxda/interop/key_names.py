"""PyTorch key names -> jaxda variable paths, per checkpoint layout (NumPy / pure Python, no torch).

Each published code base names its tensors its own way; these functions and tables turn one
name ('layer3.4.bn2.running_var', 'layer5.conv2d_list.2.1.weight', 'aspp.img_conv.0.weight',
SimCLRv2's 'net.3.blocks.0.net.1.0.running_mean') into the path of the matching variable of
jaxda's models (('batch_stats', 'backbone', 'layer3_4', 'bn2', 'var')), or None when the name
has no counterpart. `jaxda.interop.torch_layouts.map_state_dict` uses them; the layouts
themselves are described in `jaxda.interop.layouts`.
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
        block, rest = f"layer{m[1]}_{int(m[2])}", m[3]
        if c := re.fullmatch(r"(conv[1-3])\.weight", rest):
            return ("params", "backbone", block, c[1], "kernel")
        if c := re.fullmatch(r"downsample\.0\.weight", rest):
            return ("params", "backbone", block, "downsample", "kernel")
        if c := re.fullmatch(rf"(bn[1-3]|downsample\.1)\.{_BN}", rest):
            collection, leaf = _BN_FIELDS[c[2]]
            module = "bn_downsample" if c[1] == "downsample.1" else c[1]
            return (collection, "backbone", block, module, leaf)
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
