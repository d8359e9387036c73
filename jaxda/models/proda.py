"""ProDA's DeepLabV2 variant: the Caffe ResNet with ProDA's head (`Classifier_Module2`).

docs/methods/proda.md, "Network": on layer4, five branches (1x1 and four dilated 3x3 convs,
each conv with bias -> GroupNorm(32) -> ReLU) are concatenated, rescaled per channel by a
squeeze-excitation block, fused by a 3x3 conv -> GroupNorm (no ReLU), then Dropout2d(0.1) and
a 1x1 classifier without bias. The 256-d fused feature is what ProDA's prototypes are built on.
"""

from collections.abc import Sequence
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxda.models import layers, resnet

GROUPS = 32
# ProDA's squeeze-excitation squeezes 1280 channels to 80.
SE_REDUCTION = 16


def _group_norm(name: str) -> nn.GroupNorm:
    # PyTorch's eps; two-pass variance as PyTorch computes it.
    return nn.GroupNorm(num_groups=GROUPS, epsilon=1e-5, use_fast_variance=False, name=name)


def _conv(
    features: int,
    kernel: int,
    dilation: int,
    name: str,
    convolution: layers.Convolution,
    use_bias: bool = True,
):
    pad = dilation * (kernel - 1) // 2
    return layers.conv(
        features,
        (kernel, kernel),
        convolution=convolution,
        kernel_dilation=(dilation, dilation),
        padding=((pad, pad), (pad, pad)),
        use_bias=use_bias,
        kernel_init=layers.deeplab_kernel_init,
        name=name,
    )


class ProDAHead(nn.Module):
    """[N, h, w, C_in] -> (logits [N, h, w, num_classes], feature [N, h, w, width]).

    The feature is taken after the dropout, as ProDA's `feat` output is.
    """

    num_classes: int
    width: int = 256
    dilations: Sequence[int] = (6, 12, 18, 24)
    convolution: layers.Convolution = layers.DEFAULT_CONVOLUTION  # `layers.CONV_IMPLS`.

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True):
        if self.width % GROUPS:
            raise ValueError(f"head_width={self.width} must be divisible by {GROUPS} groups")
        branches = []
        for i, (kernel, dilation) in enumerate(((1, 1), *((3, d) for d in self.dilations))):
            y = _conv(self.width, kernel, dilation, f"branch{i}", self.convolution)(x)
            branches.append(nn.relu(_group_norm(f"branch{i}_gn")(y)))
        y = jnp.concatenate(branches, axis=-1)
        channels = y.shape[-1]
        squeezed = jnp.mean(y, axis=(1, 2))
        squeezed = nn.relu(nn.Dense(channels // SE_REDUCTION, name="se_fc1")(squeezed))
        scale = nn.sigmoid(nn.Dense(channels, name="se_fc2")(squeezed))
        y = y * scale[:, None, None, :]
        y = _group_norm("fuse_gn")(_conv(self.width, 3, 1, "fuse", self.convolution)(y))
        # Dropout2d drops whole channels of an image: shared over the spatial axes.
        feature = nn.Dropout(0.1, broadcast_dims=(1, 2))(y, deterministic=deterministic)
        classifier = _conv(self.num_classes, 1, 1, "classifier", self.convolution, use_bias=False)
        logits = classifier(feature)
        return logits, feature


class ProDADeepLabV2(nn.Module):
    """Caffe ResNet (every BN trainable) + ProDA's head, output stride 8.

    Attributes (config.model keys in brackets; `from_config` reads them):
      num_classes: output classes.
      stage_sizes / width: the ResNet [depth or stage_sizes, width].
      head_width: channels of each branch and of the fused feature (256; a multiple of 32)
        [head_width].
      aspp_dilations: dilations of the four 3x3 branches (6, 12, 18, 24) [aspp_dilations,
        optional].
      bn_clr: a BatchNorm on layer4's output (ProDA's `--bn_clr`, `bn_pretrain`) [bn_clr].
      dropout: apply Dropout2d(0.1) in training (needs a 'dropout' rng) [dropout].
      train_batch_stats: BN uses batch statistics in training [bn_mode != 'frozen', optional].
      convolution: how every conv runs (`layers.Convolution`) [conv_impl, dtype, optional].
      remat: recompute the backbone's blocks in the backward pass [remat, optional].
    """

    # ProDA's 10x group is `bn_pretrain` + the head (docs/methods/proda.md).
    param_groups: ClassVar[dict[str, str]] = {
        "backbone": "backbone",
        "bn_pretrain": "head",
        "head": "head",
    }

    num_classes: int = 19
    stage_sizes: Sequence[int] = resnet.STAGE_SIZES[101]
    width: int = 64
    head_width: int = 256
    aspp_dilations: Sequence[int] = (6, 12, 18, 24)
    bn_clr: bool = False
    dropout: bool = True
    train_batch_stats: bool = True
    convolution: layers.Convolution = layers.DEFAULT_CONVOLUTION
    remat: bool = False

    @nn.compact
    def __call__(
        self, images: jax.Array, train: bool = False, bn_mask: jax.Array | None = None
    ) -> dict[str, jax.Array]:
        """[N, H, W, 3] -> {'main': [N, h, w, classes]} at output stride 8.

        As `DeepLabV2.__call__` (BN modes, `bn_mask`, sown 'layer1'..'layer4'); also sows the
        head's [N, h, w, head_width] 'feature'. With `train=True` and `dropout`, pass
        `rngs={'dropout': key}`.
        """
        deterministic = layers.dropout_is_deterministic(self, train, self.dropout)
        use_running_average = not (train and self.train_batch_stats)
        features = resnet.ResNet(
            stage_sizes=self.stage_sizes,
            width=self.width,
            use_running_average=use_running_average,
            convolution=self.convolution,
            remat=self.remat,
            name="backbone",
        )(images, bn_mask)
        for name, value in features.items():
            self.sow("intermediates", name, value)
        x = features["layer4"]
        if self.bn_clr:
            mask = None if bn_mask is None else bn_mask[:, None, None, None]
            norm = layers.batch_norm("bn_pretrain", use_running_average=use_running_average)
            x = norm(x, mask=mask)
        logits, feature = ProDAHead(
            self.num_classes, self.head_width, tuple(self.aspp_dilations), self.convolution,
            name="head",
        )(x, deterministic)  # fmt: skip
        self.sow("intermediates", "feature", feature)
        return {"main": logits}

    @classmethod
    def from_config(cls, model_config: ml_collections.ConfigDict, num_classes: int):
        """From config.model: depth (or stage_sizes), width, head_width, bn_clr, dropout,
        optional aspp_dilations, bn_mode (`layers.BN_MODES`), conv_impl, dtype and remat."""
        return cls(
            num_classes=num_classes,
            stage_sizes=layers.stage_sizes(model_config, resnet.STAGE_SIZES),
            width=model_config.width,
            head_width=model_config.get("head_width", 256),
            aspp_dilations=tuple(model_config.get("aspp_dilations", (6, 12, 18, 24))),
            bn_clr=model_config.get("bn_clr", False),
            dropout=model_config.get("dropout", True),
            train_batch_stats=layers.train_batch_stats(model_config.get("bn_mode", "train")),
            convolution=layers.Convolution.from_config(model_config),
            remat=model_config.get("remat", False),
        )
