"""One network evaluated on a list of datasets (config.eval.datasets), each under its own
protocol: RobustNet's domain-generalisation table, for any method's checkpoint.

An entry is an evaluation stream (what config.data.eval holds: dataset, split, size,
label_size, batch_size, optional `transform`) plus its classes and class_subsets. Each entry is
scored by an `evaluator.Evaluator` built on a copy of the config whose data.eval, eval.classes
and eval.class_subsets are the entry's; the inference mode and head stay config.eval's. A
dataset that is not prepared (`sources.DatasetNotPreparedError`) is skipped with the reason,
so one table reports whatever is available; any other error (a split or subset the prepared
dataset lacks, a wrong batch size) stops the evaluation.
"""

import os
from collections.abc import Mapping

import jax
import ml_collections
from absl import logging
from clu import metric_writers

from jaxda.data import sources
from jaxda.evaluation import evaluator as evaluator_lib
from jaxda.evaluation import metrics

# Keys of an entry that are its scoring protocol, not part of the stream (config.data.eval).
PROTOCOL_KEYS = ("classes", "class_subsets")
SKIPPED = metrics.SKIPPED  # Key of a skipped dataset's record: the reason.
SCALAR_PREFIX = "eval_datasets"
EVAL_SUBDIR = "eval"


def ordered_names(eval_config: ml_collections.ConfigDict) -> list[str]:
    """Names of eval_config.datasets in table order: `datasets_order` first, then the rest
    sorted (a ConfigDict does not keep insertion order)."""
    names = list(eval_config.datasets.keys())
    order = list(eval_config.get("datasets_order") or ())
    unknown = sorted(set(order) - set(names))
    if unknown or len(set(order)) != len(order):
        raise ValueError(
            f"config.eval.datasets_order={tuple(order)} must name distinct entries of "
            f"config.eval.datasets ({sorted(names)}); unknown: {unknown}"
        )
    return order + sorted(set(names) - set(order))


def entry_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """A copy of `config` that evaluates entry `name` of config.eval.datasets: its data.eval is
    the entry's stream, its eval.classes / eval.class_subsets the entry's."""
    entry = config.eval.datasets[name]
    evaluating = config.copy_and_resolve_references()
    stream = {k: v for k, v in entry.items() if k not in PROTOCOL_KEYS}
    evaluating.data.eval = ml_collections.ConfigDict(stream)
    evaluating.eval.classes = tuple(entry.get("classes", ()))
    evaluating.eval.class_subsets = ml_collections.ConfigDict(
        {k: tuple(v) for k, v in (entry.get("class_subsets") or {}).items()}
    )
    evaluating.eval.datasets = ml_collections.ConfigDict()
    return evaluating


def evaluate(model, config: ml_collections.ConfigDict, mesh, variables, step: int, weights=None):
    """{name: results} of every config.eval.datasets entry, in table order (`ordered_names`).

    Args:
      variables: one network's variables, or a list of several whose logits are averaged with
        `weights` (see `Evaluator.confusion`).

    Returns:
      {name: `Evaluator.run`'s results (miou, miou_<subset>, per_class_iou, num_examples,
      protocol), or {'skipped': reason, 'dataset', 'split'} for a dataset not prepared}.
    """
    results = {}
    for name in ordered_names(config.eval):
        evaluating = entry_config(config, name)
        stream = evaluating.data.eval
        try:
            evaluator = evaluator_lib.Evaluator(model, evaluating, mesh)
        except sources.DatasetNotPreparedError as error:  # Anything else is a real error.
            logging.warning("Not evaluating %s: %s", name, error)
            results[name] = {SKIPPED: str(error), "dataset": stream.name, "split": stream.split}
            continue
        results[name] = evaluator.run(variables, step, weights)
    return results


def scalars(results: Mapping[str, Mapping]) -> dict[str, float]:
    """TensorBoard scalars of `evaluate`'s results: eval_datasets/<name>/miou,
    .../miou_<subset>, .../pixel_accuracy and .../iou/<class> (classes with an IoU)."""
    out = {}
    for name, result in results.items():
        if SKIPPED not in result:
            out.update(metrics.result_scalars(result, f"{SCALAR_PREFIX}/{name}"))
    return out


def report(
    results: Mapping[str, Mapping],
    workdir: str,
    file_name: str,
    step: int,
    title: str,
    extra: Mapping | None = None,
) -> dict:
    """Writes `workdir/eval/<file_name>` ({'step', 'order', 'datasets': results, **extra})
    and the scalars (a clu writer on workdir/eval, created here: --mode=eval has no training
    writer), and prints `metrics.format_datasets_table`. Returns the JSON-able record."""
    record = {"step": int(step), "order": list(results), "datasets": dict(results)}
    record.update(extra or {})
    directory = os.path.join(workdir, EVAL_SUBDIR)
    if jax.process_index() == 0:
        evaluator_lib.write_results(record, os.path.join(directory, file_name))
    writer = metric_writers.create_default_writer(
        directory, just_logging=jax.process_index() != 0, asynchronous=False
    )
    try:
        values = scalars(results)
        if values:
            writer.write_scalars(int(step), values)
    finally:
        writer.close()
    print(metrics.format_datasets_table(results, title))
    return record
