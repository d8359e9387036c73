"""Convert the published methods' PyTorch checkpoints (DeepLabV2, DeepLabV3+, MiT / SegFormer /
DAFormer, discriminators) into jaxda orbax checkpoints.

  python -m launch.convert --from=GTA2Cityscapes_multi-ed35151c.pth \
      --config=configs/adaptseg.py --out=/tmp/adaptseg_released

A segmentation checkpoint becomes `OUT/checkpoints/0/{model, meta}`, the layout a training run
writes: `model` holds the FULL variables of the config's network (params and BN statistics;
what the file does not provide keeps the initialisation a run of the config with `config.seed`
would draw), `meta` holds {'step': 0, 'model': config.model, 'converted_from', 'layout',
'report'}. So

  python -m launch.main --config=configs/adaptseg.py --workdir=OUT --mode=eval
  python -m launch.main --config=configs/adaptseg.py --workdir=NEW --config.init_from=OUT

evaluate it and train from it. (OUT is not a training workdir: it holds no optimizer state.)

ProDA `.pkl` files (layout `proda`) converted with a ProDA config (config.model.name
'proda_deeplab_v2'; `--config.model.bn_clr` for the stage 2 / 3 models, which have
`bn_pretrain`) load whole: backbone, head and `bn_pretrain`. Their class prototypes
(`ResNet101.objective_vectors`, [C, 256]) are written beside the checkpoint as

  OUT/prototypes.npy    float32 [num_classes, head_width]   (`PROTOTYPES_FILE`)

so that ProDA's stage 1 can start from the released warm-up model and its prototypes; the
report says so ("prototypes ... written to ..."). With a DeepLabV2 config only the backbone
loads and no prototypes are written. ProDA saves no EMA network: a method with a teacher
starts it as a copy of the converted student. SimCLRv2 inits (ProDA's `r101_1x_sk0.pth`,
layout `simclr`, or `torchvision` when detected) load the backbone only.

RobustNet files (layout `robustnet`) load with their normalisation family, which the config
must name (config.model.instance_norm / instance_norm_at; `norm_check.check_instance_norm` refuses
a file that differs, naming its keys): IBN ('affine') files' `layer0.1.{weight,bias}` (deep
stem: `layer0.7`) and `layerK.<last>.instance_norm_layer.{weight,bias}` load into the
InstanceNorms' scale and bias; IW / IRW / ISW ('plain') files have no key there (no stem BN
statistics either). RobustNet stores no whitening state in its checkpoints: ISW's mask lives in
`CovMatrix_ISW` Python objects, not in buffers, so a converted ISW model starts jaxda's mask
pass afresh (config.whitening); such tensors, if a file has them, are skipped with the reason.
Into an IN config, an ImageNet ResNet's stem `bn1` weight and bias load into an affine stem
InstanceNorm (as RobustNet's `forgiving_state_restore` does); the rest of that BN is skipped.

MiT files (layouts `mit`, `segformer`, `daformer`, `hrda`; `jaxda.interop.mit_layout`) load
into a 'segformer' config (`configs.common.use_mit`) of the same variant: an ImageNet
`mit_b5.pth` fills the encoder (its 1000-class `head.*` is skipped, the decoder keeps the
config's initialisation); NVlabs SegFormer and DAFormer checkpoints fill the decoder too.
HRDA / MIC(HRDA) training checkpoints (`work_dirs/<run>/iter_40000.pth`) load into an 'hrda'
config (config.model.name='hrda', jaxda.models.hrda): the student's encoder, DAFormer head and
scale attention; an ImageNet `mit_b5.pth` loads into it as into 'segformer'.

A discriminator checkpoint (AdaptSegNet or ADVENT layout) becomes `OUT/discriminator/` with the
orbax items `params` (FCDiscriminator params, as `FCDiscriminator.apply({'params': ...})` takes
them) and `meta` (JSON); `restore_discriminator` reads it back.

PyTorch is needed only here, imported when a file is read: pip install -e '.[torch]'.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import traverse_util

from jaxda import checkpoints, models
from jaxda.interop import layouts, mit_layout, torch_layouts
from jaxda.interop.layouts import ConversionError
from jaxda.interop.torch_layouts import ConversionReport

DISCRIMINATOR_SUBDIR = "discriminator"
PROTOTYPES_FILE = "prototypes.npy"

__all__ = [
    "ConversionError",
    "ConversionReport",
    "convert_discriminator",
    "convert_file",
    "convert_segmenter",
    "load_file",
    "proda_prototypes",
    "restore_discriminator",
]


def import_torch():
    """The torch module, or an ImportError that says how to install it."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            "Reading PyTorch checkpoints needs PyTorch, an optional dependency of jaxda: "
            "pip install -e '.[torch]'"
        ) from e
    return torch


def load_file(path: str):
    """The object pickled in a `.pth` / `.pkl` file (ProDA's `.pkl` is a torch pickle).

    `weights_only=False` because the released files hold more than tensors (epochs, scores,
    optimizer states); only load files you trust.
    """
    torch = import_torch()
    return torch.load(str(path), map_location="cpu", weights_only=False)


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # A torch.Tensor.
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()  # bfloat16 has no NumPy type.
        return value.numpy()
    return np.asarray(value)


