"""DACS (Tranheden et al. WACV 2021): cross-domain ClassMix with an EMA teacher, as one
train step over the generic trainer; by default as DAFormer's code re-implements it, the
original DACS differences behind `config.dacs` keys (configs/dacs.py lists them).

One iteration (step t, 0-based):

1. teacher update ('before', DAFormer): teacher <- alpha_t teacher + (1 - alpha_t) student
   with alpha_t = min(1 - 1 / (t + 1), alpha), parameters only (`ema_timing='after'`: DACS's
   update after the optimizer step, with the same alpha_t);
2. pseudo labels: the teacher on the unaugmented target batch (training-mode BN, i.e. the
   target batch's statistics, no dropout / stochastic depth: `teacher_train_mode`), logits
   upsampled to the image, softmax; labels = argmax, weight = share of pixels with maximum
   probability >= `pseudo_threshold` (`jaxda.losses.dacs.pseudo_labels`);
3. ClassMix (`jaxda.data.mixing`): per source image, source pixels of ceil(n / 2) of the n
   classes of the pool over the target image; the mixed label takes the source label or the
   pseudo label, the mixed weight 1 or the confidence weight;
4. strong augmentation of the mixed images (`jaxda.data.strong_augment`: kornia's colour
   jitter, then Gaussian blur), in [0, 1] pixel units between de- and re-normalisation;
5. MIC (`config.dacs.mic.weight` > 0; Hoyer et al. CVPR 2023, its 'separatetrgaug' mode):
   the target images, strongly augmented afresh (blur allowed whatever `strong.blur` says)
   and block-masked (`jaxda.data.masking`), with the step's pseudo labels and target weights
   (after DAFormer's crop below, as MIC's code; not the mixed ones) as targets;
6. one optimizer step on CE(source) + `mix_weight` x the pixel-weighted CE of the mixed
   images (a mean over all pixels) [+ `mic.weight` x the masked images' weighted CE], all
   through the student in training mode (its BN statistics see the source batch, then the
   mixed batch, then the masked one).

DAFormer's additions (off by default; its rare-class sampling of the source stream is not
here): the pseudo-label crop (`pseudo_ignore_top` / `_bottom` rows of the target weights set
to 0 after 2, `jaxda.losses.dacs.crop_weights`; the confidence weight stays the share over all
pixels, pasted source pixels keep weight 1); the ImageNet feature distance
(`feature_distance.weight` > 0): a third network 'imnet', the student's initialisation that
no optimizer sees and nothing updates, runs in evaluation mode on the source batch, and the
step adds weight x FD between its last encoder stage (or `feature_distance.layer`) and the
student's from the source CE's forward, over the thing-class patches
(`jaxda.losses.feature_distance`).

Only the 'main' head is trained (DACS and DAFormer use single-output networks; configs/dacs.py
sets model.multi_level False).
"""

import jax
import jax.numpy as jnp

from jaxda.data import masking, mixing, strong_augment
from jaxda.losses import dacs as dacs_losses
from jaxda.losses import feature_distance as fd_losses
from jaxda.losses import hrda as hrda_losses
from jaxda.losses import sac as sac_losses
from jaxda.losses import segmentation
from jaxda.models import hrda
from jaxda.train import common, spec

TEACHER = "teacher"
IMNET = "imnet"
EMA_TIMINGS = ("before", "after")
# Folded into the step key for MIC's draws: the other draws keep their keys with MIC off.
_MIC_KEY_TAG = 0x31C
# Folded into a pass's dropout key for HRDA's detail box.
_BOX_KEY_TAG = 0xB0C


