"""tf.data input pipelines: resumable, deterministic training streams and padded eval batches.

Training order is a pure function of (seed, sample position): epoch `e` visits the examples in
the permutation drawn from (seed, e), and global sample `k` of the stream is
`perm_{k // n}[k % n]`. A run resumed at step `s` therefore restarts the stream at position
`s * global_batch_size` and sees exactly the batches an uninterrupted run would have seen,
with no iterator state to save. Every process reads its slice of each global batch, so the
global batch (and the result) does not depend on the number of hosts or devices. Optional
training augmentations (`augment`) are seeded by (seed, position) too, so they resume exactly,
as do their re-drawn crops (`crop_retry`). A sampling plan (RobustNet's `class_uniform`,
DAFormer's `rare_class`) replaces the example of each position (`label_sampling`).

A stream with `views` yields independently augmented views of each example (ProDA's weak and
strong), each with the `box` and `flip` placing it in the example's frame (`geometry`); with
`strong`, ProDA's RandAugment view of one of them and the geometry moving maps onto it
(`randaugment`, `geometry.to_strong`); with `group`, DA-SAC's groups of views (`view_groups`).
"""

from collections.abc import Iterator, Sequence

import jax
import ml_collections
import numpy as np
import tensorflow as tf

from jaxda.data import (
    augment,
    augment_options,
    class_uniform,
    crop_retry,
    importance,
    label_sampling,
    randaugment,
    rare_class,
    sources,
    view_groups,
)
from jaxda.data import eval_decoding as eval_decoding_lib
from jaxda.data import labels as labels_lib


def _permutation(n: int, seed: Sequence[int], epoch: int) -> np.ndarray:
    return np.random.default_rng([*seed, epoch]).permutation(n)


def sample_indices(
    num_examples: int,
    *,
    seed: Sequence[int],
    start: int,
    global_batch_size: int,
    process_slice: slice,
) -> Iterator[tuple[int, int]]:
    """Yields (stream position, example index) for this process, from `start` on, forever."""
    position = start
    epoch, permutation = -1, None
    while True:
        if position // num_examples != epoch:
            epoch = position // num_examples
            permutation = _permutation(num_examples, seed, epoch)
        offset = position % global_batch_size
        if process_slice.start <= offset < process_slice.stop:
            yield position, int(permutation[position % num_examples])
        position += 1


def _label_table(label_map: str) -> np.ndarray | None:
    if not label_map:
        return None
    tables = {"cityscapes_label_ids": labels_lib.CITYSCAPES_LABEL_TO_TRAIN_ID}
    if label_map not in tables:
        raise ValueError(f"Unknown label_map {label_map!r}; available: {sorted(tables)}")
    return labels_lib.lookup_table(tables[label_map])


def make_normalizer(data_config: ml_collections.ConfigDict, stream_config=None):
    """A function: RGB [H, W, 3] (uint8, or float in 0..255) -> float32, optionally BGR,
    (x - mean) / std, as config.data says; a stream's own image_mean / image_std replace it.

    XLA-compiled: the element-wise chain then runs as one fused pass, ~20x faster on CPU than
    TensorFlow's op-by-op execution (the channel reversal alone costs ~15 ms per 1280x720 frame).
    """
    own = {} if stream_config is None else stream_config
    mean = tf.constant(own.get("image_mean") or data_config.image_mean, tf.float32)
    std = tf.constant(own.get("image_std") or data_config.image_std, tf.float32)
    bgr = bool(data_config.bgr)

    @tf.function(jit_compile=True)
    def normalize(image: tf.Tensor) -> tf.Tensor:
        image = tf.cast(image, tf.float32)
        if bgr:
            image = tf.reverse(image, axis=[-1])
        return (image - mean) / std

    return normalize


def denormalize(images: np.ndarray, data_config: ml_collections.ConfigDict) -> np.ndarray:
    """Inverse of `make_normalizer` on the host: normalised [..., 3] -> RGB uint8."""
    std = np.asarray(data_config.image_std, np.float32)
    images = np.asarray(images, np.float32) * std + np.asarray(data_config.image_mean, np.float32)
    if data_config.bgr:
        images = images[..., ::-1]
    return np.clip(np.round(images), 0, 255).astype(np.uint8)


