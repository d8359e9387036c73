"""DA-SAC's offline pass over the target training split (before self-training), as an
`offline` pass: jit-compiled, sharded over the devices, resumable and skipped once complete.

  dasac_class_pixels  per image, the pixels of each class in the baseline model's argmax
                      prediction (head `config.eval.head` at the input size, flip-averaged
                      with `offline.flip`): 'class_pixels' [N, C] int32, written as
                      `<pass dir>/class_pixels.npy`, the counts of da-sac's
                      tools/compute_IS_weights.py (which it runs on the baseline's
                      predictions). `jaxda.data.importance.load_tables` turns them into the
                      importance sampling tables of the target stream.
The manifest's summary holds the predictions' agreement with the split's labels (monitoring)
and the classes with no predicted pixel (sampled uniformly by `importance`).
"""

import jax
import jax.numpy as jnp
import numpy as np

from jaxda.data import importance
from jaxda.train import offline

# map_split writes output NAME as <pass dir>/NAME.npy: the file `importance.load_tables` reads.
OUTPUT = importance.COUNTS_FILE.removesuffix(".npy")  # 'class_pixels'


def class_pixels_fn(model, config):
    """Pass function: {'class_pixels': [b, C] int32 argmax pixel counts of head
    `config.eval.head` at the input size (`offline.flip`: of the flip-averaged softmax)} and
    the argmax's `label_agreement` counts with the split's labels. Padding examples
    (`valid` False, dropped by `map_split` anyway) count zero."""
    head, flip = config.eval.head, config.offline.get("flip", False)
    num_classes = config.num_classes

    def fn(variables, batch):
        probs = offline.softmax_at_input_size(model, variables, batch["image"], head, flip)
        prediction = jnp.argmax(probs, axis=-1)
        counts = jax.vmap(lambda p: jnp.bincount(p.ravel(), length=num_classes))(prediction)
        counts = counts.astype(jnp.int32)
        if "valid" in batch:
            counts = jnp.where(batch["valid"][:, None], counts, 0)
        return {OUTPUT: counts, **offline.label_agreement(prediction, batch["label"])}

    return fn


def class_pixels_summary(outputs: dict) -> dict:
    """The agreement summary, the split's predicted pixels per class, and the classes with
    none."""
    totals = np.sum(np.asarray(outputs[OUTPUT]), axis=0, dtype=np.int64)
    empty = [int(c) for c in np.flatnonzero(totals == 0)]
    return {
        **offline.agreement_summary(outputs),
        "class_pixel_totals": [int(t) for t in totals],
        "classes_without_pixels": len(empty),
        "empty_classes": empty,
    }


def run_class_pixels_pass(config, out_dir: str) -> dict:
    return offline.run_network_pass(
        config, out_dir, class_pixels_fn, lambda outputs: ({}, class_pixels_summary(outputs))
    )


offline.register(importance.PASS_NAME, run_class_pixels_pass)
