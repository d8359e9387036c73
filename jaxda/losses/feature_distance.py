"""DAFormer's ImageNet feature distance (Hoyer et al., CVPR 2022, Sec. 3.3) as pure functions:
the label downscaling by class share, the thing-class patch mask, and the masked mean of the
per-patch L2 distance between the student's and a frozen ImageNet network's features.

Shapes: labels [B, H, W] integer train ids (IGNORE_LABEL ignored); features [B, h, w, C] of
one encoder stage; masks [B, h, w] bool. All maths in float32.

DAFormer's code (github.com/lhoyer/DAFormer, `mmseg/models/uda/dacs.py` `calc_feat_dist`,
`masked_feat_dist`; `mmseg/utils/utils.py` `downscale_label_ratio`):
  - scale = label width // feature width (> 1), labels downscaled by it with average pooling
    of their one-hot maps (ignore as an extra class), each patch labelled with its majority
    class if that class covers >= min_ratio (0.75) of it, else ignored;
  - mask = the patches labelled with one of the thing classes; FD = mean over the masked
    patches of the batch of ||f_student - f_imnet||_2 over channels (not squared);
  - classes None: no mask, the mean over every patch (and no downscaling, so any sizes).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxda.data.labels import IGNORE_LABEL

# DAFormer's `imnet_feature_dist_classes`: the Cityscapes train ids of the 'thing' classes
# (traffic light, traffic sign, person, rider, car, truck, bus, train, motorcycle, bicycle),
# whose ImageNet features DAFormer keeps; stuff classes are free to drift.
THING_CLASSES = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)


def label_scale(label_size: Sequence[int], feature_size: Sequence[int]) -> int:
    """DAFormer's downscaling factor: label width // feature width.

    Args:
      label_size: (H, W) of the labels; feature_size: (h, w) of the features.

    Raises:
      ValueError: the factor is not > 1 (DAFormer asserts that), or the downscaled labels
        (H // scale, W // scale) are not the feature grid (h, w), where DAFormer's boolean
        indexing of the features with the mask fails. DeepLabV2's PyTorch-style grid
        (`deeplab_v2.output_size`: 512 -> 65) never fits: the masked FD needs a network whose
        grid is the input size over its stride (MiT: 512 -> 16 at stage 4).
    """
    (height, width), (h, w) = tuple(label_size), tuple(feature_size)
    scale = width // w if w > 0 else 0
    if scale <= 1 or (height // scale, width // scale) != (h, w):
        raise ValueError(
            f"The feature distance's class mask downscales the labels {height}x{width} by "
            f"label width // feature width = {width} // {w} = {scale} to "
            f"{height // max(scale, 1)}x{width // max(scale, 1)}, which is not the feature "
            f"grid {h}x{w} (DAFormer needs a factor > 1 giving exactly that grid). Use crops "
            "that are multiples of the layer's stride on a network whose grid is the input "
            "over its stride (MiT), another config.dacs.feature_distance.layer, or classes=() "
            "(every patch, no mask)"
        )
    return scale


def downscale_label_ratio(
    labels: jax.Array,
    scale: int,
    min_ratio: float,
    num_classes: int,
    ignore: int = IGNORE_LABEL,
) -> jax.Array:
    """Labels of the scale x scale patches: the majority class if it covers >= min_ratio.

    `ignore` counts as class `num_classes` in the vote (a mostly unlabelled patch is ignored,
    and unlabelled pixels count against the ratio of the others); ties go to the lowest class
    (torch.max returns the first maximum). Rows and columns beyond a multiple of `scale` are
    dropped, as by F.avg_pool2d's floor mode.

    Args:
      labels: [B, H, W] integer train ids in [0, num_classes) or `ignore`.
      scale: the patch side (> 1).

    Returns:
      [B, H // scale, W // scale] int32 patch labels, `ignore` where none qualifies.
    """
    if scale <= 1:
        raise ValueError(f"scale={scale}: downscaling needs a factor > 1 (DAFormer asserts it)")
    batch, height, width = labels.shape
    h, w = height // scale, width // scale
    labels = labels[:, : h * scale, : w * scale].astype(jnp.int32)
    labels = jnp.where(labels == ignore, num_classes, labels)
    one_hot = jax.nn.one_hot(labels, num_classes + 1, dtype=jnp.float32)
    counts = one_hot.reshape(batch, h, scale, w, scale, num_classes + 1).sum(axis=(2, 4))
    ratios = counts / float(scale * scale)  # avg_pool2d: the patch's sum / its pixel count.
    best = jnp.argmax(ratios, axis=-1).astype(jnp.int32)
    share = jnp.max(ratios, axis=-1)
    return jnp.where((best == num_classes) | (share < min_ratio), ignore, best)


def class_patch_mask(patch_labels: jax.Array, classes: Sequence[int]) -> jax.Array:
    """[B, h, w] bool: the patches whose label is one of `classes` (ignored ones never)."""
    classes = jnp.asarray(tuple(classes), jnp.int32)
    return jnp.any(patch_labels[..., None].astype(jnp.int32) == classes, axis=-1)


def patch_mask(
    labels: jax.Array,
    feature_size: Sequence[int],
    classes: Sequence[int] | None,
    min_ratio: float,
    num_classes: int,
) -> jax.Array:
    """[B, h, w] bool: DAFormer's feature-distance mask for features of `feature_size`.

    `classes` empty or None: every patch (DAFormer's `imnet_feature_dist_classes=None`,
    where the labels are not read and the sizes need not divide). Otherwise the patches
    whose `downscale_label_ratio` label (scale from `label_scale`) is one of `classes`.

    Args:
      labels: [B, H, W] the source labels at the input size.
      feature_size: (h, w) of the features the mask selects from.
    """
    h, w = tuple(feature_size)
    if not classes:
        return jnp.ones((labels.shape[0], h, w), bool)
    scale = label_scale(labels.shape[1:3], (h, w))
    patches = downscale_label_ratio(labels, scale, min_ratio, num_classes)
    return class_patch_mask(patches, classes)


def masked_feature_distance(
    student: jax.Array, frozen: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(FD, count): the mean over the masked patches of ||student - frozen||_2 (over channels),
    and the number of masked patches.

    With no masked patch DAFormer's mean is NaN; here it is sum / max(count, 1) = 0, so the
    step's loss stays finite and the count (logged) says the term was empty. The norm's
    gradient is 0 where the features are equal (as PyTorch's norm backward), not NaN:
    the student starts as the frozen network, so equal features happen at the first step.

    Args:
      student: [B, h, w, C] features the gradient flows through.
      frozen: [B, h, w, C] features of the frozen network (callers stop their gradient).
      mask: [B, h, w] bool.

    Returns:
      (float32 scalar, int32 scalar).
    """
    if student.shape != frozen.shape or student.shape[:3] != mask.shape:
        raise ValueError(
            f"Feature distance: student {student.shape}, frozen {frozen.shape} and mask "
            f"{mask.shape} must share [B, h, w] (and C for the features)"
        )
    diff = student.astype(jnp.float32) - frozen.astype(jnp.float32)
    squared = jnp.sum(diff * diff, axis=-1)
    positive = squared > 0
    # sqrt's derivative is infinite at 0: route zeros around it so their gradient is 0.
    distance = jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)
    count = jnp.sum(mask.astype(jnp.int32))
    total = jnp.sum(jnp.where(mask, distance, 0.0))
    return total / jnp.maximum(count, 1).astype(jnp.float32), count
