"""The key layouts of the published UDA / DG code's PyTorch checkpoints (DeepLabV2 and
DeepLabV3+; docs/methods/checkpoints.md, "Checkpoint key layouts"), their containers, and
detection of the layout from the keys (NumPy only).

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
  proda           ProDA `.pkl` {'ResNet101': {'model_state': ..., 'objective_vectors'}, 'iter',
                  'best_iou'[, 'FCDiscriminator']}. Into ProDA's network (config.model.name
                  'proda_deeplab_v2') everything loads: backbone, `layer5` -> `head`
                  (`jaxda.models.proda.ProDAHead`) and `bn_pretrain` (--bn_clr; its presence must
                  match config.model.bn_clr). Into DeepLabV2 only the backbone maps: ProDA's
                  `layer5` (ASPP with GroupNorm and an SE bottleneck) has no counterpart there
                  and is skipped, the heads keep their initialisation. The prototypes
                  (`objective_vectors`) are written beside the converted checkpoint by
                  `jaxda.interop.convert`; the warm-up discriminator is ignored.
  dasac           da-sac {'model': ..., 'opt', 'score', 'epoch'}: `module.backbone.model.*`,
                  `layer5` = a single head on layer4 (the main head); the momentum teacher
                  (`module.slow_net.*`), `module.running_conf` and `module.slow_init` are ignored.
  torchvision     torchvision ResNet-50/101 (ImageNet) or any bare backbone state dict; `fc.*`
                  is ignored. torchvision puts a bottleneck's stride in its 3x3 conv, the Caffe
                  ResNet in the first 1x1: the weights have the same names and shapes and are
                  loaded by name, as ProDA does.
  simclr          SimCLRv2 ResNet as ProDA's --student_init simclr reads it
                  (`torch.load('pretrained/simclr/r101_1x_sk0.pth')['state_dict']`, loaded by
                  exact key match): torchvision names, `fc.*` ignored, so the same mapping as
                  `torchvision`. SimCLRv2-Pytorch's own converter output ({'resnet': ..., 'head':
                  ...}, keys `net.{stage}.blocks.{b}.net.{i}...`) is translated to those names
                  (ProDA's loader would match none of them); selective-kernel (sk1) nets have no
                  counterpart. Backbone only: heads and `bn_pretrain` keep their initialisation.
  robustnet       RobustNet's DeepLabV3+ (model 'deeplabv3plus', variant 'robustnet'):
                  `layer0.{0,1}` (conv1, bn1; the ResNet3X3 stem adds `layer0.{3,4,6,7}` =
                  conv2, bn2, conv3, bn3), `layer1..4`, `aspp.{img_conv,features}`, `bot_aspp`,
                  `bot_fine`, `final1`, `final2`, `dsn` (the aux head). Its normalisation
                  family (`norm_check`; config.model.instance_norm / instance_norm_at):
                  IBN (--wt_layer code 4, 'affine') stores `layer0.1.{weight,bias}` (deep stem:
                  `layer0.7`) without running statistics -> `instance_norm1` (`instance_norm3`)
                  {scale, bias}, and `layerK.<last>.instance_norm_layer.{weight,bias}` ->
                  `layerK_<last>/instance_norm/{scale,bias}`; IW / IRW / ISW (codes 1-3,
                  'plain') store nothing there (no `layer0.1.*`). ISW's mask and covariance
                  statistics live in Python objects (CovMatrix_ISW), not in the state dict;
                  such keys, if a file has them, are skipped with the reason.
  deeplabv3plus_jfzhang95
                  jfzhang95's DeepLabV3+ (Adversarial_DA_Exp; variant 'jfzhang95'):
                  `backbone.<torchvision names>`, `aspp.{aspp1..4,global_avg_pool,conv1,bn1}`,
                  `decoder.{conv1,bn1,last_conv}`.
  mit             SegFormer's ImageNet MiT encoders (`mit_b0.pth` .. `mit_b5.pth`, a raw state
                  dict: patch_embed{1..4}, block{1..4}.{j}, norm{1..4}); the 1000-class `head.*`
                  is skipped. Into a 'segformer' config (`configs.common.use_mit`), either
                  decoder; the decoder keeps its initialisation.
  segformer       NVlabs SegFormer segmentation checkpoints (backbone.*, decode_head.linear_c*,
                  linear_fuse, linear_pred): config.model.decoder='mlp'.
  daformer        DAFormer training checkpoints (model.backbone.*, model.decode_head.
                  embed_layers / fuse_layer / conv_seg; ema_model.* and imnet_model.* ignored):
                  config.model.decoder='daformer'.
  hrda            HRDA / MIC(HRDA) training checkpoints (model.decode_head.head.* and
                  model.decode_head.scale_attention.*; ema_model.*, imnet_model.*,
                  mic.teacher.ema_model.* ignored): config.model.name='hrda'.
                  The four MiT layouts are mapped by `jaxda.interop.mit_layout`, which also
                  refuses an HRDA file for a SegFormer config and back, naming the keys.
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
      kind: 'segmenter' (network variables) or 'discriminator' (FCDiscriminator params).
      model: the `config.model.name` the layout's weights fit ('deeplab_v2', 'deeplabv3plus',
        or '' for a bare backbone that loads into either).
      variant: DeepLabV3+ layouts: the `config.model.variant` they need.
      prefix: every key starts with it (after an optional 'module.'); stripped.
      heads: (PyTorch module, jaxda head) pairs of the ASPP classifiers.
      modules: discriminator layouts: (PyTorch module, jaxda conv) pairs.
      skip: (regex, reason): recognised keys this layout never loads (matched after 'module.').
      ignore: (regex, reason): keys that are not part of the network.
      skip_mismatched_heads: a head whose shapes differ from the model's is skipped (as the
        official code does with the init files' 21-class head) instead of an error.
      also_fits: other `config.model.name`s the layout's backbone loads into; for them
        `partial_skip` and `partial_ignore` apply too (the rest has no counterpart there).
      partial_skip / partial_ignore: (regex, reason) as `skip` / `ignore`, for `also_fits`.
    """

    name: str
    description: str
    kind: str = "segmenter"
    model: str = "deeplab_v2"
    variant: str = ""
    prefix: str = ""
    heads: tuple[tuple[str, str], ...] = ()
    modules: tuple[tuple[str, str], ...] = ()
    skip: tuple[tuple[str, str], ...] = ()
    ignore: tuple[tuple[str, str], ...] = ()
    skip_mismatched_heads: bool = False
    also_fits: tuple[str, ...] = ()
    partial_skip: tuple[tuple[str, str], ...] = ()
    partial_ignore: tuple[tuple[str, str], ...] = ()


