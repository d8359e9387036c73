"""Shared config blocks: the published DeepLabV2 setting and the built-in synthetic benchmark.

Configs hold every choice a user may change; the library reads nothing else. Variants are
selected with the config argument, e.g. `--config=configs/adaptseg.py:synthetic`.
"""

import ml_collections
from ml_collections import config_dict

from jaxda.data import eval_decoding, labels, synthetic

# Input normalisations: image = (pixel in 0..255, BGR if `bgr`) - mean) / std.
NORMALIZATIONS = {
    # DeepLab's Caffe-era weights (AdaptSegNet, ADVENT, MaxSquare): BGR minus the mean, no std.
    "caffe_bgr": {"bgr": True, "image_mean": (104.00698793, 116.66876762, 122.67891434),
                  "image_std": (1.0, 1.0, 1.0)},
    # ProDA: RGB / 255, no mean.
    "unit": {"bgr": False, "image_mean": (0.0, 0.0, 0.0), "image_std": (255.0, 255.0, 255.0)},
    # torchvision ImageNet weights (DA-SAC, RobustNet).
    "imagenet": {"bgr": False, "image_mean": (123.675, 116.28, 103.53),
                 "image_std": (58.395, 57.12, 57.375)},
}  # fmt: skip

SYNTHETIC_DATASET = "synthetic_shift/64x128"

# config.model.conv_impl, the convolution of every network of a run (segmentation network and
# discriminators; jaxda/models/layers.py): 'xla' (XLA's own), 'fast' (XLA's forward and input
# gradient, weight gradient as matrix products: jaxda/models/fast_conv.py) or 'auto' ('fast'
# on CPU, where it makes the DeepLabV2-R101 train step 3x faster, `python
# benchmarks/speed_benchmark.py`; 'xla' on GPU and TPU, where 'fast' is not measured yet).
# Results differ by float rounding only; checkpoints are the same either way.
CONV_IMPL = "auto"
# The synthetic benchmark's small networks keep XLA's own: 'fast' does not make them faster
# (an AdaptSegNet run took 211 s against 229 s), and XLA's keeps the README's synthetic
# results reproducible bit for bit. Training amplifies rounding differences as it amplifies a
# change of seed: 'fast' alone moves the default-seed AdaptSegNet mIoU from 29.00 to 30.43.
SYNTHETIC_CONV_IMPL = "xla"
# config.model.dtype: 'float32', or 'bfloat16' (mixed precision: convolutions compute in
# bfloat16; parameters, BatchNorm, losses and optimiser state stay float32; for GPUs and TPUs,
# slower on CPU; `jaxda.models.layers.Convolution`).
DTYPE = "float32"
# config.model.block_barrier: 'auto' (on for CPU), 'on' or 'off': each residual block's output
# is computed once and stored, so that XLA's fusion cannot recompute the chain of earlier
# blocks' BatchNorms and additions inside every later block (on CPU: DeepLabV2-R101's train
# step 14% and its evaluation 27% faster). Values are the same; float rounding may differ.
BLOCK_BARRIER = "auto"
# The synthetic benchmark's networks (one block per layer: no chains) keep XLA's fusion, and
# with it the README's synthetic results bit for bit.
SYNTHETIC_BLOCK_BARRIER = "off"


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses 'synthetic,source=gta5' into a ConfigDict of the declared `defaults`.

    A bare name sets a boolean flag to True; `key=value` is converted to the type of the
    default. Unknown names are an error.
    """
    result = ml_collections.ConfigDict(defaults)
    for part in filter(None, (arg or "").split(",")):
        key, _, value = part.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(f"Unknown config argument {key!r}; known: {sorted(defaults)}")
        default = defaults[key]
        if not value:
            if not isinstance(default, bool):
                raise ValueError(f"Config argument {key!r} needs a value ({key}=...)")
            result[key] = True
        elif isinstance(default, bool):
            result[key] = value.lower() in ("1", "true", "yes")
        else:
            result[key] = type(default)(value)
    return result


def format_arg(args: ml_collections.ConfigDict, names) -> str:
    """The `parse_arg` string of `names` of `args` (flags that are True as bare names), to build
    a config on another method's `get_config`."""
    parts = []
    for name in names:
        value = args[name]
        if isinstance(value, bool):
            parts += [name] if value else []
        else:
            parts.append(f"{name}={value}")
    return ",".join(parts)


