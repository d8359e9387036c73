r"""MinEnt: direct entropy minimisation on the target (Vu et al., CVPR 2019, ADVENT's paper).

Official code: github.com/valeoai/ADVENT (`train_minent`). Published: 42.3 mIoU GTA5 ->
Cityscapes in MaxSquare's README table (MinEnt as re-run there: 42.2).

  python -m launch.main --config=configs/minent.py --workdir=/tmp/minent
  python -m launch.main --config=configs/minent.py:synthetic --workdir=/tmp/minent_syn

Loss: source CE (main + 0.1 aux) + 0.001 x H(main) + 0.0002 x H(aux) on the target, with H
the mean normalised entropy, base 2, eps 1e-30 inside the log. No discriminator. As ADVENT:
four ASPP branches, 120k steps of a 250k poly schedule. The "ER" (entropy ranking) variant has
no public training code and is not implemented. On the synthetic benchmark lambda_ent is 10x
(0.01 / 0.002) for the same reason as lambda_adv in configs/adaptseg.py.
"""

import ml_collections

from configs import common


def get_config(arg=None):
    args = common.parse_arg(arg, synthetic=False, folders=False, source="gta5", model="deeplab_v2")
    config = common.advent_config("minent")
    config.minent = ml_collections.ConfigDict({"lambda_ent": {"main": 0.001, "aux": 0.0002}})
    common.select_data(config, args)
    common.select_model(config, args)
    if args.synthetic:
        config.minent.lambda_ent = {"main": 0.01, "aux": 0.002}
    if args.folders:
        common.use_folders(config)
    return config
