"""ProDA (Zhang et al., CVPR 2021) losses and prototype updates as pure functions.

Transcribed from the official code (`models/adaptation_modelv2.py` and
`calc_prototype.py` of microsoft/ProDA) to channels-last JAX:

- logits / soft labels / distances: [N, H, W, K] (K classes);
- features: [N, H, W, D] (D = 256 in ProDA);
- labels: [N, H, W] integers, `ignore_label` (jaxda: 255, ProDA: 250) is skipped;
- prototypes: [K, D], prototype counts: [K].

All maths runs in float32 and every function is jit-able (string / int arguments
are Python constants). Where the official code has a quirk the functions follow it
and say so in their docstring.
"""

import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy

from jaxda.data.labels import IGNORE_LABEL
from jaxda.losses.segmentation import cross_entropy

# ProDA `update_objective_SingleVector` caps the per-class counts at 3000.
COUNT_CAP = 3000


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def reverse_cross_entropy(
    logits: jax.Array, labels: jax.Array, ignore_label: int = IGNORE_LABEL
) -> jax.Array:
    """Reverse cross-entropy of ProDA's symmetric CE (`CustomModel.rce`).

    The roles of prediction and label are swapped: with p = clamp(softmax(logits),
    1e-7, 1) and the one-hot label clamped to [1e-4, 1], the per-pixel term is
    -sum_c p_c log(onehot_c), i.e. -log(1e-4) times the clamped probability mass
    on the wrong classes. It is summed over labelled pixels and divided by
    (number of labelled pixels + 1e-6), so it is 0 when no pixel is labelled.

    Args:
      logits: [N, H, W, K].
      labels: [N, H, W] integer class ids; `ignore_label` pixels are skipped.
      ignore_label: label value to skip.

    Returns:
      Scalar loss.
    """
    labels = labels.astype(jnp.int32)
    num_classes = logits.shape[-1]
    valid = labels != ignore_label
    p = jnp.clip(jax.nn.softmax(_f32(logits), axis=-1), 1e-7, 1.0)
    # Official: ignored pixels get the extra class K, whose one-hot column is
    # dropped, so their row is all-1e-4; they are masked out either way.
    onehot = jax.nn.one_hot(jnp.where(valid, labels, num_classes), num_classes, dtype=jnp.float32)
    log_onehot = jnp.log(jnp.clip(onehot, 1e-4, 1.0))
    per_pixel = jnp.sum(p * log_onehot, axis=-1)
    mask = valid.astype(jnp.float32)
    return -jnp.sum(per_pixel * mask) / (jnp.sum(mask) + 1e-6)


def symmetric_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    alpha: float = 0.1,
    beta: float = 1.0,
    ignore_label: int = IGNORE_LABEL,
) -> jax.Array:
    """ProDA's symmetric cross-entropy: alpha * CE + beta * RCE.

    CE is `jaxda.losses.segmentation.cross_entropy` (mean over labelled pixels) and
    RCE is `reverse_cross_entropy`. The defaults are ProDA's `rce_alpha=0.1`,
    `rce_beta=1.0`.

    Args:
      logits: [N, H, W, K].
      labels: [N, H, W] integer class ids with `ignore_label` pixels skipped.

    Returns:
      Scalar loss.
    """
    ce = cross_entropy(logits, labels, ignore_label)
    rce = reverse_cross_entropy(logits, labels, ignore_label)
    return alpha * ce + beta * rce


def regulariser(logits: jax.Array, kind: str = "mrkld") -> jax.Array:
    """ProDA's `regular_loss` on the target predictions.

    - 'mrkld': KL(uniform || p) up to a constant: minus the sum of all log-softmax
      entries divided by N*H*W*K.
    - 'mrent': negative entropy: sum over all entries of p log p divided by N*H*W
      (minimising it maximises the entropy).

    Args:
      logits: [N, H, W, K].
      kind: 'mrkld' or 'mrent' (case-insensitive, ProDA spells them 'MRKLD'/'MRENT').

    Returns:
      Scalar loss.
    """
    logp = jax.nn.log_softmax(_f32(logits), axis=-1)
    n, h, w, c = logits.shape
    kind = kind.lower()
    if kind == "mrkld":
        return -jnp.sum(logp) / (n * h * w * c)
    if kind == "mrent":
        return jnp.sum(jnp.exp(logp) * logp) / (n * h * w)
    raise ValueError(f"Unknown regulariser {kind!r}; expected 'mrkld' or 'mrent'")


