"""Grouped GEMMs on XLA:CPU through BLAS: the `moe.kernels=blas` back-end of the dropless
dispatch (grouped.blas_swiglu), and its default on CPU where it builds.

Why: XLA:CPU has no grouped GEMM. `jax.lax.ragged_dot` runs as E dense GEMMs, and the tiles
kernel runs each row tile as its own small GEMM plus slicing and zero-filled buffers, with up
to tile - 1 padding rows per expert. Here each expert's group is one BLAS sgemm over exactly its
rows (no padding), called from an XLA FFI custom call (csrc/grouped_gemm.cc in moejax/model,
built and loaded by moejax/model/cpu_kernels.py, which says where and when).

float32 only. Shapes: R rows sorted by group, G groups, sizes [G] int32 (rows past the groups:
padding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from moejax.model import cpu_kernels

MATMUL_TARGET = "moejax_grouped_matmul"
OUTER_TARGET = "moejax_grouped_outer"


def unavailable_reason() -> str | None:
    """None when the BLAS grouped GEMMs can run here, else why not (one line)."""
    return cpu_kernels.unavailable_reason()


def _require(*arrays: jax.Array) -> None:
    cpu_kernels.require(arrays, "moe.kernels=blas", "moe.kernels=tiles")


def grouped_matmul(x: jax.Array, w: jax.Array, sizes: jax.Array,
                   transpose_w: bool = False) -> jax.Array:
    """x [R, K] float32 sorted by group, w [G, K, N] ([G, N, K] with transpose_w), sizes [G]
    -> [R, N]: each group's rows times its w[g] (w[g]^T); padding rows zero."""
    _require(x, w)
    n = w.shape[1] if transpose_w else w.shape[2]
    x, w, sizes = cpu_kernels.alike(x, w, sizes.astype(jnp.int32))
    call = jax.ffi.ffi_call(MATMUL_TARGET, cpu_kernels.result(x, (x.shape[0], n)),
                            vmap_method="sequential")
    return call(x, w, sizes, transpose_w=np.bool_(transpose_w))


def grouped_outer(x: jax.Array, dy: jax.Array, sizes: jax.Array) -> jax.Array:
    """x [R, K], dy [R, N] float32 sorted by group, sizes [G] -> [G, K, N]: each group's
    x_g^T dy_g (the weight gradient of `grouped_matmul`; zeros for an empty group)."""
    _require(x, dy)
    shape = (sizes.shape[0], x.shape[1], dy.shape[1])
    x, dy, sizes = cpu_kernels.alike(x, dy, sizes.astype(jnp.int32))
    call = jax.ffi.ffi_call(OUTER_TARGET, cpu_kernels.result(x, shape), vmap_method="sequential")
    return call(x, dy, sizes)
