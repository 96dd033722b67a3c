"""Keep the memory XLA:CPU frees at the end of a step for the next step, instead of handing it
back to the operating system and faulting it in again.

Why: XLA:CPU allocates a step's outputs and its temp buffer afresh at every call, with malloc,
and glibc serves each allocation over its mmap threshold (32 MiB at most), and any allocation
too big for a thread's own arena (64 MiB), with a fresh mmap that it unmaps at free. The next
step then takes a page fault, and the kernel zeroes the page, for every 4 KiB of those buffers
(the E=128 layer of docs/bench_moe.md: 201 MiB of weight gradients alone; its sparse-scaling
rows time the step both ways). With one malloc arena, no mmap and no trimming,
every freed buffer stays in malloc's heap and the next step reuses it: no faults once the heap
has grown to the step's peak.

The cost: the process's resident memory stays at its peak (freed memory is kept, not returned).
On an accelerator host, where host memory comes and goes (a checkpoint restored through host
buffers), that is not worth it, so `train.py` keeps memory only where jax will run on CPU
(`--host-memory`, README). glibc only (mallopt); elsewhere nothing changes. Settings take effect
for threads that allocate for the first time after the call: call it before jax starts its
backend (before the first computation or `jax.devices()`).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os

# mallopt(3) parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1  # free heap top kept before it is given back (bytes)
_M_MMAP_MAX = -4  # allocations served by mmap at once; 0: none
_M_ARENA_MAX = -8  # malloc arenas; other threads' arenas serve big allocations by mmap
_KEEP_ALL = 2**31 - 1  # the largest trim threshold mallopt takes (an int)

KEPT = "freed buffers kept in malloc's heap for the next step (no per-step page faults)"


def glibc_version() -> str | None:
    """This process's glibc version ("2.36"), or None for another C library."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (AttributeError, ValueError, OSError):
        return None
    return version if name == "glibc" else None


def keep_freed_memory() -> str:
    """Have glibc's malloc keep freed memory for reuse (module docstring); returns one line for
    the start-up log: what was done, or why nothing was."""
    if glibc_version() is None:
        return "host memory: malloc unchanged (not glibc)"
    mallopt = ctypes.CDLL(None).mallopt
    for parameter, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0),
                             (_M_TRIM_THRESHOLD, _KEEP_ALL)):
        if mallopt(parameter, value) != 1:
            return f"host memory: malloc unchanged (mallopt({parameter}, {value}) refused)"
    return f"host memory: {KEPT}"


def accelerator_possible() -> bool:
    """Whether jax may start a backend other than CPU in this process, judged without starting
    one: the first of jax_platforms (JAX_PLATFORMS) when set, else whether a PJRT plugin (an
    installed `jax_plugins` module or entry point, e.g. CUDA's) or libtpu is installed."""
    import jax

    platforms = jax.config.jax_platforms
    if platforms:
        return platforms.split(",")[0].strip() != "cpu"
    if importlib.metadata.entry_points(group="jax_plugins"):
        return True
    if importlib.util.find_spec("libtpu") is not None:
        return True
    try:
        import jax_plugins
    except ImportError:
        return False
    import pkgutil

    return any(True for _ in pkgutil.iter_modules(jax_plugins.__path__))


def backend_started() -> bool:
    """Whether jax has started its backends in this process (jax has no public test of it)."""
    from jax._src import xla_bridge

    return getattr(xla_bridge, "backends_are_initialized", lambda: False)()


def apply(mode: str) -> str:
    """`--host-memory` of train.py: "keep" keeps freed memory, "release" leaves malloc as it
    is, "auto" keeps where jax will run on CPU only. Nothing changes once jax's backend has
    started (train.py's main called in a process that already ran jax): its threads hold arenas
    of their own by then, so only the heap of the main thread would grow. Returns the start-up
    log's line."""
    if mode != "release" and backend_started():
        return "host memory: malloc unchanged (jax's backend had already started)"
    if mode == "keep" or (mode == "auto" and not accelerator_possible()):
        return keep_freed_memory()
    if mode == "auto":
        return "host memory: malloc unchanged (an accelerator backend may start here)"
    return "host memory: malloc unchanged (--host-memory release)"
