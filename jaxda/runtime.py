"""Process-wide settings of a run's config, applied once before JAX starts its backends.

`apply(config)` is what `launch.main` calls; code that drives `jaxda.train` directly calls it
too (before the first JAX computation) to get the same numerics:

* config.deterministic_gpu_ops: GPU reductions in a fixed order (XLA flag
  --xla_gpu_deterministic_ops), so the same run twice gives the same numbers there too; CPU
  and TPU are deterministic anyway.
* config.cpu_memory_scheduler: XLA:CPU orders the operations of a step to keep fewer
  buffers alive at once (XLA flag --xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED):
  less peak memory, a somewhat slower step (`benchmarks/speed_benchmark.py` measures both).
  Ignored by GPU and TPU backends.
* config.matmul_precision: the precision of float32 matrix products and convolutions
  (`jax_default_matmul_precision`); 'default' is XLA's choice per backend.
"""

import os

import jax
import ml_collections

CPU_MEMORY_SCHEDULER_FLAG = "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"
DETERMINISTIC_GPU_FLAG = "--xla_gpu_deterministic_ops=true"


def xla_flags(config: ml_collections.ConfigDict) -> list[str]:
    """The XLA flags the config asks for (to add to $XLA_FLAGS before JAX starts)."""
    wanted = []
    if config.get("deterministic_gpu_ops", False):
        wanted.append(DETERMINISTIC_GPU_FLAG)
    if config.get("cpu_memory_scheduler", False):
        wanted.append(CPU_MEMORY_SCHEDULER_FLAG)
    return wanted


def apply(config: ml_collections.ConfigDict) -> None:
    """Adds `xla_flags(config)` to $XLA_FLAGS and sets the matmul precision.

    The flags take effect only if no JAX backend has started yet in this process.
    """
    current = os.environ.get("XLA_FLAGS", "").split()
    added = [flag for flag in xla_flags(config) if flag not in current]
    if added:
        os.environ["XLA_FLAGS"] = " ".join(current + added)
    precision = config.get("matmul_precision", "default")
    try:
        jax.config.update("jax_default_matmul_precision", precision)
    except ValueError as e:
        raise ValueError(
            f"config.matmul_precision={precision!r} is not a precision JAX knows; use 'default', "
            f"'float32', 'highest', 'tensorfloat32' or 'bfloat16' ({e})"
        ) from None
