"""A PyTorch DeepLabV3+ in its two reference variants, written from docs/methods/robustnet.md and
adversarial_da_exp.md, for parity tests of `jaxda.models.deeplab_v3plus` (nothing else in jaxda
imports it).

The backbone is the torchvision-form ResNet under `backbone.` (torchvision names: conv1, bn1
(+ conv2, bn2, conv3, bn3 with the deep stem), layer1..4.B.{conv1..3, bn1..3, downsample.0/1}).
The heads carry the official module names, so `state_dict()` matches the released layouts
past the backbone prefix:

  robustnet: aspp.img_conv.{0,1}, aspp.features.{0..3}.{0,1}, bot_aspp.{0,1}, bot_fine.{0,1},
    final1.{0,1,3,4}, final2.0, dsn.{0,1,4}
  jfzhang95: aspp.aspp{1..4}.{atrous_conv,bn}, aspp.global_avg_pool.{1,2}, aspp.conv1,
    aspp.bn1, decoder.conv1, decoder.bn1, decoder.last_conv.{0,1,4,5,8}

(RobustNet's own backbone keys are layer0.* and top-level layer1..4; jfzhang95's are
`backbone.` with torchvision names.)

RobustNet's normalisation family (`instance_norm` '' | 'plain' | 'affine' at the slots
`instance_norm_at`, its `--wt_layer` codes 0 / 1-3 / 4 at positions 2..6 of ResNet-50), placed
as its `network/Resnet.py` places it:

  'stem': the stem's last BN (`bn1` of the 7x7 stem, `bn3` of the deep stem) is an
    InstanceNorm2d under the same name (keys `backbone.bn1.{weight,bias}` when 'affine', none
    when 'plain');
  'layerK': the last block of layer K normalises `out + residual` with an InstanceNorm2d
    `instance_norm_layer` before its ReLU (keys `layerK.<last>.instance_norm_layer.{weight,
    bias}` when 'affine'). As in RobustNet's `_make_layer`, block 0 never gets one: a layer of
    a single block has none.

'plain' (RobustNet's InstanceWhitening of IW / IRW / ISW: an InstanceNorm2d without affine)
also collects each normalised map, before its ReLU, in stem-to-layer4 order (RobustNet's
`w_arr`) for the whitening losses.
"""

import torch
import torch.nn.functional as F
from torch import nn

LAYER_PLANS = {16: ((1, 1), (2, 1), (2, 1), (1, 2)), 8: ((1, 1), (2, 1), (1, 2), (1, 4))}
INSTANCE_NORMS = ("", "plain", "affine")
INSTANCE_NORM_SLOTS = ("stem", "layer1", "layer2", "layer3", "layer4")


def _instance_norm(channels: int, kind: str) -> nn.InstanceNorm2d:
    """RobustNet's InstanceWhitening ('plain') or IBN layer ('affine'): no running statistics."""
    return nn.InstanceNorm2d(channels, affine=kind == "affine")


def _cbr(cin: int, cout: int, kernel: int = 1, dilation: int = 1, bias: bool = False) -> list:
    pad = dilation * (kernel - 1) // 2
    conv = nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=bias)
    return [conv, nn.BatchNorm2d(cout), nn.ReLU()]


def _upsample(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class Bottleneck(nn.Module):
    """torchvision bottleneck: stride and dilation in the 3x3 conv2; with `instance_norm`,
    RobustNet's InstanceNorm2d on the residual sum, before the final ReLU."""

    def __init__(self, inplanes, planes, stride, dilation, project, instance_norm=""):
        super().__init__()
        self.instance_norm = instance_norm
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(
            planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False
        )
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU()
        self.downsample = None
        if project:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * 4),
            )
        if instance_norm:
            self.instance_norm_layer = _instance_norm(planes * 4, instance_norm)

    def forward(self, x, w_arr=None):
        """NCHW -> NCHW; a 'plain' block appends its normalised map to the list `w_arr`."""
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out)) + residual
        if self.instance_norm:
            out = self.instance_norm_layer(out)
            if self.instance_norm == "plain" and w_arr is not None:
                w_arr.append(out)
        return self.relu(out)


class _Layer(nn.Sequential):
    """A ResNet layer whose blocks pass the list of whitened maps along."""

    def forward(self, x, w_arr=None):
        for block in self:
            x = block(x, w_arr)
        return x


