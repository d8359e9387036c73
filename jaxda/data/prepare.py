"""Builds a downloaded dataset into TFDS (ArrayRecord) and summarises it (`launch.prepare`).

`prepare(dataset, manual_dir)` ('gta5', 'synthia', 'cityscapes', 'bdd100k' or 'mapillary') runs
the dataset's builder on the files the user downloaded, reads the result back and returns a
summary, also stored as `jaxda_prepare_summary.json` in the dataset's version folder (so that a
later call on a prepared dataset reports it without rebuilding):

  {"dataset": "gta5", "tfds_name": "gta5", "version": "1.0.0", "dataset_dir": ...,
   "manual_dir": ..., "strict": false, "already_prepared": false, "verified": "...",
   "splits": {"train": {"num_examples": N,
                        "class_pixels": [19 pixel counts, indexed by Cityscapes train id],
                        "ignored_pixels": P,
                        "unknown_label_ids": {"34": pixels, ...},  # raw ids outside the
                                                                  # dataset's id set (-> 255)
                        "reencoded_images": 0,  # images not stored byte for byte
                        "skipped": [{"file": "images/00003.png", "reason": "..."}]}}}
"""

import io
import json
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from jaxda.data import labels as labels_lib
from jaxda.data import sources
from jaxda.data.builders import base

SUMMARY_FILE = "jaxda_prepare_summary.json"
# launch.prepare --dataset name -> builder class.
DATASETS = {builder.PREPARE_NAME: builder for builder in sources.DOWNLOADED.values()}
ManualDataError = base.ManualDataError


