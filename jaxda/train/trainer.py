"""The training loop shared by every method, generic over what the method declares
(`spec.Method`: networks, teacher slots, extra state, streams, evaluated network).

Order of events at start: 1. if the workdir holds a checkpoint, resume from the newest intact
one (state, step and input-pipeline position); 2. else initialise every network, then load
those with a source in `config.init` / `config.init_from` (`initialization`); 3. train.

The host never waits for the devices between steps: metrics stay on the devices until a
log, checkpoint or evaluation step fetches them, and the next batch is transferred while the
current step runs. Every metric is checked for NaN/inf before each checkpoint, so no
non-finite state is ever saved.
"""

import collections
import dataclasses
import functools
import itertools
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, periodic_actions

from jaxda import checkpoints, models
from jaxda import mesh as mesh_lib
from jaxda.data import input_pipeline
from jaxda.evaluation import evaluator as evaluator_lib
from jaxda.train import initialization, methods, offline, optimizers, reporting, spec
from jaxda.train import state as state_lib

RESULTS_FILE = evaluator_lib.RESULTS_FILE


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; training stopped before saving anything after it."""


def _is_step(step: int, every: int, total: int) -> bool:
    return step == total or (every > 0 and step % every == 0)


def _check_finite(window: list[tuple[int, dict]], last_checkpoint: int | None) -> None:
    for step, metrics in window:
        bad = {k: float(v) for k, v in metrics.items() if not np.all(np.isfinite(v))}
        if bad:
            where = (
                f"the last checkpoint (step {last_checkpoint}) is intact"
                if last_checkpoint is not None
                else "no checkpoint had been written yet"
            )
            raise NonFiniteLossError(
                f"Non-finite loss at step {step}: {bad}. Training stopped and nothing from this "
                f"step on was saved; {where}. Lower the learning rate or the adversarial "
                "weights, check the input data, then rerun the same command to resume."
            )


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a config builds: networks, method, optimizer and the abstract (shape-only) state."""

    networks: dict[str, spec.Network]
    method: spec.Method
    tx: optax.GradientTransformation
    init_fn: Callable[[jax.Array], state_lib.TrainState]
    abstract_state: state_lib.TrainState  # ShapeDtypeStructs, replicated over the mesh.

    @property
    def modules(self) -> dict[str, Any]:
        return {name: network.module for name, network in self.networks.items()}

    @property
    def model(self):
        """The module of the evaluated network (the segmentation network's architecture)."""
        return self.networks[self.method.eval_network].module

    @property
    def discriminator(self):
        return next((n.module for k, n in self.networks.items() if k.startswith("disc/")), None)

    def checkpoint_items(self, state) -> dict:
        return state.checkpoint_items(self.method.eval_network)

    def from_checkpoint_items(self, items: dict) -> state_lib.TrainState:
        teacher = self.networks[self.method.eval_network].is_teacher
        return state_lib.TrainState.from_checkpoint_items(
            items, self.method.eval_network, teacher=teacher
        )


def create_state(
    rng: jax.Array, *, networks: dict[str, spec.Network], tx, extra: dict
) -> state_lib.TrainState:
    """Initialises every network and the optimizer state from one typed key.

    The keys are split as before networks were declared, so results do not change: the
    segmentation network 'seg' uses the first of three keys, the other randomly initialised
    networks the second folded with their position, the loop the third.
    """
    seg_key, other_key, loop_key = models.network_keys(rng)
    variables, others = {}, 0
    for name, network in networks.items():
        if network.init.startswith(initialization.COPY_PREFIX):
            continue
        key = seg_key if name == "seg" else jax.random.fold_in(other_key, others)
        others += name != "seg"
        dummy = jax.numpy.zeros((1, *models.INIT_SIZE, network.input_channels), jax.numpy.float32)
        variables[name] = network.module.init(key, dummy)
    for name, network in networks.items():
        if network.init.startswith(initialization.COPY_PREFIX):
            variables[name] = variables[network.init[len(initialization.COPY_PREFIX) :]]
    trained = {n: v for n, v in variables.items() if not networks[n].is_teacher}
    params = state_lib.nest({n: v["params"] for n, v in trained.items()})
    collections = {n: {k: c for k, c in v.items() if k != "params"} for n, v in trained.items()}
    model_state = state_lib.nest({n: c for n, c in collections.items() if c})
    return state_lib.TrainState(
        step=jax.numpy.zeros((), jax.numpy.int32),
        params=params,
        model_state=model_state,
        teachers={n: v for n, v in variables.items() if networks[n].is_teacher},
        extra=extra,
        opt_state=tx.init(params),
        rng=jax.random.key_data(loop_key),
    )


