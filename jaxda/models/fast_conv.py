"""`lax.conv_general_dilated` with a dot-based weight gradient (config.model.conv_impl='fast').

XLA:CPU (jaxlib 0.10.2) runs float32 NHWC convolutions and their input gradient (dX) on
YNNPACK near the core's peak, but its weight gradient (dW) is slow (a 1x1 conv's dW at a
quarter of the same contraction written as one matmul). `conv_general_dilated` here keeps
XLA's forward and dX and computes dW with `dot_general` (a `jax.custom_vjp`):

* 1x1 kernels: one dot, x [N*h*w, C]^T . dy [N*h*w, K] (strided x for stride 2);
* k x k kernels, one of (`weight_gradient`'s `method`; `choose_method` picks per shape):
  - 'taps': per tap, one dot over the part of the map where the tap reads real input
    (cropped views of x and dy, no padding materialised);
  - 'xcol': im2col of x ([N*ho*wo, taps*C]), one dot with dy;
  - 'dycol' (stride 1): im2col of dy shifted into x's frame ([N*H*W, taps*K]), one dot with x;
  - 'dytaps' (stride 1): per tap, x [N*H*W, C]^T . dy shifted into x's frame [N*H*W, K];
  - 'xla': XLA's own dW (kept where it is as fast: few channels, strided convs).
  Taps that read only padding (large ASPP dilations on small maps) are skipped (zero dW).

It is a drop-in for `flax.linen.Conv(conv_general_dilated=...)`; any case it does not handle
(grouped convs, lhs dilation, negative padding, other layouts or dtypes than float32
NHWC/HWIO) falls back to `lax.conv_general_dilated` itself, so it is always correct. Results
equal XLA's to float rounding (another summation order). Forward-mode differentiation (jvp)
of a custom_vjp function is not supported by JAX; nothing in jaxda uses it.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

NHWC = ("NHWC", "HWIO", "NHWC")
METHODS = ("auto", "taps", "xcol", "dycol", "dytaps", "xla")


class ConvSpec(NamedTuple):
    """The static part of a 2-D NHWC/HWIO convolution (hashable: custom_vjp's nondiff arg)."""

    strides: tuple[int, int]
    padding: tuple[tuple[int, int], tuple[int, int]]
    dilation: tuple[int, int]
    precision: Any = None
    method: str = "auto"  # How dW is computed (`METHODS`); 'auto' = `choose_method`.


class Tap(NamedTuple):
    """Where one kernel tap along one spatial axis reads real input.

    Output positions lo..hi-1 read input start, start + stride, ...; `offset` is the input
    position (possibly negative, in the padding) that output 0 reads.
    """

    lo: int
    hi: int
    start: int
    offset: int


def axis_taps(n_in: int, n_out: int, kernel: int, stride: int, pad_lo: int, dilation: int):
    """Per tap of one spatial axis, the `Tap` of output positions that read real input."""
    taps = []
    for i in range(kernel):
        offset = i * dilation - pad_lo
        lo = max(0, -(offset // stride))  # First o with offset + o * stride >= 0.
        hi = min(n_out, (n_in - 1 - offset) // stride + 1) if n_in - 1 - offset >= 0 else 0
        taps.append(Tap(lo, max(lo, hi), offset + lo * stride, offset))
    return taps


def _native(x, w, spec: ConvSpec):
    return lax.conv_general_dilated(
        x, w, spec.strides, spec.padding, rhs_dilation=spec.dilation,
        dimension_numbers=NHWC, precision=spec.precision,
    )  # fmt: skip


def _dot_tn(a, b, precision):
    """a [P, C]^T . b [P, K] -> [C, K] (contraction over the leading axis)."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=precision)


def _live_taps(x_shape, kernel_shape, out_shape, spec):
    """[(i, j, row Tap, column Tap)] of the taps that read at least one real input pixel."""
    kh, kw = kernel_shape[:2]
    rows = axis_taps(x_shape[1], out_shape[1], kh, spec.strides[0], spec.padding[0][0],
                     spec.dilation[0])  # fmt: skip
    cols = axis_taps(x_shape[2], out_shape[2], kw, spec.strides[1], spec.padding[1][0],
                     spec.dilation[1])  # fmt: skip
    return [
        (i, j, r, c)
        for i, r in enumerate(rows)
        for j, c in enumerate(cols)
        if r.hi > r.lo and c.hi > c.lo
    ]


def _assemble(per_tap: dict, kernel_shape, dtype):
    """{(i, j): [C, K]} -> [kh, kw, C, K], zeros for the taps that are missing (dead)."""
    kh, kw, c, k = kernel_shape
    zeros = jnp.zeros((c, k), dtype)
    rows = [jnp.stack([per_tap.get((i, j), zeros) for j in range(kw)]) for i in range(kh)]
    return jnp.stack(rows)


def _crop(x, rows: Tap, cols: Tap, strides):
    """The [N, rows.hi - rows.lo, cols.hi - cols.lo, C] pixels of x that a tap's outputs read."""
    sh, sw = strides
    n, _, _, c = x.shape
    end = (n, rows.start + (rows.hi - rows.lo - 1) * sh + 1,
           cols.start + (cols.hi - cols.lo - 1) * sw + 1, c)  # fmt: skip
    return lax.slice(x, (0, rows.start, cols.start, 0), end, (1, sh, sw, 1))


def _shift_dy(dy, x_shape, rows: Tap, cols: Tap):
    """Stride 1: dy moved into x's frame for one tap, [N, H, W, K]: out[q] = dy[q - offset],
    zero where q - offset is outside dy (negative padding crops)."""
    _, h, w, _ = x_shape
    _, ho, wo, _ = dy.shape
    pads = ((0, 0, 0), (rows.offset, h - ho - rows.offset, 0),
            (cols.offset, w - wo - cols.offset, 0), (0, 0, 0))  # fmt: skip
    return lax.pad(dy, jnp.zeros((), dy.dtype), pads)


def _dw_taps(x, dy, kernel_shape, spec):
    """One dot per live tap, over the outputs whose input is real (cropped views).

    XLA's default scheduler computes the crops of x in the forward pass (they depend on x
    only) and keeps them to the backward pass: +18-30% temporary memory of a train step (an
    optimization barrier does not stop it on CPU); 'xcol' alike. The dy-side methods
    ('dycol', 'dytaps') only copy in the backward pass.
    """
    c, k = kernel_shape[2:]
    per_tap = {}
    for i, j, rows, cols in _live_taps(x.shape, kernel_shape, dy.shape, spec):
        xs = _crop(x, rows, cols, spec.strides).reshape(-1, c)
        ds = dy[:, rows.lo : rows.hi, cols.lo : cols.hi].reshape(-1, k)
        per_tap[(i, j)] = _dot_tn(xs, ds, spec.precision)
    return _assemble(per_tap, kernel_shape, x.dtype)


def _dw_xcol(x, dy, kernel_shape, spec):
    """im2col of x: [N*ho*wo, taps*C]^T . dy [N*ho*wo, K], live taps only."""
    c, k = kernel_shape[2:]
    n, ho, wo, _ = dy.shape
    sh, sw = spec.strides
    live = _live_taps(x.shape, kernel_shape, dy.shape, spec)
    (pt, pb), (pl, pr) = spec.padding
    xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))
    views = []
    for _, _, rows, cols in live:
        r0, c0 = rows.offset + pt, cols.offset + pl
        end = (n, r0 + (ho - 1) * sh + 1, c0 + (wo - 1) * sw + 1, c)
        views.append(lax.slice(xp, (0, r0, c0, 0), end, (1, sh, sw, 1)))
    cols_matrix = jnp.concatenate(views, axis=-1).reshape(-1, len(live) * c)
    out = _dot_tn(cols_matrix, dy.reshape(-1, k), spec.precision).reshape(len(live), c, k)
    per_tap = {(i, j): out[t] for t, (i, j, _, _) in enumerate(live)}
    return _assemble(per_tap, kernel_shape, x.dtype)


def _dw_dycol(x, dy, kernel_shape, spec):
    """Stride 1: x [N*H*W, C]^T . dy shifted into x's frame per live tap [N*H*W, taps*K]."""
    c, k = kernel_shape[2:]
    live = _live_taps(x.shape, kernel_shape, dy.shape, spec)
    shifted = [_shift_dy(dy, x.shape, rows, cols) for _, _, rows, cols in live]
    dy_matrix = jnp.concatenate(shifted, axis=-1).reshape(-1, len(live) * k)
    out = _dot_tn(x.reshape(-1, c), dy_matrix, spec.precision).reshape(c, len(live), k)
    per_tap = {(i, j): out[:, t] for t, (i, j, _, _) in enumerate(live)}
    return _assemble(per_tap, kernel_shape, x.dtype)


def _dw_dytaps(x, dy, kernel_shape, spec):
    """Stride 1: per live tap, x [N*H*W, C]^T . dy shifted into x's frame [N*H*W, K]."""
    c, k = kernel_shape[2:]
    x_matrix = x.reshape(-1, c)
    per_tap = {}
    for i, j, rows, cols in _live_taps(x.shape, kernel_shape, dy.shape, spec):
        shifted = _shift_dy(dy, x.shape, rows, cols).reshape(-1, k)
        per_tap[(i, j)] = _dot_tn(x_matrix, shifted, spec.precision)
    return _assemble(per_tap, kernel_shape, x.dtype)


def choose_method(x_shape, kernel_shape, spec: ConvSpec) -> str:
    """dW method of a k x k conv, from `benchmarks/speed_benchmark.py --convs` and the train
    step's `memory_analysis()` (DeepLabV2-R101 and its discriminators at 256x512, 2 cores).

    * Stride 1, thin (K < 64 from C >= 256: the 19-class ASPP classifiers): 'dycol', one dot
      with taps x K columns (2.2-3.3x XLA's dW). XLA:CPU runs a dot with 19 columns at a tenth
      of its peak, so per-tap dots ('taps', 'dytaps') are slower than XLA's dW there.
    * Stride 1, wide (C x K >= 128 x 256: dilated 256- and 512-channel 3x3s): 'dytaps'
      (1.2-1.3x XLA's on a quiet machine; 'dycol' 0.75-1.05x, 'taps' 1.15-1.25x). Methods
      that copy views of x ('taps', 'xcol') cost 18-30% more temporary memory of a train step
      under XLA's default scheduler (see `_dw_taps`); the dy-side ones none.
    * Strided thin convs (the discriminator's 512 -> 1 classifier): 'taps' (5-10x XLA's).
    * Everything else (few channels: stems, the discriminators' first convs, width-64 and
      -128 3x3s; strided wide convs): 'xla', XLA's own dW, as fast or faster there.
    """
    del x_shape
    c, k = kernel_shape[2:]
    thin, wide = k < 64 and c >= 256, c * k >= 128 * 256
    if spec.strides == (1, 1) and (thin or wide):
        return "dycol" if thin else "dytaps"
    return "taps" if thin else "xla"


def weight_gradient(x, dy, kernel_shape, spec: ConvSpec, method: str = "auto"):
    """dW [kh, kw, C, K] of an NHWC/HWIO conv from x [N, H, W, C] and dy [N, ho, wo, K]."""
    kh, kw = kernel_shape[:2]
    if method == "auto" and (kh, kw) != (1, 1):
        method = choose_method(x.shape, kernel_shape, spec)
    if method == "xla":
        w = jax.ShapeDtypeStruct(tuple(kernel_shape), x.dtype)
        return jax.linear_transpose(lambda w: _native(x, w, spec), w)(dy)[0]
    if (kh, kw) == (1, 1):
        (rows,), (cols,) = (axis_taps(x.shape[a], dy.shape[a], 1, spec.strides[a - 1],
                                      spec.padding[a - 1][0], 1) for a in (1, 2))  # fmt: skip
        if rows.hi <= rows.lo or cols.hi <= cols.lo:
            return jnp.zeros(kernel_shape, x.dtype)
        xs = _crop(x, rows, cols, spec.strides).reshape(-1, kernel_shape[2])
        ds = dy[:, rows.lo : rows.hi, cols.lo : cols.hi].reshape(-1, kernel_shape[3])
        return _dot_tn(xs, ds, spec.precision).reshape(kernel_shape)
    if method in ("dycol", "dytaps") and spec.strides != (1, 1):
        method = "xcol"  # dy-side methods would need dy dilated by the stride.
    fn = {"taps": _dw_taps, "xcol": _dw_xcol, "dycol": _dw_dycol, "dytaps": _dw_dytaps}[method]
    return fn(x, dy, tuple(kernel_shape), spec)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x, w, spec: ConvSpec):
    return _native(x, w, spec)


def _conv_fwd(x, w, spec):
    return _native(x, w, spec), (x, w)


def _conv_bwd(spec, residuals, dy):
    x, w = residuals
    # The scopes name the ops in profiles (benchmarks/step_profile.py).
    with jax.named_scope("conv_input_grad"):
        # dX: exactly XLA's own input gradient (the transpose of the forward conv in x).
        dx = jax.linear_transpose(lambda x: _native(x, w, spec), x)(dy)[0]
    with jax.named_scope("conv_weight_grad"):
        dw = weight_gradient(x, dy, w.shape, spec, spec.method)
    return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def _is_nhwc(lhs_shape, rhs_shape, dimension_numbers) -> bool:
    if dimension_numbers is None:  # lax's default: NCHW / OIHW.
        return False
    try:
        numbers = lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)
    except (TypeError, ValueError):
        return False
    return numbers == lax.conv_dimension_numbers(lhs_shape, rhs_shape, NHWC)


