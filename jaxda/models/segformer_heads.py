"""The decoders on the MiT encoder's four stage maps: SegFormer's all-MLP head and DAFormer's
context-aware fusion head, and DAFormer's head with a 1x1 conv fusion (HRDA's scale attention).
All return logits at stage 1's grid (stride 4).

All embed each stage map with a per-pixel Dense, resize the embeddings to stage 1's grid
(bilinear, PyTorch `align_corners=False`: `layers.resize_bilinear`) and concatenate them in
the order stage1..stage4 (DAFormer's order; NVlabs' SegFormer concatenates stage4..stage1,
which the converter absorbs by permuting `linear_fuse`'s input channels). Then:

  SegFormerHead  1x1 conv (no bias) -> BN -> ReLU -> Dropout2d -> 1x1 conv (`linear_pred`)
  ConvFusionHead 1x1 conv-BN-ReLU (`fuse_layer`) -> Dropout2d -> 1x1 conv (`conv_seg`)
  DAFormerHead   depthwise-separable ASPP without image pooling: a 1x1 conv-BN-ReLU branch and,
                 per dilation d > 1, a depthwise 3x3 (dilation d) -BN-ReLU then a 1x1 conv-
                 BN-ReLU; the branches concatenated -> 3x3 conv-BN-ReLU (`bottleneck`) ->
                 Dropout2d -> 1x1 conv (`conv_seg`)

Module names mirror the official keys (mmcv ConvModules: 'conv' + 'bn'). Every BatchNorm is
named 'bn' (PyTorch's BatchNorm2d: momentum 0.1, eps 1e-5, two-pass batch variance); they
normalise with batch statistics only when called with `use_running_average=False`, which
updates the running ones in `batch_stats` (`apply(..., mutable=['batch_stats'])`). Dropout2d
drops whole channels of an image and needs a 'dropout' rng when not deterministic.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxda.models import layers, mit

# mmcv ConvModule's init (kaiming_normal, fan_out, relu): N(0, 2 / (k * k * out)), also for
# depthwise convs (PyTorch's fan_out ignores groups).
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# BaseDecodeHead's `conv_seg` init (DAFormer): N(0, 0.01), bias 0.
classifier_init = nn.initializers.normal(stddev=0.01)


def _torch_default_bias(fan_in: int):
    return lambda key, shape, dtype=jnp.float32: layers.torch_default_uniform(
        key, shape, dtype, fan_in=fan_in
    )


class ConvModule(nn.Module):
    """mmcv's ConvModule with BN: conv (no bias) -> BN -> ReLU, [N, h, w, C] -> [.., features].

    `groups` = C makes the conv depthwise; `dilation` pads by dilation * (kernel - 1) / 2.
    """

    features: int
    kernel: int = 1
    dilation: int = 1
    groups: int = 1
    use_running_average: bool = True
    convolution: layers.Convolution = layers.DEFAULT_CONVOLUTION

    @nn.compact
    def __call__(self, x: jax.Array, bn_mask: jax.Array | None = None) -> jax.Array:
        pad = self.dilation * (self.kernel - 1) // 2
        x = layers.conv(
            self.features, (self.kernel, self.kernel), convolution=self.convolution,
            kernel_dilation=(self.dilation, self.dilation), padding=((pad, pad), (pad, pad)),
            feature_group_count=self.groups, use_bias=False,
            kernel_init=kaiming_fan_out,
            name="conv",
        )(x)  # fmt: skip
        bn = layers.batch_norm(
            "bn", use_running_average=self.use_running_average, use_fast_variance=False
        )
        return nn.relu(bn(x, mask=bn_mask))


class DepthwiseSeparableConvModule(nn.Module):
    """Depthwise 3x3 (dilated) ConvModule then a 1x1 ConvModule: [N, h, w, C] -> [.., features]."""

    features: int
    dilation: int
    use_running_average: bool = True
    convolution: layers.Convolution = layers.DEFAULT_CONVOLUTION

    @nn.compact
    def __call__(self, x: jax.Array, bn_mask: jax.Array | None = None) -> jax.Array:
        c = x.shape[-1]
        ura, conv = self.use_running_average, self.convolution
        x = ConvModule(c, 3, self.dilation, c, ura, conv, name="depthwise_conv")(x, bn_mask)
        return ConvModule(self.features, 1, 1, 1, ura, conv, name="pointwise_conv")(x, bn_mask)


def _embed(features: Sequence[jax.Array], width: int, dtype: str, names) -> jax.Array:
    """Per-pixel Dense of each map to `width`, resized to the first map's grid, concatenated:
    -> [N, h1, w1, len(features) * width]."""
    size = features[0].shape[1:3]
    embedded = []
    for x, name in zip(features, names, strict=True):
        fan_in = x.shape[-1]
        y = mit.dense(
            width, dtype, name, kernel_init=layers.torch_default_kernel_init,
            bias_init=_torch_default_bias(fan_in),
        )(x)  # fmt: skip
        embedded.append(layers.resize_bilinear(y, size))
    return jnp.concatenate(embedded, axis=-1)


def _classifier(num_classes: int, convolution: layers.Convolution, name: str, **kwargs):
    return layers.conv(num_classes, (1, 1), convolution=convolution, name=name, **kwargs)


class SegFormerHead(nn.Module):
    """SegFormer's all-MLP decoder: four stage maps -> [N, h1, w1, num_classes].

    Submodules: linear_c1..linear_c4 (Dense, C_k -> embed_dim), linear_fuse/{conv, bn},
    linear_pred (1x1 conv with bias).
    """

    num_classes: int
    embed_dim: int = 768
    dropout_rate: float = 0.1
    use_running_average: bool = True
    convolution: layers.Convolution = layers.DEFAULT_CONVOLUTION

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], bn_mask=None, deterministic: bool = True):
        names = [f"linear_c{i}" for i in range(1, len(features) + 1)]
        x = _embed(features, self.embed_dim, self.convolution.dtype, names)
        x = ConvModule(
            self.embed_dim, 1, use_running_average=self.use_running_average,
            convolution=self.convolution, name="linear_fuse",
        )(x, bn_mask)  # fmt: skip
        x = nn.Dropout(self.dropout_rate, broadcast_dims=(1, 2))(x, deterministic=deterministic)
        return _classifier(
            self.num_classes, self.convolution, "linear_pred",
            kernel_init=layers.torch_default_kernel_init,
            bias_init=_torch_default_bias(self.embed_dim),
        )(x)  # fmt: skip


class ASPPFusion(nn.Module):
    """DAFormer's `fuse_layer` (ASPPWrapper, separable, no pooling): [N, h, w, C] -> [.., width].

    Submodules: aspp_modules_{i} (a ConvModule 1x1 for dilation 1, else a
    DepthwiseSeparableConvModule), bottleneck (3x3 ConvModule on the concatenation).
    """

    width: int = 256
    dilations: Sequence[int] = (1, 6, 12, 18)
    use_running_average: bool = True
    convolution: layers.Convolution = layers.DEFAULT_CONVOLUTION

    @nn.compact
    def __call__(self, x: jax.Array, bn_mask: jax.Array | None = None) -> jax.Array:
        ura, conv = self.use_running_average, self.convolution
        branches = []
        for i, d in enumerate(self.dilations):
            name = f"aspp_modules_{i}"
            if d == 1:
                branch = ConvModule(self.width, 1, 1, 1, ura, conv, name=name)
            else:
                branch = DepthwiseSeparableConvModule(self.width, d, ura, conv, name=name)
            branches.append(branch(x, bn_mask))
        y = jnp.concatenate(branches, axis=-1)
        return ConvModule(self.width, 3, 1, 1, ura, conv, name="bottleneck")(y, bn_mask)


def _dropout_classify(x, num_classes, dropout_rate, convolution, deterministic) -> jax.Array:
    """DAFormer's head tail: Dropout2d, then `conv_seg` (N(0, 0.01) weights, zero bias)."""
    x = nn.Dropout(dropout_rate, broadcast_dims=(1, 2))(x, deterministic=deterministic)
    return _classifier(
        num_classes, convolution, "conv_seg", kernel_init=classifier_init,
        bias_init=nn.initializers.zeros,
    )(x)  # fmt: skip


