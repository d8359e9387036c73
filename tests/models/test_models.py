"""DeepLabV2 and discriminator structure and BatchNorm behaviour (tiny widths)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxda.models import deeplab_v2, discriminators


def _tiny(**kwargs):
    return deeplab_v2.DeepLabV2(num_classes=5, stage_sizes=(1, 1, 1, 1), width=4, **kwargs)


@pytest.mark.parametrize("size", [(33, 65), (64, 128), (45, 70)])
def test_logit_grid_follows_pytorch_arithmetic(size):
    model = _tiny()
    x = jnp.zeros((1, *size, 3))
    out = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x)[0])
    expected = (1, deeplab_v2.output_size(size[0]), deeplab_v2.output_size(size[1]), 5)
    assert out["main"].shape == expected
    assert out["aux"].shape == expected


def test_resnet101_published_grid_and_channels():
    model = deeplab_v2.DeepLabV2(num_classes=19)
    x = jnp.zeros((1, 512, 1024, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    out = jax.eval_shape(lambda v: model.apply(v, x), variables)
    assert out["main"].shape == (1, 65, 129, 19)
    params = variables["params"]
    # 23 blocks in layer3; heads read 1024 (layer3) and 2048 (layer4) channels.
    assert sum(k.startswith("layer3_") for k in params["backbone"]) == 23
    assert params["head_aux"]["branch0"]["kernel"].shape == (3, 3, 1024, 19)
    assert params["head_main"]["branch0"]["kernel"].shape == (3, 3, 2048, 19)


def test_aspp_branch_count_and_single_level():
    x = jnp.zeros((1, 33, 65, 3))
    two = _tiny(num_aspp_branches=2, multi_level=False).init(jax.random.key(0), x)["params"]
    assert sorted(two["head_main"]) == ["branch0", "branch1"]
    assert "head_aux" not in two
    four = _tiny().init(jax.random.key(0), x)["params"]
    assert sorted(four["head_main"]) == ["branch0", "branch1", "branch2", "branch3"]


def test_aspp_sums_its_branches():
    head = deeplab_v2.ASPPClassifier(num_classes=3, dilations=(1, 2), num_branches=2)
    x = jax.random.normal(jax.random.key(1), (1, 7, 9, 4))
    params = head.init(jax.random.key(0), x)["params"]
    total = head.apply({"params": params}, x)
    one = deeplab_v2.ASPPClassifier(num_classes=3, dilations=(1,), num_branches=1)
    two = deeplab_v2.ASPPClassifier(num_classes=3, dilations=(2,), num_branches=1)
    separate = one.apply({"params": {"branch0": params["branch0"]}}, x) + two.apply(
        {"params": {"branch0": params["branch1"]}}, x
    )
    np.testing.assert_allclose(total, separate, rtol=1e-5, atol=1e-6)


def test_batch_norm_modes():
    x = jax.random.normal(jax.random.key(1), (2, 33, 65, 3)) * 5 + 3
    model = _tiny()
    variables = model.init(jax.random.key(0), x)
    eval_out = model.apply(variables, x, train=False)["main"]
    train_out, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    # Batch statistics: training output differs, running averages move.
    assert not np.allclose(train_out["main"], eval_out, atol=1e-4)
    before = jax.tree.leaves(variables["batch_stats"])
    after = jax.tree.leaves(updates["batch_stats"])
    assert any(not np.allclose(a, b) for a, b in zip(before, after, strict=True))

    frozen = _tiny(train_batch_stats=False)
    frozen_out = frozen.apply(variables, x, train=True)["main"]
    np.testing.assert_allclose(frozen_out, eval_out, rtol=1e-6)


def test_discriminator_output_is_input_over_32():
    disc = discriminators.FCDiscriminator(width=4)
    for h, w in [(64, 128), (512, 1024), (65, 97)]:
        x = jnp.zeros((1, h, w, 19))
        out = jax.eval_shape(lambda x=x: disc.init_with_output(jax.random.key(0), x)[0])
        oh, ow = h, w
        for _ in range(5):  # Five 4x4/s2/p1 convs: floor((n + 2 - 4) / 2) + 1 each.
            oh, ow = (oh - 2) // 2 + 1, (ow - 2) // 2 + 1
        assert out.shape == (1, oh, ow, 1)
    assert (oh, ow) == (2, 3)
    with pytest.raises(ValueError, match="at least 32x32"):
        disc.init(jax.random.key(0), jnp.zeros((1, 16, 64, 19)))


def test_intermediate_features_are_what_the_heads_read():
    """forward(features=True) returns the backbone features; the heads applied to them give the
    logits (so prototypes and distillation losses see the real inputs of the classifiers)."""
    from jaxda.train import common

    model = _tiny()
    x = jax.random.normal(jax.random.key(1), (2, 33, 65, 3))
    variables = model.init(jax.random.key(0), x)
    outputs, _, features = common.forward(model, variables, x, train=False, features=True)
    assert set(features) == {"layer1", "layer2", "layer3", "layer4"}
    assert features["layer4"].shape == (2, 5, 9, 128)  # 8 x width planes x 4 (bottleneck).
    aspp = deeplab_v2.ASPPClassifier(5, model.aspp_dilations, model.num_aspp_branches)
    for head, layer in (("main", "layer4"), ("aux", "layer3")):
        logits = aspp.apply({"params": variables["params"][f"head_{head}"]}, features[layer])
        np.testing.assert_allclose(logits, outputs[head], rtol=1e-5, atol=1e-6)
    plain, _ = common.forward(model, variables, x, train=False)
    np.testing.assert_array_equal(plain["main"], outputs["main"])
