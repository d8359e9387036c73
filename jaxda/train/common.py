"""Pieces shared by every method's train step: forward passes, upsampling, the supervised
loss, the output-space adversarial and discriminator losses, and the parameter update.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

from jaxda.data.labels import IGNORE_LABEL
from jaxda.losses import adversarial, segmentation
from jaxda.models.layers import resize_bilinear, resize_bilinear_align_corners
from jaxda.train.state import TrainState


def forward(
    model, variables: dict, images, *, train: bool, features: bool = False, rng=None, **kwargs
):
    """Runs a segmentation network; in training mode BN may update its running statistics.

    Args:
      variables: {'params', 'batch_stats'} of the network.
      features: also return the backbone features the model sows ('intermediates').
      rng: training mode: the 'dropout' key of models with dropout (DeepLabV3+); models
        without dropout ignore it, so it changes nothing for them.
      kwargs: more arguments of the model's call (HRDA's training `box`).

    Returns:
      ({head: [N, h, w, classes] logits at stride 8}, new batch_stats), and with `features`
      a third element {name: [N, h, w, channels]}.
    """
    mutable = (["batch_stats"] if train else []) + (["intermediates"] if features else [])
    rngs = {"dropout": rng} if train and rng is not None else None
    if mutable:
        outputs, updates = model.apply(
            variables, images, train=train, mutable=mutable, rngs=rngs, **kwargs
        )
    else:
        outputs, updates = model.apply(variables, images, train=train, rngs=rngs, **kwargs), {}
    batch_stats = updates.get("batch_stats", variables.get("batch_stats", {}))
    if not features:
        return outputs, batch_stats
    sown = {k: v[0] for k, v in updates.get("intermediates", {}).get("backbone", {}).items()}
    sown.update({k: v[0] for k, v in updates.get("intermediates", {}).items() if k != "backbone"})
    return outputs, batch_stats, sown


# The last encoder stage each backbone sows: MiT ('stage4', stride 32), ResNet ('layer4').
LAST_STAGES = ("stage4", "layer4")


def feature_layer(sown: Mapping[str, jax.Array], name: str, key: str) -> str:
    """The name of a sown feature map (`forward(..., features=True)`): `name`, or with '' the
    network's last encoder stage (`LAST_STAGES`); `key` names the config key in errors."""
    found = name or next((n for n in LAST_STAGES if n in sown), "")
    if found not in sown:
        raise ValueError(f"{key}={name!r}: the network sows {sorted(sown)}; name one of them")
    return found


def forward_domains(model, seg_params, batch_stats, batch, rng=None):
    """Source then target through the network in training mode, upsampled as the methods do.

    Both domains pass through the same BN layers in order, as in the PyTorch loops: with batch
    statistics each is normalised by its own batch and both update the running averages.
    Source logits go to the label size, target logits to the input size (AdaptSegNet, ADVENT,
    MaxSquare all do this).

    Args:
      rng: the step's key; each domain's forward gets its own dropout key from it.

    Returns:
      ({head: [N, H, W, C] source logits}, {head: target logits}, new batch_stats).
    """
    source, target = batch["source"], batch["target"]
    keys = (None, None) if rng is None else tuple(jax.random.split(rng))
    variables = {"params": seg_params, "batch_stats": batch_stats}
    source_out, batch_stats = forward(model, variables, source["image"], train=True, rng=keys[0])
    variables = {"params": seg_params, "batch_stats": batch_stats}
    target_out, batch_stats = forward(model, variables, target["image"], train=True, rng=keys[1])
    source_up = upsample(source_out, source["label"].shape[1:3])
    return source_up, upsample(target_out, target["image"].shape[1:3]), batch_stats


def source_head_weights(config) -> dict[str, float]:
    """CE weight per head on labelled data: 1 for main, `loss.lambda_seg_aux` for aux."""
    return {"main": 1.0, "aux": config.loss.lambda_seg_aux}


def upsample(
    outputs: Mapping[str, jax.Array], size: tuple[int, int], align_corners: bool = True
) -> dict[str, jax.Array]:
    """Upsamples every head's logits to `size` (bilinear; align_corners=True, as the
    DeepLabV2-era methods do; False: mmseg's `resize`, as DAFormer's code does)."""
    resize = resize_bilinear_align_corners if align_corners else resize_bilinear
    return {head: resize(x, size) for head, x in outputs.items()}


