"""ProDA's strong view: each op against Pillow, the draws, and labels following the geometry."""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

from jaxda.data import geometry, input_pipeline
from jaxda.data import randaugment as ra
from tests.conftest import tiny_config

FILL = (127, 127, 127)


def _images() -> list[np.ndarray]:
    """uint8 [h, w, 3]: pure noise (every level present) and a smooth image (structure)."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    smooth = rng.integers(40, 200, (61, 83, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(smooth).filter(ImageFilter.GaussianBlur(2)))
    return [noise, smooth]


def _pil_op(img: Image.Image, name: str, v: int, sign: int) -> Image.Image:
    """ProDA's op (data/randaugment.py) on a Pillow image, written out from its formulas."""
    max_v, bias = ra.POOL[name] or (0, 0)
    fv = float(v) * max_v / 10 + bias
    iv = int(v * max_v / 10) + bias
    affine = {"resample": Image.BILINEAR, "fillcolor": FILL}
    ops = {
        "AutoContrast": lambda: ImageOps.autocontrast(img),
        "Equalize": lambda: ImageOps.equalize(img),
        "Identity": lambda: img,
        "Brightness": lambda: ImageEnhance.Brightness(img).enhance(fv),
        "Color": lambda: ImageEnhance.Color(img).enhance(fv),
        "Contrast": lambda: ImageEnhance.Contrast(img).enhance(fv),
        "Sharpness": lambda: ImageEnhance.Sharpness(img).enhance(fv),
        "Posterize": lambda: ImageOps.posterize(img, iv),
        "Solarize": lambda: ImageOps.solarize(img, 256 - iv),
        "Rotate": lambda: img.rotate(sign * iv, **affine),
        "ShearX": lambda: img.transform(
            img.size, Image.AFFINE, (1, sign * fv, 0, 0, 1, 0), **affine
        ),
        "ShearY": lambda: img.transform(
            img.size, Image.AFFINE, (1, 0, 0, sign * fv, 1, 0), **affine
        ),
        "TranslateX": lambda: img.transform(
            img.size, Image.AFFINE, (1, 0, int(sign * fv * img.size[0]), 0, 1, 0), **affine
        ),
        "TranslateY": lambda: img.transform(
            img.size, Image.AFFINE, (1, 0, 0, 0, 1, int(sign * fv * img.size[1])), **affine
        ),
    }
    return ops[name]()


def _compare(name, v, sign, max_diff, min_exact):
    for array in _images():
        expected = np.asarray(_pil_op(Image.fromarray(array), name, v, sign)).astype(int)
        got, _ = ra.apply_op(name, tf.constant(array, tf.float32), v, sign)
        diff = np.abs(got.numpy().astype(int) - expected)
        assert diff.max() <= max_diff, (name, v, sign, diff.max())
        assert (diff == 0).mean() >= min_exact, (name, v, sign, (diff == 0).mean())


@pytest.mark.parametrize("name", ["AutoContrast", "Equalize", "Posterize", "Solarize", "Identity"])
@pytest.mark.parametrize("v", [1, 4, 9])
def test_point_ops_equal_pil(name, v):
    _compare(name, v, 1, max_diff=0, min_exact=1.0)


@pytest.mark.parametrize("name", ["Brightness", "Color", "Contrast", "Sharpness"])
@pytest.mark.parametrize("v", [1, 5, 9])
def test_enhance_ops_match_pil(name, v):
    # Pillow blends in float32 and truncates; float32 sums in another order could cross an
    # integer, hence 1 grey level on >= 99% (all pixels agree exactly in practice).
    _compare(name, v, 1, max_diff=1, min_exact=0.99)