def _numpy_state_dict(obj) -> tuple[dict, str, list]:
    state_dict, container, others = layouts.unwrap(obj)
    return {k: _to_numpy(v) for k, v in state_dict.items()}, container, others


@functools.cache
def _jitted_init(cpu: bool):
    """`module.init` jitted with the module static (so repeated conversions of one config reuse
    the compiled function), at XLA's lowest optimisation level on CPU, as
    `trainer.init_state`: the PRNG calls of every layer otherwise take long to compile (same
    random bits either way)."""
    options = {"xla_backend_optimization_level": 0} if cpu else None
    return jax.jit(
        lambda module, key, dummy: module.init(key, dummy),
        static_argnums=0,
        compiler_options=options,
    )


def _init(module, key, dummy) -> dict:
    return jax.device_get(_jitted_init(jax.default_backend() == "cpu")(module, key, dummy))


def init_segmenter(config: ml_collections.ConfigDict) -> dict:
    """The config's network, initialised as a training run of it would (`state.create`: the
    segmentation network's key of `models.network_keys`), as NumPy arrays."""
    model = models.build_segmenter(config.model, config.num_classes)
    model_key = models.network_keys(jax.random.key(config.seed))[0]
    return _init(model, model_key, jnp.zeros((1, *models.INIT_SIZE, 3), jnp.float32))


def init_discriminator(config: ml_collections.ConfigDict) -> dict:
    """FCDiscriminator({'width': config.discriminator.width}) params for num_classes inputs."""
    disc = models.build_discriminator(config.discriminator)
    key = jax.random.fold_in(models.network_keys(jax.random.key(config.seed))[1], 0)
    return _init(disc, key, jnp.zeros((1, *models.INIT_SIZE, config.num_classes), jnp.float32))


def _merge(initial: dict, loaded: dict) -> dict:
    flat = traverse_util.flatten_dict(initial)
    flat.update(loaded)
    return traverse_util.unflatten_dict(flat)


def convert_segmenter(
    obj,
    config: ml_collections.ConfigDict,
    *,
    layout: str | None = None,
    skip_head: bool = False,
    check_aspp: bool = True,
) -> tuple[dict, ConversionReport]:
    """(full network variables of `config`, report) from a loaded checkpoint object.

    Args:
      obj: what `load_file` returns (a container dict or a state dict; tensors or arrays).
      config: a jaxda config (its `model`, `num_classes` and `seed` are used).
      layout: a `layouts.LAYOUTS` name; None detects it.
      skip_head / check_aspp: see `torch_layouts.map_state_dict`.
    """
    state_dict, container, others = _numpy_state_dict(obj)
    layout = layout or layouts.detect_layout(list(state_dict), container)
    if layout in mit_layout.MIT_LAYOUTS or config.model.name in mit_layout.MODELS:
        return _convert_mit(state_dict, config, layout, container, others, skip_head)
    if layout in layouts.LAYOUTS:  # Before the (slow) init: a DeepLabV2 file for V3+ or back.
        layouts.check_model(layout, config.model.name, config.model.get("variant"))
        if layout == "proda" and config.model.name == layouts.PRODA_MODEL:
            layouts.check_bn_clr(list(state_dict), config.model.get("bn_clr", False))
    initial = init_segmenter(config)
    loaded, report = torch_layouts.map_state_dict(
        state_dict,
        initial,
        layout,
        container=container,
        container_entries=others,
        skip_head=skip_head,
        check_aspp=check_aspp,
    )
    if layouts.LAYOUTS[report.layout].kind != "segmenter":
        raise ConversionError(f"Layout {report.layout!r} is a discriminator's")
    return _merge(initial, loaded), report


def _convert_mit(state_dict, config, layout, container, others, skip_head):
    """`convert_segmenter` for MiT / SegFormer / DAFormer / HRDA files (`mit_layout`). The file
    is mapped onto the model's shapes first, so that a mismatch is refused before the (slow)
    init."""
    layouts.check_model(layout, config.model.name)
    if layout not in mit_layout.MIT_LAYOUTS:
        raise ConversionError(
            f"The config's model is SegFormer / DAFormer / HRDA (config.model.name="
            f"{config.model.name!r}), which loads only the MiT layouts "
            f"{list(mit_layout.MIT_LAYOUTS)}; the file's layout is {layout!r}."
        )
    model = models.build_segmenter(config.model, config.num_classes)
    loaded, report = mit_layout.map_state_dict(
        state_dict,
        models.abstract_variables(model),
        layout,
        decoder=config.model.decoder,
        container=container,
        container_entries=others,
        skip_head=skip_head,
    )
    if not report.missing:  # The file fills every variable: no init to compile (seconds on
        # CPU for a tiny model, about a minute for MiT-B5).
        return traverse_util.unflatten_dict(loaded), report
    return _merge(init_segmenter(config), loaded), report


