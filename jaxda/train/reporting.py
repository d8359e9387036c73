"""Evaluation records of a training run: per-step JSON + TensorBoard scalars, the run summary
(final checkpoint, and separately the selection on the validation split), the console table.
"""

import json
import os

import jax
import numpy as np

from jaxda.evaluation import evaluator as evaluator_lib
from jaxda.evaluation import metrics as metrics_lib

EVAL_SUBDIR = "eval"


def load_eval_history(workdir: str) -> list[dict]:
    directory = os.path.join(workdir, EVAL_SUBDIR)
    if not os.path.isdir(directory):
        return []
    history = []
    for name in sorted(os.listdir(directory)):
        if name.startswith("step_") and name.endswith(".json"):
            with open(os.path.join(directory, name)) as f:
                history.append(json.load(f))
    return history


def _write_eval(writer, results: dict, workdir: str) -> None:
    step = results["step"]
    if jax.process_index() == 0:
        path = os.path.join(workdir, EVAL_SUBDIR, f"step_{step:07d}.json")
        evaluator_lib.write_results(results, path)
    writer.write_scalars(step, metrics_lib.result_scalars(results, "eval"))


def evaluate(evaluator, writer, state, method, step: int, workdir: str) -> dict:
    """Evaluates the method's evaluated network, writes the results (JSON, scalars) and the
    prediction images; returns the results."""
    results, images = evaluator.run_with_visuals(state.variables(method.eval_network), step)
    _write_eval(writer, results, workdir)
    if images:
        writer.write_images(step, images)
    return results


def final_results(evaluator, writer, state, method, workdir: str) -> dict:
    """The final step scored on config.data.eval when the periodic evaluations ran on a
    separate selection split; kept in `workdir/eval/final.json` (written once per step)."""
    path = os.path.join(workdir, EVAL_SUBDIR, "final.json")
    step = int(state.step)
    if os.path.exists(path):
        with open(path) as f:
            results = json.load(f)
        if results["step"] == step:
            return results
    results, images = evaluator.run_with_visuals(state.variables(method.eval_network), step)
    if jax.process_index() == 0:
        evaluator_lib.write_results(results, path)
    if images:
        writer.write_images(step, {f"final/{k}": v for k, v in images.items()})
    return results


def summarize_run(history: list[dict], total_steps: int, final: dict | None = None) -> dict:
    """Final-checkpoint results and, separately labelled, the best periodic evaluation.

    Without `final`, the periodic evaluations ran on the evaluation split itself and the final
    results are its last one; with it, they ran on a selection split (config.data.selection)
    and `final` is the last step scored on the evaluation split.
    """
    if final is None:
        final = next((r for r in history if r["step"] == total_steps), None)
        note = "the evaluation split itself: an optimistic, selected number, not a held-out"
    else:
        note = "the selection split (config.data.selection), not the evaluation split: a"
    note = f"best of the periodic evaluations on {note} result; report 'final'"
    summary = {"final": final}
    if history:
        best = max(history, key=lambda r: r["miou"])
        summary["selected_on_validation"] = {
            "note": note,
            "step": best["step"],
            "miou": best["miou"],
            "evaluated_steps": [r["step"] for r in history],
            "protocol": best.get("protocol", {}),
        }
    return summary


def starting_results(workdir, evaluator, state, method, meta: dict, is_writer: bool) -> dict:
    """Test-time methods: the starting network's results, computed once and kept in
    `workdir/eval/starting.json` so that a resumed adaptation reports the same."""
    path = os.path.join(workdir, EVAL_SUBDIR, "starting.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    results = evaluator.run(state.variables(method.eval_network), 0)
    results["checkpoint"] = meta.get("init", {}).get(method.eval_network, "")
    if is_writer:
        evaluator_lib.write_results(results, path)
    return results


def online_summary(config, evaluator, state, method, num_batches: int, starting: dict) -> dict:
    """Test-time methods: the online results (each batch scored before it adapted the
    network) from the method's accumulated confusion, beside the starting network's."""
    online = method.online_results(state, config)
    confusion = np.asarray(jax.device_get(online.pop("confusion")), np.int64)
    results = evaluator.results_from_confusion(confusion, num_batches)
    results["protocol"] = {**results["protocol"], **online.pop("protocol", {})}
    results.update({k: float(v) for k, v in jax.device_get(online).items()})
    return {"method": config.method, "final": results, "starting_checkpoint": starting}


def print_summary(summary: dict) -> None:
    if "starting_checkpoint" in summary:
        start = summary["starting_checkpoint"]
        print(metrics_lib.format_table(start, f"Starting checkpoint ({start['checkpoint']}):"))
        print(metrics_lib.format_table(summary["final"], f"Adapted online ({summary['method']}):"))
        return
    final = summary["final"]
    print(metrics_lib.format_table(final, f"Target mIoU at the final step {final['step']}:"))
    if "selected_on_validation" in summary:
        sel = summary["selected_on_validation"]
        print(
            f"  (selected on the validation split, optimistic: step {sel['step']} "
            f"mIoU {sel['miou']:.2f})"
        )
