"""The fully-convolutional output-space discriminator of AdaptSegNet and ADVENT."""

import functools
from typing import ClassVar

import flax.linen as nn
import jax
import ml_collections

from jaxda.models import layers


class FCDiscriminator(nn.Module):
    """Four 4x4 stride-2 convs (w, 2w, 4w, 8w; LeakyReLU 0.2) and a 4x4 stride-2 classifier.

    [N, H, W, C] -> [N, H/32, W/32, 1] logits ("target" = 1, "source" = 0). PyTorch's default
    Conv2d init, as in AdaptSegNet's `model/discriminator.py`.

    Attributes:
      width: channels of the first conv (64 in the published models).
    """

    _LAYERS = ("conv1", "conv2", "conv3", "conv4", "classifier")
    # One learning-rate group (see `jaxda.models.param_groups`).
    param_groups: ClassVar[dict[str, str]] = dict.fromkeys(_LAYERS, "all")

    width: int = 64

    @classmethod
    def from_config(cls, disc_config: ml_collections.ConfigDict):
        return cls(width=disc_config.width)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if min(x.shape[1:3]) < 32:
            # Five stride-2 convs: a smaller map leaves an empty output and a NaN loss.
            raise ValueError(
                f"The discriminator needs inputs of at least 32x32 pixels, got {x.shape[1:3]}; "
                "raise the stream's size in config.data."
            )
        widths = (self.width, self.width * 2, self.width * 4, self.width * 8, 1)
        for i, (features, name) in enumerate(zip(widths, self._LAYERS, strict=True)):
            fan_in = x.shape[-1] * 16
            x = nn.Conv(
                features,
                (4, 4),
                strides=(2, 2),
                padding=((1, 1), (1, 1)),
                kernel_init=layers.torch_default_kernel_init,
                bias_init=functools.partial(layers.torch_default_uniform, fan_in=fan_in),
                name=name,
            )(x)
            if i < len(widths) - 1:
                x = nn.leaky_relu(x, negative_slope=0.2)
        return x
