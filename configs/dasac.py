r"""DA-SAC (Araslanov and Roth, CVPR 2021): self-supervised augmentation consistency.
https://arxiv.org/abs/2105.00097 -- official code: github.com/visinf/da-sac. Published
(DeepLabV2-R101, Cityscapes val, checkpoint selected on its val2 list): ABN baseline 40.8,
SAC 53.8 GTA5 -> Cityscapes; SYNTHIA -> Cityscapes mIoU-16 36.3 / 52.6.

  python -m launch.main --config=configs/dasac.py --workdir=/runs/dasac      # ABN, then SAC
  python -m launch.main --config=configs/dasac.py:stage=sac --config.init_from=/runs/abn \
      --workdir=/runs/sac                                                    # SAC alone
  python -m launch.main --config=configs/dasac.py:synthetic --workdir=/tmp/dasac  # built-in
  arguments (comma-separated): synthetic, source=synthia, stage=NAME, init=PATH (ABN's
  initialisation: torchvision's ResNet-101 converted with `launch.convert`)

Stages, each in workdir/<name>/ (docs/methods/dasac.md):
  abn         source CE (crop 640, scale 0.5-2.0, flip, colour jitter), batch 12; 8 target
              images per step through the network in training mode without gradient, so
              the BN running statistics adapt to the target (adaptive BN)
  is_weights  offline: per target image, the ABN model's predicted pixels per class, for
              importance sampling (da-sac's tools/compute_IS_weights.py)
  sac         source CE (crop 512x1024, scale 0.5-1.0, flip, batch 8) + 5 x the
              confidence-weighted focal CE on 2 target images x 4 views, against pseudo
              labels of the momentum network fused over the views; target images drawn by
              importance (class `index % 19`, then an image from 0.25/N + 0.75 x its share
              of the class's pixels); BN in evaluation mode with its affine trained

Network: DeepLabV2-R101 (Caffe strides) with one head summing all four ASPP branches,
torchvision ImageNet initialisation (ImageNet mean/std normalisation); parameter groups:
backbone weights 1x with weight decay, backbone biases (BN offsets included) 2x without,
head weights 10x, head biases 20x without. SGD lr 2.5e-4, momentum 0.9, weight decay 5e-4,
constant learning rate (no poly anywhere in da-sac). Source images are re-normalised with
GTA5-vs-Cityscapes statistics (`RENORM_SOURCE`; SYNTHIA runs use GTA5's as da-sac does).

Selection and results: periodic evaluations run on `data.selection`, da-sac's val2 (500
images of the Cityscapes *train* split, images and labels at 1024x512) and are reported only
as 'selected_on_validation'; 'final' is the last step on Cityscapes val at 2048x1024. SYNTHIA:
the 16-class mean of the 19-way model (classes 9, 14, 16 left out), 13 and 19 beside it.

Faithful defaults, and their switches:
  sac.confidence_weighting='broadcast'  da-sac's `_focal_ce_conf` multiplies a [B, H, W] loss
        by a [B, 1, H, W] confidence, which broadcasts to [B, B, H, W]: the loss is the pixel
        mean of (mean over the B views of the loss) x (mean over the B views of the
        confidence), B = the views on one GPU (`sac.confidence_group` = 2 in the published
        4-GPU run). 'pixel' is the per-pixel product the paper describes.
  sac.source_mean_all_pixels=True  the source CE is averaged over all pixels, ignored ones
        counting 0 (da-sac's reduction='none' then .mean()); False averages over labelled ones.
  sac.epoch_steps  da-sac's teacher schedule counts iterations within an epoch (every 100,
        and at every epoch start): 1,125 steps for GTA5 (9,000 / 8), 1,175 for SYNTHIA
        (9,400 / 8); 0 counts from the stage's start.
Deliberate differences: one class prior over all views of the step (da-sac keeps one per GPU
and DDP broadcasts GPU 0's); the whole target batch is fused and weighted in one program (its
2 images x 4 views, as the published run's GPUs 0 and 1 used: da-sac's 4-GPU loop drops the
views loaded on GPUs 2 and 3); colour jitter of the ABN stage's source is applied to every
image without hue (da-sac: p 0.5, hue 0.1); images resized with PIL's bicubic filter; views
cropped in the unflipped frame and then flipped (da-sac flips first; the same distribution).

On the built-in benchmark (`synthetic`): the small network from scratch, batch 8 source
images (and 8 target images in ABN, 2 x 4 views in SAC), lr 2.5e-3 constant, 600 ABN steps
then 600 SAC steps; the teacher is updated every 10 steps with momentum 0.9 (600 steps hold
6 updates of da-sac's cadence; 10 / 0.9 give the teacher a ~100-step memory); blur radii
scaled to the 8x smaller images; no source re-normalisation (the benchmark's domains have no
published statistics).
"""

