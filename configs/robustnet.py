r"""RobustNet (Choi et al., CVPR 2021): domain generalisation by instance selective whitening.
https://arxiv.org/abs/2103.15597 -- official code: github.com/shachoi/RobustNet. Trained on one
synthetic source with no target image, judged on unseen real datasets. Published (its README,
DeepLabV3+ R101 OS8 on GTA5, mean of 3 runs; BDD100K / Cityscapes / Mapillary / SYNTHIA /
GTA5): baseline 24.85 / 30.06 / 31.50 / 28.78 / 74.71, IBN 33.30 / 33.63 / 36.50 / 31.32 /
74.46, ISW 35.37 / 37.09 / 38.50 / 30.49 / 74.49.

  python -m launch.main --config=configs/robustnet.py --workdir=/runs/isw            # ISW
  python -m launch.main --config=configs/robustnet.py:norm=ibn --workdir=/runs/ibn
  python -m launch.main --config=configs/robustnet.py --workdir=/runs/isw --mode=eval  # DG table
  python -m launch.main --config=configs/robustnet.py:synthetic --workdir=/tmp/isw   # built-in
  arguments (comma-separated): norm=base|ibn|iw|irw|isw (default isw), source=gta5|synthia|
  cityscapes, synthetic, init=PATH (ImageNet ResNet-50 converted with `launch.convert`)

The normalisation family (RobustNet's `--wt_layer 0 0 X X X 0 0` on ResNet-50): instance
normalisation replaces the stem's BN and follows the residual sum of the last block of layer1
and layer2 (before its ReLU):
  base  none;
  ibn   InstanceNorm with affine (IBN-Net style), no extra loss;
  iw    InstanceNorm without affine + 0.8 x the whitening loss over every off-diagonal
        covariance entry (|cov| summed over the strict upper triangle / its size);
  irw   the same relaxed: margin = off-diagonal count // 64, weight 0.6;
  isw   the same over the ISW mask only, weight 0.6: after epoch 5 (6 epochs of training) a
        pass over 10 x 500 source pairs (photometric copy: jitter 0.8/0.8/0.8, hue 0.3, random
        order, then blur std U(0.15, 1.3); original) measures how much each covariance entry
        moves; 1-D k-means with 3 clusters; the entries outside the lowest cluster, AND-ed
        over the 10 trials, are whitened from then on (jaxda/train/isw_mask.py).
The whitening loss is per image: (sum |cov * mask| - margin) / count, clamped at 0, averaged
over the batch and the whitened layers, on cov = the instance-normalised map's covariance / (HW
- 1) + 1e-5 I.

Training (scripts/train_r50os16_gtav_*.sh): DeepLabV3+ R50 OS16 with the `dsn` aux head,
SyncBN trained (here: batch statistics over the global batch), ImageNet mean/std input; SGD
lr 0.01, momentum 0.9, weight decay 5e-4 on every parameter, one learning rate for all (no
10x head), poly 0.9 over 40k steps, batch 16; crop 768 of the image scaled by U(0.5, 2.0),
flip, colour jitter, Gaussian blur (std U(0.15, 1.3)) on every image; class-uniform sampling:
half of each epoch's images are crops around a class's centroid in a 1024 tile, the classes
drawn equally; loss CE + 0.4 x CE of the aux head on labels nearest-downsampled to its grid
+ the whitening loss. Evaluation at the end, each dataset under its own protocol (native
resolution; Mapillary resized to height 1536 and centre cropped/padded): `eval.datasets`,
printed as one table by `--mode=eval`; periodic evaluation on Cityscapes val is monitoring.

Deliberate differences: the colour jitter is brightness/contrast/saturation 0.4 on every
image in a fixed order (RobustNet: p 0.5, hue 0.1, random order); crops pad with the mean
colour (RobustNet: black before normalisation); images resized with PIL's bicubic filter as
RobustNet does, labels nearest. The mask pass reads GTA5 images resized to 1052x1914 (most
are that size; RobustNet reads each at its own size, one pair per batch); one mask from all
pairs (RobustNet's GPUs each build their own from their share). GTA5 and SYNTHIA train on
RobustNet's own train lists (bundled subsets gta5_robustnet_train, 12,388 images, and
synthia_robustnet_train, 6,580); its val lists are their DG rows. `whitening.epoch_steps`:
774 (GTA5), 411 (SYNTHIA), 185 (Cityscapes) steps of 16.

On the built-in benchmark (`synthetic`): the small DeepLabV3+ from scratch (two blocks in
layer1 and layer2, one in layer3 and layer4, width 8), batch 8, 600
steps, lr 0.01 poly, crops of 64x64 from images scaled by U(0.5, 2.0) (class-uniform tile 32),
the mask pass after 100 steps (`epoch_steps` 50, `cov_stat_epoch` 1) over 10 x 200 pairs with
the blur scaled to the 8x smaller images; evaluated on the target domain (never seen in
training) and, as the DG table, on both domains' validation splits.
"""

import ml_collections

from configs import common
from jaxda.data import synthetic

NORMS = {
    # norm -> (model.instance_norm, whitening.kind, whitening.weight, whitening.relax_denom)
    "base": ("", "", 0.0, 0.0),
    "ibn": ("affine", "", 0.0, 0.0),
    "iw": ("plain", "iw", 0.8, 0.0),
    "irw": ("plain", "irw", 0.6, 64.0),
    "isw": ("plain", "isw", 0.6, 0.0),
}
SOURCES = ("gta5", "synthia", "cityscapes")


