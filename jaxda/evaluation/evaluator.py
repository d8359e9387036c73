"""Evaluation of a segmentation network on a labelled split: confusion matrix -> IoUs.

Runs without the trainer: it needs only a model, its variables and config.data / config.eval.
"""

import collections
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from jaxda import mesh as mesh_lib
from jaxda.data import classes, input_pipeline
from jaxda.evaluation import inference, metrics, visualize

RESULTS_FILE = "results.json"  # A run's summary, in its workdir.


class Evaluator:
    """Evaluation of one head on the evaluation split, with the inference mode of
    config.eval.mode (`inference`); predictions are made at the label resolution.

    Attributes:
      protocol: what was measured (dataset, split, input and label sizes, head, inference mode
        and its settings), recorded in every result.
    """

    def __init__(self, model, config: ml_collections.ConfigDict, mesh):
        self._model = model
        self._config = config
        self._mesh = mesh
        eval_config = config.data.eval
        mesh_lib.check_batch_size(eval_config.batch_size, mesh, "data.eval.batch_size")
        self._reader = input_pipeline.open_reader(eval_config, config.data)
        self._num_classes = config.num_classes
        self._head = config.eval.head
        self._settings = inference.Settings.from_config(config.eval)
        self._confusion_fn = jax.jit(
            self._batch_confusion,
            out_shardings=(mesh_lib.replicated(mesh), mesh_lib.batch_sharded(mesh)),
        )
        self.protocol = {
            "dataset": eval_config.name,
            "split": eval_config.split,
            "input_size": list(eval_config.size) if eval_config.size else "original",
            "label_size": list(eval_config.label_size) if eval_config.label_size else "original",
            # An evaluation transform replaces the resizing (e.g. RobustNet's Mapillary crop).
            **({"transform": eval_config.transform} if eval_config.get("transform") else {}),
            "head": self._head,
            "upsampling": "bilinear, align_corners=True",
            **self._settings.protocol(),
            "evaluated_classes": classes.names_for(config, self.evaluated_classes),
        }

    @property
    def evaluated_classes(self) -> list[int]:
        classes = self._config.eval.classes
        return list(classes) if classes else list(range(self._num_classes))

    def _batch_confusion(self, members, weights, images, labels):
        """(confusion, uint8 predictions) of the mode's argmax at the label resolution; the
        logits of each forward are sum_i weights[i] * logits of members[i]."""
        apply_fn = inference.ensemble_apply_fn(self._model, members, weights, self._head)
        scores = inference.scores(apply_fn, images, labels.shape[1:3], self._settings)
        predictions = jnp.argmax(scores, axis=-1)
        confusion = metrics.confusion_matrix(labels, predictions, self._num_classes)
        return confusion, predictions.astype(jnp.uint8)

    def confusion(
        self, variables, weights=None, num_visuals: int = 0
    ) -> tuple[np.ndarray, int, dict[str, np.ndarray]]:
        """(int64 [C, C] confusion over the whole split, number of examples, visuals).

        `variables` is one network's variables, or a list of several whose logits are averaged
        with `weights` (ADVENT's logit ensemble). `visuals` holds the first `num_visuals`
        examples as {'image', 'label', 'prediction'} (global, on the host), from the same pass.
        """
        members = list(variables) if isinstance(variables, list | tuple) else [variables]
        weights = jnp.asarray([1.0] * len(members) if weights is None else weights, jnp.float32)
        eval_config = self._config.data.eval
        num_examples, batches = input_pipeline.eval_iterator(
            self._reader, eval_config, self._config.data, global_batch_size=eval_config.batch_size
        )
        num_visuals = min(num_visuals, num_examples)
        total = np.zeros((self._num_classes, self._num_classes), np.int64)
        visuals = collections.defaultdict(list)
        collected = 0
        for local_batch in batches:
            batch = mesh_lib.to_global(local_batch, self._mesh)
            confusion, predictions = self._confusion_fn(
                members, weights, batch["image"], batch["label"]
            )
            total += np.asarray(jax.device_get(confusion), np.int64)
            # Mixed image sizes: visuals of the first size only, without padded examples.
            size = visuals["image"][0].shape[1:] if visuals else batch["image"].shape[1:]
            if collected < num_visuals and batch["image"].shape[1:] == size:
                real = multihost_utils.process_allgather(batch["valid"], tiled=True)
                for key, value in (
                    ("image", batch["image"]),
                    ("label", batch["label"]),
                    ("prediction", predictions),
                ):
                    visuals[key].append(multihost_utils.process_allgather(value, tiled=True)[real])
                collected += len(visuals["image"][-1])
        visuals = {k: np.concatenate(v)[:num_visuals] for k, v in visuals.items()}
        return total, num_examples, visuals

    def run(self, variables, step: int, weights=None) -> dict:
        """Evaluates `variables` (see `confusion`); returns JSON-able results with step, mIoU
        (%), per-class IoU and the protocol."""
        return self.run_with_visuals(variables, step, weights, num_visuals=0)[0]

    def run_with_visuals(
        self, variables, step: int, weights=None, num_visuals: int | None = None
    ) -> tuple[dict, dict[str, np.ndarray]]:
        """(`run`'s results, {'eval/predictions': uint8 [n, H, 3W, 3]}: input | prediction |
        ground truth of the first `num_visuals` (config.eval.num_visuals when None) examples,
        in Cityscapes colours; {} for none)."""
        if num_visuals is None:
            num_visuals = self._config.eval.num_visuals
        start = time.time()
        confusion, num_examples, examples = self.confusion(variables, weights, num_visuals)
        results = self.results_from_confusion(confusion, step, num_examples)
        results["seconds"] = round(time.time() - start, 2)
        logging.info(
            "Evaluated step %d on %d examples: mIoU %.2f", step, num_examples, results["miou"]
        )
        images = {}
        if examples:
            images["eval/predictions"] = visualize.panels(
                examples["image"],
                examples["prediction"],
                examples["label"],
                self._config.data,
                classes.from_config(self._config),
            )
        return results, images

    def results_from_confusion(self, confusion: np.ndarray, step: int, num_examples=None) -> dict:
        """JSON-able results of an int64 [C, C] confusion matrix: mIoU (%) over the evaluated
        classes, the named subsets, per-class IoU, the step and the protocol."""
        names = classes.names_for(self._config)[: self._num_classes]
        results = metrics.summarize(
            confusion,
            names,
            self.evaluated_classes,
            subsets=dict(self._config.eval.class_subsets or {}),
        )
        results.update(step=int(step), protocol=dict(self.protocol))
        if num_examples is not None:
            results["num_examples"] = num_examples
        return results


def write_results(results: dict, path: str) -> None:
    """Writes `results` as JSON atomically (write to a temporary file, then rename)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
