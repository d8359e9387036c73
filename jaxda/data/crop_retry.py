"""Crops re-drawn until they pass a rule, as pure functions of the example's seed: mmseg's
RandomCrop `cat_max_ratio` (DAFormer's GTA5 pipeline: 0.75) and DAFormer's rare-class crop
retry (`rare_class`).

mmseg's RandomCrop (mmseg/datasets/pipelines/transforms.py) draws a crop, then up to 10 times:
if the crop's labels, 255 excluded, hold more than one class and the most frequent covers less
than cat_max_ratio of them (`len(cnt) > 1 and max(cnt) / sum(cnt) < cat_max_ratio`), it stops;
else it draws a new crop. After the 10th failed check it has drawn an 11th crop, which it
keeps unchecked; so does `choose`. Draw j of a pipeline run: j = 0 is the run's own crop draw
(`augment.uniforms`), j >= 1 two uniforms from the run's seed folded with (tag, j).

DAFormer's RCS retry (UDADataset.get_rare_class_sample) runs the source pipeline (resize,
crop with the rule above, flip), then up to 10 times: if the crop holds more than min_pixels *
min_crop_ratio pixels of the example's class c, it stops; else it runs the pipeline again on the
same image (a new crop and flip; here also a new random scale, if any). Same pattern: the 11th
run is kept unchecked. Attempt a runs with the example's seed (a = 0) or that seed folded with
(tag, a).

Only labels are looked at (flip and photometric ops change no count): the label is scaled as
`augment.scale` scales it and counted where `augment.crop` would cut it (`augment.crop_window`);
then `augment.augment` runs once with the chosen attempt's seed and crop draw, which is the
view that re-running it would give. The counts are of the crop before padding: padding (255)
counts for neither rule, as in mmseg, which pads after cropping. With neither rule on, nothing
changes; where a rule accepts the first draw, neither does the view.
"""

from collections.abc import Sequence

import tensorflow as tf

from jaxda.data import augment, rare_class
from jaxda.data.labels import IGNORE_LABEL

# mmseg's and DAFormer's `for _ in range(10)`: checked draws before one is kept unchecked.
MAX_CHECKS = 10
# Tags of the attempts' seeds and of the crop re-draws: apart from the examples' other draws.
_ATTEMPT_TAG = 0xA7
_REDRAW_TAG = 0xC7


def stream_options(domain_config, has_crop: bool, name: str) -> dict:
    """`augment_view`'s {'cat_max_ratio', 'rcs_min_crop_pixels'} of a training stream.

    crop_cat_max_ratio (read with a default: older configs lack it) in [0, 1]; 0 and 1 are
    off (mmseg applies the rule only below 1); on, the stream needs a crop (`has_crop`).
    """
    ratio = domain_config.get("crop_cat_max_ratio", 0.0)
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 <= ratio <= 1:
        raise ValueError(f"{name}: crop_cat_max_ratio must be in [0, 1] (0 = off); got {ratio!r}")
    on = 0 < ratio < 1
    if on and not has_crop:
        raise ValueError(f"{name}: crop_cat_max_ratio={ratio} needs a random crop; set crop_size")
    return {
        "cat_max_ratio": float(ratio) if on else 0.0,
        "rcs_min_crop_pixels": rare_class.min_crop_pixels(domain_config, name),
    }


def attempt_seed(seed: tf.Tensor, attempt) -> tf.Tensor:
    """[2] int64: the seed of pipeline run `attempt` of the example with `seed` (itself for 0)."""
    folded = tf.random.experimental.stateless_fold_in(seed, _ATTEMPT_TAG)
    retried = tf.random.experimental.stateless_fold_in(folded, tf.cast(attempt, tf.int64))
    return tf.where(tf.equal(attempt, 0), seed, retried)


def crop_draw(seed: tf.Tensor, draw) -> tf.Tensor:
    """float32 [2] (u_y, u_x): crop draw `draw` of the pipeline run with `seed`; draw 0 is the
    run's own (`augment.augment` uses it by default)."""
    own = tf.gather(augment.uniforms(seed), augment.CROP_SLOTS)
    folded = tf.random.experimental.stateless_fold_in(seed, _REDRAW_TAG)
    redrawn_seed = tf.random.experimental.stateless_fold_in(folded, tf.cast(draw, tf.int64))
    redrawn = tf.random.stateless_uniform([2], seed=redrawn_seed)
    return tf.where(tf.equal(draw, 0), own, redrawn)


def window_counts(label: tf.Tensor, offsets: tf.Tensor, extent: tf.Tensor) -> tf.Tensor:
    """int32 [256]: how many pixels of each id (uint8 [H, W] label) lie in the window."""
    window = tf.reshape(tf.slice(label, offsets, extent), [-1])
    counts = tf.math.bincount(tf.cast(window, tf.int32), minlength=256, maxlength=256)
    return tf.ensure_shape(counts, [256])  # Static, as the while loops' variables must be.


