"""train.py's --host-memory (moejax/training/host_memory.py): with freed memory kept, malloc
serves a big allocation again from its heap instead of a fresh mapping, so a jitted step whose
output is a fresh 64 MiB buffer stops faulting its pages in at every call. Each case runs in a
child process: the setting is the whole process's, and must precede jax's backend."""

import os
import subprocess
import sys

import pytest

from moejax.training import host_memory

# malloc and free of 64 MiB in a thread of its own, as XLA's worker threads allocate, then the
# jitted step; prints the start-up line and the minor page faults of each
CHILD = """
import ctypes, resource, sys, threading
from moejax.training import host_memory
print(host_memory.apply(sys.argv[1]))

def faults_of(work, calls):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        work()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p

def malloc_touch_free():
    block = libc.malloc(64 << 20)
    ctypes.memset(block, 1, 64 << 20)  # every page written, as an output is
    libc.free(ctypes.c_void_p(block))

per_malloc = []
worker = threading.Thread(  # the first call may grow the heap; the next 15 are measured
    target=lambda: [malloc_touch_free(), per_malloc.append(faults_of(malloc_touch_free, 15))])
worker.start()
worker.join()
print(per_malloc[0])
import jax, jax.numpy as jnp
step = jax.jit(lambda x: x * 2.0)
x = jnp.ones((16 * 2**20,), jnp.float32)  # 64 MiB in, a fresh 64 MiB out per call
faults_of(lambda: jax.block_until_ready(step(x)), 8)
print(faults_of(lambda: jax.block_until_ready(step(x)), 32))
"""

OUTPUT_PAGES = 64 * 2**20 // 4096


def faults_per_call(mode: str, platforms: str = "cpu") -> tuple[str, float, float]:
    """(the start-up line, page faults per malloc of 64 MiB, per call of the step) in a fresh
    process."""
    env = {**os.environ, "JAX_PLATFORMS": platforms, "XLA_FLAGS": ""}
    result = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True,
                            env=env, check=True, timeout=120)
    line, per_malloc, per_step = result.stdout.strip().splitlines()[-3:]
    return line, float(per_malloc), float(per_step)


@pytest.mark.skipif(host_memory.glibc_version() is None, reason="mallopt is glibc's")
def test_kept_memory_is_reused_without_page_faults():
    kept_line, kept_malloc, kept_step = faults_per_call("auto")  # CPU only here: auto keeps
    line, malloc, step = faults_per_call("release")
    assert kept_line == f"host memory: {host_memory.KEPT}"
    assert line.endswith("(--host-memory release)")
    # malloc as it is maps every 64 MiB afresh: each of its pages faults (4 KiB pages; 2 MiB
    # ones where transparent huge pages are always on). Kept: the heap already holds it.
    assert kept_malloc <= OUTPUT_PAGES / 256 and malloc >= 20 * max(kept_malloc, 1), (
        kept_malloc, malloc)
    # the step's output likewise; jax frees a dropped output a moment later, so on a busy
    # machine the heap still grows now and then to hold a few at once: most calls reuse it
    assert kept_step <= step / 2, (kept_step, step)


def test_auto_leaves_malloc_alone_where_an_accelerator_may_start(monkeypatch):
    monkeypatch.setattr(host_memory, "backend_started", lambda: False)
    import jax

    previous = jax.config.jax_platforms
    jax.config.update("jax_platforms", "cuda,cpu")
    try:
        assert host_memory.accelerator_possible()
        assert host_memory.apply("auto").endswith("(an accelerator backend may start here)")
    finally:
        jax.config.update("jax_platforms", previous)
    jax.config.update("jax_platforms", "cpu")
    try:
        assert not host_memory.accelerator_possible()
    finally:
        jax.config.update("jax_platforms", previous)


def test_nothing_changes_after_jax_started():
    import jax

    jax.devices()  # this process's backend is up
    assert host_memory.apply("keep") == ("host memory: malloc unchanged "
                                         "(jax's backend had already started)")
