"""MiT (Mix Transformer), the SegFormer / DAFormer encoder, variants B0-B5.

Four stages at strides 4, 8, 16, 32. Each stage embeds its input with an overlapping strided
convolution (7x7/4 then 3x3/2, symmetric padding k // 2, so a side of n becomes ceil(n / 4),
then ceil(n / 2) per stage, as PyTorch's conv arithmetic gives) followed by a LayerNorm, runs
pre-norm transformer blocks, and ends with a LayerNorm. A block is

  x = x + DropPath(Attention(LN(x)))     efficient self-attention: keys and values come from
                                         the tokens reduced by a k = s = sr_ratio convolution
                                         (no padding: a remainder row / column is dropped)
  x = x + DropPath(MixFFN(LN(x)))        Dense(4C) -> depthwise 3x3 conv -> exact GELU -> Dense(C)

No positional embedding, no class token. LayerNorm epsilons follow the official code: 1e-6 for
the blocks' norm1 / norm2 and the stage norms, PyTorch's default 1e-5 for the patch
embeddings' and the spatial reductions' norms. Stochastic depth rates grow linearly over the
blocks of all stages, from 0 at the first to `drop_path_rate` at the last (`drop_path_rates`).

Tokens are kept as [batch, height, width, channels] maps throughout: a Dense on the channel
axis is the official per-token Linear, and the convolutions need the grid anyway.

Parameter names mirror the official state-dict keys (`jaxda.interop.mit_layout` maps them):
  patch_embed{1..4}/{proj (conv), norm}
  block{1..4}_{j}/{norm1, attn/{q, kv, sr, norm, proj}, norm2, mlp/{fc1, dwconv, fc2}}
  norm{1..4}
`attn/kv` is one Dense of 2C outputs, K then V, each split head-major, as the official `kv`
Linear; `attn/sr` and `attn/norm` exist in stages whose sr_ratio is above 1. Every LayerNorm is
a module whose name starts with 'norm' (leaves 'scale', 'bias'): the official recipe exempts
exactly these from weight decay.
"""

import dataclasses
import functools
import itertools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxda.models import layers

# config.model.variant -> (embed_dims, depths) of the official mit_b0 ... mit_b5 classes; all
# use 1, 2, 5, 8 heads, MLP ratio 4 and spatial-reduction ratios 8, 4, 2, 1.
VARIANTS = {
    "b0": ((32, 64, 160, 256), (2, 2, 2, 2)),
    "b1": ((64, 128, 320, 512), (2, 2, 2, 2)),
    "b2": ((64, 128, 320, 512), (3, 4, 6, 3)),
    "b3": ((64, 128, 320, 512), (3, 4, 18, 3)),
    "b4": ((64, 128, 320, 512), (3, 8, 27, 3)),
    "b5": ((64, 128, 320, 512), (3, 6, 40, 3)),
}
NUM_HEADS = (1, 2, 5, 8)
SR_RATIOS = (8, 4, 2, 1)
MLP_RATIO = 4
# Blocks and stage ends (the official `norm_layer`) vs patch embeddings and spatial reductions
# (a bare nn.LayerNorm in the official code).
BLOCK_NORM_EPS = 1e-6
EMBED_NORM_EPS = 1e-5
# (kernel, stride, padding) of each stage's patch embedding.
PATCH_EMBEDS = ((7, 4, 3), (3, 2, 1), (3, 2, 1), (3, 2, 1))

# The official `_init_weights`: Linear ~ truncated N(0, 0.02) (timm cuts at +-2, i.e. 100 std,
# Flax at 2 std: the same draw in practice), bias 0; LayerNorm 1, 0 (Flax's default).
dense_kernel_init = nn.initializers.truncated_normal(stddev=0.02)


def conv_kernel_init(groups: int = 1):
    """The official conv init, N(0, 2 / fan_out) with fan_out = k * k * out / groups (Flax's
    fan_out omits the division, hence the factor)."""
    return nn.initializers.variance_scaling(2.0 * groups, "fan_out", "normal")


def drop_path_rates(depths: Sequence[int], drop_path_rate: float) -> list[list[float]]:
    """Per stage, the stochastic-depth rate of each block: linspace(0, rate, sum(depths)) over
    the blocks of all stages in order (B5: block k of 52 has 0.1 * k / 51)."""
    rates = np.linspace(0.0, drop_path_rate, sum(depths)).tolist()
    starts = np.cumsum([0, *depths])
    return [rates[a:b] for a, b in itertools.pairwise(starts)]


