r"""Oracle: the same network trained with the *target* labels (the upper-bound row).

The "source" stream is the labelled target training split; nothing else changes from
source-only training. AdaptSegNet reports an oracle of 65.1 mIoU (R101, Cityscapes).

  python -m launch.main --config=configs/oracle.py:synthetic --workdir=/tmp/oracle_syn
"""

from configs import common


def get_config(arg=None):
    args = common.parse_arg(arg, synthetic=False)
    config = common.base_config()
    config.method = "source_only"
    if args.synthetic:
        common.use_synthetic(config)
    # Train on the target training split, with its labels, at the target input size.
    config.data.source = config.data.target.copy_and_resolve_references()
    return config
