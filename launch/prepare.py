"""Command line: build a downloaded dataset into TFDS and print its summary.

  python -m launch.prepare --dataset=gta5 --manual_dir=/data/gta5
  python -m launch.prepare --dataset=synthia --manual_dir=/data/RAND_CITYSCAPES
  python -m launch.prepare --dataset=cityscapes --manual_dir=/data/cityscapes
  python -m launch.prepare --dataset=bdd100k --manual_dir=/data/bdd100k/seg
  python -m launch.prepare --dataset=mapillary --manual_dir=/data/mapillary

This file is intentionally short: all logic lives in `jaxda.data.prepare`.
"""

import json
import sys

from absl import app, flags

from jaxda.data import prepare

flags.DEFINE_enum("dataset", None, sorted(prepare.DATASETS), "Dataset to build.")
flags.DEFINE_string("manual_dir", None, "Folder holding the downloaded files.")
flags.DEFINE_string(
    "data_dir", None, "TFDS data_dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)."
)
flags.DEFINE_string("summary_json", None, "Also write the summary to this JSON file.")
flags.DEFINE_bool("strict", False, "Stop at unusable files instead of skipping and listing them.")
flags.DEFINE_bool("overwrite", False, "Rebuild even if the dataset is already prepared.")
flags.mark_flags_as_required(["dataset", "manual_dir"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        summary = prepare.prepare(
            FLAGS.dataset, FLAGS.manual_dir, FLAGS.data_dir, FLAGS.strict, FLAGS.overwrite
        )
    except prepare.ManualDataError as e:  # A problem with the user's files: no traceback.
        sys.exit(f"launch.prepare: error: {e}")
    print(prepare.format_summary(summary))
    if FLAGS.summary_json:
        with open(FLAGS.summary_json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    app.run(main)
