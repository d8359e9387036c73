"""The key layouts of the DeepLabV2-era UDA code's PyTorch checkpoints
(docs/methods/checkpoints.md, "Checkpoint
key layouts"), their containers, and detection of the layout from the keys (NumPy only).

Layouts (`LAYOUTS`, auto-detected from the keys by `detect_layout`, or named with --layout):

  deeplab_init    DeepLab's Caffe-converted init files (AdaptSegNet / MaxSquare
                  `DeepLab_resnet_pretrained_init-f81d91e8.pth`, ADVENT
                  `DeepLab_resnet_pretrained_imagenet.pth`): every key starts with `Scale.`;
                  `layer5` is a single head on layer4 and is skipped (not an error) when its
                  class count differs from the model's (21 VOC classes vs 19).
  deeplab_multi   AdaptSegNet / ADVENT multi-level `ResNetMulti`: `layer5` = aux head on
                  layer3 (1024 channels), `layer6` = main head on layer4.
  maxsquare       MaxSquare: the same names under `module.` (DataParallel), usually inside
                  {'epoch', 'iteration', 'state_dict', 'optimizer', 'best_MIou'}.
  deeplab_single  `Res_Deeplab` (AdaptSegNet single-level / oracle): `layer5` = main head.
  proda           ProDA `.pkl` {'ResNet101': {'model_state': ...}, ...}: only the backbone
                  maps; ProDA's `layer5` (ASPP with GroupNorm and an SE bottleneck) has no
                  counterpart in DeepLabV2 and is skipped, the heads keep their initialisation.
  dasac           da-sac {'model': ..., 'opt', 'score', 'epoch'}: `module.backbone.model.*`,
                  `layer5` = a single head on layer4 (the main head); the momentum teacher
                  (`module.slow_net.*`), `module.running_conf` and `module.slow_init` are ignored.
  torchvision     torchvision ResNet-50/101 (ImageNet) or any bare backbone state dict; `fc.*`
                  is ignored. torchvision puts a bottleneck's stride in its 3x3 conv, the Caffe
                  ResNet in the first 1x1: the weights have the same names and shapes and are
                  loaded by name, as ProDA does.
  disc_adaptseg   AdaptSegNet's FCDiscriminator: `conv1..conv4`, `classifier`.
  disc_advent     ADVENT's nn.Sequential discriminator: `0, 2, 4, 6, 8`.

A leading `module.` (DataParallel / DistributedDataParallel) is stripped in every layout, and
`num_batches_tracked` keys are ignored (the legacy Caffe-converted files have none). BatchNorm:
weight -> scale, bias -> bias, running_mean -> mean, running_var -> var; conv weights are
transposed from PyTorch's OIHW to Flax's HWIO.
"""

import dataclasses
from collections.abc import Mapping


class ConversionError(ValueError):
    """A checkpoint cannot be converted as asked; the message says why and what to pass."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one code base names its network's tensors.

    Attributes:
      name: the --layout value.
      description: where such files come from.
      kind: 'segmenter' (DeepLabV2 variables) or 'discriminator' (FCDiscriminator params).
      prefix: every key starts with it (after an optional 'module.'); stripped.
      heads: (PyTorch module, jaxda head) pairs of the ASPP classifiers.
      modules: discriminator layouts: (PyTorch module, jaxda conv) pairs.
      skip: (regex, reason): recognised keys this layout never loads (matched after 'module.').
      ignore: (regex, reason): keys that are not part of the network.
      skip_mismatched_heads: a head whose shapes differ from the model's is skipped (as the
        official code does with the init files' 21-class head) instead of an error.
    """

    name: str
    description: str
    kind: str = "segmenter"
    prefix: str = ""
    heads: tuple[tuple[str, str], ...] = ()
    modules: tuple[tuple[str, str], ...] = ()
    skip: tuple[tuple[str, str], ...] = ()
    ignore: tuple[tuple[str, str], ...] = ()
    skip_mismatched_heads: bool = False


_DISC_NAMES = ("conv1", "conv2", "conv3", "conv4", "classifier")

