"""Offline passes: a jit-compiled, sharded map of a network over every example of a split,
written as artifacts keyed by example index (pseudo labels, confidences, features).

Layout of a pass directory:
  chunks/batch_NNNNNNN.npz  one per batch while the pass runs (written atomically);
  <output>.npy              [num_examples, ...] per output, once every batch is done;
  <reduced>.npy             whole-split results a pass derives from the per-example outputs
                            (ProDA's prototypes), written before the manifest;
  manifest.json             written last: the checkpoint the outputs came from, the split,
                            the outputs' shapes and dtypes, the pass's summary (e.g. the
                            pseudo labels' agreement with the split's labels). Its presence
                            means complete.
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
from jaxda.data.labels import IGNORE_LABEL
from jaxda.evaluation import evaluator as evaluator_lib
from jaxda.models.layers import resize_bilinear_align_corners

MANIFEST = "manifest.json"
CHUNKS = "chunks"


# Per-example outputs of `label_agreement`: summarised in the manifest, not joined to streams.
AGREEMENT_COUNTS = ("labelled", "correct", "confident", "confident_correct")


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
    finalize: Callable | None = None,
) -> dict:
    """Runs `fn(variables, batch) -> {name: [b, ...]}` over a split; returns the manifest.

    Args:
      fn: traced once per batch shape; batch is {'image', 'label', 'valid'} (global arrays
        sharded over the batch).
      variables: replicated network variables.
      stream_config: a config.data stream (name, split, size, ...).
      source: JSON facts identifying the inputs (checkpoint, stream); a complete pass with the
        same `source` is skipped, one with another is refused.
      finalize: `{output: [num_examples, ...] array} -> ({name: array}, summary dict)`, run
        once all batches are written: whole-split results (`load_reduced`) and JSON facts for
        the manifest's 'summary'.
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
        manifest = _consolidate(out_dir, num_batches, num_examples, source, finalize)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"jaxda offline pass {out_dir}")
    return read_manifest(out_dir)


def _save_atomic(path: str, array: np.ndarray) -> None:
    with open(path + ".tmp", "wb") as f:
        np.save(f, array)
    os.replace(path + ".tmp", path)


def _consolidate(
    out_dir: str, num_batches: int, num_examples: int, source: dict, finalize=None
) -> dict:
    """Chunks -> one [num_examples, ...] .npy per output (and the finalize results), then the
    manifest, then cleanup."""
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
    if finalize is not None:
        per_example = {
            n: np.load(os.path.join(out_dir, f"{n}.npy"), mmap_mode="r") for n in outputs
        }
        reduced, summary = finalize(per_example)
        for name, array in reduced.items():
            _save_atomic(os.path.join(out_dir, f"{name}.npy"), np.asarray(array))
        manifest["reduced"] = {
            n: {"shape": list(np.shape(a)), "dtype": str(np.asarray(a).dtype)}
            for n, a in reduced.items()
        }
        manifest["summary"] = summary
    evaluator_lib.write_results(manifest, os.path.join(out_dir, MANIFEST))
    for b in range(num_batches):
        os.remove(_chunk_path(out_dir, b))
    return manifest


def load(out_dir: str) -> dict[str, np.ndarray]:
    """{output: [num_examples, ...] read-only memory map} of a complete pass: what a stream
    with `artifacts` joins to its examples. The label-agreement counts are monitoring only
    (summarised in the manifest), so they are left out and never reach a train step."""
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise IncompletePassError(
            f"No complete offline pass in {out_dir} (no {MANIFEST}): run its stage first; an "
            "interrupted pass resumes where it stopped"
        )
    return {
        name: np.load(os.path.join(out_dir, f"{name}.npy"), mmap_mode="r")
        for name in manifest["outputs"]
        if name not in AGREEMENT_COUNTS
    }


def label_agreement(pseudo_label, label, confident=None, ignore_label: int = IGNORE_LABEL):
    """Per-example pixel counts [b] int32 of a pseudo label [b, h, w] against the split's
    labels [b, H, W] (nearest-resized to them): 'labelled', 'correct', and with a `confident`
    mask [b, h, w] 'confident' (labelled and confident) and 'confident_correct'. Monitoring
    only: no method trains on the target labels."""
    size = label.shape[1:3]
    if pseudo_label.shape[1:3] != size:
        pseudo_label = jax.image.resize(pseudo_label, pseudo_label.shape[:1] + size, "nearest")
        if confident is not None:
            confident = jax.image.resize(confident, confident.shape[:1] + size, "nearest")
    labelled = label != ignore_label
    correct = labelled & (pseudo_label.astype(jnp.int32) == label.astype(jnp.int32))
    counts = {"labelled": labelled, "correct": correct}
    if confident is not None:
        counts.update(confident=labelled & confident, confident_correct=correct & confident)
    return {k: jnp.sum(v, axis=(1, 2), dtype=jnp.int32) for k, v in counts.items()}