class ResNetTorch(nn.Module):
    """torchvision-form ResNet; `forward` returns (layer1, layer2, layer3, layer4)."""

    def __init__(
        self,
        layers,
        width=64,
        output_stride=16,
        deep_stem=False,
        multi_grid=(),
        instance_norm="",
        instance_norm_at=("stem", "layer1", "layer2"),
    ):
        super().__init__()
        if instance_norm not in INSTANCE_NORMS:
            raise ValueError(f"instance_norm={instance_norm!r}; use one of {INSTANCE_NORMS}")
        if set(instance_norm_at) - set(INSTANCE_NORM_SLOTS):
            raise ValueError(f"instance_norm_at={instance_norm_at}; slots: {INSTANCE_NORM_SLOTS}")
        self.deep_stem = deep_stem
        self.relu = nn.ReLU()

        def norm_at(slot):
            return instance_norm if slot in instance_norm_at else ""

        # RobustNet's stem slot (--wt_layer position 2) is the stem's last BN: ResNet's bn1,
        # ResNet3X3's bn3. The InstanceNorm keeps the BN's name, as in RobustNet.
        self.stem_norm = ("bn3" if deep_stem else "bn1") if norm_at("stem") else ""
        self.stem_plain = norm_at("stem") == "plain"
        stem = ((3, width), (width, width), (width, width * 2)) if deep_stem else ((3, width),)
        for index, (cin, cout) in enumerate(stem, start=1):
            kernel = 3 if deep_stem else 7
            stride = 2 if index == 1 else 1
            conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)
            setattr(self, f"conv{index}", conv)
            name = f"bn{index}"
            if name == self.stem_norm:
                setattr(self, name, _instance_norm(cout, norm_at("stem")))
            else:
                setattr(self, name, nn.BatchNorm2d(cout))
        inplanes = stem[-1][1]
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        for index, (blocks, (stride, dilation)) in enumerate(
            zip(layers, LAYER_PLANS[output_stride], strict=True), start=1
        ):
            planes = width * 2 ** (index - 1)
            # jfzhang95's `_make_MG_unit`: len(grid) blocks, dilation x grid[i].
            grid = tuple(multi_grid) if index == 4 and multi_grid else (1,) * blocks
            modules = []
            for block, g in enumerate(grid):
                # RobustNet's `_make_layer`: block 0 gets iw=0, the last of the others wt_layer.
                last = 0 < block == len(grid) - 1
                modules.append(
                    Bottleneck(
                        inplanes, planes, stride if block == 0 else 1, dilation * g, block == 0,
                        norm_at(f"layer{index}") if last else "",
                    )
                )  # fmt: skip
                inplanes = planes * 4
            setattr(self, f"layer{index}", _Layer(*modules))

    def _stem_unit(self, x, index, w_arr):
        name = f"bn{index}"
        x = getattr(self, name)(getattr(self, f"conv{index}")(x))
        if name == self.stem_norm and self.stem_plain and w_arr is not None:
            w_arr.append(x)
        return self.relu(x)

    def forward(self, x, w_arr=None):
        """NCHW -> (layer1, layer2, layer3, layer4); 'plain' maps are appended to `w_arr`."""
        for index in (1, 2, 3) if self.deep_stem else (1,):
            x = self._stem_unit(x, index, w_arr)
        x = self.maxpool(x)
        features = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x, w_arr)  # Called as a module, so forward hooks on layerK fire.
            features.append(x)
        return tuple(features)


class _ASPPUnit(nn.Module):
    """jfzhang95's `_ASPPModule`: atrous_conv, bn, relu."""

    def __init__(self, cin, cout, kernel, dilation):
        super().__init__()
        pad = 0 if kernel == 1 else dilation
        self.atrous_conv = nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.atrous_conv(x)))


class RobustNetASPP(nn.Module):
    """RobustNet's ASPP: cat([image pooling, 1x1, 3x3 at rates]) (no projection)."""

    def __init__(self, cin, width, rates):
        super().__init__()
        units = [_cbr(cin, width)] + [_cbr(cin, width, 3, r) for r in rates]
        self.features = nn.ModuleList(nn.Sequential(*u) for u in units)
        self.img_pooling = nn.AdaptiveAvgPool2d(1)
        self.img_conv = nn.Sequential(*_cbr(cin, width))

    def forward(self, x):
        out = _upsample(self.img_conv(self.img_pooling(x)), x.shape[2:])
        return torch.cat([out] + [f(x) for f in self.features], 1)