def fast_spec(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
              dimension_numbers, feature_group_count, batch_group_count,
              preferred_element_type, precision, method) -> ConvSpec | None:  # fmt: skip
    """The `ConvSpec` of a call this module handles, or None (then XLA's conv is used)."""
    supported = (
        lhs.ndim == rhs.ndim == 4
        and lhs.dtype == rhs.dtype == jnp.float32
        and feature_group_count == batch_group_count == 1
        and preferred_element_type is None
        and all(d == 1 for d in (lhs_dilation or (1, 1)))
        and _is_nhwc(lhs.shape, rhs.shape, dimension_numbers)
    )
    if not supported:
        return None
    dilation = tuple(int(d) for d in (rhs_dilation or (1, 1)))
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        window = [(k - 1) * d + 1 for k, d in zip(rhs.shape[:2], dilation, strict=True)]
        padding = lax.padtype_to_pads(lhs.shape[1:3], window, strides, padding)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    if any(p < 0 for pair in padding for p in pair):  # Cropping convs: left to XLA.
        return None
    if isinstance(precision, list):
        precision = tuple(precision)  # Hashable: the spec is a static argument.
    return ConvSpec(strides, padding, dilation, precision, method)


def conv_general_dilated(
    lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
    dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
    preferred_element_type=None, *, method: str = "auto",
):  # fmt: skip
    """`lax.conv_general_dilated` (same arguments) with a dot-based weight gradient.

    lhs [N, H, W, C] and rhs [kh, kw, C, K] in NHWC/HWIO -> [N, ho, wo, K]; `method` picks
    the k x k dW algorithm (`METHODS`; 'xla' keeps XLA's own dW, for comparisons).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} must be one of {METHODS}")
    spec = fast_spec(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                     dimension_numbers, feature_group_count, batch_group_count,
                     preferred_element_type, precision, method)  # fmt: skip
    if spec is None:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count, precision, preferred_element_type,
        )  # fmt: skip
    return _conv(lhs, rhs, spec)


def conv_flops(kernel_shape, out_shape) -> float:
    """2 x multiply-adds of one conv (and of its dW): 2 N ho wo kh kw C K."""
    return 2.0 * float(np.prod(out_shape[:3])) * float(np.prod(kernel_shape))
