"""RobustNet's class-uniform sampling (its datasets/uniform.py, the GTAVUniform dataset's
`build_epoch` / `__getitem__`, and RandomCrop with a centroid), as a pure function of
(stream seed, stream position).

Centroids: each label (train ids, original resolution) is cut into whole `tile` x `tile`
tiles; every class present in a tile gives one centroid (x, y), the tile's centre of mass of
that class, truncated to an integer, plus the tile's offset. (GTA5's 1914x1052 labels hold one
whole 1024 tile, so its centroids all lie in the top-left 1024x1024 pixels, as in RobustNet.)

Epochs: with N images, C classes and fraction p, an epoch is built as num_rand = N -
num_per_class * C distinct random images (no centroid), then, for every class with at least
one centroid, num_per_class = int(N * p / C) (image, centroid) items drawn from that class's
centroids in a shuffled order, wrapping around when it has fewer. Classes without centroids
are skipped, so the epoch has num_rand + num_per_class x (classes with centroids) <= N items.
RobustNet's sampler then shuffles the built list; here stream position k is item
`perm_e[k % L]` of epoch e = k // L's list, perm_e being `input_pipeline.sample_indices`'s
permutation of L. Every draw comes from (seed, epoch), so a resumed stream sees the same items.

The crop of a centroid item covers the centroid scaled with the image (`augment.crop`).
"""

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import tensorflow as tf
from absl import logging

from jaxda.data import classes, label_sampling, labels, sources

DEFAULTS = {"fraction": 0.5, "tile": 1024}  # RobustNet's CLASS_UNIFORM_PCT and _TILE.
NUM_CLASSES = labels.NUM_CLASSES  # RobustNet's num_classes: the 19 train ids (by default).
# Tag of the epoch draws' seeds: keeps them apart from the stream's other draws.
_SEED_TAG = 0xC0
_CACHE_FORMAT = 1
_NO_CENTROID = -1


def stream_options(config: Mapping | None, name: str) -> dict | None:
    """{'fraction', 'tile'} of a stream's `class_uniform` (defaults filled in); None when off."""
    if not config:
        return None
    unknown = sorted(set(config.keys()) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"{name}: class_uniform accepts only {sorted(DEFAULTS)}; got {unknown}")
    merged = {**DEFAULTS, **dict(config.items())}
    fraction, tile = merged["fraction"], merged["tile"]
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 1:
        raise ValueError(f"{name}: class_uniform.fraction must be in (0, 1]; got {fraction!r}")
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"{name}: class_uniform.tile must be a positive int; got {tile!r}")
    return {"fraction": float(fraction), "tile": tile}


def tile_centroids(label: np.ndarray, tile: int, num_classes: int) -> list[tuple[int, int, int]]:
    """(class, x, y) of every class in every whole tile of `label` [H, W] (train ids), tiles
    row by row, classes in increasing order; ids >= num_classes (255) give none.

    The centre of mass is scipy.ndimage.center_of_mass's (sums of pixel coordinates in
    float64, divided by the count; exact, as every partial sum is an integer < 2**53).
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"Expected a label [H, W]; got shape {label.shape}")
    rows, cols = (g.ravel().astype(np.float64) for g in np.indices((tile, tile)))
    centroids = []
    for y0 in range(0, label.shape[0] // tile * tile, tile):
        for x0 in range(0, label.shape[1] // tile * tile, tile):
            ids = label[y0 : y0 + tile, x0 : x0 + tile].ravel()
            counts = np.bincount(ids, minlength=num_classes)[:num_classes]
            sum_y = np.bincount(ids, weights=rows, minlength=num_classes)
            sum_x = np.bincount(ids, weights=cols, minlength=num_classes)
            for c in np.flatnonzero(counts):
                y, x = sum_y[c] / counts[c], sum_x[c] / counts[c]
                centroids.append((int(c), int(x) + x0, int(y) + y0))
    return centroids


class CentroidTable(NamedTuple):
    """A split's centroids, in image order, then `tile_centroids` order."""

    image: np.ndarray  # [M] int32: the image (reader index) of each centroid.
    class_id: np.ndarray  # [M] int32.
    x: np.ndarray  # [M] int32, in the original label's pixels.
    y: np.ndarray  # [M] int32.
    label_size: np.ndarray  # [N, 2] int32 (height, width) of every image's label.


