"""The MoE feed-forward layer: shared experts plus k of E fine-grained routed experts.

y = shared(x) + sum_k w_k * expert_{i_k}(x). Routing runs on the global batch (GSPMD shards it
like any activation), so the balance losses and expert loads are global statistics, never
per-shard ones; only the dispatch itself runs inside a shard_map. Inside the pipeline's
shard_map (moejax/model/pipeline.py) x is one shard's microbatch and the statistics are that
shard's; the pipeline merges them over shards and microbatches (router.merge_microbatches).

With moe.overlap_halves the layer runs as two halves of the sequence (`in_halves`), so that
one half's exchange can be in flight while the other computes (docs/overlap.md).
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import PartitionSpec

from moejax import sharding
from moejax.config import Config
from moejax.model import dispatch
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
    if sharding.whole_or_one_shard():
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
        """-> (routed output, DispatchStats) from the back-end moe.dispatch names."""
        return dispatch.backend(e.dispatch)(x_, ids_, weights_, experts, e, matmuls["experts"],
                                            cfg.precision.fp8_dispatch)

    def shared(x_):
        if p.shared is None:
            return None
        with jax.named_scope("shared_experts"):
            return swiglu(p.shared, x_, matmuls["shared"])

    if e.overlap_halves:
        y, dispatch_stats = in_halves(routed, shared, x, routing.expert_ids, routing.weights)
    else:
        y, dispatch_stats = routed(x, routing.expert_ids, routing.weights)
        shared_y = shared(x)
        y = y if shared_y is None else y + shared_y
    stats.update(dispatch_stats.metrics(routing.expert_ids.size))
    return y.astype(x.dtype), stats


HALVES = 2


def in_halves(routed, shared, x: jax.Array, expert_ids: jax.Array, weights: jax.Array):
    """The layer in two halves of the sequence (moe.overlap_halves); every batch shard keeps its
    rows, so no data moves. Each half runs its own dispatch -> experts -> combine, then adds
    its shared expert:

        half 0:  dispatch a2a | experts | combine a2a | + shared
        half 1:        dispatch a2a | experts | combine a2a | + shared

    Nothing of half 1 depends on half 0 (routing is token-local and ran on the whole batch
    before), so a scheduler may run half 0's expert GEMMs and both halves' shared experts while
    half 1's all-to-all is in flight, and half 1's experts while half 0's results travel back.
    On GPU, XLA's latency-hiding scheduler does that with async collectives; XLA:CPU runs
    collectives synchronously (docs/overlap.md). Per token the arithmetic is that of the
    whole-batch layer, so the output equals it; only the dispatch statistics (padding rows)
    differ.

    x [B, T, D], expert_ids and weights [B, T, k]; `routed(x_, ids_, weights_) -> (y_,
    DispatchStats)` and `shared(x_) -> y_ or None` on [B, T / 2, ...] halves. Returns
    (routed + shared [B, T, D], DispatchStats summed over the halves). An odd T splits
    unequally (the MTP modules see T - 1 tokens); a single token (generation) is not split."""
    seq = x.shape[1]
    bounds = [0, seq // HALVES, seq] if seq >= HALVES else [0, seq]  # odd: unequal halves
    outputs, stats = [], []
    for h in range(len(bounds) - 1):
        part = slice(bounds[h], bounds[h + 1])
        with jax.named_scope(f"half{h}"):
            y, stats_h = routed(x[:, part], expert_ids[:, part], weights[:, part])
            shared_y = shared(x[:, part])
        outputs.append(y if shared_y is None else y + shared_y)
        stats.append(stats_h)
    return jnp.concatenate(outputs, axis=1), functools.reduce(operator.add, stats)
