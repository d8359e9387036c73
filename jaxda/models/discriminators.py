"""Fully-convolutional output-space discriminators: AdaptSegNet/ADVENT's and ProDA's."""

import functools
from typing import ClassVar

import flax.linen as nn
import jax
import ml_collections

from jaxda.models import layers


class FCDiscriminator(nn.Module):
    """Four stride-2 convs (w, 2w, 4w, 8w) and a stride-2 (or 1x1) classifier.

    AdaptSegNet / ADVENT (`model/discriminator.py`): 4x4 kernels, LeakyReLU 0.2 after every
    conv, a 4x4 stride-2 classifier: [N, H, W, C] -> [N, H/32, W/32, 1]. ProDA
    (`models/discriminator.py`, `style='proda'`): 3x3 kernels, ReLU after conv1..conv3 and
    LeakyReLU 0.2 after conv4, a 1x1 classifier: [N, H/16, W/16, 1]. Logits: "target" = 1,
    "source" = 0. PyTorch's default Conv2d init, as both references.

    Attributes:
      width: channels of the first conv (64 in the published models).
      style: 'adaptseg' or 'proda'.
      convolution: how every conv runs (`layers.Convolution`; in training, that of the
        run's config.model, see `jaxda.models.build_discriminator`).
    """

    _LAYERS = ("conv1", "conv2", "conv3", "conv4", "classifier")
    # One learning-rate group (see `jaxda.models.param_groups`).
    param_groups: ClassVar[dict[str, str]] = dict.fromkeys(_LAYERS, "all")
    STYLES: ClassVar[tuple[str, ...]] = ("adaptseg", "proda")

    width: int = 64
    style: str = "adaptseg"
    convolution: layers.Convolution = layers.DEFAULT_CONVOLUTION

    @classmethod
    def from_config(
        cls,
        disc_config: ml_collections.ConfigDict,
        convolution: layers.Convolution = layers.DEFAULT_CONVOLUTION,
    ):
        style = disc_config.get("style", "adaptseg")
        if style not in cls.STYLES:
            raise ValueError(f"config.discriminator.style={style!r}; use one of {cls.STYLES}")
        return cls(width=disc_config.width, style=style, convolution=convolution)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        proda = self.style == "proda"
        min_size = 16 if proda else 32
        if min(x.shape[1:3]) < min_size:
            # Each stride-2 conv halves the map: a smaller one leaves an empty output and a
            # NaN loss.
            raise ValueError(
                f"The discriminator needs inputs of at least {min_size}x{min_size} pixels, got "
                f"{x.shape[1:3]}; raise the stream's size in config.data."
            )
        widths = (self.width, self.width * 2, self.width * 4, self.width * 8, 1)
        for i, (features, name) in enumerate(zip(widths, self._LAYERS, strict=True)):
            last = i == len(widths) - 1
            kernel = 1 if proda and last else (3 if proda else 4)
            stride = 1 if proda and last else 2
            pad = (kernel - 1) // 2 if proda else 1
            x = layers.conv(
                features,
                (kernel, kernel),
                convolution=self.convolution,
                strides=(stride, stride),
                padding=((pad, pad), (pad, pad)),
                kernel_init=layers.torch_default_kernel_init,
                bias_init=functools.partial(
                    layers.torch_default_uniform, fan_in=x.shape[-1] * kernel * kernel
                ),
                name=name,
            )(x)
            if last:
                break
            x = nn.relu(x) if proda and i < 3 else nn.leaky_relu(x, negative_slope=0.2)
        return x
