"""ResNet in the torchvision form used by DeepLabV3+ (RobustNet, jfzhang95's pytorch-deeplab).

Differences from the Caffe form of `resnet.py`: a bottleneck's stride sits in its 3x3 conv
(`conv2`); the stem max-pool has no ceil mode; the output stride is 16 (layer4 at stride 1 with
dilation 2) or 8 (layer3 dilation 2, layer4 dilation 4), and every block of a dilated layer,
block 0 included, uses that layer's dilation (RobustNet's `D16` / `D` variants, jfzhang95's
`_make_layer`). Options: RobustNet's `ResNet3X3` deep stem (three 3x3 convs, width-width-2 x
width) and jfzhang95's multi-grid, where layer4's block i has dilation `dilation x grid[i]`.
Spatial sizes follow PyTorch's arithmetic exactly (`feature_sizes`).
"""

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax

from jaxda.models import layers, resnet

# Blocks per layer for the published depths.
STAGE_SIZES = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
# (stride, dilation) of layer1..layer4 per output stride.
LAYER_PLANS = {
    16: ((1, 1), (2, 1), (2, 1), (1, 2)),
    8: ((1, 1), (2, 1), (1, 2), (1, 4)),
}
# Where RobustNet may put instance normalisation (its `wt_layer` positions 2..6): the stem's
# last BN is replaced; in a layer, the last block gets one after its residual sum (never block
# 0, so a one-block layer gets none). Its positions 0 and 1 (the deep stem's first two BNs,
# used by its R101 GTA5 scripts) are not supported.
INSTANCE_NORM_SLOTS = ("stem", "layer1", "layer2", "layer3", "layer4")
# Prefix of the features dict's entries holding the instance-normalised (whitened) maps.
WHITENED_PREFIX = "whitened/"
# torchvision's and jfzhang95's from-scratch init: kaiming_normal_(mode='fan_out', 'relu').
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


# Two-pass batch variance throughout DeepLabV3+ (see `layers.batch_norm`).
batch_norm = functools.partial(layers.batch_norm, use_fast_variance=False)


_conv = functools.partial(resnet._conv, kernel_init=kaiming_fan_out)


# The torchvision bottleneck: stride in the 3x3 conv, Kaiming init, two-pass BN variance.
Bottleneck = functools.partial(
    resnet.Bottleneck, stride_in_3x3=True, kernel_init=kaiming_fan_out, fast_variance=False
)


def layer_dilations(
    stage_sizes: Sequence[int], output_stride: int, multi_grid: Sequence[int] = ()
) -> tuple[tuple[int, ...], ...]:
    """Per layer, the dilation of each block's 3x3 conv (multi-grid scales layer4's)."""
    if output_stride not in LAYER_PLANS:
        raise ValueError(f"output_stride={output_stride} must be one of {sorted(LAYER_PLANS)}")
    if multi_grid and len(multi_grid) != stage_sizes[3]:
        # jfzhang95's `_make_MG_unit` builds exactly len(grid) blocks in layer4.
        raise ValueError(
            f"multi_grid={tuple(multi_grid)} needs one entry per layer4 block "
            f"({stage_sizes[3]} blocks)"
        )
    result = []
    for index, (blocks, (_, dilation)) in enumerate(
        zip(stage_sizes, LAYER_PLANS[output_stride], strict=True)
    ):
        grid = tuple(multi_grid) if index == 3 and multi_grid else (1,) * blocks
        result.append(tuple(dilation * g for g in grid))
    return tuple(result)


