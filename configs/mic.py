r"""MIC (Hoyer et al., CVPR 2023): masked image consistency on top of DAFormer.

https://arxiv.org/abs/2212.01322 -- official code: github.com/lhoyer/MIC (`seg/`). Published:
MIC(HRDA) 75.9 mIoU GTA5 -> Cityscapes (the official README), 67.3 mIoU-16 SYNTHIA ->
Cityscapes (the paper); MIC(DAFormer) 70.6 GTA5 -> Cityscapes (the paper; its setting is the
official `experiments.py` id 81).

  python -m launch.main --config=configs/mic.py --workdir=/runs/mic --config.init_from=...
  python -m launch.main --config=configs/mic.py:synthetic --workdir=/tmp/mic
  arguments (comma-separated): base=daformer, and configs/daformer.py's (synthetic,
  source=synthia, model=..., mit_variant=..., folders)

`base=daformer` (the only base so far; MIC(HRDA) follows HRDA into jaxda): configs/daformer.py
plus, per step, one more student forward on the target crops, colour-jittered and blurred with
fresh draws and with 70% of their 32x32 blocks set to 0 in normalised space (MIC's
'separatetrgaug' mode; `dacs.mic`), trained towards the step's pseudo labels with the target
confidence weights (the pseudo-label crop included; not ClassMix's weights) at weight 1. The
teacher and its pseudo labels are DAFormer's (MIC's `mask_alpha='same'`,
`mask_pseudo_threshold='same'`): no second teacher.

On the built-in benchmark (`synthetic`): configs/daformer.py's synthetic setting with blocks of
4x4 pixels (MIC(DAFormer)'s 32 of a 512-row crop is 1/16 of its height; 4 of 64 rows is too).
"""

from configs import common, daformer

BASES = ("daformer",)


def get_config(arg=None):
    args = common.parse_arg(
        arg,
        base="daformer",
        synthetic=False,
        folders=False,
        source="gta5",
        model="mit",
        mit_variant="b5",
    )
    if args.base not in BASES:
        raise ValueError(
            f"configs/mic.py: base={args.base!r}; use one of {BASES} (MIC(HRDA) needs HRDA, "
            "which jaxda does not have yet)"
        )
    config = daformer.get_config(common.format_arg(args, sorted(set(args.keys()) - {"base"})))
    mic = config.dacs.mic
    mic.weight, mic.ratio, mic.color_augment = 1.0, 0.7, True
    mic.block_size = 4 if args.synthetic else 32
    return config
