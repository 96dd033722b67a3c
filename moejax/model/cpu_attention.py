"""Causal attention on XLA:CPU through BLAS: the `blas` training-attention kernel
(model.attention_kernel; auto's choice on CPU in float32 where moejax's CPU kernels build).

Why: XLA:CPU runs attention's [B x H]-batched small GEMMs (scores [T, Qk] x [Qk, T], weighted
sums [T, T] x [T, V]) through batched fusions at a small fraction of the machine's GEMM speed,
and the materialised scores, their mask, softmax and transposes are more passes over [B, H, T, T]
arrays. Here one XLA FFI call (csrc/causal_attention.cc, built by cpu_kernels.py) runs
each (sequence, kv head) pair as OpenBLAS sgemms over chunks of 64 query positions, each chunk
against only the keys it can see, with the softmax in between; the backward is a second call
that recomputes the probabilities from the saved log-sum-exp (as flash attention does). Nothing
[T, T] is kept between the two: the residuals are q, k, v, the output and the log-sum-exp
[B, K, T, G], linear in T like the blockwise kernel's.

Queries and keys may come in two parts whose dot products add (MLA's no-position and RoPE
dims, its RoPE key one for every head): the call packs them itself, so the caller neither
concatenates them nor broadcasts the shared key to every head.

float32 only. Shapes as attention.fused_attention: q [B, T, K, G, Qk], k [B, T, K, Qk],
v [B, T, K, Qv] -> [B, T, K, G, Qv]; query position t sees key positions 0..t.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from moejax.model import cpu_kernels

FORWARD_TARGET = "moejax_causal_attention"
BACKWARD_TARGET = "moejax_causal_attention_backward"


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float,
                     q_rope: jax.Array | None = None, k_rope: jax.Array | None = None):
    """softmax((q k^T + q_rope k_rope^T) * scale, causal) v per (sequence, kv head, query head
    in its group). q_rope [B, T, K, G, R] and k_rope [B, T, K or 1, R] (1: shared by every kv
    head) are an optional second part of the queries and keys."""
    cpu_kernels.require((q, k, v), "model.attention_kernel=blas",
                        "model.attention_kernel=blockwise or plain")
    if q_rope is None:
        q_rope = jnp.zeros((*q.shape[:-1], 0), q.dtype)
        k_rope = jnp.zeros((*k.shape[:2], 1, 0), k.dtype)
    cpu_kernels.require((q_rope, k_rope), "model.attention_kernel=blas",
                        "model.attention_kernel=blockwise or plain")
    # under shard_map: every input varying like the others, so each gradient has its input's type
    return _attention(*cpu_kernels.alike(q, q_rope, k, k_rope, v), float(scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, q_rope, k, k_rope, v, scale):
    return _forward(q, q_rope, k, k_rope, v, scale)[0]


def _forward(q, q_rope, k, k_rope, v, scale):
    batch, seq, kv_heads, groups, _ = q.shape
    call = jax.ffi.ffi_call(
        FORWARD_TARGET,
        (cpu_kernels.result(q, (batch, seq, kv_heads, groups, v.shape[-1])),
         cpu_kernels.result(q, (batch, kv_heads, seq, groups))),  # log-sum-exp per query row
        vmap_method="sequential")
    out, lse = call(q, q_rope, k, k_rope, v, scale=np.float32(scale))
    return out, (q, q_rope, k, k_rope, v, out, lse)


def _backward(scale, residuals, d_out):
    q, q_rope, k, k_rope, v, out, lse = residuals
    q, q_rope, k, k_rope, v, out, lse, d_out = cpu_kernels.alike(
        q, q_rope, k, k_rope, v, out, lse, d_out)
    per_head_k_rope = (*k.shape[:-1], k_rope.shape[-1])  # the call's d_k_rope, per kv head
    call = jax.ffi.ffi_call(
        BACKWARD_TARGET,
        tuple(cpu_kernels.result(q, shape) for shape in
              (q.shape, q_rope.shape, k.shape, per_head_k_rope, v.shape)),
        vmap_method="sequential")
    d_q, d_q_rope, d_k, d_k_rope, d_v = call(q, q_rope, k, k_rope, v, out, lse, d_out,
                                             scale=np.float32(scale))
    if k_rope.shape[2] != k.shape[2]:  # one k_rope shared by every kv head
        d_k_rope = jnp.sum(d_k_rope, axis=2, keepdims=True)
    return d_q, d_q_rope, d_k, d_k_rope, d_v


_attention.defvjp(_forward, _backward)