def compute_table(
    label_pngs: Iterable[bytes], tile: int, num_classes: int, lookup: np.ndarray | None = None
) -> CentroidTable:
    """The centroids of encoded labels (decoded as the pipeline does, then mapped through the
    uint8 [256] `lookup` table of the stream's label_map if any; `label_sampling.map_labels`)."""

    def one(label):
        return label.shape, tile_centroids(label, tile, num_classes)

    results = label_sampling.map_labels(label_pngs, one, lookup)
    rows = [(i, *c) for i, (_, centroids) in enumerate(results) for c in centroids]
    columns = np.array(rows, np.int32).reshape(-1, 4).T
    sizes = np.array([shape for shape, _ in results], np.int32).reshape(-1, 2)
    return CentroidTable(*columns, label_size=sizes)


def _cache_meta(reader, label_map: str, tile: int, num_classes: int) -> dict:
    return label_sampling.split_meta(
        reader, label_map, num_classes, tile=tile, format=_CACHE_FORMAT
    )


def cache_path(dataset_dir: str, meta: dict) -> str:
    name = label_sampling.cache_name(meta, "class_centroids", f"-tile{meta['tile']}")
    return os.path.join(dataset_dir, name)


_CACHE_WHAT = "Class-uniform centroid cache"


def load_table(path: str, meta: dict) -> CentroidTable:
    """A cached table; a clear error if it was computed for another dataset / split / tile."""
    return CentroidTable(**label_sampling.load_arrays(path, meta, _CACHE_WHAT))


def cached_table(
    reader, dataset_dir: str, label_map: str, tile: int, lookup, num_classes: int = NUM_CLASSES
) -> CentroidTable:
    """The split's centroids, computed once and cached beside the prepared dataset: they depend
    on the labels only, so every run on the split shares them (as `sources` caches image ids).
    A read-only dataset directory is no error: the table is then recomputed per run."""
    meta = _cache_meta(reader, label_map, tile, num_classes)

    def compute():
        logging.info(
            "Class-uniform centroids of %s:%s (tile %d), once.", reader.name, reader.split, tile
        )
        labels_ = (reader[i]["label"] for i in range(len(reader)))
        return compute_table(labels_, tile, num_classes, lookup)._asdict()

    path = cache_path(dataset_dir, meta)
    return CentroidTable(**label_sampling.cached_arrays(path, meta, compute, _CACHE_WHAT))


def epoch_counts(num_images: int, num_classes: int, fraction: float) -> tuple[int, int]:
    """(num_rand, num_per_class) of RobustNet's `build_epoch`."""
    num_per_class = int(num_images * fraction / num_classes)
    return num_images - num_per_class * num_classes, num_per_class


class EpochItems(NamedTuple):
    """An epoch's items in build order: the random images first, then class by class."""

    image: np.ndarray  # [L] int64.
    class_id: np.ndarray  # [L] int64: the centroid's class; -1 for a random image.
    y: np.ndarray  # [L] int64: the centroid, in original label pixels; -1 for none.
    x: np.ndarray  # [L] int64.


def _rng(seed: Sequence[int], epoch: int, part: int) -> np.random.Generator:
    """Generator of one part of one epoch's draws (0: random images, 1 + c: class c), from
    (seed, epoch, part) alone: no draw depends on another part's."""
    key = (_SEED_TAG, int(epoch), int(part))
    return np.random.default_rng(np.random.SeedSequence([int(s) for s in seed], spawn_key=key))


