"""DA-SAC's groups of views of one training example (stream key `group`).

After the stream's own augmentation (random scale, crop, global flip: the "reference" crop of
size (h, w)), an example becomes T views of the reference. Every view (view 0 included) is
mirrored with probability 1/2; views 1..T-1 show a random zoom-crop: s ~ U(zoom), the window
(int(s * h), int(s * w)) at a uniformly drawn integer top-left, resized back to (h, w) (image
bilinear, label and padding mask nearest, as PIL's NEAREST); view 0 shows the whole reference.
Each view comes twice: clean (the teacher's input) and with photometric noise (the student's):
Gaussian blur, then with probability `jitter_prob` a colour jitter in a random order, then
greyscale with probability `greyscale_prob`.

DA-SAC flips a view first and crops it afterwards; here the crop is drawn in the unflipped
reference and the result mirrored. The two are distributionally identical: the window's
left edge is uniform over [0, w - new_w], a set that mirroring maps onto itself, and the
half-pixel bilinear / nearest resizes commute with mirroring (nearest up to exact ties).
So `box` is the window in unflipped reference coordinates and each view is `box` resized,
then mirrored if `flip`: the `jaxda.data.geometry` convention, with the reference crop as the
base frame.

Every draw is stateless, from `augment.view_seed(example seed, 'group/<t>')`, so a view is a
pure function of (stream seed, stream position, t); geometry and noise read different slots of
its uniform vector.

Deviations from DA-SAC's PIL/torchvision ops, all in float32 on 0..255 values, clipped to
[0, 255] after each op but never rounded (PIL rounds to uint8 between ops):
- blur: an exact separable Gaussian with std = radius and symmetric edges
  (`augment.gaussian_blur`); PIL's GaussianBlur(radius) approximates it by box blurs;
- contrast blends with the float mean of the greyscale image (PIL rounds the mean to an
  integer); greyscale is the float ITU-R 601 luma (PIL's "L" conversion rounds);
- hue: `tf.image.adjust_hue` (float HSV) instead of PIL's uint8 HSV round trip;
- zoom-out (s > 1, padding) is not supported;
- the reference is the stream's own augmentation (`augment.augment`: PIL-bicubic scaling,
  its crop and padding placement), not DA-SAC's bilinear MaskScale / MaskRandScale /
  centre-padded MaskRandCrop;
- blur needs a reference side >= ceil(3 * max radius) (symmetric padding), 6 px by default.
"""

import functools
from typing import NamedTuple

import ml_collections
import tensorflow as tf

from jaxda.data import augment

# Defaults of the `group` keys: DA-SAC's values.
GROUP_DEFAULTS = {
    "size": 4,
    "zoom": (0.5, 1.0),
    "flip": True,
    "blur_radius": (0.1, 2.0),
    "jitter": 0.4,
    "jitter_prob": 0.5,
    "hue": 0.1,
    "greyscale_prob": 0.2,
    # RobustNet's photometric copies blur after the jitter; DA-SAC blurs first.
    "blur_after_jitter": False,
}

# Slots of a view's uniform vector: geometry first, then noise (disjoint, so switching noise
# on or off never moves the views).
_FLIP, _ZOOM, _CROP_Y, _CROP_X = range(4)
_RADIUS, _JITTER, _BRIGHT, _CONTRAST, _SATURATION, _HUE, _ORDER = range(4, 11)
_GREY = _ORDER + 4
_NUM_UNIFORMS = _GREY + 1


def group_options(domain_config: ml_collections.ConfigDict) -> dict | None:
    """Validated `group` options of a training stream (missing keys take GROUP_DEFAULTS);
    None when the stream has no group (a key read with a default: older configs lack it)."""
    group = domain_config.get("group")
    if not group:
        return None
    name = f"data stream {domain_config.name}:{domain_config.split}"
    unknown = sorted(set(group.keys()) - set(GROUP_DEFAULTS))
    if unknown:
        raise ValueError(
            f"{name}: unknown group keys {unknown}; remove them (known: {list(GROUP_DEFAULTS)})"
        )
    if domain_config.get("views") or domain_config.get("strong"):
        raise ValueError(
            f"{name}: group cannot be combined with views or strong; set group={{}} or "
            "views={} and strong={}"
        )
    options = {**GROUP_DEFAULTS, **dict(group.items())}

    def check(key: str, ok: bool, what: str):
        if not ok:
            raise ValueError(f"{name}: group.{key}={options[key]!r}; {what}")

    size, zoom, radius = options["size"], tuple(options["zoom"]), tuple(options["blur_radius"])
    check("size", isinstance(size, int) and size >= 1, "set it to the number of views T >= 1")
    check(
        "zoom",
        len(zoom) == 2 and 0 < zoom[0] <= zoom[1] <= 1,
        "use (min, max) with 0 < min <= max <= 1 (zoom-out is not supported), e.g. (0.5, 1.0)",
    )
    check("flip", isinstance(options["flip"], bool), "use True (flip each view) or False")
    check("blur_after_jitter", isinstance(options["blur_after_jitter"], bool), "use a bool")
    check(
        "blur_radius",
        not radius or (len(radius) == 2 and 0 <= radius[0] <= radius[1]),
        "use () for no blur or (min, max) with 0 <= min <= max",
    )
    for key, high in (("jitter", 1.0), ("jitter_prob", 1.0), ("hue", 0.5), ("greyscale_prob", 1)):
        check(key, 0 <= options[key] <= high, f"use a value in [0, {high}]")
    return {
        **{key: float(options[key]) for key in ("jitter", "jitter_prob", "hue", "greyscale_prob")},
        "size": size,
        "zoom": tuple(map(float, zoom)),
        "flip": options["flip"],
        "blur_radius": tuple(map(float, radius)),
        "blur_after_jitter": options["blur_after_jitter"],
    }


