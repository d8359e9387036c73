r"""DACS: domain adaptation via cross-domain mixed sampling (Tranheden et al., WACV 2021).

https://arxiv.org/abs/2007.08702 -- official code: github.com/vikolss/DACS; the default is
the re-implementation in DAFormer's code (github.com/lhoyer/DAFormer, `mmseg/models/uda/
dacs.py`), which DAFormer, HRDA and MIC build on. Published: 52.1 mIoU GTA5 -> Cityscapes,
48.3 mIoU-16 SYNTHIA -> Cityscapes (DeepLabV2-R101, DACS's own code and protocol).

  python -m launch.main --config=configs/dacs.py --workdir=/runs/dacs              # GTA5 -> CS
  python -m launch.main --config=configs/dacs.py:original --workdir=/runs/dacs_orig
  python -m launch.main --config=configs/dacs.py:synthetic --workdir=/tmp/dacs      # built-in
  arguments (comma-separated): synthetic, source=synthia, original (DACS's own settings),
  model=deeplab_v2|mit (DAFormer's MiT-B5 with its fusion head; `mit_variant=b0..b5`)

Per step (jaxda/train/dacs.py): EMA teacher update; the teacher's pseudo labels on the
unaugmented target crops and their confidence weight (share of pixels with maximum
probability >= 0.968, one number per batch); ClassMix of source pixels of half of the
classes over the target crop; colour jitter and Gaussian blur of the mixed images with
kornia's semantics; one optimizer step on source CE + pixel-weighted CE of the mixed images
(+ MIC's masked-target CE with `dacs.mic.weight` > 0; off here, on in configs/mic.py).

Default (DAFormer's DACS): DeepLabV2-R101 with one head summing all four ASPP branches,
batch 2 source + 2 target crops of 512x512 (GTA5 resized to 704x1280: DAFormer's aspect-keeping
resize of its 1914x1052 frames; Cityscapes to 512x1024), flips, ImageNet RGB normalisation;
AdamW lr 6e-5 (head 10x), betas (0.9, 0.999), weight decay 0.01, linear warm-up over 1,500
steps from 1e-6 x lr multiplying a poly(1.0) decay over 40k steps; EMA alpha 0.99 at the start
of each step, parameters only; teacher with training-mode BN (the target batch's statistics)
and no dropout; ClassMix pool = the classes of the whole source batch, 255 included
(`dacs.classmix_pool='batch'`); jitter strength 0.2 applied with probability 0.8, blur with
0.5, sigma U(0.15, 1.15); source CE averaged over all pixels, ignored ones counting 0;
logits upsampled with align_corners=False.

`original`: DACS's own code, each difference a key: ClassMix pool per image
(`dacs.classmix_pool='sample'`), jitter strength 0.25 (`dacs.strong.jitter_strength`), EMA
update after the optimizer step (`dacs.ema_timing='after'`), source CE over the labelled
pixels (`dacs.source_mean_all_pixels=False`), align_corners=True (`dacs.align_corners`);
Caffe BGR mean-only normalisation with the colour ops fed the BGR channels as if RGB
(`dacs.strong.channels='stored'`, DACS's quirk; 'rgb' feeds RGB), 2 of the 4 ASPP branches
summed (its head's bug); SGD lr 2.5e-4 (head 10x), momentum 0.9, weight decay 5e-4, poly 0.9
over 250k steps; GTA5 resized to exactly 720x1280, no flips; evaluation on labels resized to
512x1024 (its half-resolution protocol).

Deliberate differences from the official codes, in both settings: one optimizer step on the
summed losses (DAFormer calls backward per term: the same gradient); the teacher's BN running
statistics are not kept in step with its training-mode forwards (never read: it normalises
with batch statistics); jitter / blur draws come from JAX keys (on/off still once per step
for the batch, parameters, op order and sigma per image); DAFormer's RandomCrop re-draws a
source crop whose largest class covers > 75% (`cat_max_ratio`) and this pipeline does not;
evaluation upsamples with align_corners=True (the library's protocol; DAFormer's uses False).
Not covered by the DAFormer notes this follows: its own DeepLabV2 ('dlv2' configs: backbone
form, initialisation, BN training) -- this uses the library's Caffe DeepLabV2 with BN affine
frozen (`model.bn_mode='batch_stats'`, DACS's) and initialisation from `init_from`.
DAFormer's AdamW leaves parameters whose name holds 'norm' (mmcv's custom key; with
`model=mit` the encoder's LayerNorms) without weight decay: `optimizer.no_weight_decay`.

DAFormer's additions to DACS, off here (`config.dacs` keys, DAFormer's values in brackets): the
pseudo-label crop (`pseudo_ignore_top` / `pseudo_ignore_bottom` = [15 / 120] rows of the target
weights set to 0 after the confidence weight, which stays the share over all pixels, pasted
source pixels keeping weight 1; MIC's targets take the cropped weights, as in MIC's code) and
the thing-class ImageNet feature distance
(`feature_distance.weight` [0.005] x the mean L2 distance between the student's last encoder
stage on the source batch and that of a frozen copy of its initialisation, network 'imnet',
over the stride-sized patches whose labels are >= [0.75] one of the thing classes [6, 7, 11-18];
`classes=()` compares every patch). The masked distance needs a feature grid of exactly the
crop over the stride: MiT's (512 -> 16); the library's DeepLabV2 grid (512 -> 65) raises an
error unless classes=(). DAFormer's mean over no patch is NaN (with a zero gradient); here
it is 0, and the logged count `feature_distance_patches` says so.

On the built-in benchmark (`synthetic`): the library's small network from scratch (or a tiny
MiT), batch 8 + 8 crops of 64x128, 600 steps; SGD lr 2.5e-3 with poly 0.9 over the run, as
the other methods' synthetic rows (AdamW 6e-5 is tuned for ImageNet-initialised networks);
alpha 0.99 and threshold 0.968 as published.
"""