def domain(
    name: str, split: str, size=None, label_map: str = "", subset: str = ""
) -> ml_collections.ConfigDict:
    """One input stream: a TFDS dataset split, resized to `size` = (height, width) if given;
    `subset` names a bundled id list (jaxda/data/subsets.py) of the split's examples to keep.

    The augmentation keys act on training streams only (evaluation is never augmented) and are
    all off by default, as in AdaptSegNet and ADVENT (docs/methods/adaptsegnet.md, advent.md). Each
    example's draws
    depend only on (stream seed, stream position), so resumed runs see the same augmentations.
    """
    return ml_collections.ConfigDict(
        {
            "name": name,
            "split": split,
            "size": config_dict.placeholder(tuple) if size is None else tuple(size),
            "image_key": "image",
            "label_key": "label",
            "label_map": label_map,
            "subset": subset,  # '' = the whole split.
            # (min, max): rescale by U(min, max) x `size` (x the original size if unset);
            # bicubic image, nearest label. Needs crop_size or size (then cropped back to it).
            "random_scale": (),
            # (height, width): random crop; a smaller image is padded (label 255, image 0
            # after normalisation, i.e. the mean colour).
            "crop_size": (),
            "flip": False,  # Horizontal flip with probability 0.5.
            "blur_prob": 0.0,  # Gaussian blur probability (MaxSquare: 0.5) ...
            "blur_sigma": (0.0, 1.0),  # ... with std ~ U(min, max) pixels (MaxSquare: (0, 1)).
            # s > 0: brightness, contrast and saturation factors ~ U(1 - s, 1 + s).
            "color_jitter": 0.0,
            # Named views of each training example (ProDA's weak/strong, DA-SAC's zoom-crops):
            # {name: {overrides of the augmentation keys above}}. Each view draws from (stream
            # seed, position, name); examples become {name: {'image', 'label', 'box', 'flip'}},
            # where box/flip place the view in the example's frame (jaxda.data.geometry).
            # {} = one view, as configured above.
            "views": {},
            # DA-SAC's groups of views (jaxda/data/view_groups.py): {} = off; else any of size
            # (views T: 4), zoom ((0.5, 1.0): views 1.. show a window of s ~ U(min, max) of each
            # side, resized back; s = 1 leaves a view unchanged), flip (True: each view mirrored
            # with p 0.5), blur_radius ((0.1, 2.0); () = no blur), jitter (0.4: brightness,
            # contrast, saturation factors ~ U(1 - j, 1 + j)), jitter_prob (0.5), hue (0.1:
            # shift ~ U(-hue, hue)), greyscale_prob (0.2); missing keys take these defaults.
            # The augmentation above gives the reference crop; examples become {'group':
            # {'image' (noisy, student), 'clean' (teacher), 'label', 'valid': [T, ...], 'box',
            # 'flip'}}, box/flip placing each view in the reference. Excludes views and strong.
            "group": {},
            # This stream's own normalisation (DA-SAC normalises source and target
            # differently); None = config.data's image_mean / image_std.
            "image_mean": config_dict.placeholder(tuple),
            "image_std": config_dict.placeholder(tuple),
            # An offline pass directory (e.g. 'stage:pseudo_labels'): its outputs are joined
            # to this stream's examples by example index, as example[output].
            "artifacts": "",
            # RobustNet's class-uniform sampling (jaxda/data/class_uniform.py): {} = off; else
            # fraction (0.5): each epoch of N items holds int(N * fraction / 19) items per class
            # (an image whose crop covers a random centroid of the class; classes without
            # centroids are skipped), the rest are random images; tile (1024): a class's
            # centroids are its centres of mass in the whole tile x tile tiles of the original
            # labels. Missing keys take these defaults. Needs crop_size; excludes importance.
            # The centroids are computed once and cached beside the prepared dataset.
            "class_uniform": {},
            # DAFormer's Rare Class Sampling (jaxda/data/rare_class.py): {} = off; else
            # temperature (0.01), min_pixels (3000), min_crop_ratio (0.5); missing keys take
            # these defaults. Each item draws a class c with P(c) = softmax((1 - f_c) / T) (f_c:
            # c's share of the split's labelled pixels at the original label resolution), then
            # an image uniformly among those with > min_pixels pixels of c (original
            # resolution; P is renormalised over the classes that have one); its crop is then
            # re-drawn (scale, crop, flip) up to 10 times until it holds > min_pixels *
            # min_crop_ratio pixels of c, counted as cropped (after any resize / random scale;
            # 0 = no retry). The batch reports the class as 'rcs_class'. The pixel counts are
            # computed once and cached beside the prepared dataset. Excludes class_uniform
            # and importance.
            "rare_class": {},
            # mmseg's RandomCrop cat_max_ratio (DAFormer's GTA5 pipeline: 0.75): up to 10
            # re-drawn crops until the most frequent class covers < this share of the crop's
            # labelled (non-255) pixels and more than one class is present. 0 (or 1) = off;
            # needs a crop.
            "crop_cat_max_ratio": 0.0,
        }
    )


