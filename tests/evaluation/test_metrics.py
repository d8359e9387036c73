"""Confusion-matrix IoU against a NumPy reference (AdaptSegNet's compute_iou)."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxda.evaluation import metrics


def _fast_hist(label, pred, n):
    """AdaptSegNet's compute_iou.fast_hist: only 0 <= label < n counted."""
    k = (label >= 0) & (label < n)
    return np.bincount(n * label[k].astype(int) + pred[k], minlength=n**2).reshape(n, n)


def test_confusion_and_miou_match_numpy_with_ignore_and_absent_classes():
    rng = np.random.default_rng(0)
    n = 7
    labels = rng.integers(0, 5, size=(3, 20, 30))  # Classes 5 and 6 never labelled.
    labels[rng.random(labels.shape) < 0.2] = 255
    preds = rng.integers(0, 6, size=labels.shape)  # Class 6 never predicted: absent in both.
    got = np.asarray(metrics.confusion_matrix(jnp.asarray(labels), jnp.asarray(preds), n))
    hist = _fast_hist(labels, preds, n)
    np.testing.assert_array_equal(got, hist)

    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.diag(hist) / (hist.sum(1) + hist.sum(0) - np.diag(hist))
    ours = metrics.per_class_iou(got)
    np.testing.assert_allclose(ours, iou, equal_nan=True)
    assert np.isnan(ours[6]) and ours[5] == 0.0  # Predicted-only class scores 0, absent is NaN.
    assert metrics.mean_iou(ours) == pytest.approx(np.nanmean(iou))


def test_summarize_subsets_and_names():
    confusion = np.array([[5, 1, 0], [2, 3, 0], [0, 0, 0]])
    results = metrics.summarize(confusion, ["a", "b", "c"], subsets={"ab": (0, 1), "a": (0,)})
    assert results["per_class_iou"]["c"] is None
    assert results["per_class_iou"]["a"] == pytest.approx(100 * 5 / 8)
    assert results["miou"] == pytest.approx(100 * (5 / 8 + 3 / 6) / 2)
    assert results["miou_a"] == pytest.approx(100 * 5 / 8)
    assert results["pixel_accuracy"] == pytest.approx(100 * 8 / 11)
    only_b = metrics.summarize(confusion, ["a", "b", "c"], evaluated_classes=(1,))
    assert list(only_b["per_class_iou"]) == ["b"] and only_b["miou"] == pytest.approx(50.0)
    assert "mIoU" in metrics.format_table(results)


def test_synthia_class_subsets_match_the_documented_lists():
    from jaxda.data import labels

    names16 = [labels.CITYSCAPES_CLASSES[c] for c in labels.SYNTHIA_16_CLASSES]
    assert names16 == [
        "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
        "traffic sign", "vegetation", "sky", "person", "rider", "car", "bus",
        "motorcycle", "bicycle",
    ]  # fmt: skip
    # The 13-class list = indices [0,1,2,6,...,15] of the 16-class list.
    index13 = [0, 1, 2, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
    assert tuple(labels.SYNTHIA_16_CLASSES[i] for i in index13) == labels.SYNTHIA_13_CLASSES
    # ProDA's 19-class SYNTHIA id list, in train-id order.
    proda19 = [3, 4, 2, 21, 5, 7, 15, 9, 6, 16, 1, 10, 17, 8, 18, 19, 20, 12, 11]
    assert [labels.SYNTHIA_TO_TRAIN_ID[i] for i in proda19] == list(range(19))
