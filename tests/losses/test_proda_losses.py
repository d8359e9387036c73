"""ProDA losses and prototype updates against NumPy (and PyTorch) transcriptions.

The NumPy references are written independently, in float64, looping where the
official code (microsoft/ProDA, models/adaptation_modelv2.py) loops. The PyTorch
references transcribe the official lines in NCHW with ProDA's ignore label 250.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxda.losses import proda

IGNORE = 255


def _softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    s = x - x.max(-1, keepdims=True)
    return s - np.log(np.exp(s).sum(-1, keepdims=True))


def _xlogx(t):
    return np.where(t > 0, t * np.log(np.where(t > 0, t, 1.0)), 0.0)


def _labels(rng, shape, k, ignore_frac=0.3):
    labels = rng.integers(0, k, size=shape)
    labels[rng.random(shape) < ignore_frac] = IGNORE
    return labels


def _np_rce(logits, labels, k):
    total, valid = 0.0, 0
    p = np.clip(_softmax(logits), 1e-7, 1.0)
    n, h, w, _ = logits.shape
    for i in range(n):
        for y in range(h):
            for x in range(w):
                lab = labels[i, y, x]
                if lab == IGNORE:
                    continue
                valid += 1
                log_onehot = np.full(k, np.log(1e-4))
                log_onehot[lab] = 0.0
                total += -np.sum(p[i, y, x] * log_onehot)
    return total / (valid + 1e-6)


def _np_ce(logits, labels):
    lp = _log_softmax(logits)
    valid = labels != IGNORE
    picked = np.take_along_axis(lp, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    return -picked[valid].mean()


def _np_distances(features, prototypes):
    f = np.asarray(features, np.float64)
    c = np.asarray(prototypes, np.float64)
    out = np.zeros((*f.shape[:3], c.shape[0]))
    for k in range(c.shape[0]):  # ProDA loops over classes with torch.norm.
        out[..., k] = np.sqrt(((f - c[k]) ** 2).sum(-1))
    return out


def _np_consistency(student_features, teacher_distances, valid, prototypes, temperature):
    teacher = _softmax(-np.asarray(teacher_distances, np.float64) * temperature)
    student = _log_softmax(-_np_distances(student_features, prototypes) * temperature)
    kl = _xlogx(teacher) - teacher * student
    mask = np.repeat(valid[..., None], teacher.shape[-1], -1).astype(np.float64)
    return (kl * mask).sum() / mask.sum()


def _np_class_means(features, logits, min_pixels=10):
    n, _, _, k = logits.shape
    d = features.shape[-1]
    pred = np.argmax(logits, -1)
    vectors = np.zeros((n, k, d))
    present = np.zeros((n, k), bool)
    for i in range(n):
        for t in range(k):
            sel = pred[i] == t
            if sel.sum() == 0 or sel.sum() < min_pixels:
                continue
            vectors[i, t] = np.asarray(features[i], np.float64)[sel].mean(0)
            present[i, t] = True
    return vectors, present


def _np_update(protos, counts, vectors, present, name, momentum=None, cap=3000):
    protos = np.array(protos, np.float64)
    counts = np.array(counts, np.float64)
    for i in range(vectors.shape[0]):
        for t in range(vectors.shape[1]):
            if not present[i, t]:
                continue
            v = np.asarray(vectors[i, t], np.float64)
            if v.sum() == 0:
                continue
            if name == "mean":
                protos[t] = protos[t] * counts[t] + v
                counts[t] += 1
                protos[t] = protos[t] / counts[t]
                counts[t] = min(counts[t], cap)
            else:
                protos[t] = protos[t] * (1 - momentum) + momentum * v
                counts[t] += 1
                counts[t] = min(counts[t], cap)
    return protos, counts


# ---------------------------------------------------------------- (symmetric) CE


def test_reverse_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(2, 5, 6, 7)) * 4).astype(np.float32)
    labels = _labels(rng, (2, 5, 6), 7)
    got = float(proda.reverse_cross_entropy(jnp.asarray(logits), jnp.asarray(labels)))
    np.testing.assert_allclose(got, _np_rce(logits, labels, 7), rtol=1e-5)
    # Logits at ignored pixels do not matter.
    logits2 = np.where((labels == IGNORE)[..., None], 50.0, logits).astype(np.float32)
    got2 = float(proda.reverse_cross_entropy(jnp.asarray(logits2), jnp.asarray(labels)))
    np.testing.assert_allclose(got2, got, rtol=1e-6)
    # Custom ignore value and all-ignored input.
    lab250 = np.where(labels == IGNORE, 250, labels)
    got3 = proda.reverse_cross_entropy(jnp.asarray(logits), jnp.asarray(lab250), ignore_label=250)
    np.testing.assert_allclose(float(got3), got, rtol=1e-6)
    none = jnp.full((2, 5, 6), IGNORE, jnp.int32)
    assert float(proda.reverse_cross_entropy(jnp.asarray(logits), none)) == 0.0


def test_symmetric_cross_entropy_matches_numpy():
    rng = np.random.default_rng(1)
    logits = (rng.normal(size=(2, 4, 5, 6)) * 3).astype(np.float32)
    labels = _labels(rng, (2, 4, 5), 6)
    alpha, beta = 0.1, 1.0
    want = alpha * _np_ce(logits, labels) + beta * _np_rce(logits, labels, 6)
    fn = jax.jit(proda.symmetric_cross_entropy, static_argnums=(2, 3))
    got = float(fn(jnp.asarray(logits), jnp.asarray(labels), alpha, beta))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_reverse_cross_entropy_matches_official_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(2)
    k = 5
    logits = (rng.normal(size=(2, 4, 6, k)) * 4).astype(np.float32)
    labels = _labels(rng, (2, 4, 6), k)

    # Official `rce` (NCHW, ignore 250), verbatim apart from the device.
    pred_t = torch.tensor(logits).permute(0, 3, 1, 2).requires_grad_(True)
    lab_t = torch.tensor(np.where(labels == IGNORE, 250, labels))
    pred = F.softmax(pred_t, dim=1)
    pred = torch.clamp(pred, min=1e-7, max=1.0)
    mask = (lab_t != 250).float()
    lab_t[lab_t == 250] = k
    label_one_hot = F.one_hot(lab_t, k + 1).float()
    label_one_hot = torch.clamp(label_one_hot.permute(0, 3, 1, 2)[:, :-1, :, :], min=1e-4, max=1.0)
    rce = -(torch.sum(pred * torch.log(label_one_hot), dim=1) * mask).sum() / (mask.sum() + 1e-6)
    rce.backward()
    want_grad = pred_t.grad.permute(0, 2, 3, 1).numpy()

    value, grad = jax.value_and_grad(proda.reverse_cross_entropy)(
        jnp.asarray(logits), jnp.asarray(labels)
    )
    np.testing.assert_allclose(float(value), rce.item(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------- regulariser


def test_regulariser_matches_numpy():
    rng = np.random.default_rng(3)
    logits = (rng.normal(size=(2, 3, 4, 5)) * 3).astype(np.float32)
    lp = _log_softmax(logits)
    n, h, w, c = logits.shape
    mrkld = -lp.sum() / (n * h * w * c)
    mrent = (np.exp(lp) * lp).sum() / (n * h * w)
    x = jnp.asarray(logits)
    np.testing.assert_allclose(float(proda.regulariser(x, "mrkld")), mrkld, rtol=1e-5)
    np.testing.assert_allclose(float(proda.regulariser(x, "MRENT")), mrent, rtol=1e-5)
    assert mrent < 0 < mrkld
    with pytest.raises(ValueError, match="Unknown regulariser"):
        proda.regulariser(x, "l2")


# ---------------------------------------------------------------- distances


def test_prototype_distances_match_numpy():
    rng = np.random.default_rng(4)
    # Offset features and prototypes away from the origin to stress cancellation.
    features = (rng.normal(size=(2, 6, 7, 32)) + 3.0).astype(np.float32)
    prototypes = (rng.normal(size=(5, 32)) + 3.0).astype(np.float32)
    features[0, 0, 0] = prototypes[2]  # one exact zero distance
    got = jax.jit(proda.prototype_distances)(jnp.asarray(features), jnp.asarray(prototypes))
    want = _np_distances(features, prototypes)
    assert got.shape == (2, 6, 7, 5) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=2e-3)
    far = want > 1.0
    np.testing.assert_allclose(np.asarray(got)[far], want[far], rtol=1e-5)


def test_prototype_distances_gradient_finite_at_zero():
    prototypes = jnp.asarray(np.random.default_rng(5).normal(size=(3, 8)), jnp.float32)
    features = jnp.broadcast_to(prototypes[1], (1, 2, 2, 8))

    def loss(f, c):
        return jnp.sum(proda.prototype_distances(f, c))

    d = proda.prototype_distances(features, prototypes)
    assert np.all(np.asarray(d[..., 1]) < 1e-3)
    gf, gc = jax.grad(loss, argnums=(0, 1))(features, prototypes)
    assert np.all(np.isfinite(np.asarray(gf))) and np.all(np.isfinite(np.asarray(gc)))
    # Exactly zero squared distance (origin) hits the clamp: gradient 0, not NaN.
    zeros = jnp.zeros((1, 1, 1, 4))
    g0 = jax.grad(lambda f: jnp.sum(proda.prototype_distances(f, jnp.zeros((2, 4)))))(zeros)
    np.testing.assert_array_equal(np.asarray(g0), 0.0)


# ---------------------------------------------------------------- rectification


def test_rectification_weights_and_rectify_match_numpy():
    rng = np.random.default_rng(6)
    k = 6
    dist = (rng.random(size=(2, 5, 4, k)) * 10).astype(np.float32)
    soft = _softmax(rng.normal(size=(2, 5, 4, k)) * 2).astype(np.float32)
    temperature = 0.7
    d = dist.astype(np.float64)
    w_np = _softmax(-(d - d.min(-1, keepdims=True)) * temperature)
    w = proda.rectification_weights(jnp.asarray(dist), temperature)
    np.testing.assert_allclose(np.asarray(w), w_np, rtol=1e-5, atol=1e-7)

    for threshold in (0.0, 0.5):
        rect = w_np * soft
        want = rect.argmax(-1)
        conf = (rect / rect.sum(-1, keepdims=True)).max(-1)
        want = np.where(conf < threshold, IGNORE, want)
        got = proda.rectify(jnp.asarray(soft), w, threshold)
        np.testing.assert_array_equal(np.asarray(got), want)
        if threshold == 0.0:
            assert not np.any(want == IGNORE)
        else:
            assert np.any(want == IGNORE) and np.any(want != IGNORE)

    # Official quirk: an all-zero product has NaN confidence, never rejected.
    zero = jnp.zeros((1, 1, 1, k))
    assert int(proda.rectify(zero, zero + 1.0 / k, 0.9)[0, 0, 0]) == 0


# ---------------------------------------------------------------- consistency


def _consistency_inputs(seed, k=5, d=16):
    rng = np.random.default_rng(seed)
    student = rng.normal(size=(2, 4, 5, d)).astype(np.float32)
    prototypes = rng.normal(size=(k, d)).astype(np.float32)
    teacher_dist = (rng.random(size=(2, 4, 5, k)) * 8).astype(np.float32)
    valid = rng.random(size=(2, 4, 5)) > 0.3
    return student, teacher_dist, valid, prototypes


def test_prototype_consistency_matches_numpy():
    student, teacher_dist, valid, prototypes = _consistency_inputs(7)
    temperature = 1.3
    want = _np_consistency(student, teacher_dist, valid, prototypes, temperature)
    # Invalid pixels carry ProDA's padding value; it must not matter.
    padded = np.where(valid[..., None], teacher_dist, 250.0).astype(np.float32)
    fn = jax.jit(proda.prototype_consistency)
    got = fn(jnp.asarray(student), jnp.asarray(padded), jnp.asarray(valid), prototypes, temperature)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    none = jnp.zeros(valid.shape, bool)
    assert float(fn(student, padded, none, prototypes, temperature)) == 0.0


def test_prototype_consistency_matches_official_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    student, teacher_dist, valid, prototypes = _consistency_inputs(8)
    k = prototypes.shape[0]
    temperature = 1.0
    padded = np.where(valid[..., None], teacher_dist, 250.0).astype(np.float32)

    # Official `step` lines (NCHW); distances as `feat_prototype_distance_module`.
    feat = torch.tensor(student).permute(0, 3, 1, 2).requires_grad_(True)
    objective_vectors = torch.tensor(prototypes)
    ema2strong_feat_proto_distance = torch.tensor(padded).permute(0, 3, 1, 2)
    mask = (ema2strong_feat_proto_distance != 250).float()
    teacher = F.softmax(-ema2strong_feat_proto_distance * temperature, dim=1)
    _, _, H, W = feat.shape
    cols = []
    for i in range(k):
        cols.append(
            torch.norm(objective_vectors[i].reshape(-1, 1, 1).expand(-1, H, W) - feat, 2, dim=1)
        )
    strong_feat_proto_distance = torch.stack(cols, 1)
    student_t = F.log_softmax(-strong_feat_proto_distance * temperature, dim=1)
    loss_consist = F.kl_div(student_t, teacher, reduction="none")
    loss_consist = (loss_consist * mask).sum() / mask.sum()
    loss_consist.backward()
    assert mask.sum().item() == k * valid.sum()

    value, grad = jax.value_and_grad(proda.prototype_consistency)(
        jnp.asarray(student), jnp.asarray(padded), jnp.asarray(valid), prototypes, temperature
    )
    np.testing.assert_allclose(float(value), loss_consist.item(), rtol=1e-5)
    want_grad = feat.grad.permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-3, atol=1e-7)


# ---------------------------------------------------------------- distillation


def test_distillation_matches_numpy():
    rng = np.random.default_rng(9)
    s = (rng.normal(size=(2, 3, 4, 6)) * 3).astype(np.float32)
    t = (rng.normal(size=(2, 3, 4, 6)) * 3).astype(np.float32)
    tp = _softmax(t)
    want_proda = np.mean(_xlogx(tp) - tp * _softmax(s))
    want_kl = np.mean(_xlogx(tp) - tp * _log_softmax(s))
    got_proda = float(proda.distillation(jnp.asarray(s), jnp.asarray(t), "proda"))
    got_kl = float(proda.distillation(jnp.asarray(s), jnp.asarray(t), "kl"))
    np.testing.assert_allclose(got_proda, want_proda, rtol=1e-5)
    np.testing.assert_allclose(got_kl, want_kl, rtol=1e-5)
    assert abs(got_proda - got_kl) > 1e-3
    assert got_kl >= 0
    same = float(proda.distillation(jnp.asarray(t), jnp.asarray(t), "kl"))
    assert abs(same) < 1e-6
    # The teacher is stop-gradient.
    g = jax.grad(lambda b: proda.distillation(jnp.asarray(s), b, "kl"))(jnp.asarray(t))
    np.testing.assert_array_equal(np.asarray(g), 0.0)
    with pytest.raises(ValueError, match="Unknown distillation"):
        proda.distillation(jnp.asarray(s), jnp.asarray(t), "mse")


def test_distillation_proda_matches_official_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(10)
    s = (rng.normal(size=(2, 3, 4, 6)) * 3).astype(np.float32)
    t = (rng.normal(size=(2, 3, 4, 6)) * 3).astype(np.float32)

    # Official `step_distillation` lines (NCHW).
    out = torch.tensor(s).permute(0, 3, 1, 2).requires_grad_(True)
    student = F.softmax(out, dim=1)
    with torch.no_grad():
        teacher = F.softmax(torch.tensor(t).permute(0, 3, 1, 2), dim=1)
    loss_kd = F.kl_div(student, teacher, reduction="none")
    mask = (teacher != 250).float()
    loss_kd = (loss_kd * mask).sum() / mask.sum()
    loss_kd.backward()

    value, grad = jax.value_and_grad(proda.distillation)(jnp.asarray(s), jnp.asarray(t), "proda")
    np.testing.assert_allclose(float(value), loss_kd.item(), rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(grad), out.grad.permute(0, 2, 3, 1).numpy(), rtol=1e-4, atol=1e-9
    )


# ---------------------------------------------------------------- prototypes


def _class_mean_inputs(seed, n=3, h=8, w=10, k=5, d=8):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, h, w, d)).astype(np.float32)
    logits = rng.normal(size=(n, h, w, k)).astype(np.float32)
    # Image 0: class 4 absent; image 1: class 3 on only 5 pixels (< 10).
    logits[0, ..., 4] = -100.0
    logits[1, ..., 3] = -100.0
    logits[1, 0, :5, 3] = 100.0
    return features, logits


def test_class_mean_features_match_numpy():
    features, logits = _class_mean_inputs(11)
    vectors, present = jax.jit(proda.class_mean_features)(features, logits)
    want_v, want_p = _np_class_means(features, logits)
    assert vectors.shape == (3, 5, 8) and present.shape == (3, 5)
    np.testing.assert_array_equal(np.asarray(present), want_p)
    assert not want_p[0, 4] and not want_p[1, 3] and want_p.sum() >= 8
    np.testing.assert_allclose(np.asarray(vectors)[want_p], want_v[want_p], rtol=1e-5, atol=1e-6)
    _, p5 = proda.class_mean_features(features, logits, min_pixels=5)
    assert bool(p5[1, 3])


def test_class_mean_features_match_official_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    features, logits = _class_mean_inputs(12)
    k = logits.shape[-1]
    feat_cls = torch.tensor(features).permute(0, 3, 1, 2)
    outputs = torch.tensor(logits).permute(0, 3, 1, 2)

    def process_label(label):
        batch, _, w, h = label.size()
        pred1 = torch.zeros(batch, k + 1, w, h)
        id = torch.where(label < k, label, torch.Tensor([k]))
        return pred1.scatter_(1, id.long(), 1)

    # Official `calculate_mean_vector` with labels=None, thresh=None.
    outputs_softmax = F.softmax(outputs, dim=1)
    conf = outputs_softmax.max(dim=1, keepdim=True)[0]
    mask = conf.ge(-1)
    outputs_pred = process_label(outputs_softmax.argmax(dim=1, keepdim=True).float())
    scale_factor = F.adaptive_avg_pool2d(outputs_pred * mask, 1)
    want = {}
    for n in range(feat_cls.size()[0]):
        for t in range(k):
            if scale_factor[n][t].item() == 0:
                continue
            if (outputs_pred[n][t] > 0).sum() < 10:
                continue
            s = feat_cls[n] * outputs_pred[n][t] * mask[n]
            want[(n, t)] = (F.adaptive_avg_pool2d(s, 1) / scale_factor[n][t]).squeeze().numpy()

    vectors, present = proda.class_mean_features(features, logits)
    assert {tuple(x) for x in np.argwhere(np.asarray(present))} == set(want)
    for (n, t), v in want.items():
        np.testing.assert_allclose(np.asarray(vectors[n, t]), v, rtol=1e-5, atol=1e-6)


def _update_inputs(seed, n=4, k=5, d=6):
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(k, d)).astype(np.float32)
    counts = np.array([0, 5, 2998, 3000, 99], np.float32)  # cap hit for classes 2, 3
    vectors = rng.normal(size=(n, k, d)).astype(np.float32)
    present = rng.random(size=(n, k)) > 0.3
    present[:, 2] = True  # class 2 in every image: duplicate within the batch, crosses cap
    present[:, 3] = True
    present[0, 1] = present[2, 1] = True
    vectors[2, 1] = 0.0  # all-zero vector: skipped
    vectors[1, 0] = [1.0, -1.0, 2.0, -2.0, 0.5, -0.5]  # zero sum: skipped (official check)
    present[1, 0] = True
    return protos, counts, vectors, present


def test_running_mean_update_matches_numpy():
    protos, counts, vectors, present = _update_inputs(13)
    want_p, want_c = _np_update(protos, counts, vectors, present, "mean")
    fn = jax.jit(proda.update_prototypes_running_mean)
    got_p, got_c = fn(protos, counts, vectors, present)
    np.testing.assert_allclose(np.asarray(got_p), want_p, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got_c), want_c)
    assert got_c.dtype == jnp.float32 and float(got_c[2]) == 3000.0
    # Past the cap the denominator stays cap + 1 (exponential average, not frozen).
    v = vectors[:1, 3]
    once, _ = proda.update_prototypes_running_mean(
        protos[3:4], counts[3:4], v[:, None], np.ones((1, 1), bool)
    )
    np.testing.assert_allclose(
        np.asarray(once[0]), (protos[3].astype(np.float64) * 3000 + v[0]) / 3001, rtol=1e-5
    )
    # Integer counts come back as integers.
    _, ci = proda.update_prototypes_running_mean(protos, counts.astype(np.int32), vectors, present)
    assert ci.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(ci), want_c.astype(np.int32))


def test_ema_update_matches_numpy():
    protos, counts, vectors, present = _update_inputs(14)
    momentum = 0.3
    want_p, want_c = _np_update(protos, counts, vectors, present, "ema", momentum)
    got_p, got_c = jax.jit(proda.update_prototypes_ema)(protos, counts, vectors, present, momentum)
    np.testing.assert_allclose(np.asarray(got_p), want_p, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got_c), want_c)
    assert float(got_c[2]) == 3000.0 and float(got_c[3]) == 3000.0


def test_prototype_updates_match_official_torch():
    torch = pytest.importorskip("torch")
    protos, counts, vectors, present = _update_inputs(15)
    momentum = 0.2

    for name in ("mean", "moving_average"):
        objective_vectors = torch.tensor(protos)
        objective_vectors_num = torch.tensor(counts)
        for n in range(vectors.shape[0]):
            for t in range(vectors.shape[1]):
                if not present[n, t]:
                    continue
                vector = torch.tensor(vectors[n, t]).reshape(-1, 1, 1)
                # Official `update_objective_SingleVector`, start_mean=False.
                if vector.sum().item() == 0:
                    continue
                if name == "moving_average":
                    objective_vectors[t] = (
                        objective_vectors[t] * (1 - momentum) + momentum * vector.squeeze()
                    )
                    objective_vectors_num[t] += 1
                    objective_vectors_num[t] = min(objective_vectors_num[t], 3000)
                else:
                    objective_vectors[t] = (
                        objective_vectors[t] * objective_vectors_num[t] + vector.squeeze()
                    )
                    objective_vectors_num[t] += 1
                    objective_vectors[t] = objective_vectors[t] / objective_vectors_num[t]
                    objective_vectors_num[t] = min(objective_vectors_num[t], 3000)
        if name == "mean":
            got_p, got_c = proda.update_prototypes_running_mean(protos, counts, vectors, present)
        else:
            got_p, got_c = proda.update_prototypes_ema(protos, counts, vectors, present, momentum)
        np.testing.assert_allclose(
            np.asarray(got_p), objective_vectors.numpy(), rtol=1e-5, atol=1e-6
        )
        np.testing.assert_array_equal(np.asarray(got_c), objective_vectors_num.numpy())
