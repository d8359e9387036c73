r"""ProDA (Zhang et al., CVPR 2021): prototypical pseudo-label denoising and target structure
learning, then self-distillation. https://arxiv.org/abs/2101.10979 -- official code:
github.com/microsoft/ProDA. Published (DeepLabV2-R101, Cityscapes val, best checkpoint on val):
GTA5 -> Cityscapes 53.7 after stage 1, 57.5 after stage 3; SYNTHIA -> Cityscapes 55.5 mIoU-16,
62.0 mIoU-13.

  python -m launch.main --config=configs/proda.py --workdir=/runs/proda        # every stage
  python -m launch.main --config=configs/proda.py:stage=stage1 --workdir=/runs/proda  # one
  python -m launch.main --config=configs/proda.py:synthetic --workdir=/tmp/proda  # built-in
  arguments (comma-separated): synthetic, source=synthia, stage=NAME, init=PATH (the warm-up's
  initialisation: a converted torchvision ResNet-101), simclr=PATH (stage 2's student: a
  converted SimCLR r101_1x_sk0)

Stages, each in workdir/<name>/, each reading the previous ones (docs/methods/proda.md):
  warmup        AdaptSegNet-style adversarial warm-up: ProDA's discriminator (3x3 stride-2
                convs, ReLU), LS-GAN, adversarial weight 0.01, no 1/2 on the discriminator loss
  soft_labels   offline: the warm-up model's softmax at stride 8 on every target image
  prototypes    offline: class prototypes from the warm-up model's features (4 passes, the
                running mean with the count capped at 3000)
  stage1        prototypical denoising: EMA teacher (0.999, BN statistics copied), rectified
                soft labels with symmetric CE (0.1 CE + 1.0 RCE) and the regulariser (0.1,
                MRKLD; SYNTHIA: 0), prototype consistency (weight 10), prototype EMA (1e-4);
                one parameter group at lr 1e-4
  hard_labels1  offline: stage 1's flip-averaged hard pseudo labels and confidences
  stage2        distillation into a fresh student (SimCLR + bn_clr): CE on the strong view
                against the labels with confidence > 0.95, plus the distillation term
  hard_labels2  offline: stage 2's pseudo labels
  stage3        the same, the student starting from stage 2 (teacher: stage 2, with bn_clr)
A released warm-up model starts at stage 1: convert it (`python -m launch.convert --from=
warmup.pkl --config=configs/proda.py --out=/runs/warmup`: it writes prototypes.npy too), then
run `:stage=soft_labels`, `:stage=stage1` ... with `--config.stages.soft_labels.init_from=
/runs/warmup` etc., or skip the prototypes pass by pointing `stages.stage1.proda.prototypes`
at /runs/warmup.

Schedule: ProDA's loop runs 84 epochs of its target loader (2,975 images, batch 4, last
partial batch dropped: 743 steps), 62,412 steps, under a poly schedule defined for 90,000
(`train_iters`), so the learning rate never reaches 0: total_steps 62,412, decay_steps 90,000.
Preprocessing: RGB / 255 without mean or std; GTA5 resized to 1914x1052, SYNTHIA 1280x760,
Cityscapes 2048x1024; weak view = random scale to width U(0.5, 1.5) x 2200 (a factor of the
stream's size), crop 512x896, flip; strong view = RandAugmentMC(2, 10) and cutout on the weak
crop. Evaluation: full 2048x1024 input, single scale.

Faithful defaults, and their switches:
  proda.teacher_train_mode=True   the EMA network runs in training mode (batch statistics,
                                  dropout on), as in ProDA (never put in eval mode); False
                                  gives evaluation mode.
  proda.distillation='proda'      ProDA's `kl_div` receives the student's probabilities where
                                  log-probabilities belong, so the term maximises the
                                  teacher-student dot product; the published 57.5 used it.
                                  'kl' is the true KL divergence.
Deliberate differences: maps move between the full frame and the views by resampling the
view's box (half-pixel centres) instead of ProDA's resize-then-crop with align_corners; the
strong view's label and feature transforms compose the image's actual flip/affine/cutout
sequence (ProDA applies them in a fixed order); images are resized with PIL's bicubic filter
(ProDA's RandomSized uses bilinear); SYNTHIA trains the 19 outputs and scores mIoU-16 / 13,
as the other jaxda configs (ProDA trains 16 outputs, --n_class 16). ProDA keeps the best
checkpoint on val; jaxda reports the last, and the best only separately, labelled.

On the built-in benchmark (`synthetic`): the small network (one block per layer, width 8,
head width 32) from scratch, batch 8 (as every benchmark row), 600 warm-up steps, then 400
steps per self-training stage; the stage-2 student starts from random weights (no SimCLR
model exists here) with bn_clr; the learning rates are scaled for training from scratch
(warm-up and stages 2/3 2.5e-3 with the 10x head, stage 1 1e-3).
"""

