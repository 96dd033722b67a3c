"""Causal grouped-query attention with RoPE (softmax in float32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from moejax.config import ModelConfig
from moejax.model.layers import Matmul, apply_rope, rms_norm
from moejax.params import ParamSpec, normal_init, ones_init


@struct.dataclass
class Attention:
    """wq [D, H, Q], wk and wv [D, K, Q], wo [H, Q, D]; q_norm and k_norm [Q] are the per-head
    RMSNorm weights of model.qk_norm (None when it is off)."""

    wq: jax.Array
    wk: jax.Array
    wv: jax.Array
    wo: jax.Array
    q_norm: jax.Array | None = None
    k_norm: jax.Array | None = None


def attention_specs(m: ModelConfig) -> Attention:
    init = normal_init(m.init_std)
    d, h, kv, q = m.d_model, m.num_heads, m.num_kv_heads, m.head_dim
    return Attention(
        wq=ParamSpec((d, h, q), ("embed", "heads", "head_dim"), init),
        wk=ParamSpec((d, kv, q), ("embed", "kv_heads", "head_dim"), init),
        wv=ParamSpec((d, kv, q), ("embed", "kv_heads", "head_dim"), init),
        wo=ParamSpec((h, q, d), ("heads", "head_dim", "embed"), init),
        q_norm=ParamSpec((q,), ("head_dim",), ones_init) if m.qk_norm else None,
        k_norm=ParamSpec((q,), ("head_dim",), ones_init) if m.qk_norm else None,
    )


def _heads(x: jax.Array, w: jax.Array, matmul: Matmul) -> jax.Array:
    """x [B, T, D] @ w [D, H, Q] -> [B, T, H, Q] as one [D, H Q] matmul."""
    d_model, heads, head_dim = w.shape
    return matmul(x, w.reshape(d_model, heads * head_dim)).reshape(*x.shape[:2], heads, head_dim)


def causal_attention(p: Attention, x: jax.Array, rope: tuple, m: ModelConfig,
                     matmul: Matmul) -> jax.Array:
    """x [B, T, D] -> [B, T, D]; each of the K kv heads serves G = H / K query heads."""
    batch, seq, _ = x.shape
    groups = m.num_heads // m.num_kv_heads
    dtype = matmul.dtype
    cos, sin = rope
    q, k = _heads(x, p.wq, matmul), _heads(x, p.wk, matmul)
    if p.q_norm is not None:
        q, k = rms_norm(q, p.q_norm, m.norm_eps), rms_norm(k, p.k_norm, m.norm_eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    v = _heads(x, p.wv, matmul)
    q = q.reshape(batch, seq, m.num_kv_heads, groups, m.head_dim)
    scores = jnp.einsum("btkgq,bskq->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * m.head_dim**-0.5
    causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))
    scores = jnp.where(causal, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum("bkgts,bskq->btkgq", probs, v.astype(dtype))
    return matmul(out.reshape(batch, seq, m.num_heads * m.head_dim),
                  p.wo.reshape(m.num_heads * m.head_dim, m.d_model))
