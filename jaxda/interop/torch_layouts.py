"""PyTorch checkpoints of the published UDA / DG code -> jaxda's Flax variables (NumPy only).

This module knows the key layouts of the released checkpoints (reference:
docs/methods/checkpoints.md, "Checkpoint key layouts") and maps a flat state dict (name ->
array) onto the variables of `jaxda.models.deeplab_v2.DeepLabV2`,
`jaxda.models.deeplab_v3plus.DeepLabV3Plus`, `jaxda.models.proda.ProDADeepLabV2` or
`jaxda.models.discriminators.FCDiscriminator`.
It never imports torch: `jaxda.interop.convert` reads the files and hands the arrays over.

Layouts: `jaxda.interop.layouts`; key names -> variable paths: `jaxda.interop.key_names`
(RobustNet's normalisation keys too); ASPP branch detection: `jaxda.interop.aspp_detection`.

Every key of the file ends up in exactly one group of the `ConversionReport`: loaded, skipped
(recognised but not loadable into this model, with the reason), ignored (not part of the
network: teachers, optimizer states, step counters) or unexpected (not understood). Every model
variable that the file does not provide is listed as missing: it keeps its initialisation.
"""

import collections
import dataclasses
import re
from collections.abc import Mapping

import numpy as np
from flax import traverse_util

from jaxda.interop.aspp_detection import detect_aspp_branches
from jaxda.interop.key_names import (
    backbone_path,
    blocks,
    model_stem_norms,
    path_str,
    proda_path,
    simclr_to_torchvision,
    stem_instance_norm_path,
    v3plus_path,
)
from jaxda.interop.layouts import (
    LAYOUTS,
    PRODA_ENTRIES,
    ConversionError,
    Layout,
    check_bn_clr,
    check_model,
    detect_layout,
    strip_module,
)
from jaxda.interop.norm_check import check_instance_norm

# Ignored in every layout (the legacy Caffe-converted files have none).
_NUM_BATCHES_TRACKED = "BatchNorm step counter (unused by jaxda)"


# ------------------------------------------------------------------------------------------
# The report.


@dataclasses.dataclass
class ConversionReport:
    """What happened to every key of the file and every variable of the model."""

    layout: str
    container: str = "bare"
    source: str = ""
    loaded: dict = dataclasses.field(default_factory=dict)  # torch key -> jaxda path
    missing: list = dataclasses.field(default_factory=list)  # jaxda paths kept at init
    skipped: dict = dataclasses.field(default_factory=dict)  # torch key -> reason
    ignored: dict = dataclasses.field(default_factory=dict)  # torch key -> reason
    unexpected: list = dataclasses.field(default_factory=list)  # torch keys not understood
    aspp: dict = dataclasses.field(default_factory=dict)
    notes: list = dataclasses.field(default_factory=list)
    prototypes: str = ""  # where ProDA's objective_vectors were written ('' if not)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def format(self) -> str:
        """A human-readable summary: counts, every missing and unexpected name, reasons."""
        description = LAYOUTS[self.layout].description if self.layout in LAYOUTS else ""
        lines = [
            f"Converted {self.source or 'state dict'}",
            f"  layout: {self.layout} ({description}); container: {self.container}",
        ]
        groups = collections.Counter(path.split("/")[1] for path in self.loaded.values())
        detail = ", ".join(f"{g} {n}" for g, n in sorted(groups.items()))
        lines.append(f"  loaded: {len(self.loaded)} tensors ({detail})")
        lines.append(f"  missing, kept at their initialisation: {len(self.missing)}")
        lines += [f"    {p}" for p in self.missing]
        for title, entries in (("skipped", self.skipped), ("ignored", self.ignored)):
            lines.append(f"  {title}: {len(entries)}")
            by_reason = collections.defaultdict(list)
            for key, reason in entries.items():
                by_reason[reason].append(key)
            for reason, keys in by_reason.items():
                shown = ", ".join(keys if len(keys) <= 8 else [*keys[:3], "..."])
                lines.append(f"    {reason} ({len(keys)}): {shown}")
        lines.append(f"  unexpected (not understood, not loaded): {len(self.unexpected)}")
        lines += [f"    {k}" for k in self.unexpected]
        if self.aspp:
            lines.append(f"  ASPP: {self.aspp.get('summary', '')}")
        if self.prototypes:
            lines.append(
                f"  prototypes (ProDA's ResNet101.objective_vectors) written to {self.prototypes}"
            )
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# Mapping.


