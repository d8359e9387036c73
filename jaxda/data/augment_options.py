"""A training stream's augmentation options, validated, from its config: the stream's own
(`stream`) and, for a stream with `views`, each view's (`views`). They are the keyword
arguments of `crop_retry.augment_view`: those of `augment.augment` and its crop re-draw rules
(mmseg's cat_max_ratio, DAFormer's rare-class retry)."""

import ml_collections

from jaxda.data import crop_retry


def stream(domain_config: ml_collections.ConfigDict) -> dict | None:
    """Validated keyword arguments of `crop_retry.augment_view` (those of `augment.augment` and
    the crop rules) for a training stream; None if all off.

    With `random_scale` and no `crop_size` the scaled image is cropped (or padded) back to
    `size`, so that every batch has a static shape.
    """
    c = domain_config
    random_scale, crop_size, blur_sigma = map(tuple, (c.random_scale, c.crop_size, c.blur_sigma))
    name = f"data stream {c.name}:{c.split}"
    retry = crop_retry.stream_options(c, bool(crop_size or (random_scale and c.size)), name)
    if not (random_scale or crop_size or c.flip or c.blur_prob or c.color_jitter):
        return None
    if random_scale and (len(random_scale) != 2 or not 0 < random_scale[0] <= random_scale[1]):
        raise ValueError(f"{name}: random_scale must be () or (min, max) with 0 < min <= max")
    if crop_size and (len(crop_size) != 2 or min(crop_size) < 1):
        raise ValueError(f"{name}: crop_size must be () or (height, width) with both > 0")
    if not 0 <= c.blur_prob <= 1 or len(blur_sigma) != 2 or not 0 <= blur_sigma[0] <= blur_sigma[1]:
        raise ValueError(f"{name}: need 0 <= blur_prob <= 1 and blur_sigma = (min, max) >= 0")
    if not 0 <= c.color_jitter < 1:
        raise ValueError(f"{name}: color_jitter must be in [0, 1)")
    if random_scale and not crop_size:
        if not c.size:
            raise ValueError(
                f"{name}: random_scale={random_scale} needs crop_size or size to give the batches "
                "a fixed shape; set crop_size=(height, width) or size=(height, width)"
            )
        crop_size = tuple(c.size)
    return {
        "random_scale": random_scale,
        "crop_size": crop_size,
        "flip_prob": 0.5 if c.flip else 0.0,
        "blur_prob": float(c.blur_prob),
        "blur_sigma": blur_sigma,
        "color_jitter_strength": float(c.color_jitter),
        **retry,  # Crops re-drawn for mmseg's cat_max_ratio and DAFormer's rare classes.
    }


# Augmentation keys of a stream config that a view may override.
AUGMENTATION_KEYS = ("random_scale", "crop_size", "flip", "blur_prob", "blur_sigma", "color_jitter")
# Keys of a training example, which a view name would shadow.
RESERVED_VIEW_NAMES = ("image", "label", "box", "flip", "position", "index", "valid", "rcs_class")


def views(domain_config: ml_collections.ConfigDict) -> dict[str, dict | None] | None:
    """{view name: `stream` of the stream with the view's overrides}, or None when
    the stream has no `views` (a key read with a default: older configs lack it)."""
    views = domain_config.get("views")
    if not views:
        return None
    options = {}
    for name, overrides in views.items():
        unknown = sorted(set(overrides.keys()) - set(AUGMENTATION_KEYS))
        if name in RESERVED_VIEW_NAMES or unknown:
            raise ValueError(
                f"data stream {domain_config.name}:{domain_config.split}: view {name!r} must "
                f"not be named one of {RESERVED_VIEW_NAMES} and may only override "
                f"{AUGMENTATION_KEYS}; unknown: {unknown}"
            )
        view_config = domain_config.copy_and_resolve_references()
        for key, value in overrides.items():
            view_config[key] = value
        options[name] = stream(view_config)
    return options
