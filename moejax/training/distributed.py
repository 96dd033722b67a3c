"""Multi-host start-up: one process per host, joined through jax.distributed, tolerant of
processes that start or compile minutes apart.

JAX's CPU collectives (gloo) give up when the processes reach a new collective more than 30 s
apart, and that limit is not configurable; a slow host (cold compilation cache, busy
filesystem) would kill the run at its first collective. So the processes meet at named
barriers built on the coordinator's key-value store, whose timeout is ours
(`--startup-timeout`, default 30 minutes): after joining, before building the train state and
once every function is compiled. A process that never arrives is named in one line.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import sys
import threading
import time

import jax

DEFAULT_STARTUP_TIMEOUT_S = 1800.0
# The environment this module reads. A launcher (docs/launch/) sets LAUNCH_ENV on every
# process; SCHEDULER_ENV is set by SLURM / Open MPI themselves, for jax's own detection.
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"  # host:port of process 0
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"  # 0 .. processes - 1, one per host
STARTUP_TIMEOUT_ENV = "MOEJAX_STARTUP_TIMEOUT"  # seconds
LAUNCH_ENV = (COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV, STARTUP_TIMEOUT_ENV)
SCHEDULER_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")
_startup_timeout_s = DEFAULT_STARTUP_TIMEOUT_S
_barrier_counter = itertools.count()


class StartupError(RuntimeError):
    """A multi-process run that could not start; the message names the process and the fix."""


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, startup_timeout_s: float | None = None) -> bool:
    """Join a multi-process run when one is described; returns whether one was joined.

    Sources, in order: the arguments; JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID; a SLURM or Open MPI job of more than one task (jax detects those itself).
    `startup_timeout_s` (else MOEJAX_STARTUP_TIMEOUT, else 30 minutes) bounds how long a
    process waits for the others at start-up and at each barrier.
    """
    env = os.environ
    coordinator = coordinator or env.get(COORDINATOR_ENV)
    num_processes = num_processes or _int_env(NUM_PROCESSES_ENV)
    process_id = process_id if process_id is not None else _int_env(PROCESS_ID_ENV)
    _set_startup_timeout(startup_timeout_s)
    if coordinator:
        if num_processes is None or process_id is None:
            raise ValueError("a coordinator address needs the process count and this process's "
                             "id too: pass --num-processes and --process-id (or set "
                             "JAX_NUM_PROCESSES and JAX_PROCESS_ID).")
        _join(coordinator, num_processes, process_id)
        return True
    if any((_int_env(name) or 1) > 1 for name in SCHEDULER_ENV):
        _join(None, None, None)
        return True
    return False


def _set_startup_timeout(startup_timeout_s: float | None) -> None:
    global _startup_timeout_s
    if startup_timeout_s is None:
        startup_timeout_s = float(os.environ.get(STARTUP_TIMEOUT_ENV, DEFAULT_STARTUP_TIMEOUT_S))
    if startup_timeout_s <= 0:
        raise ValueError(f"the start-up timeout must be positive seconds, got {startup_timeout_s}.")
    _startup_timeout_s = startup_timeout_s


def _join(coordinator, num_processes, process_id) -> None:
    """jax.distributed.initialize with our timeouts, a barrier, then the backend (whose CPU
    topology exchange is itself a rendezvous of all processes)."""
    minutes = math.ceil(_startup_timeout_s / 60)
    # CPU devices of different processes talk through gloo (no effect on GPU/TPU devices).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_cpu_get_local_topology_timeout_minutes", minutes)
    jax.config.update("jax_cpu_get_global_topology_timeout_minutes", minutes + 1)
    where = f"coordinator {coordinator or '(auto-detected)'}"
    with _exit_if_not_joined(where, process_id, num_processes):
        try:
            jax.distributed.initialize(
                coordinator, num_processes, process_id,
                initialization_timeout=math.ceil(_startup_timeout_s) + JAX_GRACE_S)
        except (RuntimeError, ValueError) as err:  # JaxRuntimeError is a RuntimeError
            first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise StartupError(
                f"could not join the run through {where} ({first_line}): start every process "
                "with the same --coordinator and --num-processes.") from None
    barrier("joined")
    jax.devices()


# jax's own join deadline comes this much after ours: when a process never joins, jax aborts
# the others with a C++ fatal error and a stack trace, so we must speak (and exit) first.
JAX_GRACE_S = 30


@contextlib.contextmanager
def _exit_if_not_joined(where: str, process_id, num_processes):
    def give_up():
        print(f"error: not all {num_processes or 'the'} processes joined the run through {where} "
              f"within {_startup_timeout_s:.0f} s (this is process {process_id}): start every "
              "process with the same --coordinator and --num-processes, or raise "
              "--startup-timeout (MOEJAX_STARTUP_TIMEOUT) if hosts start slowly.",
              file=sys.stderr, flush=True)
        os._exit(2)

    watchdog = threading.Timer(_startup_timeout_s, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield
    finally:
        watchdog.cancel()


def _client():
    # The coordinator's key-value store has no public API; jax.distributed keeps its client here.
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state.client


def barrier(name: str, timeout_s: float | None = None) -> None:
    """Wait until every process has reached the barrier `name` (no-op in a single process).

    Built on the coordinator's key-value store, not on device collectives, so it tolerates any
    skew up to the timeout; raises StartupError naming the processes that did not arrive.
    """
    client = _client()
    if client is None:
        return
    from jax._src import distributed as jax_distributed

    state = jax_distributed.global_state
    timeout_s = _startup_timeout_s if timeout_s is None else timeout_s
    prefix = f"moejax/barrier/{next(_barrier_counter)}-{name}"
    client.key_value_set(f"{prefix}/{state.process_id}", "arrived")
    deadline = time.monotonic() + timeout_s
    missing = []
    for other in range(state.num_processes):
        remaining_ms = max(1, int((deadline - time.monotonic()) * 1000))
        try:
            client.blocking_key_value_get(f"{prefix}/{other}", remaining_ms)
        except jax.errors.JaxRuntimeError:  # DEADLINE_EXCEEDED from the key-value store
            missing.append(other)
    if missing:
        who = ", ".join(str(p) for p in missing)
        raise StartupError(
            f"process(es) {who} of {state.num_processes} did not reach '{name}' within "
            f"{timeout_s:.0f} s (this is process {state.process_id}): check that process's log, "
            "or raise --startup-timeout (MOEJAX_STARTUP_TIMEOUT) if hosts start slowly.")


def broadcast_text(name: str, value: str) -> str:
    """Process 0's `value` on every process (through the key-value store, not collectives)."""
    client = _client()
    if client is None:
        return value
    from jax._src import distributed as jax_distributed

    key = f"moejax/broadcast/{next(_barrier_counter)}-{name}"
    if jax_distributed.global_state.process_id == 0:
        client.key_value_set(key, value)
        return value
    try:
        return client.blocking_key_value_get(key, int(_startup_timeout_s * 1000))
    except jax.errors.JaxRuntimeError:
        raise StartupError(f"process 0 did not publish '{name}' within {_startup_timeout_s:.0f} "
                           "s: check process 0's log, or raise --startup-timeout.") from None


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None