def base_config() -> ml_collections.ConfigDict:
    """DeepLabV2-R101 GTA5 -> Cityscapes with the AdaptSegNet/ADVENT training values."""
    c = ml_collections.ConfigDict()
    c.method = "source_only"
    c.seed = 1234
    c.num_classes = 19  # 0 = the size of the datasets' class set.
    # Class names and RGB colours (evaluation tables, prediction colours); () = those of the
    # datasets: a folder dataset prepared with --classes carries its own, others Cityscapes'.
    c.class_names = ()
    c.class_colors = ()
    c.total_steps = 150_000
    c.batch_size = 1  # Global: examples per domain per step, split over all devices.
    c.num_devices = 0  # 0 = every device.
    c.log_every_steps = 100
    c.eval_every_steps = 5000
    c.checkpoint_every_steps = 5000
    c.keep_checkpoints = 2
    c.init_from = ""  # A workdir or checkpoint step directory to load the network from.
    # Per network: 'PATH', ('PATH', 'REGEX') for the variables whose path matches, or
    # 'copy:NAME' (jaxda/train/initialization.py). init_from is short for init.seg.
    c.init = ml_collections.ConfigDict({})
    # Multi-stage methods (jaxda/train/stages.py): stage names in order, {name: overrides},
    # and the one stage to run alone ('' = all, skipping finished ones).
    c.stage_order = ()
    c.stages = ml_collections.ConfigDict({})
    c.stage = ""
    # Offline pass of a stage (jaxda/train/offline.py): its name ('' = a training stage), the
    # config.data stream it reads in split order, and its global batch size.
    c.offline = ml_collections.ConfigDict({"pass": "", "stream": "target", "batch_size": 8})
    c.deterministic_gpu_ops = True  # Bit-reproducible GPU runs, at some speed cost.
    # Precision of float32 matrix products and convolutions (jax_default_matmul_precision):
    # 'default' is XLA's choice (TensorFloat-32 on NVIDIA Ampere and later, as PyTorch's
    # convolutions by default; bfloat16 passes on TPU; full float32 on CPU); 'float32' (or
    # 'highest') forces full float32 everywhere; 'tensorfloat32', 'bfloat16' likewise.
    c.matmul_precision = "default"
    # XLA:CPU's memory-optimised scheduler (jaxda/runtime.py): less peak memory of a train
    # step, a slower step. CPU only.
    c.cpu_memory_scheduler = False

    c.model = ml_collections.ConfigDict(
        {
            "name": "deeplab_v2",
            "depth": 101,
            "stage_sizes": config_dict.placeholder(tuple),  # Overrides depth when set.
            "width": 64,
            "aspp_dilations": (6, 12, 18, 24),
            # AdaptSegNet's and MaxSquare's code sum only the first two ASPP branches.
            "num_aspp_branches": 2,
            "multi_level": True,
            # batch_stats: batch statistics in training, affine frozen (AdaptSegNet, ADVENT);
            # frozen: running statistics, affine frozen; train: batch statistics, affine trained;
            # frozen_stats: running statistics, affine trained (DA-SAC's SAC stage).
            "bn_mode": "batch_stats",
            "conv_impl": CONV_IMPL,
            "dtype": DTYPE,
            "block_barrier": BLOCK_BARRIER,
            # Recompute each ResNet block's activations in the backward pass instead of
            # keeping them: less memory for one more backbone forward of compute.
            "remat": False,
        }
    )
    # 'adaptseg' (AdaptSegNet/ADVENT: 4x4 kernels, LeakyReLU) or 'proda' (3x3, ReLU).
    c.discriminator = ml_collections.ConfigDict({"width": 64, "style": "adaptseg"})
    c.loss = ml_collections.ConfigDict({"lambda_seg_aux": 0.1})
    c.optimizer = ml_collections.ConfigDict(
        {
            "name": "sgd",
            "learning_rate": 2.5e-4,
            # Per parameter group that the model declares (DeepLabV2: backbone, head).
            "lr_multipliers": {"backbone": 1.0, "head": 10.0},
            "weight_decay_multipliers": {},  # Group -> multiplier; 1 when absent.
            # Parameters named 'bias' (conv biases, BN offsets): an extra lr factor, and
            # whether weight decay applies to them (DA-SAC: 2.0, False).
            "bias_lr_multiplier": 1.0,
            "bias_weight_decay": True,
            "momentum": 0.9,
            "weight_decay": 5e-4,
            "poly_power": 0.9,
            "decay_steps": 250_000,  # Poly horizon; AdaptSegNet stops at 150k of 250k.
            # Regexes over '/'-joined segmentation parameter paths that get no update ...
            "freeze": (),
            # ... and, if given, the only parameters that get one (TENT: BN scale/offset).
            "train_only": (),
            # Regexes of parameters trained without weight decay (DAFormer: LayerNorms).
            "no_weight_decay": (),
        }
    )
    c.disc_optimizer = ml_collections.ConfigDict(
        {
            "name": "adam",
            "learning_rate": 1e-4,
            "lr_multipliers": {"all": 1.0},
            "beta1": 0.9,
            "beta2": 0.99,
            "poly_power": 0.9,
            "decay_steps": 250_000,
        }
    )
    c.data = ml_collections.ConfigDict(
        {
            "data_dir": "",  # '' = $TFDS_DATA_DIR or ~/tensorflow_datasets.
            **NORMALIZATIONS["caffe_bgr"],
            # Datasets built by `python -m launch.prepare`; labels are stored as train ids.
            "source": domain("gta5", "train", (720, 1280)),
            "target": domain("cityscapes_fine", "train", (512, 1024)),
        }
    )
    # Cityscapes val protocol: input resized to 1024x512, logits upsampled (align corners) to
    # the original 2048x1024 labels.
    c.data.eval = domain("cityscapes_fine", "validation", (512, 1024))
    c.data.eval.label_size = config_dict.placeholder(tuple)  # None: original (1024x2048).
    c.data.eval.batch_size = 1
    c.eval = ml_collections.ConfigDict(
        {
            "head": "main",  # AdaptSegNet and ADVENT evaluate the main head only.
            "step": config_dict.placeholder(int),  # --mode=eval: None = latest checkpoint.
            "classes": (),  # Train ids averaged into mIoU; () = all num_classes.
            "class_subsets": {},  # Extra named mIoUs, e.g. {'13': (...)} for SYNTHIA.
            # --mode=eval: 'WORKDIR:WEIGHT' entries; their latest checkpoints' upsampled logits
            # are averaged with these weights (ADVENT's AdvEnt + MinEnt 0.5/0.5 ensemble).
            "ensemble": (),
            # Inference (jaxda/evaluation/inference.py), in --mode=eval, --mode=predict and the
            # evaluations during training: 'whole' (the protocol: one pass on the input at
            # data.eval.size, logits upsampled to the labels), 'slide' or 'multiscale'.
            "mode": "whole",
            # 'slide': (height, width) windows over the network input every (height, width)
            # stride; the last windows align to the bottom/right edge; softmax averaged.
            "slide_window": (512, 512),
            "slide_stride": (341, 341),
            # 'multiscale': input size multipliers; `flip` adds each scale's horizontally
            # flipped pass (flipped back); softmax averaged over all passes. MaxSquare's --flip
            # evaluation is scales=(1.0,), flip=True.
            "scales": (0.75, 1.0, 1.25, 1.5),
            "flip": False,
            # Training: the first N validation examples (input | prediction | ground truth)
            # are written to TensorBoard at every evaluation; 0 = none.
            "num_visuals": 4,
            # --mode=predict: weight of the colour map in <name>_overlay.png.
            "overlay_alpha": 0.5,
            # --mode=eval, after data.eval: more evaluation datasets, {name: `dg_eval_dataset`}
            # (a stream with its own protocol: label_size, batch_size, classes, class_subsets,
            # transform), e.g. RobustNet's domain-generalisation list (`use_dg_evaluation`).
            # One table, workdir/eval/datasets_step_NNNNNNN.json; unprepared ones are skipped.
            "datasets": {},
            # Table rows: these names first, in this order, then the other datasets sorted.
            "datasets_order": (),
        }
    )
    return c