@pytest.mark.parametrize("name", ra.GEOMETRIC_OPS)
@pytest.mark.parametrize(("v", "sign"), [(1, 1), (5, -1), (9, 1), (9, -1)])
def test_affine_ops_match_pil(name, v, sign):
    # Bilinear in float64 with Pillow's pixel centres and truncation: the result can differ
    # only where the sample coordinates (computed with other float64 rounding) straddle an
    # integer value or the frame edge, so 2 grey levels on >= 98% (exact in practice).
    _compare(name, v, sign, max_diff=255, min_exact=0.98)
    for array in _images():
        expected = np.asarray(_pil_op(Image.fromarray(array), name, v, sign)).astype(int)
        got = ra.apply_op(name, tf.constant(array, tf.float32), v, sign)[0].numpy()
        assert (np.abs(got.astype(int) - expected) <= 2).mean() >= 0.98


def test_equalize_and_autocontrast_degenerate_histograms():
    flat = np.full((8, 9, 3), 77, np.uint8)
    two = flat.copy()
    two[:4, :, 1] = 200
    few = np.zeros((16, 16, 3), np.uint8)
    few[:8] = 255
    few[8:, :5] = 100
    for array in (flat, two, few):
        for name, op in (("Equalize", ImageOps.equalize), ("AutoContrast", ImageOps.autocontrast)):
            expected = np.asarray(op(Image.fromarray(array)))
            got = ra.apply_op(name, tf.constant(array, tf.float32), 1)[0].numpy()
            np.testing.assert_array_equal(got, expected)


def test_flip_and_cutout_equal_pil():
    array = _images()[1]
    h, w = array.shape[:2]
    for seed in range(6):
        strong = ra.rand_augment_mc(
            tf.constant(array), tf.zeros([h, w], tf.uint8), tf.constant([seed, 9], tf.int64), ops=[]
        )
        drawn = ra.draws(tf.constant([seed, 9], tf.int64))
        img = Image.fromarray(array)
        if strong.flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        # ProDA's CutoutAbs with the same centre draws; the rectangle includes x1 and y1.
        side = min(w, h) // 3
        y0, x0 = (float(c) * n for c, n in zip(drawn.cutout_centre.numpy(), (h, w), strict=True))
        x0, y0 = int(max(0, x0 - side / 2.0)), int(max(0, y0 - side / 2.0))
        x1, y1 = int(min(w, x0 + side)), int(min(h, y0 + side))
        ImageDraw.Draw(img).rectangle((x0, y0, x1, y1), FILL)
        np.testing.assert_array_equal(strong.image.numpy(), np.asarray(img))
        box = np.array([y0 / h, x0 / w, min(y1 + 1, h) / h, min(x1 + 1, w) / w], np.float32)
        np.testing.assert_allclose(strong.cutout.numpy(), box, rtol=1e-6)
        # Cutout pixels are ignored in the label.
        label = strong.label.numpy()
        assert (label[y0 : y1 + 1, x0 : x1 + 1] == 255).all()
        assert (label == 255).sum() == (min(y1, h - 1) - y0 + 1) * (min(x1, w - 1) - x0 + 1)


def _seed(i):
    return tf.constant([i, 12345], tf.int64)


def test_draws_are_deterministic_and_differ_across_seeds():
    image = tf.constant(_images()[1])
    label = tf.zeros(image.shape[:2], tf.uint8)
    a, b = (ra.rand_augment_mc(image, label, _seed(3)) for _ in range(2))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.numpy(), y.numpy())
    views = [ra.rand_augment_mc(image, label, _seed(i)) for i in range(8)]
    distinct = {v.image.numpy().tobytes() for v in views}
    assert len(distinct) == 8
    assert len({tuple(v.cutout.numpy()) for v in views}) == 8


def test_op_frequencies():
    n = 2000
    d = [ra.draws(_seed(i)) for i in range(n)]
    flips = np.array([x.flip.numpy() for x in d])
    ops = np.concatenate([x.ops.numpy() for x in d])
    applied = np.concatenate([x.applied.numpy() for x in d])
    levels = np.concatenate([x.levels.numpy() for x in d])
    signs = np.concatenate([x.signs.numpy() for x in d])
    assert abs(flips.mean() - 0.5) < 0.04
    assert abs(applied.mean() - 0.5) < 0.03
    assert abs((signs > 0).mean() - 0.5) < 0.03
    counts = np.bincount(ops, minlength=len(ra.OP_NAMES)) / len(ops)
    assert np.abs(counts - 1 / len(ra.OP_NAMES)).max() < 0.02, counts
    assert set(levels.astype(int)) == set(range(1, 10))
    # Each op is applied about half the times it is drawn.
    for k in range(len(ra.OP_NAMES)):
        assert abs(applied[ops == k].mean() - 0.5) < 0.1


