"""Shared config blocks: the published DeepLabV2 setting and the built-in synthetic benchmark.

Configs hold every choice a user may change; the library reads nothing else. Variants are
selected with the config argument, e.g. `--config=configs/adaptseg.py:synthetic`.
"""

import ml_collections
from ml_collections import config_dict

from jaxda.data import synthetic

# DeepLab's Caffe-era input normalisation: BGR, minus this mean, no scaling (methods.md 1).
CAFFE_BGR_MEAN = (104.00698793, 116.66876762, 122.67891434)

SYNTHETIC_DATASET = "synthetic_shift/64x128"


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


def domain(name: str, split: str, size=None, label_map: str = "") -> ml_collections.ConfigDict:
    """One input stream: a TFDS dataset split, resized to `size` = (height, width) if given."""
    return ml_collections.ConfigDict(
        {
            "name": name,
            "split": split,
            "size": config_dict.placeholder(tuple) if size is None else tuple(size),
            "image_key": "image",
            "label_key": "label",
            "label_map": label_map,
        }
    )


def base_config() -> ml_collections.ConfigDict:
    """DeepLabV2-R101 GTA5 -> Cityscapes with the AdaptSegNet/ADVENT training values."""
    c = ml_collections.ConfigDict()
    c.method = "source_only"
    c.seed = 1234
    c.num_classes = 19
    c.total_steps = 150_000
    c.batch_size = 1  # Global: examples per domain per step, split over all devices.
    c.num_devices = 0  # 0 = every device.
    c.log_every_steps = 100
    c.eval_every_steps = 5000
    c.checkpoint_every_steps = 5000
    c.keep_checkpoints = 2
    c.init_from = ""  # A workdir or checkpoint step directory to load the network from.
    c.deterministic_gpu_ops = True  # Bit-reproducible GPU runs, at some speed cost.

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
            # frozen: running statistics, affine frozen; train: batch statistics, affine trained.
            "bn_mode": "batch_stats",
        }
    )
    c.discriminator = ml_collections.ConfigDict({"width": 64})
    c.loss = ml_collections.ConfigDict({"lambda_seg_aux": 0.1})
    c.optimizer = ml_collections.ConfigDict(
        {
            "learning_rate": 2.5e-4,
            "head_lr_multiplier": 10.0,
            "momentum": 0.9,
            "weight_decay": 5e-4,
            "poly_power": 0.9,
            "decay_steps": 250_000,  # Poly horizon; AdaptSegNet stops at 150k of 250k.
        }
    )
    c.disc_optimizer = ml_collections.ConfigDict(
        {
            "learning_rate": 1e-4,
            "beta1": 0.9,
            "beta2": 0.99,
            "poly_power": 0.9,
            "decay_steps": 250_000,
        }
    )
    c.data = ml_collections.ConfigDict(
        {
            "data_dir": "",  # '' = $TFDS_DATA_DIR or ~/tensorflow_datasets.
            "bgr": True,
            "image_mean": CAFFE_BGR_MEAN,
            "image_std": (1.0, 1.0, 1.0),
            "source": domain("gta5", "train", (720, 1280), label_map="cityscapes_label_ids"),
            "target": domain(
                "cityscapes/semantic_segmentation", "train", (512, 1024), "cityscapes_label_ids"
            ),
        }
    )
    c.data.target.image_key, c.data.target.label_key = "image_left", "segmentation_label"
    c.data.eval = domain(
        "cityscapes/semantic_segmentation", "validation", (512, 1024), "cityscapes_label_ids"
    )
    c.data.eval.image_key, c.data.eval.label_key = "image_left", "segmentation_label"
    c.data.eval.label_size = config_dict.placeholder(tuple)  # None: original (1024x2048).
    c.data.eval.batch_size = 1
    c.eval = ml_collections.ConfigDict(
        {
            "head": "main",  # AdaptSegNet and ADVENT evaluate the main head only.
            "step": config_dict.placeholder(int),  # --mode=eval: None = latest checkpoint.
            "classes": (),  # Train ids averaged into mIoU; () = all num_classes.
            "class_subsets": {},  # Extra named mIoUs, e.g. {'13': (...)} for SYNTHIA.
        }
    )
    return c


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
    # The benchmark's mIoU averages over the classes the generator draws, as SYNTHIA's
    # mIoU-16 averages over its 16 classes; the model still predicts all 19.
    c.eval.classes = synthetic.SCENE_CLASSES
