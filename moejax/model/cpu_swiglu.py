"""SwiGLU on XLA:CPU through BLAS: the dropless experts' `moe.kernels=blas` (auto's choice on CPU
in float32 where moejax's CPU kernels build), and on CPU in float32 the dense SwiGLU of
layers.swiglu (the dense layers, the shared experts, the capacity dispatch's batched experts).

Why: XLA:CPU has no grouped GEMM (`jax.lax.ragged_dot` runs as E dense GEMMs; the tiles kernel
pays per row tile and up to tile - 1 padding rows per expert), and around its GEMMs the
SwiGLU's activation and gradient are separate passes over [R, F] arrays in memory. Here one
XLA FFI call (csrc/grouped_swiglu.cc, built by cpu_kernels.py) runs the whole SwiGLU: per chunk
of rows of one group (256 at F >= 512, up to 1024 for narrower experts), the gate and up
sgemms, silu(gate) * up while the chunk is in cache, and the down sgemm; each group gets
exactly its rows (no padding). The backward is one call too: d_x per row chunk, then each
weight gradient as rows^T x gradient sgemms per group, its hidden columns whole where there are
groups enough to keep every thread busy (each operand packed once), else in chunks of at least
128. Chunks are shared out over XLA's thread pool, so one group (a dense layer) still uses
every thread.

float32 only. Shapes: R rows sorted by group, G groups with sizes [G] int32 (rows past the
groups: padding, zero out); w_gate and w_up [G, D, F], w_down [G, F, N].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.model import cpu_kernels

FORWARD_TARGET = "moejax_grouped_swiglu"
BACKWARD_TARGET = "moejax_grouped_swiglu_backward"


def grouped_swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array,
                   sizes: jax.Array) -> jax.Array:
    """x [R, D] sorted by group -> [R, N]: each group's silu(x W_gate) * (x W_up) times its
    W_down; rows past the groups zero."""
    cpu_kernels.require((x, w_gate, w_up, w_down), "moe.kernels=blas", "moe.kernels=tiles")
    return _grouped_swiglu(*cpu_kernels.alike(x, w_gate, w_up, w_down, sizes.astype(jnp.int32)))


def dense_swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                 w_down: jax.Array) -> jax.Array:
    """x [..., D] with w_gate, w_up [D, F] and w_down [F, N] -> [..., N]: one group of every
    row; or the batched experts' form, x [E, S, D] with weights [E, D, F] and [E, F, N]: E
    groups of S rows."""
    if w_gate.ndim == 3:
        experts, rows_each = x.shape[0], x.shape[1]
        sizes = jnp.full((experts,), rows_each, jnp.int32)
        flat = grouped_swiglu(x.reshape(-1, x.shape[-1]), w_gate, w_up, w_down, sizes)
        return flat.reshape(experts, rows_each, -1)
    rows = x.reshape(-1, x.shape[-1])
    flat = grouped_swiglu(rows, w_gate[None], w_up[None], w_down[None],
                          jnp.full((1,), rows.shape[0], jnp.int32))
    return flat.reshape(*x.shape[:-1], -1)


@jax.custom_vjp
def _grouped_swiglu(x, w_gate, w_up, w_down, sizes):
    return _forward(x, w_gate, w_up, w_down, sizes)[0]


def _forward(x, w_gate, w_up, w_down, sizes):
    rows, hidden = x.shape[0], w_gate.shape[2]
    call = jax.ffi.ffi_call(
        FORWARD_TARGET,
        (cpu_kernels.result(x, (rows, w_down.shape[2])),
         cpu_kernels.result(x, (rows, hidden)), cpu_kernels.result(x, (rows, hidden))),
        vmap_method="sequential")
    y, gate, up = call(x, w_gate, w_up, w_down, sizes)  # gate, up: the pre-activations
    return y, (x, w_gate, w_up, w_down, sizes, gate, up)


def _backward(residuals, d_y):
    x, w_gate, w_up, w_down, sizes, gate, up = residuals
    d_y = cpu_kernels.alike(d_y, x)[0]
    # the last three results are the call's scratch (d_gate, d_up, the hidden [R, F]), XLA's to
    # allocate so that its memory analysis counts them; dropped here
    call = jax.ffi.ffi_call(
        BACKWARD_TARGET,
        tuple(cpu_kernels.result(x, a.shape) for a in (x, w_gate, w_up, w_down, gate, up, up)),
        vmap_method="sequential")
    return (*call(x, w_gate, w_up, w_down, sizes, gate, up, d_y)[:4], None)


_grouped_swiglu.defvjp(_forward, _backward)
