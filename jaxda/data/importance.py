"""DA-SAC's class-balanced importance sampling of target images (da-sac's
datasets/dataloader_target.py `init_sampling` / `__getitem__`, tools/compute_IS_weights.py).

From per-image class pixel counts [N, C] (the baseline's predictions on the target training
split, the offline pass 'dasac_class_pixels'):

  frac_c(i) = pixels of class c in image i / pixels of class c over the split;
  p_c(i)    = u / N + (1 - u) * frac_c(i)       (u: `uniform_prior`, da-sac's
                                                 DATASET.SAMPLE_UNIFORM_PRIOR, 0.25);
  p_c(i)    = 1 / N for the classes in `uniform_classes` (da-sac: VAL.IGNORE_CLASS).

A class no image has a pixel of (frac_c = 0 everywhere) is sampled uniformly too: its p_c
would be u / N, which does not sum to 1 (da-sac asserts on it).

Stream item `position` whose shuffled index is `k` (`input_pipeline.sample_indices`) picks
class `k % C` (each class equally often over an epoch) and draws its image from p_c by inverse
CDF: the first image whose cumulative weight is >= a uniform u in [0, 1) (da-sac's
`bisect_left`). u is a stateless draw from (seed, position) alone, so the drawn sequence is a
pure function of (seed, position) and a resumed stream continues it exactly.

Pure NumPy: the data layer does not depend on jaxda.train.
"""

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np

# The offline pass that writes the counts, its per-example output, and its completion marker
# (jaxda/train/dasac_passes.py, jaxda/train/offline.py).
PASS_NAME = "dasac_class_pixels"
COUNTS_FILE = "class_pixels.npy"
MANIFEST_FILE = "manifest.json"

# Tag of the importance draws' seeds: keeps them apart from the stream's other draws.
_SEED_TAG = 0x15


def class_fractions(counts: np.ndarray) -> np.ndarray:
    """[N, C] float64: each image's share of each class's pixels over the split
    (counts / column sums); a column of zeros (a class with no pixels) stays zero."""
    counts = np.asarray(counts)
    if counts.ndim != 2:
        raise ValueError(f"Class pixel counts must be [images, classes]; got shape {counts.shape}")
    counts = counts.astype(np.float64)
    if np.any(counts < 0) or not np.all(np.isfinite(counts)):
        raise ValueError("Class pixel counts must be finite and non-negative")
    totals = counts.sum(axis=0)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def cumulative_tables(
    fractions: np.ndarray, uniform_prior: float, uniform_classes: Iterable[int] = ()
) -> np.ndarray:
    """[C, N] float64 cumulative distributions over the images, one per class.

    Args:
      fractions: [N, C] `class_fractions` (each column sums to 1, or is all zero for a class
        with no pixels: that class is then sampled uniformly).
      uniform_prior: u in [0, 1]: p_c = u / N + (1 - u) * fractions[:, c].
      uniform_classes: classes sampled uniformly (1 / N) whatever their fractions.

    Each row is normalised by its sum and ends at exactly 1.0.
    """
    fractions = np.asarray(fractions, np.float64)
    if fractions.ndim != 2 or fractions.shape[0] == 0:
        raise ValueError(f"Fractions must be [images, classes], images > 0; got {fractions.shape}")
    if not 0.0 <= uniform_prior <= 1.0:
        raise ValueError(f"uniform_prior must be in [0, 1]; got {uniform_prior}")
    num_images, num_classes = fractions.shape
    if np.any(fractions < 0) or not np.all(np.isfinite(fractions)):
        raise ValueError("Fractions must be finite and non-negative")
    sums = fractions.sum(axis=0)
    bad = [c for c in range(num_classes) if sums[c] != 0 and abs(sums[c] - 1.0) > 1e-6]
    if bad:
        raise ValueError(f"Fractions of classes {bad} do not sum to 1 over the images")
    uniform = set()
    for c in uniform_classes:
        if not 0 <= int(c) < num_classes:
            raise ValueError(f"uniform_classes has {c}, outside [0, {num_classes})")
        uniform.add(int(c))
    uniform.update(int(c) for c in np.flatnonzero(sums == 0))  # No pixels anywhere.
    weights = uniform_prior / num_images + (1.0 - uniform_prior) * fractions.T
    weights[sorted(uniform)] = 1.0 / num_images
    tables = np.cumsum(weights, axis=1)
    tables /= tables[:, -1:]
    tables[:, -1] = 1.0
    return tables