def build_epoch(
    table: CentroidTable, num_classes: int, fraction: float, seed: Sequence[int], epoch: int
) -> EpochItems:
    """RobustNet's `build_epoch` for `epoch` of the stream with `seed` (unshuffled)."""
    num_images = len(table.label_size)
    num_rand, num_per_class = epoch_counts(num_images, num_classes, fraction)
    # RobustNet's `random_sampling`: shuffle, then take items cyclically.
    images = [_rng(seed, epoch, 0).permutation(num_images)[:num_rand]]
    picks = [np.full(num_rand, _NO_CENTROID, np.int64)]
    for c in range(num_classes):
        rows = np.flatnonzero(table.class_id == c)
        if len(rows) and num_per_class:
            order = _rng(seed, epoch, 1 + c).permutation(len(rows))
            chosen = rows[order[np.arange(num_per_class) % len(rows)]]
            images.append(table.image[chosen].astype(np.int64))
            picks.append(chosen)
    image, picked = np.concatenate(images), np.concatenate(picks)
    has = picked >= 0

    def column(values):
        return np.where(has, np.asarray(values, np.int64)[np.maximum(picked, 0)], _NO_CENTROID)

    return EpochItems(image, column(table.class_id), column(table.y), column(table.x))


class Plan:
    """A class-uniform stream: its centroid table and seed; epochs built on demand."""

    def __init__(
        self,
        table: CentroidTable,
        fraction: float,
        seed: Sequence[int],
        num_classes: int = NUM_CLASSES,
    ):
        self.table, self.fraction, self.num_classes = table, fraction, num_classes
        self.seed = tuple(int(s) for s in seed)
        num_rand, num_per_class = epoch_counts(len(table.label_size), num_classes, fraction)
        present = len(np.unique(table.class_id[table.class_id < num_classes]))
        self.epoch_length = num_rand + num_per_class * present  # Of every epoch.
        self._epoch, self._items = None, None

    def items(self, epoch: int) -> EpochItems:
        """`build_epoch` of `epoch`; the last one is kept (a stream's positions only grow)."""
        if epoch != self._epoch:
            self._items = build_epoch(self.table, self.num_classes, self.fraction, self.seed, epoch)
            self._epoch = epoch
        return self._items

    @property
    def signature(self) -> dict[str, tf.TensorSpec]:
        """The per-example field `example` adds (`label_sampling`'s plan contract)."""
        return {"centroid": tf.TensorSpec((4,), tf.int32)}

    def example(self, reader, position: int, index: int) -> dict[str, object]:
        """The encoded example of stream `position` whose shuffled index is `index`: item
        `index` of the position's epoch list, its image read, with its 'centroid' int32 [4]
        (y, x, label height, width) (y = x = -1: a random image) for `augment.augment`."""
        items = self.items(position // self.epoch_length)
        image = int(items.image[index])
        centroid = np.array([items.y[index], items.x[index], *self.table.label_size[image]])
        return {
            **reader[image],
            "position": position,
            "index": image,
            "centroid": centroid.astype(np.int32),
        }


def load_plan(
    reader, domain_config, data_config, seed: Sequence[int], label_table: Callable
) -> Plan | None:
    """The `Plan` of a training stream with `class_uniform`, else None.

    label_table: label_map name -> uint8 [256] lookup table or None (the pipeline's own).
    """
    name = f"data stream {domain_config.name}:{domain_config.split}"
    settings = stream_options(domain_config.get("class_uniform"), name)
    if settings is None:
        return None
    if (domain_config.get("importance") or {}).get("weights"):
        raise ValueError(f"{name}: class_uniform and importance sampling exclude each other")
    if not (domain_config.crop_size or (domain_config.random_scale and domain_config.size)):
        raise ValueError(f"{name}: class_uniform needs a random crop; set crop_size")
    dataset_dir = os.fspath(sources.get_builder(reader.name, data_config.data_dir).data_dir)
    lookup = label_table(domain_config.label_map)
    # RobustNet's num_classes: the classes of the dataset (Cityscapes' 19 unless prepared
    # from folders with its own class set).
    num_classes = classes.of_dataset_dir(dataset_dir).num_classes
    table = cached_table(
        reader, dataset_dir, domain_config.label_map, settings["tile"], lookup, num_classes
    )
    if not len(table.image):
        sizes = sorted({tuple(s) for s in table.label_size.tolist()})[:3]
        raise ValueError(
            f"{name}: no class-uniform centroids: class_uniform.tile={settings['tile']} has no "
            f"whole tile in labels of (height, width) {sizes}...; use a tile <= the label size"
        )
    return Plan(table, settings["fraction"], seed, num_classes)