SOURCES = ("gta5", "synthia", "cityscapes_group0")


def select_data(c: ml_collections.ConfigDict, args: ml_collections.ConfigDict) -> None:
    """Applies the data arguments every method config takes: `synthetic` or `source=...`."""
    if args.source not in SOURCES:
        raise ValueError(f"Unknown source={args.source!r}; use one of {SOURCES}")
    check_variants(args)
    if args.synthetic and args.source != "gta5":
        raise ValueError("`synthetic` and `source=...` exclude each other")
    if args.synthetic:
        use_synthetic(c)
    elif args.source == "synthia":
        use_synthia(c)
    elif args.source == "cityscapes_group0":
        use_cityscapes_groups(c)


MODELS = ("deeplab_v2", "deeplabv3plus")


def select_model(c: ml_collections.ConfigDict, args: ml_collections.ConfigDict) -> None:
    """Applies the `model=...` argument (after `select_data`): 'deeplab_v2' (the base) or
    'deeplabv3plus' (`use_deeplabv3plus`, shrunk like the DeepLabV2 under `synthetic`)."""
    if args.model not in MODELS:
        raise ValueError(f"Unknown model={args.model!r}; use one of {MODELS}")
    if args.model == "deeplabv3plus":
        use_deeplabv3plus(c, synthetic=args.get("synthetic", False))


