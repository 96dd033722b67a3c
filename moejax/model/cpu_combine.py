"""The dropless combine's backward on XLA:CPU (dispatch/grouped.py `combine_rows`): for every
row of the sorted buffer, its token's output gradient scaled by the row's combine weight, and
the weight's gradient (that gradient dotted with the row's result), in one XLA FFI call
(csrc/combine_rows.cc, built by cpu_kernels.py).

Why: in XLA's ops this is a gather of d_y into an [R, D] buffer, a multiply and a row sum over
it (three passes of R k-fold copies of the tokens' width through memory; XLA:CPU fuses neither
the gather into both consumers nor the two consumers together); here one pass reads each
row's result once and writes its gradient once, the token's d_y row (M rows, a k-th of R)
read from cache. Its cost grows with k (the fine-grained rows of docs/bench_moe.md).

Used where `cpu_kernels.runs_here` for float32 results and gradients. Shapes: d_y [M, D],
computed [R, D], token_of_row [R] int32 (M: a padding row), weight_of_row [R] float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.model import cpu_kernels

BACKWARD_TARGET = "moejax_combine_rows_backward"


def applies(*arrays: jax.Array) -> bool:
    """Whether the kernel is the backward's to use for these arrays: all float32, on CPU where
    the kernels build, on whole arrays or one shard."""
    return (all(a.dtype == jnp.float32 for a in arrays)
            and cpu_kernels.runs_here(jnp.float32))


def combine_backward(d_y: jax.Array, computed: jax.Array, token_of_row: jax.Array,
                     weight_of_row: jax.Array) -> tuple[jax.Array, jax.Array]:
    """-> (d_computed [R, D] = weight_of_row * d_y[token_of_row], zero rows for padding;
    d_weight_of_row [R] = the row of d_y dotted with the row of computed, 0 for padding)."""
    cpu_kernels.require((d_y, computed, weight_of_row), "the CPU combine kernel",
                        "cpu_kernels.off() for XLA's ops")
    d_y, computed, token_of_row, weight_of_row = cpu_kernels.alike(
        d_y, computed, token_of_row.astype(jnp.int32), weight_of_row)
    call = jax.ffi.ffi_call(
        BACKWARD_TARGET,
        (cpu_kernels.result(computed, computed.shape),
         cpu_kernels.result(computed, computed.shape[:1])),
        vmap_method="sequential")
    return call(d_y, computed, token_of_row, weight_of_row)
