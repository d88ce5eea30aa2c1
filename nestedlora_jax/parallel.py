"""Data-parallel training over a ``jax.sharding.Mesh`` (one or many devices, one or many hosts).

NestedLoRA's loss is a mean over the batch, so data parallelism needs no special code: the
batch is sharded along a mesh axis (``"data"``), parameters and optimiser state are replicated,
and XLA turns the batch means into all-reduces. The samples are drawn *inside* the jitted step
from the step's key, and JAX's random numbers do not depend on how an array is sharded, so a run
on N devices sees exactly the samples of the single-device run with the same seed and global
batch: results agree to float round-off (the order of the partial sums differs).

Single host, all local devices::

    from nestedlora_jax import fit
    from nestedlora_jax.parallel import data_parallel_mesh
    result = fit(apply, params, op, sampler, steps=..., batch_size=1024,
                 mesh=data_parallel_mesh())          # or solve(..., data_parallel=True)

Several hosts (one process per GPU, or per host): start the same script once per process and
call ``jax.distributed.initialize()`` before anything else touches JAX (on SLURM or Cloud TPU it
reads the coordinator address, process count and id from the environment; elsewhere pass
``coordinator_address="host0:1234", num_processes=N, process_id=i``). ``jax.devices()`` then
lists the devices of *all* processes, ``data_parallel_mesh()`` spans them, and each process
computes the part of the batch that lives on its devices. Every process must use the same seed
and configuration. Checkpoints are written by Orbax collectively.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "DATA_AXIS",
    "batch_sharding",
    "check_batch_divisible",
    "data_parallel_mesh",
    "replicate",
    "replicated_sharding",
]

DATA_AXIS = "data"


def data_parallel_mesh(devices: Sequence[jax.Device] | int | None = None, axis_name: str = DATA_AXIS) -> Mesh:
    """A 1-D mesh ``(num_devices,)`` with axis ``axis_name`` for data parallelism.

    ``devices``: ``None`` for every device of every process (``jax.devices()``), an int ``n``
    for the first ``n`` of them, or an explicit sequence of devices.
    """
    available = jax.devices()
    if devices is None:
        devices = available
    elif isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        if not 1 <= devices <= len(available):
            raise ValueError(
                f"asked for {devices} devices but {len(available)} are available "
                f"({available[0].platform}); on CPU, more can be simulated by setting "
                "XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts."
            )
        devices = available[:devices]
    devices = list(devices)
    if not devices:
        raise ValueError("data_parallel_mesh needs at least one device.")
    return Mesh(np.asarray(devices), (axis_name,))


def _axis_size(mesh: Mesh, axis_name: str) -> int:
    if axis_name not in mesh.axis_names:
        raise ValueError(
            f"the mesh has axes {mesh.axis_names}, not the data axis {axis_name!r}; build it with "
            f"data_parallel_mesh() or name the batch axis {axis_name!r}."
        )
    return int(mesh.shape[axis_name])


def check_batch_divisible(batch_size: int, mesh: Mesh, axis_name: str = DATA_AXIS) -> None:
    """Raise a ``ValueError`` unless ``batch_size`` splits evenly over the data axis."""
    n = _axis_size(mesh, axis_name)
    if batch_size % n:
        lower, upper = (batch_size // n) * n, (batch_size // n + 1) * n
        suggestion = f"{lower} or {upper}" if lower else f"{upper}"
        raise ValueError(
            f"batch_size {batch_size} is not divisible by the {n} devices of mesh axis "
            f"{axis_name!r}: every device must get the same number of samples. Use a multiple "
            f"of {n} (e.g. {suggestion}), or fewer devices."
        )


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Every device holds a full copy (parameters, optimiser state)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, axis_name: str = DATA_AXIS) -> NamedSharding:
    """Leading (batch) axis split over ``axis_name``; the remaining axes replicated."""
    _axis_size(mesh, axis_name)
    return NamedSharding(mesh, PartitionSpec(axis_name))


def replicate(tree, mesh: Mesh):
    """Place every leaf of ``tree`` on all devices of ``mesh`` (a full copy each)."""
    return jax.device_put(tree, replicated_sharding(mesh))
