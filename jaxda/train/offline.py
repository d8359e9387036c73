"""Offline passes: a jit-compiled, sharded map of a network over every example of a split,
written as artifacts keyed by example index (pseudo labels, confidences, features).

Layout of a pass directory:
  chunks/batch_NNNNNNN.npz  one per batch while the pass runs (written atomically);
  <output>.npy              [num_examples, ...] per output, once every batch is done;
  manifest.json             written last: the checkpoint the outputs came from, the split,
                            the outputs' shapes and dtypes. Its presence means complete.
A rerun skips a complete pass whose manifest names the same source, resumes an interrupted
one after its last whole batch, and `load` refuses a pass without a manifest, so a resumed
run never redoes or half-reads one. Examples are read in split order (the evaluation
iterator: no augmentation, padded last batch); the example index is the position in the split.
"""

import json
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from jaxda import checkpoints, models
from jaxda import mesh as mesh_lib
from jaxda.data import input_pipeline
from jaxda.evaluation import evaluator as evaluator_lib
from jaxda.models.layers import resize_bilinear_align_corners

MANIFEST = "manifest.json"
CHUNKS = "chunks"


class IncompletePassError(FileNotFoundError):
    """An offline pass's outputs were read before the pass finished."""


def _chunk_path(out_dir: str, batch: int) -> str:
    return os.path.join(out_dir, CHUNKS, f"batch_{batch:07d}.npz")


def read_manifest(out_dir: str) -> dict | None:
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def map_split(
    fn: Callable,
    variables,
    stream_config: ml_collections.ConfigDict,
    data_config: ml_collections.ConfigDict,
    *,
    mesh,
    batch_size: int,
    out_dir: str,
    source: dict,
    log_every: int = 50,
) -> dict:
    """Runs `fn(variables, batch) -> {name: [b, ...]}` over a split; returns the manifest.

    Args:
      fn: traced once per batch shape; batch is {'image', 'label', 'valid'} (global arrays
        sharded over the batch).
      variables: replicated network variables.
      stream_config: a config.data stream (name, split, size, ...).
      source: JSON facts identifying the inputs (checkpoint, stream); a complete pass with the
        same `source` is skipped, one with another is refused.
    """
    manifest = read_manifest(out_dir)
    if manifest is not None:
        if manifest["source"] != source:
            raise ValueError(
                f"{out_dir} holds a finished pass of {manifest['source']}, not of {source}: "
                "remove it, or use another workdir"
            )
        logging.info("Offline pass %s is complete; skipping it.", out_dir)
        return manifest
    stream = ml_collections.ConfigDict(stream_config.to_dict())
    with stream.unlocked():
        stream.label_size = stream.get("label_size") or ()
    reader = input_pipeline.open_reader(stream, data_config)
    num_examples, batches = input_pipeline.eval_iterator(
        reader, stream, data_config, global_batch_size=batch_size
    )
    num_batches = -(-num_examples // batch_size)
    os.makedirs(os.path.join(out_dir, CHUNKS), exist_ok=True)
    done = 0
    while done < num_batches and os.path.exists(_chunk_path(out_dir, done)):
        done += 1
    if done:
        logging.info("Offline pass %s: resuming after %d of %d batches", out_dir, done, num_batches)
    step = jax.jit(fn, out_shardings=mesh_lib.replicated(mesh))
    start = time.time()
    for b, local in enumerate(batches):
        if b < done:
            continue
        batch = mesh_lib.to_global(local, mesh)
        outputs = jax.device_get(step(variables, batch))
        valid = multihost_utils.process_allgather(batch["valid"], tiled=True)
        if jax.process_index() == 0:
            tmp = _chunk_path(out_dir, b) + ".tmp.npz"
            np.savez(tmp, valid=valid, **outputs)
            os.replace(tmp, _chunk_path(out_dir, b))
        if (b + 1) % log_every == 0 or b + 1 == num_batches:
            rate = (b + 1 - done) / max(time.time() - start, 1e-9)
            logging.info(
                "Offline pass %s: %d/%d batches (%.1f/s, ETA %.0f s)",
                out_dir, b + 1, num_batches, rate, (num_batches - b - 1) / max(rate, 1e-9),
            )  # fmt: skip
    if jax.process_index() == 0:
        manifest = _consolidate(out_dir, num_batches, num_examples, source)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"jaxda offline pass {out_dir}")
    return read_manifest(out_dir)