def cat_ratio_accepts(counts: tf.Tensor, cat_max_ratio: float) -> tf.Tensor:
    """[] bool: mmseg's rule on a crop's id counts [256]: 255 excluded, more than one class
    and max / sum < cat_max_ratio (in float64, as NumPy divides)."""
    counts = tf.where(tf.range(256) == IGNORE_LABEL, tf.zeros_like(counts), counts)
    ratio = tf.cast(tf.reduce_max(counts), tf.float64) / tf.cast(
        tf.maximum(tf.reduce_sum(counts), 1), tf.float64
    )
    return (tf.math.count_nonzero(counts) > 1) & (ratio < cat_max_ratio)


def _choose_crop(label, seed, crop_size, cat_max_ratio, centroid):
    """(crop draw [2], id counts [256] of its window) of one pipeline run (`seed`) on the
    scaled label: mmseg's RandomCrop with `cat_max_ratio` (0: the run's own draw)."""
    shape = tf.shape(label)

    def run(draw):
        u = crop_draw(seed, draw)
        offsets, extent, _ = augment.crop_window(shape, crop_size, u[0], u[1], centroid)
        return u, window_counts(label, offsets, extent)

    if not cat_max_ratio:
        return run(0)

    def body(draw, done, u, counts):
        u, counts = run(draw)
        done = (draw >= MAX_CHECKS) | cat_ratio_accepts(counts, cat_max_ratio)
        return draw + 1, done, u, counts

    start = (tf.constant(0), tf.constant(False), tf.zeros([2]), tf.zeros([256], tf.int32))
    return tf.while_loop(lambda _, done, *rest: ~done, body, start)[2:]


# No Python control flow on tensors here, so autograph (tf.data's default) need not convert
# it: converting it made tracing a stream's decode ~0.7 s slower (2 busy CPU cores).
@tf.autograph.experimental.do_not_convert
def choose(
    label: tf.Tensor,
    seed: tf.Tensor,
    *,
    base_size: tf.Tensor | Sequence[int],
    crop_size: Sequence[int],
    random_scale: Sequence[float] = (),
    cat_max_ratio: float = 0.0,
    centroid: tf.Tensor | None = None,
    rcs_class: tf.Tensor | None = None,
    rcs_min_crop_pixels: float | None = None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """(seed [2] int64, crop draw float32 [2]) of the pipeline run and crop that the rules
    keep for an example whose label [H, W] (uint8, before scaling) and `seed` `augment.augment`
    would augment with these options (`centroid`: int [4] as there).

    rcs_class: [] int, the example's rare class (< 0: any crop will do); with
    rcs_min_crop_pixels (None: no retry), runs are retried until the crop holds more pixels
    of it than that.
    """

    def run(attempt):
        run_seed = attempt_seed(seed, attempt)
        factor = augment.scale_factor(augment.uniforms(run_seed), random_scale)
        scaled = label
        if random_scale:
            scaled = augment.resize_nearest(label, augment.scaled_size(factor, base_size))
        point = centroid
        if centroid is not None:
            point = augment.scale_centroid(centroid, base_size, factor, tf.shape(scaled))
        return (run_seed, *_choose_crop(scaled, run_seed, crop_size, cat_max_ratio, point))

    if rcs_class is None or rcs_min_crop_pixels is None:
        return run(0)[:2]
    class_id = tf.cast(rcs_class, tf.int32)

    def body(attempt, done, run_seed, u):
        run_seed, u, counts = run(attempt)
        pixels = tf.cast(tf.gather(counts, tf.clip_by_value(class_id, 0, 255)), tf.float64)
        done = (attempt >= MAX_CHECKS) | (class_id < 0) | (pixels > rcs_min_crop_pixels)
        return attempt + 1, done, run_seed, u

    start = (tf.constant(0), tf.constant(False), tf.zeros([2], tf.int64), tf.zeros([2]))
    return tf.while_loop(lambda _, done, *rest: ~done, body, start)[2:]


def augment_view(
    image: tf.Tensor,
    label: tf.Tensor,
    seed: tf.Tensor,
    *,
    cat_max_ratio: float = 0.0,
    rcs_min_crop_pixels: float | None = None,
    rcs_class: tf.Tensor | None = None,
    **options,
) -> augment.Augmented:
    """`augment.augment(image, label, seed, **options)` with its run and crop chosen by the
    rules (`choose`): the stream's `stream_options`, the example's 'rcs_class' ([] int64)."""
    crop_size = options.get("crop_size")
    rcs = rcs_class is not None and rcs_min_crop_pixels is not None
    if not crop_size or not (cat_max_ratio or rcs):
        return augment.augment(image, label, seed, **options)
    seed, crop_uniforms = choose(
        label,
        seed,
        base_size=options["base_size"],
        crop_size=crop_size,
        random_scale=options.get("random_scale", ()),
        cat_max_ratio=cat_max_ratio,
        centroid=options.get("centroid"),
        rcs_class=rcs_class,
        rcs_min_crop_pixels=rcs_min_crop_pixels if rcs else None,
    )
    return augment.augment(image, label, seed, crop_uniforms=crop_uniforms, **options)
