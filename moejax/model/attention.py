"""Causal grouped-query attention with RoPE (softmax in float32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from moejax.config import ModelConfig
from moejax.model.layers import apply_rope, project
from moejax.params import ParamSpec, normal_init


@struct.dataclass
class Attention:
    """wq [D, H, Q], wk and wv [D, K, Q], wo [H, Q, D]."""

    wq: jax.Array
    wk: jax.Array
    wv: jax.Array
    wo: jax.Array


def attention_specs(m: ModelConfig) -> Attention:
    init = normal_init(m.init_std)
    d, h, kv, q = m.d_model, m.num_heads, m.num_kv_heads, m.head_dim
    return Attention(
        wq=ParamSpec((d, h, q), ("embed", "heads", "head_dim"), init),
        wk=ParamSpec((d, kv, q), ("embed", "kv_heads", "head_dim"), init),
        wv=ParamSpec((d, kv, q), ("embed", "kv_heads", "head_dim"), init),
        wo=ParamSpec((h, q, d), ("heads", "head_dim", "embed"), init),
    )


def causal_attention(p: Attention, x: jax.Array, rope: tuple, m: ModelConfig, dtype) -> jax.Array:
    """x [B, T, D] -> [B, T, D]; each of the K kv heads serves G = H / K query heads."""
    batch, seq, _ = x.shape
    groups = m.num_heads // m.num_kv_heads
    cos, sin = rope
    q = apply_rope(project("btd,dhq->bthq", x, p.wq, dtype), cos, sin)
    k = apply_rope(project("btd,dkq->btkq", x, p.wk, dtype), cos, sin)
    v = project("btd,dkq->btkq", x, p.wv, dtype)
    q = q.reshape(batch, seq, m.num_kv_heads, groups, m.head_dim)
    scores = jnp.einsum("btkgq,bskq->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * m.head_dim**-0.5
    causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))
    scores = jnp.where(causal, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum("bkgts,bskq->btkgq", probs, v).reshape(batch, seq, m.num_heads, m.head_dim)
    return project("bthq,hqd->btd", out, p.wo, dtype)
