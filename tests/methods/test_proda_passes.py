"""ProDA's offline pieces against NumPy: the prototypes' running mean over several passes
(chunked), flip-averaged predictions, the pseudo labels' agreement counts; and ProDA's
discriminator against a PyTorch transcription."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxda.models import discriminators
from jaxda.train import offline, proda_passes


def test_running_mean_prototypes_over_epochs_matches_numpy():
    rng = np.random.default_rng(0)
    n, k, d, epochs, cap = 150, 5, 4, 3, 200  # 3 x 150 > cap: the cap is reached.
    vectors = rng.normal(size=(n, k, d)).astype(np.float32)
    present = rng.uniform(size=(n, k)) < 0.7
    present[:, 4] = False  # A class never seen keeps a zero prototype.
    prototypes, counts = proda_passes.running_mean_prototypes(vectors, present, epochs, cap)

    expected, number = np.zeros((k, d)), np.zeros(k)
    for _ in range(epochs):
        for i in range(n):
            for c in range(k):
                if present[i, c] and vectors[i, c].sum() != 0:
                    expected[c] = (expected[c] * number[c] + vectors[i, c]) / (number[c] + 1)
                    number[c] = min(number[c] + 1, cap)
    np.testing.assert_allclose(prototypes, expected, rtol=2e-5, atol=1e-6)
    np.testing.assert_array_equal(counts, number)
    assert counts.max() == cap and counts[4] == 0


class _Linear:
    """A stand-in network: per-pixel logits = image @ w, with a left-right asymmetry."""

    def apply(self, variables, images, train=False):
        del train
        x = jnp.arange(images.shape[2], dtype=jnp.float32)[None, None, :, None] / 10
        return {"main": images @ variables["w"] + x * variables["w"][0]}


def test_flip_averaged_softmax_matches_numpy():
    rng = np.random.default_rng(1)
    images = rng.normal(size=(2, 6, 10, 3)).astype(np.float32)
    variables = {"w": rng.normal(size=(3, 4)).astype(np.float32)}
    probs = offline.softmax_at_input_size(_Linear(), variables, images, "main", flip=True)

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    def logits(x):
        ramp = np.arange(x.shape[2])[None, None, :, None] / 10
        return x @ variables["w"] + ramp * variables["w"][0]

    expected = 0.5 * (softmax(logits(images)) + softmax(logits(images[:, :, ::-1]))[:, :, ::-1])
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
    plain = offline.softmax_at_input_size(_Linear(), variables, images, "main", flip=False)
    assert not np.allclose(plain, probs)


def test_label_agreement_counts_match_numpy():
    rng = np.random.default_rng(2)
    pseudo = rng.integers(0, 3, (2, 4, 8))
    confident = rng.uniform(size=(2, 4, 8)) < 0.5
    labels = rng.integers(0, 3, (2, 8, 16)).astype(np.uint8)
    labels[0, :2] = 255
    counts = jax.device_get(offline.label_agreement(pseudo, labels, confident))
    up = pseudo.repeat(2, 1).repeat(2, 2)  # Nearest upsampling by 2.
    up_conf = confident.repeat(2, 1).repeat(2, 2)
    labelled = labels != 255
    correct = labelled & (up == labels)
    np.testing.assert_array_equal(counts["labelled"], labelled.sum((1, 2)))
    np.testing.assert_array_equal(counts["correct"], correct.sum((1, 2)))
    np.testing.assert_array_equal(counts["confident"], (labelled & up_conf).sum((1, 2)))
    np.testing.assert_array_equal(counts["confident_correct"], (correct & up_conf).sum((1, 2)))
    summary = offline.agreement_summary(counts)
    assert summary["pseudo_label_accuracy"] == pytest.approx(correct.sum() / labelled.sum())
    assert summary["coverage"] == pytest.approx((labelled & up_conf).sum() / labelled.sum())


def test_proda_discriminator_matches_a_pytorch_transcription():
    torch = pytest.importorskip("torch")
    disc = discriminators.FCDiscriminator(width=4, style="proda")
    x = np.random.default_rng(3).normal(size=(2, 40, 72, 5)).astype(np.float32)
    params = disc.init(jax.random.key(0), jnp.asarray(x))["params"]
    ours = np.asarray(disc.apply({"params": params}, jnp.asarray(x)))

    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    for i, name in enumerate(("conv1", "conv2", "conv3", "conv4", "classifier")):
        kernel = torch.from_numpy(np.array(params[name]["kernel"])).permute(3, 2, 0, 1)
        bias = torch.from_numpy(np.array(params[name]["bias"]))
        stride, pad = (1, 0) if name == "classifier" else (2, 1)
        t = torch.nn.functional.conv2d(t, kernel, bias, stride=stride, padding=pad)
        if i < 3:
            t = torch.relu(t)
        elif i == 3:
            t = torch.nn.functional.leaky_relu(t, 0.2)
    np.testing.assert_allclose(ours, t.permute(0, 2, 3, 1).numpy(), rtol=1e-4, atol=1e-5)
    assert ours.shape == (2, 3, 5, 1)  # 40x72 -> four stride-2 convs -> 3x5.