def _safe_sqrt(x: jax.Array) -> jax.Array:
    """sqrt(max(x, 0)) whose gradient is 0 (not NaN/inf) where x <= 0."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def prototype_distances(features: jax.Array, prototypes: jax.Array) -> jax.Array:
    """Euclidean distance of every pixel feature to every prototype.

    ProDA's `feat_prototype_distance`: d[n, h, w, k] = ||features[n, h, w] -
    prototypes[k]||_2. To avoid the [N, H, W, K, D] difference tensor (2.2 GB for
    N=4, 128x224, K=19, D=256) it uses ||f||^2 - 2 f.c + ||c||^2, clamped at 0,
    after centring both sides on the (stop-gradient) mean prototype (distances
    are translation-invariant; centring reduces cancellation). The dot product
    runs at `Precision.HIGHEST` so TF32 matmuls on GPUs do not spoil it. The
    square root is "safe": its gradient is 0 where the distance clamps to 0.
    Accuracy: relative error ~1e-7 for typical distances; near 0 the absolute
    error is about sqrt(float32 eps) * ||f - centre|| (e.g. ~2e-3 for D=256 ReLU
    features), which is irrelevant at ProDA's temperature of 1.

    Args:
      features: [N, H, W, D].
      prototypes: [K, D].

    Returns:
      [N, H, W, K] float32 distances.
    """
    f = _f32(features)
    c = _f32(prototypes)
    centre = jax.lax.stop_gradient(jnp.mean(c, axis=0))
    f = f - centre
    c = c - centre
    dot = jnp.einsum("nhwd,kd->nhwk", f, c, precision=jax.lax.Precision.HIGHEST)
    sq = jnp.sum(f * f, axis=-1, keepdims=True) - 2.0 * dot + jnp.sum(c * c, axis=-1)
    return _safe_sqrt(sq)


def rectification_weights(distances: jax.Array, temperature: float = 1.0) -> jax.Array:
    """Prototype-based rectification weights (ProDA `get_prototype_weight`).

    w = softmax over K of -(d - min_k d) * temperature (subtracting the nearest
    distance does not change the softmax; ProDA does it, so it is kept).

    Args:
      distances: [N, H, W, K] pixel-to-prototype distances (of the EMA model's
        features, already mapped to the weakly augmented view).
      temperature: ProDA `proto_temperature` (default 1).

    Returns:
      [N, H, W, K] weights summing to 1 over K.
    """
    d = _f32(distances)
    d = d - jnp.min(d, axis=-1, keepdims=True)
    return jax.nn.softmax(-d * temperature, axis=-1)


def rectify(
    soft_labels: jax.Array,
    weights: jax.Array,
    threshold: float = 0.0,
    ignore_label: int = IGNORE_LABEL,
) -> jax.Array:
    """Rectified hard pseudo-labels (ProDA `step`, `proto_rectify` branch).

    label = argmax_k(w_k * soft_k); the pixel becomes `ignore_label` when the largest
    entry of the renormalised product (w * soft) / sum_k(w * soft) is below
    `threshold` (ProDA `train_thred`, default 0: nothing is ignored).

    Official quirk kept: a pixel whose product is all zero gets a NaN confidence in
    ProDA, which is never "< threshold", so it keeps label 0 (the argmax of zeros).

    Args:
      soft_labels: [N, H, W, K] soft pseudo-labels (ProDA `target_lpsoft`).
      weights: [N, H, W, K] from `rectification_weights`.
      threshold: confidence threshold on the renormalised product.
      ignore_label: label written at rejected pixels.

    Returns:
      [N, H, W] int32 labels.
    """
    rectified = _f32(weights) * _f32(soft_labels)
    labels = jnp.argmax(rectified, axis=-1).astype(jnp.int32)
    total = jnp.sum(rectified, axis=-1)
    positive = total > 0
    conf = jnp.max(rectified, axis=-1) / jnp.where(positive, total, 1.0)
    rejected = positive & (conf < threshold)
    return jnp.where(rejected, ignore_label, labels)


def prototype_consistency(
    student_features: jax.Array,
    teacher_distances: jax.Array,
    valid: jax.Array,
    prototypes: jax.Array,
    temperature: float = 1.0,
) -> jax.Array:
    """ProDA's prototype consistency loss (`step`, `proto_consistW` branch).

    teacher = softmax_K(-temperature * teacher_distances) (stop-gradient),
    student = log_softmax_K(-temperature * ||student_features - prototypes||);
    each (pixel, class) entry is PyTorch's `F.kl_div(student, teacher)`,
    teacher * (log teacher - student) (0 where teacher == 0). The entries are
    summed over valid pixels and divided by the number of valid (pixel, class)
    entries: ProDA's mask is `distance != 250` over all K channels, so the
    denominator is K * (valid pixels), i.e. the loss is the per-pixel KL averaged
    over valid pixels and divided by K (official normalisation, kept).

    Deviation: with no valid pixel ProDA divides 0 by 0 (NaN); this returns 0.
    The prototypes are stop-gradient (ProDA's are a buffer, never trained).

    Args:
      student_features: [N, H, W, D] features of the strongly augmented view.
      teacher_distances: [N, H, W, K] EMA distances already warped into the strong
        view (values at invalid pixels are ignored).
      valid: [N, H, W] bool, False where the strong augmentation padded.
      prototypes: [K, D].
      temperature: ProDA `proto_temperature` (default 1).

    Returns:
      Scalar loss.
    """
    num_classes = teacher_distances.shape[-1]
    valid = valid.astype(bool)
    t_dist = jnp.where(valid[..., None], _f32(teacher_distances), 0.0)
    teacher = jax.lax.stop_gradient(jax.nn.softmax(-t_dist * temperature, axis=-1))
    s_dist = prototype_distances(student_features, jax.lax.stop_gradient(prototypes))
    student = jax.nn.log_softmax(-s_dist * temperature, axis=-1)
    kl = xlogy(teacher, teacher) - teacher * student
    total = jnp.sum(jnp.where(valid[..., None], kl, 0.0))
    count = jnp.sum(valid).astype(jnp.float32) * num_classes
    return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)


def distillation(
    student_logits: jax.Array, teacher_logits: jax.Array, kind: str = "proda"
) -> jax.Array:
    """Self-distillation loss of ProDA's stage 2/3 (`step_distillation`).

    With t = softmax(teacher_logits) (stop-gradient), averaged over all
    N*H*W*K entries:

    - 'proda' (the published code, faithful): `F.kl_div(softmax(student), t)`
      where `kl_div` expects log-probabilities, so each entry is
      t * (log t - p_student). Minimising it maximises the dot product of teacher
      and student probabilities rather than matching the distributions. ProDA's mask
      `teacher != 250` is always all ones, so the denominator is N*H*W*K.
    - 'kl': the intended KL(teacher || student), entries
      t * (log t - log_softmax(student)), same normalisation; >= 0 and 0 when the
      student equals the teacher.

    Args:
      student_logits: [N, H, W, K].
      teacher_logits: [N, H, W, K].
      kind: 'proda' or 'kl'.

    Returns:
      Scalar loss.
    """
    t = jax.lax.stop_gradient(jax.nn.softmax(_f32(teacher_logits), axis=-1))
    kind = kind.lower()
    if kind == "proda":
        s = jax.nn.softmax(_f32(student_logits), axis=-1)
    elif kind == "kl":
        s = jax.nn.log_softmax(_f32(student_logits), axis=-1)
    else:
        raise ValueError(f"Unknown distillation {kind!r}; expected 'proda' or 'kl'")
    return jnp.mean(xlogy(t, t) - t * s)


def class_mean_features(
    features: jax.Array, logits: jax.Array, min_pixels: int = 10
) -> tuple[jax.Array, jax.Array]:
    """Per-image mean feature of each predicted class (ProDA `calculate_mean_vector`).

    For image n and class k, the mean of features[n] over the pixels whose argmax
    prediction is k (labels=None, thresh=None in ProDA, so the confidence mask is
    all ones). The class is present when it has at least `min_pixels` such pixels
    (and at least one). ProDA's `process_label` one-hot has an extra (K+1-th)
    channel for labels >= K, which argmax predictions never hit, so it does not
    change anything. The argmax is taken on the logits (ProDA: on the softmax; the
    same up to float ties).

    Args:
      features: [N, H, W, D].
      logits: [N, H, W, K] predictions at the same resolution.
      min_pixels: ProDA's hard-coded 10.

    Returns:
      vectors: [N, K, D] float32 means (0 for absent classes);
      present: [N, K] bool.
    """
    num_classes = logits.shape[-1]
    pred = jnp.argmax(logits, axis=-1)
    onehot = jax.nn.one_hot(pred, num_classes, dtype=jnp.float32)  # [N, H, W, K]
    counts = jnp.sum(onehot, axis=(1, 2))  # [N, K]
    sums = jnp.einsum("nhwk,nhwd->nkd", onehot, _f32(features), precision=jax.lax.Precision.HIGHEST)
    vectors = sums / jnp.maximum(counts, 1.0)[..., None]
    present = (counts > 0) & (counts >= min_pixels)
    return vectors, present


def _sequential_update(prototypes, counts, vectors, present, step):
    counts_dtype = jnp.asarray(counts).dtype
    vectors = _f32(vectors)
    # Official skip: `if vector.sum().item() == 0: return`.
    use = present.astype(bool) & (jnp.sum(vectors, axis=-1) != 0)

    def body(carry, inputs):
        proto, count = carry
        vec, use_n = inputs
        new_proto, new_count = step(proto, count, vec)
        proto = jnp.where(use_n[:, None], new_proto, proto)
        count = jnp.where(use_n, new_count, count)
        return (proto, count), None

    (proto, count), _ = jax.lax.scan(body, (_f32(prototypes), _f32(counts)), (vectors, use))
    return proto, count.astype(counts_dtype)


def update_prototypes_running_mean(
    prototypes: jax.Array,
    counts: jax.Array,
    vectors: jax.Array,
    present: jax.Array,
    count_cap: int = COUNT_CAP,
) -> tuple[jax.Array, jax.Array]:
    """Running-mean prototype update (ProDA `update_objective_SingleVector`, 'mean').

    This is the path of the offline prototype initialisation, `calc_prototype.py`:
    on the target set it calls `update_objective_SingleVector(id, vector, 'mean')`
    for every (image, class) from `calculate_mean_vector` with labels=None,
    starting from zero prototypes and counts. Images are processed in order; for
    each present class k of image n with a vector whose sum is non-zero:
    proto_k = (proto_k * count_k + v) / (count_k + 1), then
    count_k = min(count_k + 1, count_cap).

    Official quirk kept: the denominator is the un-capped count + 1, so once a class
    has reached the cap it keeps being updated as (proto * cap + v) / (cap + 1), an
    exponential average with momentum 1 / (cap + 1), not a frozen mean. The skip
    tests `vector.sum() == 0` (not all-zero), as in ProDA.

    Args:
      prototypes: [K, D].
      counts: [K] (float or int; returned in the same dtype).
      vectors: [N, K, D] from `class_mean_features`.
      present: [N, K] bool from `class_mean_features`.
      count_cap: ProDA's 3000.

    Returns:
      (prototypes [K, D] float32, counts [K]).
    """

    def step(proto, count, vec):
        new_count = count + 1.0
        new_proto = (proto * count[:, None] + vec) / new_count[:, None]
        return new_proto, jnp.minimum(new_count, float(count_cap))

    return _sequential_update(prototypes, counts, vectors, present, step)


def update_prototypes_ema(
    prototypes: jax.Array,
    counts: jax.Array,
    vectors: jax.Array,
    present: jax.Array,
    momentum: float = 1e-4,
    count_cap: int = COUNT_CAP,
) -> tuple[jax.Array, jax.Array]:
    """Moving-average prototype update (ProDA `update_objective_SingleVector`).

    The path of training (`step`, `moving_prototype`, `start_mean=False`): in order
    over images, for each present class with a vector whose sum is non-zero:
    proto_k = (1 - momentum) * proto_k + momentum * v and
    count_k = min(count_k + 1, count_cap) (the counts do not affect this update;
    ProDA only reads them with `start_mean=True`, which training does not use).

    Args:
      prototypes: [K, D].
      counts: [K] (float or int; returned in the same dtype).
      vectors: [N, K, D] from `class_mean_features`.
      present: [N, K] bool.
      momentum: ProDA `proto_momentum` (default 1e-4).
      count_cap: ProDA's 3000.

    Returns:
      (prototypes [K, D] float32, counts [K]).
    """

    def step(proto, count, vec):
        new_proto = proto * (1.0 - momentum) + momentum * vec
        return new_proto, jnp.minimum(count + 1.0, float(count_cap))

    return _sequential_update(prototypes, counts, vectors, present, step)
