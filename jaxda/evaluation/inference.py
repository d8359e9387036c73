"""Inference modes: whole image, sliding window, multi-scale (+ flip) test-time augmentation.

Every function here takes `apply_fn(images) -> logits`: images [N, H, W, 3] (normalised, as
the input pipeline makes them) to one head's logits [N, h, w, C] on the network's output grid.
`ensemble_apply_fn` builds it from a model and one or more weighted networks, so a logit
ensemble combines with every mode: the members' weighted logits are summed inside each forward
pass, before the mode aggregates passes. All shapes are static: under `jax.jit` each mode
compiles once per input shape (sliding windows run in a `lax.scan`, so the network is traced
once whatever the number of windows).

  whole       the DeepLabV2-era protocol: one pass on the input, logits upsampled (bilinear,
              align_corners=True) to the output size, argmax.
  slide       windows of `slide_window` over the network input every `slide_stride`, the last
              row/column of windows aligned to the bottom/right edge so every pixel is covered
              (a window larger than the input is clipped to it); each window's logits are
              upsampled to the window, softmaxed, summed per pixel and divided by the number of
              windows covering the pixel; that input-size probability map is then upsampled to
              the output size.
  multiscale  the input resized (bilinear, align_corners=True) by each of `scales`, each pass's
              logits upsampled to the output size and softmaxed; with `flip` also the
              horizontally flipped input, its probabilities flipped back; all averaged.
              MaxSquare's `--flip` evaluation is scales=(1.0,), flip=True.
"""

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxda.models.layers import resize_bilinear_align_corners

MODES = ("whole", "slide", "multiscale")

ApplyFn = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Settings:
    """The inference mode and its settings (config.eval.mode, slide_*, scales, flip)."""

    mode: str = "whole"
    slide_window: tuple[int, int] = (512, 512)
    slide_stride: tuple[int, int] = (341, 341)
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"config.eval.mode={self.mode!r}; use one of {MODES}")
        if self.mode == "slide":
            window, stride = self.slide_window, self.slide_stride
            if len(window) != 2 or len(stride) != 2 or min(*window, *stride) < 1:
                raise ValueError(
                    "config.eval.slide_window and slide_stride must be (height, width) pairs of "
                    f"positive ints, got {window} and {stride}"
                )
            if stride[0] > window[0] or stride[1] > window[1]:
                raise ValueError(
                    f"config.eval.slide_stride={stride} exceeds slide_window={window}: windows "
                    "would leave pixels uncovered"
                )
        if self.mode == "multiscale" and (not self.scales or min(self.scales) <= 0):
            raise ValueError(f"config.eval.scales={self.scales} must be positive numbers")

    @classmethod
    def from_config(cls, eval_config: ml_collections.ConfigDict) -> "Settings":
        return cls(
            mode=eval_config.mode,
            slide_window=tuple(int(v) for v in eval_config.slide_window),
            slide_stride=tuple(int(v) for v in eval_config.slide_stride),
            scales=tuple(float(s) for s in eval_config.scales),
            flip=bool(eval_config.flip),
        )

    def protocol(self) -> dict:
        """The mode and the settings it uses, for result files."""
        if self.mode == "slide":
            return {
                "mode": "slide",
                "slide_window": list(self.slide_window),
                "slide_stride": list(self.slide_stride),
                "aggregation": "softmax of window-size logits, averaged over covering windows",
            }
        if self.mode == "multiscale":
            return {
                "mode": "multiscale",
                "scales": list(self.scales),
                "flip": self.flip,
                "image_resize": "bilinear, align_corners=True",
                "aggregation": "softmax of output-size logits, averaged over scales and flips",
            }
        return {"mode": "whole"}


def ensemble_apply_fn(
    model, members: Sequence, weights: jax.Array | Sequence[float], head: str
) -> ApplyFn:
    """images -> sum_i weights[i] * logits of `head` of the network with variables members[i]."""

    def apply_fn(images):
        logits = 0.0
        for i, variables in enumerate(members):
            outputs = model.apply(variables, images, train=False)
            if head not in outputs:
                raise ValueError(
                    f"config.eval.head={head!r} but the model has heads {sorted(outputs)}"
                )
            logits = logits + weights[i] * outputs[head]
        return logits

    return apply_fn


