"""Confusion-matrix segmentation metrics: per-class IoU and mIoU (nanmean convention).

The confusion matrix is computed per batch on device as int32 (a batch has far fewer than 2^31
pixels) and accumulated on the host as int64 (Cityscapes val has ~1e9 labelled pixels).
"""

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxda.data.labels import IGNORE_LABEL

SKIPPED = "skipped"  # Key of a dataset's record that was not evaluated: the reason.


def confusion_matrix(
    labels: jax.Array, predictions: jax.Array, num_classes: int, ignore_label: int = IGNORE_LABEL
) -> jax.Array:
    """[num_classes, num_classes] int32 counts; rows are labels, columns predictions.

    Args:
      labels: [...] integer labels; pixels equal to `ignore_label` (or outside
        [0, num_classes)) are not counted, as AdaptSegNet's `fast_hist` does.
      predictions: [...] integer predictions, same shape.
    """
    labels = labels.astype(jnp.int32).reshape(-1)
    predictions = predictions.astype(jnp.int32).reshape(-1)
    valid = (labels >= 0) & (labels < num_classes) & (labels != ignore_label)
    index = jnp.where(valid, labels * num_classes + predictions, 0)
    counts = jnp.bincount(index, weights=valid.astype(jnp.int32), length=num_classes**2)
    return counts.astype(jnp.int32).reshape(num_classes, num_classes)


def per_class_iou(confusion: np.ndarray) -> np.ndarray:
    """IoU_c = TP / (TP + FP + FN); NaN for a class absent from both labels and predictions."""
    confusion = np.asarray(confusion, np.int64)
    true_positive = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, true_positive / np.maximum(union, 1), np.nan)


def mean_iou(iou: np.ndarray, classes: Sequence[int] | None = None) -> float:
    """nanmean of the IoUs of `classes` (all when None); NaN if every one is NaN."""
    values = iou if classes is None else iou[np.asarray(classes, np.int64)]
    if np.all(np.isnan(values)):
        return float("nan")
    return float(np.nanmean(values))


def summarize(
    confusion: np.ndarray,
    class_names: Sequence[str],
    evaluated_classes: Sequence[int] | None = None,
    subsets: Mapping[str, Sequence[int]] | None = None,
) -> dict:
    """Results as plain JSON-able values, IoUs in percent.

    Args:
      confusion: [C, C] accumulated confusion matrix.
      class_names: the C class names.
      evaluated_classes: train ids averaged into 'miou' (all C when None), e.g. the 16
        SYNTHIA classes or the classes the synthetic benchmark draws.
      subsets: extra named class lists, each reported as 'miou_<name>' (e.g. '13').

    Returns:
      {'miou', 'per_class_iou': {name: IoU or None}, 'pixel_accuracy', 'miou_<subset>'...}.
    """
    confusion = np.asarray(confusion, np.int64)
    iou = per_class_iou(confusion)
    classes = list(range(len(class_names))) if evaluated_classes is None else evaluated_classes
    total = confusion.sum()
    results = {
        "miou": 100.0 * mean_iou(iou, classes),
        "per_class_iou": {
            class_names[c]: (None if np.isnan(iou[c]) else 100.0 * float(iou[c])) for c in classes
        },
        "pixel_accuracy": 100.0 * float(np.trace(confusion)) / max(int(total), 1),
        "labelled_pixels": int(total),
    }
    for name, subset in (subsets or {}).items():
        results[f"miou_{name}"] = 100.0 * mean_iou(iou, subset)
    return results


def format_table(results: Mapping, title: str = "") -> str:
    """A plain-text per-class IoU table ending with the mIoU line(s)."""
    rows = [title] if title else []
    width = max(len(name) for name in results["per_class_iou"]) + 2
    for name, value in results["per_class_iou"].items():
        shown = "   n/a" if value is None else f"{value:6.2f}"
        rows.append(f"  {name:<{width}}{shown}")
    rows.append(f"  {'mIoU':<{width}}{results['miou']:6.2f}")
    for key, value in results.items():
        if key.startswith("miou_"):
            rows.append(f"  {'mIoU-' + key[5:]:<{width}}{value:6.2f}")
    return "\n".join(rows)


def _cell(value, width: int) -> str:
    """A right-aligned IoU cell: 2 decimals, 'n/a' for None / NaN, '-' when not reported."""
    if value == "-":
        return f"{'-':>{width}}"
    if value is None or np.isnan(value):
        return f"{'n/a':>{width}}"
    return f"{value:{width}.2f}"


def format_datasets_table(results: Mapping[str, Mapping], title: str = "") -> str:
    """One plain-text table of several datasets' results, rows in the order of `results`.

    Args:
      results: {name: `summarize`-style results with 'num_examples'}, or {name: {'skipped':
        reason}} for a dataset that was not evaluated.

    Returns:
      Columns mIoU, each named subset ('mIoU-<name>', '-' where a dataset has none) and
      #images; then a line naming the skipped datasets, followed by each one's reason.
    """
    evaluated = {k: v for k, v in results.items() if SKIPPED not in v}
    skipped = {k: v[SKIPPED] for k, v in results.items() if SKIPPED in v}
    subsets = list(dict.fromkeys(k for r in evaluated.values() for k in r if k.startswith("miou_")))
    name_width = max([len("dataset"), *map(len, results)]) + 2
    headers = ["mIoU", *(f"mIoU-{k[5:]}" for k in subsets), "#images"]
    widths = [max(8, len(h) + 2) for h in headers]
    rows = [title] if title else []
    rows.append(
        "  " + f"{'dataset':<{name_width}}" + "".join(map("{:>{}}".format, headers, widths))
    )
    for name, result in evaluated.items():
        cells = [_cell(result["miou"], widths[0])]
        cells += [_cell(result.get(k, "-"), w) for k, w in zip(subsets, widths[1:-1], strict=True)]
        cells.append(f"{result.get('num_examples', '-'):>{widths[-1]}}")
        rows.append(f"  {name:<{name_width}}" + "".join(cells))
    if skipped:
        rows.append(f"  Skipped, not prepared: {', '.join(skipped)}. To prepare them:")
        rows += [f"    {name}: {reason}" for name, reason in skipped.items()]
    return "\n".join(rows)


def result_scalars(results: Mapping, prefix: str) -> dict[str, float]:
    """TensorBoard scalars of one evaluation's results: <prefix>/miou, <prefix>/miou_<subset>,
    <prefix>/pixel_accuracy and <prefix>/iou/<class> (classes with an IoU)."""
    out = {f"{prefix}/miou": results["miou"], f"{prefix}/pixel_accuracy": results["pixel_accuracy"]}
    for key, value in results.items():
        if key.startswith("miou_"):
            out[f"{prefix}/{key}"] = value
    for name, value in results["per_class_iou"].items():
        if value is not None:
            out[f"{prefix}/iou/{name}"] = value
    return out