def _pattern(h, w, block=8, classes=19, seed=0):
    """uint8 [h, w]: random class ids on blocks (with a few ignore blocks)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, classes, (-(-h // block), -(-w // block)), dtype=np.uint8)
    ids[rng.random(ids.shape) < 0.05] = 255
    return np.kron(ids, np.ones((block, block), np.uint8))[:h, :w]


def _near_edges(strong, h, w, eps=1e-3):
    """[h, w] bool: strong pixels whose weak sample point lies within eps (pixels) of a weak
    pixel edge (or whose intermediate frame point lies within eps / size of the frame edge),
    where float32 rounding may pick either side; computed in float64."""
    m = strong.matrix.numpy().astype(np.float64)
    y = ((np.arange(h) + 0.5) / h)[:, None]
    x = ((np.arange(w) + 0.5) / w)[None, :]
    xs, ys = m[0] * x + m[1] * y + m[2], m[3] * x + m[4] * y + m[5]
    if strong.flip:
        xs = 1 - xs
    near = np.zeros((h, w), bool)
    for q in (xs * w, ys * h):
        near |= np.abs(q - np.round(q)) < eps
    for f in strong.frames.numpy().astype(np.float64):
        for q, n in ((f[0] * x + f[1] * y + f[2], w), (f[3] * x + f[4] * y + f[5], h)):
            near |= (np.abs(q) < eps / n) | (np.abs(q - 1) < eps / n)
    return near


FORCED = [
    ([], True),
    ([("ShearX", 9, 1)], False),
    ([("ShearX", 4, -1)], False),
    ([("ShearY", 7, 1)], True),
    ([("TranslateX", 9, -1)], False),
    ([("TranslateY", 5, 1)], False),
    ([("Rotate", 9, 1)], False),
    ([("Rotate", 2, -1)], True),
    ([("TranslateX", 9, 1), ("TranslateX", 9, -1)], False),  # out of frame and back
    ([("Rotate", 6, 1), ("ShearY", 9, -1)], True),
    ([("ShearX", 9, 1), ("Color", 5, 1)], True),
]


def _check_label_follows(strong, weak_label, jit):
    """The strong label of rand_augment_mc equals geometry.to_strong of the weak label."""
    h, w = weak_label.shape
    batch = [np.asarray(t)[None] for t in (strong.flip, strong.matrix, strong.cutout)]
    move = lambda maps: geometry.to_strong(  # noqa: E731
        maps, *batch, method="nearest", frames=strong.frames.numpy()[None]
    )
    if jit:
        import jax

        move = jax.jit(move)
    moved, valid = move(weak_label[None])
    moved, valid = np.asarray(moved)[0], np.asarray(valid)[0]
    label = strong.label.numpy()
    near = _near_edges(strong, h, w)
    differ = moved != label
    # Equal pixel for pixel except possibly where a sample point is on a pixel edge.
    assert not (differ & ~near).any(), np.argwhere(differ & ~near)[:5]
    # Ties are rows/columns where the shear or rotation puts centres exactly on edges (e.g.
    # shear 0.12 on rows 12, 37, 62 of 72): few, and float32 settles most the same way.
    assert near.mean() < 0.05 and differ.mean() < 0.01
    assert (label[~valid & ~near] == 255).all()
    return int(differ.sum())


@pytest.mark.parametrize(("ops", "flip"), FORCED)
@pytest.mark.parametrize("cutout", [False, True])
def test_recorded_geometry_moves_labels_like_the_image(ops, flip, cutout):
    h, w = 72, 104
    weak_label = _pattern(h, w)
    image = tf.zeros([h, w, 3])
    strong = ra.rand_augment_mc(
        image, tf.constant(weak_label), _seed(7), ops=ops, flip=flip, cutout=cutout
    )
    assert strong.frames.shape == (len(ops), 6) or not ops
    for jit in (False, True):
        _check_label_follows(strong, weak_label, jit)
    if not ops and not flip:
        np.testing.assert_array_equal(strong.label.numpy(), weak_label)


def test_recorded_geometry_of_drawn_views():
    h, w = 64, 96
    weak_label = _pattern(h, w, block=6)
    geometric = 0
    for i in range(40):
        strong = ra.rand_augment_mc(tf.zeros([h, w, 3]), tf.constant(weak_label), _seed(i))
        geometric += not np.allclose(strong.matrix.numpy(), [1, 0, 0, 0, 1, 0])
        _check_label_follows(strong, weak_label, jit=False)
    assert geometric >= 5


PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], np.uint8)


GEOMETRIC_FORCED = [f for f in FORCED if f[0] and all(o[0] in ra.GEOMETRIC_OPS for o in f[0])]


@pytest.mark.parametrize(("ops", "flip"), GEOMETRIC_FORCED)
def test_strong_label_marks_the_strong_images_content(ops, flip):
    # An image painted by its label: after the ops the image shows the colour of its label
    # (bilinear blurs block edges), and grey out-of-frame pixels (incl. a band an op moved
    # out and back) are ignored in the label.
    h, w = 96, 128
    weak_label = _pattern(h, w, block=16, classes=4)
    weak_label[weak_label == 255] = 0
    image = PALETTE[weak_label]
    strong = ra.rand_augment_mc(
        tf.constant(image), tf.constant(weak_label), _seed(1), ops=ops, flip=flip, cutout=False
    )
    got, label = strong.image.numpy(), strong.label.numpy()
    grey = (got == 127).all(-1)
    labelled = label != 255
    painted = np.abs(got.astype(int) - PALETTE[np.minimum(label, 3)].astype(int)).max(-1) <= 8
    print(
        f"{ops}: colour = label on {painted[labelled].mean():.3f}; grey & labelled "
        f"{(grey & labelled).mean():.4f}, ignored & not grey {(~grey & ~labelled).mean():.4f}"
    )
    assert painted[labelled].mean() >= 0.85
    # Disagreement only along the frame's edge (a pixel's width of partial blending).
    assert (grey & labelled).mean() < 0.02 and (~grey & ~labelled).mean() < 0.02


def test_to_strong_at_quarter_resolution():
    h, w = 128, 192
    weak_label = _pattern(h, w, block=16)
    mismatch = []
    for i in range(12):
        strong = ra.rand_augment_mc(tf.zeros([h, w, 3]), tf.constant(weak_label), _seed(100 + i))
        full = strong.label.numpy()
        batch = [np.asarray(t)[None] for t in (strong.flip, strong.matrix, strong.cutout)]
        quarter, _ = geometry.to_strong(
            weak_label[None, 2::4, 2::4], *batch, frames=strong.frames.numpy()[None]
        )
        # Nearest downsampling by 4 takes pixel 4 i + 2 (centre (i + 0.5) * 4).
        expected = full[2::4, 2::4]
        mismatch.append(float((np.asarray(quarter)[0] != expected).mean()))
    print("quarter-resolution mismatch per view:", np.round(mismatch, 4))
    # Only quarter pixels whose sample point is within ~2 full pixels of a block, frame or
    # cutout edge can differ: a bounded fraction.
    assert max(mismatch) < 0.08 and np.mean(mismatch) < 0.04


def test_to_strong_bilinear_and_shapes():
    n, h, w, c = 3, 20, 28, 5
    views = [
        ra.rand_augment_mc(tf.zeros([h, w, 3]), tf.zeros([h, w], tf.uint8), _seed(i))
        for i in range(n)
    ]
    flip = np.stack([v.flip.numpy() for v in views])
    matrix = np.stack([v.matrix.numpy() for v in views])
    cutout = np.stack([v.cutout.numpy() for v in views])
    frames = np.stack([v.frames.numpy() for v in views])
    maps = np.full((n, h, w, c), 0.25, np.float32)
    out, valid = geometry.to_strong(
        maps, flip, matrix, cutout, method="bilinear", fill=-1.0, frames=frames
    )
    out, valid = np.asarray(out), np.asarray(valid)
    assert out.shape == (n, h, w, c) and valid.shape == (n, h, w)
    np.testing.assert_allclose(out[valid], 0.25, rtol=1e-6)
    assert (out[~valid] == -1).all() and (~valid).any()
    # Nearest on ids agrees with the strong labels' ignore pattern.
    labels, _ = geometry.to_strong(
        np.zeros((n, h, w), np.uint8), flip, matrix, cutout, frames=frames
    )
    np.testing.assert_array_equal(np.asarray(labels) == 255, ~valid)
    with pytest.raises(ValueError, match="bilinear"):
        geometry.to_strong(np.zeros((n, h, w), np.uint8), flip, matrix, cutout, method="bilinear")


def _stream(data_dir, strong=None, views=None):
    config = tiny_config(data_dir=data_dir)
    t = config.data.target
    t.random_scale, t.crop_size, t.flip = (0.5, 1.5), (24, 40), True
    if views:
        t.views = views
    if strong is not None:
        t.strong = strong
    reader = input_pipeline.open_reader(t, config.data)
    it = input_pipeline.train_iterator(
        reader, t, config.data, global_batch_size=8, seed=(5, 1), start=8
    )
    return next(it)


@pytest.mark.slow  # ~10 s; the strong view's pieces are tested one by one above.
def test_input_pipeline_adds_the_strong_view(data_dir):
    plain = _stream(data_dir)
    batch = _stream(data_dir, strong=dict(ra_defaults()))
    for key in plain:
        np.testing.assert_array_equal(batch[key], plain[key])
    strong = batch["strong"]
    shapes = {k: v.shape for k, v in strong.items()}
    assert shapes == {
        "image": (8, 24, 40, 3),
        "label": (8, 24, 40),
        "flip": (8,),
        "matrix": (8, 6),
        "frames": (8, 2, 6),
        "cutout": (8, 4),
    }
    assert strong["image"].dtype == np.float32 and strong["label"].dtype == np.uint8
    # The strong label is the weak label moved by the recorded geometry.
    moved, _ = geometry.to_strong(
        batch["label"], strong["flip"], strong["matrix"], strong["cutout"], frames=strong["frames"]
    )
    assert (np.asarray(moved) == strong["label"]).mean() > 0.99
    # With views: made from the view `of`, which is unchanged.
    views = {"weak": {"flip": True}, "full": {"random_scale": (), "crop_size": (24, 40)}}
    plain = _stream(data_dir, views=views)
    batch = _stream(data_dir, strong={**ra_defaults(), "of": "weak"}, views=views)
    for view in views:
        for key in plain[view]:
            np.testing.assert_array_equal(batch[view][key], plain[view][key])
    moved, _ = geometry.to_strong(
        batch["weak"]["label"],
        *(batch["strong"][k] for k in ("flip", "matrix", "cutout")),
        frames=batch["strong"]["frames"],
    )
    assert (np.asarray(moved) == batch["strong"]["label"]).mean() > 0.99


def ra_defaults():
    return dict(input_pipeline.STRONG_DEFAULTS)


@pytest.mark.parametrize(
    ("strong", "views", "match"),
    [
        ({"num_ops": 2, "bogus": 1}, None, "unknown strong keys"),
        ({"of": "weak"}, None, "has no views"),
        ({"of": "nope"}, {"weak": {"flip": True}}, "must name one of"),
        ({"of": "strong"}, {"strong": {"flip": True}}, "clashes"),
        ({"magnitude": 11}, None, "magnitude"),
    ],
)
def test_input_pipeline_validates_the_strong_config(data_dir, strong, views, match):
    with pytest.raises(ValueError, match=match):
        _stream(data_dir, strong=strong, views=views)
