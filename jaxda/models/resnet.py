"""ResNet in the DeepLab-v2 (Caffe) form used by AdaptSegNet, ADVENT, MaxSquare, ProDA, DA-SAC.

Differences from torchvision's ResNet (docs/methods/README.md): the stride of a bottleneck sits in
its first 1x1 conv; the stem max-pool uses `ceil_mode=True`; layer3 and layer4 keep stride 1 and
use dilation 2 and 4 (output stride 8); every layer's block 0 has a projection shortcut.
Spatial sizes follow PyTorch's arithmetic exactly: 512x1024 -> 65x129 at layer4.
"""

import functools
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax

from jaxda.models import layers

# Blocks per layer for the published depths.
STAGE_SIZES = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def _conv(
    features: int,
    kernel: int,
    *,
    stride: int = 1,
    dilation: int = 1,
    name: str,
    kernel_init=layers.deeplab_kernel_init,
    convolution: layers.Convolution = layers.DEFAULT_CONVOLUTION,
):
    pad = dilation * (kernel - 1) // 2
    return layers.conv(
        features,
        (kernel, kernel),
        convolution=convolution,
        strides=(stride, stride),
        kernel_dilation=(dilation, dilation),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        kernel_init=kernel_init,
        name=name,
    )


class Bottleneck(nn.Module):
    """Bottleneck: 1x1 -> 3x3 (dilation) -> 1x1 (4x planes), + shortcut.

    Caffe form (DeepLabV2) by default: the stride sits in the first 1x1 conv. The torchvision
    form (`resnet_torchvision`) puts it in the 3x3 conv and initialises and normalises its own
    way (`stride_in_3x3`, `kernel_init`, `fast_variance`).
    """

    planes: int
    stride: int = 1
    dilation: int = 1
    project: bool = False
    use_running_average: bool = True
    stride_in_3x3: bool = False
    kernel_init: Callable = layers.deeplab_kernel_init
    fast_variance: bool = True
    # RobustNet's instance normalisation after the residual sum, before the final ReLU:
    # '' (none), 'plain' (no affine; the normalised map is also returned, for the whitening
    # losses) or 'affine' (IBN-Net style, learned scale and offset).
    instance_norm: str = ""
    convolution: layers.Convolution = (
        layers.DEFAULT_CONVOLUTION
    )  # config.model.convolution (`layers.CONV_IMPLS`).

    @nn.compact
    def __call__(
        self, x: jax.Array, bn_mask: jax.Array | None = None
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """[N, H, W, C] -> [N, h, w, 4 x planes]; with instance_norm='plain' also the
        instance-normalised map before the ReLU ([N, h, w, 4 x planes])."""

        def bn(name):
            norm = layers.batch_norm(
                name,
                use_running_average=self.use_running_average,
                use_fast_variance=self.fast_variance,
            )
            return lambda y: norm(y, mask=bn_mask)

        conv = functools.partial(_conv, kernel_init=self.kernel_init, convolution=self.convolution)
        first_stride, mid_stride = (1, self.stride) if self.stride_in_3x3 else (self.stride, 1)
        residual = x
        y = nn.relu(bn("bn1")(conv(self.planes, 1, stride=first_stride, name="conv1")(x)))
        y = conv(self.planes, 3, stride=mid_stride, dilation=self.dilation, name="conv2")(y)
        y = nn.relu(bn("bn2")(y))
        y = bn("bn3")(conv(self.planes * 4, 1, name="conv3")(y))
        if self.project:
            residual = conv(self.planes * 4, 1, stride=self.stride, name="downsample")(x)
            residual = bn("bn_downsample")(residual)
        y = y + residual
        if not self.instance_norm:
            return self.convolution.block_output(nn.relu(y))
        y = layers.InstanceNorm(affine=self.instance_norm == "affine", name="instance_norm")(y)
        out = self.convolution.block_output(nn.relu(y))
        return (out, y) if self.instance_norm == "plain" else out


class ResNet(nn.Module):
    """DeepLab-v2 ResNet backbone.

    Attributes:
      stage_sizes: blocks in layer1..layer4, e.g. (3, 4, 23, 3) for ResNet-101.
      width: planes of layer1 (64 in the published models; smaller for the synthetic benchmark).
      use_running_average: BN normalises with running statistics (True) or batch statistics.
      convolution: how every conv runs (`layers.Convolution`).
      remat: recompute each block's activations in the backward pass instead of storing them
        (`nn.remat`: less memory, one more forward pass of compute; same parameters).
    """

    stage_sizes: Sequence[int] = STAGE_SIZES[101]
    width: int = 64
    use_running_average: bool = True
    convolution: layers.Convolution = layers.DEFAULT_CONVOLUTION
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, bn_mask: jax.Array | None = None) -> dict[str, jax.Array]:
        """[N, H, W, 3] -> {'layer1'..'layer4': [N, h, w, channels]} (layer3/4 at stride 8).

        bn_mask: optional [N] bool: batch statistics are taken over these images only (the
        padding of a last, partial evaluation batch must not shift them).
        """
        if bn_mask is not None:
            bn_mask = bn_mask[:, None, None, None]
        x = _conv(self.width, 7, stride=2, name="conv1", convolution=self.convolution)(x)
        x = layers.batch_norm("bn1", use_running_average=self.use_running_average)(x, mask=bn_mask)
        x = layers.max_pool_ceil(nn.relu(x), window=3, stride=2, padding=1)
        features = {}
        # (planes multiplier, stride, dilation) of layer1..layer4: output stride 8.
        layer_specs = ((1, 1, 1), (2, 2, 1), (4, 1, 2), (8, 1, 4))
        block_cls = nn.remat(Bottleneck) if self.remat else Bottleneck
        for layer_index, (blocks, (mult, stride, dilation)) in enumerate(
            zip(self.stage_sizes, layer_specs, strict=True), start=1
        ):
            for block in range(blocks):
                x = block_cls(
                    planes=self.width * mult,
                    stride=stride if block == 0 else 1,
                    dilation=dilation,
                    project=block == 0,
                    use_running_average=self.use_running_average,
                    convolution=self.convolution,
                    name=f"layer{layer_index}_{block}",
                )(x, bn_mask)
            features[f"layer{layer_index}"] = x
        return features
