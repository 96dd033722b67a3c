"""Grouped GEMMs on XLA:CPU through BLAS: the `moe.kernels=blas` back-end of the dropless
dispatch (grouped.blas_swiglu), and its default on CPU where it builds.

Why: XLA:CPU has no grouped GEMM. `jax.lax.ragged_dot` runs as E dense GEMMs, and the tiles
kernel runs each row tile as its own small GEMM plus slicing and zero-filled buffers, with up
to tile - 1 padding rows per expert. Here each expert's group is one BLAS sgemm over exactly its
rows (no padding), called from an XLA FFI custom call (grouped_gemm_cpu.cc beside this file).
OpenBLAS comes from the scipy-openblas32 wheel, the build NumPy and SciPy use.

The library is compiled on first use with the host's C++ compiler (a few seconds, once per
machine and jax version) into the cache directory (`MOEJAX_CACHE_DIR`, default ~/.cache/moejax) and
loaded from there afterwards. Where it cannot be built (no compiler, no OpenBLAS wheel)
`unavailable_reason` says why; moe.kernels=auto then keeps the tiles kernel, and an explicit
moe.kernels=blas stops with that reason.

float32 only (bfloat16 inputs would need a bf16 GEMM OpenBLAS lacks on most CPUs).
Shapes: R rows sorted by group, G groups, sizes [G] int32 (rows past the groups: padding).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from moejax.sharding import varying_axes

SOURCE = Path(__file__).with_name("grouped_gemm_cpu.cc")
MATMUL_TARGET = "moejax_grouped_matmul"
OUTER_TARGET = "moejax_grouped_outer"


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moejax"
    return Path(os.environ.get("MOEJAX_CACHE_DIR", default))


def _build_inputs() -> tuple[list[str], str]:
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
    flags = [compiler, "-O2", "-shared", "-fPIC", "-std=c++17", "-w",
             f"-I{jax.ffi.include_dir()}", f"-I{openblas.get_include_dir()}", str(SOURCE),
             f"-L{lib_dir}", f"-l{openblas.get_library()}", f"-Wl,-rpath,{lib_dir}"]
    key = hashlib.sha256("\0".join([SOURCE.read_text(), jax.__version__, *flags]).encode())
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
            raise RuntimeError(f"compiling {SOURCE.name} failed: {last}")
        os.replace(partial, target)


@functools.cache
def _library() -> ctypes.CDLL | str:
    """The loaded library with its FFI targets registered, or why it is unavailable."""
    try:
        flags, key = _build_inputs()
        target = cache_dir() / f"grouped_gemm_cpu-{key}.so"
        if not target.exists():
            _compile(flags, target)
        library = ctypes.cdll.LoadLibrary(str(target))
    except (RuntimeError, OSError) as error:
        return str(error)
    jax.ffi.register_ffi_target(MATMUL_TARGET, jax.ffi.pycapsule(library.MoejaxGroupedMatmul),
                                platform="cpu")
    jax.ffi.register_ffi_target(OUTER_TARGET, jax.ffi.pycapsule(library.MoejaxGroupedOuter),
                                platform="cpu")
    return library


def unavailable_reason() -> str | None:
    """None when the BLAS grouped GEMMs can run here, else why not (one line)."""
    library = _library()
    return library if isinstance(library, str) else None


def _require(*arrays: jax.Array) -> None:
    for a in arrays:
        if a.dtype != jnp.float32:
            raise TypeError(f"the BLAS grouped GEMMs take float32, not {a.dtype}: "
                            "use moe.kernels=tiles for other dtypes")
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"moe.kernels=blas cannot run: {reason}; or set moe.kernels=tiles")


def grouped_matmul(x: jax.Array, w: jax.Array, sizes: jax.Array,
                   transpose_w: bool = False) -> jax.Array:
    """x [R, K] float32 sorted by group, w [G, K, N] ([G, N, K] with transpose_w), sizes [G]
    -> [R, N]: each group's rows times its w[g] (w[g]^T); padding rows zero."""
    _require(x, w)
    n = w.shape[1] if transpose_w else w.shape[2]
    x, w, sizes = _alike(x, w, sizes.astype(jnp.int32))
    call = jax.ffi.ffi_call(MATMUL_TARGET, _result(x, (x.shape[0], n)), vmap_method="sequential")
    return call(x, w, sizes, transpose_w=np.bool_(transpose_w))


def grouped_outer(x: jax.Array, dy: jax.Array, sizes: jax.Array) -> jax.Array:
    """x [R, K], dy [R, N] float32 sorted by group, sizes [G] -> [G, K, N]: each group's
    x_g^T dy_g (the weight gradient of `grouped_matmul`; zeros for an empty group)."""
    _require(x, dy)
    shape = (sizes.shape[0], x.shape[1], dy.shape[1])
    x, dy, sizes = _alike(x, dy, sizes.astype(jnp.int32))
    call = jax.ffi.ffi_call(OUTER_TARGET, _result(x, shape), vmap_method="sequential")
    return call(x, dy, sizes)


def _alike(*arrays: jax.Array) -> list[jax.Array]:
    """The arrays marked as varying over the same shard_map axes (the union of theirs)."""
    union = frozenset().union(*(varying_axes(a) for a in arrays))

    def widen(a):
        missing = tuple(sorted(union - varying_axes(a)))
        return jax.lax.pcast(a, missing, to="varying") if missing else a

    return [widen(a) for a in arrays]


def _result(like: jax.Array, shape: tuple[int, ...]):
    """A float32 result type that varies over the shard_map axes `like` varies over: an FFI
    call's result takes its type from this alone, not from its inputs."""
    return jax.typeof(like).update(shape=shape, dtype=jnp.dtype(jnp.float32), weak_type=False)
