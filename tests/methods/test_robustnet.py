"""RobustNet's train step and ISW mask pass on the tiny benchmark (`configs/robustnet.py`,
`jaxda/train/robustnet.py`, `jaxda/train/isw_mask.py`): the step's loss against NumPy
transcriptions of RobustNet's terms, the gate before the mask, and the mask pass against a
NumPy re-computation from the network's own whitened maps."""

import jax
import numpy as np
import pytest

from configs import robustnet as robustnet_config
from jaxda import mesh as mesh_lib
from jaxda.data import input_pipeline
from jaxda.losses import segmentation
from jaxda.models import resnet_torchvision
from jaxda.train import common, isw_mask, robustnet, trainer
from tests.conftest import shrink_to_tiny

PREFIX = resnet_torchvision.WHITENED_PREFIX


def _config(data_dir, norm: str = "isw"):
    config = shrink_to_tiny(robustnet_config.get_config(f"synthetic,norm={norm}"), data_dir)
    config.data.source.class_uniform = {}
    config.whitening.stream.name = config.data.source.name
    config.whitening.stream.size = (32, 64)
    config.whitening.update({"trials": 2, "images_per_trial": 6, "batch_size": 4})
    config.eval.datasets = {}
    return config


def _setup(config):
    mesh = mesh_lib.make_mesh(1)
    setup = trainer.build(config, mesh)
    return setup, trainer.init_state(config, setup), mesh


def _batch(config):
    reader = input_pipeline.open_reader(config.data.source, config.data)
    batches = input_pipeline.train_iterator(
        reader, config.data.source, config.data, global_batch_size=4, seed=(1, 0), start=0
    )
    return {"source": next(batches)}


def _ce(logits, labels):
    logits = np.asarray(logits, np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    valid = labels != 255
    picked = np.take_along_axis(log_probs, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    return -picked[valid].mean()


def _whitening_np(maps, mask, margin, count):
    """RobustNet's instance_whitening_loss, per image in float64."""
    maps = np.asarray(maps, np.float64)
    b, h, w, c = maps.shape
    flat = maps.reshape(b, h * w, c)
    losses = []
    for f in flat:
        cov = f.T @ f / (h * w - 1) + 1e-5 * np.eye(c)
        losses.append(max((np.abs(cov * mask).sum() - margin) / count, 0.0))
    return np.mean(losses)


def _training_forward(model):
    return jax.jit(
        lambda v, x, key: common.forward(model, v, x, train=True, features=True, rng=key)
    )


def _expected_loss(config, forward, state, batch, kind, masks=None):
    """Independent loss of one step: `forward` (`_training_forward`), NumPy terms."""
    variables = {"params": state.params["seg"], "batch_stats": state.batch_stats}
    images, labels = batch["source"]["image"], np.asarray(batch["source"]["label"])
    outputs, _, sown = forward(variables, images, state.step_key())
    main = common.upsample({"main": outputs["main"]}, labels.shape[1:3])["main"]
    aux = np.asarray(outputs["aux"])
    # PyTorch's nearest: source index floor(i * in / out).
    rows = np.floor(np.arange(aux.shape[1]) * (labels.shape[1] / aux.shape[1])).astype(int)
    cols = np.floor(np.arange(aux.shape[2]) * (labels.shape[2] / aux.shape[2])).astype(int)
    loss = _ce(main, labels) + 0.4 * _ce(aux, labels[:, rows][:, :, cols])
    if kind:
        terms = []
        for slot in ("stem", "layer1", "layer2"):
            maps = np.asarray(sown[PREFIX + slot])
            c = maps.shape[-1]
            off = c * (c - 1) / 2
            if kind == "isw":
                mask, margin, count = masks[slot], 0.0, masks[slot].sum()
            else:
                mask = np.triu(np.ones((c, c)), 1)
                margin = off // 64 if kind == "irw" else 0.0
                count = off
            terms.append(_whitening_np(maps, mask, margin, count))
        loss += config.whitening.weight * np.mean(terms)
    return loss


# ~15 s each (compiling the step): ISW (mask, gate) by default; IRW's margin is tested on the
# loss itself (tests/losses/test_whitening.py).
_SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "norm",
    [pytest.param(n, marks=_SLOW) for n in ("base", "ibn", "iw", "irw")] + ["isw"],
)
def test_step_loss_matches_numpy(data_dir, norm):
    """CE(main) + 0.4 CE(aux on nearest-downsampled labels) + weight x whitening loss, with
    ISW's mask set (ready) to a random upper-triangle mask; ISW before its mask: the CE terms
    alone."""
    config = _config(data_dir, norm)
    setup, state, mesh = _setup(config)
    kind = config.whitening.kind
    masks = None
    if kind == "isw":
        rng = np.random.default_rng(0)
        masks = {
            s: np.triu(rng.random(m.shape) < 0.3, 1).astype(np.float32)
            for s, m in state.extra["mask"].items()
        }
        not_ready = jax.tree.map(np.array, state.replace(extra={**state.extra}))
        state = state.replace(extra={"mask": masks, "ready": np.asarray(True)})
    batch = _batch(config)
    forward = _training_forward(setup.modules["seg"])
    expected = _expected_loss(config, forward, state, batch, kind, masks)
    step = trainer.jit_train_step(config, setup)
    _, metrics = step(state, mesh_lib.to_global(batch, mesh))
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=2e-5)
    assert ("loss_whitening" in metrics) == bool(kind)
    if kind == "isw":
        _, metrics = step(not_ready, mesh_lib.to_global(batch, mesh))
        assert float(metrics["loss_whitening"]) == 0.0
        expected = _expected_loss(config, forward, not_ready, batch, "")
        np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=2e-5)


