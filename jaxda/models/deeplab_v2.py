"""DeepLabV2: Caffe ResNet + ASPP classifier, with the multi-level (layer3 aux) head.

The ASPP classifier sums four dilated 3x3 convolutions. AdaptSegNet and MaxSquare return from
inside the summation loop, so their released checkpoints were trained with only the first two
branches; `num_aspp_branches=2` reproduces them (docs/methods/README.md, "ASPP-sum bug").
"""

from collections.abc import Sequence
from typing import ClassVar

import flax.linen as nn
import jax
import ml_collections

from jaxda.models import layers, resnet


class ASPPClassifier(nn.Module):
    """Sum of dilated 3x3 convolutions: [N, h, w, C_in] -> [N, h, w, num_classes]."""

    num_classes: int
    dilations: Sequence[int] = (6, 12, 18, 24)
    num_branches: int = 4
    convolution: layers.Convolution = layers.DEFAULT_CONVOLUTION  # `layers.CONV_IMPLS`.

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if not 1 <= self.num_branches <= len(self.dilations):
            raise ValueError(
                f"num_aspp_branches={self.num_branches} must be in 1..{len(self.dilations)}"
            )
        out = 0.0
        for i, d in enumerate(self.dilations[: self.num_branches]):
            out = out + layers.conv(
                self.num_classes,
                (3, 3),
                convolution=self.convolution,
                kernel_dilation=(d, d),
                padding=((d, d), (d, d)),
                kernel_init=layers.deeplab_kernel_init,
                name=f"branch{i}",
            )(x)
        return out


class DeepLabV2(nn.Module):
    """DeepLabV2 segmentation network with optional multi-level head.

    Attributes:
      num_classes: output classes (19 for the Cityscapes label space).
      stage_sizes / width: the ResNet (see `resnet.ResNet`).
      aspp_dilations / num_aspp_branches: the ASPP classifier.
      multi_level: add the aux head on layer3 (AdaptSegNet/ADVENT/MaxSquare multi-level).
      train_batch_stats: in training mode, BN normalises with the batch statistics and updates
        the running averages (AdaptSegNet/ADVENT call `model.train()` although BN affine is
        frozen). False keeps BN on running statistics in training too ("fully frozen").
      convolution: how every conv runs (`layers.Convolution`).
      remat: recompute the backbone's blocks in the backward pass (`resnet.ResNet.remat`).
    """

    # Learning-rate groups (see `jaxda.models.param_groups`): the classifiers are new layers.
    param_groups: ClassVar[dict[str, str]] = {
        "backbone": "backbone",
        "head_main": "head",
        "head_aux": "head",
    }

    num_classes: int = 19
    stage_sizes: Sequence[int] = resnet.STAGE_SIZES[101]
    width: int = 64
    aspp_dilations: Sequence[int] = (6, 12, 18, 24)
    num_aspp_branches: int = 4
    multi_level: bool = True
    train_batch_stats: bool = True
    convolution: layers.Convolution = layers.DEFAULT_CONVOLUTION
    remat: bool = False

    @nn.compact
    def __call__(
        self, images: jax.Array, train: bool = False, bn_mask: jax.Array | None = None
    ) -> dict[str, jax.Array]:
        """[N, H, W, 3] -> {'main': [N, h, w, classes], 'aux': ...} at output stride 8.

        'aux' is present only with `multi_level`. With `train=True` and `train_batch_stats`,
        call `apply(..., mutable=['batch_stats'])`. The backbone features 'layer1'..'layer4'
        are sown into the 'intermediates' collection (`mutable=['intermediates']` returns
        them; prototypes, whitening and distillation losses read them). `bn_mask`: [N] bool,
        the images whose batch statistics count (see `resnet.ResNet`).
        """
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

        def head(name):
            return ASPPClassifier(
                self.num_classes, self.aspp_dilations, self.num_aspp_branches, self.convolution,
                name=name,
            )  # fmt: skip

        outputs = {"main": head("head_main")(features["layer4"])}
        if self.multi_level:
            outputs["aux"] = head("head_aux")(features["layer3"])
        return outputs

    @classmethod
    def from_config(cls, model_config: ml_collections.ConfigDict, num_classes: int):
        """From config.model: depth (or stage_sizes), width, aspp_dilations,
        num_aspp_branches, multi_level, bn_mode (`layers.BN_MODES`), conv_impl, dtype, remat."""
        return cls(
            num_classes=num_classes,
            stage_sizes=layers.stage_sizes(model_config, resnet.STAGE_SIZES),
            width=model_config.width,
            aspp_dilations=tuple(model_config.aspp_dilations),
            num_aspp_branches=model_config.num_aspp_branches,
            multi_level=model_config.multi_level,
            train_batch_stats=layers.train_batch_stats(model_config.bn_mode),
            convolution=layers.Convolution.from_config(model_config),
            remat=model_config.get("remat", False),
        )


def output_size(size: int) -> int:
    """Logit grid length for an input length, by PyTorch's arithmetic (512 -> 65, 1024 -> 129).

    conv1 (7x7, s2, p3): floor((n - 1) / 2) + 1; ceil-mode max-pool (3x3, s2, p1):
    ceil((n - 1) / 2) + 1; layer2's un-padded 1x1 stride-2 conv: floor((n - 1) / 2) + 1.
    """
    n = (size - 1) // 2 + 1
    n = -(-(n - 1) // 2) + 1
    return (n - 1) // 2 + 1