def networks(config) -> dict[str, spec.Network]:
    """The student 'seg', the EMA teacher (same architecture, starting as a copy) and, with
    the feature distance on, 'imnet': a frozen copy of the student's initialisation (DAFormer's
    `imnet_model`; `config.init.imnet` may name another source). It is a teacher slot, so the
    optimizer never sees it, but it is checkpointed with the training state: one more copy of
    the network's variables on the devices and in every checkpoint (head included, as
    DAFormer's; the step uses only its encoder features, and XLA drops the unused head)."""
    nets = {"seg": spec.segmenter(config), TEACHER: spec.teacher_of(config)}
    if config.dacs.feature_distance.weight > 0:
        nets[IMNET] = spec.teacher_of(config)
    return nets


def teacher_update(teacher: dict, student: dict, step, alpha: float) -> dict:
    """The EMA of the parameters with alpha_t = min(1 - 1 / (t + 1), alpha); the teacher's
    BN statistics are kept: both official codes average `parameters()` only, and the teacher
    normalises with its input batch's statistics, so its running statistics are never read."""
    momentum = dacs_losses.ema_momentum(step, alpha)
    return common.ema_update(teacher, student, momentum, batch_stats="keep")


def _check_streams(config, source: dict, target: dict) -> None:
    if source["image"].shape[1:3] != target["image"].shape[1:3]:
        raise ValueError(
            f"DACS mixes source and target crops pixel by pixel, so they need one size: source "
            f"{source['image'].shape[1:3]}, target {target['image'].shape[1:3]} (set "
            "config.data.source.crop_size and config.data.target.crop_size alike)"
        )
    for key in ("image_mean", "image_std"):
        if config.data.source.get(key) != config.data.target.get(key):
            raise ValueError(
                f"config.data.source.{key} and config.data.target.{key} differ: DACS mixes "
                "normalised images, so both streams need one normalisation"
            )


def strong_transform(key, images, config, blur: bool | None = None) -> jax.Array:
    """DACS's colour jitter and blur of normalised images [B, H, W, 3] (config.dacs.strong),
    applied in [0, 1] units of the stored channel order (`strong.channels='stored'`: what
    DACS did with its BGR tensors) or of RGB ('rgb'). `blur` overrides `strong.blur`."""
    cfg = config.dacs.strong
    if cfg.channels not in ("stored", "rgb"):
        raise ValueError(f"config.dacs.strong.channels={cfg.channels!r}: use 'stored' or 'rgb'")
    mean = jnp.asarray(config.data.image_mean, jnp.float32)
    std = jnp.asarray(config.data.image_std, jnp.float32)
    swap = cfg.channels == "rgb" and config.data.bgr
    pixels = (images * std + mean) / 255.0
    pixels = pixels[..., ::-1] if swap else pixels
    params = strong_augment.draw(
        key,
        images.shape[0],
        strength=cfg.jitter_strength,
        jitter_prob=cfg.jitter_prob,
        blur_prob=cfg.blur_prob,
        sigma_range=tuple(cfg.blur_sigma),
    )
    pixels = strong_augment.apply(pixels, params, blur=cfg.blur if blur is None else blur)
    pixels = pixels[..., ::-1] if swap else pixels
    return (pixels * 255.0 - mean) / std


def mixed_batch(key, source: dict, target: dict, pseudo, weights, num_classes, config) -> dict:
    """{'image' (strongly augmented), 'label', 'weight', 'mask'} of the ClassMix batch."""
    cfg = config.dacs
    mix_key, strong_key = jax.random.split(key)
    mask, _ = mixing.classmix_masks(
        mix_key,
        source["label"],
        num_classes,
        pool=cfg.classmix_pool,
        include_ignore=cfg.classmix_ignore,
    )
    image = mixing.mix(mask, source["image"], target["image"])
    if cfg.strong.enabled:
        image = strong_transform(strong_key, image, config)
    return {
        "image": image,
        "label": jnp.where(mask, source["label"].astype(jnp.int32), pseudo),
        "weight": jnp.where(mask, 1.0, weights),
        "mask": mask,
    }