@tf.function(jit_compile=True)
def _pil_bicubic_pass(image: tf.Tensor, out_size: int, axis: int) -> tf.Tensor:
    """uint8 [H, W, 3] -> uint8, `axis` resized to out_size in Pillow's 8-bit fixed point.

    XLA fuses the tap gather into the weighted sum (the taps are never materialised) and
    compiles once per input shape. Each pass is its own XLA call: fused together, the second
    pass would recompute the first for every one of its taps.
    """
    indices, weights = augment.bicubic_taps(tf.shape(image)[axis], out_size)
    taps = tf.gather(tf.cast(image, tf.int32), indices, axis=axis)
    weights = weights[:, :, None, None] if axis == 0 else weights[None, :, :, None]
    # Pillow's sum fits int32 (|weights| sum to < 1.3 * 2**22); rounding is floor(x + 1/2).
    total = tf.reduce_sum(taps * weights, axis=axis + 1) + (1 << (augment.PIL_WEIGHT_BITS - 1))
    total = tf.bitwise.right_shift(total, augment.PIL_WEIGHT_BITS)
    return tf.cast(tf.clip_by_value(total, 0, 255), tf.uint8)


def resize_image(image: tf.Tensor, size: Sequence[int]) -> tf.Tensor:
    """uint8 [H, W, 3] -> uint8 [size[0], size[1], 3], bit-exact PIL `Image.resize(BICUBIC)`:
    how every stream resizes images (the DeepLab-era loaders use PIL BICUBIC, which
    antialiases when downsampling).

    Like Pillow: horizontal pass first, rounded to uint8, then the vertical pass; an axis
    that keeps its length is not resampled. (Pillow 13 sometimes starts with the vertical
    pass when the height shrinks more than the width; not at the datasets' sizes.)
    """
    height, width = (int(n) for n in size)
    shape = tf.shape(image)
    image = tf.cond(shape[1] == width, lambda: image, lambda: _pil_bicubic_pass(image, width, 1))
    image = tf.cond(shape[0] == height, lambda: image, lambda: _pil_bicubic_pass(image, height, 0))
    return tf.ensure_shape(image, [height, width, 3])


# The strong view's seed name (folded into the example seed), so adding or renaming views
# never changes the strong draws.
_STRONG_SEED_NAME = "randaugment/strong"
STRONG_DEFAULTS = randaugment.STRONG_DEFAULTS


def _strong_options(domain_config: ml_collections.ConfigDict, views: dict | None) -> dict | None:
    """`randaugment.stream_options` of a training stream's `strong` (read with a default)."""
    name = f"data stream {domain_config.name}:{domain_config.split}"
    return randaugment.stream_options(domain_config.get("strong"), views, name)