def supervised_loss(
    logits: Mapping[str, jax.Array], labels: jax.Array, head_weights: Mapping[str, float]
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """sum_head weight * CE(logits[head], labels); heads with weight 0 are skipped.

    Args:
      logits: {head: [N, H, W, classes]} at label resolution.
      labels: [N, H, W] train ids, 255 ignored.
      head_weights: e.g. {'main': 1.0, 'aux': 0.1}.
    """
    total, metrics = 0.0, {}
    for head, weight in head_weights.items():
        if weight and head in logits:
            loss = segmentation.cross_entropy(logits[head], labels)
            metrics[f"loss_seg_{head}"] = loss
            total = total + weight * loss
    return total, metrics


def generator_adversarial_loss(
    discriminator, disc_params, target_inputs, weights, gan: str
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """sum_head weight * GAN(D_head(target input), 'source'): fool the frozen discriminators.

    Gradients reach the segmentation network through `target_inputs`; callers differentiate
    with respect to the segmentation parameters only, so the discriminators stay fixed.

    Args:
      target_inputs: {head: [N, H, W, C]} discriminator inputs computed from target outputs.
      weights: {head: lambda_adv}.
    """
    total, metrics = 0.0, {}
    for head, inputs in target_inputs.items():
        logits = discriminator.apply({"params": disc_params[head]}, inputs)
        loss = adversarial.gan_loss(gan, logits, adversarial.SOURCE_LABEL)
        metrics[f"loss_adv_{head}"] = loss
        total = total + weights[head] * loss
    return total, metrics


def discriminator_loss(
    discriminator,
    disc_params,
    source_inputs,
    target_inputs,
    gan: str,
    da_exp_bugs: bool = False,
    weight: float = 0.5,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """sum_head weight GAN(D(source), 0) + weight GAN(D(target), 1) on stop-gradient inputs.

    `weight`: 0.5 in AdaptSegNet / ADVENT, 1 in ProDA (whose discriminator loss has no 1/2).

    `da_exp_bugs`: Adversarial_DA_Exp's loss as written (docs/methods/adversarial_da_exp.md):
    bug 1, the target term uses the source label 0; bug 2, the aux discriminator's source term
    is computed on the main discriminator's source output (so its gradient reaches D_main, and
    D_aux learns from target inputs only).
    """
    total, metrics = 0.0, {}
    target_label = adversarial.SOURCE_LABEL if da_exp_bugs else adversarial.TARGET_LABEL
    for head in target_inputs:
        params = {"params": disc_params[head]}
        source_head = "main" if da_exp_bugs and head == "aux" else head
        source = discriminator.apply(
            {"params": disc_params[source_head]},
            jax.lax.stop_gradient(source_inputs[source_head]),
        )
        target = discriminator.apply(params, jax.lax.stop_gradient(target_inputs[head]))
        loss = weight * adversarial.gan_loss(gan, source, adversarial.SOURCE_LABEL)
        loss = loss + weight * adversarial.gan_loss(gan, target, target_label)
        metrics[f"loss_disc_{head}"] = loss
        total = total + loss
    return total, metrics


def apply_gradients(
    state: TrainState, grads: dict, batch_stats, tx: optax.GradientTransformation
) -> TrainState:
    """One optimizer update of all trained networks (every gradient taken at the old params);
    `batch_stats` are the segmentation network's new BN statistics.

    Args:
      grads: the gradients of `state.params`; networks a step does not train may be missing
        (their gradient is zero, so weight decay and momentum still apply, as in PyTorch).
    """
    grads = {**jax.tree.map(jnp.zeros_like, state.params), **grads}
    with jax.named_scope("optimizer"):  # Names the ops in profiles (benchmarks/step_profile.py).
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
    model_state = state.model_state
    if batch_stats:
        seg_state = {**model_state.get("seg", {}), "batch_stats": batch_stats}
        model_state = {**model_state, "seg": seg_state}
    return state.replace(
        step=state.step + 1,
        params=params,
        model_state=model_state,
        opt_state=opt_state,
    )


def discriminator_params(state: TrainState) -> dict:
    """{head: params} of the output-space discriminators ('disc/<head>' networks)."""
    return state.params.get("disc", {})


def ema_update(teacher: dict, student: dict, momentum, *, batch_stats: str = "copy") -> dict:
    """A teacher's new variables: params <- momentum x teacher + (1 - momentum) x student
    (optax.incremental_update); BN statistics 'copy' the student's (mean teacher, ProDA's EMA),
    'ema' average the same way, or 'keep' the teacher's.

    Args:
      teacher / student: {'params', 'batch_stats'} of networks of one architecture.
      momentum: scalar in [0, 1]; 1 keeps the teacher, 0 copies the student.
    """
    if batch_stats not in ("copy", "ema", "keep"):
        raise ValueError(f"batch_stats={batch_stats!r}: use 'copy', 'ema' or 'keep'")
    result = {
        "params": optax.incremental_update(student["params"], teacher["params"], 1 - momentum)
    }
    if "batch_stats" in teacher:
        result["batch_stats"] = {
            "copy": lambda: student["batch_stats"],
            "keep": lambda: teacher["batch_stats"],
            "ema": lambda: optax.incremental_update(
                student["batch_stats"], teacher["batch_stats"], 1 - momentum
            ),
        }[batch_stats]()
    return result


def pseudo_label_accuracy(pseudo: jax.Array, labels: jax.Array) -> jax.Array:
    """Fraction of pixels with both a pseudo label and a true label where they agree (the
    target labels are only monitored: no loss sees them)."""
    both = (pseudo != IGNORE_LABEL) & (labels != IGNORE_LABEL)
    agree = both & (pseudo.astype(jnp.int32) == labels.astype(jnp.int32))
    return jnp.sum(agree) / jnp.maximum(jnp.sum(both), 1)