def use_deeplabv3plus(c: ml_collections.ConfigDict, synthetic: bool = False) -> None:
    """Switches config.model to DeepLabV3+ (jaxda/models/deeplab_v3plus.py): by default
    RobustNet's DeepR50V3PlusD16 (torchvision ResNet-50, output stride 16, `dsn` aux head).

    Adversarial_DA_Exp's network is depth=101, multi_grid=(1, 2, 4), variant='jfzhang95',
    multi_level=False; RobustNet's ResNet-101 is depth=101, deep_stem=True, output_stride=8.
    Inputs, optimizer groups and losses stay the method's. Train with at least 2 images per
    batch-statistics BN batch (the references use 2-8): at batch 1 the image-pooling branch's
    BN normalises one value per channel, so that branch carries nothing (PyTorch refuses it).
    `synthetic`: one block per layer,
    width 8, head widths / 4, ASPP rates (1, 2, 3) for the 4x8 layer4 grid of 64x128 inputs.
    """
    c.model = ml_collections.ConfigDict(
        {
            "name": "deeplabv3plus",
            "depth": 50,
            "stage_sizes": config_dict.placeholder(tuple),  # Overrides depth when set.
            "width": 64,  # Planes of layer1.
            "output_stride": 16,  # Or 8.
            "deep_stem": False,  # RobustNet's ResNet3X3 stem (its ResNet-101).
            "multi_grid": (),  # Layer4 dilation multipliers, e.g. (1, 2, 4) (jfzhang95).
            # RobustNet's normalisation family: '' (none), 'plain' (InstanceNorm without
            # affine, its maps kept for the whitening losses IW/IRW/ISW) or 'affine' (IBN-Net),
            # at these slots: 'stem' replaces the stem's BN; 'layerK' follows the residual sum
            # of layer K's last block, before its ReLU.
            "instance_norm": "",
            "instance_norm_at": ("stem", "layer1", "layer2"),
            "variant": "robustnet",  # Or 'jfzhang95' (concatenation orders, dropout, no aux).
            "aspp_rates": (),  # () = (6, 12, 18) at output stride 16, (12, 24, 36) at 8.
            "head_width": 256,
            "low_level_width": 48,
            "aux_width": 512,
            "multi_level": True,  # RobustNet's `dsn` aux head on layer3.
            # The references' dropout in training (the train steps pass a 'dropout' key from
            # the step's PRNG key). Off by default until the DeepLabV3+ configs are measured
            # with it; test-time adaptation (TENT) runs without it.
            "dropout": False,
            # As in base_config; both references train BN (SyncBN) with its affine.
            "bn_mode": "train",
            "conv_impl": CONV_IMPL,  # As in base_config.
            "dtype": DTYPE,  # As in base_config.
            "block_barrier": BLOCK_BARRIER,  # As in base_config.
            "remat": False,  # As in base_config.
        }
    )
    if synthetic:
        c.model.conv_impl = SYNTHETIC_CONV_IMPL
        c.model.block_barrier = SYNTHETIC_BLOCK_BARRIER
        c.model.stage_sizes = (1, 1, 1, 1)
        c.model.width = 8
        c.model.head_width = 64
        c.model.low_level_width = 12
        c.model.aux_width = 128
        c.model.aspp_rates = (1, 2, 3)


# use_mit: the decoders' stage-embedding width (SegFormer's all-MLP head: 256 for B0 / B1,
# 768 for B2-B5 in its Cityscapes configs; DAFormer's head: 256 for every variant).
MIT_DECODER_EMBED_DIMS = {"mlp": {"b0": 256, "b1": 256}, "daformer": {}}


