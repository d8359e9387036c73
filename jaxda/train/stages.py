"""Multi-stage methods: a sequence of training stages and offline passes, one command.

A config with stages has `stage_order` (names, in order) and `stages` ({name: overrides}):
each stage runs the config with its overrides applied, in `workdir/<name>/`. An override
value 'stage:NAME' (anywhere, e.g. `init.seg` or `init_from`) is that stage's directory, so a
stage reads the previous stage's checkpoint or offline outputs. A stage whose overrides set
`offline` ('predictions', ...) is an offline pass (`offline.PASSES`) instead of a training.

`run` runs every stage in order, skips finished ones (a training stage whose results.json
exists, an offline pass whose manifest exists) and resumes the interrupted one inside (its
own checkpoints / chunks); `config.stage = NAME` (`:stage=NAME`) runs that stage alone.
"""

import json
import os

import ml_collections
from absl import logging

from jaxda.data import classes
from jaxda.evaluation import evaluator as evaluator_lib
from jaxda.train import offline, trainer

STAGE_PREFIX = "stage:"


def _resolve(value, workdir: str):
    if isinstance(value, str) and value.startswith(STAGE_PREFIX):
        return os.path.join(workdir, value[len(STAGE_PREFIX) :])
    if isinstance(value, list | tuple):
        return type(value)(_resolve(v, workdir) for v in value)
    return value


def _apply(target: ml_collections.ConfigDict, overrides, workdir: str, where: str) -> None:
    free_form = not target  # An empty block (config.init) takes any keys.
    for key, value in overrides.items():
        if key not in target and not free_form:
            raise ValueError(f"{where}.{key} is not a config key; known: {sorted(target)}")
        if isinstance(value, ml_collections.ConfigDict | dict) and isinstance(
            target.get(key), ml_collections.ConfigDict
        ):
            _apply(target[key], value, workdir, f"{where}.{key}")
        else:
            target[key] = _resolve(value, workdir)


def stage_config(
    config: ml_collections.ConfigDict, name: str, workdir: str
) -> ml_collections.ConfigDict:
    """The config of stage `name`: `config` with `config.stages[name]` applied, no stages."""
    if name not in config.stage_order:
        raise ValueError(f"Unknown stage {name!r} (config.stage); stages: {config.stage_order}")
    result = ml_collections.ConfigDict(config.to_dict())
    overrides = config.stages[name]
    with result.unlocked():
        result.stages, result.stage_order, result.stage = {}, (), ""
        _apply(result, overrides, workdir, f"config.stages.{name}")
        if config.get("stage") == name and config.get("init_from"):
            _user_init_wins(result, config.init_from, overrides)
    return result


def _user_init_wins(result: ml_collections.ConfigDict, path: str, overrides) -> None:
    """A stage run alone (`:stage=NAME`) with a top-level `--config.init_from=PATH`: PATH
    replaces the stage's own previous-stage reference ('stage:...') for the network 'seg', so
    a stage can start from a run in another workdir (e.g. DA-SAC's SAC from an ABN run)."""
    own = overrides.get("init_from") or (overrides.get("init") or {}).get("seg")
    if not (isinstance(own, str) and own.startswith(STAGE_PREFIX)):
        return
    if "seg" in result.get("init", {}):
        del result.init["seg"]
    result.init_from = path


def _is_offline(config: ml_collections.ConfigDict) -> bool:
    return bool(config.get("offline") and config.offline.get("pass"))


def is_finished(config: ml_collections.ConfigDict, stage_dir: str) -> bool:
    if _is_offline(config):
        return offline.read_manifest(stage_dir) is not None
    return os.path.exists(os.path.join(stage_dir, evaluator_lib.RESULTS_FILE))


def run_stage(config: ml_collections.ConfigDict, stage_dir: str):
    if _is_offline(config):
        name = config.offline.get("pass")
        if name not in offline.PASSES:
            raise ValueError(f"config.offline.pass={name!r}; available: {sorted(offline.PASSES)}")
        return {"offline": offline.PASSES[name](config, stage_dir)}
    return trainer.train_and_evaluate(config, stage_dir)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs `config` (all its stages, or `config.stage` alone); returns the last summary."""
    if not config.get("stage_order"):
        return trainer.train_and_evaluate(classes.resolve(config), workdir)
    names = [config.stage] if config.get("stage") else list(config.stage_order)
    summary = {}
    for name in names:
        stage = classes.resolve(stage_config(config, name, workdir))
        stage_dir = os.path.join(workdir, name)
        if is_finished(stage, stage_dir) and not config.get("stage"):
            logging.info("Stage %s is finished (%s); skipping it.", name, stage_dir)
            continue
        logging.info("Stage %s in %s", name, stage_dir)
        summary = run_stage(stage, stage_dir)
    return summary


def for_checkpoint(config: ml_collections.ConfigDict, workdir: str):
    """(config, workdir) whose checkpoint --mode=eval / predict read: `config.stage`, else the
    last training stage; a config without stages is returned as it is. Its class set follows
    the prepared datasets, else the one the training run saved (`_saved_config`)."""
    if not config.get("stage_order"):
        return _resolve_classes(config, workdir), workdir
    names = [config.stage] if config.get("stage") else list(config.stage_order)
    for name in reversed(names):
        stage = stage_config(config, name, workdir)
        if not _is_offline(stage):
            stage_dir = os.path.join(workdir, name)
            return _resolve_classes(stage, stage_dir), stage_dir
    raise ValueError(f"Stage(s) {names} hold no network to evaluate (offline passes only)")


def _resolve_classes(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """`classes.resolve` for evaluation and prediction: unprepared datasets are skipped and the
    training run's saved config (workdir/config.json) names the classes when none is left."""
    path = os.path.join(workdir, "config.json")
    saved = None
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
    return classes.resolve(config, missing_ok=True, fallback=saved)
