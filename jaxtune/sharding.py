"""One device mesh for every scale: ("data", "fsdp") axes over `jax.devices()`, on one host or many.

Batches are split over both axes (every device gets its own rows). Parameters and optimizer state are replicated
(data parallel), or, with fsdp, each array is split along its largest evenly divisible dimension over the "fsdp"
axis, and XLA gathers it where a computation needs it. The same jitted step runs on 1 CPU, on 8 simulated CPU
devices (`XLA_FLAGS=--xla_force_host_platform_device_count=8`), on a GPU or on a TPU slice.

Several hosts (a TPU pod slice, a SLURM job, or processes given JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID) join JAX's own multi-host runtime through `initialize_distributed`; `jax.devices()` then lists every
host's devices, and each host runs the same program. Every host builds the same seeded batches and transfers only
the rows its own devices hold (`place_global`); results come back to every host with `to_host`.
"""

from __future__ import annotations

import os
from pathlib import Path

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
    return jax.tree.map(place_global, tree, shardings)


def distributed_requested(env=os.environ) -> bool:
    """Whether this process is one of several: JAX's coordinator variables, a multi-task SLURM job, several TPU
    workers, or an Open MPI launch with more than one rank."""
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env:
        return True
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1:
        return True
    return int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1


def initialize_distributed(mode: str = "auto") -> bool:
    """Join the multi-host runtime (`jax.distributed.initialize`) before anything touches a device.

    mode: auto (when `distributed_requested`), on (always: JAX detects TPU pods, SLURM and Open MPI itself), off.
    Returns whether this run spans several processes.
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"distributed={mode!r}: choose auto, on or off")
    if mode == "off" or (mode == "auto" and not distributed_requested()):
        return False
    if not jax.distributed.is_initialized():
        kwargs = {}
        if os.environ.get("JAX_NUM_PROCESSES"):  # JAX reads JAX_COORDINATOR_ADDRESS itself, not these two
            kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
        if os.environ.get("JAX_PROCESS_ID"):
            kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
        jax.distributed.initialize(**kwargs)
    return jax.process_count() > 1


def place_global(value, sharding: NamedSharding) -> jax.Array:
    """A global array from a host value that every process holds alike; each process transfers only its shards."""
    if sharding.is_fully_addressable:  # one process: a plain transfer, device to device where the value already is
        return jax.device_put(value, sharding)
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def to_host(tree):
    """NumPy copies of (possibly sharded, possibly multi-host) arrays, on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> Path | None:
    """JAX's persistent compilation cache, so a second launch on the same shapes loads its programs instead of
    compiling them again (7-12 s before the first step otherwise). The folder is `directory`, else
    $JAXTUNE_COMPILATION_CACHE, else ~/.cache/jaxtune/xla (per user); JAXTUNE_COMPILATION_CACHE=0 turns it off.
    Returns the folder in use, or None when off."""
    setting = os.environ.get("JAXTUNE_COMPILATION_CACHE", "").strip()
    if directory is None and setting.lower() in ("0", "off", "false", "no"):
        return None
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jaxtune" / "xla"
    path = Path(directory or setting or base).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # a read-only home: run without the cache rather than fail
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # the train step is worth keeping on CPUs too
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
