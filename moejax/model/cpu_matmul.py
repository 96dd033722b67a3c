"""A dense float32 matmul on XLA:CPU through BLAS: layers.Matmul's `x @ w` (attention's
projections), the output head and the router's logits, on CPU in float32 where moejax's CPU
kernels build.

Why: XLA:CPU's dots at these shapes (2048 rows against 32-256 columns) ran well below
OpenBLAS's sgemm on the same CPU in a profile of the tiny DeepSeek-shaped step (by hand, not
recorded), and each weight gradient first transposed its [rows, N] operand in memory (x^T d_y
as a copy, then a dot). Here sgemms over row chunks are shared between the threads, the
transposes folded into sgemm: one XLA FFI call (csrc/matmul.cc) each way, the backward computing
d_x and d_w together. The step's attention time went from 71.9 to 62.1 ms with this
(docs/bench_hf_model.md's breakdown, which counts the other changes of that run too).

Used where `cpu_kernels.runs_here`: on whole arrays or one shard.

float32 only. x [..., K] @ w [K, N] -> [..., N].
"""

from __future__ import annotations

import jax

from moejax.model import cpu_kernels

FORWARD_TARGET = "moejax_matmul"
BACKWARD_TARGET = "moejax_matmul_backward"


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., K] @ w [K, N] -> [..., N], float32."""
    cpu_kernels.require((x, w), "the CPU matmul kernel", "cpu_kernels.off() for XLA's dot")
    return _matmul(*cpu_kernels.alike(x, w))


@jax.custom_vjp
def _matmul(x, w):
    return _forward(x, w)[0]


def _forward(x, w):
    call = jax.ffi.ffi_call(FORWARD_TARGET,
                            cpu_kernels.result(x, (*x.shape[:-1], w.shape[1])),
                            vmap_method="sequential")
    return call(x, w), (x, w)


def _backward(residuals, d_y):
    x, w = residuals
    d_y = cpu_kernels.alike(d_y, x)[0]
    call = jax.ffi.ffi_call(BACKWARD_TARGET,
                            (cpu_kernels.result(x, x.shape), cpu_kernels.result(x, w.shape)),
                            vmap_method="sequential")
    return call(x, w, d_y)


_matmul.defvjp(_forward, _backward)