def _consolidate(out_dir: str, num_batches: int, num_examples: int, source: dict) -> dict:
    """Chunks -> one [num_examples, ...] .npy per output, then the manifest, then cleanup."""
    arrays, written = {}, 0
    for b in range(num_batches):
        with np.load(_chunk_path(out_dir, b)) as chunk:
            valid = chunk["valid"]
            for name in chunk.files:
                if name == "valid":
                    continue
                values = chunk[name][valid]
                if name not in arrays:
                    arrays[name] = np.lib.format.open_memmap(
                        os.path.join(out_dir, f"{name}.npy.tmp"),
                        mode="w+",
                        dtype=values.dtype,
                        shape=(num_examples, *values.shape[1:]),
                    )
                arrays[name][written : written + len(values)] = values
            written += int(valid.sum())
    if written != num_examples:
        raise RuntimeError(f"Offline pass {out_dir}: {written} outputs for {num_examples} examples")
    outputs = {}
    for name, array in arrays.items():
        array.flush()
        outputs[name] = {"shape": list(array.shape), "dtype": str(array.dtype)}
        del array
        os.replace(os.path.join(out_dir, f"{name}.npy.tmp"), os.path.join(out_dir, f"{name}.npy"))
    manifest = {"source": source, "num_examples": num_examples, "outputs": outputs}
    evaluator_lib.write_results(manifest, os.path.join(out_dir, MANIFEST))
    for b in range(num_batches):
        os.remove(_chunk_path(out_dir, b))
    return manifest


def load(out_dir: str) -> dict[str, np.ndarray]:
    """{output: [num_examples, ...] read-only memory map} of a complete pass."""
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise IncompletePassError(
            f"No complete offline pass in {out_dir} (no {MANIFEST}): run its stage first; an "
            "interrupted pass resumes where it stopped"
        )
    return {
        name: np.load(os.path.join(out_dir, f"{name}.npy"), mmap_mode="r")
        for name in manifest["outputs"]
    }


def predictions_fn(model, head: str) -> Callable:
    """Pass function: {'pseudo_label': uint8 argmax, 'confidence': float16 max softmax}
    [b, H, W] of `head`, its logits upsampled to the input size (align corners)."""

    def fn(variables, batch):
        logits = model.apply(variables, batch["image"], train=False)[head]
        logits = resize_bilinear_align_corners(logits, batch["image"].shape[1:3])
        probs = jax.nn.softmax(logits, axis=-1)
        return {
            "pseudo_label": jnp.argmax(probs, axis=-1).astype(jnp.uint8),
            "confidence": jnp.max(probs, axis=-1).astype(jnp.float16),
        }

    return fn


def run_predictions_pass(config: ml_collections.ConfigDict, out_dir: str) -> dict:
    """The 'predictions' pass: the network of `config.init_from` on the stream
    `config.offline.stream` (e.g. 'target'), head `config.eval.head` (pseudo labels)."""
    if not config.init_from:
        raise ValueError("The 'predictions' offline pass needs config.init_from (a checkpoint)")
    mesh = mesh_lib.make_mesh(config.num_devices or None)
    model = models.build_segmenter(config.model, config.num_classes)
    abstract = mesh_lib.replicate_abstract(models.abstract_variables(model), mesh)
    step_dir = checkpoints.find_step_dir(config.init_from)
    variables, _ = checkpoints.restore_model_variables(
        step_dir, abstract, checkpoints.model_meta(config.model)
    )
    stream_name = config.offline.stream
    source = {
        "checkpoint": str(step_dir),
        "stream": config.data[stream_name].to_dict(),
        "head": config.eval.head,
    }
    return map_split(
        predictions_fn(model, config.eval.head),
        variables,
        config.data[stream_name],
        config.data,
        mesh=mesh,
        batch_size=config.offline.batch_size,
        out_dir=out_dir,
        source=json.loads(json.dumps(source)),
    )


PASSES = {"predictions": run_predictions_pass}