def masked_target(key, images, config) -> jax.Array:
    """MIC's input [B, H, W, 3]: the target images, colour-jittered and blurred with fresh
    draws (`mic.color_augment`), then block-masked (config.dacs.mic)."""
    cfg = config.dacs.mic
    strong_key, mask_key = jax.random.split(key)
    if cfg.color_augment:
        images = strong_transform(strong_key, images, config, blur=True)
    batch, size = images.shape[0], images.shape[1:3]
    keep = masking.block_mask(mask_key, batch, size, cfg.block_size, cfg.ratio)
    return masking.apply_mask(images, keep)


def source_loss(logits, labels, config) -> jax.Array:
    """The source CE: over all pixels, ignored ones counting 0 (DAFormer's mmseg loss), or
    over the labelled ones (`source_mean_all_pixels=False`: DACS's CrossEntropy2d)."""
    if config.dacs.source_mean_all_pixels:
        return sac_losses.cross_entropy_all_pixels(logits, labels)
    return segmentation.cross_entropy(logits, labels)


def student_pass(model, variables, images, labels, weights, *, rng, config, features=False):
    """The student in training mode on `images` [B, H, W, 3] and its loss against `labels`
    [B, H, W] x `weights` (None: the source CE, `source_loss`; else the weighted CE).

    HRDA (`hrda.HRDA`): a detail box drawn per pass (HRDA draws one per forward_train), and
    its fused + detail loss (`config.model.hr_loss_weight`), a mean over all pixels.

    Returns (loss, new batch_stats, sown features or None, {'loss_hr': ...} for HRDA).
    """
    kwargs, box, cfg = {}, None, config.dacs
    if isinstance(model, hrda.HRDA):
        crop = [min(c, s) for c, s in zip(model.hr_crop_size, images.shape[1:3], strict=True)]
        divisible = round(hrda.OUTPUT_STRIDE / model.lr_scale)
        box = kwargs["box"] = hrda.crop_box(
            jax.random.fold_in(rng, _BOX_KEY_TAG), images.shape[1:3], crop, divisible
        )
    outputs, batch_stats, *sown = common.forward(
        model, variables, images, train=True, features=features, rng=rng, **kwargs
    )
    sown = sown[0] if features else None
    if box is not None:
        loss, terms = hrda_losses.hrda_loss(
            outputs,
            labels.astype(jnp.int32),
            weights,
            box,
            hr_loss_weight=config.model.get("hr_loss_weight", 0.1),
            lr_loss_weight=config.model.get("lr_loss_weight", 0.0),
        )
        return loss, batch_stats, sown, {"loss_hr": terms.get("hr", 0.0)}
    logits = common.upsample(outputs, labels.shape[1:3], cfg.align_corners)["main"]
    if weights is None:
        return source_loss(logits, labels, config), batch_stats, sown, {}
    return dacs_losses.weighted_cross_entropy(logits, labels, weights), batch_stats, sown, {}


