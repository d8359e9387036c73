"""Registry of training methods (`spec.Method`): name -> step, networks, streams, state."""

from jaxda.train import (
    adversarial,
    dacs,
    dasac,
    dasac_passes,
    proda,
    proda_passes,
    robustnet,
    source_only,
    spec,
    target_loss,
    tent,
)

_BOTH = ("source", "target")
METHODS = {
    "source_only": spec.Method(source_only.train_step),
    "adaptseg": spec.Method(
        adversarial.make_train_step("softmax"), _BOTH, networks=adversarial.networks
    ),
    "advent": spec.Method(
        adversarial.make_train_step("self_information"), _BOTH, networks=adversarial.networks
    ),
    "minent": spec.Method(target_loss.make_train_step(target_loss.minent_loss), _BOTH),
    "maxsquare": spec.Method(target_loss.make_train_step(target_loss.maxsquare_loss), _BOTH),
    "proda_stage1": proda.STAGE1,
    "proda_distillation": proda.DISTILLATION,
    "dasac_abn": dasac.ABN,
    "dasac_sac": dasac.SAC,
    "robustnet": robustnet.METHOD,
    "dacs": dacs.METHOD,
}
del proda_passes, dasac_passes  # Imported for their offline passes (`offline.PASSES`).
for _name in ("tent", "bn_adapt"):
    METHODS[_name] = spec.Method(
        tent.adapt_step,
        domains=(),
        networks=tent.networks,
        init_extra=tent.init_extra,
        test_time=True,
        online_results=tent.online_results,
    )


def register(name: str, method: spec.Method) -> None:
    """Adds a method (e.g. from a user's own module) under `name` (config.method)."""
    if name in METHODS and METHODS[name] is not method:
        raise ValueError(f"A method named {name!r} is already registered")
    METHODS[name] = method


def get(name: str) -> spec.Method:
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r} (config.method); available: {sorted(METHODS)}")
    return METHODS[name]