class DAFormerHead(nn.Module):
    """DAFormer's context-aware fusion decoder: four stage maps -> [N, h1, w1, num_classes].

    Submodules: embed_layers_{0..3} (Dense, C_k -> embed_dim), fuse_layer (`ASPPFusion`),
    conv_seg (1x1 conv with bias).
    """

    num_classes: int
    embed_dim: int = 256
    width: int = 256
    dilations: Sequence[int] = (1, 6, 12, 18)
    dropout_rate: float = 0.1
    use_running_average: bool = True
    convolution: layers.Convolution = layers.DEFAULT_CONVOLUTION

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], bn_mask=None, deterministic: bool = True):
        names = [f"embed_layers_{i}" for i in range(len(features))]
        x = _embed(features, self.embed_dim, self.convolution.dtype, names)
        x = ASPPFusion(
            self.width, tuple(self.dilations), self.use_running_average, self.convolution,
            name="fuse_layer",
        )(x, bn_mask)  # fmt: skip
        return _dropout_classify(
            x, self.num_classes, self.dropout_rate, self.convolution, deterministic
        )


class ConvFusionHead(nn.Module):
    """DAFormer's head with a 1x1 ConvModule as its fusion (the 'conv1' variant of DAFormer's
    ablation): four stage maps -> [N, h1, w1, num_classes]. HRDA's scale attention is this
    head (its `attention_embed_dim` for both widths; `num_classes` 1 for a class-agnostic
    attention), since the official HRDAHead swaps the ASPP fusion of its copied DAFormer
    config for a 1x1 conv.

    Submodules: embed_layers_{0..3} (Dense, C_k -> embed_dim), fuse_layer/{conv, bn}
    (4 * embed_dim -> width), conv_seg (1x1 conv with bias).
    """

    num_classes: int
    embed_dim: int = 256
    width: int = 256
    dropout_rate: float = 0.1
    use_running_average: bool = True
    convolution: layers.Convolution = layers.DEFAULT_CONVOLUTION

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], bn_mask=None, deterministic: bool = True):
        names = [f"embed_layers_{i}" for i in range(len(features))]
        x = _embed(features, self.embed_dim, self.convolution.dtype, names)
        x = ConvModule(
            self.width, 1, use_running_average=self.use_running_average,
            convolution=self.convolution, name="fuse_layer",
        )(x, bn_mask)  # fmt: skip
        return _dropout_classify(
            x, self.num_classes, self.dropout_rate, self.convolution, deterministic
        )