LAYOUTS = {
    layout.name: layout
    for layout in (
        Layout(
            "deeplab_init",
            "DeepLab init file ('Scale.' keys; AdaptSegNet/MaxSquare/ADVENT ImageNet/COCO init)",
            prefix="Scale.",
            heads=(("layer5", "head_main"),),
            skip_mismatched_heads=True,
        ),
        Layout(
            "deeplab_multi",
            "AdaptSegNet / ADVENT multi-level DeepLabV2 (layer5 aux on layer3, layer6 main)",
            heads=(("layer5", "head_aux"), ("layer6", "head_main")),
        ),
        Layout(
            "maxsquare",
            "MaxSquare multi-level DeepLabV2 ('module.' keys, layer5 aux, layer6 main)",
            heads=(("layer5", "head_aux"), ("layer6", "head_main")),
        ),
        Layout(
            "deeplab_single",
            "single-level DeepLabV2 (Res_Deeplab: layer5 on layer4)",
            heads=(("layer5", "head_main"),),
        ),
        Layout(
            "proda",
            "ProDA (backbone only)",
            skip=(
                (
                    r"layer5\..*",
                    "ProDA's head (ASPP with GroupNorm and an SE bottleneck) has no "
                    "DeepLabV2 counterpart; jaxda's heads keep their initialisation",
                ),
            ),
            ignore=((r"bn_pretrain\..*", "ProDA's --bn_clr copy of BatchNorm statistics"),),
        ),
        Layout(
            "dasac",
            "da-sac (module.backbone.model.*, layer5 = main head on layer4)",
            prefix="backbone.model.",
            heads=(("layer5", "head_main"),),
            ignore=(
                (r"slow_net\..*", "da-sac's momentum teacher (slow_net)"),
                (r"running_conf", "da-sac's running class confidence"),
                (r"slow_init", "da-sac's teacher-initialised flag"),
            ),
        ),
        Layout(
            "torchvision",
            "torchvision ResNet (ImageNet) or a bare backbone; loaded by name",
            ignore=((r"fc\..*", "torchvision's ImageNet classifier"),),
        ),
        Layout(
            "disc_adaptseg",
            "AdaptSegNet FCDiscriminator (conv1..conv4, classifier)",
            kind="discriminator",
            modules=tuple(zip(_DISC_NAMES, _DISC_NAMES, strict=True)),
        ),
        Layout(
            "disc_advent",
            "ADVENT discriminator (nn.Sequential 0, 2, 4, 6, 8)",
            kind="discriminator",
            modules=tuple(zip(("0", "2", "4", "6", "8"), _DISC_NAMES, strict=True)),
        ),
    )
}


def _is_array(value) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


def _is_state_dict(value) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(_is_array(v) for v in value.values())


def unwrap(obj) -> tuple[dict, str, list[str]]:
    """(state dict, container name, names of the container's other entries) of a loaded file.

    Containers: ProDA {'ResNet101': {'model_state': sd, ...}, 'iter', 'best_iou'}; da-sac
    {'model': sd, 'opt', 'score', 'epoch'}; MaxSquare (and other trainers)
    {'state_dict': sd, 'epoch', 'iteration', 'optimizer', 'best_MIou'}; or a bare state dict.
    The state dict's values are returned as they are (tensors or arrays).
    """
    if not isinstance(obj, Mapping):
        raise ConversionError(
            f"The file holds a {type(obj).__name__}, not a state dict or a checkpoint dict."
        )
    resnet = obj.get("ResNet101")
    if isinstance(resnet, Mapping) and _is_state_dict(resnet.get("model_state")):
        others = [k for k in obj if k != "ResNet101"]
        others += [f"ResNet101.{k}" for k in resnet if k != "model_state"]
        return dict(resnet["model_state"]), "proda", sorted(map(str, others))
    for container, key in (("dasac", "model"), ("state_dict", "state_dict")):
        if _is_state_dict(obj.get(key)):
            return dict(obj[key]), container, sorted(str(k) for k in obj if k != key)
    if _is_state_dict(obj):
        return dict(obj), "bare", []
    raise ConversionError(
        "Cannot find a state dict in the file: expected a bare state dict or a dict with "
        "'state_dict' (MaxSquare), 'model' (da-sac) or 'ResNet101.model_state' (ProDA); "
        f"top-level entries: {sorted(map(str, obj))[:20]}"
    )


def strip_module(key: str) -> str:
    return key[len("module.") :] if key.startswith("module.") else key


def detect_layout(keys, container: str = "bare") -> str:
    """The name of the layout of a state dict with these keys (see the module docstring)."""
    if container == "proda":  # Its backbone-only keys alone would read as torchvision.
        return container
    names = {strip_module(k) for k in keys}
    module_prefixed = any(k.startswith("module.") for k in keys)

    def any_starts(*prefixes):
        return any(n.startswith(prefixes) for n in names)

    multi = "maxsquare" if module_prefixed or container == "state_dict" else "deeplab_multi"
    rules = (  # First match wins.
        (any_starts("Scale."), "deeplab_init"),
        (any_starts("backbone.model."), "dasac"),
        ({"0.weight", "8.weight"} <= names and "conv1.weight" not in names, "disc_advent"),
        (
            {"conv1.weight", "classifier.weight"} <= names and "bn1.weight" not in names,
            "disc_adaptseg",
        ),
        (any_starts("layer5.conv2d_list.0.0.", "layer5.bottleneck.", "layer5.head."), "proda"),
        (any_starts("layer6.conv2d_list."), multi),
        (any_starts("layer5.conv2d_list."), "deeplab_single"),
        ({"conv1.weight", "bn1.weight"} <= names, "torchvision"),
    )
    for matches, layout in rules:
        if matches:
            return layout
    raise ConversionError(
        "Cannot tell the checkpoint's layout from its keys (first ones: "
        f"{sorted(keys)[:8]}); pass --layout=one of {sorted(LAYOUTS)}."
    )