def use_mit(
    c: ml_collections.ConfigDict,
    variant: str = "b5",
    decoder: str = "daformer",
    synthetic: bool = False,
) -> None:
    """Switches config.model to SegFormer / DAFormer (jaxda/models/segformer.py): the MiT
    encoder `variant` ('b0'..'b5') with DAFormer's context-aware fusion head (`decoder=
    'daformer'`) or SegFormer's all-MLP head ('mlp'), and config.data to the ImageNet RGB
    normalisation MiT's ImageNet weights (`launch.convert --from=mit_b5.pth`) were trained with.

    Optimizer, schedule and losses stay the method's (the official recipe: AdamW 6e-5, the
    head at 10x, no weight decay on the encoder's LayerNorms, the modules named 'norm*').
    `synthetic`: a tiny MiT (one block per stage, widths 16-64, decoder widths 32, ASPP
    dilations (1, 2, 3, 4) for the 16x32 stage-1 grid of 64x128 inputs) that trains from
    scratch on CPU (a source-only step of 8 images: 0.24 s with DAFormer's head, 0.07 s with
    the MLP head, measured on 2 busy cores).
    """
    embed_dim = MIT_DECODER_EMBED_DIMS[decoder].get(variant, 768 if decoder == "mlp" else 256)
    c.model = ml_collections.ConfigDict(
        {
            "name": "segformer",
            "variant": variant,  # MiT-B0..B5: 'b0'..'b5' (jaxda/models/mit.py VARIANTS).
            # Per-stage overrides of the variant's encoder when set (4 values each).
            "embed_dims": config_dict.placeholder(tuple),  # B0 (32, 64, 160, 256), B1-5 512.
            "depths": config_dict.placeholder(tuple),  # Blocks per stage; B5 (3, 6, 40, 3).
            "num_heads": config_dict.placeholder(tuple),  # (1, 2, 5, 8) in every variant.
            "sr_ratios": config_dict.placeholder(tuple),  # Key reduction, (8, 4, 2, 1).
            "mlp_ratio": 4,  # Mix-FFN hidden width / embed dim.
            # Stochastic depth of the last block; linear from 0 over all blocks (official 0.1).
            "drop_path_rate": 0.1,
            "decoder": decoder,  # 'daformer' (context-aware fusion) or 'mlp' (SegFormer).
            "decoder_embed_dim": embed_dim,  # Each stage's embedding width in the decoder.
            "decoder_width": 256,  # DAFormer's fusion (ASPP) width; unused by 'mlp'.
            "aspp_dilations": (1, 6, 12, 18),  # DAFormer's fusion branches; unused by 'mlp'.
            "dropout_rate": 0.1,  # Decoder Dropout2d before the classifier, in training.
            # As in base_config; the decoder's BN (the encoder has LayerNorms only). The
            # official code trains it on batch statistics.
            "bn_mode": "train",
            "conv_impl": CONV_IMPL,  # As in base_config.
            # As in base_config; for MiT it sets the matrix products' dtype too.
            "dtype": DTYPE,
            "block_barrier": BLOCK_BARRIER,  # As in base_config, per transformer block.
            "remat": False,  # As in base_config, per transformer block.
        }
    )
    c.data.update(NORMALIZATIONS["imagenet"])
    if synthetic:
        c.model.conv_impl = SYNTHETIC_CONV_IMPL
        c.model.block_barrier = SYNTHETIC_BLOCK_BARRIER
        c.model.embed_dims = (16, 32, 48, 64)
        c.model.depths = (1, 1, 1, 1)
        c.model.num_heads = (1, 2, 3, 4)
        # XLA's grouped (depthwise) convolutions are slow on CPU: at width 64 DAFormer's
        # fusion doubled the step time of a batch of 8 (0.53 s against 0.24 s at 32).
        c.model.decoder_embed_dim = 32
        c.model.decoder_width = 32
        c.model.aspp_dilations = (1, 2, 3, 4)


def advent_config(method: str) -> ml_collections.ConfigDict:
    """ADVENT's config.py values over the base: 120k steps (its EARLY_STOP) of the 250k poly
    schedule, and all four ASPP branches (ADVENT's summation loop is fixed)."""
    c = base_config()
    c.method = method
    c.total_steps = 120_000
    c.model.num_aspp_branches = 4
    return c


def adversarial_block(lambda_main: float, lambda_aux: float) -> ml_collections.ConfigDict:
    """config.adversarial: the output-space GAN of AdaptSegNet and AdvEnt."""
    return ml_collections.ConfigDict(
        {
            "lambda_adv": {"main": lambda_main, "aux": lambda_aux},
            "gan": "bce",  # or "ls"
            # Adversarial_DA_Exp's three bugs (docs/methods/adversarial_da_exp.md): target
            # discriminator inputs labelled 'source', D_aux's source term on D_main's output,
            # no poly decay for D_aux. Off = the intended AdaptSegNet losses.
            "replicate_da_exp_bugs": False,
            # Each discriminator term's weight: 0.5 (AdaptSegNet, ADVENT), 1 (ProDA).
            "discriminator_loss_weight": 0.5,
        }
    )


