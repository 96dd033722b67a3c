"""train.py's --host-memory (moejax/training/host_memory.py): with freed memory kept, a jitted
step whose output is a fresh 64 MiB buffer stops faulting its pages in at every call. Each case
runs in a child process: the setting is the whole process's, and must precede jax's backend."""

import os
import subprocess
import sys

import pytest

from moejax.training import host_memory

CHILD = """
import resource, sys
from moejax.training import host_memory
print(host_memory.apply(sys.argv[1]))
import jax, jax.numpy as jnp
step = jax.jit(lambda x: x * 2.0)
x = jnp.ones((16 * 2**20,), jnp.float32)  # 64 MiB in, a fresh 64 MiB out per call
faults = []
for _ in range(24):  # jax frees an output a moment after it is dropped: the heap grows for
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt  # a few calls, then holds
    jax.block_until_ready(step(x))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[-4:]) / 4)
"""

OUTPUT_PAGES = 64 * 2**20 // 4096


def faults_per_call(mode: str, platforms: str = "cpu") -> tuple[str, float]:
    """(the start-up line, minor page faults per call of the step) in a fresh process."""
    env = {**os.environ, "JAX_PLATFORMS": platforms, "XLA_FLAGS": ""}
    result = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True,
                            env=env, check=True, timeout=120)
    line, faults = result.stdout.strip().splitlines()[-2:]
    return line, float(faults)


@pytest.mark.skipif(host_memory.glibc_version() is None, reason="mallopt is glibc's")
def test_kept_memory_is_reused_without_page_faults():
    kept_line, kept = faults_per_call("auto")  # CPU only here: auto keeps
    released_line, released = faults_per_call("release")
    assert kept_line == f"host memory: {host_memory.KEPT}"
    assert released_line.endswith("(--host-memory release)")
    # malloc as it is maps the output afresh per call (4 KiB pages, or 2 MiB ones where
    # transparent huge pages are always on); kept, the heap already holds it
    assert kept <= OUTPUT_PAGES / 256, (kept, released)
    assert released >= 20 * max(kept, 1), (kept, released)


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
