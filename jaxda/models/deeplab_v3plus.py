"""DeepLabV3+: torchvision-form ResNet, ASPP with image pooling, and a stride-4 decoder.

Two variants of the same network, differing in concatenation orders, dropout and aux head
(docs/methods/robustnet.md, adversarial_da_exp.md):

* 'robustnet' (shachoi/RobustNet `network/deepv3.py`, `DeepR50V3PlusD16` and relatives): ASPP
  concatenates [image pooling, 1x1, 3x3 x 3]; `bot_aspp` 1x1 projection; the decoder
  concatenates [low-level, upsampled ASPP]; two 3x3 conv-BN-ReLU then a 1x1 classifier; no
  dropout in the main path. Multi-level: the `dsn` aux head on layer3 (3x3 conv with bias ->
  BN -> ReLU -> Dropout2d(0.1) -> 1x1 classifier), logits at layer3's resolution.
* 'jfzhang95' (jfzhang95/pytorch-deeplab-xception `modeling/`, as Adversarial_DA_Exp uses it):
  ASPP concatenates [1x1, 3x3 x 3, image pooling]; the projection is followed by Dropout(0.5);
  the decoder concatenates [upsampled ASPP, low-level]; 3x3-BN-ReLU-Dropout(0.5)-3x3-BN-ReLU-
  Dropout(0.1)-1x1. Its `DeepLab.forward` returns one output: Adversarial_DA_Exp's trainer has
  no aux output for it (its `--multi` path needs a tuple), so this variant has no aux head and
  `multi_level=True` is refused.

Both references resize with `align_corners=True` (RobustNet's `mynn.Upsample`, jfzhang95's
`F.interpolate(..., align_corners=True)`), for the ASPP output to layer1's grid here and for
the logits to the input size in the training loop. Upsampling the 1x1 image-pooling features
is a broadcast in any mode. Dropout is element-wise (nn.Dropout) except the aux head's
channel-wise Dropout2d, and needs a 'dropout' rng in training (`apply(..., rngs=...)`).
"""

import functools
from collections.abc import Sequence
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxda.models import layers, resnet_torchvision