_DISC_NAMES = ("conv1", "conv2", "conv3", "conv4", "classifier")
_MODEL_TITLES = {
    "deeplab_v2": "DeepLabV2",
    "deeplabv3plus": "DeepLabV3+",
    "proda_deeplab_v2": "ProDA DeepLabV2",
    "segformer": "SegFormer / DAFormer (MiT)",
    "hrda": "HRDA (MiT)",
}
PRODA_MODEL = "proda_deeplab_v2"
# ProDA's `.pkl` entries that are not the segmentation network's weights.
PRODA_ENTRIES = {
    "FCDiscriminator": "ProDA's warm-up discriminator (output-space FCDiscriminator on the "
    "segmentation network's output): not converted",
    "ResNet101.objective_vectors": "ProDA's class prototypes: written to OUT/prototypes.npy "
    "only for a 'proda_deeplab_v2' config with the head loaded",
    "iter": "ProDA's training step counter",
    "best_iou": "ProDA's best validation mIoU",
}

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
            "ProDA (backbone, layer5 head, bn_pretrain; backbone only into DeepLabV2)",
            model=PRODA_MODEL,
            also_fits=("deeplab_v2",),
            partial_skip=(
                (
                    r"layer5\..*",
                    "ProDA's head (ASPP with GroupNorm and an SE bottleneck) has no "
                    "DeepLabV2 counterpart (convert with config.model.name='proda_deeplab_v2' "
                    "to load it); jaxda's heads keep their initialisation",
                ),
            ),
            partial_ignore=(
                (
                    r"bn_pretrain\..*",
                    "ProDA's --bn_clr BatchNorm on layer4's output (DeepLabV2 has none)",
                ),
            ),
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
            model="",
            ignore=((r"fc\..*", "torchvision's ImageNet classifier"),),
        ),
        Layout(
            "simclr",
            "SimCLRv2 ResNet (ProDA's r101_1x_sk0.pth); backbone only, loaded by name",
            model="",
            ignore=((r"fc\..*", "SimCLR's supervised ImageNet classifier (ProDA drops it too)"),),
        ),
        Layout(
            "robustnet",
            "RobustNet DeepLabV3+ (layer0..4, aspp, bot_aspp, bot_fine, final1/2, dsn)",
            model="deeplabv3plus",
            variant="robustnet",
            skip=(
                (
                    r"(.*\.)?(cov_matrix(_layer)?|mask_matrix|var_matrix|count_var_cov|"
                    r"reversal_i|num_off_diagonal|num_sensitive)(\..*)?",
                    "RobustNet's whitening-loss state (CovMatrix_ISW / _IRW: ISW mask, "
                    "covariance statistics), not network weights; jaxda's ISW computes its "
                    "own mask (config.whitening)",
                ),
                (
                    r".*\.instance_standardization\..*",
                    "InstanceWhitening's statistics: RobustNet's instance normalisation uses "
                    "each image's own, none are stored",
                ),
            ),
        ),
        Layout(
            "deeplabv3plus_jfzhang95",
            "jfzhang95 pytorch-deeplab-xception DeepLabV3+ (backbone, aspp, decoder)",
            model="deeplabv3plus",
            variant="jfzhang95",
        ),
        # The MiT family's model pairings (HRDA vs SegFormer) are `mit_layout.check_model`'s,
        # whose messages name the keys (and allow --skip_head).
        Layout(
            "mit",
            "SegFormer MiT ImageNet encoder (mit_b*.pth; head.* classifier skipped)",
            model="segformer",
            also_fits=("hrda",),
        ),
        Layout(
            "segformer",
            "NVlabs SegFormer (backbone.*, decode_head.linear_c*/linear_fuse/linear_pred)",
            model="segformer",
            also_fits=("hrda",),
        ),
        Layout(
            "daformer",
            "DAFormer training checkpoint (model.*; ema_model.*, imnet_model.* ignored)",
            model="segformer",
            also_fits=("hrda",),
        ),
        Layout(
            "hrda",
            "HRDA / MIC(HRDA) training checkpoint (model.decode_head.{head,scale_attention})",
            model="hrda",
            also_fits=("segformer",),
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
    {'model': sd, 'opt', 'score', 'epoch'}; MaxSquare, RobustNet, jfzhang95 (and other
    trainers), ProDA's SimCLR init {'state_dict': sd, 'epoch', 'optimizer', ...};
    {'model_state': sd, ...} (read by Adversarial_DA_Exp's evaluate.py); SimCLRv2-Pytorch
    {'resnet': sd, 'head'}; or a bare state dict.
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
    containers = (
        ("dasac", "model"),
        ("state_dict", "state_dict"),
        ("model_state", "model_state"),
        ("simclrv2", "resnet"),  # SimCLRv2-Pytorch's convert.py: {'resnet', 'head'}.
    )
    for container, key in containers:
        if _is_state_dict(obj.get(key)):
            return dict(obj[key]), container, sorted(str(k) for k in obj if k != key)
    if _is_state_dict(obj):
        return dict(obj), "bare", []
    raise ConversionError(
        "Cannot find a state dict in the file: expected a bare state dict or a dict with "
        "'state_dict' (MaxSquare, RobustNet), 'model' (da-sac), 'model_state' or "
        "'ResNet101.model_state' (ProDA); "
        f"top-level entries: {sorted(map(str, obj))[:20]}"
    )


def strip_module(key: str) -> str:
    return key[len("module.") :] if key.startswith("module.") else key


def detect_layout(keys, container: str = "bare") -> str:
    """The name of the layout of a state dict with these keys (see the module docstring)."""
    if container == "proda":  # Its backbone-only keys alone would read as torchvision.
        return container
    if container == "simclrv2":
        return "simclr"
    names = {strip_module(k) for k in keys}
    module_prefixed = any(k.startswith("module.") for k in keys)

    def any_starts(*prefixes):
        return any(n.startswith(prefixes) for n in names)

    multi = "maxsquare" if module_prefixed or container == "state_dict" else "deeplab_multi"
    rules = (  # First match wins.
        (any_starts("patch_embed1."), "mit"),
        # Before segformer / daformer: HRDA's keys start as theirs.
        (any("decode_head.scale_attention." in n for n in names), "hrda"),
        (any_starts("backbone.patch_embed1."), "segformer"),
        (any_starts("model.backbone.patch_embed1."), "daformer"),
        (any_starts("Scale."), "deeplab_init"),
        (any_starts("backbone.model."), "dasac"),
        # Before torchvision: RobustNet's layer1..4 carry torchvision names too, and its stem is
        # `layer0.*` (no top-level conv1); jfzhang95's whole backbone sits under `backbone.`.
        (
            any_starts(
                "layer0.", "aspp.img_conv.", "aspp.features.", "bot_aspp.", "bot_fine.", "final1."
            ),
            "robustnet",
        ),
        (
            any_starts("aspp.aspp", "aspp.global_avg_pool.", "decoder.last_conv.", "decoder.bn1."),
            "deeplabv3plus_jfzhang95",
        ),
        ({"0.weight", "8.weight"} <= names and "conv1.weight" not in names, "disc_advent"),
        (
            {"conv1.weight", "classifier.weight"} <= names and "bn1.weight" not in names,
            "disc_adaptseg",
        ),
        (any_starts("layer5.conv2d_list.0.0.", "layer5.bottleneck.", "layer5.head."), "proda"),
        (any_starts("net.0.0.") and any_starts("net.1.blocks."), "simclr"),
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


def check_model(layout: str, model_name: str, variant: str | None = None) -> None:
    """Raises ConversionError when a segmenter layout's weights do not fit the config's model
    (`config.model.name`, and `config.model.variant` for DeepLabV3+ when given)."""
    spec = LAYOUTS[layout]
    if spec.kind != "segmenter" or not spec.model:
        return
    wanted = _MODEL_TITLES.get(spec.model, spec.model)
    if spec.model != model_name and model_name not in spec.also_fits:
        if spec.model == PRODA_MODEL:
            how = (
                "convert with config.model.name='proda_deeplab_v2' (the whole network, e.g. "
                "--config.model.name=proda_deeplab_v2 --config.model.head_width=256 and "
                "--config.model.bn_clr for stage 2/3 files) or 'deeplab_v2' (the backbone only)"
            )
        elif spec.model in ("segformer", "hrda"):
            how = (
                "convert with a MiT config (`configs.common.use_mit`; config.model.name="
                f"'{spec.model}')"
            )
        elif spec.model == "deeplabv3plus":
            how = (
                "convert with a DeepLabV3+ config, e.g. --config=configs/source_only.py:"
                f"model=deeplabv3plus --config.model.variant={spec.variant} (and the file's "
                "depth, deep_stem, output_stride)"
            )
        else:
            how = (
                "convert with a DeepLabV2 config (config.model.name='deeplab_v2'); only a "
                "torchvision ImageNet backbone (--layout=torchvision) loads into DeepLabV3+"
            )
        raise ConversionError(
            f"The file is a {wanted} checkpoint (layout {layout!r}), but the config's model is "
            f"{_MODEL_TITLES.get(model_name, model_name)} (config.model.name={model_name!r}): "
            f"{how}."
        )
    if spec.variant and variant is not None and spec.variant != variant:
        raise ConversionError(
            f"The file is a {spec.variant} DeepLabV3+ (layout {layout!r}), but "
            f"config.model.variant={variant!r}: the variants concatenate features in other "
            f"orders, so the weights would load but compute something else. Pass "
            f"--config.model.variant={spec.variant}"
            + (" --config.model.multi_level=False." if spec.variant == "jfzhang95" else ".")
        )


def check_bn_clr(names, bn_clr: bool) -> None:
    """Raises ConversionError when a ProDA file's `bn_pretrain.*` keys (ProDA's --bn_clr, stage
    2 / 3 models) are present and `config.model.bn_clr` is False, or absent and it is True."""
    in_file = any(strip_module(n).startswith("bn_pretrain.") for n in names)
    if in_file and not bn_clr:
        raise ConversionError(
            "The ProDA file has `bn_pretrain.*` (trained with --bn_clr: a BatchNorm on layer4's "
            "output, ProDA's stage 2 / 3 models), but config.model.bn_clr=False: pass "
            "--config.model.bn_clr=True."
        )
    if bn_clr and not in_file:
        raise ConversionError(
            "config.model.bn_clr=True, but the ProDA file has no `bn_pretrain.*` (it was "
            "trained without --bn_clr, e.g. the warm-up or stage 1 model): pass "
            "--config.model.bn_clr=False."
        )
