r"""Oracle: the same network trained with the *target* labels (the upper-bound row).

Source-only training (configs/source_only.py) whose "source" stream is the labelled target
training split, at the target input size. AdaptSegNet reports an oracle of 65.1 mIoU (R101,
Cityscapes).

  python -m launch.main --config=configs/oracle.py:synthetic --workdir=/tmp/oracle_syn
"""

from configs import source_only


def get_config(arg=None):
    config = source_only.get_config(arg)
    config.data.source = config.data.target.copy_and_resolve_references()
    return config
