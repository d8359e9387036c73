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
A third-party GTA5 -> Cityscapes re-run reported 37.5 -> 35.7 mIoU (docs/methods/tent.md).
"""

import ml_collections

from configs import common


def get_config(arg=None):
    args = common.parse_arg(
        arg,
        synthetic=False,
        folders=False,
        source="gta5",
        model="deeplab_v2",
        norm=False,
        episodic=False,
    )
    config = common.base_config()
    config.method = "bn_adapt" if args.norm else "tent"
    # The data first: `synthetic` sets the SGD learning rate of the training configs, which
    # the test-time optimizer below replaces.
    common.select_data(config, args)
    common.select_model(config, args)
    # BN normalises with batch statistics and its affine parameters are trainable.
    config.model.bn_mode = "train"
    config.optimizer = ml_collections.ConfigDict(
        {
            "name": "adam",  # The official cfgs/tent.yaml: Adam, lr 1e-3, betas 0.9/0.999.
            "learning_rate": 1e-3,
            "beta1": 0.9,
            "beta2": 0.999,
            "poly_power": 0.0,  # Constant learning rate.
            "decay_steps": 0,
            "lr_multipliers": {"backbone": 1.0, "head": 1.0},
            "weight_decay": 0.0,
            # BN-adapt updates nothing; TENT only the BN scale and offset.
            "freeze": (".*",) if args.norm else (),
            "train_only": (r"(.*/)?bn[^/]*/(scale|bias)",),
        }
    )
    config.tent = ml_collections.ConfigDict({"episodic": args.episodic})
    # One step per evaluation batch; checkpoints as often as a long pass needs.
    config.checkpoint_every_steps = 100
    config.log_every_steps = 10
    if args.folders:
        common.use_folders(config)
    return config
