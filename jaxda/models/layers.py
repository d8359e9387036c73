"""Small building blocks shared by the models: convolutions, PyTorch-compatible resizing,
pooling, BatchNorm."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxda.models import fast_conv

# config.model.conv_impl -> the convolution every nn.Conv of every network runs: XLA's own, or
# fast_conv's (XLA's forward and input gradient, a dot-based weight gradient: faster on CPU),
# or 'auto': 'fast' on CPU, 'xla' on GPU and TPU (where 'fast' has not been measured).
CONV_IMPLS = {"xla": lax.conv_general_dilated, "fast": fast_conv.conv_general_dilated}
AUTO_IMPL = {"cpu": "fast"}  # Backend -> impl of 'auto'; any other backend: 'xla'.
# config.model.dtype: the dtype convolutions compute in (see `Convolution`).
COMPUTE_DTYPES = ("float32", "bfloat16")
# config.model.block_barrier: whether residual blocks' outputs are fusion barriers (see
# `Convolution`); 'auto' = on for these backends.
BLOCK_BARRIERS = ("auto", "on", "off")
AUTO_BLOCK_BARRIER = ("cpu",)


@jax.custom_vjp
def fusion_barrier(x: jax.Array) -> jax.Array:
    """x, exactly (any shape), as a value that XLA computes once and stores.

    XLA's loop fusion duplicates cheap elementwise producers into each of their consumers. On
    a residual chain (x_k+1 = relu(bn(conv(x_k)) + x_k)) that means every block's sum and its
    ReLU mask re-read and recompute all earlier blocks' BN and additions, back to the last
    non-elementwise op: work quadratic in the chain's length (XLA:CPU in jaxlib 0.10.2 fused
    up to 125 operands per fusion in ResNet-101's layer3).
    `lax.optimization_barrier` does not stop it (XLA:CPU removes barriers before fusing), but
    XLA does not duplicate a producer that holds a division: x is divided by ones (x / 1 is x
    for every float, NaN and inf included; XLA:CPU's arithmetic flushes subnormals to zero, as
    the ReLU before each barrier already did). The gradient passes unchanged.
    """
    # Elementwise ones the compiler cannot fold (|x| + 1 >= 1 has sign 1; NaN stays NaN): a
    # constant or scalar divisor would be rewritten into a cheap multiplication.
    return x / jnp.sign(jnp.abs(x) + 1)


fusion_barrier.defvjp(lambda x: (fusion_barrier(x), None), lambda _, g: (g,))


@dataclasses.dataclass(frozen=True)
class Convolution:
    """How every convolution of a network runs: config.model.conv_impl and config.model.dtype.

    impl: 'xla' (XLA's own convolution), 'fast' (`fast_conv`: XLA's forward and input
      gradient, the weight gradient as matrix products; 3x faster train steps on CPU) or
      'auto' ('fast' on CPU, 'xla' on other backends). Results differ by float rounding.
    dtype: 'float32', or 'bfloat16' for mixed precision: a convolution's input and kernel are
      cast to bfloat16, it computes in bfloat16 and its result is cast back to float32. So the
      convolutions (nearly all of the FLOPs) run at bfloat16 speed on GPUs and TPUs, while
      parameters, bias additions, BatchNorm (statistics included), activations between layers,
      losses and optimiser state stay float32 (the convolutions' saved inputs are bfloat16).
    block_barrier: 'on' makes each residual block's output a `fusion_barrier` (computed once
      and stored, never recomputed by its consumers), 'off' leaves fusion to XLA, 'auto' is
      'on' on CPU, where it cut DeepLabV2-R101's train step by 14% and its evaluation forward
      by 27% (XLA's GPU fusion has its own limits; unmeasured there). Values are the same
      either way, up to float rounding (fused otherwise, XLA may round differently).
    None of these changes the parameters, so a checkpoint loads under any setting.
    """

    impl: str = "xla"
    dtype: str = "float32"
    block_barrier: str = "off"

    def __post_init__(self):
        if self.impl not in (*CONV_IMPLS, "auto"):
            raise ValueError(
                f"config.model.conv_impl={self.impl!r}; use one of {sorted(CONV_IMPLS)} or 'auto'"
            )
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"config.model.dtype={self.dtype!r}; use one of {COMPUTE_DTYPES}")
        if self.block_barrier not in BLOCK_BARRIERS:
            raise ValueError(
                f"config.model.block_barrier={self.block_barrier!r}; use one of {BLOCK_BARRIERS}"
            )

    @classmethod
    def from_config(cls, model_config) -> "Convolution":
        """From config.model's conv_impl, dtype and block_barrier (defaults: 'xla', 'float32',
        'off')."""
        return cls(
            model_config.get("conv_impl", "xla"),
            model_config.get("dtype", "float32"),
            model_config.get("block_barrier", "off"),
        )

    def block_output(self, x: jax.Array) -> jax.Array:
        """A residual block's output [N, h, w, C]: `fusion_barrier(x)` where block_barrier is
        on ('auto': on the CPU backend), else x."""
        on = self.block_barrier == "on" or (
            self.block_barrier == "auto" and jax.default_backend() in AUTO_BLOCK_BARRIER
        )
        return fusion_barrier(x) if on else x

    def resolved_impl(self) -> str:
        """'xla' or 'fast': 'auto' resolved for JAX's default backend (when tracing)."""
        if self.impl == "auto":
            return AUTO_IMPL.get(jax.default_backend(), "xla")
        return self.impl

    def __call__(self, lhs, rhs, *args, **kwargs):
        """`lax.conv_general_dilated`'s signature: nn.Conv's `conv_general_dilated`."""
        impl = CONV_IMPLS[self.resolved_impl()]
        if self.dtype == "float32":
            return impl(lhs, rhs, *args, **kwargs)
        dtype = jnp.dtype(self.dtype)
        return impl(lhs.astype(dtype), rhs.astype(dtype), *args, **kwargs).astype(lhs.dtype)