class ResNet(nn.Module):
    """torchvision-form ResNet backbone for DeepLabV3+.

    Attributes:
      stage_sizes: blocks in layer1..layer4, e.g. (3, 4, 6, 3) for ResNet-50.
      width: planes of layer1 (64 in the published models; smaller for tests / benchmarks).
      output_stride: 16 or 8.
      deep_stem: RobustNet's `ResNet3X3` stem (3x3 convs width, width, 2 x width; the first
        with stride 2) instead of the 7x7 stride-2 conv.
      multi_grid: layer4's per-block dilation multipliers, e.g. (1, 2, 4); () = all 1.
      instance_norm: RobustNet's normalisation family: '' (none: its 'base'), 'plain'
        (InstanceNorm without affine, the maps returned for the whitening losses: IW, IRW,
        ISW) or 'affine' (IBN-Net style, with a learned affine).
      instance_norm_at: the slots of INSTANCE_NORM_SLOTS that get it (RobustNet's R50
        scripts: stem, layer1, layer2).
      use_running_average: BN normalises with running statistics (True) or batch statistics.
      convolution: how every conv runs (`layers.Convolution`).
      remat: recompute each block in the backward pass (`resnet.ResNet.remat`).
    """

    stage_sizes: Sequence[int] = STAGE_SIZES[50]
    width: int = 64
    output_stride: int = 16
    deep_stem: bool = False
    multi_grid: Sequence[int] = ()
    instance_norm: str = ""
    instance_norm_at: Sequence[str] = ("stem", "layer1", "layer2")
    use_running_average: bool = True
    convolution: layers.Convolution = layers.DEFAULT_CONVOLUTION
    remat: bool = False

    def _instance_norm_at(self, slot: str) -> str:
        return self.instance_norm if slot in self.instance_norm_at else ""

    @nn.compact
    def __call__(self, x: jax.Array, bn_mask: jax.Array | None = None) -> dict[str, jax.Array]:
        """[N, H, W, 3] -> {'layer1'..'layer4': [N, h, w, channels]} (layer1 at stride 4),
        and with instance_norm='plain' {'whitened/<slot>': [N, h, w, channels]} too.

        bn_mask: optional [N] bool: batch statistics are taken over these images only.
        """
        if self.instance_norm not in layers.INSTANCE_NORMS:
            raise ValueError(
                f"instance_norm={self.instance_norm!r} must be one of {layers.INSTANCE_NORMS}"
            )
        unknown = sorted(set(self.instance_norm_at) - set(INSTANCE_NORM_SLOTS))
        if unknown:
            raise ValueError(f"instance_norm_at: unknown {unknown}; use {INSTANCE_NORM_SLOTS}")
        if bn_mask is not None:
            bn_mask = bn_mask[:, None, None, None]
        features = {}

        def conv_bn_relu(y, features_out, kernel, stride, index, last=False):
            conv = _conv(
                features_out,
                kernel,
                stride=stride,
                name=f"conv{index}",
                convolution=self.convolution,
            )
            y = conv(y)
            kind = self._instance_norm_at("stem") if last else ""
            if kind:  # RobustNet replaces the stem's (last) BN.
                y = layers.InstanceNorm(affine=kind == "affine", name=f"instance_norm{index}")(y)
                if kind == "plain":
                    features[WHITENED_PREFIX + "stem"] = y
                return nn.relu(y)
            norm = batch_norm(f"bn{index}", use_running_average=self.use_running_average)
            return nn.relu(norm(y, mask=bn_mask))

        if self.deep_stem:
            x = conv_bn_relu(x, self.width, 3, 2, 1)
            x = conv_bn_relu(x, self.width, 3, 1, 2)
            x = conv_bn_relu(x, self.width * 2, 3, 1, 3, last=True)
        else:
            x = conv_bn_relu(x, self.width, 7, 2, 1, last=True)
        # PyTorch pads max-pooling with -inf, as reduce_window's padding does here.
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        dilations = layer_dilations(self.stage_sizes, self.output_stride, self.multi_grid)
        block_cls = Bottleneck
        if self.remat:
            block_cls = functools.partial(nn.remat(resnet.Bottleneck), **Bottleneck.keywords)
        for layer_index, ((stride, _), block_dilations) in enumerate(
            zip(LAYER_PLANS[self.output_stride], dilations, strict=True), start=1
        ):
            slot = f"layer{layer_index}"
            for block, dilation in enumerate(block_dilations):
                # RobustNet's `_make_layer` never gives block 0 one: a one-block layer has none.
                last = 0 < block == len(block_dilations) - 1
                kind = self._instance_norm_at(slot) if last else ""
                x = block_cls(
                    planes=self.width * 2 ** (layer_index - 1),
                    stride=stride if block == 0 else 1,
                    dilation=dilation,
                    # The stem's width (or 2 x width) never equals 4 x planes: every layer's
                    # block 0 projects, as torchvision's `_make_layer` decides.
                    project=block == 0,
                    use_running_average=self.use_running_average,
                    instance_norm=kind,
                    convolution=self.convolution,
                    name=f"layer{layer_index}_{block}",
                )(x, bn_mask)
                if kind == "plain":
                    x, features[WHITENED_PREFIX + slot] = x
            features[slot] = x
        return features


def feature_sizes(size: int, output_stride: int) -> dict[str, int]:
    """Feature grid lengths for an input length, by PyTorch's arithmetic (513 -> 129 .. 33).

    Stem conv (7x7 p3 or 3x3 p1, stride 2), max-pool (3x3, s2, p1, floor mode) and each
    stride-2 3x3 conv (p1) all give floor((n - 1) / 2) + 1.
    """
    half = lambda n: (n - 1) // 2 + 1  # noqa: E731
    n = half(half(size))
    sizes = {"layer1": n}
    for index, (stride, _) in enumerate(LAYER_PLANS[output_stride][1:], start=2):
        n = half(n) if stride == 2 else n
        sizes[f"layer{index}"] = n
    return sizes