class JFZhangASPP(nn.Module):
    """jfzhang95's ASPP: cat([1x1, 3x3 at rates, image pooling]) -> 1x1, BN, ReLU, Dropout."""

    def __init__(self, cin, width, rates, dropout):
        super().__init__()
        self.aspp1 = _ASPPUnit(cin, width, 1, 1)
        for i, r in enumerate(rates, start=2):
            setattr(self, f"aspp{i}", _ASPPUnit(cin, width, 3, r))
        self.global_avg_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), *_cbr(cin, width))
        self.conv1 = nn.Conv2d(width * 5, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(0.5 if dropout else 0.0)

    def forward(self, x):
        branches = [getattr(self, f"aspp{i}")(x) for i in range(1, 5)]
        branches.append(_upsample(self.global_avg_pool(x), x.shape[2:]))
        return self.dropout(self.relu(self.bn1(self.conv1(torch.cat(branches, 1)))))


class JFZhangDecoder(nn.Module):
    """jfzhang95's decoder: cat([upsampled x, low-level 48]) -> last_conv."""

    def __init__(self, num_classes, low_in, width, low_width, dropout):
        super().__init__()
        self.conv1 = nn.Conv2d(low_in, low_width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(low_width)
        self.relu = nn.ReLU()
        p1, p2 = (0.5, 0.1) if dropout else (0.0, 0.0)
        self.last_conv = nn.Sequential(
            *_cbr(width + low_width, width, 3),
            nn.Dropout(p1),
            *_cbr(width, width, 3),
            nn.Dropout(p2),
            nn.Conv2d(width, num_classes, 1),
        )

    def forward(self, x, low):
        low = self.relu(self.bn1(self.conv1(low)))
        return self.last_conv(torch.cat([_upsample(x, low.shape[2:]), low], 1))


class DeepLabV3PlusTorch(nn.Module):
    """DeepLabV3+ in the 'robustnet' or 'jfzhang95' variant.

    Args mirror `jaxda.models.deeplab_v3plus.DeepLabV3Plus` (layers = stage sizes). `dropout`
    False sets every dropout probability to 0 (module indices unchanged), for batch-statistics
    parity. `forward(x)` takes NCHW float32 and returns `(aux, main)`: main logits at layer1's
    resolution (not upsampled to the input), aux from `dsn` on layer3 or None; with
    instance_norm='plain', `(aux, main, w_arr)`: w_arr the list of instance-normalised maps
    (NCHW, before their ReLU) in slot order, RobustNet's `w_arr`.
    """

    def __init__(
        self,
        num_classes=19,
        layers=(3, 4, 6, 3),
        width=64,
        output_stride=16,
        deep_stem=False,
        multi_grid=(),
        variant="robustnet",
        head_width=256,
        low_level_width=48,
        aux_width=512,
        multi_level=True,
        dropout=True,
        instance_norm="",
        instance_norm_at=("stem", "layer1", "layer2"),
    ):
        super().__init__()
        self.variant = variant
        self.multi_level = multi_level
        self.plain = instance_norm == "plain"
        self.backbone = ResNetTorch(
            layers, width, output_stride, deep_stem, multi_grid, instance_norm, instance_norm_at
        )
        rates = tuple(r * 16 // output_stride for r in (6, 12, 18))
        c1, c3, c4 = width * 4, width * 16, width * 32
        if variant == "robustnet":
            self.aspp = RobustNetASPP(c4, head_width, rates)
            self.bot_aspp = nn.Sequential(*_cbr(head_width * 5, head_width))
            self.bot_fine = nn.Sequential(*_cbr(c1, low_level_width))
            self.final1 = nn.Sequential(
                *_cbr(head_width + low_level_width, head_width, 3), *_cbr(head_width, head_width, 3)
            )
            self.final2 = nn.Sequential(nn.Conv2d(head_width, num_classes, 1))
            if multi_level:
                self.dsn = nn.Sequential(
                    *_cbr(c3, aux_width, 3, bias=True),
                    nn.Dropout2d(0.1 if dropout else 0.0),
                    nn.Conv2d(aux_width, num_classes, 1),
                )
        elif variant == "jfzhang95":
            if multi_level:
                raise ValueError("jfzhang95's DeepLabV3+ has no aux head")
            self.aspp = JFZhangASPP(c4, head_width, rates, dropout)
            self.decoder = JFZhangDecoder(num_classes, c1, head_width, low_level_width, dropout)
        else:
            raise ValueError(f"unknown variant {variant!r}")

    def forward(self, x):
        w_arr = []
        x1, _, x3, x4 = self.backbone(x, w_arr)
        if self.variant == "jfzhang95":
            aux, main = None, self.decoder(self.aspp(x4), x1)
        else:
            up = _upsample(self.bot_aspp(self.aspp(x4)), x1.shape[2:])
            main = self.final2(self.final1(torch.cat([self.bot_fine(x1), up], 1)))
            aux = self.dsn(x3) if self.multi_level else None
        return (aux, main, w_arr) if self.plain else (aux, main)