def whitening_block(kind: str, weight: float, relax_denom: float, stream):
    """config.whitening: the whitening loss and ISW's mask pass (jaxda/train/robustnet.py)."""
    return ml_collections.ConfigDict(
        {
            "kind": kind,  # '' | 'iw' | 'irw' | 'isw'.
            "weight": weight,
            "relax_denom": relax_denom,  # IRW's margin: off-diagonal count // relax_denom.
            # ISW's mask pass: after (cov_stat_epoch + 1) x epoch_steps steps ...
            "cov_stat_epoch": 5,
            "epoch_steps": 774,
            # ... `trials` passes of `images_per_trial` pairs, `batch_size` pairs per step ...
            "trials": 10,
            "images_per_trial": 500,
            "batch_size": 8,
            # ... exact 1-D k-means into `clusters` groups of the entries' variances.
            "clusters": 3,
            # The pairs: a group of one view, whose noisy copy is the photometric one.
            "stream": stream,
        }
    )


def photometric_pairs(name: str, split: str, size=None, blur_radius=(0.15, 1.3)):
    """The mask pass's stream: each image with its photometric copy (RobustNet's
    ColorJitter(0.8, 0.8, 0.8, 0.3), then a Gaussian blur)."""
    stream = common.domain(name, split, size)
    stream.group = {
        "size": 1,
        "zoom": (1.0, 1.0),
        "flip": False,
        "blur_radius": blur_radius,
        "jitter": 0.8,
        "jitter_prob": 1.0,
        "hue": 0.3,
        "greyscale_prob": 0.0,
        "blur_after_jitter": True,
    }
    return stream


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = common.parse_arg(arg, synthetic=False, folders=False, norm="isw", source="gta5", init="")
    common.check_variants(args)
    if args.norm not in NORMS:
        raise ValueError(f"Unknown norm={args.norm!r}; use one of {sorted(NORMS)}")
    if args.source not in SOURCES:
        raise ValueError(f"Unknown source={args.source!r}; use one of {SOURCES}")
    c = common.base_config()
    c.method = "robustnet"
    c.seed = 304  # RobustNet's scripts.
    if args.synthetic:
        common.use_synthetic(c)
    common.use_deeplabv3plus(c, synthetic=args.synthetic)
    instance_norm, kind, weight, relax_denom = NORMS[args.norm]
    c.model.instance_norm = instance_norm
    c.data.update(common.NORMALIZATIONS["imagenet"])
    c.loss.lambda_seg_aux = 0.4
    c.total_steps = 40_000
    c.batch_size = 16
    c.eval_every_steps = 5000
    c.checkpoint_every_steps = 1000
    c.init_from = args.init
    c.optimizer.learning_rate = 0.01
    c.optimizer.lr_multipliers = {"backbone": 1.0, "head": 1.0}
    c.optimizer.decay_steps = 0  # = total_steps.
    if args.synthetic:
        _synthetic(c, kind, weight, relax_denom)
        return c
    # RobustNet's own train lists (its GTA5 / SYNTHIA val lists are the DG table's rows).
    source = {
        "gta5": common.domain("gta5", "train", subset="gta5_robustnet_train"),
        "synthia": common.domain(
            "synthia_rand_cityscapes", "train", subset="synthia_robustnet_train"
        ),
        "cityscapes": common.domain("cityscapes_fine", "train"),
    }[args.source]
    _augment(source, crop=768, blur=(0.15, 1.3), tile=1024)
    c.data.source = source
    c.data.eval = common.domain("cityscapes_fine", "validation")  # Native 2048x1024.
    c.data.eval.label_size = None
    c.data.eval.batch_size = 1
    common.use_dg_evaluation(c, args.source)
    pair_size = {"gta5": (1052, 1914), "synthia": (760, 1280), "cityscapes": (1024, 2048)}
    pairs = photometric_pairs(source.name, "train", pair_size[args.source])
    pairs.subset = source.subset
    c.whitening = whitening_block(kind, weight, relax_denom, pairs)
    # Steps per epoch of 16: 12,388 GTA5, 6,580 SYNTHIA, 2,975 Cityscapes training images.
    c.whitening.epoch_steps = {"gta5": 774, "synthia": 411, "cityscapes": 185}[args.source]
    if args.folders:
        common.use_folders(c)
    return c


def _augment(stream, crop: int, blur, tile: int) -> None:
    stream.random_scale = (0.5, 2.0)
    stream.crop_size = (crop, crop)
    stream.flip = True
    stream.color_jitter = 0.4
    stream.blur_prob = 1.0
    stream.blur_sigma = blur
    stream.class_uniform = {"fraction": 0.5, "tile": tile}


def _synthetic(c, kind: str, weight: float, relax_denom: float) -> None:
    # Two blocks in layer1 and layer2: RobustNet never normalises a layer's block 0.
    c.model.stage_sizes = (2, 2, 1, 1)
    c.batch_size = 8
    c.total_steps = 600
    c.eval_every_steps = c.checkpoint_every_steps = 200
    c.optimizer.learning_rate = 0.01
    c.optimizer.lr_multipliers = {"backbone": 1.0, "head": 1.0}
    _augment(c.data.source, crop=64, blur=(0.02, 0.16), tile=32)
    rows = {
        split.split("_")[0]: common.dg_eval_dataset(
            common.SYNTHETIC_DATASET, split, classes=synthetic.SCENE_CLASSES, batch_size=50
        )
        for split in ("target_validation", "source_validation")
    }
    c.eval.datasets = rows
    c.eval.datasets_order = tuple(rows)
    pairs = photometric_pairs(common.SYNTHETIC_DATASET, "source_train", blur_radius=(0.02, 0.16))
    c.whitening = whitening_block(kind, weight, relax_denom, pairs)
    c.whitening.update({"cov_stat_epoch": 1, "epoch_steps": 50, "images_per_trial": 200})
