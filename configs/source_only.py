r"""Source-only baseline: DeepLabV2-R101 trained on GTA5 labels, evaluated on Cityscapes val.

The lower bound of every adaptation table: CE on the main head + 0.1 x CE on the aux head,
exactly AdaptSegNet's segmentation loss without the adversarial part (docs/methods/adaptsegnet.md).

  python -m launch.main --config=configs/source_only.py --workdir=/tmp/source_only
  python -m launch.main --config=configs/source_only.py:source=synthia --workdir=/tmp/so_syn
  python -m launch.main --config=configs/source_only.py:synthetic --workdir=/tmp/so_bench
  `model=mit` (`mit_variant=b0..b5`): MiT with DAFormer's head, the baseline of the MiT rows.

Published: MaxSquare's README reports 36.9 mIoU for its GTA5 source model (its own schedule);
AdaptSegNet's paper table has no R101 source-only row in the repo.
"""

from configs import common


def get_config(arg=None):
    args = common.parse_arg(
        arg, synthetic=False, folders=False, source="gta5", model="deeplab_v2", mit_variant="b5"
    )
    config = common.base_config()
    config.method = "source_only"
    common.select_data(config, args)
    if args.model == "mit":  # DAFormer's network: one output, so the main head's CE only.
        common.use_mit(config, variant=args.mit_variant, synthetic=args.synthetic)
        config.loss.lambda_seg_aux = 0.0
    else:
        common.select_model(config, args)
    if args.folders:
        common.use_folders(config)
    return config