def agreement_summary(outputs: dict) -> dict:
    """{'pseudo_label_accuracy', and with confidence counts 'confident_accuracy' and
    'coverage'} over the split, from `label_agreement`'s per-example counts."""
    total = {k: int(np.sum(outputs[k], dtype=np.int64)) for k in outputs if k in AGREEMENT_COUNTS}
    if not total.get("labelled"):
        return {}
    summary = {"pseudo_label_accuracy": total["correct"] / total["labelled"]}
    if "confident" in total:
        summary["coverage"] = total["confident"] / total["labelled"]
        summary["confident_accuracy"] = total["confident_correct"] / max(total["confident"], 1)
    return summary


def softmax_at_input_size(model, variables, images, head: str, flip: bool) -> jax.Array:
    """[b, H, W, C] softmax of `head` upsampled (align corners) to the input size; with
    `flip`, averaged with the mirrored pass mirrored back (ProDA's generate_pseudo_label.py
    --flip averages the upsampled softmaxes)."""

    def probs(x):
        logits = model.apply(variables, x, train=False)[head]
        return jax.nn.softmax(resize_bilinear_align_corners(logits, x.shape[1:3]), axis=-1)

    result = probs(images)
    if flip:
        result = 0.5 * (result + probs(images[:, :, ::-1])[:, :, ::-1])
    return result


def predictions_fn(model, config: ml_collections.ConfigDict) -> Callable:
    """Pass function: {'pseudo_label': uint8 argmax, 'confidence': float16 max softmax}
    [b, H, W] of head `config.eval.head` at the input size (`offline.flip`: flip-averaged),
    and the `label_agreement` counts with confidence > `offline.confidence_threshold`."""
    head, flip = config.eval.head, config.offline.get("flip", False)
    threshold = config.offline.get("confidence_threshold", 0.0)

    def fn(variables, batch):
        probs = softmax_at_input_size(model, variables, batch["image"], head, flip)
        pseudo, confidence = jnp.argmax(probs, axis=-1), jnp.max(probs, axis=-1)
        counts = label_agreement(pseudo, batch["label"], confidence > threshold)
        return {
            "pseudo_label": pseudo.astype(jnp.uint8),
            "confidence": confidence.astype(jnp.float16),
            **counts,
        }

    return fn


def restore_network(config: ml_collections.ConfigDict, mesh):
    """(module, replicated variables, step dir) of the network `config.init_from` holds."""
    if not config.init_from:
        raise ValueError("An offline pass needs config.init_from (a workdir or checkpoint)")
    model = models.build_segmenter(config.model, config.num_classes)
    abstract = mesh_lib.replicate_abstract(models.abstract_variables(model), mesh)
    step_dir = checkpoints.find_step_dir(config.init_from)
    variables, _ = checkpoints.restore_model_variables(
        step_dir, abstract, checkpoints.model_meta(config.model)
    )
    return model, variables, step_dir


def run_network_pass(
    config: ml_collections.ConfigDict, out_dir: str, make_fn: Callable, finalize=None
) -> dict:
    """Maps `make_fn(model, config)` of the network of `config.init_from` over the stream
    `config.offline.stream`, in batches of `config.offline.batch_size` (see `map_split`)."""
    mesh = mesh_lib.make_mesh(config.num_devices or None)
    model, variables, step_dir = restore_network(config, mesh)
    stream_name = config.offline.stream
    source = {
        "checkpoint": str(step_dir),
        "stream": config.data[stream_name].to_dict(),
        "offline": config.offline.to_dict(),
        "head": config.eval.head,
    }
    return map_split(
        make_fn(model, config),
        variables,
        config.data[stream_name],
        config.data,
        mesh=mesh,
        batch_size=config.offline.batch_size,
        out_dir=out_dir,
        source=json.loads(json.dumps(source)),
        finalize=finalize,
    )


def run_predictions_pass(config: ml_collections.ConfigDict, out_dir: str) -> dict:
    """The 'predictions' pass: hard pseudo labels and confidences of the network of
    `config.init_from` on the stream `config.offline.stream` (e.g. 'target')."""
    return run_network_pass(
        config, out_dir, predictions_fn, lambda outputs: ({}, agreement_summary(outputs))
    )


def load_reduced(out_dir: str) -> dict[str, np.ndarray]:
    """{name: array} of the whole-split results of a complete pass (`map_split`'s finalize)."""
    manifest = read_manifest(out_dir)
    if manifest is None:
        load(out_dir)  # Raises IncompletePassError with its message.
    return {n: np.load(os.path.join(out_dir, f"{n}.npy")) for n in manifest.get("reduced", {})}


# Offline passes by name (config.offline.pass); methods add theirs (`register`).
PASSES = {"predictions": run_predictions_pass}


def register(name: str, run_pass: Callable) -> None:
    """Makes `run_pass(config, out_dir) -> manifest` available as config.offline.pass=name."""
    PASSES[name] = run_pass
