r"""Adversarial_DA_Exp (github.com/yifan-bao/Adversarial_DA_Exp): AdaptSegNet's output-space
GAN on MaxSquare's trainer, DeepLabV2 and DeepLabV3+ (docs/methods/adversarial_da_exp.md).

  python -m launch.main --config=configs/adversarial_da_exp.py:source_only --workdir=/tmp/so
  python -m launch.main --config=configs/adversarial_da_exp.py --config.init_from=/tmp/so \
      --workdir=/tmp/adv
  arguments (commas): source_only; model=deeplabv3plus; shift=groups; bugs

Published (mIoU-16 / mIoU-13, SYNTHIA -> Cityscapes): source DeepLabV2 34.1 / 39.4, V3+ 33.2 /
38.6; AdaptSegNet V2 35.3 / 41.1, V3+ 37.0 / 42.8. Group0 -> Group1 (19 classes): source V2
64.0, V3+ 65.0; AdaptSegNet V2 59.5, V3+ 60.2.

Settings (its README commands and argument defaults):
* shift=synthia (default): SYNTHIA-RAND-CITYSCAPES at 1280x720 (its --crop_size, not the native
  1280x760) -> Cityscapes train at 1024x512; Cityscapes val at 1024x512 with labels resized to
  1024x512 (`data.eval.label_size=(512, 1024)`), mIoU over 16 classes plus mIoU-13.
* shift=groups: Cityscapes group 0 -> group 1 (`source=cityscapes_group0` of
  configs/common.py: bundled id lists, 19 classes, everything at 1024x512).
* SGD lr 2.5e-4 (backbone 1x, head 10x), momentum 0.9, weight decay 5e-4, poly 0.9; BN in
  training mode with its affine trained (--freeze_bn False); lambda_seg (aux CE) 0.1.
* source_only: 80k steps of a 200k poly horizon (--iter_stop 80000 --iter_max 200000).
* adaptation: from a source_only run (`--config.init_from=`), two discriminators (Adam 1e-4,
  betas 0.9 / 0.99, poly), lambda_adv 0.001 on the main output, 0.0002 on aux; 2 epochs over
  the target list (round_num 1 x epoch_each_round 2) with poly over those steps.
* model=deeplabv3plus: jfzhang95's DeepLabV3+ (ResNet-101, output stride 16, multi-grid
  (1, 2, 4), no aux head, so one discriminator), batch 2 (--batch_size_per_gpu 2).
* bugs: `adversarial.replicate_da_exp_bugs=True`, its three bugs (jaxda/train/common.py
  `discriminator_loss`, jaxda/train/adversarial.py `networks`): target discriminator inputs
  labelled 'source'; D_aux's source term computed on D_main's output; no lr decay for D_aux.

Deviations: jaxda trains 19 outputs and averages the 16 SYNTHIA classes (it trains a 16-way
model); SYNTHIA's whole train split (9,400 images, its list holds ids 0..8999); the final model
is reported (it keeps the best validation epoch); no Gaussian blur / mirror unless set on the
streams; inputs keep the base Caffe BGR normalisation for both networks.
"""

from configs import common

# Images of the target list (Cityscapes train, group 1); an epoch of MaxSquare's trainer is
# (images + batch) // batch iterations.
_TARGET_IMAGES = {"synthia": 2975, "groups": 1246}


def get_config(arg=None):
    args = common.parse_arg(arg, source_only=False, model="deeplab_v2", shift="synthia", bugs=False)
    if args.shift not in _TARGET_IMAGES:
        raise ValueError(f"Unknown shift={args.shift!r}; use one of {sorted(_TARGET_IMAGES)}")
    if args.source_only and args.bugs:
        raise ValueError("`bugs` are adversarial-training bugs; source_only has none")
    config = common.base_config()
    config.method = "source_only" if args.source_only else "adaptseg"
    data = common.parse_arg(
        "source=" + ("synthia" if args.shift == "synthia" else "cityscapes_group0"),
        synthetic=False, source="gta5", model=args.model,
    )  # fmt: skip
    common.select_data(config, data)
    common.select_model(config, data)
    if args.shift == "synthia":
        config.data.source.size = (720, 1280)
        config.data.eval.label_size = (512, 1024)
    if args.model == "deeplabv3plus":
        config.model.depth = 101
        config.model.multi_grid = (1, 2, 4)
        config.model.variant = "jfzhang95"
        config.model.multi_level = False
        config.loss.lambda_seg_aux = 0.0
        config.batch_size = 2
    config.model.bn_mode = "train"
    config.optimizer.learning_rate = 2.5e-4
    config.optimizer.weight_decay = 5e-4
    config.loss.lambda_seg_aux = 0.1 if config.model.multi_level else 0.0
    if args.source_only:
        config.total_steps = 80_000
        config.optimizer.decay_steps = 200_000
    else:
        config.adversarial = common.adversarial_block(0.001, 0.0002)
        config.adversarial.replicate_da_exp_bugs = args.bugs
        per_epoch = (_TARGET_IMAGES[args.shift] + config.batch_size) // config.batch_size
        config.total_steps = 2 * per_epoch
        config.optimizer.decay_steps = 0  # Poly over the run, generator and discriminators.
        config.disc_optimizer.decay_steps = 0
    return config