def stage_sizes(height: int, width: int) -> list[tuple[int, int]]:
    """(height, width) of the four stage outputs for an input of that size (PyTorch's conv
    arithmetic: 512 -> 128, 64, 32, 16; 1052 -> 263, 132, 66, 33)."""
    sizes = []
    for kernel, stride, pad in PATCH_EMBEDS:
        height = (height + 2 * pad - kernel) // stride + 1
        width = (width + 2 * pad - kernel) // stride + 1
        sizes.append((height, width))
    return sizes


@dataclasses.dataclass(frozen=True)
class MatMul:
    """`lax.dot_general` computing in `dtype` (config.model.dtype) with the result in the input's
    dtype: the matrix products' counterpart of `layers.Convolution`'s mixed precision."""

    dtype: str = "float32"

    def __call__(self, lhs, rhs, dimension_numbers, precision=None, **kwargs):
        del kwargs  # preferred_element_type: the result is cast back below.
        if self.dtype == "float32":
            return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision)
        dtype = jnp.dtype(self.dtype)
        out = lax.dot_general(lhs.astype(dtype), rhs.astype(dtype), dimension_numbers, precision)
        return out.astype(lhs.dtype)


def dense(features: int, dtype: str, name: str, **kwargs) -> nn.Dense:
    """nn.Dense computing in `dtype` ('float32' or 'bfloat16'; parameters stay float32)."""
    kwargs.setdefault("kernel_init", dense_kernel_init)
    return nn.Dense(features, dot_general=MatMul(dtype), name=name, **kwargs)


def layer_norm(epsilon: float, name: str) -> nn.LayerNorm:
    # Two-pass variance, as PyTorch: tokens after a patch embedding can have large means.
    return nn.LayerNorm(epsilon=epsilon, use_fast_variance=False, name=name)


