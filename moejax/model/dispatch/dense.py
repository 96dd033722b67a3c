"""The dense dispatch (`moe.dispatch: dense`): every expert on every token, masked by the routing
weights. A test oracle only (E N work and memory), never a production path."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.config import MoEConfig
from moejax.model.dispatch.shards import DispatchStats
from moejax.model.layers import FFN, Matmul


def dense_moe(x, expert_ids, weights, experts: FFN, cfg: MoEConfig, matmul: Matmul,
              fp8_dispatch: bool = False):
    """Oracle: every expert on every token [B, T, E, D], weighted by a dense gate [B, T, E].
    Always in plain `matmul.dtype` (no fp8): it is the reference the fast paths are held to.
    Returns (y [B, T, D], DispatchStats with nothing dropped)."""
    del fp8_dispatch
    dtype = matmul.dtype
    gate = jnp.sum(
        jax.nn.one_hot(expert_ids, cfg.num_experts, dtype=jnp.float32) * weights[..., None], axis=-2
    )
    w_gate, w_up, w_down = (w.astype(dtype) for w in (experts.w_gate, experts.w_up, experts.w_down))
    hidden = jax.nn.silu(jnp.einsum("btd,edf->btef", x.astype(dtype), w_gate))
    hidden = hidden * jnp.einsum("btd,edf->btef", x.astype(dtype), w_up)
    out = jnp.einsum("btef,efd->bted", hidden, w_down)
    y = jnp.einsum("bted,bte->btd", out, gate.astype(dtype))
    return y, DispatchStats(dropped=jnp.zeros((), jnp.float32))
