"""Multi-host start-up: one process per host, joined through jax.distributed."""

from __future__ import annotations

import os

import jax


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Join a multi-process run when one is described; returns whether one was joined.

    Sources, in order: the arguments; JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID; a SLURM or Open MPI job of more than one task (jax detects those itself).
    """
    env = os.environ
    coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS")
    num_processes = num_processes or _int_env("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _int_env("JAX_PROCESS_ID")
    if coordinator:
        if num_processes is None or process_id is None:
            raise ValueError("a coordinator address needs the process count and this process's "
                             "id too: pass --num-processes and --process-id (or set "
                             "JAX_NUM_PROCESSES and JAX_PROCESS_ID).")
        _enable_cpu_collectives()
        jax.distributed.initialize(coordinator, num_processes, process_id)
        return True
    if (_int_env("SLURM_NTASKS") or 1) > 1 or (_int_env("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        _enable_cpu_collectives()
        jax.distributed.initialize()
        return True
    return False


def _enable_cpu_collectives() -> None:
    """CPU devices of different processes talk through gloo (no effect on GPU/TPU devices)."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None