DEFAULT_CONVOLUTION = Convolution()  # XLA's own, float32.


def conv(features: int, kernel_size, *, convolution: Convolution = DEFAULT_CONVOLUTION, **kwargs):
    """nn.Conv(features, kernel_size, **kwargs) whose convolution runs as `convolution` says.

    Every convolution of jaxda's networks is made here. The parameters (names, shapes, float32)
    do not depend on `convolution`, so checkpoints load whichever way it runs them.
    """
    return nn.Conv(features, kernel_size, conv_general_dilated=convolution, **kwargs)


@functools.lru_cache(maxsize=64)
def _align_corners_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] linear-interpolation weights of align_corners=True resizing."""
    if out_size > 1:
        positions = np.arange(out_size, dtype=np.float64) * ((in_size - 1) / (out_size - 1))
    else:
        positions = np.zeros((1,), np.float64)
    return _interpolation_matrix(positions, in_size)


def _interpolation_matrix(positions: np.ndarray, in_size: int) -> np.ndarray:
    """[len(positions), in_size] linear-interpolation weights of the source `positions`
    (each >= 0): the lower neighbour and the next one, both clamped to the last row."""
    lower = np.minimum(np.floor(positions).astype(np.int64), in_size - 1)
    upper = np.minimum(lower + 1, in_size - 1)
    weight_upper = positions - lower
    out_size = len(positions)
    matrix = np.zeros((out_size, in_size), np.float64)
    np.add.at(matrix, (np.arange(out_size), lower), 1.0 - weight_upper)
    np.add.at(matrix, (np.arange(out_size), upper), weight_upper)
    return matrix.astype(np.float32)


def resize_bilinear_align_corners(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bilinear resize with PyTorch `align_corners=True` semantics.

    Every DeepLabV2-era UDA method upsamples logits this way (docs/methods/README.md);
    `jax.image.resize`
    uses half-pixel centres (align_corners=False), which shifts every output pixel. Written as
    two small matrix products (rows, then columns): on CPU their gradient is several times
    faster than the scatter-add that gradients of a gather-based resize need, and on
    accelerators they run on the matrix units.

    Args:
      x: [batch, height, width, channels].
      size: (out_height, out_width).

    Returns:
      [batch, out_height, out_width, channels], same dtype as `x`.
    """
    return _resize_by_matrices(x, size, _align_corners_matrix)


def _resize_by_matrices(x: jax.Array, size: tuple[int, int], matrix) -> jax.Array:
    """x [N, H, W, C] -> [N, *size, C]: rows then columns, each a product with `matrix(in_size,
    out_size)`'s [out, in] interpolation weights."""
    out_h, out_w = size
    if x.shape[1:3] == (out_h, out_w):
        return x
    rows = jnp.asarray(matrix(x.shape[1], out_h), x.dtype)
    cols = jnp.asarray(matrix(x.shape[2], out_w), x.dtype)
    highest = jax.lax.Precision.HIGHEST  # No TF32/bf16 passes: match PyTorch's float32.
    with jax.named_scope("resize"):  # Names the ops in profiles (benchmarks/step_profile.py).
        x = jnp.einsum("oh,nhwc->nowc", rows, x, precision=highest)
        return jnp.einsum("pw,nowc->nopc", cols, x, precision=highest)


@functools.lru_cache(maxsize=64)
def _half_pixel_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] weights of PyTorch's bilinear `align_corners=False` resizing to a
    given size: source = (i + 0.5) * in / out - 0.5, clamped at 0; the upper neighbour is
    clamped to the last row."""
    positions = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
    return _interpolation_matrix(np.maximum(positions, 0.0), in_size)


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bilinear resize with PyTorch `align_corners=False` semantics (mmseg's `resize` in the
    SegFormer / DAFormer heads), as two matrix products like `resize_bilinear_align_corners`.

    No antialiasing: downsampling samples 2 x 2 neighbours as PyTorch does (`jax.image.resize`
    antialiases).

    Args:
      x: [batch, height, width, channels].
      size: (out_height, out_width).

    Returns:
      [batch, out_height, out_width, channels], same dtype as `x`.
    """
    return _resize_by_matrices(x, size, _half_pixel_matrix)


