"""Expert dispatch back-ends: move token copies to their experts and the results back.

`capacity`: each shard sorts its token copies by expert into fixed-size buffers of C slots per
expert, exchanges them with one `all_to_all` over the `expert` mesh axis, runs a batched SwiGLU
over its local experts, and sends the results back with a second `all_to_all`. Buffers are
static-shaped, so copies beyond C are dropped by a stated policy and counted:
- `position`: earlier tokens (in the shard's flattened [B_, T] order) keep their slots;
- `probs`: within each expert, the assignments with the largest routing weights keep their slots.
With `capacity_factor=None` every buffer holds the worst case (C = tokens), so nothing is dropped.

`dense`: every expert on every token, masked by the routing weights. A test oracle only.

Shapes: N_ tokens on this shard, A_ = N_ k assignments, E experts, E_ local experts,
P the size of the expert axis, C slots per expert per shard.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from moejax import sharding
from moejax.config import MoEConfig
from moejax.fp8 import send_in_fp8
from moejax.model.layers import FFN, Matmul, swiglu


def capacity_per_expert(num_tokens: int, top_k: int, num_experts: int, capacity_factor) -> int:
    """C = ceil(capacity_factor * tokens * k / E), at most `tokens`; None gives the worst case."""
    if capacity_factor is None:
        return num_tokens
    return max(1, min(num_tokens, math.ceil(capacity_factor * num_tokens * top_k / num_experts)))


def rank_within_expert(expert_ids: jax.Array, weights: jax.Array, num_experts: int, policy: str):
    """For each assignment [A_], its 0-based priority rank among the assignments to its expert."""
    num_assignments = expert_ids.shape[0]
    if policy == "probs":
        order = jnp.lexsort((-weights, expert_ids))  # by expert, then by weight descending
    else:
        order = jnp.argsort(expert_ids, stable=True)  # by expert, then by position
    sorted_ids = expert_ids[order]
    first_of_expert = jnp.searchsorted(sorted_ids, jnp.arange(num_experts), side="left")
    rank_sorted = jnp.arange(num_assignments) - first_of_expert[sorted_ids]
    return jnp.zeros(num_assignments, jnp.int32).at[order].set(rank_sorted.astype(jnp.int32))


def _exchange(buffers: jax.Array, expert_axis: str | None) -> jax.Array:
    """[E, C, D] by destination expert -> [E_, P C, D] of this shard's experts (one all_to_all)."""
    if expert_axis is None:
        return buffers
    num_experts, slots, width = buffers.shape
    shards = jax.lax.axis_size(expert_axis)
    local = buffers.reshape(shards, num_experts // shards, slots, width)
    received = jax.lax.all_to_all(local, expert_axis, 0, 0, tiled=True)  # [P source, E_, C, D]
    return received.transpose(1, 0, 2, 3).reshape(num_experts // shards, shards * slots, width)


def _return(outputs: jax.Array, expert_axis: str | None) -> jax.Array:
    """Inverse of `_exchange`: [E_, P C, D] -> [E, C, D] back on the tokens' shard."""
    if expert_axis is None:
        return outputs
    local_experts, total_slots, width = outputs.shape
    shards = jax.lax.axis_size(expert_axis)
    by_source = outputs.reshape(local_experts, shards, total_slots // shards, width)
    returned = jax.lax.all_to_all(by_source.transpose(1, 0, 2, 3), expert_axis, 0, 0, tiled=True)
    return returned.reshape(shards * local_experts, total_slots // shards, width)


def capacity_moe_local(x, expert_ids, weights, experts: FFN, cfg: MoEConfig, matmul: Matmul,
                       fp8_dispatch: bool = False, expert_axis=None):
    """One shard's routed-expert output.

    x [N_, D], expert_ids and weights [N_, k], experts: the local experts' stacked SwiGLU
    weights. With `fp8_dispatch` the outgoing token copies travel as e4m3 with one
    power-of-two scale per copy (the returning results stay in the compute dtype).
    Returns (y [N_, D] in the compute dtype, dropped assignments as a float32 [1]).
    """
    num_tokens, width = x.shape
    dtype = matmul.dtype
    top_k, num_experts = cfg.top_k, cfg.num_experts
    slots = capacity_per_expert(num_tokens, top_k, num_experts, cfg.capacity_factor)
    with jax.named_scope("permute"):
        flat_ids, flat_weights = expert_ids.reshape(-1), weights.reshape(-1)
        rank = rank_within_expert(flat_ids, flat_weights, num_experts, cfg.drop_policy)
        kept = rank < slots
        slot = jnp.where(kept, flat_ids * slots + rank, num_experts * slots)  # E*C = "dropped"
        token_of_assignment = jnp.arange(num_tokens * top_k) // top_k
        slot_token = jnp.full(num_experts * slots, num_tokens).at[slot].set(
            token_of_assignment, mode="drop"
        )  # empty slots read the zero row appended below
        x_padded = jnp.concatenate([x.astype(dtype), jnp.zeros((1, width), dtype)])
        send = x_padded[slot_token].reshape(num_experts, slots, width)
    with jax.named_scope("dispatch"):
        exchange = functools.partial(_exchange, expert_axis=expert_axis)
        received = send_in_fp8(send, exchange) if fp8_dispatch else exchange(send)
    with jax.named_scope("experts"):
        computed = swiglu(experts, received, matmul)  # [E_, P C, D]
    with jax.named_scope("combine"):
        results = _return(computed, expert_axis).reshape(num_experts * slots, width)
        results = jnp.concatenate([results, jnp.zeros((1, width), dtype)])
        per_assignment = results[slot].reshape(num_tokens, top_k, width)
        y = jnp.einsum("nkd,nk->nd", per_assignment, weights.astype(dtype))
    return y, jnp.sum(~kept).astype(jnp.float32)[None]


def on_expert_shards(local_fn, x, expert_ids, weights, experts: FFN):
    """Run `local_fn(x_ [N_, D], ids_ [N_, k], weights_ [N_, k], local experts, expert_axis)
    -> (y_ [N_, D], per-shard statistics [S])` on every shard and return (y [B, T, D],
    statistics summed over shards [S]).

    With a mesh set, one shard_map: tokens sharded over every batch axis, experts over
    `expert`. Without a mesh, the same code runs on the whole batch with no exchange. Inside
    the pipeline's shard_map (manual over every axis) x and experts are already this shard's:
    `local_fn` runs directly and the statistics are this shard's alone."""
    width, top_k = x.shape[-1], expert_ids.shape[-1]

    def local(x_, ids_, w_, experts_, expert_axis):
        n_tokens = x_.shape[0] * x_.shape[1]
        y_, stats_ = local_fn(x_.reshape(n_tokens, width), ids_.reshape(n_tokens, top_k),
                              w_.reshape(n_tokens, top_k), experts_, expert_axis)
        return y_.reshape(x_.shape), stats_[None]

    if sharding.current_mesh() is None or sharding.manual_axes():
        axis = "expert" if sharding.manual_axes() else None
        y, stats = local(x, expert_ids, weights, experts, expert_axis=axis)
        return y, jnp.sum(stats, axis=0)
    tokens = PartitionSpec(sharding.BATCH_AXES)
    expert_weights = FFN(*(PartitionSpec("expert"),) * 3)
    sharded = jax.shard_map(
        lambda *args: local(*args, expert_axis="expert"),
        in_specs=(tokens, tokens, tokens, expert_weights),
        out_specs=(tokens, tokens),
    )
    y, stats = sharded(x, expert_ids, weights, experts)
    return y, jnp.sum(stats, axis=0)


def capacity_moe(x, expert_ids, weights, experts: FFN, cfg: MoEConfig, matmul: Matmul,
                 fp8_dispatch: bool = False):
    """Routed-expert output for x [B, T, D]; returns (y [B, T, D], dropped assignments total)."""

    def local(x_, ids_, w_, experts_, expert_axis):
        return capacity_moe_local(x_, ids_, w_, experts_, cfg, matmul, fp8_dispatch, expert_axis)

    y, dropped = on_expert_shards(local, x, expert_ids, weights, experts)
    return y, dropped[0]


def dense_moe(x, expert_ids, weights, experts: FFN, cfg: MoEConfig, matmul: Matmul,
              fp8_dispatch: bool = False):
    """Oracle: every expert on every token [B, T, E, D], weighted by a dense gate [B, T, E].
    Always in plain `matmul.dtype` (no fp8): it is the reference the fast paths are held to."""
    del fp8_dispatch
    dtype = matmul.dtype
    gate = jnp.sum(
        jax.nn.one_hot(expert_ids, cfg.num_experts, dtype=jnp.float32) * weights[..., None], axis=-2
    )
    w_gate, w_up, w_down = (w.astype(dtype) for w in (experts.w_gate, experts.w_up, experts.w_down))
    hidden = jax.nn.silu(jnp.einsum("btd,edf->btef", x.astype(dtype), w_gate))
    hidden = hidden * jnp.einsum("btd,edf->btef", x.astype(dtype), w_up)
    out = jnp.einsum("btef,efd->bted", hidden, w_down)
    return jnp.einsum("bted,bte->btd", out, gate.astype(dtype)), jnp.zeros((), jnp.float32)