def draw(tables: np.ndarray, class_id: int, u: float) -> int:
    """The image that uniform `u` in [0, 1) selects from class `class_id`'s cumulative table:
    the first index whose cumulative weight is >= u (`bisect.bisect_left`, as da-sac)."""
    row = tables[class_id]
    return min(int(np.searchsorted(row, u, side="left")), len(row) - 1)


def uniform(seed: Sequence[int], position: int) -> float:
    """A uniform in [0, 1) that depends on (seed, position) only (stateless)."""
    sequence = np.random.SeedSequence([int(s) for s in seed], spawn_key=(_SEED_TAG, int(position)))
    return float(np.random.default_rng(sequence).random())


def importance_indices(
    samples: Iterable[tuple[int, int]], tables: np.ndarray, seed: Sequence[int]
) -> Iterator[tuple[int, int]]:
    """(position, drawn image index) for each (position, shuffled index) of `samples` (as
    `input_pipeline.sample_indices` yields them): class = shuffled index % C, image drawn
    from that class's table with `uniform(seed, position)`."""
    num_classes = len(tables)
    for position, index in samples:
        yield position, draw(tables, int(index) % num_classes, uniform(seed, position))


def _read_counts(path: str, stream_name: str) -> np.ndarray:
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, MANIFEST_FILE)):
            raise FileNotFoundError(
                f"Importance weights of stream {stream_name!r}: {path} holds no complete "
                f"offline pass (no {MANIFEST_FILE}); run the '{PASS_NAME}' pass "
                f"(config.offline.pass='{PASS_NAME}') over the {stream_name!r} split with the "
                "baseline model first (an interrupted pass resumes where it stopped)"
            )
        with open(os.path.join(path, MANIFEST_FILE)) as f:
            manifest = json.load(f)
        counts_path = os.path.join(path, COUNTS_FILE)
        if not os.path.exists(counts_path):
            raise FileNotFoundError(
                f"Importance weights of stream {stream_name!r}: {path} is an offline pass "
                f"without {COUNTS_FILE} (outputs: {sorted(manifest.get('outputs', {}))}); "
                f"it must be a '{PASS_NAME}' pass"
            )
        path = counts_path
    elif not os.path.exists(path):
        raise FileNotFoundError(
            f"Importance weights of stream {stream_name!r}: {path} does not exist (expected a "
            f"'{PASS_NAME}' offline pass directory or a .npy of [images, classes] counts)"
        )
    return np.load(path)


def load_tables(
    importance_config: Mapping, num_examples: int, stream_name: str
) -> np.ndarray | None:
    """[C, N] cumulative tables of a stream's importance sampling, or None when it is off.

    Args:
      importance_config: {'weights': a '{PASS_NAME}' pass directory (its `class_pixels.npy`,
        complete: with its manifest) or a .npy file of [N, C] class pixel counts; '' = off,
        'uniform_prior': u (da-sac 0.25), 'uniform_classes': classes sampled uniformly}.
      num_examples: N, the images of the stream's split.
      stream_name: for the error messages (e.g. 'target').
    """
    path = importance_config.get("weights", "") or ""
    if not path:
        return None
    counts = _read_counts(str(path), stream_name)
    where = f"Importance weights {path} of stream {stream_name!r}"
    if counts.ndim != 2:
        raise ValueError(f"{where}: expected [images, classes] counts; got shape {counts.shape}")
    if counts.shape[0] != num_examples:
        raise ValueError(
            f"{where}: counts for {counts.shape[0]} images, but the split has {num_examples}; "
            "recompute them on this split"
        )
    if np.any(np.asarray(counts) < 0):
        raise ValueError(f"{where}: negative pixel counts")
    return cumulative_tables(
        class_fractions(counts),
        float(importance_config.get("uniform_prior", 0.25)),
        tuple(importance_config.get("uniform_classes", ()) or ()),
    )
