"""Output-space adversarial adaptation: AdaptSegNet (Tsai et al., CVPR 2018) and AdvEnt
(Vu et al., CVPR 2019), which differ only in what the discriminators see.

One step reproduces the PyTorch iteration (docs/methods/adaptsegnet.md, advent.md): source CE; the
adversarial loss of the target predictions through the frozen discriminators, with the
"source" label; the discriminators trained on the detached inputs of both domains; then all
optimizers step, every gradient taken at the parameters of the start of the step.
"""

import dataclasses

import jax

from jaxda.losses import entropy
from jaxda.train import common, spec

# What a discriminator sees, from [N, H, W, C] upsampled logits.
DISCRIMINATOR_INPUTS = {
    # AdaptSegNet: the softmax.
    "softmax": lambda logits: jax.nn.softmax(logits, axis=-1),
    # AdvEnt: the C-channel weighted self-information map of the softmax.
    "self_information": lambda logits: entropy.weighted_self_information(
        jax.nn.softmax(logits, axis=-1)
    ),
}


def discriminator_heads(config) -> tuple[str, ...]:
    """Heads with an output-space discriminator: main, plus aux for multi-level models."""
    return ("main", "aux") if config.model.multi_level else ("main",)


def replicates_da_exp_bugs(config) -> bool:
    """config.adversarial.replicate_da_exp_bugs: Adversarial_DA_Exp's three bugs, see
    `common.discriminator_loss` (bugs 1, 2) and `networks` (bug 3)."""
    return bool(config.adversarial.get("replicate_da_exp_bugs", False))


def networks(config) -> dict[str, spec.Network]:
    """The segmentation network and one discriminator per head ('disc/main', 'disc/aux')."""
    heads = discriminator_heads(config)
    discs = spec.discriminators(config, heads)
    if replicates_da_exp_bugs(config) and "disc/aux" in discs:
        # Bug 3: Adversarial_DA_Exp's poly scheduler is never called on optimizer_D2.
        discs["disc/aux"] = dataclasses.replace(discs["disc/aux"], constant_lr=True)
    return {"seg": spec.segmenter(config), **discs}


def make_train_step(discriminator_input: str):
    """The adversarial train step whose discriminators see `DISCRIMINATOR_INPUTS[...]`."""
    to_input = DISCRIMINATOR_INPUTS[discriminator_input]

    def train_step(state, batch, *, networks, tx, config):
        """One iteration on {'source': {image, label}, 'target': {image}}."""
        model = networks["seg"]
        # One module for every head (the heads differ in their parameters only).
        discriminator = networks[f"disc/{discriminator_heads(config)[0]}"]
        labels = batch["source"]["label"]
        heads = discriminator_heads(config)
        adv_weights = {head: config.adversarial.lambda_adv[head] for head in heads}
        gan = config.adversarial.gan
        da_exp_bugs = replicates_da_exp_bugs(config)
        disc_weight = config.adversarial.get("discriminator_loss_weight", 0.5)

        def loss_fn(seg_params):
            source_up, target_up, batch_stats = common.forward_domains(
                model, seg_params, state.batch_stats, batch, state.step_key()
            )
            source_inputs = {h: to_input(source_up[h]) for h in heads}
            target_inputs = {h: to_input(target_up[h]) for h in heads}
            seg_loss, metrics = common.supervised_loss(
                source_up, labels, common.source_head_weights(config)
            )
            adv_loss, adv_metrics = common.generator_adversarial_loss(
                discriminator, common.discriminator_params(state), target_inputs, adv_weights, gan
            )
            aux = (batch_stats, source_inputs, target_inputs, {**metrics, **adv_metrics})
            return seg_loss + adv_loss, aux

        (loss, (batch_stats, source_inputs, target_inputs, metrics)), seg_grads = (
            jax.value_and_grad(loss_fn, has_aux=True)(state.params["seg"])
        )

        def disc_loss_fn(disc_params):
            return common.discriminator_loss(
                discriminator,
                disc_params,
                source_inputs,
                target_inputs,
                gan,
                da_exp_bugs,
                disc_weight,
            )

        (disc_loss, disc_metrics), disc_grads = jax.value_and_grad(disc_loss_fn, has_aux=True)(
            common.discriminator_params(state)
        )
        grads = {"seg": seg_grads, "disc": disc_grads}
        metrics = {"loss": loss + disc_loss, "loss_generator": loss, **metrics, **disc_metrics}
        return common.apply_gradients(state, grads, batch_stats, tx), metrics

    return train_step