class Draws(NamedTuple):
    """One view's random choices."""

    flip: tf.Tensor  # [] bool.
    zoom: tf.Tensor  # [] float32 s (1 for view 0).
    crop: tf.Tensor  # [4] int32 (y0, x0, height, width) of the window in the reference.
    radius: tf.Tensor  # [] float32 blur radius (0 without blur).
    jitter: tf.Tensor  # [] bool: colour jitter applied.
    factors: tf.Tensor  # [4] float32 brightness, contrast, saturation factors; hue shift.
    order: tf.Tensor  # [4] int32 indices into JITTER_OPS, in the order applied.
    grey: tf.Tensor  # [] bool: greyscale applied.


def _lerp(low: float, high: float, u: tf.Tensor) -> tf.Tensor:
    return low + (high - low) * u


def draws(seed: tf.Tensor, index: int, size: tf.Tensor, options: dict) -> Draws:
    """The draws of view `index` (0 = the whole reference) of a reference of `size` [2]."""
    u = tf.random.stateless_uniform([_NUM_UNIFORMS], seed=seed)
    size = tf.cast(size, tf.int32)
    zoom = tf.constant(1.0)
    crop = tf.concat([[0, 0], size], 0)
    if index and options["zoom"] != (1.0, 1.0):
        zoom = _lerp(*options["zoom"], u[_ZOOM])
        # int(s * h) as DA-SAC, in float64 so that it is Python's product of the float32 s.
        new = tf.cast(tf.cast(zoom, tf.float64) * tf.cast(size, tf.float64), tf.int32)
        new = tf.maximum(new, 1)
        room = size - new
        # randint(0, room): floor(u * (room + 1)), u < 1 (the minimum guards float rounding).
        start = tf.cast(u[_CROP_Y : _CROP_X + 1] * tf.cast(room + 1, tf.float32), tf.int32)
        crop = tf.concat([tf.minimum(start, room), new], 0)
    jitter, hue = options["jitter"], options["hue"]
    factors = tf.concat(
        [
            _lerp(max(0.0, 1.0 - jitter), 1.0 + jitter, u[_BRIGHT : _SATURATION + 1]),
            _lerp(-hue, hue, u[_HUE : _HUE + 1]),
        ],
        0,
    )
    radius = options["blur_radius"]
    return Draws(
        flip=u[_FLIP] < 0.5 if options["flip"] else tf.constant(False),
        zoom=zoom,
        crop=crop,
        radius=_lerp(*radius, u[_RADIUS]) if radius else tf.constant(0.0),
        jitter=u[_JITTER] < options["jitter_prob"],
        factors=factors,
        order=tf.argsort(u[_ORDER : _ORDER + 4], stable=True),
        grey=u[_GREY] < options["greyscale_prob"],
    )


def _clip(image: tf.Tensor) -> tf.Tensor:
    return tf.clip_by_value(image, 0.0, 255.0)


def brightness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """Blend with black (torchvision/PIL adjust_brightness)."""
    return _clip(image * factor)


