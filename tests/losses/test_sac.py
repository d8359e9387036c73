"""DA-SAC loss pieces against NumPy and PyTorch references.

The NumPy references are written independently (float64, loops). The PyTorch references
transcribe the official NCHW code (visinf/da-sac: `datasets/dataloader_target.py` for the
affines, `models/sac.py` for the teacher path and the loss) and are compared with the
channels-last JAX functions chained the same way.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxda.losses import sac

IGNORE = 255
# One compiled program per shape: much faster than op-by-op dispatch.
_grid_sample = jax.jit(sac.grid_sample, static_argnums=2)
_fuse_views = jax.jit(sac.fuse_views, static_argnums=4)
_pseudo_labels = jax.jit(sac.pseudo_labels, static_argnames="discount")
_weighted_ce = jax.jit(sac.confidence_weighted_ce, static_argnames=("mode", "group"))
BETA, UPPER, LOWER, FOCAL_P, MOMENTUM = 1e-3, 0.75, 0.2, 3, 0.99


def _softmax(x, axis=-1):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    s = x - x.max(-1, keepdims=True)
    return s - np.log(np.exp(s).sum(-1, keepdims=True))


# ---------------------------------------------------------------- views and affines


def _random_views(rng, num_views, height, width):
    """da-sac's view sampling: per-view flip (GuidedRandHFlip), then a zoom crop of the
    flipped image (MaskRandScaleCrop, view 0 untouched). Scales are multiples of 1/16, so
    the integer crop sizes equal s * size exactly. Returns (box, flip, da-sac params)."""
    boxes, flips, params = [], [], []
    for k in range(num_views):
        flip = bool(rng.random() > 0.5)
        dy = dx = 0.0
        s = 1.0
        box = (0.0, 0.0, 1.0, 1.0)
        if k > 0:
            s = rng.integers(8, 16) / 16
            h, w = int(s * height), int(s * width)
            i, j = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            dy, dx = i + h / 2 - height / 2, j + w / 2 - width / 2
            x0, x1 = (1 - (j + w) / width, 1 - j / width) if flip else (j / width, (j + w) / width)
            box = (i / height, x0, (i + h) / height, x1)
        boxes.append(box)
        flips.append(flip)
        params.append((dy, dx, 0.0, 1.0 / s, -1.0 if flip else 1.0))
    return np.array(boxes, np.float32), np.array(flips), params


def _dasac_affine(params, crop):
    """NumPy transcription of da-sac `DataTarget._get_affine` (crop = (H, W))."""
    ratio = crop[0] / crop[1]
    out = np.zeros((len(params), 2, 3), np.float32)
    for n, (dy, dx, alpha, scale, flip) in enumerate(params):
        sin, cos = math.sin(alpha * math.pi / 180), math.cos(alpha * math.pi / 180)
        m = np.array(
            [
                [flip * cos, sin * ratio, -(cos * dx + sin * dy) / (crop[1] // 2)],
                [-sin / ratio, cos, -(-sin * dx + cos * dy) / (crop[0] // 2)],
            ]
        )
        out[n] = m * scale
    return out


def _dasac_affine_inv(affine, params, crop):
    """NumPy transcription of da-sac `DataTarget._get_affine_inv`."""
    ratio = crop[0] / crop[1]
    a, inv = affine.astype(np.float64), affine.astype(np.float64).copy()
    inv[:, 0, 1] = a[:, 1, 0] * ratio**2
    inv[:, 1, 0] = a[:, 0, 1] / ratio**2
    inv[:, 0, 2] = -(inv[:, 0, 0] * a[:, 0, 2] + inv[:, 0, 1] * a[:, 1, 2])
    inv[:, 1, 2] = -(inv[:, 1, 0] * a[:, 0, 2] + inv[:, 1, 1] * a[:, 1, 2])
    scale = np.array([p[3] for p in params])
    return (inv / scale[:, None, None] ** 2).astype(np.float32)


@pytest.mark.parametrize("crop", [(64, 128), (96, 96)])
def test_view_affines_match_dasac(crop):
    rng = np.random.default_rng(0)
    box, flip, params = _random_views(rng, 12, *crop)
    assert flip.any() and not flip.all()
    affine, affine_inv = sac.view_affines(box, flip)
    ref = _dasac_affine(params, crop)
    np.testing.assert_allclose(affine, ref, atol=1e-6)
    np.testing.assert_allclose(affine_inv, _dasac_affine_inv(ref, params, crop), atol=1e-6)

    # The two are inverse maps.
    def full(a):
        return np.concatenate([np.asarray(a), np.tile([[[0, 0, 1.0]]], (12, 1, 1))], 1)

    np.testing.assert_allclose(
        full(affine) @ full(affine_inv), np.tile(np.eye(3), (12, 1, 1)), atol=1e-5
    )


def _view_pixel_to_ref(i, j, view_size, box, flip, ref_size):
    """Reference pixel-index coordinates of view pixels (i, j): the box convention itself."""
    (h, w), (hr, wr) = view_size, ref_size
    u, v = (j + 0.5) / w, (i + 0.5) / h  # 0..1 across the view
    u = 1 - u if flip else u
    y0, x0, y1, x1 = box
    return (y0 + (y1 - y0) * v) * hr - 0.5, (x0 + (x1 - x0) * u) * wr - 0.5


@pytest.mark.parametrize("flip", [False, True])
def test_view_affines_warp_linear_maps(flip):
    """Bilinear sampling reproduces linear maps inside the frame: warping a ramp with the
    affines must give the ramp at the coordinates the box convention predicts."""
    ref_size, view_size = (16, 24), (12, 20)
    box = np.array([[0.2, 0.25, 0.8, 0.9]], np.float32)
    affine, affine_inv = sac.view_affines(box, np.array([flip]))

    def ramp(y, x):
        return 0.3 * y - 0.7 * x + 2.0

    # Reference -> view (affine_inv samples the reference at the view's points).
    ref = ramp(*np.meshgrid(np.arange(16.0), np.arange(24.0), indexing="ij"))[None, ..., None]
    view = np.asarray(_grid_sample(ref, affine_inv, view_size))[0, ..., 0]
    ys, xs = np.meshgrid(np.arange(12), np.arange(20), indexing="ij")
    y, x = _view_pixel_to_ref(ys, xs, view_size, box[0], flip, ref_size)
    inside = (y >= 0) & (y <= 15) & (x >= 0) & (x <= 23)
    assert inside.sum() > 100
    np.testing.assert_allclose(view[inside], ramp(y, x)[inside], atol=1e-4)
    # View -> reference (affine samples the view at the reference's points).
    vmap = ramp(*np.meshgrid(np.arange(12.0), np.arange(20.0), indexing="ij"))[None, ..., None]
    back = np.asarray(_grid_sample(vmap, affine, ref_size))[0, ..., 0]
    ys, xs = np.meshgrid(np.arange(16), np.arange(24), indexing="ij")
    y0, x0, y1, x1 = box[0]
    v = ((ys + 0.5) / 16 - y0) / (y1 - y0)
    u = ((xs + 0.5) / 24 - x0) / (x1 - x0)
    u = 1 - u if flip else u
    vi, vj = v * 12 - 0.5, u * 20 - 0.5
    ok = (vi >= 0) & (vi <= 11) & (vj >= 0) & (vj <= 19)
    assert ok.sum() > 100
    np.testing.assert_allclose(back[ok], ramp(vi, vj)[ok], atol=1e-4)


# ---------------------------------------------------------------- grid_sample


def _np_grid_sample(maps, affine, out_size):
    """Loop transcription of affine_grid + bilinear grid_sample (zeros, align_corners=False)."""
    n, hi, wi, c = maps.shape
    ho, wo = out_size
    out = np.zeros((n, ho, wo, c))
    for b in range(n):
        a = np.asarray(affine[b], np.float64)
        for i in range(ho):
            for j in range(wo):
                gx, gy = a @ np.array([(2 * j + 1) / wo - 1, (2 * i + 1) / ho - 1, 1.0])
                ix, iy = ((gx + 1) * wi - 1) / 2, ((gy + 1) * hi - 1) / 2
                for yy in (math.floor(iy), math.floor(iy) + 1):
                    for xx in (math.floor(ix), math.floor(ix) + 1):
                        if 0 <= yy < hi and 0 <= xx < wi:
                            weight = (1 - abs(ix - xx)) * (1 - abs(iy - yy))
                            out[b, i, j] += weight * maps[b, yy, xx]
    return out


def _random_affines(rng, n):
    """Zoom in / zoom out / flip / a little rotation and shear, with shifts."""
    scale = rng.choice([0.5, 0.8, 1.0, 1.4, 2.0], size=(n, 2))
    flip = rng.choice([-1.0, 1.0], size=n)
    a = np.zeros((n, 2, 3), np.float32)
    a[:, 0, 0] = scale[:, 0] * flip
    a[:, 1, 1] = scale[:, 1]
    a[:, 0, 1], a[:, 1, 0] = rng.normal(0, 0.1, (2, n))
    a[:, :, 2] = rng.uniform(-0.6, 0.6, (n, 2))
    return a


@pytest.mark.parametrize(("in_size", "out_size"), [((7, 9), (5, 11)), ((6, 6), (6, 6))])
def test_grid_sample_matches_numpy_loops(in_size, out_size):
    rng = np.random.default_rng(1)
    maps = rng.normal(size=(4, *in_size, 3)).astype(np.float32)
    affine = _random_affines(rng, 4)
    got = _grid_sample(maps, affine, out_size)
    np.testing.assert_allclose(got, _np_grid_sample(maps, affine, out_size), atol=1e-5)


def test_grid_sample_matches_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(2)
    for in_size, out_size in [((9, 13), (6, 10)), ((8, 8), (12, 16)), ((5, 7), (5, 7))]:
        maps = rng.normal(size=(6, *in_size, 4)).astype(np.float32)
        affine = _random_affines(rng, 6)
        t_maps = torch.from_numpy(maps).permute(0, 3, 1, 2)
        grid = F.affine_grid(torch.from_numpy(affine), (6, 4, *out_size), align_corners=False)
        want = F.grid_sample(
            t_maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        got = _grid_sample(maps, affine, out_size)
        np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), atol=1e-5)


def test_grid_sample_identity_and_mirror_are_exact():
    rng = np.random.default_rng(3)
    maps = rng.normal(size=(2, 7, 11, 3)).astype(np.float32)
    ident = np.tile(np.array([[1, 0, 0], [0, 1, 0]], np.float32), (2, 1, 1))
    mirror = np.tile(np.array([[-1, 0, 0], [0, 1, 0]], np.float32), (2, 1, 1))
    np.testing.assert_array_equal(_grid_sample(maps, ident, (7, 11)), maps)
    np.testing.assert_array_equal(_grid_sample(maps, mirror, (7, 11)), maps[:, :, ::-1])


# ---------------------------------------------------------------- prior, fusion, labels


def test_update_class_prior_matches_numpy():
    rng = np.random.default_rng(4)
    probs = _softmax(rng.normal(size=(3, 5, 6, 6))).astype(np.float32)
    probs[..., 4] = 0.0  # a class nobody predicts: stays at beta before the momentum step
    prior = np.array([BETA, 0.3, BETA, 0.1, BETA, 0.05], np.float32)
    got = sac.update_class_prior(prior, probs, BETA, MOMENTUM)
    want = prior.astype(np.float64).copy()
    avg = probs.astype(np.float64).mean(axis=(0, 1, 2))
    for c in range(6):
        if want[c] == np.float32(BETA) and avg[c] > 1e-8:
            want[c] = avg[c]
        want[c] = MOMENTUM * want[c] + (1 - MOMENTUM) * avg[c]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(got[4], MOMENTUM * BETA, rtol=1e-6)


def test_fuse_views_identity_views_return_probs():
    rng = np.random.default_rng(5)
    base = _softmax(rng.normal(size=(2, 6, 10, 5))).astype(np.float32)
    probs = np.repeat(base, 4, axis=0)  # 2 images x 4 identical full-box views
    box = np.tile(np.array([0, 0, 1, 1], np.float32), (8, 1))
    affine, affine_inv = sac.view_affines(box, np.zeros(8, bool))
    pad = np.zeros((8, 6, 10), bool)
    refined, count = _fuse_views(probs, affine, affine_inv, pad, 4)
    np.testing.assert_allclose(refined, probs, atol=1e-6)
    np.testing.assert_allclose(count, 4.0, atol=1e-5)
    # Different views of the same box: the normalised mean of the group.
    probs = _softmax(rng.normal(size=(8, 6, 10, 5))).astype(np.float32)
    refined, _ = _fuse_views(probs, affine, affine_inv, pad, 4)
    total = probs.astype(np.float64).reshape(2, 4, 6, 10, 5).sum(1)
    want = np.repeat(total / total.sum(-1, keepdims=True), 4, axis=0)
    np.testing.assert_allclose(refined, want, atol=1e-6)


def test_fuse_views_flipped_view_maps_back_exactly():
    rng = np.random.default_rng(6)
    base = _softmax(rng.normal(size=(1, 6, 10, 5))).astype(np.float32)
    flip = np.array([False, True, True, False])
    probs = np.concatenate([base[:, :, ::-1] if f else base for f in flip])
    box = np.tile(np.array([0, 0, 1, 1], np.float32), (4, 1))
    affine, affine_inv = sac.view_affines(box, flip)
    refined, _ = _fuse_views(probs, affine, affine_inv, np.zeros((4, 6, 10), bool), 4)
    np.testing.assert_allclose(refined, probs, atol=1e-6)


def test_fuse_views_rejects_partial_groups():
    probs = np.ones((6, 4, 4, 3), np.float32) / 3
    a = np.tile(np.array([[1, 0, 0], [0, 1, 0]], np.float32), (6, 1, 1))
    with pytest.raises(ValueError, match="num_views=4"):
        _fuse_views(probs, a, a, np.zeros((6, 4, 4), bool), 4)


def _np_pseudo_labels(refined, prior, pad, upper, lower, beta, discount):
    n, h, w, c = refined.shape
    conf, y = refined.max(-1), refined.argmax(-1)
    labels = np.full((n, h, w), IGNORE)
    for b in range(n):
        for k in range(c):
            peak = conf[b][y[b] == k].max() if (y[b] == k).any() else 0.0
            thr = peak * upper * ((1 - math.exp(-prior[k] / beta)) if discount else 1.0)
            thr = max(thr, lower)
            keep = (y[b] == k) & (conf[b] > thr) & ~pad[b]
            labels[b][keep] = k
    return labels, conf


@pytest.mark.parametrize(
    ("upper", "lower", "discount"), [(UPPER, LOWER, True), (UPPER, 0.5, False), (1.0, 0.0, False)]
)
def test_pseudo_labels_match_numpy(upper, lower, discount):
    rng = np.random.default_rng(7)
    refined = _softmax(2 * rng.normal(size=(3, 8, 9, 5))).astype(np.float32)
    refined[0, :2] = 0.0  # uncovered pixels: argmax 0, conf 0
    prior = np.array([0.3, 2e-3, 5e-4, 1e-5, 0.2], np.float32)
    pad = rng.random((3, 8, 9)) < 0.1
    labels, conf = _pseudo_labels(
        refined, prior, pad, upper=upper, lower=lower, beta=BETA, discount=discount
    )
    want_labels, want_conf = _np_pseudo_labels(refined, prior, pad, upper, lower, BETA, discount)
    np.testing.assert_array_equal(labels, want_labels)
    np.testing.assert_allclose(conf, want_conf, rtol=1e-6)
    assert labels.dtype == jnp.int32
    if upper == 1.0:  # strict '>': not even the peak pixel passes its own class's threshold
        assert (want_labels == IGNORE).all()
    else:
        assert (want_labels != IGNORE).any() and (want_labels == IGNORE).any()


def test_focal_weights():
    prior = np.array([-0.2, 0.0, 0.1, 0.5, 1.0], np.float32)
    want = (1 - np.maximum(prior.astype(np.float64), 0)) ** 3
    np.testing.assert_allclose(sac.focal_weights(prior, 3), want, rtol=1e-6)


# ---------------------------------------------------------------- losses


def _np_weighted_nll(logits, labels, weights):
    logp = _log_softmax(logits)
    loss = np.zeros(labels.shape)
    for idx in np.ndindex(labels.shape):
        if labels[idx] != IGNORE:
            loss[idx] = -weights[labels[idx]] * logp[idx][labels[idx]]
    return loss


def _loss_inputs(seed, n=4, h=5, w=6, c=4):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, h, w, c)).astype(np.float32)
    labels = rng.integers(0, c, size=(n, h, w))
    labels[rng.random((n, h, w)) < 0.3] = IGNORE
    weights = rng.uniform(0.2, 1.0, c).astype(np.float32)
    conf = rng.uniform(0, 1, (n, h, w)).astype(np.float32)
    return logits, labels, weights, conf


def test_confidence_weighted_ce_matches_numpy():
    logits, labels, weights, conf = _loss_inputs(8)
    loss = _np_weighted_nll(logits, labels, weights)
    got = _weighted_ce(logits, labels, weights, conf, mode="pixel")
    np.testing.assert_allclose(got, (loss * conf).mean(), rtol=1e-5)
    for group in (1, 2, 4):
        chunks = []
        for g in range(4 // group):
            sl = slice(g * group, (g + 1) * group)
            chunks.append(
                np.mean([[loss[j] * conf[i] for j in range(4)[sl]] for i in range(4)[sl]])
            )
        got = _weighted_ce(logits, labels, weights, conf, mode="broadcast", group=group)
        np.testing.assert_allclose(got, np.mean(chunks), rtol=1e-5)


def test_confidence_weighted_ce_matches_torch_broadcast():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    logits, labels, weights, conf = _loss_inputs(9, n=6)
    t_logits = torch.from_numpy(logits).permute(0, 3, 1, 2)
    per_gpu = []
    for g in range(3):
        sl = slice(2 * g, 2 * g + 2)
        ce = F.cross_entropy(
            t_logits[sl],
            torch.from_numpy(labels[sl]),
            weight=torch.from_numpy(weights),
            ignore_index=IGNORE,
            reduction="none",
        )
        per_gpu.append((ce * torch.from_numpy(conf[sl])[:, None]).mean().item())
    got = _weighted_ce(logits, labels, weights, conf, mode="broadcast", group=2)
    np.testing.assert_allclose(got, np.mean(per_gpu), rtol=1e-5)


def test_confidence_weighted_ce_rejects_bad_arguments():
    logits, labels, weights, conf = _loss_inputs(10, n=3)
    with pytest.raises(ValueError, match="pixel"):
        sac.confidence_weighted_ce(logits, labels, weights, conf, mode="mean")
    with pytest.raises(ValueError, match=r"3 views.*group=2"):
        sac.confidence_weighted_ce(logits, labels, weights, conf, mode="broadcast", group=2)


def test_cross_entropy_all_pixels():
    torch = pytest.importorskip("torch")
    logits, labels, _, _ = _loss_inputs(11)
    want = _np_weighted_nll(logits, labels, np.ones(4)).mean()
    got = sac.cross_entropy_all_pixels(logits, labels)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    t = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits).permute(0, 3, 1, 2),
        torch.from_numpy(labels),
        ignore_index=IGNORE,
        reduction="none",
    ).mean()
    np.testing.assert_allclose(got, t.item(), rtol=1e-5)


# ---------------------------------------------------------------- whole teacher path


def _torch_teacher_path(torch, probs, logits, affine, affine_inv, ignore, running_conf, T):
    """PyTorch NCHW transcription of da-sac's teacher path and `_focal_ce_conf` (2 GPUs' worth
    of views per call to the loss, averaged as DDP does)."""
    F = torch.nn.functional
    B, C, H, W = probs.shape
    # _update_running_conf
    probs_avg = probs.mean(0).view(C, -1).mean(-1)
    new_index = (probs_avg > 1e-8) & (running_conf == BETA)
    running_conf = running_conf.clone()
    running_conf[new_index] = probs_avg[new_index]
    running_conf *= MOMENTUM
    running_conf += (1 - MOMENTUM) * probs_avg
    # _refine with _avg_pool
    probs = probs * (1 - ignore[:, None].float())
    grid = F.affine_grid(affine, size=probs.size(), align_corners=False)
    aligned = F.grid_sample(probs, grid, align_corners=False)
    grid_inv = F.affine_grid(affine_inv, size=probs.size(), align_corners=False)
    valid = F.grid_sample(torch.ones_like(aligned), grid_inv, align_corners=False)
    probs_T = (aligned * valid).view(-1, T, C, H, W)
    avg = probs_T.sum(1, keepdim=True)
    total = avg.sum(2, keepdim=True)
    mask = (total > 0.1).float()
    avg = avg / total.clamp(1e-3)
    avg = avg.expand(-1, T, -1, -1, -1).flatten(0, 1)
    mask = mask.expand(-1, T, -1, -1, -1).flatten(0, 1)
    refined = F.grid_sample(avg, grid_inv, align_corners=False)
    refined = refined * F.grid_sample(mask, grid_inv, align_corners=False)
    count = total.expand(-1, T, -1, -1, -1).flatten(0, 1)[:, 0]
    # _pseudo_labels_probs
    max_conf, max_idx = refined.max(1, keepdim=True)
    peaks = torch.zeros_like(refined).scatter_(1, max_idx, max_conf)
    top = peaks.view(B, C, -1).max(-1)[0] * UPPER
    top = top * (1.0 - torch.exp(-running_conf / BETA)).view(1, C)
    top = top.clamp(LOWER)
    drop = peaks.gt(top.view(B, C, 1, 1)).sum(1, keepdim=True) != 1
    labels = max_idx.clone()
    labels[drop] = IGNORE
    labels = labels.squeeze(1)
    labels[ignore] = IGNORE
    # _focal_ce_conf, 2 views per GPU
    weight = (1 - running_conf.clamp(0.0)) ** FOCAL_P
    losses = []
    for g in range(B // 2):
        sl = slice(2 * g, 2 * g + 2)
        ce = F.cross_entropy(
            logits[sl], labels[sl], weight=weight, ignore_index=IGNORE, reduction="none"
        )
        losses.append((ce * max_conf[sl]).mean())
    return running_conf, refined, count, labels, max_conf[:, 0], torch.stack(losses).mean()


def _jax_teacher_path(probs, logits, box, flip, pad, prior):
    prior = sac.update_class_prior(prior, probs, BETA, MOMENTUM)
    affine, affine_inv = sac.view_affines(box, flip)
    refined, count = sac.fuse_views(probs, affine, affine_inv, pad, 4)
    labels, conf = sac.pseudo_labels(refined, prior, pad, upper=UPPER, lower=LOWER, beta=BETA)
    weights = sac.focal_weights(prior, FOCAL_P)
    loss = sac.confidence_weighted_ce(logits, labels, weights, conf, mode="broadcast", group=2)
    return prior, refined, count, labels, conf, loss


def test_teacher_path_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(12)
    H, W, C = 16, 32, 5
    boxes, flips, params = [], [], []
    for _ in range(2):  # 2 images x 4 views
        b, f, p = _random_views(rng, 4, H, W)
        boxes.append(b)
        flips.append(f)
        params += p
    box, flip = np.concatenate(boxes), np.concatenate(flips)
    affine = _dasac_affine(params, (H, W))
    affine_inv = _dasac_affine_inv(affine, params, (H, W))
    # Teacher logits with a rare class, so that the threshold discount matters.
    t_logits = 2 * rng.normal(size=(8, H, W, C)) + np.array([0, 0.5, 0, -1, -7.0])
    probs = _softmax(t_logits).astype(np.float32)
    logits = rng.normal(size=(8, H, W, C)).astype(np.float32)
    pad = np.zeros((8, H, W), bool)
    pad[1, -3:] = pad[2, :, :4] = pad[6, -5:] = True
    prior = np.array([BETA, 0.3, BETA, 0.1, BETA], np.float32)

    def nchw(x):
        return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)

    want = _torch_teacher_path(
        torch,
        nchw(probs),
        nchw(logits),
        torch.from_numpy(affine),
        torch.from_numpy(affine_inv),
        torch.from_numpy(pad),
        torch.from_numpy(prior),
        4,
    )
    want_prior, want_refined, want_count, want_labels, want_conf, want_loss = want
    got = jax.jit(_jax_teacher_path)(probs, logits, box, flip, pad, prior)
    got_prior, got_refined, got_count, got_labels, got_conf, got_loss = got

    np.testing.assert_allclose(got_prior, want_prior.numpy(), rtol=1e-5)
    np.testing.assert_allclose(got_refined, want_refined.permute(0, 2, 3, 1).numpy(), atol=1e-5)
    np.testing.assert_allclose(got_count, want_count.numpy(), atol=1e-5)
    np.testing.assert_array_equal(got_labels, want_labels.numpy())
    np.testing.assert_allclose(got_conf, want_conf.numpy(), atol=1e-5)
    np.testing.assert_allclose(got_loss, want_loss.item(), rtol=1e-5)
    # The case is not degenerate: zoomed views, uncovered pixels, a discounted threshold,
    # kept and dropped pixels.
    assert (np.asarray(got_count) < 3.5).any() and (np.asarray(got_count) > 3.5).any()
    assert (1 - np.exp(-np.asarray(got_prior) / BETA)).min() < 0.9
    labels = np.asarray(got_labels)
    assert (labels == IGNORE).mean() > 0.05 and (labels != IGNORE).mean() > 0.05
    assert (labels[pad] == IGNORE).all()