import ml_collections

from configs import common

# 84 epochs x (2,975 // 4) steps of ProDA's target loader.
PRODA_STEPS = 84 * (2975 // 4)
PRODA_DECAY_STEPS = 90_000
RESIZE_WIDTH = 2200  # RandomSized(2200): the scaled width is U(0.5, 1.5) x 2200.


def proda_model(synthetic: bool) -> ml_collections.ConfigDict:
    model = ml_collections.ConfigDict(
        {
            "name": "proda_deeplab_v2",
            "depth": 101,
            "stage_sizes": ml_collections.config_dict.placeholder(tuple),
            "width": 64,
            "head_width": 256,
            "aspp_dilations": (6, 12, 18, 24),
            "bn_clr": False,
            "dropout": True,
            "bn_mode": "train",  # Every BN trained, batch statistics (SyncBN).
            "multi_level": False,  # One output ('main').
            "conv_impl": common.CONV_IMPL,  # See configs/common.py.
            "dtype": common.DTYPE,  # See configs/common.py.
            "block_barrier": common.BLOCK_BARRIER,  # See configs/common.py.
            "remat": False,  # See configs/common.py.
        }
    )
    if synthetic:
        model.conv_impl = common.SYNTHETIC_CONV_IMPL
        model.block_barrier = common.SYNTHETIC_BLOCK_BARRIER
        model.stage_sizes = (1, 1, 1, 1)
        model.width = 8
        model.head_width = 32  # GroupNorm(32) needs a multiple of 32.
        model.aspp_dilations = (1, 2, 3, 4)
    return model


def proda_block() -> ml_collections.ConfigDict:
    """config.proda: every value of stages 1-3 (ProDA's parser_train.py defaults and the
    published commands)."""
    return ml_collections.ConfigDict(
        {
            "prototypes": "",  # A prototypes pass directory, or a converted checkpoint's.
            "rectify": True,  # --proto_rectify
            "temperature": 1.0,  # --proto_temperature (multiplies -distance).
            "train_threshold": 0.0,  # --train_thred: rectified confidence below -> ignored.
            "rce": True,  # --rce: rce_alpha x CE + rce_beta x RCE.
            "rce_alpha": 0.1,
            "rce_beta": 1.0,
            "regular_weight": 0.1,  # --regular_w (GTA5 command; SYNTHIA: 0).
            "regular_type": "mrkld",  # Or 'mrent'.
            "consistency_weight": 10.0,  # --proto_consistW
            "prototype_momentum": 1e-4,  # --proto_momentum
            "prototype_min_pixels": 10,
            "prototype_count_cap": 3000,
            "ema_momentum": 0.999,
            "teacher_train_mode": True,  # ProDA's quirk (see the module docstring).
            "teacher_bn_clr": False,  # --ema_bn (stage 3).
            "hard_threshold": 0.95,  # Stages 2/3: confidence <= threshold -> ignored.
            "distillation": "proda",  # Or 'kl'.
            "distillation_weight": 1.0,  # --distillation
        }
    )


def _weak_view(stream, crop, scale):
    """ProDA's weak augmentation on a stream (and, empty, the key of its strong view)."""
    stream.random_scale, stream.crop_size, stream.flip = scale, crop, True
    stream.strong = ml_collections.ConfigDict({})


def _target_views(config) -> dict:
    """Overrides of data.target for the self-training stages: views 'weak' (the stream's
    scale, crop, flip) and 'full' (the whole frame), and 'strong' made from 'weak'."""
    target = config.data.target
    weak = {"random_scale": target.random_scale, "crop_size": target.crop_size, "flip": True}
    full = {"random_scale": (), "crop_size": (), "flip": False}
    strong = {"num_ops": 2, "magnitude": 10, "cutout": True, "fill": 127, "of": "weak"}
    return {"views": {"weak": weak, "full": full}, "strong": strong}


def _stages(config, args, synthetic: bool) -> dict:
    self_training_steps = 400 if synthetic else PRODA_STEPS
    finetune = {"lr_multipliers": {"backbone": 1.0, "head": 10.0}}
    stage1_lr = 1e-3 if synthetic else 1e-4
    distill_lr = 2.5e-3 if synthetic else 6e-4
    hard_labels = {"pass": "predictions", "stream": "target", "flip": True}
    views = _target_views(config)
    return {
        "warmup": {"init_from": args.init},
        "soft_labels": {
            "init_from": "stage:warmup",
            "offline": {"pass": "proda_soft_labels", "stream": "target"},
        },
        "prototypes": {
            "init_from": "stage:warmup",
            "offline": {"pass": "proda_prototypes", "stream": "target"},
        },
        "stage1": {
            "method": "proda_stage1",
            "total_steps": self_training_steps,
            "init": {"seg": "stage:warmup"},
            "proda": {"prototypes": "stage:prototypes"},
            "data": {"target": {**views, "artifacts": "stage:soft_labels"}},
            # One parameter group (no 10x head).
            "optimizer": {"learning_rate": stage1_lr, "lr_multipliers": {"head": 1.0}},
        },
        "hard_labels1": {"init_from": "stage:stage1", "offline": hard_labels},
        "stage2": {
            "method": "proda_distillation",
            "total_steps": self_training_steps,
            "model": {"bn_clr": True},
            # '' = random: ProDA's student starts from SimCLR (`:simclr=PATH`).
            "init": {"seg": args.simclr, "teacher": "stage:stage1"},
            "proda": {"rce": False},  # The stage-2/3 commands have no --rce.
            "data": {"target": {**views, "artifacts": "stage:hard_labels1"}},
            "optimizer": {"learning_rate": distill_lr, **finetune},
        },
        "hard_labels2": {
            "init_from": "stage:stage2",
            "model": {"bn_clr": True},
            "offline": hard_labels,
        },
        "stage3": {
            "method": "proda_distillation",
            "total_steps": self_training_steps,
            "model": {"bn_clr": True},
            "init": {"seg": "stage:stage2", "teacher": "stage:stage2"},
            "proda": {"teacher_bn_clr": True, "rce": False},
            "data": {"target": {**views, "artifacts": "stage:hard_labels2"}},
            "optimizer": {"learning_rate": distill_lr, **finetune},
        },
    }


def get_config(arg=None):
    args = common.parse_arg(
        arg, synthetic=False, folders=False, source="gta5", stage="", init="", simclr=""
    )
    if args.source not in ("gta5", "synthia"):
        raise ValueError(f"configs/proda.py: source={args.source!r}; use gta5 or synthia")
    config = common.base_config()
    common.select_data(config, args)
    config.method = "adaptseg"  # The warm-up; later stages override it.
    config.model = proda_model(args.synthetic)
    config.proda = proda_block()
    config.adversarial = common.adversarial_block(0.01, 0.0)
    config.adversarial.gan = "ls"
    config.adversarial.discriminator_loss_weight = 1.0
    config.discriminator.style = "proda"
    config.loss.lambda_seg_aux = 0.0
    config.optimizer.learning_rate = 6e-4
    config.optimizer.weight_decay = 2e-4
    config.optimizer.lr_multipliers = {"backbone": 1.0, "head": 10.0}
    config.batch_size = 4  # ProDA: 4 GPUs x 1.
    config.offline.epochs = 4  # The prototypes pass's passes over the split.
    config.offline.dtype = "float32"  # Soft labels as ProDA stores them; float16 halves them.
    config.offline.flip = False
    config.offline.confidence_threshold = config.proda.hard_threshold  # For its summary.
    for name in common.NORMALIZATIONS["unit"]:
        config.data[name] = common.NORMALIZATIONS["unit"][name]
    if args.synthetic:
        config.batch_size = 8  # As every synthetic-benchmark row.
        config.optimizer.learning_rate = 2.5e-3
        config.data.source.size = config.data.target.size = (64, 128)
        crop, scale = (64, 128), (1.0, 1.5)
        _weak_view(config.data.source, crop, scale)
        _weak_view(config.data.target, crop, scale)
        config.offline.batch_size = 50
    else:
        config.total_steps = PRODA_STEPS
        config.optimizer.decay_steps = config.disc_optimizer.decay_steps = PRODA_DECAY_STEPS
        config.eval_every_steps = config.checkpoint_every_steps = 1000
        source_size = (760, 1280) if args.source == "synthia" else (1052, 1914)
        config.data.source.size = source_size
        config.data.target.size = config.data.eval.size = (1024, 2048)
        crop = (512, 896)

        def scale(width):
            return (0.5 * RESIZE_WIDTH / width, 1.5 * RESIZE_WIDTH / width)

        _weak_view(config.data.source, crop, scale(source_size[1]))
        _weak_view(config.data.target, crop, scale(2048))
        config.offline.batch_size = 4
        if args.source == "synthia":
            config.proda.regular_weight = 0.0  # The SYNTHIA command has no --regular_w.
    config.stage_order = (
        "warmup", "soft_labels", "prototypes", "stage1",
        "hard_labels1", "stage2", "hard_labels2", "stage3",
    )  # fmt: skip
    config.stages = ml_collections.ConfigDict(_stages(config, args, args.synthetic))
    config.stage = args.stage
    if args.folders:
        common.use_folders(config)
    return config