def prepare(
    dataset: str,
    manual_dir: str,
    data_dir: str | None = None,
    strict: bool = False,
    overwrite: bool = False,
) -> dict:
    """Builds `dataset` from `manual_dir` into `data_dir`; returns the summary (module doc).

    Files that cannot be used (unreadable, truncated, image/label size mismatch, unmatched)
    are skipped and listed in the summary; with `strict` they are an error. A dataset already
    prepared in `data_dir` is not rebuilt unless `overwrite`: its stored summary is returned.
    """
    if dataset not in DATASETS:
        raise ValueError(f"Unknown dataset {dataset!r}; prepare one of {sorted(DATASETS)}")
    builder_class = DATASETS[dataset]
    data_dir = sources.default_data_dir(data_dir)
    builder = tfds.builder(builder_class.name, data_dir=data_dir, file_format="array_record")
    if builder.is_prepared() and not overwrite:
        return _stored_summary(builder, dataset)
    manual_dir = _check_manual_dir(manual_dir, builder_class)
    builder.strict = strict
    mode = tfds.download.GenerateMode
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=manual_dir,
            download_mode=mode.REUSE_CACHE_IF_EXISTS if overwrite else mode.REUSE_DATASET_IF_EXISTS,
            try_download_gcs=False,  # Never prebuilt on GCS; offline machines would just wait.
        )
    )
    summary = {
        "dataset": dataset,
        "tfds_name": builder_class.name,
        "version": str(builder.version),
        "dataset_dir": os.fspath(builder.data_dir),
        "manual_dir": manual_dir,
        "strict": strict,
        "already_prepared": False,
        "splits": builder.split_summaries(),
    }
    summary["verified"] = _verify(builder, summary["splits"])
    with open(os.path.join(builder.data_dir, SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def _check_manual_dir(manual_dir: str, builder_class) -> str:
    path = os.path.abspath(os.path.expanduser(manual_dir))
    what = f"{builder_class.TITLE} needs the folder holding {builder_class.EXPECTED}"
    if not os.path.exists(path):
        raise ManualDataError(
            f"--manual_dir={path} does not exist. {what}: download {builder_class.DOWNLOAD}."
        )
    if not os.path.isdir(path):
        raise ManualDataError(f"--manual_dir={path} is a file, not a folder. {what}.")
    if not os.listdir(path):
        raise ManualDataError(
            f"--manual_dir={path} is empty. {what}: download {builder_class.DOWNLOAD}."
        )
    return path


def _stored_summary(builder, dataset: str) -> dict:
    """The summary written when `builder`'s dataset was prepared (or a minimal one)."""
    path = os.path.join(builder.data_dir, SUMMARY_FILE)
    if os.path.exists(path):
        with open(path) as f:
            summary = json.load(f)
    else:  # Prepared some other way (e.g. `tfds build`): only the sizes are known.
        summary = {
            "dataset": dataset,
            "tfds_name": builder.name,
            "version": str(builder.version),
            "dataset_dir": os.fspath(builder.data_dir),
            "splits": {s: {"num_examples": i.num_examples} for s, i in builder.info.splits.items()},
            "note": f"no {SUMMARY_FILE}: prepared without launch.prepare",
        }
    summary["already_prepared"] = True
    return summary


def _verify(builder, splits: dict[str, dict]) -> str:
    """Reads the built dataset back: sizes, and the first and last example of each split."""
    valid = np.zeros((256,), bool)
    valid[: labels_lib.NUM_CLASSES] = valid[labels_lib.IGNORE_LABEL] = True
    skip = tfds.decode.SkipDecoding()
    for split, info in splits.items():
        source = builder.as_data_source(split, decoders={"image": skip, "label": skip})
        if len(source) != info["num_examples"]:
            raise RuntimeError(
                f"Verification of {builder.name}:{split} failed: {len(source)} examples stored, "
                f"{info['num_examples']} generated. Rebuild with --overwrite."
            )
        for index in sorted({0, len(source) - 1}):
            example = source[index]
            with Image.open(io.BytesIO(example["image"])) as image:
                image.load()
                size, mode = image.size, image.mode
            label = np.asarray(Image.open(io.BytesIO(example["label"])))
            if mode != "RGB" or label.shape != size[::-1] or not valid[label].all():
                raise RuntimeError(
                    f"Verification of {builder.name}:{split}[{index}] "
                    f"({example['image_id']!r}) failed: image {mode} {size}, label "
                    f"{label.shape} with ids {np.unique(label).tolist()}. Rebuild with --overwrite."
                )
    total = sum(info["num_examples"] for info in splits.values())
    return f"{total} examples read back; the first and last of each split decode correctly"


def format_summary(summary: dict) -> str:
    """The summary as text for people: per split, sizes, class pixels and skipped files."""
    lines = [
        f"{summary['dataset']}: TFDS {summary['tfds_name']!r} {summary['version']} in "
        f"{summary['dataset_dir']}"
        + (f" (built from {summary['manual_dir']})" if summary.get("manual_dir") else "")
    ]
    if summary.get("already_prepared"):
        lines.append(
            "Already prepared: not rebuilt (this is the stored summary; --overwrite rebuilds it)."
        )
    if summary.get("note"):
        lines.append(summary["note"])
    if summary.get("verified"):
        lines.append(f"Verified: {summary['verified']}.")
    for split, info in summary["splits"].items():
        lines.append(f"Split {split!r}: {info['num_examples']:,} examples")
        if "class_pixels" not in info:
            continue
        labelled = max(1, sum(info["class_pixels"]))
        total = max(1, labelled + info["ignored_pixels"])
        lines.append("  train id, class, pixels, share of the labelled pixels:")
        for train_id, (name, pixels) in enumerate(
            zip(labels_lib.CITYSCAPES_CLASSES, info["class_pixels"], strict=True)
        ):
            lines.append(f"  {train_id:2d} {name:<14}{pixels:>16,} {100 * pixels / labelled:6.2f}%")
        lines.append(
            f"  ignored (255)    {info['ignored_pixels']:>16,} "
            f"{100 * info['ignored_pixels'] / total:6.2f}% of all pixels"
        )
        unknown = info["unknown_label_ids"]
        lines.append(
            "  unknown label ids (mapped to ignore): "
            + (", ".join(f"{i}: {n:,} px" for i, n in unknown.items()) or "none")
        )
        if info["reencoded_images"]:
            lines.append(f"  images re-encoded as 8-bit RGB: {info['reencoded_images']:,}")
        lines.append(f"  skipped files: {len(info['skipped']) or 'none'}")
        lines.extend(f"    {s['file']}: {s['reason']}" for s in info["skipped"])
    return "\n".join(lines)
