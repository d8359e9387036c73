"""Initialisation of each network of a fresh run from checkpoints, whole or in part.

`config.init` maps network names to sources, read after random initialisation:
  - 'PATH': a jaxda workdir, a checkpoint step directory, or a converted PyTorch checkpoint
    (`launch.convert`): every parameter and BN statistic of the network is loaded;
  - ('PATH', 'REGEX'): only the variables whose '/'-joined path (e.g.
    'params/backbone/layer1_0/conv1/kernel') fully matches REGEX (e.g. 'params/backbone/.*|
    batch_stats/backbone/.*' for the backbone alone); the rest keep their initial values;
  - 'copy:NAME': the variables of network NAME, once that one is initialised (a teacher
    starting as the student).
`config.init_from` is the short form of `config.init.seg`. A network without an entry uses its
`Network.init` default.

What is loaded must exist in the checkpoint with the same shapes; variables the checkpoint has
and the network does not (an aux head the new config drops) are ignored. Model-config
differences that keep the shapes (bn_mode, multi_level for the loaded part) are accepted;
those that change them are refused, naming the variables and the differing settings.
"""

import re
from collections.abc import Mapping

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import traverse_util

from jaxda import checkpoints
from jaxda.train import spec

COPY_PREFIX = "copy:"


def sources(config: ml_collections.ConfigDict, networks: Mapping[str, spec.Network]) -> dict:
    """{network: source} in initialisation order (copies after the networks they copy)."""
    init = dict(config.get("init") or {})
    unknown = sorted(set(init) - set(networks))
    if unknown:
        raise ValueError(
            f"config.init names {unknown}, which this method does not have; its networks: "
            f"{sorted(networks)}"
        )
    if config.get("init_from"):
        if init.get("seg"):
            raise ValueError("Set config.init_from or config.init.seg, not both")
        init["seg"] = config.init_from
    result = {}
    for name, network in networks.items():
        source = init.get(name) or network.init
        if source:
            result[name] = tuple(source) if isinstance(source, list | tuple) else source
    copies = {n: s for n, s in result.items() if isinstance(s, str) and s.startswith(COPY_PREFIX)}
    for name, source in copies.items():
        if source[len(COPY_PREFIX) :] not in networks:
            raise ValueError(f"config.init.{name}={source!r}: no network of that name")
    loads = {n: s for n, s in result.items() if n not in copies}
    return {**loads, **copies}


def _describe_differences(meta: dict, model_config: dict) -> str:
    saved = meta.get("model") or {}
    differ = [
        f"{k}: checkpoint {saved.get(k)!r} vs config {model_config.get(k)!r}"
        for k in sorted(set(saved) | set(model_config))
        if saved and saved.get(k) != model_config.get(k)
    ]
    return f" The model settings differ: {', '.join(differ)}." if differ else ""


def load_variables(
    source, current: Mapping, model_config: Mapping, *, network: str = "seg"
) -> tuple[dict, str]:
    """`current` variables with those selected by `source` loaded from its checkpoint.

    Args:
      source: 'PATH' or ('PATH', 'REGEX') (see the module docstring).
      current: the network's initial variables (arrays with shardings).
      model_config: config.model as a dict, to name differing settings in errors.

    Returns:
      (variables, step directory read).
    """
    path, pattern = (source, ".*") if isinstance(source, str) else source
    step_dir = checkpoints.find_step_dir(path)
    stored, meta = checkpoints.read_model_tree(step_dir)
    stored = traverse_util.flatten_dict(stored, sep="/")
    flat = traverse_util.flatten_dict(dict(current), sep="/")
    include = re.compile(pattern)
    selected = [k for k in flat if include.fullmatch(k)]
    if not selected:
        raise checkpoints.CheckpointMismatchError(
            f"config.init.{network}: the pattern {pattern!r} matches none of the network's "
            f"variables (e.g. {sorted(flat)[:3]})"
        )
    missing = [k for k in selected if k not in stored]
    wrong = [
        f"{k} {tuple(np.shape(stored[k]))} vs {tuple(flat[k].shape)}"
        for k in selected
        if k in stored and tuple(np.shape(stored[k])) != tuple(flat[k].shape)
    ]
    if missing or wrong:
        details = []
        if missing:
            details.append(f"{len(missing)} missing from the checkpoint ({', '.join(missing[:5])})")
        if wrong:
            details.append(f"{len(wrong)} of another shape ({'; '.join(wrong[:5])})")
        raise checkpoints.CheckpointMismatchError(
            f"Cannot initialise network {network!r} from {step_dir}: of the variables to load, "
            f"{' and '.join(details)}.{_describe_differences(meta, dict(model_config))} Use the "
            "model settings it was trained with, or load a part with "
            f"--config.init.{network}=\"('{path}', 'REGEX')\"."
        )
    ignored = sorted(set(stored) - set(flat))
    if ignored:
        logging.info("init %s: ignoring %d checkpoint variables (%s)", network, len(ignored),
                     ", ".join(ignored[:5]))  # fmt: skip
    for key in selected:
        target = flat[key]
        flat[key] = jax.device_put(np.asarray(stored[key], target.dtype), target.sharding)
    logging.info(
        "Initialised %d/%d variables of %s from %s", len(selected), len(flat), network, step_dir
    )
    return traverse_util.unflatten_dict(flat, sep="/"), str(step_dir)


def initialize(state, config, networks: Mapping[str, spec.Network]):
    """Applies every source of `sources(config, networks)` to the fresh `state`; returns
    (state, {network: what it was initialised from})."""
    model_config = checkpoints.model_meta(config.model)
    done = {}
    for name, source in sources(config, networks).items():
        teacher = networks[name].is_teacher
        if isinstance(source, str) and source.startswith(COPY_PREFIX):
            other = source[len(COPY_PREFIX) :]
            variables = jax.tree.map(lambda x: x.copy(), state.variables(other))
            done[name] = source
        else:
            variables, done[name] = load_variables(
                source, state.variables(name), model_config, network=name
            )
        state = state.with_variables(name, variables, teacher=teacher)
    return state, done
