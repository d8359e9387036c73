"""HRDA (Hoyer et al., ECCV 2022): the MiT encoder and DAFormer head of `segformer.SegFormer`
run at two scales and fused by a learned scale attention; plus the pure functions it is made
of (crop boxes, the attention fusion, sliding windows averaged on a canvas).

Training (`box` given): the low-resolution (LR) context is the whole crop resized by
`lr_scale` (0.5); the high-resolution (HR) detail is one `hr_crop_size` box of the full-
resolution crop, the same box for every image of the batch (HRDA draws one per forward with
`crop_box`). The same encoder weights and the same DAFormer head (`head`) see both; a second,
smaller head (`scale_attention`, `segformer_heads.ConvFusionHead`) on the LR features gives
a = sigmoid(logits), zeroed outside the box. Then (`fuse`)

    fused = up(a) * paste(hr, box) + up((1 - a) * lr)        up: bilinear x (1 / lr_scale)

at stride 4 of the full-resolution crop, like SegFormer's output.

Inference (`box=None`, pseudo labels and evaluation): the HR logits of the whole image come
from `hr_crop_size` windows at half that stride (HRDA's overlapping HR slide inference, all
windows in one batch), averaged on a canvas (logits, not probabilities); a is not masked.
Evaluation on full images slides `slide_inference` windows over them (HRDA's test config:
1024 x 1024 windows, stride 512) and averages their logits the same way.

Box offsets are traced int32 scalars and box sizes static, so one compilation serves every
box. Shapes: images [batch, height, width, 3], logits [batch, h, w, classes].

Parameters: {'backbone', 'head', 'scale_attention'}, the official checkpoint's `backbone.*`,
`decode_head.head.*` and `decode_head.scale_attention.*`.
"""

from collections.abc import Callable, Sequence
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxda.models import layers, mit, segformer, segformer_heads

OUTPUT_STRIDE = 4  # The DAFormer head's logits are at stage 1's grid.
Box = tuple[int, int, int, int]  # (y1, y2, x1, x2), pixels: mmseg's crop box order.