import ml_collections

from configs import common
from jaxda.losses import feature_distance

MODELS = ("deeplab_v2", "mit")


def dacs_block() -> ml_collections.ConfigDict:
    """config.dacs: DAFormer's DACS values (the module docstring names DACS's own)."""
    return ml_collections.ConfigDict(
        {
            "alpha": 0.99,  # EMA: alpha_t = min(1 - 1 / (t + 1), alpha).
            "ema_timing": "before",  # 'before' the step's forwards (DAFormer), 'after' (DACS).
            "teacher_train_mode": True,  # BN on the target batch's statistics, no dropout.
            "pseudo_threshold": 0.968,
            # The confidence weight's scope: 'batch' (both codes: one share per step) or 'image'.
            "confidence_scope": "batch",
            "mix_weight": 1.0,  # DACS's consistency weight on the mixed CE.
            "classmix_pool": "batch",  # 'batch' (DAFormer) or 'sample' (DACS).
            "classmix_ignore": True,  # 255 is one of the pool's classes (both codes).
            "source_mean_all_pixels": True,  # DAFormer: True; DACS: False (labelled pixels).
            "align_corners": False,  # Logit upsampling in the losses: DAFormer False, DACS True.
            # MIC's masked target images ('separatetrgaug'): weight 0 = off; MIC 1.0, block 64
            # (MIC(DAFormer) at half resolution: 32), ratio 0.7, fresh jitter + blur.
            "mic": {"weight": 0.0, "block_size": 64, "ratio": 0.7, "color_augment": True},
            # DAFormer's pseudo-label crop: rows of the target crop whose pseudo-label weight
            # is set to 0 after the confidence weight, before mixing (DAFormer 15 and 120).
            "pseudo_ignore_top": 0,
            "pseudo_ignore_bottom": 0,
            # DAFormer's thing-class ImageNet feature distance on the source batch (off at 0).
            "feature_distance": {
                # lambda_FD (DAFormer 0.005); > 0 adds the frozen network 'imnet'.
                "weight": 0.0,
                # Train ids of the patches compared (DAFormer's things); () compares every
                # patch (DAFormer's classes=None: the labels are not read).
                "classes": feature_distance.THING_CLASSES,
                # A patch's label: its majority class if that covers >= this share (DAFormer).
                "min_ratio": 0.75,
                # The sown feature map: '' the last encoder stage (MiT 'stage4', ResNet
                # 'layer4', DAFormer's), or a name ('stage2', 'layer3', ...).
                "layer": "",
            },
            "strong": {
                "enabled": True,
                "jitter_strength": 0.2,  # DAFormer 0.2, DACS 0.25.
                "jitter_prob": 0.8,  # The codes' `u > 0.2`.
                "blur": True,
                "blur_prob": 0.5,  # The codes' `u > 0.5`.
                "blur_sigma": (0.15, 1.15),
                # 'stored': the colour ops see the channels as the pipeline stores them (BGR
                # with data.bgr, as DACS fed kornia); 'rgb': reordered to RGB around them.
                "channels": "stored",
            },
        }
    )