import ml_collections
import numpy as np

from configs import common
from jaxda.data import labels

# da-sac's colour statistics (RGB, 0..1): GTA5 (used for SYNTHIA too), Cityscapes, ImageNet.
GTA5_STATS = ((0.481, 0.479, 0.465), (0.243, 0.239, 0.237))
CITYSCAPES_STATS = ((0.300, 0.344, 0.297), (0.175, 0.180, 0.177))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
ABN_STEPS = 100 * (9000 // 12)  # 100 epochs of GTA5's 9,000 images at batch 12.
SAC_EPOCH_STEPS = {"gta5": 9000 // 8, "synthia": 9400 // 8}
SAC_EPOCHS = 200  # NUM_EPOCHS of the SAC stage.


def renormalised_source() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) in 0..255 units of da-sac's RENORM_SOURCE: source images normalised so that
    their statistics land where the target's do after ImageNet normalisation."""
    m_src, s_src, m_tgt, s_tgt, m_in, s_in = (
        np.asarray(x) for pair in (GTA5_STATS, CITYSCAPES_STATS, IMAGENET_STATS) for x in pair
    )
    mean = 255 * (m_src - s_src / s_tgt * (m_tgt - m_in))
    std = 255 * s_src * s_in / s_tgt
    mean, std = tuple(float(x) for x in mean), tuple(float(x) for x in std)
    return mean, std


def sac_block() -> ml_collections.ConfigDict:
    """config.sac: every value of the SAC stage (configs/deeplabv2_resnet101_train.yaml and
    core/config.py of da-sac)."""
    return ml_collections.ConfigDict(
        {
            "target_weight": 5.0,  # LR_TARGET (VGG: 2.0).
            "teacher_momentum": 0.99,  # NET_MOMENTUM
            "teacher_every": 100,  # NET_MOMENTUM_ITER
            "epoch_steps": 0,  # Set per source below; 0 = count from the stage's start.
            "prior_momentum": 0.99,  # STAT_MOMENTUM
            "threshold_beta": 1e-3,  # THRESHOLD_BETA
            "confidence_upper": 0.75,  # RUN_CONF_UPPER
            "confidence_lower": 0.2,  # RUN_CONF_LOWER (VGG: 0.1)
            "threshold_discount": True,  # CONF_DISCOUNT
            "focal_power": 3.0,  # FOCAL_P
            "fuse_views": True,  # CONF_POOL_ON with CONF_POOL 'avg_pool'.
            "confidence_weighting": "broadcast",  # Or 'pixel' (see the module docstring).
            "confidence_group": 2,  # Views per GPU in the published run (8 / 4).
            "source_mean_all_pixels": True,
        }
    )


def _group(size, zoom, flip, blur, jitter, greyscale) -> dict:
    return {
        "size": size, "zoom": zoom, "flip": flip, "blur_radius": blur, "jitter": jitter,
        "jitter_prob": 0.5, "hue": 0.1, "greyscale_prob": greyscale,
    }  # fmt: skip


def _stages(args, synthetic: bool) -> dict:
    blur = (0.1 / 8, 2.0 / 8) if synthetic else (0.1, 2.0)
    crop = (64, 128) if synthetic else (512, 1024)
    target_size = (64, 128) if synthetic else (512, 1024)
    sac_steps = 600 if synthetic else SAC_EPOCHS * SAC_EPOCH_STEPS[args.source]
    return {
        "abn": {"method": "dasac_abn", "init_from": args.init},
        "is_weights": {
            "init_from": "stage:abn",
            "offline": {"pass": "dasac_class_pixels", "stream": "target"},
        },
        "sac": {
            "method": "dasac_sac",
            "total_steps": sac_steps,
            "init": {"seg": "stage:abn"},
            "model": {"bn_mode": "frozen_stats"},
            "batch_size": 8,
            "data": {
                "source": {"random_scale": (0.5, 1.0), "crop_size": crop, "color_jitter": 0.0},
                "target": {
                    "size": target_size,
                    "random_scale": (1.0, 1.1),
                    "crop_size": crop,
                    "flip": True,
                    "color_jitter": 0.0,
                    "batch_size": 2,
                    "group": _group(4, (0.5, 1.0), True, blur, 0.4, 0.2),
                    "importance": {"weights": "stage:is_weights"},
                },
            },
        },
    }


def get_config(arg=None):
    args = common.parse_arg(arg, synthetic=False, folders=False, source="gta5", stage="", init="")
    if args.source not in ("gta5", "synthia"):
        raise ValueError(f"configs/dasac.py: source={args.source!r}; use gta5 or synthia")
    config = common.base_config()
    common.select_data(config, args)
    config.method = "dasac_abn"  # The first stage; the SAC stage overrides it.
    config.sac = sac_block()
    config.model.multi_level = False
    config.model.num_aspp_branches = 4
    config.model.bn_mode = "train"  # SyncBN, trained (the SAC stage: 'frozen_stats').
    config.loss.lambda_seg_aux = 0.0
    opt = config.optimizer
    opt.learning_rate, opt.weight_decay, opt.momentum = 2.5e-4, 5e-4, 0.9
    opt.poly_power = 0.0  # Constant learning rate.
    opt.lr_multipliers = {"backbone": 1.0, "head": 10.0}
    opt.bias_lr_multiplier, opt.bias_weight_decay = 2.0, False
    for name, value in common.NORMALIZATIONS["imagenet"].items():
        config.data[name] = value
    config.data.target.importance = ml_collections.ConfigDict(
        {"weights": "", "uniform_prior": 0.25, "uniform_classes": ()}
    )
    config.data.target.batch_size = 8  # ABN: NUM_GROUPS 8 x GROUP_SIZE 1.
    if args.synthetic:
        config.batch_size = 8
        config.total_steps = 600
        config.optimizer.learning_rate = 2.5e-3
        config.sac.teacher_every = 10
        config.sac.teacher_momentum = 0.9
        scale, crop = (0.5, 2.0), (64, 128)
        config.offline.batch_size = 50
    else:
        config.batch_size = 12
        config.total_steps = ABN_STEPS
        config.eval_every_steps = config.checkpoint_every_steps = 2000
        config.sac.epoch_steps = SAC_EPOCH_STEPS[args.source]
        config.data.source.size = (760, 1280) if args.source == "synthia" else (1052, 1914)
        config.data.target.size = (1024, 2048)
        scale, crop = (0.5, 2.0), (640, 640)
        config.offline.batch_size = 8
        mean, std = renormalised_source()
        config.data.source.image_mean, config.data.source.image_std = mean, std
        # Selection on da-sac's val2 at 1024x512; final numbers on Cityscapes val at 2048x1024.
        config.data.selection = common.domain(
            "cityscapes_fine", "train", (512, 1024), subset="cityscapes_dasac_val2"
        )
        config.data.selection.label_size = (512, 1024)
        config.data.selection.batch_size = 1
        config.data.eval.size = None
        if args.source == "synthia":
            config.data.target.importance.uniform_classes = tuple(
                sorted(set(range(labels.NUM_CLASSES)) - set(labels.SYNTHIA_16_CLASSES))
            )
    for stream in (config.data.source, config.data.target):
        stream.random_scale, stream.crop_size, stream.flip = scale, crop, True
        stream.color_jitter = 0.5  # da-sac's RND_JITTER in effect (see the docstring).
    config.stage_order = ("abn", "is_weights", "sac")
    config.stages = ml_collections.ConfigDict(_stages(args, args.synthetic))
    config.stage = args.stage
    if args.folders:
        common.use_folders(config)
    return config