def build(config: ml_collections.ConfigDict, mesh) -> Setup:
    """Builds the networks, method and optimizer of `config` for `mesh`."""
    method = methods.get(config.method)
    networks = method.networks(config)
    extra_fn = functools.partial(method.init_extra, config)

    def params_of(rng):
        return create_state(rng, networks=networks, tx=optax.identity(), extra={}).params

    key = jax.random.key(config.seed)
    tx = optimizers.make_optimizer(config, networks, jax.eval_shape(params_of, key))
    init_fn = lambda rng: create_state(rng, networks=networks, tx=tx, extra=extra_fn())  # noqa: E731
    abstract = mesh_lib.replicate_abstract(jax.eval_shape(init_fn, key), mesh)
    return Setup(networks, method, tx, init_fn, abstract)


def init_state(config: ml_collections.ConfigDict, setup: Setup) -> state_lib.TrainState:
    """A fresh state from `config.seed`, replicated over the mesh of `setup.abstract_state`."""
    key = jax.random.key(config.seed)
    shardings = jax.tree.map(lambda x: x.sharding, setup.abstract_state)
    init = jax.jit(setup.init_fn, out_shardings=shardings)
    # Initialisation runs once: XLA:CPU's default optimisation makes compiling the PRNG calls
    # of every layer take ~10 s, level 0 takes ~2 s (same random bits, negligible run time).
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    return init.lower(key).compile(compiler_options=options)(key)


def jit_train_step(config: ml_collections.ConfigDict, setup: Setup):
    """The method's step as `jax.jit((state, batch) -> (state, metrics))`, state donated.

    The batch is a pytree of global arrays sharded over the mesh's 'data' axis; the state
    stays replicated and the metrics come back replicated.
    """
    shardings = jax.tree.map(lambda x: x.sharding, setup.abstract_state)
    replicated = jax.tree.leaves(shardings)[0]
    step = functools.partial(
        setup.method.train_step, networks=setup.modules, tx=setup.tx, config=config
    )
    return jax.jit(step, donate_argnums=(0,), out_shardings=(shardings, replicated))


def _initial_state(config, setup: Setup, checkpointer):
    """(state, checkpoint meta): resumed from the newest intact checkpoint, else fresh."""
    model_meta = checkpoints.model_meta(config.model)
    abstract_items = setup.checkpoint_items(setup.abstract_state)
    restored = checkpointer.restore_latest_intact(abstract_items, model_meta)
    if restored is not None:
        step, items, meta = restored
        logging.info("Resuming from step %d (%s)", step, checkpointer.directory)
        return setup.from_checkpoint_items(items), meta
    state, sources = initialization.initialize(init_state(config, setup), config, setup.networks)
    return state, {"init": sources} if sources else {}


def stream_batch_size(config, domain: str) -> int:
    """Examples per step of training stream config.data.<domain>: its own `batch_size` when
    set (DA-SAC: 8 source images, 2 target images of 4 views each), else config.batch_size.
    (A test-time method's 'eval' stream steps by config.batch_size.)"""
    if domain == "eval":
        return config.batch_size
    return config.data[domain].get("batch_size") or config.batch_size


