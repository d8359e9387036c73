"""What the label-driven samplers (`class_uniform`: RobustNet, `rare_class`: DAFormer) share.

1. Per-split label statistics, computed once from the labels and cached beside the prepared
   dataset: `map_labels` decodes a split's labels in parallel; `cached_arrays` writes the
   arrays atomically with the `split_meta` they were computed for, and refuses (naming the
   file, saying to delete it) a cache whose meta differs.
2. Sampling plans: a plan maps each stream position to an image of the split plus per-example
   fields (RobustNet's centroid, DAFormer's rare class) that the decode reads. A plan has
   `epoch_length` (the stream's epoch, for `input_pipeline.sample_indices`), `signature`
   ({field: tf.TensorSpec}) and `example(reader, position, index)` -> the encoded example
   {'image', 'label', 'position', 'index' (the image), **fields}. `examples`, `signature` and
   `with_fields` are the stream's side of that contract, with or without a plan.
"""

import concurrent.futures
import itertools
import os
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np
import tensorflow as tf
from absl import logging

# Example fields that are also `augment` options of the example's views (see `with_fields`).
DECODE_FIELDS = ("centroid", "rcs_class")


def map_labels(
    label_pngs: Iterable[bytes], fn: Callable[[np.ndarray], object], lookup: np.ndarray | None
) -> list:
    """[fn(label) for every encoded label], each decoded as the pipeline does ([H, W] uint8),
    then mapped through the uint8 [256] `lookup` table of the stream's label_map if any.

    Threads decode in parallel, a chunk of labels at a time, so that a large split (GTA5's
    24,966 labels) is never held in memory at once.
    """

    def one(png: bytes):
        label = tf.io.decode_png(png, channels=1).numpy()[..., 0]
        return fn(label if lookup is None else lookup[label])

    results, pngs = [], iter(label_pngs)
    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        while chunk := list(itertools.islice(pngs, 256)):
            results.extend(pool.map(one, chunk))
    return results


def split_meta(reader, label_map: str, num_classes: int, **extra) -> dict:
    """What a split's label statistics depend on: the labels read (dataset, split, subset,
    label key and map, number of images), the classes counted, and `extra` settings."""
    return {
        "dataset": reader.name,
        "split": reader.split,
        "subset": reader.subset,
        "label_key": reader.label_key,
        "label_map": label_map,
        **extra,
        "num_classes": num_classes,
        "num_images": len(reader),
    }


def load_arrays(path: str, meta: dict, what: str) -> dict[str, np.ndarray]:
    """The arrays of a cache file; a clear error, naming the file, if it was computed for
    another meta. what: the kind of cache, for the error ('Class-uniform centroid cache')."""
    with np.load(path) as data:
        stored = {k: data[f"meta_{k}"].item() for k in meta if f"meta_{k}" in data}
        if stored != meta:
            raise ValueError(
                f"{what} {path} belongs to {stored}, not to {meta}; delete it to recompute"
            )
        return {f: data[f] for f in data.files if not f.startswith("meta_")}


def cached_arrays(
    path: str, meta: dict, compute: Callable[[], Mapping[str, np.ndarray]], what: str
) -> dict[str, np.ndarray]:
    """compute()'s arrays, cached at `path` with `meta`: read back when present (checked by
    `load_arrays`), else computed and written atomically. A read-only dataset directory is no
    error: the arrays are then recomputed per run."""
    if os.path.exists(path):
        return load_arrays(path, meta, what)
    arrays = dict(compute())
    # Host and pid: processes on several hosts may share the directory, and pids repeat.
    tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}.npz"
    try:
        np.savez(tmp, **arrays, **{f"meta_{k}": v for k, v in meta.items()})
        os.replace(tmp, path)  # Atomic: concurrent processes write the same arrays.
    except OSError as error:  # E.g. a read-only dataset directory.
        logging.warning("Could not cache the %s at %s: %s", what, path, error)
        if os.path.exists(tmp):
            os.remove(tmp)
    return arrays


def cache_name(meta: dict, prefix: str, suffix: str = "") -> str:
    """`prefix`-split[-subset]-label_map[suffix].npz: one file per split, subset and map."""
    subset = f"-{meta['subset']}" if meta["subset"] else ""
    return f"{prefix}-{meta['split']}{subset}-{meta['label_map'] or 'train_ids'}{suffix}.npz"


def examples(reader, samples: Iterable[tuple[int, int]], plan) -> Iterator[dict[str, object]]:
    """Encoded training examples {'image', 'label', 'position', 'index', ...} of (position,
    index) `samples`; with a plan, the plan's example of each position (its image, fields)."""
    for position, index in samples:
        if plan is None:
            yield {**reader[index], "position": position, "index": index}
        else:
            yield plan.example(reader, position, index)


def signature(plan) -> dict[str, tf.TensorSpec]:
    """The extra features `examples` yields."""
    return {} if plan is None else dict(plan.signature)


def with_fields(example: Mapping, options: dict | None, views: dict | None):
    """(options, views) of `crop_retry.augment_view` with the example's `DECODE_FIELDS`, if any."""
    fields = {k: example[k] for k in DECODE_FIELDS if k in example}
    if not fields:
        return options, views
    options = None if options is None else {**options, **fields}
    views = None if views is None else {k: v and {**v, **fields} for k, v in views.items()}
    return options, views
