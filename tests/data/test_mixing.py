"""ClassMix (`jaxda/data/mixing.py`) against NumPy: the chosen classes are ceil(n / 2) of
the pool's n (255 included as coded), the masks select exactly their pixels, the mixed
images and labels follow the formula, and the choice is a uniform subset."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxda.data import mixing
from jaxda.data.labels import IGNORE_LABEL

C = 19


def _labels(rng, batch=4, shape=(6, 8)):
    """Per image a few classes (different sets) and some ignored pixels."""
    out = np.empty((batch, *shape), np.uint8)
    for b in range(batch):
        classes = rng.choice(C, size=rng.integers(1, 7), replace=False)
        values = np.append(classes, IGNORE_LABEL) if b % 2 == 0 else classes
        out[b] = rng.choice(values, size=shape)
    return out


def _chosen_ids(chosen_row: np.ndarray) -> set[int]:
    return {IGNORE_LABEL if s == C else int(s) for s in np.flatnonzero(chosen_row)}


@pytest.mark.parametrize("pool", ["sample", "batch"])
@pytest.mark.parametrize("include_ignore", [True, False])
def test_masks_take_half_of_the_pool(pool, include_ignore):
    rng = np.random.default_rng(0)
    labels = _labels(rng)
    masks, chosen = mixing.classmix_masks(
        jax.random.key(3), jnp.asarray(labels), C, pool=pool, include_ignore=include_ignore
    )
    masks, chosen = np.asarray(masks), np.asarray(chosen)
    for b in range(labels.shape[0]):
        # The official pools: np.unique of the image's (DACS) or the batch's (DAFormer) labels.
        pool_ids = set(np.unique(labels[b] if pool == "sample" else labels).tolist())
        if not include_ignore:
            pool_ids.discard(IGNORE_LABEL)
        ids = _chosen_ids(chosen[b])
        assert ids <= pool_ids
        assert len(ids) == (len(pool_ids) + len(pool_ids) % 2) // 2  # ceil(n / 2)
        np.testing.assert_array_equal(masks[b], np.isin(labels[b], list(ids)))


def test_mixed_image_and_label_follow_the_formula():
    rng = np.random.default_rng(1)
    labels = _labels(rng)
    source = rng.normal(size=(*labels.shape, 3)).astype(np.float32)
    target = rng.normal(size=(*labels.shape, 3)).astype(np.float32)
    pseudo = rng.integers(0, C, size=labels.shape)
    masks, _ = mixing.classmix_masks(jax.random.key(0), jnp.asarray(labels), C)
    m = np.asarray(masks)
    mixed = np.asarray(mixing.mix(masks, source, target))
    np.testing.assert_array_equal(mixed, m[..., None] * source + (1 - m[..., None]) * target)
    mixed_label = np.asarray(mixing.mix(masks, labels.astype(np.int32), pseudo))
    np.testing.assert_array_equal(mixed_label, np.where(m, labels, pseudo))
    assert 0 < m.mean() < 1


def test_choice_is_a_uniform_subset():
    """Over many keys, each of n = 5 present classes is chosen with frequency 3 / 5 and each
    of the C(5, 3) = 10 subsets with frequency 1 / 10."""
    present = jnp.zeros((1, C + 1), bool).at[0, jnp.array([0, 4, 7, 12, C])].set(True)
    keys = jax.random.split(jax.random.key(0), 4000)
    chosen = np.asarray(jax.vmap(lambda k: mixing.choose_classes(k, present)[0])(keys))
    assert (chosen.sum(1) == 3).all() and not chosen[:, ~np.asarray(present[0])].any()
    np.testing.assert_allclose(chosen[:, np.asarray(present[0])].mean(0), 0.6, atol=0.03)
    _, counts = np.unique(chosen, axis=0, return_counts=True)
    assert len(counts) == 10
    np.testing.assert_allclose(counts / len(keys), 0.1, atol=0.02)