def _check_stream_batches(config, domains, mesh) -> None:
    """Every stream's rows per step (images; views for a stream with `group`) must split
    evenly over the devices."""
    for domain in domains:
        rows = stream_batch_size(config, domain)
        group = config.data[domain].get("group") or {}
        rows *= group.get("size", 1)
        mesh_lib.check_batch_size(rows, mesh, f"data.{domain}.batch_size (x views)")


def _streams(config, method: spec.Method, readers: dict, start_step: int) -> Iterator[dict]:
    """Host batches {domain: {...}} from step `start_step` on."""
    if method.test_time:
        _, batches = input_pipeline.eval_iterator(
            readers["eval"], config.data.eval, config.data, global_batch_size=config.batch_size
        )
        return ({"eval": b} for b in itertools.islice(batches, start_step, None))
    artifacts = {
        d: offline.load(config.data[d].artifacts)
        for d in method.domains
        if config.data[d].get("artifacts")
    }
    streams = {
        domain: input_pipeline.train_iterator(
            readers[domain],
            config.data[domain],
            config.data,
            global_batch_size=stream_batch_size(config, domain),
            seed=(config.seed, stream),
            start=start_step * stream_batch_size(config, domain),
        )
        for stream, domain in enumerate(method.domains)
    }

    def batch(domain: str) -> dict:
        examples = next(streams[domain])
        for name, values in artifacts.get(domain, {}).items():
            examples[name] = np.asarray(values[examples["index"]])
        return examples

    return ({d: batch(d) for d in streams} for _ in itertools.count())


