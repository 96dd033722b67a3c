"""The expert-shard plumbing every dispatch back-end runs on.

- `on_expert_shards`: one `jax.shard_map` (tokens over every batch axis, experts over `expert`)
  around a back-end's per-shard function, or that function alone without a mesh or inside the
  pipeline's shard_map; its statistics are summed over shards.
- `Exchange`: the one token exchange over the `expert` axis, out and back (dense `all_to_all`,
  or `ragged_all_to_all` on GPU/TPU), with the optional fp8 payload.
- `DispatchStats`: what every back-end reports besides its output.

Shapes: N_ tokens on this shard, P the size of the expert axis, X rows per destination block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import PartitionSpec

from moejax import sharding
from moejax.fp8 import send_in_fp8
from moejax.model.layers import FFN


@struct.dataclass
class DispatchStats:
    """A back-end's statistics: float32 counts [], summed over expert shards (and over the
    halves of moe.overlap_halves); `metrics` turns them into the layer's ratios.

    dropped: token copies (assignments) dropped: over capacity (`capacity`); for `dropless`,
    those its buffers had no row for or its exchange rounds did not reach (0 unless a bound
    is wrong: counted from the buffers, so a test of it can fail; `dense`: 0).
    The row counts, filled by `dropless` alone (None for the others):
    padded_rows: rows of the sorted buffers the grouped GEMM ran (whole row tiles);
    useful_rows: the assignments among them;
    rows_sent: rows the exchange sent out (one per token and destination shard; N on one shard);
    send_buffer_rows: rows of the send buffers (P C per round and shard; N on one shard);
    overflow_rounds: exchange rounds beyond the first (the same on every shard);
    overflow_passes: grouped-GEMM passes beyond the first on the receiving shard, summed over
    the rounds (moe.receive_factor bounds a pass's assignments); and
    exchanges: 1 per shard's exchange, so that their ratios are means over shards."""

    dropped: jax.Array
    padded_rows: jax.Array | None = None
    useful_rows: jax.Array | None = None
    rows_sent: jax.Array | None = None
    send_buffer_rows: jax.Array | None = None
    overflow_rounds: jax.Array | None = None
    overflow_passes: jax.Array | None = None
    exchanges: jax.Array | None = None

    def __add__(self, other: DispatchStats) -> DispatchStats:
        return jax.tree.map(jnp.add, self, other)

    def metrics(self, num_assignments: int) -> dict:
        """The layer statistics (their names are the metrics.jsonl keys): dropped_fraction, and
        with row counts padding_overhead (padded / useful rows - 1), exchange_fill (rows
        sent / send-buffer rows), overflow_rounds (exchange rounds beyond the first) and
        overflow_passes (grouped-GEMM passes beyond the first)."""
        out = {}
        if self.padded_rows is not None:
            out["padding_overhead"] = ((self.padded_rows - self.useful_rows)
                                       / jnp.maximum(self.useful_rows, 1.0))
            out["exchange_fill"] = self.rows_sent / self.send_buffer_rows
            out["overflow_rounds"] = self.overflow_rounds / self.exchanges
            out["overflow_passes"] = self.overflow_passes / self.exchanges
        out["dropped_fraction"] = self.dropped / num_assignments
        return out


def _sum_over_shards(stats: DispatchStats) -> DispatchStats:
    return jax.tree.map(lambda s: jnp.sum(s, axis=0), stats)


def on_expert_shards(local_fn, x, expert_ids, weights, experts: FFN):
    """Run `local_fn(x_ [N_, D], ids_ [N_, k], weights_ [N_, k], local experts, expert_axis)
    -> (y_ [N_, D], the shard's DispatchStats)` on every shard and return (y [B, T, D],
    DispatchStats summed over shards).

    With a mesh set, one shard_map: tokens sharded over every batch axis, experts over
    `expert`. Without a mesh, the same code runs on the whole batch with no exchange. Inside
    the pipeline's shard_map (manual over every axis) x and experts are already this shard's:
    `local_fn` runs directly and the statistics are this shard's alone."""
    width, top_k = x.shape[-1], expert_ids.shape[-1]

    def local(x_, ids_, w_, experts_, expert_axis):
        n_tokens = x_.shape[0] * x_.shape[1]
        y_, stats_ = local_fn(x_.reshape(n_tokens, width), ids_.reshape(n_tokens, top_k),
                              w_.reshape(n_tokens, top_k), experts_, expert_axis)
        return y_.reshape(x_.shape), jax.tree.map(lambda s: s[None], stats_)

    if sharding.whole_or_one_shard():
        axis = "expert" if sharding.manual_axes() else None
        y, stats = local(x, expert_ids, weights, experts, expert_axis=axis)
        return y, _sum_over_shards(stats)
    tokens = PartitionSpec(sharding.BATCH_AXES)
    expert_weights = FFN(*(PartitionSpec("expert"),) * 3)
    sharded = jax.shard_map(
        lambda *args: local(*args, expert_axis="expert"),
        in_specs=(tokens, tokens, tokens, expert_weights),
        out_specs=(tokens, tokens),
    )
    y, stats = sharded(x, expert_ids, weights, experts)
    return y, _sum_over_shards(stats)


class Exchange:
    """Moves [P X, ...] buffers whose row block p (X rows) is meant for shard p of the expert
    axis so that block q holds what shard q sent (`out`), and back (`back`, the inverse).

    Dense: one all_to_all of every row. Ragged (`send_sizes` [P] given; GPU/TPU):
    `jax.lax.ragged_all_to_all` sends only the `send_sizes` used rows at the start of each
    block (XLA:CPU cannot run it); the result is the same. Without an expert axis (no mesh)
    both directions are the identity. `out(a, fp8=True)` sends the payload as e4m3 with one
    power-of-two scale per row, or per 1 x `tile` slice of a row (fp8.send_in_fp8; also
    without an expert axis, so one device computes what a mesh does); what comes `back`
    stays in its own dtype."""

    def __init__(self, expert_axis: str | None, send_sizes: jax.Array | None = None):
        self.axis = expert_axis
        self.shards = 1 if expert_axis is None else jax.lax.axis_size(expert_axis)
        self.ragged = send_sizes is not None
        if self.ragged:
            self.send_sizes = send_sizes.astype(jnp.int32)
            self.recv_sizes = jax.lax.all_to_all(self.send_sizes, expert_axis, 0, 0, tiled=True)

    def out(self, a: jax.Array, fp8: bool = False, tile: int | None = None) -> jax.Array:
        move = functools.partial(self._move, outward=True)
        return send_in_fp8(a, move, tile) if fp8 else move(a)

    def back(self, a: jax.Array) -> jax.Array:
        return self._move(a, outward=False)

    def _move(self, a: jax.Array, outward: bool) -> jax.Array:
        if self.axis is None:
            return a
        rows_per_block = a.shape[0] // self.shards
        if not self.ragged:
            by_shard = a.reshape(self.shards, rows_per_block, *a.shape[1:])
            return jax.lax.all_to_all(by_shard, self.axis, 0, 0, tiled=True).reshape(a.shape)
        send_sizes, recv_sizes = ((self.send_sizes, self.recv_sizes) if outward
                                  else (self.recv_sizes, self.send_sizes))
        block_starts = jnp.arange(self.shards, dtype=jnp.int32) * rows_per_block
        # where this shard's block lands on every receiver: at its own index
        landing = jnp.full(self.shards, jax.lax.axis_index(self.axis) * rows_per_block, jnp.int32)
        return jax.lax.ragged_all_to_all(a, jnp.zeros_like(a), block_starts, send_sizes, landing,
                                         recv_sizes, axis_name=self.axis)
