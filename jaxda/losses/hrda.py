"""HRDA's segmentation loss of a training forward (`jaxda.models.hrda.HRDA` with a box):
the fused logits against the whole crop's labels plus the detail loss of the HR box's own
logits against the labels under the box,

    (1 - hr_loss_weight - lr_loss_weight) * CE(up(fused), y, w)
        + hr_loss_weight * CE(up(hr), crop(y, box), crop(w, box))
        + lr_loss_weight * CE(up(lr), y, w)

(HRDA: hr_loss_weight 0.1, lr_loss_weight 0, so 0.9 / 0.1). `up` resizes logits bilinearly
(align_corners=False) to their labels' size, as mmseg's decode head does before its loss; CE
is mmseg's: the pixel-weighted cross-entropy averaged over ALL pixels, ignored ones counting
0 (`dacs.weighted_cross_entropy`). The same function serves source labels (weights of one) and
DACS's mixed pseudo labels (their confidence weights).

Shapes: logits [batch, h, w, classes], labels and weights [batch, height, width].
"""

import jax
import jax.numpy as jnp

from jaxda.losses import dacs
from jaxda.models import layers

OUTPUT_STRIDE = 4  # HRDA's logits are at stride 4 of their input.


def crop_labels(x: jax.Array, box: jax.Array, size) -> jax.Array:
    """[N, H, W] -> [N, *size]: the rows y .. y + h, columns x .. x + w of `box` (y, x)."""
    return jax.lax.dynamic_slice(x, (0, box[0], box[1]), (x.shape[0], *size))


def _ce(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
    logits = layers.resize_bilinear(logits.astype(jnp.float32), labels.shape[1:3])
    return dacs.weighted_cross_entropy(logits, labels, weights)


def hrda_loss(
    outputs: dict[str, jax.Array],
    labels: jax.Array,
    weights: jax.Array | None = None,
    box: jax.Array | None = None,
    *,
    hr_loss_weight: float = 0.1,
    lr_loss_weight: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(weighted total, {'fused', 'hr', 'lr'}: the unweighted terms that are used).

    Args:
      outputs: the HRDA training forward's 'main' (fused, [N, H / 4, W / 4, C]), 'hr' ([N,
        crop_h / 4, crop_w / 4, C]) and 'lr' (only read with lr_loss_weight > 0).
      labels: [N, H, W] int (IGNORE_LABEL skipped).
      weights: [N, H, W] pixel weights, or None for ones.
      box: [2] int (y, x), the HR crop's corner of that forward; needed for the detail term.
    """
    if weights is None:
        weights = jnp.ones(labels.shape, jnp.float32)
    terms = {"fused": _ce(outputs["main"], labels, weights)}
    total = (1.0 - hr_loss_weight - lr_loss_weight) * terms["fused"]
    if hr_loss_weight > 0:
        if box is None:
            raise ValueError("the detail loss (hr_loss_weight > 0) needs the forward's box")
        hr = outputs["hr"]
        size = (hr.shape[1] * OUTPUT_STRIDE, hr.shape[2] * OUTPUT_STRIDE)
        terms["hr"] = _ce(hr, crop_labels(labels, box, size), crop_labels(weights, box, size))
        total = total + hr_loss_weight * terms["hr"]
    if lr_loss_weight > 0:
        terms["lr"] = _ce(outputs["lr"], labels, weights)
        total = total + lr_loss_weight * terms["lr"]
    return total, terms