def _target_model(target: Mapping) -> str:
    """The `config.model.name` of a segmentation network's variables."""
    params = target["params"]
    if "decoder" in params:
        return "deeplabv3plus"
    if "head" in params:
        return "proda_deeplab_v2"
    return "deeplab_v2"


def to_jax_layout(value: np.ndarray) -> np.ndarray:
    """Conv OIHW -> HWIO; Linear [out, in] -> Dense kernel [in, out] (the only 2-D tensors)."""
    if value.ndim == 4:
        return np.transpose(value, (2, 3, 1, 0))
    return value.T if value.ndim == 2 else value


def torch_shape(shape) -> tuple:
    """A Flax kernel shape (HWIO, or a Dense [in, out]) as PyTorch's (OIHW, [out, in])."""
    shape = tuple(shape)
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return shape[::-1] if len(shape) == 2 else shape


@dataclasses.dataclass
class _Entry:
    key: str  # as in the file
    path: tuple  # jaxda variable path
    value: np.ndarray  # PyTorch layout
    group: str  # 'backbone', a jaxda head, or 'discriminator'
    module: str = ""  # the PyTorch head module ('layer6')
    branch: int = -1


def map_state_dict(
    state_dict: Mapping[str, object],
    target: Mapping,
    layout: str | None = None,
    *,
    container: str = "bare",
    container_entries: tuple = (),
    skip_head: bool = False,
    check_aspp: bool = True,
) -> tuple[dict, ConversionReport]:
    """Maps a flat PyTorch state dict onto the variables described by `target`.

    Args:
      state_dict: name -> array (NumPy or anything `np.asarray` takes), PyTorch layouts.
      target: the model's variables or their shapes (e.g. `jax.eval_shape` of `model.init`):
        {'params': ..., 'batch_stats': ...} of DeepLabV2 or DeepLabV3+, or {'params': ...} of
        FCDiscriminator.
      layout: a `LAYOUTS` name; None detects it from the keys.
      container / container_entries: from `unwrap`, for the report.
      skip_head: load no head tensor (the heads keep their initialisation), e.g. for another
        class count.
      check_aspp: raise when the loaded heads look trained with another number of ASPP
        branches than the model sums.

    Returns:
      ({jaxda path tuple: float32 array in Flax layout} of the loaded tensors, report).

    Raises:
      ConversionError: unknown layout, a layout of another network than the target's
        (DeepLabV2 vs DeepLabV3+), a shape mismatch (naming the key and both shapes), a
        backbone depth or stem mismatch, a RobustNet normalisation mismatch
        (`norm_check.check_instance_norm`), or an ASPP branch-count disagreement.

    A stem BN that the target replaces by an InstanceNorm (config.model.instance_norm): its
    weight and bias load into an 'affine' one's scale and bias (RobustNet's IBN files, and its
    ImageNet init, which `forgiving_state_restore` loads by name); what has no counterpart
    (running statistics, all of a 'plain' one's) is skipped with the reason.
    """
    layout = layout or detect_layout(list(state_dict), container)
    if layout not in LAYOUTS:
        raise ConversionError(f"Unknown layout {layout!r}; known: {sorted(LAYOUTS)}")
    spec = LAYOUTS[layout]
    targets = traverse_util.flatten_dict(target)
    is_discriminator = spec.kind == "discriminator"
    if is_discriminator != ("backbone" not in target.get("params", {})):
        kind = "a discriminator" if is_discriminator else "a segmentation network"
        raise ConversionError(f"Layout {layout!r} describes {kind}, the target does not.")
    target_model = "" if is_discriminator else _target_model(target)
    if not is_discriminator:
        check_model(layout, target_model)
    partial = target_model in spec.also_fits  # Only the backbone has a counterpart.
    ignore_rules = spec.ignore + (spec.partial_ignore if partial else ())
    skip_rules = spec.skip + (spec.partial_skip if partial else ())
    names = [strip_module(k) for k in state_dict]
    if layout == "proda" and not partial:
        check_bn_clr(names, "bn_pretrain" in target["params"])
    if spec.variant == "robustnet":
        check_instance_norm(names, targets)
    stem_norms = {} if is_discriminator else model_stem_norms(targets)
    if layout == "simclr" and any(".mixing_conv." in n for n in names):
        raise ConversionError(
            "The SimCLRv2 file is a selective-kernel (sk1) ResNet: its blocks have no "
            "counterpart in jaxda's ResNet (ProDA uses r101_1x_sk0, without selective kernels)."
        )
    report = ConversionReport(layout=layout, container=container)
    for name in container_entries:
        report.ignored[name] = (
            PRODA_ENTRIES.get(name) if container == "proda" else None
        ) or f"{container} checkpoint entry (not network weights)"
    heads = dict(spec.heads)
    model_heads = {p[1] for p in targets if p[1].startswith("head_")}
    model_branches = {
        head: sum(1 for p in targets if p[1] == head and p[-1] == "kernel") for head in model_heads
    }

    entries: dict[tuple, _Entry] = {}
    for key, raw in state_dict.items():
        name = strip_module(key)
        reason = next((r for pattern, r in ignore_rules if re.fullmatch(pattern, name)), None)
        if reason is None and name.endswith("num_batches_tracked"):
            reason = _NUM_BATCHES_TRACKED
        if reason is not None:
            report.ignored[key] = reason
            continue
        reason = next((r for pattern, r in skip_rules if re.fullmatch(pattern, name)), None)
        if reason is not None:
            report.skipped[key] = reason
            continue
        if not name.startswith(spec.prefix):
            report.unexpected.append(key)
            continue
        name = name[len(spec.prefix) :]
        entry = _parse(key, name, spec, heads)
        if entry is None:
            report.unexpected.append(key)
            continue
        entry.value = np.asarray(raw)
        if entry.group == "backbone" and entry.path[2] in stem_norms:
            path = stem_instance_norm_path(entry.path, stem_norms)
            if path is None:
                report.skipped[key] = _replaced_stem_reason(entry.path[2], stem_norms)
                continue
            entry.path = path
        if entry.group.startswith("head_") and entry.group not in model_heads:
            report.skipped[key] = "the model has no aux head (config.model.multi_level=False)"
            continue
        if entry.path in entries:
            raise ConversionError(
                f"Keys {entries[entry.path].key!r} and {key!r} both map to {path_str(entry.path)}"
            )
        entries[entry.path] = entry

    if not is_discriminator:
        _check_depth(entries, targets)
    _check_shapes(entries, targets, spec, report, skip_head)
    _aspp(entries, model_branches, report, check_aspp and not skip_head)

    loaded = {}
    for path, entry in entries.items():
        if entry.group.startswith("head_") and entry.branch >= model_branches[entry.group]:
            report.skipped[entry.key] = (
                f"config.model.num_aspp_branches={model_branches[entry.group]}: the model "
                f"sums only branches 0..{model_branches[entry.group] - 1}"
            )
            continue
        if path not in targets:  # Only possible for names the model does not have.
            report.unexpected.append(entry.key)
            continue
        dtype = getattr(targets[path], "dtype", np.float32)
        # A copy: the arrays must not alias the caller's (e.g. a live torch model's) memory.
        loaded[path] = np.array(to_jax_layout(entry.value), dtype=dtype, order="C", copy=True)
        report.loaded[entry.key] = path_str(path)
    report.missing = [path_str(p) for p in targets if p not in loaded]
    report.unexpected = sorted(report.unexpected)
    for head in sorted(model_heads):
        if not any(p[1] == head for p in loaded):
            report.notes.append(
                f"{head} is not loaded from the file: it keeps its initialisation"
                + (
                    " (--config.model.multi_level=False builds the model without it)"
                    if head == "head_aux" and not skip_head
                    else ""
                )
            )
    if not loaded and report.unexpected:
        raise ConversionError(
            f"No tensor of the file matches layout {layout!r} ({len(report.unexpected)} keys "
            f"not understood, e.g. {report.unexpected[:4]}); pass the right --layout "
            f"(one of {sorted(LAYOUTS)})."
        )
    if target_model == "proda_deeplab_v2" and layout != "proda" and loaded:
        report.notes.append("the ProDA head is not in the file: it keeps its initialisation")
        if "bn_pretrain" in target["params"]:
            report.notes.append(
                "bn_pretrain is not in the file: it keeps its initialisation (as in ProDA's "
                "SimCLR / ImageNet inits)"
            )
        elif layout == "simclr":
            report.notes.append(
                "ProDA pairs the SimCLR init with --bn_clr (stages 2 and 3): "
                "--config.model.bn_clr=True adds its bn_pretrain"
            )
    if spec.model == "deeplabv3plus" and loaded:
        report.notes.append(
            "output stride, multi-grid and ASPP rates are not stored in the weights: the "
            "config's are used (config.model.output_stride / multi_grid / aspp_rates)"
        )
    if report.unexpected:
        report.notes.append(
            f"{len(report.unexpected)} key(s) were not understood in layout {layout!r} and were "
            "not loaded; pass --layout if the detected layout is wrong"
        )
    return loaded, report