class DropPath(nn.Module):
    """Stochastic depth (timm's DropPath): each image's residual branch is dropped with
    probability `rate` and kept ones are scaled by 1 / (1 - rate). [N, ...] -> [N, ...]."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],))
        return x * (mask.astype(x.dtype) / keep).reshape((-1,) + (1,) * (x.ndim - 1))


class PatchEmbed(nn.Module):
    """Overlapping patch embedding, conv (symmetric padding) -> LayerNorm:
    [N, H, W, C_in] -> [N, (H + 2 pad - kernel) // stride + 1, ..., features]."""

    features: int
    kernel: int
    stride: int
    pad: int
    convolution: layers.Convolution = layers.DEFAULT_CONVOLUTION

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # Explicit padding: 'SAME' would pad (1, 2) for 7/4 on 512 and shift the grid.
        x = layers.conv(
            self.features, (self.kernel, self.kernel), convolution=self.convolution,
            strides=(self.stride, self.stride), padding=((self.pad, self.pad),) * 2,
            kernel_init=conv_kernel_init(), name="proj",
        )(x)  # fmt: skip
        return layer_norm(EMBED_NORM_EPS, "norm")(x)


class Attention(nn.Module):
    """Multi-head self-attention with spatial reduction: [N, H, W, C] -> [N, H, W, C]."""

    num_heads: int
    sr_ratio: int
    convolution: layers.Convolution = layers.DEFAULT_CONVOLUTION

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, h, w, c = x.shape
        head_dim = c // self.num_heads
        dtype = self.convolution.dtype
        q = dense(c, dtype, "q")(x).reshape(n, h * w, self.num_heads, head_dim)
        if self.sr_ratio > 1:
            r = self.sr_ratio
            x = layers.conv(
                c, (r, r), convolution=self.convolution, strides=(r, r), padding="VALID",
                kernel_init=conv_kernel_init(), name="sr",
            )(x)  # fmt: skip
            x = layer_norm(EMBED_NORM_EPS, "norm")(x)
        kv = dense(2 * c, dtype, "kv")(x).reshape(n, -1, 2, self.num_heads, head_dim)
        k, v = kv[:, :, 0], kv[:, :, 1]
        matmul = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
        if dtype != "float32":
            q, k, v = (t.astype(dtype) for t in (q, k, v))
        logits = matmul("nqhd,nkhd->nhqk", q, k) * head_dim**-0.5
        weights = jax.nn.softmax(logits, axis=-1)
        out = matmul("nhqk,nkhd->nqhd", weights.astype(v.dtype), v).astype(jnp.float32)
        return dense(c, dtype, "proj")(out.reshape(n, h, w, c))


class MixFFN(nn.Module):
    """Dense(hidden) -> depthwise 3x3 conv -> exact GELU -> Dense(C): [N, H, W, C] -> same."""

    hidden: int
    convolution: layers.Convolution = layers.DEFAULT_CONVOLUTION

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.convolution.dtype
        y = dense(self.hidden, dtype, "fc1")(x)
        y = layers.conv(
            self.hidden, (3, 3), convolution=self.convolution, padding=((1, 1), (1, 1)),
            feature_group_count=self.hidden, kernel_init=conv_kernel_init(self.hidden),
            name="dwconv",
        )(y)  # fmt: skip
        y = nn.gelu(y, approximate=False)  # torch.nn.GELU: the erf form.
        return dense(x.shape[-1], dtype, "fc2")(y)


class Block(nn.Module):
    """Pre-norm transformer block: [N, H, W, C] -> [N, H, W, C]."""

    num_heads: int
    sr_ratio: int
    mlp_ratio: int = MLP_RATIO
    drop_path: float = 0.0
    convolution: layers.Convolution = layers.DEFAULT_CONVOLUTION

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        drop = DropPath(self.drop_path)
        y = Attention(self.num_heads, self.sr_ratio, self.convolution, name="attn")(
            layer_norm(BLOCK_NORM_EPS, "norm1")(x)
        )
        x = x + drop(y, deterministic)
        y = MixFFN(x.shape[-1] * self.mlp_ratio, self.convolution, name="mlp")(
            layer_norm(BLOCK_NORM_EPS, "norm2")(x)
        )
        # Stored once (config.model.block_barrier), not recomputed along the residual chain.
        return self.convolution.block_output(x + drop(y, deterministic))


class MixVisionTransformer(nn.Module):
    """The MiT encoder: [N, H, W, 3] -> {'stage1'..'stage4': [N, h_k, w_k, embed_dims[k]]} at
    strides 4, 8, 16, 32 (sizes: `stage_sizes`).

    Attributes:
      embed_dims / depths / num_heads / sr_ratios: per stage (`VARIANTS`, `NUM_HEADS`,
        `SR_RATIOS` for the official B0-B5).
      mlp_ratio: Mix-FFN hidden width / embed dim.
      drop_path_rate: stochastic depth of the last block (`drop_path_rates`).
      convolution: how every conv runs; its dtype also sets the matrix products' (`MatMul`).
      remat: recompute each block's activations in the backward pass (less memory, one more
        encoder forward of compute).
    """

    embed_dims: Sequence[int] = VARIANTS["b5"][0]
    depths: Sequence[int] = VARIANTS["b5"][1]
    num_heads: Sequence[int] = NUM_HEADS
    sr_ratios: Sequence[int] = SR_RATIOS
    mlp_ratio: int = MLP_RATIO
    drop_path_rate: float = 0.1
    convolution: layers.Convolution = layers.DEFAULT_CONVOLUTION
    remat: bool = False

    @nn.compact
    def __call__(self, images: jax.Array, deterministic: bool = True) -> dict[str, jax.Array]:
        """`deterministic=False` applies stochastic depth (needs a 'dropout' rng)."""
        for name, values in (("depths", self.depths), ("num_heads", self.num_heads),
                             ("sr_ratios", self.sr_ratios)):  # fmt: skip
            if len(values) != len(self.embed_dims):
                raise ValueError(f"MiT {name}={tuple(values)}: one per stage (4) expected")
        for dim, heads in zip(self.embed_dims, self.num_heads, strict=True):
            if dim % heads:
                raise ValueError(f"MiT embed dim {dim} is not divisible by {heads} heads")
        # Static `deterministic` (argument 2 counting the module): it selects Python branches.
        block_cls = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
        rates = drop_path_rates(self.depths, self.drop_path_rate)
        outputs = {}
        x = images
        for stage, (dim, depth) in enumerate(zip(self.embed_dims, self.depths, strict=True)):
            i = stage + 1
            x = PatchEmbed(dim, *PATCH_EMBEDS[stage], self.convolution, name=f"patch_embed{i}")(x)
            for j in range(depth):
                x = block_cls(
                    self.num_heads[stage], self.sr_ratios[stage], self.mlp_ratio, rates[stage][j],
                    self.convolution, name=f"block{i}_{j}",
                )(x, deterministic)  # fmt: skip
            x = layer_norm(BLOCK_NORM_EPS, f"norm{i}")(x)
            outputs[f"stage{i}"] = x
        return outputs