def _decode_fn(
    domain_config, data_config, label_size: Sequence[int] | None, seed: Sequence[int] = ()
):
    """Decodes PNG bytes, resizes (and, given a stream seed, augments) and normalises.

    `label_size`: None resizes labels with the image (training); () keeps their original
    size; (height, width) resizes them to that.

    With a seed (training), `example['position']` (the stream position) seeds the
    augmentation and each example also gets its view's `box` [4] and `flip` []
    (`augment.Augmented`; the whole frame and False when not augmented). With
    `domain_config.views`, it is {view name: {'image', 'label', 'box', 'flip'}} instead.
    With `domain_config.strong` (training), the example also gets 'strong': {'image' [h, w,
    3] (normalised), 'label' [h, w], 'flip' [], 'matrix' [6], 'frames' [num_ops, 6], 'cutout'
    [4]}, ProDA's RandAugment view of the weak view `strong.of` (of the stream's one view
    without views), made from its image and label before normalisation (see
    `randaugment.Strong`). Its image is zero where the weak view showed padding. With
    `domain_config.group` (training): {'group': `view_groups.make_group`} of the one view.
    """
    table = _label_table(domain_config.label_map)
    table = None if table is None else tf.constant(table)
    size = domain_config.size
    views = augment_options.views(domain_config) if seed else None
    options = augment_options.stream(domain_config) if seed and views is None else None
    strong = _strong_options(domain_config, views) if seed else None
    group = view_groups.group_options(domain_config) if seed else None
    key = tf.constant(augment.stream_key(seed)) if seed else None
    normalize = make_normalizer(data_config, domain_config)

    def prepare(image, label, random_scale):
        """The image and label [H, W] that enter augmentation: the base frame of the views."""
        if size and not random_scale:
            # Images are resized with bicubic filtering, labels with nearest neighbour so that
            # ids stay ids.
            image = resize_image(image, size)
        out_label_size = size if label_size is None else label_size
        if out_label_size and not random_scale:
            label = augment.resize_nearest(label, out_label_size)
        label = label[..., 0]
        if table is not None:
            # Before augmenting, so that crop padding (255) is not looked up.
            label = tf.gather(table, tf.cast(label, tf.int32))
        return image, label

    def view(image, label, base_size, view_key, options):
        valid = None
        box, flip = tf.constant(augment.BASE_BOX), tf.constant(False)
        if options is not None:
            image, label, valid, box, flip = crop_retry.augment_view(
                tf.cast(image, tf.float32),
                label,
                view_key,
                base_size=size or base_size,
                **options,
            )
        raw = (image, label, valid)
        image = normalize(image)
        if valid is not None:
            # Padding is zero after normalisation, i.e. the mean colour: DeepLab-style loaders
            # pad the mean-subtracted image, so padding adds no contrast of its own.
            image = tf.where(valid[..., None], image, 0.0)
        if not seed:
            return {"image": image, "label": label}, raw
        return {"image": image, "label": label, "box": box, "flip": flip}, raw

    def strong_view(image, label, valid, example_key):
        """ProDA's strong view of a weak view's (image, label, valid) before normalisation."""
        kwargs = {k: v for k, v in strong.items() if k != "of"}
        seed = augment.view_seed(example_key, _STRONG_SEED_NAME)
        view = randaugment.rand_augment_mc(image, label, seed, **kwargs)
        strong_image = normalize(view.image)
        if valid is not None:
            # Weak padding (zeros, black before normalisation) taken through the same geometry,
            # then zeroed like the weak view's; out-of-frame grey fill stays, as in ProDA.
            no_cut = tf.zeros([4], tf.float32)
            valid = randaugment.warp_nearest(
                tf.cast(valid, tf.uint8), view.flip, view.matrix, view.frames, no_cut, 1
            )
            strong_image = tf.where(valid[..., None] > 0, strong_image, 0.0)
        return {
            "image": strong_image,
            "label": view.label,
            "flip": view.flip,
            "matrix": view.matrix,
            "frames": view.frames,
            "cutout": view.cutout,
        }

    def decode(example):
        image = tf.io.decode_png(example["image"], channels=3)
        label = tf.io.decode_png(example["label"], channels=1)
        base_size = tf.shape(label)[:2]
        example_key = None if key is None else augment.example_seed(key, example["position"])
        # RobustNet's centroid, DAFormer's rare class: options of the example's crops.
        opts, view_opts = label_sampling.with_fields(example, options, views)
        if views is None:
            # Random scaling resamples the original once, by a factor of `size`, instead of
            # resizing to `size` first and resampling twice.
            random_scale = bool(options and options["random_scale"])
            out, raw = view(*prepare(image, label, random_scale), base_size, example_key, opts)
            if group is not None:  # DA-SAC's views of this (reference) view.
                return {"group": view_groups.make_group(*raw, example_key, group, normalize)}
            if strong is not None:
                out["strong"] = strong_view(*raw, example_key)
            return out
        # All views come from one decoding; each view's base frame is the same scene whether
        # or not it was resized to `size` first (boxes are in normalised coordinates).
        prepared, out, raws = {}, {}, {}
        for name, view_options in view_opts.items():
            random_scale = bool(view_options and view_options["random_scale"])
            if random_scale not in prepared:
                prepared[random_scale] = prepare(image, label, random_scale)
            view_key = augment.view_seed(example_key, name)
            out[name], raws[name] = view(*prepared[random_scale], base_size, view_key, view_options)
        if strong is not None:
            out["strong"] = strong_view(*raws[strong["of"]], example_key)
        return out

    return eval_decoding_lib.with_transform(decode, domain_config, table, normalize, seed)


