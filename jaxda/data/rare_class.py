"""DAFormer's Rare Class Sampling (RCS; its mmseg/datasets/uda_dataset.py `get_rcs_class_probs`
and `UDADataset.get_rare_class_sample`, statistics from tools/convert_datasets/gta.py), as a
pure function of (stream seed, stream position).

Statistics: n_ic, the pixels of class c in source image i at the label's ORIGINAL resolution
(train ids < num_classes; 255 and other ids are not counted), computed once and cached beside
the prepared dataset (`cached_counts`).

Classes: n_c = sum_i n_ic, f_c = n_c / sum_c n_c over the classes that occur (n_c > 0; a class
that never occurs is never drawn, as in DAFormer, whose statistics do not list it), and

    P(c) = softmax_c((1 - f_c) / T)        (T: `temperature`, DAFormer's class_temp 0.01).

Candidates of class c: the images with n_ic > min_pixels (strictly; 3000). DAFormer asserts
that every occurring class has one; here P is instead renormalised over the classes with at
least one candidate (the softmax restricted to them), and only a split where no class has one
is an error.

Stream position k draws c ~ P, then an image uniformly among c's candidates (DAFormer's two
`np.random.choice`), by inverse CDF from two uniforms of a generator seeded by (seed, block of
k): every draw is a pure function of (seed, k), so a resumed stream sees the same items. The
drawn class travels with the example ('rcs_class', also reported in the batch) to the decode,
where `crop_retry` re-draws the crop (DAFormer re-runs the pipeline) until it holds more than
min_pixels * min_crop_ratio pixels of c (1500). A stream with `views` retries each view's crop
on its own (from the view's seed); a view without a crop is not retried.

Scale: min_pixels compares full-resolution counts (GTA5: 1914x1052), while the crop's count
is taken on the label as the crop sees it, after the stream's resize / random scale (DAFormer:
GTA5 resized to 1280x720, i.e. about 704x1280, then a 512x512 crop), as in DAFormer's code.
So an image with just over 3000 pixels of c at 1914x1052 keeps about 0.45 x 3000 = 1340 of
them at 704x1280, fewer than the 1500 a crop needs: its runs all fail, and the 11th is kept.
"""

import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from jaxda.data import classes, label_sampling, sources

# DAFormer's rare_class_sampling config (configs/daformer/*_rcs*.py).
DEFAULTS = {"temperature": 0.01, "min_pixels": 3000, "min_crop_ratio": 0.5}
# Tag of the class / image draws' seeds: keeps them apart from the stream's other draws.
_SEED_TAG = 0x5C
# Positions drawn per generator: draws are vectorised over a block, and a block's draws depend
# only on (seed, block). Changing it changes the drawn items.
_BLOCK = 4096
_CACHE_FORMAT = 1
_CACHE_WHAT = "Rare-class count cache"


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def stream_options(config: Mapping | None, name: str) -> dict | None:
    """{'temperature', 'min_pixels', 'min_crop_ratio'} of a stream's `rare_class` (defaults
    filled in); None when off ({})."""
    if not config:
        return None
    unknown = sorted(set(config.keys()) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"{name}: rare_class accepts only {sorted(DEFAULTS)}; got {unknown}")
    merged = {**DEFAULTS, **dict(config.items())}
    temperature, min_pixels, ratio = (merged[k] for k in DEFAULTS)
    if not _number(temperature) or not temperature > 0:
        raise ValueError(f"{name}: rare_class.temperature must be > 0; got {temperature!r}")
    if isinstance(min_pixels, bool) or not isinstance(min_pixels, int) or min_pixels < 0:
        raise ValueError(f"{name}: rare_class.min_pixels must be an int >= 0; got {min_pixels!r}")
    if not _number(ratio) or not ratio >= 0:
        raise ValueError(f"{name}: rare_class.min_crop_ratio must be >= 0; got {ratio!r}")
    return {"temperature": float(temperature), "min_pixels": min_pixels, "min_crop_ratio": ratio}


def min_crop_pixels(domain_config, name: str) -> float | None:
    """The crop retry's threshold of a stream: a crop is kept once it has more than this many
    pixels of the example's rare class; None: no retry (RCS off, or min_crop_ratio 0, as
    DAFormer's `if self.rcs_min_crop_ratio > 0`)."""
    settings = stream_options(domain_config.get("rare_class"), name)
    if settings is None or not settings["min_crop_ratio"] > 0:
        return None
    return float(settings["min_pixels"] * settings["min_crop_ratio"])