def convert_discriminator(
    obj, config: ml_collections.ConfigDict, *, layout: str | None = None
) -> tuple[dict, ConversionReport]:
    """(FCDiscriminator params of `config.discriminator`, report) from a loaded checkpoint."""
    state_dict, container, others = _numpy_state_dict(obj)
    initial = init_discriminator(config)
    loaded, report = torch_layouts.map_state_dict(
        state_dict, initial, layout, container=container, container_entries=others
    )
    return _merge(initial, loaded)["params"], report


def proda_prototypes(obj) -> np.ndarray | None:
    """ProDA's class prototypes (`obj['ResNet101']['objective_vectors']`, float32 [C, 256]) of a
    loaded ProDA `.pkl`, or None when the file has none."""
    resnet = obj.get("ResNet101") if isinstance(obj, dict) else None
    vectors = resnet.get("objective_vectors") if isinstance(resnet, dict) else None
    if vectors is None:
        return None
    return np.asarray(_to_numpy(vectors), dtype=np.float32)


def _write_prototypes(obj, config, out: epath.Path, report: ConversionReport) -> None:
    """Writes `out/prototypes.npy` for a ProDA file whose head was loaded into ProDA's network;
    otherwise says in the report why they are not written."""
    key = "ResNet101.objective_vectors"
    prototypes = proda_prototypes(obj)
    if prototypes is None or key not in report.ignored:
        return
    head_loaded = any(p.startswith("params/head/") for p in report.loaded.values())
    expected = (config.num_classes, config.model.get("head_width", 256))
    if config.model.name != layouts.PRODA_MODEL or not head_loaded:
        report.ignored[key] = (
            "ProDA's class prototypes: not written, they describe ProDA's head, which this "
            "conversion did not load (convert with config.model.name='proda_deeplab_v2')"
        )
        return
    if prototypes.shape != expected:
        report.ignored[key] = (
            f"ProDA's class prototypes: not written, shape {prototypes.shape} differs from "
            f"[num_classes, head_width] = {list(expected)}"
        )
        return
    out.mkdir(parents=True, exist_ok=True)
    with (out / PROTOTYPES_FILE).open("wb") as f:
        np.save(f, prototypes)
    del report.ignored[key]
    report.prototypes = str(out / PROTOTYPES_FILE)


def _refuse_existing(path: epath.Path) -> None:
    if path.exists() and any(path.iterdir()):
        raise ConversionError(f"{path} already exists and is not empty; choose another --out.")


def convert_file(
    path: str,
    config: ml_collections.ConfigDict,
    out: str,
    *,
    layout: str | None = None,
    skip_head: bool = False,
    check_aspp: bool = True,
) -> ConversionReport:
    """Converts one PyTorch checkpoint file and writes it under `out` (see the module doc)."""
    obj = load_file(path)
    state_dict, container, _ = layouts.unwrap(obj)
    layout = layout or layouts.detect_layout(list(state_dict), container)
    out = epath.Path(out)
    meta = {
        "converted_from": str(path),
        "layout": layout,
        "num_classes": config.num_classes,
    }
    if layouts.LAYOUTS[layout].kind == "discriminator":
        _refuse_existing(out / DISCRIMINATOR_SUBDIR)
        params, report = convert_discriminator(obj, config, layout=layout)
        report.source = str(path)
        meta |= {"discriminator": config.discriminator.to_dict(), "report": report.to_dict()}
        save_discriminator(out, params, meta)
        logging.info("Wrote the discriminator to %s", out / DISCRIMINATOR_SUBDIR)
        return report
    _refuse_existing(out / checkpoints.CHECKPOINT_SUBDIR)
    variables, report = convert_segmenter(
        obj, config, layout=layout, skip_head=skip_head, check_aspp=check_aspp
    )
    report.source = str(path)
    if container == "proda":
        _write_prototypes(obj, config, out, report)
    meta |= {"model": checkpoints.model_meta(config.model), "report": report.to_dict()}
    checkpointer = checkpoints.Checkpointer(str(out), keep=1)
    checkpointer.save(0, {"model": jax.tree.map(jnp.asarray, variables)}, meta)
    checkpointer.wait()
    checkpointer.close()
    logging.info("Wrote the segmentation network to %s", checkpoints.find_step_dir(str(out)))
    return report


def save_discriminator(out: str, params: dict, meta: dict) -> None:
    """Writes `out/discriminator/{params, meta}`."""
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(
            epath.Path(out) / DISCRIMINATOR_SUBDIR,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(jax.tree.map(jnp.asarray, params)),
                meta=ocp.args.JsonSave(meta),
            ),
        )


def restore_discriminator(out: str, config: ml_collections.ConfigDict) -> tuple[dict, dict]:
    """(FCDiscriminator params, meta) written by `convert_file` under `out`."""
    disc = models.build_discriminator(config.discriminator)
    abstract = models.abstract_variables(disc, config.num_classes)["params"]
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        restored = ckptr.restore(
            epath.Path(out) / DISCRIMINATOR_SUBDIR,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
    return restored["params"], restored["meta"]