def crop_box(
    key: jax.Array, size: Sequence[int], crop: Sequence[int], divisible: int = 8
) -> jax.Array:
    """[2] int32 (y, x): the top-left corner of a `crop` (h, w) box in an image of `size`
    (H, W), drawn as HRDA's `get_crop_bbox`: per axis randint(0, (margin + 1) // divisible)
    * divisible, margin = size - crop. The offsets are multiples of `divisible` (8 keeps the
    box on the LR logits' grid, stride 4 / lr_scale 0.5) and, for a margin divisible by it,
    range over 0 .. margin - divisible: the box never touches the bottom / right edge (the
    official off-by-one, kept).

    An axis whose margin is below `divisible` - 1 gets offset 0 (the official code raises
    unless the box is the whole image).
    """
    highs = [max((max(s - c, 0) + 1) // divisible, 1) for s, c in zip(size, crop, strict=True)]
    offsets = jax.random.randint(key, (2,), 0, jnp.asarray(highs, jnp.int32))
    return (offsets * divisible).astype(jnp.int32)


def slide_boxes(size: Sequence[int], window: Sequence[int], stride: Sequence[int]) -> list[Box]:
    """mmseg's sliding windows over an image of `size` (H, W), row-major: a window every
    `stride` pixels, the last one shifted back to end at the border; windows larger than the
    image shrink to it. (1024, 1024), window 512, stride 256: 9 windows."""
    (height, width), (wh, ww), (sh, sw) = size, window, stride
    rows = max(height - wh + sh - 1, 0) // sh + 1
    cols = max(width - ww + sw - 1, 0) // sw + 1
    boxes = []
    for i in range(rows):
        for j in range(cols):
            y2, x2 = min(i * sh + wh, height), min(j * sw + ww, width)
            boxes.append((max(y2 - wh, 0), y2, max(x2 - ww, 0), x2))
    return boxes


def extract_windows(images: jax.Array, boxes: Sequence[Box]) -> jax.Array:
    """[N, H, W, C] -> [len(boxes) * N, h, w, C], window-major (window k holds rows k*N ..
    (k+1)*N - 1), as mmseg concatenates them; the boxes must have one size."""
    return jnp.concatenate([images[:, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes], axis=0)


def average_windows(logits: jax.Array, boxes: Sequence[Box], scale: int = 1) -> jax.Array:
    """Window logits [len(boxes) * N, h, w, C] (window-major) summed on a canvas at their
    boxes / `scale` (HRDA's `scale_box`: int(v / scale)) and divided by how many windows
    cover each pixel: -> [N, max y2 / scale, max x2 / scale, C]."""
    scaled = [tuple(int(v / scale) for v in box) for box in boxes]
    height, width = max(b[1] for b in scaled), max(b[3] for b in scaled)
    windows = logits.reshape(len(boxes), -1, *logits.shape[1:])
    count = np.zeros((height, width), np.float32)  # Static: the boxes are.
    canvas = jnp.zeros((windows.shape[1], height, width, logits.shape[-1]), logits.dtype)
    for window, (y1, y2, x1, x2) in zip(windows, scaled, strict=True):
        if window.shape[1:3] != (y2 - y1, x2 - x1):
            raise ValueError(f"window logits {window.shape[1:3]} do not fit box / {scale}")
        pad = ((0, 0), (y1, height - y2), (x1, width - x2), (0, 0))
        canvas = canvas + jnp.pad(window, pad)
        count[y1:y2, x1:x2] += 1
    if (count == 0).any():
        raise ValueError("the windows do not cover the image")
    return canvas / jnp.asarray(count, logits.dtype)[None, :, :, None]


def slide_inference(
    logits_fn: Callable[[jax.Array], jax.Array],
    images: jax.Array,
    window: Sequence[int] = (1024, 1024),
    stride: Sequence[int] = (512, 512),
) -> jax.Array:
    """Sliding-window evaluation (mmseg's batched 'slide' test mode, HRDA's test config):
    every window of `slide_boxes` through `logits_fn` ([M, h, w, 3] -> [M, h', w', C]) in one
    batch, its logits resized to the window (bilinear, as `encode_decode` does), averaged on
    the canvas: [N, H, W, 3] -> [N, H, W, C]."""
    boxes = slide_boxes(images.shape[1:3], window, stride)
    y1, y2, x1, x2 = boxes[0]
    logits = layers.resize_bilinear(logits_fn(extract_windows(images, boxes)), (y2 - y1, x2 - x1))
    return average_windows(logits, boxes)


def box_mask(box: jax.Array, crop: Sequence[int], grid: Sequence[int], factor: int) -> jax.Array:
    """[1, h, w, 1] float32: 1 on the cells of a (h, w) `grid` of stride `factor` that the
    `crop` box at `box` (y, x) covers, int(y / factor) <= row < int((y + crop_h) / factor)."""
    inside = []
    for axis, (offset, length, cells) in enumerate(zip(box, crop, grid, strict=True)):
        index = jnp.arange(cells)
        rows = (index >= offset // factor) & (index < (offset + length) // factor)
        inside.append(rows[:, None] if axis == 0 else rows[None, :])
    return (inside[0] & inside[1]).astype(jnp.float32)[None, :, :, None]


def fuse(
    lr: jax.Array,
    hr: jax.Array,
    attention: jax.Array,
    box: jax.Array | None = None,
    *,
    lr_scale: float = 0.5,
    output_stride: int = OUTPUT_STRIDE,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """HRDAHead's fusion of LR context and HR detail logits with the scale attention.

    Args:
      lr: [N, h, w, C] LR logits (grid of the image resized by `lr_scale`, at `output_stride`).
      hr: with `box`, [N, bh, bw, C] the HR box's logits (the box spans bh * output_stride
        pixels); without, [N, h / lr_scale, w / lr_scale, C] the whole image's.
      attention: [N, h, w, C or 1] in [0, 1] (a sigmoid).
      box: [2] int (y, x), the HR box's corner in full-resolution pixels, or None.

    Returns:
      (fused [N, h / lr_scale, w / lr_scale, C]; the LR logits weighted by 1 - attention
      [N, h, w, C], HRDA's `lr_seg` output; the attention, zeroed outside the box).
    """
    ratio = round(1 / lr_scale)
    up = (lr.shape[1] * ratio, lr.shape[2] * ratio)
    if box is not None:
        crop = (hr.shape[1] * output_stride, hr.shape[2] * output_stride)
        # The LR grid has stride output_stride / lr_scale in full-resolution pixels.
        attention = attention * box_mask(box, crop, lr.shape[1:3], output_stride * ratio)
        zeros = jnp.zeros((hr.shape[0], *up, hr.shape[3]), hr.dtype)
        hr = jax.lax.dynamic_update_slice(
            zeros, hr, (0, box[0] // output_stride, box[1] // output_stride, 0)
        )
    lr = (1 - attention) * lr
    fused = layers.resize_bilinear(attention, up) * hr + layers.resize_bilinear(lr, up)
    return fused, lr, attention


class HRDA(segformer.SegFormer):
    """SegFormer's MiT + DAFormer head at two scales with HRDA's scale attention.

    [N, H, W, 3] -> {'main': [N, H / 4, W / 4, num_classes]} (the fused logits); with a
    training `box` also 'lr' ([N, H * lr_scale / 4, .., C], 1 - attention weighted), 'hr'
    ([N, crop_h / 4, crop_w / 4, C]) and 'attention' ([N, H * lr_scale / 4, .., C or 1],
    zero outside the box). H, W and the crop size must be multiples of 4 / lr_scale (8).

    Attributes (besides SegFormer's, whose `decoder` must be 'daformer'):
      attention_embed_dim: the scale attention head's embedding and fusion width (256).
      attention_classwise: one attention map per class (HRDA) or one for all.
      lr_scale: the context's resize factor (0.5); the detail is at full resolution.
      hr_crop_size: (h, w) of the detail box and of the inference windows (512, 512).
      hr_slide_inference: without a box, the HR logits from overlapping windows (True) or
        from the whole image at once.
      hr_slide_overlapping: windows at half their size (True) or edge to edge.

    The LR image and the HR box have the same size in HRDA's setting (a 1024 crop: 512 and
    512); the encoder then runs once on both (its LayerNorms and attention are per image, so
    nothing mixes), while the head runs on each separately: its BatchNorms take each scale's
    own batch statistics and update the running ones twice, LR then HR, as the official code.
    The LR stage maps are sown into 'intermediates' ('stage1'..'stage4'), HRDA's
    feature_scale 0.5 for DAFormer's feature distance.
    """

    # The official recipe's lr_mult 10 matches 'head' in `decode_head.*`: both heads.
    param_groups: ClassVar[dict[str, str]] = {
        "backbone": "backbone", "head": "head", "scale_attention": "head",
    }  # fmt: skip

    attention_embed_dim: int = 256
    attention_classwise: bool = True
    lr_scale: float = 0.5
    hr_crop_size: Sequence[int] = (512, 512)
    hr_slide_inference: bool = True
    hr_slide_overlapping: bool = True

    @nn.compact
    def __call__(
        self,
        images: jax.Array,
        train: bool = False,
        bn_mask: jax.Array | None = None,
        box: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        """`train`, `bn_mask` and the rngs as `SegFormer.__call__`; `box`: [2] int32 (y, x),
        the HR crop's corner (`crop_box`), or None for the inference forward."""
        if self.decoder != "daformer":
            raise ValueError(f"HRDA runs DAFormer's head; config.model.decoder={self.decoder!r}")
        n, height, width, channels = images.shape
        ratio = round(1 / self.lr_scale)
        sizes = (height, width, *self.hr_crop_size)
        if ratio * self.lr_scale != 1 or any(v % (OUTPUT_STRIDE * ratio) for v in sizes):
            raise ValueError(
                f"HRDA needs 1 / lr_scale integral, and the image size {(height, width)} and "
                f"hr_crop_size {tuple(self.hr_crop_size)} multiples of 4 / lr_scale, so that "
                "the scales' logits align"
            )
        deterministic = not (train and self.has_rng("dropout"))
        lr_images = layers.resize_bilinear(images, (height // ratio, width // ratio))
        crop = tuple(min(c, s) for c, s in zip(self.hr_crop_size, (height, width), strict=True))
        windows = None
        if box is not None:
            hr_images = jax.lax.dynamic_slice(images, (0, box[0], box[1], 0), (n, *crop, channels))
        elif self.hr_slide_inference:
            stride = tuple(c // 2 for c in crop) if self.hr_slide_overlapping else crop
            windows = slide_boxes((height, width), crop, stride)
            hr_images = extract_windows(images, windows)
        else:
            hr_images = images
        encoder = mit.MixVisionTransformer(
            embed_dims=tuple(self.embed_dims), depths=tuple(self.depths),
            num_heads=tuple(self.num_heads), sr_ratios=tuple(self.sr_ratios),
            mlp_ratio=self.mlp_ratio, drop_path_rate=self.drop_path_rate,
            convolution=self.convolution, remat=self.remat, name="backbone",
        )  # fmt: skip
        if lr_images.shape[1:] == hr_images.shape[1:]:  # One encoder pass for both.
            both = encoder(jnp.concatenate([lr_images, hr_images]), deterministic)
            lr_features = {k: v[:n] for k, v in both.items()}
            hr_features = {k: v[n:] for k, v in both.items()}
        else:
            lr_features = encoder(lr_images, deterministic)
            hr_features = encoder(hr_images, deterministic)
        for name, value in lr_features.items():
            self.sow("intermediates", name, value)

        ura = not (train and self.train_batch_stats)
        lr_mask = None if bn_mask is None else bn_mask[:, None, None, None]
        hr_mask = lr_mask
        if windows is not None and lr_mask is not None:
            hr_mask = jnp.tile(lr_mask, (len(windows), 1, 1, 1))  # Window-major as the images.
        head = segformer_heads.DAFormerHead(
            self.num_classes, self.decoder_embed_dim, self.decoder_width,
            tuple(self.aspp_dilations), self.dropout_rate, ura, self.convolution, name="head",
        )  # fmt: skip
        attention_head = segformer_heads.ConvFusionHead(
            self.num_classes if self.attention_classwise else 1, self.attention_embed_dim,
            self.attention_embed_dim, self.dropout_rate, ura, self.convolution,
            name="scale_attention",
        )  # fmt: skip
        # The official order (LR, HR, attention): it sets the running statistics' updates.
        lr = head(list(lr_features.values()), lr_mask, deterministic)
        hr = head(list(hr_features.values()), hr_mask, deterministic)
        if windows is not None:
            hr = average_windows(hr, windows, OUTPUT_STRIDE)
        attention = jax.nn.sigmoid(
            attention_head(list(lr_features.values()), lr_mask, deterministic).astype(jnp.float32)
        )
        fused, lr, attention = fuse(lr, hr, attention, box, lr_scale=self.lr_scale)
        if box is None:
            return {"main": fused}
        return {"main": fused, "lr": lr, "hr": hr, "attention": attention}

    @classmethod
    def from_config(cls, model_config: ml_collections.ConfigDict, num_classes: int):
        """SegFormer's keys (`configs.common.use_mit`) plus, with HRDA's defaults: scales
        ((0.5, 1.0): the LR factor and full resolution), hr_crop_size, attention_embed_dim,
        attention_classwise, hr_slide_inference, hr_slide_overlapping."""
        scales = sorted(model_config.get("scales", (0.5, 1.0)))
        if len(scales) != 2 or scales[1] != 1.0:
            raise ValueError(
                f"config.model.scales={tuple(scales)}: HRDA here takes (lr_scale, 1.0), the "
                "detail at full resolution"
            )
        model = super().from_config(model_config, num_classes)
        return model.clone(
            lr_scale=scales[0],
            hr_crop_size=tuple(model_config.get("hr_crop_size", (512, 512))),
            attention_embed_dim=model_config.get("attention_embed_dim", 256),
            attention_classwise=model_config.get("attention_classwise", True),
            hr_slide_inference=model_config.get("hr_slide_inference", True),
            hr_slide_overlapping=model_config.get("hr_slide_overlapping", True),
        )
