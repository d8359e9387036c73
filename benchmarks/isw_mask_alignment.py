r"""Does ISW's mask select the covariance entries that the domain shift moves?

  python benchmarks/isw_mask_alignment.py --workdir=/tmp/jaxda_bench/robustnet_isw/seed0 \
      [--config=configs/robustnet.py:synthetic] [--images=100]

For a finished ISW run on the built-in benchmark, with its final network and its mask (from
the checkpointed training state): per whitened layer, the mean covariance of the whitened maps
over `--images` source-validation and target-validation images, and per off-diagonal entry the
domain shift |mean_target - mean_source|. Prints the share of entries the mask selects, the
share of the total squared shift that falls on them, and the Spearman rank correlation between
the shift and the entry's variance under the mask pass's photometric pairs (recomputed with one
trial). A mask that finds the entries the shift moves has a shift share well above its entry
share.
"""

import argparse
import importlib.util

import jax
import numpy as np

from jaxda import checkpoints
from jaxda import mesh as mesh_lib
from jaxda.data import input_pipeline
from jaxda.losses import whitening
from jaxda.models import resnet_torchvision
from jaxda.train import common, isw_mask, trainer


def _mean_covariances(model, variables, config, split: str, images: int, slots) -> dict:
    stream = config.data.eval.copy_and_resolve_references()
    stream.split = split
    reader = input_pipeline.open_reader(stream, config.data)
    _, batches = input_pipeline.eval_iterator(reader, stream, config.data, global_batch_size=10)
    sums, count = {s: 0.0 for s in slots}, 0
    for batch in batches:
        if count >= images:
            break
        _, _, sown = common.forward(model, variables, batch["image"], train=False, features=True)
        valid = np.asarray(batch["valid"])
        for slot in slots:
            cov = np.asarray(whitening.covariance(sown[resnet_torchvision.WHITENED_PREFIX + slot]))
            sums[slot] = sums[slot] + cov[valid].sum(0)
        count += int(valid.sum())
    return {s: v / count for s, v in sums.items()}


def _ranks(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--config", default="configs/robustnet.py:synthetic")
    parser.add_argument("--images", type=int, default=100)
    args = parser.parse_args()
    path, _, arg = args.config.partition(":")
    spec = importlib.util.spec_from_file_location("run_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    mesh = mesh_lib.make_mesh(1)
    setup = trainer.build(config, mesh)
    checkpointer = checkpoints.Checkpointer(args.workdir, keep=config.keep_checkpoints)
    abstract = setup.checkpoint_items(setup.abstract_state)
    _, items, _ = checkpointer.restore_latest_intact(abstract, checkpoints.model_meta(config.model))
    state = setup.from_checkpoint_items(items)
    checkpointer.close()
    model = setup.modules["seg"]
    variables = jax.device_get({"params": state.params["seg"], "batch_stats": state.batch_stats})
    masks = {s: np.asarray(m) > 0 for s, m in state.extra["mask"].items()}
    slots = [s for s in resnet_torchvision.INSTANCE_NORM_SLOTS if s in masks]
    source = _mean_covariances(model, variables, config, "source_validation", args.images, slots)
    target = _mean_covariances(model, variables, config, "target_validation", args.images, slots)
    one_trial = config.copy_and_resolve_references()
    one_trial.whitening.trials = 1
    fn = isw_mask.pair_variance_fn(model, slots)
    sums = None
    reader = input_pipeline.open_reader(one_trial.whitening.stream, one_trial.data)
    for noisy, clean, weight in isw_mask.trial_batches(one_trial, reader, 0, mesh):
        out = fn(variables, noisy, clean, weight)
        sums = out if sums is None else jax.tree.map(np.add, sums, out)
    print(f"step {int(state.step)}; {args.images} images per domain\n")
    print(
        "| layer | entries selected | share of squared shift on them | Spearman(shift, pair var) |"
    )
    print("|---|---|---|---|")
    for slot in slots:
        upper = np.triu(np.ones(masks[slot].shape, bool), 1)
        shift = np.abs(target[slot] - source[slot])[upper]
        variance = np.asarray(sums[slot])[upper]
        selected = masks[slot][upper]
        share = (shift[selected] ** 2).sum() / (shift**2).sum()
        rho = np.corrcoef(_ranks(shift), _ranks(variance))[0, 1]
        print(f"| {slot} | {100 * selected.mean():.0f}% | {100 * share:.0f}% | {rho:.2f} |")


if __name__ == "__main__":
    main()