def _replaced_stem_reason(bn: str, stem_norms: dict) -> str:
    kind = stem_norms[bn]
    what = "has no parameters" if kind == "plain" else "keeps no running statistics"
    return (
        f"the config's model replaces the stem's {bn} by an InstanceNorm "
        f"(config.model.instance_norm={kind!r}), which {what} (RobustNet drops them too)"
    )


def _parse(key: str, name: str, spec: Layout, heads: dict) -> _Entry | None:
    if spec.kind == "discriminator":
        m = re.fullmatch(r"(\w+)\.(weight|bias)", name)
        modules = dict(spec.modules)
        if not m or m[1] not in modules:
            return None
        leaf = "kernel" if m[2] == "weight" else "bias"
        return _Entry(key, ("params", modules[m[1]], leaf), None, "discriminator")
    found = None
    if spec.model == "deeplabv3plus":
        found = v3plus_path(name, spec.variant)
    elif spec.name == "proda":
        found = proda_path(name)
    if found is not None or spec.model == "deeplabv3plus":
        return None if found is None else _Entry(key, found[0], None, found[1])
    if spec.name == "simclr":
        name = simclr_to_torchvision(name)
    if m := re.fullmatch(r"(\w+)\.conv2d_list\.(\d+)\.(weight|bias)", name):
        if m[1] not in heads:
            return None
        head, branch = heads[m[1]], int(m[2])
        leaf = "kernel" if m[3] == "weight" else "bias"
        path = ("params", head, f"branch{branch}", leaf)
        return _Entry(key, path, None, head, module=m[1], branch=branch)
    path = backbone_path(name)
    return None if path is None else _Entry(key, path, None, "backbone")