def get_config(arg=None):
    args = common.parse_arg(
        arg,
        synthetic=False,
        folders=False,
        source="gta5",
        original=False,
        model="deeplab_v2",
        mit_variant="b5",
    )
    if args.source not in ("gta5", "synthia"):
        raise ValueError(f"configs/dacs.py: source={args.source!r}; use gta5 or synthia")
    if args.model not in MODELS:
        raise ValueError(f"configs/dacs.py: model={args.model!r}; use one of {MODELS}")
    config = common.base_config()
    config.method = "dacs"
    config.dacs = dacs_block()
    config.model.multi_level = False
    config.model.num_aspp_branches = 4
    config.loss.lambda_seg_aux = 0.0
    common.select_data(config, args)
    if args.original:
        _original(config, args.synthetic)
    elif not args.synthetic:
        _daformer(config, args.source)
    if args.model == "mit":
        common.use_mit(
            config, variant=args.mit_variant, decoder="daformer", synthetic=args.synthetic
        )
    if args.folders:
        common.use_folders(config)
    return config


def _daformer(config, source: str) -> None:
    """DAFormer's DACS on GTA5 / SYNTHIA -> Cityscapes (module docstring)."""
    config.total_steps = 40_000
    config.batch_size = 2
    config.eval_every_steps = config.checkpoint_every_steps = 4000
    config.log_every_steps = 50
    config.data.update(common.NORMALIZATIONS["imagenet"])
    config.data.source.size = (760, 1280) if source == "synthia" else (704, 1280)
    for stream in (config.data.source, config.data.target):
        stream.crop_size, stream.flip = (512, 512), True
    opt = config.optimizer
    opt.name, opt.learning_rate, opt.weight_decay = "adamw", 6e-5, 0.01
    opt.beta1, opt.beta2, opt.eps = 0.9, 0.999, 1e-8
    opt.lr_multipliers = {"backbone": 1.0, "head": 10.0}
    opt.poly_power, opt.decay_steps = 1.0, 40_000
    opt.warmup_steps, opt.warmup_ratio = 1500, 1e-6
    # mmcv's custom key 'norm' (decay_mult 0): the head's key 'head' wins over it there.
    opt.no_weight_decay = (r"backbone/.*norm.*",)


def _original(config, synthetic: bool) -> None:
    """DACS's own code: the `config.dacs` switches, and its data, head and optimizer."""
    cfg = config.dacs
    cfg.classmix_pool, cfg.ema_timing = "sample", "after"
    cfg.source_mean_all_pixels, cfg.align_corners = False, True
    cfg.strong.jitter_strength = 0.25
    if synthetic:
        return
    config.model.num_aspp_branches = 2
    config.total_steps = 250_000
    config.batch_size = 2
    for stream in (config.data.source, config.data.target):
        stream.crop_size, stream.flip = (512, 512), False
    config.data.eval.label_size = (512, 1024)
    # SGD 2.5e-4 (head 10x), momentum 0.9, weight decay 5e-4, poly 0.9 over 250k: the base.