def _process_batch_slice(global_batch_size: int) -> tuple[int, slice]:
    count, index = jax.process_count(), jax.process_index()
    if global_batch_size % count:
        raise ValueError(
            f"batch_size={global_batch_size} must be divisible by the process count {count}"
        )
    local = global_batch_size // count
    return local, slice(index * local, (index + 1) * local)


def open_reader(
    stream_config: ml_collections.ConfigDict, data_config: ml_collections.ConfigDict
) -> sources.SplitReader:
    """The reader of config.data.<stream>; fails fast if the dataset is not prepared."""
    return sources.SplitReader(
        stream_config.name,
        stream_config.split,
        data_config.data_dir,
        stream_config.image_key,
        stream_config.label_key,
        stream_config.get("subset", ""),
    )


def train_iterator(
    reader: sources.SplitReader,
    domain_config: ml_collections.ConfigDict,
    data_config: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    seed: Sequence[int],
    start: int,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless local batches {'image': [b, H, W, 3] float32, 'label': [b, H, W] uint8,
    'index': [b] int64 (each example's index in the split), ...}; a stream with `rare_class`
    also reports each example's drawn class, 'rcs_class': [b] int64.

    Args:
      reader: the stream's examples (`open_reader`).
      domain_config: config.data.source / .target (size, label_map).
      data_config: config.data (data_dir, normalisation).
      global_batch_size: examples per step over all processes.
      seed: shuffling seed of this stream (ints, e.g. (config.seed, stream number)).
      start: stream position to start from (samples already consumed).
    """
    local_batch, process_slice = _process_batch_slice(global_batch_size)
    name = f"data stream {domain_config.name}:{domain_config.split}"
    tables = importance.load_tables(domain_config.get("importance") or {}, len(reader), name)
    plan = rare_class.load_plan(reader, domain_config, data_config, seed, _label_table)
    plan = plan or class_uniform.load_plan(reader, domain_config, data_config, seed, _label_table)

    def encoded_examples():
        samples = sample_indices(
            len(reader) if plan is None else plan.epoch_length,
            seed=seed,
            start=start,
            global_batch_size=global_batch_size,
            process_slice=process_slice,
        )
        if tables is not None:  # DA-SAC's importance sampling replaces the example index.
            samples = importance.importance_indices(samples, tables, seed)
        yield from label_sampling.examples(reader, samples, plan)  # With a plan: its items.

    signature = {
        "image": tf.TensorSpec((), tf.string),
        "label": tf.TensorSpec((), tf.string),
        "position": tf.TensorSpec((), tf.int64),
        "index": tf.TensorSpec((), tf.int64),
        **label_sampling.signature(plan),
    }
    decode = _decode_fn(domain_config, data_config, None, seed=tuple(seed))

    def decode_with_index(example):
        # The split index lets methods join per-example offline results (pseudo labels); the
        # rare class (DAFormer's RCS) is reported for logging.
        extra = {k: example[k] for k in ("index", "rcs_class") if k in example}
        return {**decode(example), **extra}

    dataset = tf.data.Dataset.from_generator(encoded_examples, output_signature=signature)
    dataset = dataset.map(
        decode_with_index, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    dataset = dataset.batch(local_batch, drop_remainder=True)
    if domain_config.get("group"):
        dataset = dataset.map(view_groups.flatten_batch)
    options = tf.data.Options()  # Autotuning's thread delayed the stream's deletion by <= 60 s;
    options.autotune.enabled = False  # maps then run min(16, cores) calls, its starting point.
    return dataset.prefetch(2).with_options(options).as_numpy_iterator()


def eval_iterator(
    reader: sources.SplitReader,
    eval_config: ml_collections.ConfigDict,
    data_config: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
) -> tuple[int, Iterator[dict[str, np.ndarray]]]:
    """(number of examples, iterator over local padded batches) of the evaluation split.

    Batches {'image': [b, H, W, 3] float32, 'label': [b, h, w] uint8, 'valid': [b] bool}.
    Every example appears exactly once, in split order. Consecutive examples of equal (image,
    label) shape share a global batch; a batch that ends early (at a shape change or at the
    end) is padded with zero images whose labels are all `IGNORE_LABEL` (so padding never
    enters the confusion matrix) and `valid` False. Labels are kept at
    `eval_config.label_size` (the original resolution when empty) while images are resized to
    `eval_config.size`, as in the Cityscapes protocol (1024x512 input, 2048x1024 labels).

    When both sizes are set every shape is known and each process reads only its examples;
    otherwise shapes come from the PNG headers of all examples of each global batch, so that
    every process forms the same batches.
    """
    local_batch, process_slice = _process_batch_slice(global_batch_size)
    size, label_size = tuple(eval_config.size or ()), tuple(eval_config.label_size or ())
    fixed_shapes = (size, label_size) if size and label_size else None
    read = {}  # Examples read for their headers, until their batch is yielded.

    def shapes(index: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """((height, width) of the image, of the label) after decoding example `index`."""
        if fixed_shapes:
            return fixed_shapes
        read[index] = example = reader[index]
        return size or sources.png_size(example["image"]), label_size or sources.png_size(
            example["label"]
        )

    def global_batches():
        """(example indices, their shapes) of each global batch, in split order."""
        batch, batch_shapes = [], None
        for index in range(len(reader)):
            example_shapes = shapes(index)
            if batch and (example_shapes != batch_shapes or len(batch) == global_batch_size):
                yield batch, batch_shapes
                batch = []
            batch.append(index)
            batch_shapes = example_shapes
        if batch:
            yield batch, batch_shapes

    def encoded_examples():
        for batch, (image_shape, label_shape) in global_batches():
            padded = batch + [None] * (global_batch_size - len(batch))
            for index in padded[process_slice]:
                example = {"image": b"", "label": b""}
                if index is not None:
                    example = read.get(index) or reader[index]
                yield {
                    **example,
                    "valid": index is not None,
                    "image_shape": image_shape,
                    "label_shape": label_shape,
                }
            for index in batch:
                read.pop(index, None)

    # () keeps the labels at their original resolution; only the image is resized.
    decode = _decode_fn(eval_config, data_config, label_size)

    def decode_or_pad(example):
        decoded = tf.cond(
            example["valid"],
            lambda: decode({"image": example["image"], "label": example["label"]}),
            lambda: {
                "image": tf.zeros(tf.concat([example["image_shape"], [3]], 0), tf.float32),
                "label": tf.fill(
                    example["label_shape"], tf.constant(labels_lib.IGNORE_LABEL, tf.uint8)
                ),
            },
        )
        return {**decoded, "valid": example["valid"]}

    signature = {
        "image": tf.TensorSpec((), tf.string),
        "label": tf.TensorSpec((), tf.string),
        "valid": tf.TensorSpec((), tf.bool),
        "image_shape": tf.TensorSpec((2,), tf.int32),
        "label_shape": tf.TensorSpec((2,), tf.int32),
    }
    dataset = tf.data.Dataset.from_generator(encoded_examples, output_signature=signature)
    dataset = dataset.map(decode_or_pad, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    # Every run of local_batch elements is one batch, all of one shape (`global_batches`).
    dataset = dataset.batch(local_batch, drop_remainder=True).prefetch(2)
    return len(reader), dataset.as_numpy_iterator()
