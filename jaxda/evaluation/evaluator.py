"""Evaluation of a segmentation network on a labelled split: confusion matrix -> IoUs.

Runs without the trainer: it needs only a model, its variables and config.data / config.eval.
"""

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from jaxda import mesh as mesh_lib
from jaxda.data import input_pipeline
from jaxda.data import labels as labels_lib
from jaxda.evaluation import metrics
from jaxda.models.layers import resize_bilinear_align_corners


class Evaluator:
    """Whole-image evaluation of one head, with logits upsampled to the label resolution.

    Attributes:
      protocol: what was measured (dataset, split, input and label sizes, head), recorded in
        every result.
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
        self._confusion_fn = jax.jit(self._batch_confusion, out_shardings=mesh_lib.replicated(mesh))
        self.protocol = {
            "dataset": eval_config.name,
            "split": eval_config.split,
            "input_size": list(eval_config.size) if eval_config.size else "original",
            "label_size": list(eval_config.label_size) if eval_config.label_size else "original",
            "head": self._head,
            "upsampling": "bilinear, align_corners=True",
            "evaluated_classes": [labels_lib.CITYSCAPES_CLASSES[c] for c in self.evaluated_classes],
        }

    @property
    def evaluated_classes(self) -> list[int]:
        classes = self._config.eval.classes
        return list(classes) if classes else list(range(self._num_classes))

    def _batch_confusion(self, members, weights, images, labels):
        """Confusion of argmax(sum_i weights[i] * upsampled logits of members[i])."""
        logits = 0.0
        for variables, weight in zip(members, weights, strict=True):
            outputs = self._model.apply(variables, images, train=False)
            if self._head not in outputs:
                raise ValueError(
                    f"config.eval.head={self._head!r} but the model has heads {sorted(outputs)}"
                )
            up = resize_bilinear_align_corners(outputs[self._head], labels.shape[1:3])
            logits = logits + weight * up
        predictions = jnp.argmax(logits, axis=-1)
        return metrics.confusion_matrix(labels, predictions, self._num_classes)

    def confusion(self, variables, weights=None) -> tuple[np.ndarray, int]:
        """(int64 [C, C] confusion over the whole split, number of examples).

        `variables` is one network's variables, or a list of several whose upsampled logits
        are averaged with `weights` (ADVENT's logit ensemble).
        """
        members = list(variables) if isinstance(variables, list | tuple) else [variables]
        weights = jnp.asarray([1.0] * len(members) if weights is None else weights, jnp.float32)
        eval_config = self._config.data.eval
        num_examples, batches = input_pipeline.eval_iterator(
            self._reader, eval_config, self._config.data, global_batch_size=eval_config.batch_size
        )
        total = np.zeros((self._num_classes, self._num_classes), np.int64)
        for local_batch in batches:
            batch = mesh_lib.to_global(local_batch, self._mesh)
            total += np.asarray(
                jax.device_get(
                    self._confusion_fn(members, weights, batch["image"], batch["label"])
                ),
                np.int64,
            )
        return total, num_examples

    def run(self, variables, step: int, weights=None) -> dict:
        """Evaluates `variables` (see `confusion`); returns JSON-able results with step, mIoU
        (%), per-class IoU and the protocol."""
        start = time.time()
        confusion, num_examples = self.confusion(variables, weights)
        names = labels_lib.CITYSCAPES_CLASSES[: self._num_classes]
        results = metrics.summarize(
            confusion,
            names,
            self.evaluated_classes,
            subsets=dict(self._config.eval.class_subsets or {}),
        )
        results.update(
            step=int(step),
            num_examples=num_examples,
            protocol=self.protocol,
            seconds=round(time.time() - start, 2),
        )
        logging.info(
            "Evaluated step %d on %d examples: mIoU %.2f", step, num_examples, results["miou"]
        )
        return results


def write_results(results: dict, path: str) -> None:
    """Writes `results` as JSON atomically (write to a temporary file, then rename)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