def class_counts(label: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 [num_classes]: the pixels of each class in `label` [H, W]; ids >= num_classes
    (255) are not counted."""
    return np.bincount(np.asarray(label).ravel(), minlength=256)[:num_classes].astype(np.int64)


def cached_counts(reader, dataset_dir: str, label_map: str, lookup, num_classes: int) -> np.ndarray:
    """int64 [N, num_classes]: `class_counts` of every label of the split (at its original
    resolution, mapped through the uint8 [256] `lookup` of the stream's label_map if any),
    computed once and cached beside the prepared dataset (`label_sampling.cached_arrays`)."""
    meta = label_sampling.split_meta(reader, label_map, num_classes, format=_CACHE_FORMAT)
    path = os.path.join(dataset_dir, label_sampling.cache_name(meta, "rare_class_counts"))

    def compute():
        logging.info("Rare-class pixel counts of %s:%s, once.", reader.name, reader.split)
        pngs = (reader[i]["label"] for i in range(len(reader)))
        rows = label_sampling.map_labels(pngs, lambda a: class_counts(a, num_classes), lookup)
        return {"counts": np.array(rows, np.int64).reshape(-1, num_classes)}

    return label_sampling.cached_arrays(path, meta, compute, _CACHE_WHAT)["counts"]


def class_probabilities(counts: np.ndarray, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """(classes int64 [K], P float64 [K]): DAFormer's `get_rcs_class_probs` from per-image
    counts [N, C]: the K classes with n_c > 0 in increasing id order (DAFormer sorts them by
    n_c, which only reorders), P = softmax((1 - f_c) / temperature), f_c = n_c / sum n_c.
    In float64 (DAFormer: float32)."""
    totals = np.asarray(counts, np.int64).sum(axis=0)
    present = np.flatnonzero(totals > 0)
    if not len(present):
        raise ValueError("No labelled pixel of any class: rare-class sampling has nothing to draw")
    logits = (1.0 - totals[present] / totals[present].sum()) / temperature
    weights = np.exp(logits - logits.max())
    return present.astype(np.int64), weights / weights.sum()


def candidates(counts: np.ndarray, class_ids: np.ndarray, min_pixels: int) -> list[np.ndarray]:
    """For each class id: int64 [n_c] the images with more than `min_pixels` of it, in order."""
    counts = np.asarray(counts)
    return [np.flatnonzero(counts[:, c] > min_pixels).astype(np.int64) for c in class_ids]


class Plan:
    """A rare-class stream: which class and image each position draws (`label_sampling`'s
    plan contract).

    classes [K'] / probabilities [K']: the classes with candidates and their renormalised P;
    images: their candidates, concatenated, class k's at images[start[k] : start[k + 1]].
    """

    def __init__(
        self,
        counts: np.ndarray,
        seed: Sequence[int],
        temperature: float = DEFAULTS["temperature"],
        min_pixels: int = DEFAULTS["min_pixels"],
        name: str = "rare_class",
    ):
        class_ids, probabilities = class_probabilities(counts, temperature)
        per_class = candidates(counts, class_ids, min_pixels)
        keep = np.array([len(c) > 0 for c in per_class])
        if not keep.any():
            raise ValueError(
                f"{name}: no image has more than rare_class.min_pixels={min_pixels} pixels of "
                f"any class (the most is {int(np.max(counts, initial=0))}); lower min_pixels"
            )
        self.classes = class_ids[keep]
        self.probabilities = probabilities[keep] / probabilities[keep].sum()
        self.images = np.concatenate([c for c in per_class if len(c)])
        self.start = np.cumsum([0] + [len(c) for c in per_class if len(c)])
        self.seed = tuple(int(s) for s in seed)
        self.epoch_length = len(counts)  # Positions are drawn afresh: any length serves.
        cdf = np.cumsum(self.probabilities)
        self._cdf = cdf / cdf[-1]
        self._block, self._items = None, None

    def block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """(class ids, images), int64 [_BLOCK] each, of positions block * _BLOCK onwards."""
        sequence = np.random.SeedSequence(self.seed, spawn_key=(_SEED_TAG, int(block)))
        u = np.random.default_rng(sequence).random((2, _BLOCK))
        # Inverse CDF: the first class whose cumulative probability exceeds u.
        k = np.minimum(np.searchsorted(self._cdf, u[0], side="right"), len(self._cdf) - 1)
        num = self.start[k + 1] - self.start[k]
        pick = np.minimum((u[1] * num).astype(np.int64), num - 1)
        return self.classes[k], self.images[self.start[k] + pick]

    def item(self, position: int) -> tuple[int, int]:
        """(class id, image) of stream `position`; the last block is kept (positions grow)."""
        block, offset = divmod(int(position), _BLOCK)
        if block != self._block:
            self._items, self._block = self.block(block), block
        return int(self._items[0][offset]), int(self._items[1][offset])

    @property
    def signature(self) -> dict[str, tf.TensorSpec]:
        """The per-example field `example` adds."""
        return {"rcs_class": tf.TensorSpec((), tf.int64)}

    def example(self, reader, position: int, index: int) -> dict[str, object]:
        """The encoded example of stream `position` (the shuffled `index` is not used): its
        drawn image, as 'index', and class, as 'rcs_class'."""
        del index  # Every position draws afresh, as DAFormer's `get_rare_class_sample`.
        class_id, image = self.item(position)
        return {**reader[image], "position": position, "index": image, "rcs_class": class_id}


def load_plan(
    reader, domain_config, data_config, seed: Sequence[int], label_table: Callable
) -> Plan | None:
    """The `Plan` of a training stream with `rare_class`, else None.

    label_table: label_map name -> uint8 [256] lookup table or None (the pipeline's own).
    """
    name = f"data stream {domain_config.name}:{domain_config.split}"
    settings = stream_options(domain_config.get("rare_class"), name)
    if settings is None:
        return None
    if domain_config.get("class_uniform"):
        raise ValueError(f"{name}: rare_class and class_uniform sampling exclude each other")
    if (domain_config.get("importance") or {}).get("weights"):
        raise ValueError(f"{name}: rare_class and importance sampling exclude each other")
    dataset_dir = os.fspath(sources.get_builder(reader.name, data_config.data_dir).data_dir)
    num_classes = classes.of_dataset_dir(dataset_dir).num_classes
    lookup = label_table(domain_config.label_map)
    counts = cached_counts(reader, dataset_dir, domain_config.label_map, lookup, num_classes)
    plan = Plan(counts, seed, settings["temperature"], settings["min_pixels"], name)
    logging.info(
        "%s: rare classes %s, probabilities %s",
        name,
        plan.classes.tolist(),
        np.round(plan.probabilities, 4).tolist(),
    )
    return plan
