"""The built-in synthetic benchmark as image/label folders, read back through the folder path.

A worked example of training on your own folders, and its check: the exported splits,
prepared with `launch.prepare --dataset=folder`, hold the same examples in the same order as
the built-in dataset, so AdaptSegNet trained on them gives the built-in run's mIoU.

    python benchmarks/export_synthetic_folders.py --out /tmp/synthetic_folders       # export
    python benchmarks/export_synthetic_folders.py --out /tmp/synthetic_folders \
        --prepare --compare /tmp/folder_runs                                       # + check

Layout written under --out (PNG files exactly as the built-in dataset stores them; labels are
8-bit train ids, so no --classes file is needed: the Cityscapes 19 classes apply):

    source/images/00000.png  source/labels/00000.png     (source_train, labelled)
    target/train/images/00000.png                        (target_train, left unlabelled)
    target/validation/images/00000.png  target/validation/labels/00000.png

`--prepare` runs the two prepare commands printed below (into --data_dir); `--compare DIR`
then trains `configs/adaptseg.py:synthetic` twice, on the built-in dataset and on the folder
datasets, with the same seed, and prints both mIoUs side by side.
"""

import argparse
import json
import os
import subprocess
import sys

from jaxda.data import sources
from jaxda.data.builders import folder

BUILT_IN = "synthetic_shift/64x128"
# Exported folder -> (built-in split, write labels).
EXPORTS = {
    "source": ("source_train", True),
    "target/train": ("target_train", False),
    "target/validation": ("target_validation", True),
}


def export(out: str, data_dir: str | None, dataset: str = BUILT_IN) -> dict[str, int]:
    """Writes the EXPORTS of `dataset` under `out`; returns {folder: number of examples}."""
    counts = {}
    for part_dir, (split, with_labels) in EXPORTS.items():
        reader = sources.SplitReader(dataset, split, data_dir)
        parts = ("images", "labels") if with_labels else ("images",)
        for part in parts:
            os.makedirs(os.path.join(out, part_dir, part), exist_ok=True)
        for index in range(len(reader)):
            example = reader[index]
            for part in parts:
                key = "image" if part == "images" else "label"
                with open(os.path.join(out, part_dir, part, f"{index:05d}.png"), "wb") as f:
                    f.write(example[key])
        counts[part_dir] = len(reader)
    return counts


def folder_options(prefix: str = "synthetic") -> dict[str, folder.FolderOptions]:
    """The `launch.prepare --dataset=folder` options of the exported folders: datasets
    folder/PREFIX_source ('train') and folder/PREFIX_target ('train', 'validation')."""
    common = {"images": "images/*.png", "labels": "labels/{stem}.png"}
    return {
        "source": folder.FolderOptions(name=f"{prefix}_source", **common),
        "target": folder.FolderOptions(
            name=f"{prefix}_target", split_folders="train:train,validation:validation", **common
        ),
    }


def folder_streams(prefix: str = "synthetic") -> dict[str, tuple[str, str]]:
    """config.data stream -> (dataset, split) of the exported folders."""
    return {
        "source": (f"folder/{prefix}_source", "train"),
        "target": (f"folder/{prefix}_target", "train"),
        "eval": (f"folder/{prefix}_target", "validation"),
    }


def prepare_commands(out: str, data_dir: str | None) -> list[list[str]]:
    where = [f"--data_dir={data_dir}"] if data_dir else []
    commands = []
    for part, options in folder_options().items():
        flags = [
            f"--name={options.name}",
            f"--images={options.images}",
            f"--labels={options.labels}",
        ]
        if options.split_folders:
            flags.append(f"--split_folders={options.split_folders}")
        commands.append(
            [sys.executable, "-m", "launch.prepare", "--dataset=folder", *flags,
             f"--manual_dir={os.path.join(out, part)}", *where]
        )  # fmt: skip
    return commands


FOLDER_OVERRIDES = tuple(
    f"--config.data.{stream}.{key}={value}"
    for stream, (name, split) in folder_streams().items()
    for key, value in (("name", name), ("split", split))
)


def train(workdir: str, overrides: tuple[str, ...], data_dir: str | None) -> float:
    """Trains configs/adaptseg.py:synthetic in `workdir`; returns its final mIoU."""
    command = [
        sys.executable, "-m", "launch.main", "--config=configs/adaptseg.py:synthetic",
        f"--workdir={workdir}", *overrides,
        *([f"--config.data.data_dir={data_dir}"] if data_dir else []),
    ]  # fmt: skip
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f)["final"]["miou"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="folder to export into")
    parser.add_argument("--data_dir", default=None, help="TFDS data_dir (default: TFDS's)")
    parser.add_argument("--prepare", action="store_true", help="also run launch.prepare")
    parser.add_argument("--compare", default="", help="also train both ways in DIR/{built_in,"
                        "folders} and print the two mIoUs")  # fmt: skip
    args = parser.parse_args()
    counts = export(args.out, args.data_dir)
    print(f"Exported {BUILT_IN} to {args.out}: " + ", ".join(f"{k} {n}" for k, n in counts.items()))
    commands = prepare_commands(args.out, args.data_dir)
    if not (args.prepare or args.compare):
        print("Prepare them with:\n" + "\n".join(" ".join(c[1:]) for c in commands))
        return
    for command in commands:
        print("+", " ".join(command), flush=True)
        subprocess.run(command, check=True)
    if args.compare:
        built_in = train(os.path.join(args.compare, "built_in"), (), args.data_dir)
        folders = train(os.path.join(args.compare, "folders"), FOLDER_OVERRIDES, args.data_dir)
        print(f"AdaptSegNet, seed 1234: built-in mIoU {built_in:.2f}, folders mIoU {folders:.2f}, "
              f"difference {folders - built_in:+.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
