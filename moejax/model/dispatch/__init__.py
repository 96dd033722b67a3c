"""MoE dispatch: token copies to their experts and the results back, by `moe.dispatch`.

- `shards`: the expert-shard plumbing (`on_expert_shards`, the one shard_map), the one token
  `Exchange` over the `expert` axis (all_to_all or ragged_all_to_all, optional fp8 payload),
  and `DispatchStats`, what every back-end reports.
- `dropless`: the default; no copy dropped, work and memory follow the N k assignments.
- `grouped`: dropless's grouped SwiGLU over rows sorted by expert (tiles on CPU, ragged_dot);
  `grouped_fp8`: the same in fp8 (both recipes, forward and backward).
- `capacity`: buffers of C slots per expert; copies over capacity dropped and counted.
- `dense`: every expert on every token, masked; the test oracle.

Every back-end is `fn(x [B, T, D], expert_ids [B, T, k], weights [B, T, k], experts: FFN,
cfg: MoEConfig, matmul: Matmul, fp8_dispatch: bool) -> (y [B, T, D], DispatchStats)`.
"""

from __future__ import annotations

from moejax.model.dispatch.capacity import capacity_moe, capacity_per_expert
from moejax.model.dispatch.dense import dense_moe
from moejax.model.dispatch.dropless import dropless_moe, max_destinations, row_tile
from moejax.model.dispatch.grouped import padded_rows
from moejax.model.dispatch.shards import DispatchStats, Exchange, on_expert_shards

__all__ = [
    "BACKENDS",
    "DispatchStats",
    "Exchange",
    "backend",
    "capacity_moe",
    "capacity_per_expert",
    "dense_moe",
    "dropless_moe",
    "max_destinations",
    "on_expert_shards",
    "padded_rows",
    "row_tile",
]

BACKENDS = {"dropless": dropless_moe, "capacity": capacity_moe, "dense": dense_moe}


def backend(name: str):
    """The back-end that `moe.dispatch` names (the config has checked the name)."""
    return BACKENDS[name]