def use_synthia(c: ml_collections.ConfigDict) -> None:
    """SYNTHIA-RAND-CITYSCAPES -> Cityscapes: 19 outputs, mIoU over the 16 SYNTHIA classes.

    The 13-class mIoU (without wall, fence, pole) and the 19-class one come from the same
    confusion matrix and are always reported, labelled, next to it.
    """
    c.data.source = domain("synthia_rand_cityscapes", "train", (760, 1280))
    c.eval.classes = labels.SYNTHIA_16_CLASSES
    c.eval.class_subsets = {
        "16": labels.SYNTHIA_16_CLASSES,
        "13": labels.SYNTHIA_13_CLASSES,
        "19": tuple(range(labels.NUM_CLASSES)),
    }


def use_cityscapes_groups(c: ml_collections.ConfigDict) -> None:
    """Adversarial_DA_Exp's city shift: Cityscapes group 0 -> group 1 (19 classes).

    Every stream reads the `cityscapes_fine` train split through a bundled id list
    (jaxda/data/subsets.py): source = group 0's 1,532 images, target = group 1's 1,246, evaluation
    = group 1's 90 held-out images. As in its MaxSquare-based loader, images at 1024x512 and
    evaluation on labels resized to 1024x512 (nearest).
    """
    size = (512, 1024)
    c.data.source = domain("cityscapes_fine", "train", size, subset="cityscapes_group0_train")
    c.data.target = domain("cityscapes_fine", "train", size, subset="cityscapes_group1_train")
    c.data.eval = domain("cityscapes_fine", "train", size, subset="cityscapes_group1_val")
    c.data.eval.label_size = size
    c.data.eval.batch_size = 1


def use_synthetic(c: ml_collections.ConfigDict) -> None:
    """Switches a config to the built-in benchmark with a small model and a CPU-sized schedule.

    Deviations from the published setting, and why: a small Caffe ResNet (one block per layer,
    width 8) trained from scratch, since no ImageNet weights exist here (BN as published:
    batch statistics in training, affine frozen); ASPP dilations (1, 2, 3, 4) scaled to the
    9x17 logit grid of 64x128 inputs, all four branches summed; SGD learning rate 2.5e-3
    (10x, for training from scratch) with the poly decay over the 600-step run; batch 8.
    """
    c.total_steps = 600
    c.batch_size = 8
    c.log_every_steps = 50
    c.eval_every_steps = 200
    c.checkpoint_every_steps = 200
    c.model.conv_impl = SYNTHETIC_CONV_IMPL
    c.model.block_barrier = SYNTHETIC_BLOCK_BARRIER
    c.model.stage_sizes = (1, 1, 1, 1)
    c.model.width = 8
    c.model.aspp_dilations = (1, 2, 3, 4)
    c.model.num_aspp_branches = 4
    c.discriminator.width = 16
    c.optimizer.learning_rate = 2.5e-3
    c.optimizer.decay_steps = 0  # 0 = total_steps.
    c.disc_optimizer.decay_steps = 0
    c.data.source = domain(SYNTHETIC_DATASET, "source_train")
    c.data.target = domain(SYNTHETIC_DATASET, "target_train")
    c.data.eval = domain(SYNTHETIC_DATASET, "target_validation")
    c.data.eval.label_size = config_dict.placeholder(tuple)
    c.data.eval.batch_size = 50
    c.eval.slide_window = (64, 64)  # Of the 64x128 input: windows at x = 0, 32, 64.
    c.eval.slide_stride = (32, 32)
    # The benchmark's mIoU averages over the classes the generator draws, as SYNTHIA's
    # mIoU-16 averages over its 16 classes; the model still predicts all 19.
    c.eval.classes = synthetic.SCENE_CLASSES


# The `folders` variant: the folder datasets it reads (`launch.prepare --dataset=folder
# --name=NAME`), as (TFDS name, split) per stream, and the size every image is resized to.
FOLDER_STREAMS = {
    "source": ("folder/source", "train"),
    "target": ("folder/target", "train"),
    "eval": ("folder/target", "validation"),
}
FOLDER_SIZE = (512, 1024)


