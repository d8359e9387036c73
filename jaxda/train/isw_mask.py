"""ISW's mask pass: which covariance entries of the whitened maps the photometric shift moves.

RobustNet (Choi et al., CVPR 2021) runs it once, after epoch `cov_stat_epoch` (5) of its
class-uniform sampler, with the network in evaluation mode. Each of `trials` (10) trials reads
`images_per_trial` (500) random source training images, each as a pair (photometric copy:
colour jitter (0.8, 0.8, 0.8, hue 0.3) in a random order, then a Gaussian blur of std
U(0.15, 1.3); original). Per whitened layer and pair, the covariance matrices
(`whitening.covariance`) of the two copies give the unbiased variance of every strict
upper-triangle entry over the pair; the trial averages it over its pairs, clusters the C x C
values into `clusters` (3) groups by exact 1-D k-means and keeps the entries outside the
lowest cluster: the `num_sensitive` largest variances. The trials' masks are AND-ed.

Here the pairs come from the stream `config.whitening.stream` (its `group` block gives the
photometric copy as the group's noisy view of the clean one), `batch_size` pairs per jit-
compiled step sharded over the devices; each pair's variance is computed on its own, so the
result does not depend on the batch size (RobustNet's batch is one pair). Rows past
`images_per_trial` (a last, partial batch) get weight 0. Each trial reads the stream with its
own seed (config.seed, TRIAL_SEED_OFFSET + trial): other images and other photometric draws.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxda import mesh as mesh_lib
from jaxda.data import input_pipeline
from jaxda.losses import whitening
from jaxda.models import resnet_torchvision
from jaxda.train import common

# Stream seeds of the trials: (config.seed, TRIAL_SEED_OFFSET + trial), apart from the
# training streams' (config.seed, 0 / 1).
TRIAL_SEED_OFFSET = 1000


def pair_variance_fn(model, slots) -> callable:
    """jit((variables, noisy [b, H, W, 3], clean [b, H, W, 3], weight [b]) ->
    {slot: [C, C]} the weighted sum over pairs of each upper-triangle entry's variance)."""

    def fn(variables, noisy, clean, weight):
        images = jnp.concatenate([noisy, clean], axis=0)
        _, _, sown = common.forward(model, variables, images, train=False, features=True)
        count = noisy.shape[0]
        result = {}
        for slot in slots:
            cov = whitening.covariance(sown[resnet_torchvision.WHITENED_PREFIX + slot])
            # Unbiased variance of two samples: (a - b)^2 / 2.
            variance = 0.5 * jnp.square(cov[:count] - cov[count:])
            upper = jnp.triu(jnp.ones(cov.shape[1:], cov.dtype), k=1)
            result[slot] = jnp.einsum("b,bij->ij", weight, variance) * upper
        return result

    return jax.jit(fn)


def trial_batches(config, reader, trial: int, mesh):
    """(noisy, clean, weight) global batches of one trial."""
    w = config.whitening
    batches = input_pipeline.train_iterator(
        reader,
        w.stream,
        config.data,
        global_batch_size=w.batch_size,
        seed=(config.seed, TRIAL_SEED_OFFSET + trial),
        start=0,
    )
    local = w.batch_size // jax.process_count()
    offset = jax.process_index() * local
    for start in range(0, w.images_per_trial, w.batch_size):
        group = next(batches)["group"]
        rows = start + offset + np.arange(local)
        weight = (rows < w.images_per_trial).astype(np.float32)
        yield mesh_lib.to_global((group["image"], group["clean"], weight), mesh)


def compute_masks(model, variables, slots, config: ml_collections.ConfigDict, mesh):
    """({slot: [C, C] float32 mask}, summary {'isw/num_sensitive/<slot>': n, ...}) of the
    network `variables` (evaluation mode)."""
    w = config.whitening
    mesh_lib.check_batch_size(w.batch_size, mesh, "whitening.batch_size")
    reader = input_pipeline.open_reader(w.stream, config.data)
    fn = pair_variance_fn(model, slots)
    masks = {}
    for trial in range(w.trials):
        sums = None
        for noisy, clean, weight in trial_batches(config, reader, trial, mesh):
            out = fn(variables, noisy, clean, weight)
            sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
        for slot in slots:
            variance = np.asarray(jax.device_get(sums[slot]), np.float64) / w.images_per_trial
            mask = whitening.select_sensitive(variance, w.clusters)
            masks[slot] = mask if slot not in masks else whitening.and_masks(masks[slot], mask)
    summary = {}
    for slot, mask in masks.items():
        channels = mask.shape[0]
        summary[f"isw/num_sensitive/{slot}"] = float(mask.sum())
        summary[f"isw/sensitive_fraction/{slot}"] = float(mask.sum()) / (
            channels * (channels - 1) / 2
        )
    return {s: np.asarray(m, np.float32) for s, m in masks.items()}, summary
