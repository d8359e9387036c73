"""Segment image files with a checkpoint (`--mode=predict`) and write the predictions.

For every image (a file, or every .png/.jpg/.jpeg under a directory, recursively, sorted) this
writes, under the output directory and the image's relative sub-directory:

  <name>_color.png     the prediction in the class set's colours (Cityscapes' by default; a
                       folder dataset's classes.json), at the image's original size
  <name>_overlay.png   (1 - alpha) * image + alpha * colours (alpha: config.eval.overlay_alpha)
  <name>_labelIds.png  uint8 single-channel Cityscapes label ids (train ids mapped back), the
                       format the official cityscapesScripts evaluation reads (Cityscapes
                       classes only)
  <name>_classIds.png  uint8 single-channel class indices 0..C-1 (any other class set)
  <name>_logits.npy    with --save_logits: float32 [h, w, C] logits of config.eval.head on the
                       network's output grid (stride 8) for the input at data.eval.size: the
                       single whole-image pass, whatever config.eval.mode

and `predict.json` (checkpoints, inference protocol, number of images) when all are done.
Images are preprocessed exactly as in evaluation (bicubic resize to config.data.eval.size,
then the config's normalisation) and predicted one at a time on one device with the inference
mode of config.eval.mode, upsampled to the original size.
"""

import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging

from jaxda import mesh as mesh_lib
from jaxda.data import classes, input_pipeline
from jaxda.data import labels as labels_lib
from jaxda.evaluation import evaluator as evaluator_lib
from jaxda.evaluation import inference, visualize
from jaxda.evaluation import run as run_lib

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
MANIFEST = "predict.json"


def find_images(input_path: str) -> list[tuple[pathlib.Path, pathlib.PurePath]]:
    """(file, path relative to the input) of `input_path` or of every image below it, sorted."""
    root = pathlib.Path(input_path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"--input={input_path}: no such file or directory")
    if root.is_file():
        return [(root, pathlib.PurePath(root.name))]
    files = sorted(
        (p.relative_to(root), p)
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise FileNotFoundError(f"--input={input_path}: no {'/'.join(IMAGE_EXTENSIONS)} images")
    names = {}
    for relative, path in files:
        name = relative.with_suffix("")
        if name in names:
            raise ValueError(
                f"{names[name]} and {path} would write the same outputs ({name}_*); "
                "rename one or predict them separately"
            )
        names[name] = path
    return [(path, relative) for relative, path in files]


def read_image(path: pathlib.Path) -> np.ndarray:
    """uint8 [H, W, 3] RGB of a PNG or JPEG file; ValueError naming the file otherwise."""
    try:
        data = tf.io.read_file(str(path))
        image = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
    except tf.errors.OpError as error:
        raise ValueError(f"Cannot read image {path}: {error.message}") from None
    return image.numpy()


def write_png(path: pathlib.Path, image: np.ndarray) -> None:
    """Writes uint8 [H, W, 3] (RGB) or [H, W] (single channel) as PNG."""
    image = image[..., None] if image.ndim == 2 else image
    tf.io.write_file(str(path), tf.io.encode_png(image))


class Predictor:
    """uint8 RGB image of any size -> (uint8 [H, W] train ids, optional stride-8 logits)."""

    def __init__(self, config: ml_collections.ConfigDict, networks: run_lib.Networks):
        self._config = config
        self._networks = networks
        self._weights = jnp.asarray(networks.weights, jnp.float32)
        self.settings = inference.Settings.from_config(config.eval)
        self._normalize = input_pipeline.make_normalizer(config.data)
        self._predict_fn = jax.jit(self._predict, static_argnames=("out_size", "with_logits"))

    def _predict(self, members, weights, images, *, out_size, with_logits):
        apply_fn = inference.ensemble_apply_fn(
            self._networks.model, members, weights, self._config.eval.head
        )
        scores = inference.scores(apply_fn, images, out_size, self.settings)
        predictions = jnp.argmax(scores, axis=-1).astype(jnp.uint8)
        return predictions, apply_fn(images) if with_logits else None

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """The evaluation pipeline's preprocessing: resize to data.eval.size, normalise."""
        size = self._config.data.eval.size
        image = tf.convert_to_tensor(image)
        if size:
            image = input_pipeline.resize_image(image, size)
        return self._normalize(image).numpy()

    def __call__(self, image: np.ndarray, with_logits: bool = False):
        inputs = self.preprocess(image)[None]
        predictions, logits = self._predict_fn(
            self._networks.members,
            self._weights,
            inputs,
            out_size=tuple(image.shape[:2]),
            with_logits=with_logits,
        )
        predictions = np.asarray(jax.device_get(predictions))[0]
        if logits is not None:
            logits = np.asarray(jax.device_get(logits), np.float32)[0]
        return predictions, logits


def predict(
    config: ml_collections.ConfigDict,
    workdir: str,
    input_path: str,
    output_dir: str,
    save_logits: bool = False,
) -> dict:
    """Predicts every image of `input_path` with the checkpoint `--mode=eval` would use and
    writes the files of the module docstring under `output_dir`; returns the manifest."""
    # Wrong paths and settings fail before the restore.
    images = find_images(input_path)
    inference.Settings.from_config(config.eval)
    alpha = float(config.eval.overlay_alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"config.eval.overlay_alpha={alpha} must be in [0, 1]")
    networks = run_lib.restore_networks(config, workdir, mesh_lib.make_mesh(1))
    predictor = Predictor(config, networks)
    out_root = pathlib.Path(output_dir).expanduser()
    class_set = classes.from_config(config)
    for written, (path, relative) in enumerate(images):
        try:
            image = read_image(path)
        except ValueError as error:
            raise ValueError(
                f"{error} ({written} of {len(images)} images were written to {out_root} before it)"
            ) from None
        predictions, logits = predictor(image, with_logits=save_logits)
        directory, name = out_root / relative.parent, relative.stem
        directory.mkdir(parents=True, exist_ok=True)
        color = class_set.colorize(predictions)
        write_png(directory / f"{name}_color.png", color)
        write_png(directory / f"{name}_overlay.png", visualize.overlay(image, color, alpha))
        if class_set.is_cityscapes:
            label_ids = labels_lib.train_ids_to_label_ids(predictions)
            write_png(directory / f"{name}_labelIds.png", label_ids)
        else:
            write_png(directory / f"{name}_classIds.png", predictions.astype(np.uint8))
        if save_logits:
            np.save(directory / f"{name}_logits.npy", logits)
    eval_config = config.data.eval
    manifest = {
        "num_images": len(images),
        "input": str(input_path),
        "checkpoints": networks.step_dirs,
        "weights": networks.weights,
        "step": networks.step,
        "protocol": {
            "input_size": list(eval_config.size) if eval_config.size else "original",
            "output_size": "original",
            "head": config.eval.head,
            "upsampling": "bilinear, align_corners=True",
            **predictor.settings.protocol(),
        },
        "logits": "saved" if save_logits else "not saved",
        "classes": list(class_set.names),
    }
    evaluator_lib.write_results(manifest, str(out_root / MANIFEST))
    logging.info("Wrote the predictions of %d images to %s", len(images), out_root)
    print(f"Wrote the predictions of {len(images)} images to {out_root}")
    return manifest
