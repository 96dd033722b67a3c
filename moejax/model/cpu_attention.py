"""Causal attention on XLA:CPU through BLAS: the `blas` training-attention kernel
(model.attention_kernel; auto's choice on CPU in float32 where moejax's CPU kernels build).

Why: XLA:CPU runs attention's [B x H]-batched small GEMMs (scores [T, Qk] x [Qk, T], weighted
sums [T, T] x [T, V]) through batched fusions at a small fraction of the machine's GEMM speed,
and the materialised scores, their mask, softmax and transposes are more passes over [B, H, T, T]
arrays. Here one XLA FFI custom call (csrc/causal_attention.cc, built by cpu_kernels.py) runs
each (sequence, kv head) pair as OpenBLAS sgemms over chunks of 64 query positions, each chunk
against only the keys it can see, with the softmax in between; the backward is a second call
that recomputes the probabilities from the saved log-sum-exp (as flash attention does). Nothing
[T, T] is kept between the two: the residuals are q, k, v, the output and the log-sum-exp
[B, K, T, G], linear in T like the blockwise kernel's.

float32 only. Shapes as attention.fused_attention: q [B, T, K, G, Qk], k [B, T, K, Qk],
v [B, T, K, Qv] -> [B, T, K, G, Qv]; query position t sees key positions 0..t.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from moejax.model import cpu_kernels

FORWARD_TARGET = "moejax_causal_attention"
BACKWARD_TARGET = "moejax_causal_attention_backward"


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """softmax(q k^T * scale, causal) v per (sequence, kv head, query head in its group)."""
    cpu_kernels.require((q, k, v), "model.attention_kernel=blas",
                        "model.attention_kernel=blockwise or plain")
    return _attention(q, k, v, float(scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, scale):
    return _forward(q, k, v, scale)[0]


def _forward(q, k, v, scale):
    q, k, v = cpu_kernels.alike(q, k, v)
    batch, seq, kv_heads, groups, _ = q.shape
    call = jax.ffi.ffi_call(
        FORWARD_TARGET,
        (cpu_kernels.result(q, (batch, seq, kv_heads, groups, v.shape[-1])),
         cpu_kernels.result(q, (batch, kv_heads, seq, groups))),  # log-sum-exp per query row
        vmap_method="sequential")
    out, lse = call(q, k, v, scale=np.float32(scale))
    return out, (q, k, v, out, lse)


def _backward(scale, residuals, d_out):
    q, k, v, out, lse = residuals
    q, k, v, out, lse, d_out = cpu_kernels.alike(q, k, v, out, lse, d_out)
    call = jax.ffi.ffi_call(
        BACKWARD_TARGET,
        tuple(cpu_kernels.result(q, x.shape) for x in (q, k, v)),
        vmap_method="sequential")
    return call(q, k, v, out, lse, d_out, scale=np.float32(scale))


_attention.defvjp(_forward, _backward)
