"""The 1-D data-parallel device mesh and host -> device transfer of batches.

Training steps are `jax.jit` functions over global arrays: the batch is sharded over the
'data' axis, parameters and optimizer state are replicated. Means over the batch are global,
XLA inserts the all-reduces, and BatchNorm statistics are computed over the global batch, so
1 and N devices compute the same update for the same global batch.
"""

import collections
from collections.abc import Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh over the first `num_devices` devices (all when None).

    Devices are ordered by process, so process i's devices hold rows i * b .. (i + 1) * b - 1
    of a global batch: the slice `input_pipeline` has it read.
    """
    devices = sorted(jax.devices(), key=lambda d: d.process_index)  # Stable: ids within.
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"num_devices={num_devices} but {len(devices)} devices are available")
        if jax.process_count() > 1 and num_devices != len(devices):
            raise ValueError(
                f"config.num_devices={num_devices}: a run of {jax.process_count()} processes "
                f"uses all {len(devices)} devices (set config.num_devices=0)"
            )
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
    if batch_size % mesh.size:
        raise ValueError(
            f"config.{what}={batch_size} must be divisible by the number of devices "
            f"({mesh.size}); the global batch is split evenly over them."
        )


def to_global(batch, mesh: Mesh):
    """Process-local numpy batch (a pytree) -> global jax arrays sharded over 'data'."""
    sharding = batch_sharded(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def replicate_abstract(tree, mesh: Mesh):
    """ShapeDtypeStructs of `tree` (arrays or abstract values), replicated over `mesh`."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def prefetch_to_mesh(batches: Iterator, mesh: Mesh, size: int = 1) -> Iterator:
    """Global device batches of `batches`, `size` transfers ahead of the consumer, so that a
    batch is copied to the devices while the previous step runs."""
    queue = collections.deque()
    for batch in batches:
        queue.append(to_global(batch, mesh))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