def use_folders(c: ml_collections.ConfigDict) -> None:
    """Switches a method's config (applied last) to the user's own folder datasets.

    Streams read FOLDER_STREAMS (labelled source 'train', unlabelled target 'train', labelled
    target 'validation'; other names with --config.data.<stream>.name/split). Every image is
    resized to FOLDER_SIZE (height, width), since folder images may have any size; training
    streams without the method's own augmentation get DeepLab's rescale by U(0.5, 1.5), cropped
    back, and flips. The class set follows the datasets (num_classes 0); the mIoU averages
    all classes; the evaluation runs at FOLDER_SIZE on the original labels, one image a batch.
    Network, normalisation, optimiser and schedule stay the method's published ones (the
    normalisation is what its ImageNet initialisation expects).
    """
    c.num_classes = 0
    c.class_names, c.class_colors = (), ()
    c.eval.classes, c.eval.class_subsets = (), {}
    c.eval.datasets, c.eval.datasets_order = {}, ()
    for key, (name, split) in FOLDER_STREAMS.items():
        if key not in c.data:
            continue
        stream = c.data[key]
        stream.name, stream.split, stream.subset, stream.label_map = name, split, "", ""
        stream.size = FOLDER_SIZE
        own_augmentation = stream.random_scale or stream.crop_size or stream.views or stream.group
        if key != "eval" and not own_augmentation:
            stream.random_scale = (0.5, 1.5)
            stream.flip = True
    c.data.eval.label_size = None
    c.data.eval.batch_size = 1


def check_variants(args: ml_collections.ConfigDict) -> None:
    """`folders` excludes `synthetic` and `source=...`."""
    if args.get("folders") and (args.get("synthetic") or args.get("source", "gta5") != "gta5"):
        raise ValueError("`folders` excludes `synthetic` and `source=...`")


def dg_eval_dataset(
    name: str,
    split: str,
    size=None,
    label_size=None,
    classes=(),
    class_subsets=None,
    transform: str = "",
    batch_size: int = 1,
    subset: str = "",
) -> ml_collections.ConfigDict:
    """One entry of config.eval.datasets: an evaluation stream (`domain`) and its protocol.

    Args:
      size: (height, width) of the network input; None = each image's native resolution.
      label_size: (height, width) labels are resized to (nearest); None = their original size.
      classes: train ids averaged into the dataset's mIoU; () = all num_classes.
      class_subsets: extra named mIoUs, {name: train ids} (e.g. SYNTHIA's '16' and '13').
      transform: evaluation transform of the decoded image and label, applied instead of
        resizing (jaxda/data/eval_decoding.py): '' (none) or 'mapillary' (RobustNet's Mapillary
        validation: resized to height 1536, then centre crop / pad to 1536x1536). `size` and
        `label_size` default to its output size, which they must equal.
      batch_size: global evaluation batch (a multiple of the device count).
      subset: a bundled id list of the split's examples (`domain`), e.g. RobustNet's val lists.
    """
    if transform and size is None and label_size is None:
        size = label_size = eval_decoding.output_size(transform)
    entry = domain(name, split, size, subset=subset)
    entry.label_size = config_dict.placeholder(tuple) if label_size is None else tuple(label_size)
    entry.batch_size = batch_size
    entry.transform = transform
    entry.classes = tuple(classes)
    entry.class_subsets = {k: tuple(v) for k, v in (class_subsets or {}).items()}
    return entry


DG_SOURCES = ("gta5", "synthia", "cityscapes")


def dg_eval_datasets(source: str) -> dict[str, ml_collections.ConfigDict]:
    """RobustNet's domain-generalisation list for a network trained on `source` (one of
    DG_SOURCES), in table order: the unseen datasets, then the source's own validation split.

    Every dataset at its native resolution with original labels (Mapillary: its 1536x1536
    crop), 19 classes (RobustNet's confusion over all 19); SYNTHIA also reports its 16- and
    13-class mIoUs. GTA5 and SYNTHIA, prepared as one 'train' split each, are scored on
    RobustNet's validation lists of it (bundled subsets), whether unseen or the source.
    """
    if source not in DG_SOURCES:
        raise ValueError(
            f"Unknown domain-generalisation source {source!r}; use one of {DG_SOURCES}"
        )
    synthia_subsets = {"16": labels.SYNTHIA_16_CLASSES, "13": labels.SYNTHIA_13_CLASSES}
    rows = {
        "cityscapes": dg_eval_dataset("cityscapes_fine", "validation"),
        "bdd100k": dg_eval_dataset("bdd100k", "validation"),
        "mapillary": dg_eval_dataset("mapillary", "validation", transform="mapillary"),
        "synthia": dg_eval_dataset(
            "synthia_rand_cityscapes",
            "train",
            class_subsets=synthia_subsets,
            subset="synthia_robustnet_val",
        ),
        "gta5": dg_eval_dataset("gta5", "train", subset="gta5_robustnet_val"),
    }
    rows[source] = rows.pop(source)  # The source's own validation split: the last row.
    return rows


def use_dg_evaluation(c: ml_collections.ConfigDict, source: str) -> None:
    """Sets config.eval.datasets (and its row order) to `dg_eval_datasets(source)`."""
    rows = dg_eval_datasets(source)
    c.eval.datasets = ml_collections.ConfigDict(rows)
    c.eval.datasets_order = tuple(rows)
