r"""TENT: fully test-time adaptation by entropy minimisation (Wang et al., ICLR 2021),
arXiv 2006.10726, here for segmentation; `:norm` is its BN-statistics baseline (BN-adapt).

  python -m launch.main --config=configs/tent.py --config.init_from=SOURCE_WORKDIR --workdir=...
  python -m launch.main --config=configs/tent.py:synthetic,norm --config.init_from=... --workdir=...

Starts from a trained network (`init_from`, e.g. a configs/source_only.py run with the same
model settings) and adapts it online on the evaluation split: every BN normalises with the
statistics of the current batch; for TENT only the BN scale and offset are trained, by one
Adam step (lr 1e-3, betas 0.9/0.999, as the official cfgs/tent.yaml) per batch on the
natural-log entropy averaged over N, H and W of the head's stride-8 logits (not upsampled);
each batch is scored with the prediction made before its update. `episodic` resets the
parameters after every batch. The reported mIoU is
the online one; the starting checkpoint's mIoU (running statistics, no adaptation) sits in
the same results.json. The official code has no segmentation version (CIFAR-10-C only): the
entropy is averaged over pixels too (the CIFAR code's `.mean(0)` would leave an [H, W] map),
and the batch size is ours (1 image of 1024x512 by default; 8 on the synthetic benchmark).
A third-party GTA5 -> Cityscapes re-run reported 37.5 -> 35.7 mIoU (methods.md).
"""

import ml_collections

from configs import common


def get_config(arg=None):
    args = common.parse_arg(arg, synthetic=False, source="gta5", norm=False, episodic=False)
    config = common.base_config()
    config.method = "bn_adapt" if args.norm else "tent"
    config.tent = ml_collections.ConfigDict(
        {
            "update_bn_affine": not args.norm,  # False: batch statistics only (BN-adapt).
            "learning_rate": 1e-3,
            "beta1": 0.9,
            "beta2": 0.999,
            "episodic": args.episodic,
        }
    )
    common.select_data(config, args)
    return config