def whole(apply_fn: ApplyFn, images: jax.Array, out_size: Sequence[int]) -> jax.Array:
    """[N, out_h, out_w, C] logits of one pass, upsampled with align_corners=True."""
    return resize_bilinear_align_corners(apply_fn(images), tuple(out_size))


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets along one axis: every `stride`, plus one aligned to the far edge."""
    window = min(window, length)
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def window_counts(size: Sequence[int], window: Sequence[int], stride: Sequence[int]) -> np.ndarray:
    """[H, W] number of sliding windows covering each pixel (>= 1 everywhere)."""
    (height, width), (win_h, win_w) = size, (min(window[0], size[0]), min(window[1], size[1]))
    counts = np.zeros((height, width), np.int32)
    for y in window_starts(height, window[0], stride[0]):
        for x in window_starts(width, window[1], stride[1]):
            counts[y : y + win_h, x : x + win_w] += 1
    return counts


def slide(
    apply_fn: ApplyFn,
    images: jax.Array,
    out_size: Sequence[int],
    window: Sequence[int],
    stride: Sequence[int],
) -> jax.Array:
    """[N, out_h, out_w, C] class probabilities of sliding-window inference (module doc)."""
    n, height, width, channels = images.shape
    win_h, win_w = min(window[0], height), min(window[1], width)
    offsets = np.array(
        [
            (y, x)
            for y in window_starts(height, window[0], stride[0])
            for x in window_starts(width, window[1], stride[1])
        ],
        np.int32,
    )
    crop_shape = (n, win_h, win_w, channels)
    num_classes = jax.eval_shape(apply_fn, jax.ShapeDtypeStruct(crop_shape, images.dtype)).shape[-1]

    def add_window(total, offset):
        start = (0, offset[0], offset[1], 0)
        crop = jax.lax.dynamic_slice(images, start, crop_shape)
        logits = resize_bilinear_align_corners(apply_fn(crop), (win_h, win_w))
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        current = jax.lax.dynamic_slice(total, start, (n, win_h, win_w, num_classes))
        return jax.lax.dynamic_update_slice(total, current + probs, start), None

    total = jnp.zeros((n, height, width, num_classes), jnp.float32)
    total, _ = jax.lax.scan(add_window, total, jnp.asarray(offsets))
    counts = window_counts((height, width), window, stride)
    probs = total / jnp.asarray(counts, jnp.float32)[None, :, :, None]
    return resize_bilinear_align_corners(probs, tuple(out_size))


def scaled_size(size: Sequence[int], scale: float) -> tuple[int, int]:
    """(height, width) of an input of `size` resized by `scale` (rounded half up, >= 1)."""
    return tuple(max(1, int(s * scale + 0.5)) for s in size)


def multiscale(
    apply_fn: ApplyFn,
    images: jax.Array,
    out_size: Sequence[int],
    scales: Sequence[float],
    flip: bool,
) -> jax.Array:
    """[N, out_h, out_w, C] class probabilities averaged over scales and flips (module doc)."""
    out_size = tuple(out_size)
    total, passes = 0.0, 0
    for scale in scales:
        size = scaled_size(images.shape[1:3], scale)
        scaled = resize_bilinear_align_corners(images, size)
        for flipped in (False, True) if flip else (False,):
            inputs = jnp.flip(scaled, axis=2) if flipped else scaled
            logits = resize_bilinear_align_corners(apply_fn(inputs), out_size)
            probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
            total = total + (jnp.flip(probs, axis=2) if flipped else probs)
            passes += 1
    return total / passes


def scores(
    apply_fn: ApplyFn, images: jax.Array, out_size: Sequence[int], settings: Settings
) -> jax.Array:
    """[N, out_h, out_w, C] scores whose argmax is the prediction: upsampled logits in 'whole'
    mode (the protocol's argmax of logits), class probabilities in the others."""
    if settings.mode == "slide":
        return slide(apply_fn, images, out_size, settings.slide_window, settings.slide_stride)
    if settings.mode == "multiscale":
        return multiscale(apply_fn, images, out_size, settings.scales, settings.flip)
    return whole(apply_fn, images, out_size)


def probabilities(
    apply_fn: ApplyFn, images: jax.Array, out_size: Sequence[int], settings: Settings
) -> jax.Array:
    """[N, out_h, out_w, C] class probabilities of the mode (softmax of 'whole' logits)."""
    result = scores(apply_fn, images, out_size, settings)
    if settings.mode == "whole":
        result = jax.nn.softmax(result.astype(jnp.float32), axis=-1)
    return result
