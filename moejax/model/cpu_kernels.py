"""moejax's XLA:CPU kernels: one C++ library of XLA FFI custom calls over OpenBLAS, built on first
use. Its users: the SwiGLU of grouped experts and dense layers (moejax/model/cpu_swiglu.py),
causal attention (moejax/model/cpu_attention.py), the dense matmul of attention's projections
(moejax/model/cpu_matmul.py), the router's expert choice and its gradient
(moejax/model/cpu_route.py), the dropless combine's backward (moejax/model/cpu_combine.py) and
the AdamW update (moejax/training/cpu_adamw.py).

Why: XLA:CPU runs many small GEMMs (one per expert, one per attention head) slowly, through
padding, slicing and batched fusions, with the element-wise work around them as separate passes
over memory; each of these kernels runs OpenBLAS sgemms per piece of work (an expert's chunk of
rows, a sequence's attention head) on exactly its rows, the element-wise work beside them, with
the pieces shared out over XLA's own thread pool.
OpenBLAS comes from the scipy-openblas32 wheel, the build NumPy and SciPy use.

The library (the sources in csrc/ beside this file) is compiled on first use with the host's C++
compiler (a few seconds, once per machine and jax version) into the cache directory
(`MOEJAX_CACHE_DIR`, default ~/.cache/moejax) and loaded from there afterwards. Where it cannot
be built (no compiler, no OpenBLAS wheel) `unavailable_reason` says why; the automatic choices
(moe.kernels=auto, attention on CPU) then keep XLA's own kernels, and an explicit
moe.kernels=blas or model.attention_kernel=blas stops with that reason. float32 only (OpenBLAS
lacks bfloat16 GEMMs on most CPUs).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

from moejax.sharding import varying_axes, whole_or_one_shard

SOURCE_DIR = Path(__file__).with_name("csrc")
SOURCES = ("grouped_swiglu.cc", "causal_attention.cc", "matmul.cc", "adamw.cc", "route_topk.cc",
           "combine_rows.cc", "router_backward.cc")
HEADERS = ("cpu_kernels.h",)
# FFI target name -> the library's handler symbol
TARGETS = {
    "moejax_grouped_swiglu": "MoejaxGroupedSwiglu",
    "moejax_grouped_swiglu_backward": "MoejaxGroupedSwigluBackward",
    "moejax_causal_attention": "MoejaxCausalAttention",
    "moejax_causal_attention_backward": "MoejaxCausalAttentionBackward",
    "moejax_matmul": "MoejaxMatmul",
    "moejax_matmul_backward": "MoejaxMatmulBackward",
    "moejax_adamw": "MoejaxAdamW",
    "moejax_route_topk": "MoejaxRouteTopK",
    "moejax_combine_rows_backward": "MoejaxCombineRowsBackward",
    "moejax_router_chosen_backward": "MoejaxRouterChosenBackward",
}
LIBRARY_PREFIX = "moejax_cpu_kernels"


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moejax"
    return Path(os.environ.get("MOEJAX_CACHE_DIR", default))


def cpu_identity() -> str:
    """What a -march=native build depends on: the CPU's feature flags (Linux), else its name.
    Part of the library's key, so hosts of different CPUs sharing one cache directory (a pod's
    network home) each build their own instead of loading one their CPU cannot run."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _build_inputs(native: bool = True) -> tuple[list[str], str]:
    """(the compiler's flags before -o, a key naming this build) or raise RuntimeError."""
    try:
        import scipy_openblas32 as openblas
    except ImportError as error:
        raise RuntimeError(f"the scipy-openblas32 wheel is missing ({error}): "
                           "pip install scipy-openblas32") from None
    wanted = os.environ.get("CXX")
    compiler = shutil.which(wanted) if wanted else shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise RuntimeError(f"no C++ compiler found ({f'CXX={wanted}' if wanted else 'c++, g++'}):"
                           " install g++ or set CXX")
    lib_dir = openblas.get_lib_dir()
    # This CPU's vector width (-march=native: AVX2 rather than SSE2 on x86-64, for the attention
    # kernel's softmax loops); -fno-trapping-math and -fopenmp-simd (OpenMP's simd pragmas
    # only, no runtime) let the compiler vectorize the softmax's clamped exp and its sums, and
    # -fno-math-errno AdamW's square roots (no branch to set errno: nothing reads it).
    flags = [compiler, "-O3", *(["-march=native"] if native else []), "-fno-trapping-math",
             "-fno-math-errno", "-fopenmp-simd", "-shared", "-fPIC", "-std=c++17", "-w",
             f"-I{jax.ffi.include_dir()}", f"-I{openblas.get_include_dir()}",
             *(str(SOURCE_DIR / name) for name in SOURCES),
             f"-L{lib_dir}", f"-l{openblas.get_library()}", f"-Wl,-rpath,{lib_dir}"]
    texts = [(SOURCE_DIR / name).read_text() for name in (*HEADERS, *SOURCES)]
    key = hashlib.sha256("\0".join([*texts, jax.__version__, *flags,
                                    cpu_identity() if native else ""]).encode())
    return flags, key.hexdigest()[:16]


