"""One device mesh for every scale: ("data", "fsdp") axes over `jax.devices()`.

Batches are split over both axes (every device gets its own rows). Parameters and optimizer state are replicated
(data parallel), or, with fsdp, each array is split along its largest evenly divisible dimension over the "fsdp"
axis, and XLA gathers it where a computation needs it. The same jitted step runs on 1 CPU, on 8 simulated CPU
devices (`XLA_FLAGS=--xla_force_host_platform_device_count=8`), on a GPU or on a TPU slice.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def make_mesh(*, fsdp: bool = False, devices=None) -> Mesh:
    """All devices on the "data" axis, or all on the "fsdp" axis when parameters are to be sharded."""
    devices = list(devices if devices is not None else jax.devices())
    shape = (1, len(devices)) if fsdp else (len(devices), 1)
    return Mesh(np.array(devices).reshape(shape), ("data", "fsdp"))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[grad_accum, batch, length] arrays: rows split over every device."""
    return NamedSharding(mesh, P(None, ("data", "fsdp")))


def array_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """Replicated, or (fsdp) split along the largest dimension that the fsdp axis divides evenly."""
    n = mesh.shape["fsdp"]
    if n > 1:
        for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
            if shape[dim] % n == 0:
                spec = [None] * len(shape)
                spec[dim] = "fsdp"
                return NamedSharding(mesh, P(*spec))
    return NamedSharding(mesh, P())


def tree_shardings(mesh: Mesh, tree):
    return jax.tree.map(lambda x: array_sharding(mesh, np.shape(x)), tree)


def place(tree, shardings):
    return jax.tree.map(jax.device_put, tree, shardings)
