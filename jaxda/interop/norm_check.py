"""RobustNet's normalisation family (IBN, IW / IRW / ISW, none) of a checkpoint against the
config's model (config.model.instance_norm / instance_norm_at), told apart by its keys
(`jaxda.interop.key_names`); a mismatch is refused naming them and what to pass. Pure Python;
`jaxda.interop.torch_layouts.map_state_dict` calls it for layout 'robustnet'.
"""

import re

from jaxda.interop import key_names
from jaxda.interop.layouts import ConversionError, strip_module

_NORMS = {
    "bn": "a BatchNorm",
    "affine": "an affine InstanceNorm (IBN-Net, RobustNet's --wt_layer code 4)",
    "plain": "a parameter-free InstanceNorm (IW / IRW / ISW, --wt_layer codes 1-3)",
}


def check_instance_norm(names, paths) -> None:
    """Raises ConversionError when a RobustNet file's normalisation family differs from the
    model's: `names` the file's keys, `paths` the model's variable paths (dict or set).

    Compared: each stem norm whose conv the file has (BatchNorm / affine / parameter-free
    InstanceNorm, told apart by `layer0.<i>`'s keys), and the IBN keys of each layer that the
    file and the model both have with the same number of blocks (other depths are the depth
    check's error). A 'plain' InstanceNorm after a block leaves no key: it cannot be checked.
    """
    names = [strip_module(n) for n in names]
    switchable = sorted(n for n in names if re.search(r"\.(sw_mean_weight|running_cov)$", n))
    if switchable:
        raise ConversionError(
            "The file uses RobustNet's switchable whitening (--wt_layer code 5, "
            f"SyncSwitchWhiten2d: {switchable[:3]}), which jaxda's DeepLabV3+ does not model."
        )
    problems = []
    file_stem, model_stem = key_names.file_stem_norms(names), key_names.model_stem_norms(paths)
    if file_stem and ("bn2" in file_stem) != ("bn2" in model_stem):
        return  # Another stem: the depth check says which --config.model.deep_stem to pass.
    for bn, (kind, keys) in sorted(file_stem.items()):
        if kind != model_stem[bn]:
            index = key_names.STEM_NORMS[bn]
            problems.append(
                f"layer0.{index} (the stem's {bn}): the file has {_NORMS[kind]} "
                f"[{', '.join(keys) or f'no layer0.{index}.* key'}], the config's model "
                f"{_NORMS[model_stem[bn]]}"
            )
    counts, file_ibn = key_names.file_blocks(names)
    model_counts, model_ibn = key_names.blocks(paths), key_names.model_instance_norm_blocks(paths)
    for layer in (k for k in range(1, 5) if k in counts and counts[k] == model_counts.get(k)):
        found, wanted = file_ibn.get(layer, []), model_ibn.get(layer)
        if found and found != [wanted]:
            keys = ", ".join(f"layer{layer}.{b}.instance_norm_layer.*" for b in found)
            where = "none" if wanted is None else f"one in block {wanted}, the last"
            problems.append(f"{keys}: the file has {_NORMS['affine']}, the config's model {where}")
        elif wanted is not None and not found:
            problems.append(
                f"params/backbone/layer{layer}_{wanted}/instance_norm: the config's model has "
                f"{_NORMS['affine']} after layer{layer}'s last block, the file no "
                f"layer{layer}.{wanted}.instance_norm_layer.{{weight,bias}}"
            )
    if problems:
        lines = "\n".join(f"  {p}" for p in problems)
        raise ConversionError(
            "The checkpoint's normalisation does not match the config's model "
            f"(config.model.instance_norm / instance_norm_at):\n{lines}\n"
            + _instance_norm_hint(file_stem, "bn3" if "bn3" in model_stem else "bn1", file_ibn)
        )


def _instance_norm_hint(file_stem: dict, last: str, ibn: dict) -> str:
    """What to pass for a file with these stem norms (`key_names.file_stem_norms`; `last` the
    one jaxda's 'stem' slot replaces) and IBN keys in `ibn`."""
    first = [f"layer0.{key_names.STEM_NORMS[bn]}" for bn, (kind, _) in sorted(file_stem.items())
             if bn != last and kind != "bn"]  # fmt: skip
    if first:
        return (
            f"No config fits: the file instance-normalises the deep stem's {' and '.join(first)} "
            "(RobustNet's codes at --wt_layer positions 0 / 1, e.g. its R101 GTAV scripts' "
            "2 2 0 2 2 0 0 / 4 4 0 4 4 0 0), jaxda's 'stem' slot only its last norm (layer0.7)."
        )
    stem = file_stem.get(last, ("bn",))[0]
    kinds = ({stem} - {"bn"}) | ({"affine"} if ibn else set())
    slots = (("stem",) if stem != "bn" else ()) + tuple(f"layer{k}" for k in sorted(ibn))
    if kinds == {"affine"}:
        return (
            "The file reads as IBN: pass --config.model.instance_norm=affine "
            f'--config.model.instance_norm_at="{slots}".'
        )
    if kinds == {"plain"}:
        return (
            "The file's stem reads as IW / IRW / ISW: pass --config.model.instance_norm=plain. "
            "A parameter-free InstanceNorm leaves no key, so the file cannot tell which layers "
            "have one: RobustNet's scripts use --config.model.instance_norm_at="
            "\"('stem', 'layer1', 'layer2')\" (the default)."
        )
    if not kinds:
        return (
            "The file reads as RobustNet's baseline (no instance normalisation): pass "
            "--config.model.instance_norm='' (or 'plain' with instance_norm_at naming layers "
            "only: a parameter-free InstanceNorm leaves no key)."
        )
    return (
        "The file mixes IBN and parameter-free InstanceNorms, which one "
        "config.model.instance_norm cannot model."
    )
