"""ClassMix (Olsson et al. WACV 2021) as DACS pastes it: source pixels of half of the
classes in the source labels over the target image, on the device inside the train step.

Per source image b, a set of classes is drawn and M_b = [y_s[b] in set] (1 = source pixel):

  mixed image  = M x source image + (1 - M) x target image
  mixed label  = M x source label + (1 - M) x pseudo label
  mixed weight = M x 1            + (1 - M) x target weight (the confidence weight)

How many and which classes, as the official code counts them: the pool is the *unique
values* of the labels, the ignore label 255 included (its filter is commented out, so
'ignore' can be pasted: those pixels keep label 255 and count in no loss); from a pool of n,
ceil(n / 2) are drawn uniformly without replacement, independently for every image.
`pool='sample'` (DACS) takes each image's own labels; `pool='batch'` (DAFormer's port, which
calls `unique` on the whole batch inside its per-image loop) the whole batch's, so an image
may get classes it does not contain (they select nothing) and fewer than half of its own.

Static shapes under jit: the pool is a [B, C + 1] presence mask over the classes and the
ignore slot (slot C stands for 255), not a variable-length list. Each image gets C + 1 iid
uniform scores; absent slots are pushed above every present one, and the ceil(n / 2)
present slots of lowest score are chosen. Ranking iid scores is a uniformly random
permutation of the present slots, so its first k are a uniform k-subset: the same
distribution as `np.random.choice(n, k, replace=False)`, drawn from the step's key.
"""

import jax
import jax.numpy as jnp

from jaxda.data.labels import IGNORE_LABEL

POOLS = ("batch", "sample")


def label_slots(labels: jax.Array, num_classes: int) -> jax.Array:
    """int32 slots of labels [...]: the class id, or num_classes for IGNORE_LABEL."""
    labels = labels.astype(jnp.int32)
    return jnp.where(labels == IGNORE_LABEL, num_classes, jnp.clip(labels, 0, num_classes - 1))


def present_classes(
    labels: jax.Array, num_classes: int, *, pool: str = "batch", include_ignore: bool = True
) -> jax.Array:
    """[B, C + 1] bool: the slots each image draws from (slot C = the ignore label).

    Args:
      labels: [B, H, W] train ids, IGNORE_LABEL for unlabelled pixels.
      pool: 'sample' (the image's own labels: DACS) or 'batch' (the whole batch's labels, the
        same pool for every image: DAFormer's port).
      include_ignore: the ignore label is a class of the pool (both official codes).
    """
    if pool not in POOLS:
        raise ValueError(f"pool={pool!r}: use one of {POOLS}")
    one_hot = jax.nn.one_hot(label_slots(labels, num_classes), num_classes + 1, dtype=jnp.bool_)
    present = jnp.any(one_hot, axis=(1, 2))
    if pool == "batch":
        present = jnp.broadcast_to(jnp.any(present, axis=0, keepdims=True), present.shape)
    if not include_ignore:
        present = present.at[:, num_classes].set(False)
    return present


def choose_classes(key: jax.Array, present: jax.Array) -> jax.Array:
    """[B, C + 1] bool: per row, ceil(n / 2) of its n present slots, uniformly at random.

    Args:
      key: a typed PRNG key (one draw for the whole batch).
      present: [B, S] bool presence mask (`present_classes`).
    """
    scores = jax.random.uniform(key, present.shape)
    scores = jnp.where(present, scores, 2.0)  # Absent slots rank after every present one.
    ranks = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)
    count = jnp.sum(present, axis=-1, keepdims=True)
    return present & (ranks < (count + count % 2) // 2)


def class_masks(labels: jax.Array, chosen: jax.Array) -> jax.Array:
    """[B, H, W] bool: pixels of labels [B, H, W] whose slot is chosen [B, C + 1]."""
    slots = label_slots(labels, chosen.shape[-1] - 1)
    return jnp.take_along_axis(chosen, slots.reshape(slots.shape[0], -1), axis=1).reshape(
        labels.shape
    )


def classmix_masks(
    key: jax.Array,
    labels: jax.Array,
    num_classes: int,
    *,
    pool: str = "batch",
    include_ignore: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """(masks [B, H, W] bool, chosen slots [B, C + 1] bool) of source labels [B, H, W]."""
    present = present_classes(labels, num_classes, pool=pool, include_ignore=include_ignore)
    chosen = choose_classes(key, present)
    return class_masks(labels, chosen), chosen


def mix(mask: jax.Array, source: jax.Array, target: jax.Array) -> jax.Array:
    """mask x source + (1 - mask) x target for mask [B, H, W] and maps [B, H, W, ...]."""
    mask = mask.reshape(mask.shape + (1,) * (source.ndim - mask.ndim))
    return jnp.where(mask, source, target)