VARIANTS = ("robustnet", "jfzhang95")
# RobustNet's `initialize_weights` (kaiming_normal_, 'relu', fan_in) for every head conv;
# jfzhang95's `kaiming_normal_` defaults give the same std, sqrt(2 / fan_in).
kaiming_fan_in = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def aspp_rates(output_stride: int) -> tuple[int, int, int]:
    """The three atrous rates of both references: (6, 12, 18) at OS16, doubled at OS8."""
    return tuple(r * 16 // output_stride for r in (6, 12, 18))


class ConvBNReLU(nn.Module):
    """Conv (no bias unless `use_bias`) -> BN -> ReLU: [N, h, w, C] -> [N, h, w, features]."""

    features: int
    kernel: int = 1
    dilation: int = 1
    use_bias: bool = False
    use_running_average: bool = True
    convolution: layers.Convolution = layers.DEFAULT_CONVOLUTION  # `layers.CONV_IMPLS`.

    @nn.compact
    def __call__(self, x: jax.Array, bn_mask: jax.Array | None = None) -> jax.Array:
        pad = self.dilation * (self.kernel - 1) // 2
        x = layers.conv(
            self.features,
            (self.kernel, self.kernel),
            convolution=self.convolution,
            kernel_dilation=(self.dilation, self.dilation),
            padding=((pad, pad), (pad, pad)),
            use_bias=self.use_bias,
            kernel_init=kaiming_fan_in,
            name="conv",
        )(x)
        norm = resnet_torchvision.batch_norm("bn", use_running_average=self.use_running_average)
        return nn.relu(norm(x, mask=bn_mask))


def _classifier(
    num_classes: int, variant: str, fan_in: int, name: str, convolution: layers.Convolution
) -> nn.Conv:
    # RobustNet zeroes head biases; jfzhang95 leaves the classifier bias at PyTorch's default.
    if variant == "robustnet":
        bias_init = nn.initializers.zeros
    else:
        bias_init = lambda k, s, d=jnp.float32: layers.torch_default_uniform(  # noqa: E731
            k, s, d, fan_in=fan_in
        )
    return layers.conv(
        num_classes, (1, 1), convolution=convolution, kernel_init=kaiming_fan_in,
        bias_init=bias_init, name=name,
    )  # fmt: skip


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling + 1x1 projection: [N, h, w, C] -> [N, h, w, width].

    Submodules: branch0 (1x1), branch1..3 (3x3 at `rates`), pool (image pooling), project.
    """

    width: int = 256
    rates: Sequence[int] = (6, 12, 18)
    variant: str = "robustnet"
    use_running_average: bool = True
    convolution: layers.Convolution = layers.DEFAULT_CONVOLUTION

    @nn.compact
    def __call__(self, x, bn_mask=None, deterministic: bool = True) -> jax.Array:
        def unit(kernel, name, dilation=1):
            return ConvBNReLU(
                self.width, kernel, dilation, use_running_average=self.use_running_average,
                convolution=self.convolution, name=name,
            )  # fmt: skip

        pooled = unit(1, "pool")(jnp.mean(x, axis=(1, 2), keepdims=True), bn_mask)
        pooled = jnp.broadcast_to(pooled, (*x.shape[:3], self.width))
        branches = [unit(1, "branch0")(x, bn_mask)]
        for i, rate in enumerate(self.rates, start=1):
            branches.append(unit(3, f"branch{i}", rate)(x, bn_mask))
        robustnet = self.variant == "robustnet"
        branches = [pooled, *branches] if robustnet else [*branches, pooled]
        y = unit(1, "project")(jnp.concatenate(branches, axis=-1), bn_mask)
        if self.variant == "jfzhang95":
            y = nn.Dropout(0.5)(y, deterministic=deterministic)
        return y


class Decoder(nn.Module):
    """Low-level fusion at layer1's stride + classifier: -> [N, h1, w1, num_classes]."""

    num_classes: int
    width: int = 256
    low_level_width: int = 48
    variant: str = "robustnet"
    use_running_average: bool = True
    convolution: layers.Convolution = layers.DEFAULT_CONVOLUTION

    @nn.compact
    def __call__(self, x, low_level, bn_mask=None, deterministic: bool = True) -> jax.Array:
        """x: [N, h, w, C] ASPP output; low_level: [N, h1, w1, C1] layer1 features."""
        unit = functools.partial(
            ConvBNReLU, use_running_average=self.use_running_average, convolution=self.convolution
        )
        jfzhang95 = self.variant == "jfzhang95"
        low = unit(self.low_level_width, 1, name="low_level")(low_level, bn_mask)
        up = layers.resize_bilinear_align_corners(x, low.shape[1:3])
        y = jnp.concatenate([up, low] if jfzhang95 else [low, up], axis=-1)
        y = unit(self.width, 3, name="conv1")(y, bn_mask)
        if jfzhang95:
            y = nn.Dropout(0.5)(y, deterministic=deterministic)
        y = unit(self.width, 3, name="conv2")(y, bn_mask)
        if jfzhang95:
            y = nn.Dropout(0.1)(y, deterministic=deterministic)
        classifier = _classifier(
            self.num_classes, self.variant, self.width, "classifier", self.convolution
        )
        return classifier(y)


class AuxHead(nn.Module):
    """RobustNet's `dsn`: 3x3 conv (bias) -> BN -> ReLU -> Dropout2d(0.1) -> 1x1 classifier."""

    num_classes: int
    width: int = 512
    use_running_average: bool = True
    convolution: layers.Convolution = layers.DEFAULT_CONVOLUTION

    @nn.compact
    def __call__(self, x, bn_mask=None, deterministic: bool = True) -> jax.Array:
        unit = ConvBNReLU(
            self.width, 3, use_bias=True, use_running_average=self.use_running_average,
            convolution=self.convolution, name="unit",
        )  # fmt: skip
        y = unit(x, bn_mask)
        # Dropout2d drops whole channels of an image: shared over the spatial axes.
        y = nn.Dropout(0.1, broadcast_dims=(1, 2))(y, deterministic=deterministic)
        classifier = _classifier(
            self.num_classes, "robustnet", self.width, "classifier", self.convolution
        )
        return classifier(y)


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ segmentation network (see the module docstring for the two variants).

    Attributes:
      num_classes: output classes.
      stage_sizes / width / output_stride / deep_stem / multi_grid / instance_norm /
        instance_norm_at: the backbone (`resnet_torchvision.ResNet`); the whitened maps of
        instance_norm='plain' are sown as intermediates 'whitened/<slot>'.
      variant: 'robustnet' or 'jfzhang95'.
      aspp_rates: the 3x3 branches' rates; () = (6, 12, 18) x 16 / output_stride.
      head_width / low_level_width / aux_width: 256, 48 and 512 in the references.
      multi_level: add RobustNet's `dsn` aux head on layer3 ('robustnet' only).
      dropout: apply the references' dropout in training (needs a 'dropout' rng).
      train_batch_stats: as `DeepLabV2.train_batch_stats`.
      convolution: how every conv runs (`layers.Convolution`).
      remat: recompute the backbone's blocks in the backward pass (`resnet.ResNet.remat`).
    """

    param_groups: ClassVar[dict[str, str]] = {
        "backbone": "backbone",
        "aspp": "head",
        "decoder": "head",
        "head_aux": "head",
    }

    num_classes: int = 19
    stage_sizes: Sequence[int] = resnet_torchvision.STAGE_SIZES[50]
    width: int = 64
    output_stride: int = 16
    deep_stem: bool = False
    multi_grid: Sequence[int] = ()
    instance_norm: str = ""
    instance_norm_at: Sequence[str] = ("stem", "layer1", "layer2")
    variant: str = "robustnet"
    aspp_rates: Sequence[int] = ()
    head_width: int = 256
    low_level_width: int = 48
    aux_width: int = 512
    multi_level: bool = True
    dropout: bool = True
    train_batch_stats: bool = True
    convolution: layers.Convolution = layers.DEFAULT_CONVOLUTION
    remat: bool = False

    @nn.compact
    def __call__(
        self, images: jax.Array, train: bool = False, bn_mask: jax.Array | None = None
    ) -> dict[str, jax.Array]:
        """[N, H, W, 3] -> {'main': [N, h1, w1, classes], 'aux': [N, h3, w3, classes]}.

        'main' is at layer1's resolution (stride 4), 'aux' (only with `multi_level`) at
        layer3's. Training, BN and intermediates as `DeepLabV2.__call__`; with `train=True` and
        `dropout`, pass `rngs={'dropout': key}`.
        """
        if self.variant not in VARIANTS:
            raise ValueError(f"variant={self.variant!r} must be one of {VARIANTS}")
        if self.multi_level and self.variant != "robustnet":
            raise ValueError(
                "multi_level needs variant='robustnet': jfzhang95's DeepLabV3+ (as "
                "Adversarial_DA_Exp uses it) has no aux head; set model.multi_level=False"
            )
        deterministic = layers.dropout_is_deterministic(self, train, self.dropout)
        ura = not (train and self.train_batch_stats)
        features = resnet_torchvision.ResNet(
            stage_sizes=self.stage_sizes,
            width=self.width,
            output_stride=self.output_stride,
            deep_stem=self.deep_stem,
            multi_grid=self.multi_grid,
            instance_norm=self.instance_norm,
            instance_norm_at=self.instance_norm_at,
            use_running_average=ura,
            convolution=self.convolution,
            remat=self.remat,
            name="backbone",
        )(images, bn_mask)
        for name, value in features.items():
            self.sow("intermediates", name, value)
        mask = None if bn_mask is None else bn_mask[:, None, None, None]
        rates = tuple(self.aspp_rates) or aspp_rates(self.output_stride)
        x = ASPP(self.head_width, rates, self.variant, ura, self.convolution, name="aspp")(
            features["layer4"], mask, deterministic
        )
        decoder = Decoder(
            self.num_classes, self.head_width, self.low_level_width, self.variant, ura,
            self.convolution, name="decoder",
        )  # fmt: skip
        outputs = {"main": decoder(x, features["layer1"], mask, deterministic)}
        if self.multi_level:
            aux = AuxHead(self.num_classes, self.aux_width, ura, self.convolution, name="head_aux")
            outputs["aux"] = aux(features["layer3"], mask, deterministic)
        return outputs

    @classmethod
    def from_config(cls, model_config: ml_collections.ConfigDict, num_classes: int):
        """From config.model (`configs.common.use_deeplabv3plus` lists the keys)."""
        return cls(
            num_classes=num_classes,
            stage_sizes=layers.stage_sizes(model_config, resnet_torchvision.STAGE_SIZES),
            width=model_config.width,
            output_stride=model_config.output_stride,
            deep_stem=model_config.deep_stem,
            multi_grid=tuple(model_config.multi_grid),
            instance_norm=model_config.get("instance_norm", ""),
            instance_norm_at=tuple(
                model_config.get("instance_norm_at", ("stem", "layer1", "layer2"))
            ),
            variant=model_config.variant,
            aspp_rates=tuple(model_config.aspp_rates),
            head_width=model_config.head_width,
            low_level_width=model_config.low_level_width,
            aux_width=model_config.aux_width,
            multi_level=model_config.multi_level,
            dropout=model_config.dropout,
            train_batch_stats=layers.train_batch_stats(model_config.bn_mode),
            convolution=layers.Convolution.from_config(model_config),
            remat=model_config.get("remat", False),
        )