@pytest.mark.slow  # ~35 s: two step compilations.
def test_isw_loss_is_off_before_the_mask(data_dir):
    """Before the mask pass ISW trains on the CE terms alone: the same update as 'base' on
    the same network (the instance norms are part of both)."""
    config = _config(data_dir, "isw")
    setup, state, mesh = _setup(config)
    batch = mesh_lib.to_global(_batch(config), mesh)
    plain_state = jax.tree.map(np.array, state.replace(extra={}))
    isw_state, isw_metrics = trainer.jit_train_step(config, setup)(state, batch)
    assert float(isw_metrics["loss_whitening"]) == 0.0
    plain = _config(data_dir, "isw")
    plain.whitening.kind = ""
    plain_setup = trainer.build(plain, mesh)
    plain_state, _ = trainer.jit_train_step(plain, plain_setup)(plain_state, batch)
    leaves = zip(
        jax.tree.leaves(isw_state.params), jax.tree.leaves(plain_state.params), strict=True
    )
    for a, b in leaves:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# Slow run (11 s): the default ISW step test covers the whitening loss; the mask pass also
# runs in the slow 1-vs-8 test.
@pytest.mark.slow
def test_mask_pass_matches_numpy(data_dir):
    """The mask of `after_step` at (cov_stat_epoch + 1) x epoch_steps equals a NumPy
    re-computation: per pair (photometric, original) of each trial's stream batches, the
    unbiased variance of each upper covariance entry, averaged over the first
    images_per_trial pairs, top entries above the lowest of 3 k-means clusters (the kmeans1d
    package, as RobustNet), AND over trials. Other steps and a ready state do nothing."""
    kmeans1d = pytest.importorskip("kmeans1d")
    config = _config(data_dir, "isw")
    setup, state, mesh = _setup(config)
    kwargs = {"config": config, "modules": setup.modules, "mesh": mesh}
    step = robustnet.mask_step(config)
    assert step == (config.whitening.cov_stat_epoch + 1) * config.whitening.epoch_steps
    assert robustnet.after_step(state, step - 1, **kwargs) is None
    new_state, summary = robustnet.after_step(state, step, **kwargs)
    assert bool(new_state.extra["ready"])
    assert robustnet.after_step(new_state, step, **kwargs) is None

    w = config.whitening
    model = setup.modules["seg"]
    variables = {"params": state.params["seg"], "batch_stats": state.batch_stats}
    reader = input_pipeline.open_reader(w.stream, config.data)
    features = jax.jit(lambda v, x: common.forward(model, v, x, train=False, features=True))
    expected = {}
    for trial in range(w.trials):
        batches = input_pipeline.train_iterator(
            reader, w.stream, config.data, global_batch_size=w.batch_size,
            seed=(config.seed, isw_mask.TRIAL_SEED_OFFSET + trial), start=0,
        )  # fmt: skip
        covs = {s: [] for s in new_state.extra["mask"]}
        for _ in range(-(-w.images_per_trial // w.batch_size)):
            group = next(batches)["group"]
            for images in (group["image"], group["clean"]):
                _, _, sown = features(variables, images)
                for slot, pieces in covs.items():
                    f = np.asarray(sown[PREFIX + slot], np.float64)
                    b, h, wd, c = f.shape
                    flat = f.reshape(b, h * wd, c)
                    pieces.append(np.einsum("bnc,bnd->bcd", flat, flat) / (h * wd - 1))
        for slot, pieces in covs.items():
            # Batches alternate noisy, clean: pair them back up, keep the first pairs.
            noisy = np.concatenate(pieces[0::2])[: w.images_per_trial]
            clean = np.concatenate(pieces[1::2])[: w.images_per_trial]
            pair_var = np.var(np.stack([noisy, clean]), axis=0, ddof=1)
            variance = np.triu(pair_var.mean(0), 1)
            flat = variance.ravel()
            labels, _ = kmeans1d.cluster(flat, 3)
            count = flat.size - labels.count(0)
            mask = np.zeros(flat.size, bool)
            mask[np.argsort(-flat, kind="stable")[:count]] = True
            mask = mask.reshape(variance.shape)
            expected[slot] = mask if slot not in expected else expected[slot] & mask
    for slot, mask in expected.items():
        np.testing.assert_array_equal(np.asarray(new_state.extra["mask"][slot]) > 0, mask)
        assert summary[f"isw/num_sensitive/{slot}"] == mask.sum()
        assert mask.sum() > 0


def test_nearest_labels_match_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    for (h, w), size in [((65, 65), (17, 17)), ((64, 128), (16, 32)), ((768, 768), (49, 49))]:
        labels = rng.integers(0, 20, (2, h, w)).astype(np.uint8)
        ours = np.asarray(segmentation.nearest_labels(labels, size))
        theirs = torch.nn.functional.interpolate(
            torch.from_numpy(labels).float()[:, None], size=size, mode="nearest"
        )[:, 0].numpy()
        np.testing.assert_array_equal(ours, theirs.astype(np.uint8))


def test_config_norms():
    for norm, (instance_norm, kind, weight, relax) in robustnet_config.NORMS.items():
        config = robustnet_config.get_config(f"norm={norm}")
        assert config.model.instance_norm == instance_norm
        assert (config.whitening.kind, config.whitening.weight) == (kind, weight)
        assert config.whitening.relax_denom == relax
    with pytest.raises(ValueError, match="norm='isn'"):
        robustnet_config.get_config("norm=isn")


@pytest.mark.slow  # ~10 s; the pass's per-pair weighting is checked against NumPy by default.
def test_mask_pass_same_on_one_and_eight_devices(data_dir):
    """Each pair's variance is computed on its own and padded rows weigh 0, so the mask does
    not depend on how the pairs are split over devices (8 pairs per step, 12 per trial)."""
    config = _config(data_dir, "isw")
    config.whitening.update({"batch_size": 8, "images_per_trial": 12})
    setup, state, _ = _setup(config)
    variables = jax.device_get({"params": state.params["seg"], "batch_stats": state.batch_stats})
    slots = list(state.extra["mask"])
    model = setup.modules["seg"]
    masks = [
        isw_mask.compute_masks(model, variables, slots, config, mesh_lib.make_mesh(n))
        for n in (1, 8)
    ]
    assert jax.device_count() == 8
    for slot in slots:
        np.testing.assert_array_equal(masks[0][0][slot], masks[1][0][slot])
    assert masks[0][1] == masks[1][1]
