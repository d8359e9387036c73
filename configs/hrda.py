r"""HRDA (Hoyer et al., ECCV 2022): DAFormer at high resolution, a low-resolution context crop and
a high-resolution detail crop fused by a learned scale attention.

https://arxiv.org/abs/2204.13132 -- official code: github.com/lhoyer/HRDA (final config
`gtaHR2csHR_hrda`). Published: 73.8 mIoU GTA5 -> Cityscapes, 65.8 mIoU-16 SYNTHIA ->
Cityscapes (mean of seeds 0, 1, 2; last iteration).

  python -m launch.main --config=configs/hrda.py --workdir=/runs/hrda --config.init_from=...
  python -m launch.main --config=configs/hrda.py:synthetic --workdir=/tmp/hrda
  arguments (comma-separated): synthetic, source=synthia, mit_variant=b0..b5, folders

configs/daformer.py (MiT-B5, DACS with alpha 0.999, rare-class sampling, the thing-class
feature distance, AdamW with the warm-up and poly schedule, 40k steps, batch 2 + 2) on twice the
resolution, with HRDA's network (`jaxda/models/hrda.py`, model 'hrda'):
  * data: GTA5 resized to 1407x2560 (its aspect-keeping resize to 2560 wide), SYNTHIA to
    1520x2560, Cityscapes kept at 1024x2048; 1024x1024 crops of both (the source's re-drawn
    while one class covers >= 75%); rare-class crops need 4x the pixels (min_crop_ratio 2.0);
  * each student pass: the whole crop at half resolution (the context) and one 512x512 detail
    box at full resolution (offsets multiples of 8, one box per pass), the DAFormer head on
    both, a second small head's sigmoid on the context (the scale attention) weighting the
    detail inside the box; loss 0.9 x CE(fused) + 0.1 x CE(detail, the labels under the box);
  * pseudo labels: the teacher without a box, the detail from overlapping 512x512 windows at
    stride 256 averaged as logits;
  * the feature distance on the context's (half-resolution) last-stage features, the frozen
    copy seeing the same half-resolution crop;
  * pseudo-label crop: the top 30 and bottom 240 rows of the full-height 1024-row target crops.
    HRDA crops a [1024, 2048] validity map with the image instead (margins 30, 240, 30, 30),
    which also drops the left / right 30 columns when a crop touches the image's side; jaxda
    drops the rows only (a crop touches a side only at offset 0 or 1024 of 1025 offsets);
  * evaluation on full 1024x2048 images with 1024x1024 windows at stride 512 (`eval.mode=
    'slide'`), each window's detail again from 512 windows at stride 256. HRDA averages the
    windows' logits; jaxda's slide mode averages their softmax probabilities.
Deliberate differences from the official code are configs/dacs.py's; the source CE is HRDA's
mean over all pixels whatever `dacs.source_mean_all_pixels` says.

On the built-in benchmark (`synthetic`): configs/daformer.py's synthetic setting on its 128x256
frames (the 64x128 ones leave a 32x64 context), uncropped: the context is 64x128, the detail
boxes and windows 64x64; 8 + 8 frames per step; evaluation whole-image at 128x256.
"""

from configs import common, daformer


def get_config(arg=None):
    args = common.parse_arg(arg, synthetic=False, folders=False, source="gta5", mit_variant="b5")
    config = daformer.get_config(common.format_arg(args, args.keys()))
    use_hrda(config, synthetic=args.synthetic)
    if args.synthetic:
        return config
    config.data.source.size = (1520, 2560) if args.source == "synthia" else (1407, 2560)
    config.data.target.size = (1024, 2048)
    for stream in (config.data.source, config.data.target):
        stream.crop_size = (1024, 1024)
    config.data.source.rare_class.min_crop_ratio = 2.0
    config.dacs.pseudo_ignore_top, config.dacs.pseudo_ignore_bottom = 30, 240
    config.data.eval.size = (1024, 2048)
    config.eval.mode = "slide"
    config.eval.slide_window, config.eval.slide_stride = (1024, 1024), (512, 512)
    return config


def use_hrda(config, synthetic: bool = False) -> None:
    """config.model from DAFormer's network to HRDA's (`jaxda/models/hrda.py` attributes) and,
    with `synthetic`, the benchmark's 128x256 frames."""
    config.model.name = "hrda"
    config.model.scales = (0.5, 1.0)
    config.model.hr_crop_size = (64, 64) if synthetic else (512, 512)
    config.model.attention_embed_dim = config.model.decoder_width if synthetic else 256
    config.model.attention_classwise = True
    config.model.hr_slide_inference = True
    config.model.hr_slide_overlapping = True
    config.model.hr_loss_weight = 0.1
    config.model.lr_loss_weight = 0.0
    if synthetic:
        name = common.SYNTHETIC_DATASET.rsplit("/", 1)[0] + "/128x256"
        for stream in (config.data.source, config.data.target, config.data.eval):
            stream.name = name
