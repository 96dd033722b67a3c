"""The capacity dispatch (`moe.dispatch: capacity`, Switch-style): fixed-size buffers.

Each shard sorts its token copies by expert into buffers of C slots per expert, exchanges them
with one `all_to_all` over the `expert` mesh axis, runs a batched SwiGLU over its local
experts, and sends the results back with a second `all_to_all`. Buffers are static-shaped, so
copies beyond C are dropped by a stated policy and counted:
- `position`: earlier tokens (in the shard's flattened [B_, T] order) keep their slots;
- `probs`: within each expert, the assignments with the largest routing weights keep their slots.
With `capacity_factor=None` every buffer holds the worst case (C = tokens), so nothing is dropped.

Shapes: N_ tokens on this shard, A_ = N_ k assignments, E experts, E_ local experts,
P the size of the expert axis, C slots per expert per shard.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from moejax.config import MoEConfig
from moejax.model.dispatch.shards import DispatchStats, Exchange, on_expert_shards
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


def _by_local_expert(received: jax.Array, shards: int, slots: int) -> jax.Array:
    """[P E_ C, D] as received (block p from shard p) -> [E_, P C, D]: each local expert's
    slots from every source shard."""
    width = received.shape[-1]
    by_source = received.reshape(shards, -1, slots, width)  # [P source, E_, C, D]
    return by_source.transpose(1, 0, 2, 3).reshape(by_source.shape[1], shards * slots, width)


def _by_source(computed: jax.Array, shards: int) -> jax.Array:
    """Inverse of `_by_local_expert`: [E_, P C, D] -> [P E_ C, D], block p for shard p."""
    local_experts, total_slots, width = computed.shape
    by_expert = computed.reshape(local_experts, shards, total_slots // shards, width)
    return by_expert.transpose(1, 0, 2, 3).reshape(-1, width)


def capacity_moe_local(x, expert_ids, weights, experts: FFN, cfg: MoEConfig, matmul: Matmul,
                       fp8_dispatch: bool = False, expert_axis=None):
    """One shard's routed-expert output.

    x [N_, D], expert_ids and weights [N_, k], experts: the local experts' stacked SwiGLU
    weights. With `fp8_dispatch` the outgoing token copies travel as e4m3 with one
    power-of-two scale per copy (the returning results stay in the compute dtype).
    Returns (y [N_, D] in the compute dtype, DispatchStats with the dropped assignments).
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
        send = x_padded[slot_token]  # [E C, D]: block p holds shard p's experts' slots
    with jax.named_scope("dispatch"):
        exchange = Exchange(expert_axis)
        received = _by_local_expert(exchange.out(send, fp8=fp8_dispatch), exchange.shards,
                                    slots)
    with jax.named_scope("experts"):
        computed = swiglu(experts, received, matmul)  # [E_, P C, D]
    with jax.named_scope("combine"):
        results = exchange.back(_by_source(computed, exchange.shards))  # [E C, D]
        results = jnp.concatenate([results, jnp.zeros((1, width), dtype)])
        per_assignment = results[slot].reshape(num_tokens, top_k, width)
        y = jnp.einsum("nkd,nk->nd", per_assignment, weights.astype(dtype))
    return y, DispatchStats(dropped=jnp.sum(~kept).astype(jnp.float32))


def capacity_moe(x, expert_ids, weights, experts: FFN, cfg: MoEConfig, matmul: Matmul,
                 fp8_dispatch: bool = False):
    """Routed-expert output for x [B, T, D]; returns (y [B, T, D], DispatchStats summed over
    shards: the dropped assignments)."""

    def local(x_, ids_, w_, experts_, expert_axis):
        return capacity_moe_local(x_, ids_, w_, experts_, cfg, matmul, fp8_dispatch, expert_axis)

    return on_expert_shards(local, x, expert_ids, weights, experts)
