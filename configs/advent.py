r"""AdvEnt: adversarial entropy minimisation (Vu et al., CVPR 2019), arXiv 1811.12833.

Official code: github.com/valeoai/ADVENT. Published: 43.8 mIoU GTA5 -> Cityscapes
(DeepLabV2-R101); 45.5 for the 0.5/0.5 logit ensemble of AdvEnt and MinEnt, evaluated with
`--mode=eval --config.eval.ensemble="('ADVENT_WORKDIR:0.5','MINENT_WORKDIR:0.5')"`.

  python -m launch.main --config=configs/advent.py --workdir=/tmp/advent
  python -m launch.main --config=configs/advent.py:synthetic --workdir=/tmp/advent_syn

As AdaptSegNet, but each discriminator sees the C-channel weighted self-information map
-p log2(p) / log2(C) of the softmax instead of the softmax. Values as ADVENT's config.py: all
four ASPP branches (ADVENT's loop is fixed), lambda_adv 0.001 main / 0.0002 aux, 120k steps of
a 250k poly schedule (its EARLY_STOP; it then picks the best 2k-step snapshot on Cityscapes val,
which jaxda reports only separately, labelled). Start from the DeepLab ImageNet weights with
`--config.init_from`. On the synthetic benchmark lambda_adv is 10x (0.01 / 0.002), as for
AdaptSegNet: the published weights barely move a small network in 600 steps.
"""

from configs import common


def get_config(arg=None):
    args = common.parse_arg(arg, synthetic=False, folders=False, source="gta5", model="deeplab_v2")
    config = common.advent_config("advent")
    config.adversarial = common.adversarial_block(0.001, 0.0002)
    common.select_data(config, args)
    common.select_model(config, args)
    if args.synthetic:
        config.adversarial = common.adversarial_block(0.01, 0.002)
    if args.folders:
        common.use_folders(config)
    return config