def contrast(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """Blend with the mean grey level of the image (adjust_contrast)."""
    mean = tf.reduce_mean(augment._grey(image))
    return _clip((image - mean) * factor + mean)


def saturation(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """Blend with the image's greyscale (adjust_saturation)."""
    grey = augment._grey(image)
    return _clip((image - grey) * factor + grey)


def hue(image: tf.Tensor, shift: tf.Tensor) -> tf.Tensor:
    """Rotate the hue by `shift` turns, in [-0.5, 0.5] (adjust_hue)."""
    return _clip(tf.image.adjust_hue(image / 255.0, shift) * 255.0)


def greyscale(image: tf.Tensor) -> tf.Tensor:
    """ITU-R 601 luma replicated to 3 channels (to_grayscale(num_output_channels=3))."""
    return tf.broadcast_to(augment._grey(image), tf.shape(image))


# torchvision ColorJitter's ops, in the order of Draws.factors.
JITTER_OPS = (brightness, contrast, saturation, hue)


def color_jitter(image: tf.Tensor, factors: tf.Tensor, order: tf.Tensor) -> tf.Tensor:
    """Applies JITTER_OPS[order[k]] with factors[order[k]], k = 0..3 (torchvision's random
    order, here drawn statelessly)."""
    for k in range(len(JITTER_OPS)):
        branches = [functools.partial(op, image, factors[i]) for i, op in enumerate(JITTER_OPS)]
        image = tf.switch_case(order[k], branches)
    return image


def noise(image: tf.Tensor, draw: Draws, options: dict) -> tf.Tensor:
    """The student's photometric noise of a clean view [h, w, 3] in 0..255: blur (before or,
    with `blur_after_jitter`, after the jitter), colour jitter, greyscale."""
    radius = options["blur_radius"]
    blur = radius and radius[1] > 0
    if blur and not options["blur_after_jitter"]:
        image = _clip(augment.gaussian_blur(image, draw.radius, radius[1]))
    if options["jitter_prob"] and (options["jitter"] or options["hue"]):
        image = tf.cond(
            draw.jitter, lambda: color_jitter(image, draw.factors, draw.order), lambda: image
        )
    if blur and options["blur_after_jitter"]:
        image = _clip(augment.gaussian_blur(image, draw.radius, radius[1]))
    if options["greyscale_prob"]:
        image = tf.cond(draw.grey, lambda: greyscale(image), lambda: image)
    return image


def _view(image, label, valid, draw: Draws, zoomed: bool):
    """(clean image, label, valid, box [4]) of one view of the reference."""
    size = tf.shape(label)[:2]
    if zoomed:
        y0, x0, height, width = tf.unstack(draw.crop)
        window = tf.slice(image, [y0, x0, 0], [height, width, 3])
        image = tf.image.resize(window, size, "bilinear")  # Half-pixel centres, clamped edges.
        maps = tf.stack([label, tf.cast(valid, tf.uint8)], -1)
        maps = augment.resize_nearest(tf.slice(maps, [y0, x0, 0], [height, width, 2]), size)
        label, valid = maps[..., 0], maps[..., 1] > 0
    image, label, valid = augment.flip([image, label, valid], draw.flip)
    start, extent = tf.cast(draw.crop[:2], tf.float32), tf.cast(draw.crop[2:], tf.float32)
    scale = tf.cast(size, tf.float32)
    box = tf.concat([start / scale, (start + extent) / scale], 0)
    return image, label, valid, box


def make_group(image, label, valid, seed: tf.Tensor, options: dict, normalize) -> dict:
    """The group of views of a reference crop: image [h, w, 3] (0..255), label [h, w] uint8,
    valid [h, w] bool or None (no padding); seed: the example's seed (`augment.example_seed`).

    Returns {'image': [T, h, w, 3] float32 normalised student input (noise applied), 'clean':
    [T, h, w, 3] normalised teacher input, 'label': [T, h, w] uint8 (255 on padding), 'valid':
    [T, h, w] bool (False on padding), 'box': [T, 4] float32, 'flip': [T] bool}. Images are
    zero where not valid (the mean colour, as the pipeline pads).
    """
    image = tf.cast(image, tf.float32)
    valid = tf.ones_like(label, tf.bool) if valid is None else valid
    zoomed = options["zoom"] != (1.0, 1.0)
    clean, noisy, labels, valids, boxes, flips = [], [], [], [], [], []
    for t in range(options["size"]):
        draw = draws(augment.view_seed(seed, f"group/{t}"), t, tf.shape(label)[:2], options)
        view_image, view_label, view_valid, box = _view(image, label, valid, draw, t and zoomed)
        clean.append(view_image)
        noisy.append(noise(view_image, draw, options))
        labels.append(view_label)
        valids.append(view_valid)
        boxes.append(box)
        flips.append(draw.flip)
    shape = [options["size"], *label.shape]
    valid = tf.ensure_shape(tf.stack(valids), shape)
    out = {
        "image": tf.where(valid[..., None], normalize(tf.stack(noisy)), 0.0),
        "clean": tf.where(valid[..., None], normalize(tf.stack(clean)), 0.0),
        "label": tf.ensure_shape(tf.stack(labels), shape),
        "valid": valid,
        "box": tf.stack(boxes),
        "flip": tf.stack(flips),
    }
    out["image"].set_shape([*shape, 3])
    out["clean"].set_shape([*shape, 3])
    return out


def flatten_batch(batch: dict) -> dict:
    """A batch of groups {'group': {key: [b, T, ...]}, 'index': [b], ...} -> rows [b x T, ...]
    (T consecutive rows per image; 'index', and 'rcs_class' if any, repeated per view), so
    that the views shard over the devices like any batch."""
    group = batch["group"]
    views = tf.shape(group["image"])[1]
    rows = {k: tf.reshape(v, tf.concat([[-1], tf.shape(v)[2:]], 0)) for k, v in group.items()}
    per_image = {k: tf.repeat(batch[k], views) for k in ("index", "rcs_class") if k in batch}
    return {**batch, "group": rows, **per_image}
