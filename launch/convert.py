"""Command line: convert a PyTorch checkpoint of a published method into a jaxda checkpoint.

  python -m launch.convert --from=GTA2Cityscapes_multi-ed35151c.pth \
      --config=configs/adaptseg.py --out=/tmp/adaptseg_released
  python -m launch.main --config=configs/adaptseg.py --workdir=/tmp/adaptseg_released --mode=eval

A ProDA `.pkl` with a ProDA network config (--config.model.name=proda_deeplab_v2, and
--config.model.bn_clr for stage 2 / 3 files) loads whole and writes its prototypes to
OUT/prototypes.npy; --layout=simclr reads ProDA's SimCLR init (backbone only). An HRDA /
MIC(HRDA) training checkpoint (`work_dirs/<run>/iter_40000.pth`) needs an 'hrda' config:

  python -m launch.convert --from=iter_40000.pth --config=configs/dacs.py:model=mit \
      --config.model.name=hrda --out=/tmp/hrda_released

(HRDA's defaults are the official recipe's: attention_embed_dim 256, class-wise attention;
the file's encoder must be the config's variant, MiT-B5 here). A RobustNet IBN / ISW file needs
its normalisation in the config (e.g. --config=configs/robustnet.py:norm=ibn, or
--config.model.instance_norm=affine|plain --config.model.instance_norm_at="('stem', 'layer1',
'layer2')"); a mismatch is refused with the keys that show it.

Needs PyTorch (pip install -e '.[torch]'). The layout is detected from the file's keys
(--layout overrides it); the printed report lists what was loaded, what the file lacks (kept at
the config's initialisation), and what was skipped or ignored, by name. This file is
intentionally short: all logic lives in `jaxda.interop`.
"""

import pickle

from absl import app, flags
from ml_collections import config_flags

from jaxda import cli

cli.quiet_start()  # Before TensorFlow and JAX load: jaxda.interop imports them.

from jaxda.interop import convert, layouts  # noqa: E402

config_flags.DEFINE_config_file(
    "config", None, "Config file (path[:args]) describing the model.", lock_config=True
)
flags.DEFINE_string("from", None, "The PyTorch checkpoint (.pth / .pkl) to convert.")
flags.DEFINE_string(
    "out",
    None,
    "Output directory: OUT/checkpoints/0 (a segmentation network, for --workdir=OUT "
    "--mode=eval or --config.init_from=OUT) or OUT/discriminator (a discriminator).",
)
flags.DEFINE_enum(
    "layout", "auto", ["auto", *layouts.LAYOUTS], "The file's key layout (auto: detect)."
)
flags.DEFINE_bool(
    "skip_head", False, "Load the backbone only: the heads keep their initialisation."
)
flags.DEFINE_bool(
    "skip_aspp_check",
    False,
    "Convert even when the heads look trained with another number of ASPP branches than "
    "config.model.num_aspp_branches.",
)
flags.mark_flags_as_required(["config", "from", "out"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        report = convert.convert_file(
            FLAGS["from"].value,
            FLAGS.config,
            FLAGS.out,
            layout=None if FLAGS.layout == "auto" else FLAGS.layout,
            skip_head=FLAGS.skip_head,
            check_aspp=not FLAGS.skip_aspp_check,
        )
    except (pickle.UnpicklingError, EOFError, RuntimeError) as e:
        if not cli.raised_in(e, "torch/serialization.py"):
            raise
        raise cli.CommandError(f"Cannot read {FLAGS['from'].value} with torch.load: {e}") from e
    print(report.format())
    print(f"Written under {FLAGS.out}")


if __name__ == "__main__":
    cli.run(main)  # Expected errors (see jaxda.cli) print their message alone.
