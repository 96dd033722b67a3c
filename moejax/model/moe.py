"""The MoE feed-forward layer: shared experts plus k of E fine-grained routed experts.

y = shared(x) + sum_k w_k * expert_{i_k}(x). Routing runs on the global batch (GSPMD shards it
like any activation), so the balance losses and expert loads are global statistics, never
per-shard ones; only the dispatch itself runs inside a shard_map. Inside the pipeline's
shard_map (moejax/model/pipeline.py) x is one shard's microbatch and the statistics are that
shard's; the pipeline merges them over shards and microbatches (router.merge_microbatches).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import PartitionSpec

from moejax import sharding
from moejax.config import Config
from moejax.model import dispatch, dropless, overlap
from moejax.model.layers import FFN, ffn_specs, layer_matmuls, swiglu
from moejax.model.router import Routing, balance_losses, expert_counts, route
from moejax.params import ParamSpec, normal_init


@struct.dataclass
class MoE:
    """router [D, E] (float32); routed experts w_gate, w_up [E, D, F], w_down [E, F, D];
    shared: the shared experts fused into one SwiGLU of width num_shared * F, or None."""

    router: jax.Array
    w_gate: jax.Array
    w_up: jax.Array
    w_down: jax.Array
    shared: FFN | None


def moe_specs(cfg: Config) -> MoE:
    m, e = cfg.model, cfg.moe
    init = normal_init(m.init_std)
    d, f, n = m.d_model, e.expert_ffn_dim, e.num_experts
    shared = None
    if e.num_shared_experts:
        shared = ffn_specs(d, e.num_shared_experts * f, m.init_std)
    return MoE(
        router=ParamSpec((d, n), ("embed", None), init),
        w_gate=ParamSpec((n, d, f), ("experts", "embed", "expert_mlp"), init),
        w_up=ParamSpec((n, d, f), ("experts", "embed", "expert_mlp"), init),
        w_down=ParamSpec((n, f, d), ("experts", "expert_mlp", "embed"), init),
        shared=shared,
    )


def route_tokens(x: jax.Array, router_w, bias, temperature, cfg: Config) -> Routing:
    """Routing is token-local, so under a mesh it runs per batch shard (a plain GSPMD top-k
    would all-gather the [B, T, E] scores); statistics are reduced globally afterwards."""
    if sharding.current_mesh() is None or sharding.manual_axes():
        return route(x, router_w, bias, temperature, cfg.moe)  # x is already one shard
    tokens, replicated = PartitionSpec(sharding.BATCH_AXES), PartitionSpec()
    local_route = jax.shard_map(
        lambda *args: route(*args, cfg.moe),
        in_specs=(tokens, replicated, replicated, replicated),
        out_specs=Routing(tokens, tokens, tokens, tokens),
    )
    return local_route(x, router_w, bias, jnp.asarray(temperature, jnp.float32))


def moe_ffn(p: MoE, x: jax.Array, bias: jax.Array, temperature, cfg: Config, matmuls=None):
    """x [B, T, D] -> (y [B, T, D], layer statistics); bias [E] is the router's selection bias.

    `matmuls` maps layer groups to their Matmul (default: from cfg.precision)."""
    matmuls = matmuls or layer_matmuls(cfg.precision)
    e = cfg.moe
    with jax.named_scope("route"):
        routing = route_tokens(x, p.router, bias, temperature, cfg)
        stats = balance_losses(routing, e.num_experts, e.top_k)
        stats["expert_counts"] = expert_counts(routing.expert_ids, e.num_experts)
    experts = FFN(p.w_gate, p.w_up, p.w_down)

    def routed(x_, ids_, weights_):
        """-> (routed output, dropped assignments, dropless row statistics [4] or None)."""
        args = (x_, ids_, weights_, experts, e, matmuls["experts"], cfg.precision.fp8_dispatch)
        if e.dispatch == "dropless":
            return dropless.dropless_moe(*args)
        y_, dropped_ = (dispatch.dense_moe if e.dispatch == "dense" else dispatch.capacity_moe)(
            *args)
        return y_, dropped_, None

    def shared(x_):
        if p.shared is None:
            return None
        with jax.named_scope("shared_experts"):
            return swiglu(p.shared, x_, matmuls["shared"])

    if e.overlap_halves:
        y, dropped, rows = overlap.in_halves(routed, shared, x, routing.expert_ids,
                                             routing.weights)
    else:
        y, dropped, rows = routed(x, routing.expert_ids, routing.weights)
        shared_y = shared(x)
        y = y if shared_y is None else y + shared_y
    if rows is not None:
        padded, useful, sent, send_buffer = rows[0], rows[1], rows[2], rows[3]
        stats["padding_overhead"] = (padded - useful) / jnp.maximum(useful, 1.0)
        stats["exchange_fill"] = sent / send_buffer
    stats["dropped_fraction"] = dropped / routing.expert_ids.size
    return y.astype(x.dtype), stats
