"""Multi-host training: `jax.distributed` set up from command-line flags, before JAX computes.

  # The same command on every host, with that host's --process_id:
  python -m launch.main --config=... --workdir=SHARED_DIR \
      --coordinator_address=HOST0:PORT --num_processes=N --process_id=I
  # Under SLURM, Open MPI or on a TPU pod, JAX finds all three by itself:
  srun python -m launch.main --config=... --workdir=SHARED_DIR --distributed

Without these flags a run is one process, as before. Each process then feeds its own devices
with its slice of every global batch (`jaxda.data.input_pipeline`), all processes write and
read the orbax checkpoints together, and only process 0 writes results, events and datasets.
Like `jaxda.cli`, this module imports JAX only when it initialises it.
"""

import sys

from absl import flags, logging

# Flags naming the processes; without --distributed they must all be given.
_EXPLICIT = ("coordinator_address", "num_processes", "process_id")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines the flags of this module's docstring (once; later calls do nothing)."""
    if "distributed" in flag_values:
        return
    # Registered under the main module, so --helpshort lists them with the command's own flags.
    module = sys.argv[0]
    flags.DEFINE_bool(
        "distributed",
        False,
        "Multi-host run; JAX detects the coordinator, process count and this process's id "
        "(SLURM, Open MPI, TPU pods). Explicit --coordinator_address / --num_processes / "
        "--process_id override what it detects.",
        flag_values=flag_values,
        module_name=module,
    )
    flags.DEFINE_string(
        "coordinator_address",
        None,
        "Multi-host run: HOST:PORT of process 0, where it serves the coordinator (the same on "
        "every host).",
        flag_values=flag_values,
        module_name=module,
    )
    flags.DEFINE_integer(
        "num_processes",
        None,
        "Multi-host run: the number of processes (usually one per host).",
        lower_bound=1,
        flag_values=flag_values,
        module_name=module,
    )
    flags.DEFINE_integer(
        "process_id",
        None,
        "Multi-host run: this process's id, 0 .. num_processes - 1 (0 writes the files).",
        lower_bound=0,
        flag_values=flag_values,
        module_name=module,
    )
    flags.DEFINE_list(
        "local_device_ids",
        None,
        "Multi-host run: the ids of this process's local accelerators (default: all).",
        flag_values=flag_values,
        module_name=module,
    )
    flags.DEFINE_integer(
        "distributed_init_timeout",
        300,
        "Multi-host run: seconds to wait for every process to join.",
        lower_bound=1,
        flag_values=flag_values,
        module_name=module,
    )
    flags.DEFINE_integer(
        "distributed_heartbeat_timeout",
        100,
        "Multi-host run: seconds without a heartbeat after which a process counts as dead and "
        "the others stop.",
        lower_bound=1,
        flag_values=flag_values,
        module_name=module,
    )
    flags.register_multi_flags_validator(
        ["distributed", *_EXPLICIT, "local_device_ids"], _raising_check, flag_values=flag_values
    )


def _check(values: dict) -> str | None:
    """What is wrong with the distributed flags in `values`, or None."""
    given = [name for name in _EXPLICIT if values.get(name) is not None]
    if not values.get("distributed") and given and len(given) < len(_EXPLICIT):
        missing = [name for name in _EXPLICIT if name not in given]
        return (
            f"{', '.join('--' + n for n in given)} also need{'s' * (len(given) == 1)} "
            f"{' and '.join('--' + n for n in missing)} (or pass --distributed to let JAX "
            "detect the rest under SLURM, Open MPI or on a TPU pod)"
        )
    if values.get("local_device_ids") and not (given or values.get("distributed")):
        return (
            "--local_device_ids is for multi-host runs: pass it with --distributed or with "
            "--coordinator_address, --num_processes and --process_id"
        )
    ids = values.get("local_device_ids") or []
    if not all(i.strip().isdigit() for i in ids):
        return f"--local_device_ids={','.join(ids)} must be device numbers, e.g. 0,1,2,3"
    count, index = values.get("num_processes"), values.get("process_id")
    if count is not None and index is not None and not 0 <= index < count:
        return f"--process_id={index} must be in 0 .. --num_processes - 1 = {count - 1}"
    address = values.get("coordinator_address")
    if address is not None and not address.rpartition(":")[2].isdigit():
        return f"--coordinator_address={address} must be HOST:PORT"
    return None


def _raising_check(values: dict) -> bool:
    """absl's validator: raising gives the message of `_check` instead of a fixed one."""
    message = _check(values)
    if message is not None:
        raise flags.ValidationError(message)
    return True


def requested(flag_values: flags.FlagValues = flags.FLAGS) -> bool:
    """Whether the command line asks for a multi-host run."""
    return bool(flag_values.distributed) or any(
        flag_values[name].value is not None for name in _EXPLICIT
    )


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids=None,
    *,
    init_timeout: int = 300,
    heartbeat_timeout: int = 100,
) -> None:
    """`jax.distributed.initialize`; None arguments are detected by JAX (SLURM, Open MPI, ...).

    Call it before anything uses a JAX backend (`jax.devices()`, a computation).
    """
    import jax

    # CPU processes all-reduce through gloo (JAX 0.10's default); with 'none' (e.g. set in the
    # environment) the first cross-process reduction would fail. A deliberate 'mpi' is kept.
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    ids = None if local_device_ids is None else [int(i) for i in local_device_ids]
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            local_device_ids=ids,
            initialization_timeout=init_timeout,
            heartbeat_timeout_seconds=heartbeat_timeout,
        )
    except ValueError as error:  # JAX found no cluster to take what was not given from.
        raise ValueError(
            f"Multi-host run: {error} No cluster environment JAX knows (SLURM, Open MPI, TPU "
            "pod) was detected; pass --coordinator_address=HOST:PORT --num_processes=N "
            "--process_id=I on every host."
        ) from None


def initialize_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Initialises `jax.distributed` when the flags ask for it; logs this process's devices."""
    import jax

    if requested(flag_values):
        f = flag_values
        initialize(
            f.coordinator_address,
            f.num_processes,
            f.process_id,
            f.local_device_ids or None,
            init_timeout=f.distributed_init_timeout,
            heartbeat_timeout=f.distributed_heartbeat_timeout,
        )
    logging.info(
        "JAX devices: process %d of %d, local devices %s, global devices %d",
        jax.process_index(),
        jax.process_count(),
        jax.local_devices(),
        jax.device_count(),
    )
