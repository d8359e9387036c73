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

`prepare('folder', manual_dir, folder=FolderOptions(name=..., images=...))` builds the user's
own folders into `folder/NAME` (`jaxda.data.builders.folder`). Its summary adds "classes"
(the class names), "classes_file" (the --classes file, or null for Cityscapes) and "folder"
(the options); per split "labelled" (false: every label is 255, with the reason in
"unlabelled"), "class_pixels" over the dataset's classes and, for --label_format=colors,
"unknown_colors" {"#rrggbb": pixels} instead of "unknown_label_ids". With --split_lists,
"images_in_no_split" counts the images no list names.
"""

import dataclasses
import io
import json
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from jaxda.data import classes as classes_lib
from jaxda.data import labels as labels_lib
from jaxda.data import sources
from jaxda.data.builders import base, folder_labels
from jaxda.data.builders import folder as folder_lib

SUMMARY_FILE = "jaxda_prepare_summary.json"
# launch.prepare --dataset name -> builder class.
DATASETS = {
    **{builder.PREPARE_NAME: builder for builder in sources.DOWNLOADED.values()},
    folder_lib.FolderBuilder.PREPARE_NAME: folder_lib.FolderBuilder,
}
ManualDataError = base.ManualDataError
ClassFileError = classes_lib.ClassFileError
FolderOptions = folder_lib.FolderOptions
# The launch.prepare flags that only --dataset=folder takes (the FolderOptions fields).
FOLDER_FLAGS = tuple(field.name for field in dataclasses.fields(FolderOptions))
LABEL_FORMATS = folder_labels.FORMATS


def prepare(
    dataset: str,
    manual_dir: str,
    data_dir: str | None = None,
    strict: bool = False,
    overwrite: bool = False,
    folder: FolderOptions | None = None,
) -> dict:
    """Builds `dataset` from `manual_dir` into `data_dir`; returns the summary (module doc).

    Files that cannot be used (unreadable, truncated, image/label size mismatch, unmatched)
    are skipped and listed in the summary; with `strict` they are an error. A dataset already
    prepared in `data_dir` is not rebuilt unless `overwrite`: its stored summary is returned.
    `folder`: the options of dataset 'folder' (the user's own folders; only for it).
    """
    if dataset not in DATASETS:
        raise ValueError(f"Unknown dataset {dataset!r}; prepare one of {sorted(DATASETS)}")
    builder_class = DATASETS[dataset]
    data_dir = sources.default_data_dir(data_dir)
    if builder_class is folder_lib.FolderBuilder:
        if folder is None:
            raise ManualDataError("--dataset=folder needs --name and --images")
        builder = builder_class(options=folder, data_dir=data_dir, file_format="array_record")
        tfds_name = f"{builder.name}/{folder.name}"
    else:
        if folder is not None:
            raise ManualDataError(
                f"folder options (--name, --images, ...) are for --dataset=folder, not {dataset}"
            )
        builder = tfds.builder(builder_class.name, data_dir=data_dir, file_format="array_record")
        tfds_name = builder_class.name
    if builder.is_prepared() and not overwrite:
        return _stored_summary(builder, dataset, folder)
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
        "tfds_name": tfds_name,
        "version": str(builder.version),
        "dataset_dir": os.fspath(builder.data_dir),
        "manual_dir": manual_dir,
        "strict": strict,
        "already_prepared": False,
        "splits": builder.split_summaries(),
    }
    num_classes = labels_lib.NUM_CLASSES
    if folder is not None:
        num_classes = builder.class_set.num_classes
        summary["classes"] = list(builder.class_set.names)
        summary["classes_file"] = builder.class_set.source if folder.classes else None
        summary["folder"] = dataclasses.asdict(folder)
        if folder.split_lists:
            summary["images_in_no_split"] = builder.unassigned
        if folder.classes:  # Read back by classes.of_dataset_dir (training, evaluation).
            classes_lib.save(
                builder.class_set, os.path.join(builder.data_dir, classes_lib.CLASSES_FILE)
            )
    summary["verified"] = _verify(builder, summary["splits"], num_classes)
    with open(os.path.join(builder.data_dir, SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def _check_manual_dir(manual_dir: str, builder_class) -> str:
    path = os.path.abspath(os.path.expanduser(manual_dir))
    what = f"{builder_class.TITLE} needs the folder holding {builder_class.EXPECTED}"
    download = f": download {builder_class.DOWNLOAD}" if builder_class.DOWNLOAD else ""
    if not os.path.exists(path):
        raise ManualDataError(f"--manual_dir={path} does not exist. {what}{download}.")
    if not os.path.isdir(path):
        raise ManualDataError(f"--manual_dir={path} is a file, not a folder. {what}.")
    if not os.listdir(path):
        raise ManualDataError(f"--manual_dir={path} is empty. {what}{download}.")
    return path


def _stored_summary(builder, dataset: str, folder: FolderOptions | None = None) -> dict:
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
    if folder is not None and summary.get("folder") not in (None, dataclasses.asdict(folder)):
        changed = sorted(
            f"--{k}" for k, v in dataclasses.asdict(folder).items() if summary["folder"][k] != v
        )
        summary["note"] = (
            f"prepared with other {', '.join(changed)} than given now; --overwrite rebuilds it"
        )
    return summary


def _verify(builder, splits: dict[str, dict], num_classes: int = labels_lib.NUM_CLASSES) -> str:
    """Reads the built dataset back: sizes, and the first and last example of each split."""
    valid = np.zeros((256,), bool)
    valid[:num_classes] = valid[labels_lib.IGNORE_LABEL] = True
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


def folder_options(dataset: str, given: dict) -> FolderOptions | None:
    """FolderOptions from the folder flags given on the command line ({flag name: value})."""
    if dataset != folder_lib.FolderBuilder.PREPARE_NAME:
        if given:
            raise ManualDataError(
                f"--{', --'.join(given)}: only for --dataset=folder, not --dataset={dataset}"
            )
        return None
    missing = [flag for flag in ("name", "images") if not given.get(flag)]
    if missing:
        raise ManualDataError(
            f"--dataset=folder needs --{' and --'.join(missing)} (e.g. --name=target "
            "--images='**/*.jpg')"
        )
    return FolderOptions(**given)


def format_summary(summary: dict) -> str:
    """The summary as text for people: per split, sizes, class pixels and skipped files."""
    names = summary.get("classes") or labels_lib.CITYSCAPES_CLASSES
    lines = [
        f"{summary['dataset']}: TFDS {summary['tfds_name']!r} {summary['version']} in "
        f"{summary['dataset_dir']}"
        + (f" (built from {summary['manual_dir']})" if summary.get("manual_dir") else "")
    ]
    if "classes" in summary:
        source = summary.get("classes_file") or "the Cityscapes classes: no --classes"
        lines.append(f"Classes: {len(names)} ({source})")
    if summary.get("already_prepared"):
        lines.append(
            "Already prepared: not rebuilt (this is the stored summary; --overwrite rebuilds it)."
        )
    if summary.get("note"):
        lines.append(summary["note"])
    if summary.get("verified"):
        lines.append(f"Verified: {summary['verified']}.")
    if summary.get("images_in_no_split"):
        lines.append(
            f"Images in no --split_lists file (left out): {summary['images_in_no_split']:,}"
        )
    width = max(14, *(len(n) + 1 for n in names))  # Cityscapes' names: 14, as always.
    for split, info in summary["splits"].items():
        lines.append(f"Split {split!r}: {info['num_examples']:,} examples")
        if "class_pixels" in info:
            lines.extend(_split_lines(info, names, width))
    return "\n".join(lines)


def _split_lines(info: dict, names, width: int) -> list[str]:
    """The lines of one split of `format_summary` after its size."""
    lines, labelled = [], info.get("labelled", True)
    if labelled:
        class_total = max(1, sum(info["class_pixels"]))
        lines.append("  train id, class, pixels, share of the labelled pixels:")
        for train_id, (name, pixels) in enumerate(zip(names, info["class_pixels"], strict=True)):
            lines.append(
                f"  {train_id:2d} {name:<{width}}{pixels:>16,} {100 * pixels / class_total:6.2f}%"
            )
    else:
        lines.append(
            f"  UNLABELLED: {info['unlabelled']}; every label is 255 (ignore): usable as an "
            "unlabelled target domain only"
        )
    total = max(1, sum(info["class_pixels"]) + info["ignored_pixels"])
    lines.append(
        f"  {'ignored (255)':<{width + 3}}{info['ignored_pixels']:>16,} "
        f"{100 * info['ignored_pixels'] / total:6.2f}% of all pixels"
    )
    if labelled:
        if "unknown_colors" in info:
            unknown, what = info["unknown_colors"], "colours"
        else:
            unknown, what = info["unknown_label_ids"], "label ids"
        lines.append(
            f"  unknown {what} (mapped to ignore): "
            + (", ".join(f"{i}: {n:,} px" for i, n in unknown.items()) or "none")
        )
    if info["reencoded_images"]:
        lines.append(f"  images re-encoded as 8-bit RGB: {info['reencoded_images']:,}")
    lines.append(f"  skipped files: {len(info['skipped']) or 'none'}")
    lines.extend(f"    {s['file']}: {s['reason']}" for s in info["skipped"])
    return lines
