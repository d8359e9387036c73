"""Images of predictions: TensorBoard panels during training, overlays for --mode=predict."""

import ml_collections
import numpy as np
import tensorflow as tf

from jaxda.data import classes, input_pipeline


def overlay(image: np.ndarray, color: np.ndarray, alpha: float) -> np.ndarray:
    """uint8 (1 - alpha) * image + alpha * color, both [..., H, W, 3] uint8."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"config.eval.overlay_alpha={alpha} must be in [0, 1]")
    blend = (1.0 - alpha) * image.astype(np.float32) + alpha * color.astype(np.float32)
    return np.clip(np.round(blend), 0, 255).astype(np.uint8)


def panels(
    images: np.ndarray,
    predictions: np.ndarray,
    labels: np.ndarray,
    data_config: ml_collections.ConfigDict,
    class_set: classes.ClassSet = classes.CITYSCAPES,
) -> np.ndarray:
    """uint8 [n, H, 3W, 3]: input image | predicted colours | ground-truth colours per example.

    Args:
      images: [n, h, w, 3] normalised network inputs (resized, bilinear, to the label size
        when it differs).
      predictions, labels: [n, H, W] train ids at the label resolution (255 = ignore, black).
      data_config: config.data (the normalisation to undo).
      class_set: the colours of the classes (`classes.from_config(config)`).
    """
    rgb = input_pipeline.denormalize(images, data_config)
    size = labels.shape[1:3]
    if rgb.shape[1:3] != size:
        resized = tf.image.resize(rgb, size, method="bilinear").numpy()
        rgb = np.clip(np.round(resized), 0, 255).astype(np.uint8)
    colors = [class_set.colorize(predictions), class_set.colorize(labels)]
    return np.concatenate([rgb, *colors], axis=2)