def _total_steps(config, method: spec.Method, readers: dict) -> int:
    if method.test_time:  # One step per evaluation batch.
        return -(-len(readers["eval"]) // config.batch_size)
    return config.total_steps


def _check_positions(meta: dict, config, domains, start_step: int) -> None:
    for domain, saved in meta.get("data_position", {}).items():
        if domain not in domains:
            continue
        expected = start_step * stream_batch_size(config, domain)
        if saved != expected:
            raise checkpoints.CheckpointMismatchError(
                f"Checkpoint of step {start_step} recorded {domain} stream position {saved}, but "
                f"step x batch size = {expected}: config.batch_size (or data.{domain}."
                "batch_size) changed since it was written. Resume with the original batch "
                "size or use a new workdir."
            )


def _evaluating(config: ml_collections.ConfigDict, stream) -> ml_collections.ConfigDict:
    """`config` with config.data.eval replaced by another evaluation stream."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.data.eval = stream
    return config


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains `config.method`, evaluating and checkpointing periodically; returns the summary."""
    is_writer = jax.process_index() == 0  # Only process 0 writes files.
    os.makedirs(workdir, exist_ok=True)
    mesh = mesh_lib.make_mesh(config.num_devices or None)
    mesh_lib.check_batch_size(config.batch_size, mesh)
    setup = build(config, mesh)
    method = setup.method
    domains = ("eval",) if method.test_time else method.domains
    if not method.test_time:
        _check_stream_batches(config, domains, mesh)
    # Open every dataset before the expensive initialisation, so missing data fails at once.
    readers = {d: input_pipeline.open_reader(config.data[d], config.data) for d in domains}
    evaluator = evaluator_lib.Evaluator(setup.model, config, mesh)
    # Periodic evaluations run on config.data.selection when set (DA-SAC's val2); the final
    # step is then scored once on config.data.eval.
    selection = config.data.get("selection")
    periodic = evaluator
    if selection and not method.test_time:
        periodic = evaluator_lib.Evaluator(setup.model, _evaluating(config, selection), mesh)
    total_steps = _total_steps(config, method, readers)
    checkpointer = checkpoints.Checkpointer(workdir, keep=config.keep_checkpoints)
    state, meta = _initial_state(config, setup, checkpointer)
    start_step = int(state.step)
    _check_positions(meta, config, domains, start_step)
    if is_writer:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))

    starting = None
    if method.test_time:  # The network adapted from, scored as the protocol scores it.
        starting = reporting.starting_results(workdir, evaluator, state, method, meta, is_writer)
    train_step = jit_train_step(config, setup)
    writer = metric_writers.create_default_writer(
        workdir, just_logging=not is_writer, asynchronous=True
    )
    report = periodic_actions.ReportProgress(
        num_train_steps=total_steps, writer=writer, every_steps=config.log_every_steps
    )
    learning_rate = optimizers.schedule(config)
    history = [r for r in reporting.load_eval_history(workdir) if r["step"] <= start_step]
    last_checkpoint = checkpointer.latest_step()
    pending = []  # (step, metrics still on the devices) since the last fetch.
    window = collections.defaultdict(list)
    for group, params in setup.abstract_state.params.items():
        count = sum(x.size for x in jax.tree.leaves(params))
        logging.info("Parameters of %s: %s", group, f"{count:,}")
    logging.info(
        "Training %s from step %d to %d on %d device(s), global batch %d",
        config.method, start_step, total_steps, mesh.size, config.batch_size,
    )  # fmt: skip
    batches = mesh_lib.prefetch_to_mesh(_streams(config, method, readers, start_step), mesh)
    try:
        for step in range(start_step + 1, total_steps + 1):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, metrics = train_step(state, next(batches))
            pending.append((step, metrics))
            report(step)
            changed = None
            if method.after_step is not None:
                changed = method.after_step(
                    state, step, config=config, modules=setup.modules, mesh=mesh
                )
            if changed is not None:
                state, scalars = changed
                writer.write_scalars(step, scalars)
                logging.info("step %d: %s", step, scalars)
            log = _is_step(step, config.log_every_steps, total_steps)
            save = changed is not None or _is_step(step, config.checkpoint_every_steps, total_steps)
            evaluate = _is_step(step, config.eval_every_steps, total_steps)
            if not (log or save or evaluate):
                continue
            fetched = jax.device_get(pending)
            pending.clear()
            _check_finite(fetched, last_checkpoint)
            for _, values in fetched:
                for key, value in values.items():
                    if np.ndim(value) == 0:
                        window[key].append(float(value))
            if log:
                scalars = {f"train/{k}": float(np.mean(v)) for k, v in window.items()}
                scalars["train/learning_rate"] = float(learning_rate(step - 1))
                writer.write_scalars(step, scalars)
                logging.info(
                    "step %d: %s", step, ", ".join(f"{k[6:]}={v:.4g}" for k, v in scalars.items())
                )
                window.clear()
            if save:
                meta = {
                    "data_position": {d: step * stream_batch_size(config, d) for d in domains},
                    "model": checkpoints.model_meta(config.model),
                    "method": config.method,
                }
                checkpointer.save(step, setup.checkpoint_items(state), meta)
                last_checkpoint = step
            if evaluate and not method.test_time:
                history.append(reporting.evaluate(periodic, writer, state, method, step, workdir))
    finally:
        checkpointer.wait()
        checkpointer.close()
        writer.flush()

    if method.test_time:
        summary = reporting.online_summary(config, evaluator, state, method, total_steps, starting)
    else:
        if not history or history[-1]["step"] != total_steps:
            # Resumed after the last step had already been trained: evaluate it again.
            step = int(state.step)
            history.append(reporting.evaluate(periodic, writer, state, method, step, workdir))
        final = None
        if periodic is not evaluator:
            final = reporting.final_results(evaluator, writer, state, method, workdir)
        summary = {"method": config.method, **reporting.summarize_run(history, total_steps, final)}
    writer.close()
    if is_writer:
        evaluator_lib.write_results(summary, os.path.join(workdir, RESULTS_FILE))
    reporting.print_summary(summary)
    return summary
