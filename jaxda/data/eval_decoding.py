"""Decoding of evaluation streams with a `transform`: a dataset's own evaluation protocol,
applied to the decoded image and label instead of resizing them (RobustNet's Mapillary crop).

A transform maps (uint8 image [H, W, 3], train-id label [H, W, 1]) to a pair of one fixed
(height, width). The stream's `size` and `label_size` must both name that size: evaluation
batches are formed from them (`input_pipeline.eval_iterator`), so every shape is known.
"""

import functools

import tensorflow as tf

from jaxda.data import eval_transforms

# Transform name -> (function of (image, label), its output (height, width)).
TRANSFORMS = {
    # RobustNet's Mapillary validation (eval_size 1536): resized to height 1536, then centre
    # crop / pad to 1536x1536. As in RobustNet, the pixels the pad adds are labelled 0 (road)
    # and therefore scored (`eval_transforms` explains where that happens).
    "mapillary": (
        functools.partial(eval_transforms.resize_height_center_crop_pad, height=1536, crop=1536),
        (1536, 1536),
    ),
}


def output_size(name: str) -> tuple[int, int]:
    """(height, width) of the pairs transform `name` produces."""
    if name not in TRANSFORMS:
        raise ValueError(f"Unknown evaluation transform {name!r}; available: {sorted(TRANSFORMS)}")
    return TRANSFORMS[name][1]


def with_transform(decode, domain_config, table, normalize, seed=()):
    """`decode` (input_pipeline's decoder of the stream), or, when `domain_config.transform`
    names a transform, a decoder that applies it instead of resizing.

    Args:
      decode: the stream's own decoder, returned when it has no transform.
      domain_config: the stream (a key read with a default: most streams lack it).
      table: uint8 [256] label-id -> train-id table of the stream's label_map, or None.
      normalize: uint8 [h, w, 3] -> normalised float32 (`input_pipeline.make_normalizer`).
      seed: the training stream's seed; a transform is an evaluation protocol only.

    Returns:
      A function {'image': PNG bytes, 'label': PNG bytes} -> {'image': float32 [h, w, 3]
      normalised, 'label': uint8 [h, w] train ids}, (h, w) = the transform's output size.
    """
    name = domain_config.get("transform") or ""
    if not name:
        return decode
    where = f"data stream {domain_config.name}:{domain_config.split}"
    if seed:
        raise ValueError(f"{where}: transform={name!r} is for evaluation streams only")
    size = output_size(name)
    sizes = {key: tuple(domain_config.get(key) or ()) for key in ("size", "label_size")}
    if any(value != size for value in sizes.values()):
        raise ValueError(
            f"{where}: transform={name!r} outputs {size}; set size={size} and "
            f"label_size={size} (found {sizes})"
        )
    transform = TRANSFORMS[name][0]

    def decode_transformed(example):
        image = tf.io.decode_png(example["image"], channels=3)
        label = tf.io.decode_png(example["label"], channels=1)
        if table is not None:
            # Before the transform, so that the label it pads with is a train id.
            label = tf.gather(table, tf.cast(label, tf.int32))
        image, label = transform(image, label)
        image = tf.ensure_shape(image, [*size, 3])
        label = tf.ensure_shape(tf.cast(label[..., 0], tf.uint8), size)
        return {"image": normalize(image), "label": label}

    return decode_transformed