def _compile(flags: list[str], target: Path) -> None:
    """Compile into a temporary file beside `target`, then rename it into place: another
    process building at the same time never loads a half-written library."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        partial = Path(scratch) / target.name
        done = subprocess.run([*flags, "-o", str(partial)], check=False, capture_output=True,
                              text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"compiling moejax's CPU kernels failed: {last}")
        os.replace(partial, target)


# Why the kernels are off in this process (`off`, innermost last); empty: they are on.
_OFF_BECAUSE: list[str] = []


@contextlib.contextmanager
def off(reason: str):
    """Within: `unavailable_reason()` is `reason`, so every automatic choice (moe.kernels=auto,
    attention, the dense SwiGLU) traces XLA's own kernels. The planner compiles in here: its
    programs stand for a GPU's, and XLA's memory analysis cannot see these kernels' scratch."""
    _OFF_BECAUSE.append(reason)
    try:
        yield
    finally:
        _OFF_BECAUSE.pop()


@functools.cache
def _library() -> ctypes.CDLL | str:
    """The loaded library with its FFI targets registered, or why it is unavailable."""
    try:
        for native in (True, False):  # a compiler without -march=native builds the baseline
            flags, key = _build_inputs(native)
            target = cache_dir() / f"{LIBRARY_PREFIX}-{key}.so"
            try:
                if not target.exists():
                    _compile(flags, target)
                break
            except RuntimeError:
                if not native:
                    raise
        library = ctypes.cdll.LoadLibrary(str(target))
    except (RuntimeError, OSError) as error:
        return str(error)
    for name, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)),
                                    platform="cpu")
    return library


def unavailable_reason() -> str | None:
    """None when the CPU kernels can run here, else why not (one line)."""
    if _OFF_BECAUSE:
        return _OFF_BECAUSE[-1]
    library = _library()
    return library if isinstance(library, str) else None


def runs(dtype, backend: str | None = None) -> bool:
    """Whether work computed in `dtype` on `backend` (default: this process's first device's)
    is these kernels' by default: CPU, float32, the library built here."""
    backend = jax.default_backend() if backend is None else backend
    return (backend == "cpu" and jnp.dtype(dtype) == jnp.dtype(jnp.float32)
            and unavailable_reason() is None)


def runs_here(dtype, backend: str | None = None) -> bool:
    """`runs`, on whole arrays or one shard (sharding.whole_or_one_shard: no mesh, a one-device
    mesh, inside a shard_map): the test of every kernel's automatic use. Under GSPMD on a mesh
    XLA would gather a custom call's operands and run it whole on every device, where its own
    ops run on each device's shard."""
    return runs(dtype, backend) and whole_or_one_shard()


def require(arrays, kernel: str, fallback: str) -> None:
    """Raise a one-line error unless every array is float32 and the library is here; `kernel`
    names what was asked for and `fallback` the setting to use instead."""
    for a in arrays:
        if a.dtype != jnp.float32:
            raise TypeError(f"{kernel} takes float32, not {a.dtype}: use {fallback} for other "
                            "dtypes")
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"{kernel} cannot run: {reason}; or set {fallback}")


def alike(*arrays: jax.Array) -> list[jax.Array]:
    """The arrays marked as varying over the same shard_map axes (the union of theirs)."""
    union = frozenset().union(*(varying_axes(a) for a in arrays))

    def widen(a):
        missing = tuple(sorted(union - varying_axes(a)))
        return jax.lax.pcast(a, missing, to="varying") if missing else a

    return [widen(a) for a in arrays]


def result(like: jax.Array, shape: tuple[int, ...], dtype=jnp.float32):
    """A result type (float32 unless `dtype`) that varies over the shard_map axes `like` varies
    over: an FFI call's result takes its type from this alone, not from its inputs."""
    return jax.typeof(like).update(shape=shape, dtype=jnp.dtype(dtype), weak_type=False)
