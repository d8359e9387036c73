"""ProDA's offline passes over the target training split (before stage 1), as `offline`
passes: jit-compiled, sharded over the devices, resumable and skipped once complete.

  proda_soft_labels  the warm-up model's softmax at its native output stride (ProDA's
                     generate_pseudo_label.py --soft): 'soft' [N, h, w, C] at the dtype
                     `offline.dtype` (ProDA stores float32 .npy files; float16 halves the disk).
  proda_prototypes   class prototypes from the warm-up model's head features in evaluation
                     mode (ProDA's calc_prototype.py): per image and class with at least
                     `proda.prototype_min_pixels` argmax pixels, the mean feature; the
                     prototypes are their running mean over `offline.epochs` passes of the
                     split, each class's count capped at `proda.prototype_count_cap`:
                     prototypes.npy [C, D] and prototype_counts.npy [C].
Hard pseudo labels for stages 2 and 3 come from the generic 'predictions' pass with
`offline.flip` (flip-averaged softmax) and the confidences kept beside them.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jaxda.losses import proda as proda_losses
from jaxda.train import common, offline


def soft_labels_fn(model, config):
    """{'soft': [b, h, w, C] softmax at the output stride} plus the argmax's agreement counts
    with the split's labels (monitoring)."""
    head, dtype = config.eval.head, jnp.dtype(config.offline.get("dtype", "float32"))

    def fn(variables, batch):
        probs = jax.nn.softmax(model.apply(variables, batch["image"], train=False)[head], -1)
        counts = offline.label_agreement(jnp.argmax(probs, -1), batch["label"])
        return {"soft": probs.astype(dtype), **counts}

    return fn


def class_features_fn(model, config):
    """{'vectors': [b, C, D] per-class mean features, 'present': [b, C] bool} of each image
    (`class_mean_features` of the head feature and logits, evaluation mode)."""
    head, min_pixels = config.eval.head, config.proda.prototype_min_pixels

    def fn(variables, batch):
        outputs, _, sown = common.forward(
            model, variables, batch["image"], train=False, features=True
        )
        vectors, present = proda_losses.class_mean_features(
            sown["feature"], outputs[head], min_pixels
        )
        return {"vectors": vectors, "present": present}

    return fn


def running_mean_prototypes(vectors, present, epochs: int, count_cap: int):
    """([C, D] prototypes, [C] counts): ProDA's 'mean' update over `epochs` passes of the
    split in order, image by image (the count cap makes later passes matter)."""
    num_classes, width = vectors.shape[1:]
    prototypes = jnp.zeros((num_classes, width), jnp.float32)
    counts = jnp.zeros((num_classes,), jnp.float32)
    update = jax.jit(
        lambda p, c, v, m: proda_losses.update_prototypes_running_mean(p, c, v, m, count_cap)
    )
    chunk = 64  # Images per call: sequential inside, few host round trips.
    for _ in range(epochs):
        for start in range(0, len(vectors), chunk):
            v = np.asarray(vectors[start : start + chunk], np.float32)
            m = np.asarray(present[start : start + chunk], bool)
            prototypes, counts = update(prototypes, counts, v, m)
    return np.asarray(prototypes), np.asarray(counts)


def run_soft_labels_pass(config, out_dir: str) -> dict:
    return offline.run_network_pass(
        config, out_dir, soft_labels_fn, lambda o: ({}, offline.agreement_summary(o))
    )


def run_prototypes_pass(config, out_dir: str) -> dict:
    def finalize(outputs):
        prototypes, counts = running_mean_prototypes(
            outputs["vectors"],
            outputs["present"],
            config.offline.get("epochs", 4),
            config.proda.prototype_count_cap,
        )
        summary = {"classes_with_prototypes": int(np.sum(counts > 0))}
        return {"prototypes": prototypes, "prototype_counts": counts}, summary

    return offline.run_network_pass(config, out_dir, class_features_fn, finalize)


offline.register("proda_soft_labels", run_soft_labels_pass)
offline.register("proda_prototypes", run_prototypes_pass)