def _has_deep_stem(paths) -> bool:
    return any(p[1:3] == ("backbone", "conv2") for p in paths)


def _check_depth(entries: dict, targets: dict) -> None:
    stem_in_file = any(p[1:3] == ("backbone", "conv1") for p in entries)
    if stem_in_file and _has_deep_stem(entries) != _has_deep_stem(targets):
        raise ConversionError(
            "The file's stem is "
            + (
                "RobustNet's ResNet3X3 (three 3x3 convs), the config's model has a 7x7 stem: "
                "set --config.model.deep_stem=True (a DeepLabV3+ option)."
                if _has_deep_stem(entries)
                else "a single 7x7 conv, the config's model has the three-conv deep stem: "
                "set --config.model.deep_stem=False."
            )
        )
    in_file, in_model = blocks(entries), blocks(targets)
    if in_file and in_file != in_model:

        def fmt(counts):
            return tuple(counts.get(layer, 0) for layer in range(1, 5))

        raise ConversionError(
            f"The file's backbone has {fmt(in_file)} blocks in layer1..layer4, the config's "
            f"model {fmt(in_model)}: set --config.model.depth (50: (3, 4, 6, 3), 101: "
            "(3, 4, 23, 3)) or --config.model.stage_sizes to match the file."
        )


def _is_head(group: str) -> bool:
    """DeepLabV2's head_*, DeepLabV3+'s aspp, decoder, head_aux, ProDA's head: all but the
    backbone (and ProDA's bn_pretrain, which normalises the backbone's output)."""
    return group not in ("backbone", "discriminator", "bn_pretrain")