def train_step(state, batch, *, networks, tx, config):
    """One DACS iteration (module docstring)."""
    cfg, model = config.dacs, networks["seg"]
    if cfg.ema_timing not in EMA_TIMINGS:
        raise ValueError(f"config.dacs.ema_timing={cfg.ema_timing!r}: use one of {EMA_TIMINGS}")
    source, target = batch["source"], batch["target"]
    _check_streams(config, source, target)
    size = target["image"].shape[1:3]
    upsample = lambda x, s: common.upsample(x, s, cfg.align_corners)["main"]  # noqa: E731
    mix_key, source_key, mixed_key = jax.random.split(state.step_key(), 3)

    teacher = state.teachers[TEACHER]
    if cfg.ema_timing == "before":
        teacher = teacher_update(teacher, state.variables("seg"), state.step, cfg.alpha)
    logits, _ = common.forward(
        networks[TEACHER], teacher, target["image"], train=cfg.teacher_train_mode
    )
    probs = jax.nn.softmax(upsample(logits, size).astype(jnp.float32), axis=-1)
    pseudo, weights = dacs_losses.pseudo_labels(
        probs, cfg.pseudo_threshold, scope=cfg.confidence_scope
    )
    cropped = dacs_losses.crop_weights(weights, cfg.pseudo_ignore_top, cfg.pseudo_ignore_bottom)
    mixed = jax.lax.stop_gradient(
        mixed_batch(mix_key, source, target, pseudo, cropped, probs.shape[-1], config)
    )
    mic_weight = cfg.mic.weight if "mic" in cfg else 0.0
    mic_key, masked_key = jax.random.split(jax.random.fold_in(state.step_key(), _MIC_KEY_TAG))
    masked = masked_target(mic_key, target["image"], config) if mic_weight else None
    fd_cfg = cfg.feature_distance
    use_fd = fd_cfg.weight > 0
    if use_fd:  # The frozen network's features and the mask do not depend on the parameters.
        _, _, sown = common.forward(
            networks[IMNET], state.teachers[IMNET], source["image"], train=False, features=True
        )
        layer = common.feature_layer(sown, fd_cfg.layer, "config.dacs.feature_distance.layer")
        frozen = jax.lax.stop_gradient(sown[layer])
        fd_mask = fd_losses.patch_mask(
            source["label"], frozen.shape[1:3], fd_cfg.classes, fd_cfg.min_ratio, config.num_classes
        )

    def loss_fn(params):
        loss_source, batch_stats, sown, hr = student_pass(
            model,
            {"params": params, "batch_stats": state.batch_stats},
            source["image"],
            source["label"],
            None,
            rng=source_key,
            features=use_fd,
            config=config,
        )
        metrics = {"loss_source": loss_source, **_suffixed(hr, "_source")}
        if use_fd:  # On the source forward's own features, as DAFormer's `calc_feat_dist`.
            fd, metrics["feature_distance_patches"] = fd_losses.masked_feature_distance(
                sown[layer], frozen, fd_mask
            )
            metrics["loss_feature_distance"] = fd
        loss_mix, batch_stats, _, hr = student_pass(
            model,
            {"params": params, "batch_stats": batch_stats},
            mixed["image"],
            mixed["label"],
            mixed["weight"],
            rng=mixed_key,
            config=config,
        )
        metrics.update(loss_mix=loss_mix, **_suffixed(hr, "_mix"))
        loss = loss_source + cfg.mix_weight * loss_mix
        if use_fd:  # One gradient of all the terms (DAFormer: a backward per term).
            loss = loss + fd_cfg.weight * metrics["loss_feature_distance"]
        if mic_weight:  # MIC's targets: the pseudo labels, their weights after the crop.
            loss_masked, batch_stats, _, hr = student_pass(
                model,
                {"params": params, "batch_stats": batch_stats},
                masked,
                pseudo,
                cropped,
                rng=masked_key,
                config=config,
            )
            metrics.update(loss_masked=loss_masked, **_suffixed(hr, "_masked"))
            loss = loss + mic_weight * loss_masked
        return loss, (batch_stats, metrics)

    (loss, (batch_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params["seg"]
    )
    new_state = common.apply_gradients(state, {"seg": grads}, batch_stats, tx)
    if cfg.ema_timing == "after":
        teacher = teacher_update(teacher, new_state.variables("seg"), state.step, cfg.alpha)
    new_state = new_state.replace(teachers={**state.teachers, TEACHER: teacher})
    metrics.update(
        confidence_weight=jnp.mean(weights),
        mixed_source_share=jnp.mean(mixed["mask"].astype(jnp.float32)),
        ema_momentum=dacs_losses.ema_momentum(state.step, cfg.alpha),
        pseudo_label_accuracy=common.pseudo_label_accuracy(pseudo, target["label"]),
    )
    return new_state, {"loss": loss, **metrics}


def _suffixed(terms: dict, suffix: str) -> dict:
    return {f"{k}{suffix}": v for k, v in terms.items()}


METHOD = spec.Method(train_step, ("source", "target"), networks=networks)