def max_pool_ceil(x: jax.Array, window: int, stride: int, padding: int) -> jax.Array:
    """Max pooling with PyTorch `ceil_mode=True` output sizes ([N, H, W, C] -> [N, H', W', C]).

    PyTorch's ceil mode rounds the output size up and pads the right/bottom edge with -inf;
    a pooling window may not start in the right padding.
    """
    pads = []
    for n in x.shape[1:3]:
        out = -(-(n + 2 * padding - window) // stride) + 1
        if (out - 1) * stride >= n + padding:
            out -= 1
        pads.append((padding, (out - 1) * stride + window - n - padding))
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding=pads)


def batch_norm(
    name: str, *, use_running_average: bool, use_fast_variance: bool = True
) -> nn.BatchNorm:
    """BatchNorm with PyTorch's defaults (momentum 0.1 -> Flax 0.9, eps 1e-5).

    All BatchNorm modules in jaxda are created here and their names start with "bn", which is
    how the optimizer finds BN affine parameters to freeze (see `is_batch_norm_param`).
    `use_fast_variance=False` computes the batch variance in two passes, as PyTorch does:
    Flax's E[x^2] - E[x]^2 cancels badly when a channel's mean is large against its spread
    (DeepLabV3+'s image-pooling BN sees one value per image).
    """
    if not name.startswith("bn"):
        raise ValueError(f"BatchNorm module names must start with 'bn', got {name!r}")
    return nn.BatchNorm(
        use_running_average=use_running_average,
        momentum=0.9,
        epsilon=1e-5,
        use_fast_variance=use_fast_variance,
        name=name,
    )


INSTANCE_NORMS = ("", "plain", "affine")


class InstanceNorm(nn.Module):
    """PyTorch's InstanceNorm2d (eps 1e-5, biased variance over each image's H x W, no running
    statistics): [N, H, W, C] -> [N, H, W, C], optionally with a learned per-channel scale
    (init 1) and offset (init 0), as RobustNet's IBN-Net layers."""

    affine: bool = False
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        mean = jnp.mean(x, axis=(1, 2), keepdims=True)
        # Two passes, as PyTorch: E[x^2] - E[x]^2 cancels badly for large means.
        var = jnp.mean(jnp.square(x - mean), axis=(1, 2), keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
        if self.affine:
            features = x.shape[-1]
            y = y * self.param("scale", nn.initializers.ones, (features,), jnp.float32)
            y = y + self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        return y


# config.model.bn_mode -> (BN normalises with batch statistics in training, affine trained).
BN_MODES = {
    "batch_stats": (True, False),  # AdaptSegNet, ADVENT: model.train() with requires_grad off.
    "frozen": (False, False),  # Running statistics, nothing trained.
    "train": (True, True),  # SyncBN / BN trained as usual.
    "frozen_stats": (False, True),  # DA-SAC's SAC stage: eval-mode BN, scale/offset trained.
}


def _bn_mode(bn_mode: str) -> tuple[bool, bool]:
    if bn_mode not in BN_MODES:
        raise ValueError(f"config.model.bn_mode={bn_mode!r}; use one of {sorted(BN_MODES)}")
    return BN_MODES[bn_mode]


def train_batch_stats(bn_mode: str) -> bool:
    """Whether BN normalises with batch statistics (and updates its running ones) in training."""
    return _bn_mode(bn_mode)[0]


def frozen_bn_affine(bn_mode: str) -> bool:
    """Whether the BN scale and offset stay fixed (left out of the optimizer)."""
    return not _bn_mode(bn_mode)[1]


def is_batch_norm_param(path: tuple[str, ...]) -> bool:
    """True for a parameter path ('backbone', 'layer1', 'block_0', 'bn1', 'scale') of a BN."""
    return len(path) >= 2 and path[-2].startswith("bn")


def torch_default_uniform(key: jax.Array, shape, dtype=jnp.float32, *, fan_in: int) -> jax.Array:
    """PyTorch's default Conv2d bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


# PyTorch's default Conv2d weight init (kaiming_uniform with a=sqrt(5)) is U(+-1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# DeepLabV2's `m.weight.data.normal_(0, 0.01)` for every conv of the segmentation network.
deeplab_kernel_init = nn.initializers.normal(stddev=0.01)


def stage_sizes(model_config, table: dict) -> tuple[int, ...]:
    """Blocks per ResNet layer: config.model.stage_sizes if set, else table[config.model.depth]."""
    sizes = model_config.get("stage_sizes")
    if sizes is not None:
        return tuple(sizes)
    if model_config.depth not in table:
        raise ValueError(
            f"config.model.depth={model_config.depth} is not one of {sorted(table)}; set "
            "config.model.stage_sizes for another depth"
        )
    return tuple(table[model_config.depth])


def dropout_is_deterministic(module: nn.Module, train: bool, dropout: bool) -> bool:
    """True when `module`'s dropout is off; training with dropout needs a 'dropout' rng, and
    its absence is an error that says how to pass one or switch dropout off."""
    deterministic = not (train and dropout)
    if not deterministic and not module.has_rng("dropout"):
        raise ValueError(
            f"{type(module).__name__} training with dropout needs apply(..., rngs={{'dropout': "
            "key}); or set config.model.dropout=False"
        )
    return deterministic
