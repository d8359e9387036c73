"""Command line: build a downloaded dataset into TFDS and print its summary.

  python -m launch.prepare --dataset=gta5 --manual_dir=/data/gta5
  python -m launch.prepare --dataset=synthia --manual_dir=/data/RAND_CITYSCAPES
  python -m launch.prepare --dataset=cityscapes --manual_dir=/data/cityscapes
  python -m launch.prepare --dataset=bdd100k --manual_dir=/data/bdd100k/seg
  python -m launch.prepare --dataset=mapillary --manual_dir=/data/mapillary
  python -m launch.prepare --dataset=folder --name=target --manual_dir=/data/real \\
      --images='**/*.jpg' --labels='{dir}/{stem}_mask.png' --label_format=colors \\
      --classes=/data/classes.json

Your own folders (--dataset=folder): the flags and formats are documented in
jaxda/data/builders/folder.py.

This file is intentionally short: all logic lives in `jaxda.data.prepare`.
"""

import json

from absl import app, flags

from jaxda import cli

cli.quiet_start(tfds_progress=True)  # Before TensorFlow loads; a build shows its progress.

from jaxda.data import prepare  # noqa: E402

flags.DEFINE_enum("dataset", None, sorted(prepare.DATASETS), "Dataset to build.")
flags.DEFINE_string(
    "manual_dir", None, "Folder holding the downloaded files (--dataset=folder: your images)."
)
flags.DEFINE_string(
    "data_dir", None, "TFDS data_dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)."
)
flags.DEFINE_string("summary_json", None, "Also write the summary to this JSON file.")
flags.DEFINE_bool("strict", False, "Stop at unusable files instead of skipping and listing them.")
flags.DEFINE_bool("overwrite", False, "Rebuild even if the dataset is already prepared.")
# Only for --dataset=folder (jaxda/data/builders/folder.py documents them).
flags.DEFINE_string("name", None, "Folder dataset: its name; read back as 'folder/NAME'.")
flags.DEFINE_string("images", None, "Folder dataset: glob of the images, e.g. '**/*.jpg'.")
flags.DEFINE_string(
    "labels", None, "Folder dataset: label path pattern, e.g. 'labels/{stem}.png' ({dir}, {name})."
)
flags.DEFINE_enum("label_format", None, prepare.LABEL_FORMATS, "Folder dataset: label encoding.")
flags.DEFINE_string("label_map", None, "Folder dataset: JSON {raw id: train id} for ids.")
flags.DEFINE_integer("label_channel", None, "Folder dataset: channel of RGB(A) integer labels.")
flags.DEFINE_string("classes", None, "Folder dataset: classes.json (default: Cityscapes').")
flags.DEFINE_string("split", None, "Folder dataset: name of the single split (default train).")
flags.DEFINE_string("split_folders", None, "Folder dataset: e.g. train:DIR1,validation:DIR2.")
flags.DEFINE_string("split_lists", None, "Folder dataset: e.g. train:FILE1,validation:FILE2.")
flags.DEFINE_string("split_fraction", None, "Folder dataset: e.g. validation:0.1.")
flags.mark_flags_as_required(["dataset", "manual_dir"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    given = {name: FLAGS[name].value for name in prepare.FOLDER_FLAGS if FLAGS[name].present}
    folder = prepare.folder_options(FLAGS.dataset, given)
    summary = prepare.prepare(
        FLAGS.dataset, FLAGS.manual_dir, FLAGS.data_dir, FLAGS.strict, FLAGS.overwrite, folder
    )
    print(prepare.format_summary(summary))
    if FLAGS.summary_json:
        with open(FLAGS.summary_json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    cli.run(main)
