"""Command line: train (default), evaluate or predict with a jaxda config.

  python -m launch.main --config=configs/adaptseg.py:synthetic --workdir=/tmp/adaptseg
  python -m launch.main --config=configs/adaptseg.py:synthetic --workdir=/tmp/adaptseg --mode=eval
  python -m launch.main --config=configs/adaptseg.py:synthetic --workdir=/tmp/adaptseg \
      --mode=predict --input=IMAGES_DIR_OR_FILE --output=OUT_DIR [--save_logits]
  # Several hosts (see jaxda/distributed.py): the same command on each, with its process id.
  python -m launch.main ... --coordinator_address=HOST0:PORT --num_processes=N --process_id=I

This file is intentionally short: all logic lives in the importable `jaxda` library.
"""

from absl import app, flags
from ml_collections import config_flags

from jaxda import cli, distributed, runtime

cli.quiet_start()  # Before TensorFlow and JAX load: the config file below imports them.
distributed.define_flags()  # --coordinator_address, --num_processes, --process_id, ...

config_flags.DEFINE_config_file("config", None, "Config file (path[:args]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "eval", "predict"],
    "Train (resuming if possible), evaluate a checkpoint, or predict image files with it.",
)
flags.DEFINE_string("input", None, "--mode=predict: an image file or a directory of images.")
flags.DEFINE_string("output", None, "--mode=predict: directory for the predictions.")
flags.DEFINE_bool("save_logits", False, "--mode=predict: also write <name>_logits.npy.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.mode == "predict" and not (FLAGS.input and FLAGS.output):
        raise app.UsageError("--mode=predict needs --input=IMAGES_DIR_OR_FILE and --output=DIR")
    if FLAGS.mode == "predict" and distributed.requested():
        raise app.UsageError("--mode=predict runs on one process: drop the multi-host flags")
    # Before JAX starts: XLA flags (deterministic GPU ops, ...) and the matmul precision.
    runtime.apply(FLAGS.config)
    import tensorflow as tf

    # tf.data only runs the input pipeline; keep TensorFlow off any accelerator.
    tf.config.set_visible_devices([], "GPU")

    # Multi-host runs join the other processes before JAX picks its devices.
    distributed.initialize_from_flags()
    from jaxda.evaluation import predict
    from jaxda.evaluation import run as eval_run
    from jaxda.train import stages

    if FLAGS.mode == "train":  # Every stage of a multi-stage config, or its only one.
        stages.run(FLAGS.config, FLAGS.workdir)
        return
    # A multi-stage config evaluates `:stage=NAME`, else its last training stage.
    config, workdir = stages.for_checkpoint(FLAGS.config, FLAGS.workdir)
    if FLAGS.mode == "eval":
        eval_run.evaluate_checkpoint(config, workdir)
    else:
        predict.predict(
            config,
            workdir,
            FLAGS.input,
            FLAGS.output,
            save_logits=FLAGS.save_logits,
        )


if __name__ == "__main__":
    cli.run(main)  # Expected errors (see jaxda.cli) print their message alone.