def _check_shapes(entries, targets, spec, report, skip_head) -> None:
    """Shape mismatches raise; heads are skipped instead with --skip_head or in init files."""
    mismatched = collections.defaultdict(list)  # group -> [(key, file shape, model shape)]
    for path, entry in entries.items():
        if path in targets:
            expected = torch_shape(targets[path].shape)
            if tuple(entry.value.shape) != expected:
                mismatched[entry.group].append((entry.key, tuple(entry.value.shape), expected))
    for group in sorted({e.group for e in entries.values() if _is_head(e.group)}):
        reason = None
        if skip_head:
            reason = "--skip_head: the model's heads keep their initialisation"
        elif mismatched.get(group) and spec.skip_mismatched_heads:
            _, found, expected = mismatched[group][0]
            reason = (
                f"head shape {found} differs from the model's {expected} (e.g. {found[0]} vs "
                f"{expected[0]} classes): the head keeps its initialisation"
            )
        if reason:
            for path in [p for p, e in entries.items() if e.group == group]:
                report.skipped[entries.pop(path).key] = reason
            mismatched.pop(group, None)
    if mismatched:
        problems = [m for group in sorted(mismatched) for m in mismatched[group]]
        lines = "\n".join(
            f"  {key}: file {found}, model {expected}" for key, found, expected in problems[:10]
        )
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        heads_only = all(_is_head(g) for g in mismatched)
        hint = (
            "The heads differ (another class count?): pass --skip_head to load the backbone only "
            "and keep the heads at their initialisation, or set --config.num_classes."
            if heads_only
            else "The model differs from the file's: check --config.model.width / depth "
            "(or --config.discriminator.width and --config.num_classes for a discriminator)."
        )
        raise ConversionError(
            f"Shape mismatch (PyTorch layout [out, in, kh, kw]):\n{lines}{more}\n{hint}"
        )


def _aspp(entries, model_branches, report, check) -> None:
    per_module = collections.defaultdict(dict)
    for entry in entries.values():
        if entry.group.startswith("head_") and entry.branch >= 0:  # DeepLabV2 ASPP branches.
            weight_or_bias = 0 if entry.path[-1] == "kernel" else 1
            per_module[(entry.group, entry.module)].setdefault(entry.branch, [None, None])
            per_module[(entry.group, entry.module)][entry.branch][weight_or_bias] = entry.value
    if not per_module:
        return
    heads, found = {}, set()
    for (group, module), branches in sorted(per_module.items()):
        complete = {i: tuple(wb) for i, wb in branches.items() if wb[0] is not None}
        detected, stats = detect_aspp_branches(complete)
        heads[group] = {"module": module, "detected": detected, "branches": stats}
        if detected is not None:
            found.add(detected)
    configured = sorted(set(model_branches.values()))
    detected = found.pop() if len(found) == 1 else None
    if detected is None:
        summary = "the number of ASPP branches the heads were trained with cannot be told"
    elif detected == 2:
        summary = "2 branches trained (branches 2 and 3 still look like their N(0, 0.01) init)"
    else:
        summary = "4 branches trained"
    summary += f"; config.model.num_aspp_branches={configured[0] if configured else None}"
    report.aspp = {"detected": detected, "configured": configured, "heads": heads}
    report.aspp["summary"] = summary
    if check and detected is not None and configured and configured != [detected]:
        details = "; ".join(
            f"{h['module']}: "
            + ", ".join(
                f"branch {s['branch']} std {s['std']:.5f} mean {s['mean']:.2e}"
                for s in h["branches"]
            )
            for h in heads.values()
            if h["branches"]
        )
        raise ConversionError(
            f"The checkpoint's heads look trained with {detected} ASPP branches ({details}), but "
            f"config.model.num_aspp_branches={configured[0]}. Pass "
            f"--config.model.num_aspp_branches={detected} (AdaptSegNet and MaxSquare checkpoints: "
            "2, ADVENT and da-sac: 4), or --skip_aspp_check to convert anyway."
        )
