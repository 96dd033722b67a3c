"""The dropless dispatch (`moe.dispatch: dropless`, DeepSeek's mode): no token is ever dropped,
and the work and memory follow the N k useful assignments, not E N.

On one shard: the token copies are sorted by expert, each expert's group is padded to whole row
tiles and one grouped SwiGLU runs over the used tiles (grouped.py). Static bound on the sorted
buffer: N k + E (tile - 1) rows.

Under expert parallelism (P shards of the `expert` axis, E_ = E / P experts each), inside the
one shard_map:
1. a token travels once to each shard that holds at least one of its experts (not once per
   expert), with its local expert ids (-1 for experts elsewhere) and their routing weights;
2. the receiving shard runs its local experts on the token and sums their weighted outputs;
3. that one row travels back, and the token's shard sums the rows of all its destinations.
The exchange (shards.Exchange) is a dense all_to_all of one buffer per (source, destination)
pair of N_ rows (a token visits a destination at most once, so no pair can overflow), or on
GPU/TPU a ragged_all_to_all of the used rows. A row carries min(k, E_) local expert ids (a token
has at most that many experts on one shard), so the receiving shard's sorted buffer and its
combine buffer hold P N_ min(k, E_) assignments at most (every token of every shard on every
local expert), plus the tile padding. With group-limited routing whose groups line up with the
shards (moe.num_groups a multiple of P), a token reaches at most min(P, k, topk_groups) shards.
Bounded (moe.receive_factor set): the pair buffers hold C < N_ rows (`pair_capacity`, what
balanced routing needs with some slack) and the exchange runs in rounds of C rows per pair
until every queue is empty, so all buffers shrink by C / N_ and nothing is dropped.

DeepSeek's fp8 recipe on this path: with `precision.fp8` on the experts the three grouped GEMMs
run in fp8 forward and backward (grouped_fp8.py: per-expert scales for `tensor`, 1 x 128 /
128 x 128 tiles for `block`), and with `precision.fp8_dispatch` the token rows go out as e4m3
with one power-of-two scale per 1 x fp8_block_size slice while the results come back in the
compute dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from moejax import sharding
from moejax.config import MoEConfig
from moejax.model import cpu_kernels
from moejax.model.dispatch import grouped, grouped_fp8
from moejax.model.dispatch.shards import DispatchStats, Exchange, on_expert_shards
from moejax.model.layers import FFN, Matmul
from moejax.sharding import same_varying_axes


def max_destinations(cfg: MoEConfig, shards: int) -> int:
    """The most expert shards one token can reach: min(P, k), and with group-limited routing
    whose groups each sit inside one shard (num_groups a multiple of P) at most topk_groups."""
    bound = min(shards, cfg.top_k)
    if cfg.num_groups > 1 and cfg.num_groups % shards == 0:
        bound = min(bound, cfg.topk_groups)
    return bound


def row_tile(num_assignments: int, cfg: MoEConfig) -> int:
    """The row tile: the largest power of two at or below half the mean group size
    (assignments / E; at least 8), capped at moe.tile_rows. Half the mean keeps the expected
    padding (about half a tile per expert) at or below a quarter of the useful rows; bigger
    tiles run faster on CPU (docs/bench_moe.md: tile sweep)."""
    half_mean_group = max(8, num_assignments // (2 * cfg.num_experts))
    return min(cfg.tile_rows, 1 << (half_mean_group.bit_length() - 1))


@dataclasses.dataclass(frozen=True)
class GroupRows:
    """How a shard's sorted buffer is cut for the grouped SwiGLU: `block_rows` C0 rows per local
    expert in blocks that run as one batched GEMM (0: none) and the row `tile` of the rest."""

    tile: int
    block_rows: int = 0


BLOCK_SPREAD = 2.0  # C0 = mean group + BLOCK_SPREAD x sqrt(mean group): see group_rows


def group_rows(cfg: MoEConfig, tokens_per_shard: int, shards: int, kernel: str) -> GroupRows:
    """kernel "tiles" or "ragged": tiles of `row_tile` rows only. "blocks": C0 = the mean group
    under balanced routing, m = N_ k / E_ assignments per local expert, plus two standard
    deviations of a Poisson count (2 sqrt(m)), rounded up to 8 rows: about 2% of experts
    overflow when routing is balanced, at a padding of 2 / sqrt(m) (12% at m = 256); the
    overflow in tiles of the largest power of two at or below sqrt(m), at least 8, at most
    `row_tile` (docs/bench_moe.md). "blas": tiles of one row (each group exactly its rows, no
    padding: the BLAS GEMMs take any row count)."""
    if kernel == "blas":
        return GroupRows(1)
    tile = row_tile(tokens_per_shard * shards * cfg.top_k, cfg)
    if kernel != "blocks":
        return GroupRows(tile)
    mean = tokens_per_shard * cfg.top_k / (cfg.num_experts // shards)
    block = math.ceil((mean + BLOCK_SPREAD * math.sqrt(mean)) / 8) * 8
    spread_tile = 1 << (max(1, math.isqrt(int(mean))).bit_length() - 1)
    return GroupRows(max(8, min(tile, spread_tile)), block)


def grouped_kernel(cfg: MoEConfig, fp8: bool, dtype=jnp.float32,
                   backend: str | None = None) -> str:
    """moe.kernels resolved for expert GEMMs in `dtype` on `backend` (default: this process's
    first device's): auto is ragged off CPU; on CPU blas for float32 where its library builds
    (moejax/model/cpu_swiglu.py), else tiles. blocks or blas with fp8 is tiles (the fp8 grouped
    GEMMs are tiled, grouped_fp8.py). blas off CPU is refused in one line."""
    kernel = cfg.kernels
    backend = jax.default_backend() if backend is None else backend
    if kernel == "blas" and backend != "cpu":
        raise ValueError(f"moe.kernels=blas runs on CPU only (this is {backend}): use "
                         "moe.kernels=auto, which is ragged here.")
    if kernel == "auto" and backend != "cpu":
        kernel = "ragged"
    elif kernel == "auto":
        usable = _blas_applies(fp8, dtype) and cpu_kernels.unavailable_reason() is None
        kernel = "blas" if usable else "tiles"
    return "tiles" if kernel in ("blocks", "blas") and fp8 else kernel


def _blas_applies(fp8: bool, dtype) -> bool:
    """Whether expert GEMMs of this kind are the BLAS kernel's to run: float32, not fp8."""
    return jnp.dtype(dtype) == jnp.float32 and not fp8


def kernel_description(cfg: MoEConfig, matmul: Matmul) -> str:
    """One line for the start-up log: the grouped GEMM the dropless experts run, and why auto
    kept the tiles kernel on CPU when the BLAS one cannot be built here."""
    kernel = grouped_kernel(cfg, bool(matmul.fp8), matmul.dtype)
    line = f"moe.kernels={cfg.kernels} -> {kernel}"
    if cfg.kernels == "auto" and kernel == "tiles" and _blas_applies(bool(matmul.fp8),
                                                                      matmul.dtype):
        line += f" (blas unavailable: {cpu_kernels.unavailable_reason()})"
    return line


@dataclasses.dataclass(frozen=True)
class StaticRows:
    """The static row counts of one shard's dropless buffers (see `static_rows`)."""

    exchange_rows: int  # P C: each exchange buffer, [P C, D] out and back (0 on one shard)
    slots: int  # s: (id, weight) slots a row carries, min(k, E_) (k on one shard)
    assignment_rows: int  # P C s (N k on one shard): the assignments one round can deliver
    pass_assignments: int  # A: the assignments one grouped-GEMM pass sorts (`pass_capacity`)
    sorted_rows: int  # R: A + E_ (tile - 1) padding rows, in whole tiles; [R, D] and [R, F]
    combine_rows: int  # M: the combine's [M, D] (P C, or N on one shard)
    # C0: each local expert's block rows (kernel "blocks": [E_ C0, D] and [E_, C0, F] beside
    # the R rows the overflow's tiles may use); 0: tiles only
    block_rows: int = 0


def static_rows(tokens_per_shard: int, num_experts: int, top_k: int, expert_shards: int,
                tile: int | GroupRows, pair_rows: int | None = None,
                pass_assignments: int | None = None) -> StaticRows:
    """The buffer bounds of one exchange round of `dropless_moe_local` (tests/test_dropless.py
    checks them against its traced program), for N_ tokens on a shard, E experts over P
    expert shards (E_ = E / P each), the row tile (`row_tile` of N_ P k), C = `pair_rows`
    rows per (source, destination) pair and round (`pair_capacity`; N_ when None) and A =
    `pass_assignments` per grouped-GEMM pass (`pass_capacity`; all a round delivers when None).
    One shard: no exchange, N k assignments. P shards: each of the P pair buffers holds C rows
    (N_, the worst case, when receive_factor is null: a token is sent at most once to each
    shard); a row carries s = min(k, E_) local expert slots, so a round delivers at most
    P C s assignments, sorted A at a time. The sorted buffer adds at most tile - 1 padding
    rows per local expert."""
    local_experts = num_experts // expert_shards
    if expert_shards == 1:
        exchange_rows, slots, combine_rows = 0, top_k, tokens_per_shard
        assignments = tokens_per_shard * top_k
    else:
        pair_rows = tokens_per_shard if pair_rows is None else pair_rows
        exchange_rows, slots = expert_shards * pair_rows, min(top_k, local_experts)
        assignments, combine_rows = exchange_rows * slots, exchange_rows
    per_pass = assignments if pass_assignments is None else min(assignments, pass_assignments)
    cut = tile if isinstance(tile, GroupRows) else GroupRows(tile)
    return StaticRows(exchange_rows, slots, assignments, per_pass,
                      grouped.padded_rows(per_pass, local_experts, cut.tile), combine_rows,
                      cut.block_rows)


def grouped_experts(rows, local_ids, weights, experts: FFN, matmul: Matmul, cut: GroupRows,
                    max_assignments: int, kernel: str) -> tuple[jax.Array, DispatchStats]:
    """rows [M, D] with their local expert ids and weights [M, k] (id -1: an expert elsewhere,
    weight 0) -> (sum_j weights[:, j] * expert_{ids[:, j]}(rows) [M, D], DispatchStats:
    computed (padded) rows, useful rows, routed assignments the buffer had no row for (0 while
    `max_assignments` bounds the routed ids, as it must statically), overflow passes). With
    `matmul.fp8` the three expert GEMMs run in fp8, forward and backward (grouped_fp8.py).
    `kernel` (`grouped_kernel`): tiles, blas or ragged; with blocks (cut.block_rows > 0)
    `blocks_then_tiles`."""
    if cut.block_rows:
        return blocks_then_tiles(rows, local_ids, weights, experts, matmul, cut, max_assignments)
    num_experts = experts.w_gate.shape[0]
    expert_of_assignment = jnp.where(local_ids >= 0, local_ids, num_experts).reshape(-1)
    buffer_rows = grouped.padded_rows(max_assignments, num_experts, cut.tile)
    layout = grouped.tile_layout(expert_of_assignment, num_experts, cut.tile, buffer_rows)

    def swiglu(sorted_rows, weights_):
        if matmul.fp8:
            return grouped_fp8.grouped_swiglu_fp8(
                sorted_rows, weights_, grouped_fp8.group_rows(layout, num_experts),
                recipe=matmul.fp8, kernel="ragged" if kernel == "ragged" else "tiles",
                block_size=matmul.fp8_block_size)
        if kernel == "ragged":
            return grouped.ragged_swiglu(sorted_rows, weights_, layout)
        if kernel == "blas":
            return grouped.blas_swiglu(sorted_rows, weights_, layout.group_rows)
        return grouped.tiled_swiglu(sorted_rows, weights_, layout.tile_expert,
                                    layout.used_tiles, cut.tile)

    y = _sorted_swiglu(rows, layout, weights, experts, matmul, swiglu)
    return y, _row_stats(layout.used_tiles * cut.tile, layout.useful_rows, layout.unplaced, 0, 0)


def _sorted_swiglu(rows, layout: grouped.TileLayout, weights, experts: FFN, matmul: Matmul,
                   swiglu):
    """rows [M, D] gathered into `layout`'s sorted buffer, `swiglu(sorted_rows, weights)` on it,
    the results combined back per row with weights [M, k] -> y [M, D]."""
    num_rows, top_k = weights.shape
    dtype = matmul.dtype
    with jax.named_scope("permute"):
        token_of_row = jnp.minimum(layout.assignment_of_row // top_k, num_rows)
        sorted_rows = grouped.take_rows(rows.astype(dtype), token_of_row,
                                        layout.row_of_assignment.reshape(num_rows, top_k))
    with jax.named_scope("experts"):
        weights_ = FFN(*(w.astype(dtype) for w in (experts.w_gate, experts.w_up, experts.w_down)))
        computed = swiglu(*same_varying_axes(sorted_rows, weights_))
    with jax.named_scope("combine"):
        return grouped.combine_rows(computed, layout.row_of_assignment.reshape(num_rows, top_k),
                                    layout.assignment_of_row, weights.astype(dtype))


def blocks_then_tiles(rows, local_ids, weights, experts: FFN, matmul: Matmul, cut: GroupRows,
                      max_assignments: int) -> tuple[jax.Array, DispatchStats]:
    """The "blocks" kernel: each local expert's first C0 = cut.block_rows assignments in its
    block of an [E_ C0, D] buffer, all blocks in one batched SwiGLU (`blocked_swiglu`); the
    assignments beyond an expert's C0 (its overflow) in a second pass, the tiles kernel on
    those alone, which runs (lax.cond, rematerialised in the backward) only when some expert
    has more than C0. Exact whatever the routing. Under balanced routing the speed is that of
    the batched GEMM; the memory is the blocks' ([E_ C0, D], [E_, C0, F] x 2) plus the tiles
    kernel's buffers, reserved for the second pass (written only when it runs), and the
    compiled program holds both kernels."""
    num_rows, top_k = local_ids.shape
    num_experts = experts.w_gate.shape[0]
    block_end = num_experts * cut.block_rows
    routed = local_ids >= 0
    expert_of_assignment = jnp.where(routed, local_ids, num_experts).reshape(-1)
    # rows past the blocks are unplaced: those assignments are the overflow
    layout = grouped.tile_layout(expert_of_assignment, num_experts, 1, block_end, cut.block_rows)
    overflow = routed & (layout.row_of_assignment.reshape(num_rows, top_k) >= block_end)

    def one_pass(index, rows_, weights_, experts_):
        if index == 0:
            y = _sorted_swiglu(rows_, layout, weights_, experts_, matmul, grouped.blocked_swiglu)
            return y, _row_stats(block_end, jnp.sum(routed & ~overflow), 0, 0, 0)
        return grouped_experts(rows_, jnp.where(overflow, local_ids, -1), weights_, experts_,
                               matmul, GroupRows(cut.tile), max_assignments, "tiles")

    needed = 1 + jnp.any(overflow).astype(jnp.int32)
    return _summed_repeats(one_pass, 2, needed, rows, weights, experts)


def pair_capacity(cfg: MoEConfig, tokens_per_shard: int, shards: int) -> int:
    """C, the rows of one (source, destination) exchange buffer per round. moe.receive_factor
    null: N_, every token of the shard (the worst case: one round always suffices). Otherwise
    receive_factor x the rows a pair expects under balanced routing, N_ (1 - C(E - E_, k) /
    C(E, k)) (the chance that a token's k experts, drawn evenly, include one of a shard's E_),
    rounded up, at most N_."""
    if cfg.receive_factor is None or shards == 1:
        return tokens_per_shard
    experts, local = cfg.num_experts, cfg.num_experts // shards
    visits = 1 - math.comb(experts - local, cfg.top_k) / math.comb(experts, cfg.top_k)
    return max(1, min(tokens_per_shard, math.ceil(cfg.receive_factor * tokens_per_shard * visits)))


def pass_capacity(cfg: MoEConfig, tokens_per_shard: int, shards: int,
                  max_assignments: int) -> int:
    """A, the assignments one grouped-GEMM pass sorts on a receiving shard. moe.receive_factor
    null, or one shard: every assignment the round can deliver (`max_assignments`, P C s: one
    pass). Otherwise receive_factor x N_ k, the assignments a shard receives per exchange under
    balanced routing (its E_ / E share of the P N_ k), at most `max_assignments`: the sorted
    buffer [R, D], its [R, F] pre-activations and the backward's copies then follow the
    expected load, not P C s (4.8x it for DeepSeek-V3 on EP64, docs/plan.md)."""
    if cfg.receive_factor is None or shards == 1:
        return max_assignments
    return max(1, min(max_assignments,
                      math.ceil(cfg.receive_factor * tokens_per_shard * cfg.top_k)))


def passes_of_grouped_experts(rows, local_ids, weights, experts: FFN, matmul: Matmul,
                              cut: GroupRows, capacity: int, kernel: str):
    """`grouped_experts` on the rows that arrived, in passes of at most `capacity` assignments
    (in row order): (y [M, D], DispatchStats: padded, useful and unplaced rows summed over the
    passes, overflow_passes the passes beyond the first). Pass 0 always runs; pass i > 0 runs
    (lax.cond, on this shard alone: a pass has no collective) only when more than i capacity
    assignments arrived, and is rematerialised in the backward, so buffers and saved
    activations are those of one pass. Exact whatever the routing: every assignment is in
    exactly one pass."""
    num_rows, slots = local_ids.shape
    most = num_rows * slots
    valid = local_ids >= 0
    order = (jnp.cumsum(valid.reshape(-1)) - 1).reshape(num_rows, slots)  # among the valid

    def one_pass(index, rows_, weights_, experts_):
        ids = local_ids if capacity >= most else jnp.where(order // capacity == index,
                                                           local_ids, -1)
        return grouped_experts(rows_, ids, weights_, experts_, matmul, cut, capacity, kernel)

    needed = jnp.maximum(1, -(-jnp.sum(valid) // capacity))
    y, stats = _summed_repeats(one_pass, -(-most // capacity), needed, rows, weights, experts)
    return y, stats.replace(overflow_passes=stats.overflow_passes + (needed - 1))


def _summed_repeats(run, most: int, needed, *args):
    """sum over i < `needed` of run(i, *args) -> (y, DispatchStats), for a traced `needed` of
    at most `most`: run 0 always; run i > 0 under lax.cond(i < needed), rematerialised in the
    backward, so buffers and saved activations are those of one run (the exchange rounds and
    the grouped-GEMM passes)."""
    def varying_alike(index, *args_):  # a cond's branches must vary over the same mesh axes
        return same_varying_axes(*run(index, *args_))

    y, stats = varying_alike(0, *args)
    nothing = jax.tree.map(jnp.zeros_like, (y, stats))  # what a run that does not happen adds
    for index in range(1, most):
        later = jax.checkpoint(functools.partial(varying_alike, index))
        y_i, stats_i = jax.lax.cond(index < needed, later, lambda *_: nothing, *args)
        y, stats = y + y_i, stats + stats_i
    return y, stats


@dataclasses.dataclass(frozen=True)
class _Queues:
    """Where the shard's tokens wait to be sent: sends [N_, P] (the token has an expert on
    shard p), position [N_, P] (its row in the pair's queue, in token order), rounds []
    (exchange rounds every shard runs: the longest queue on any shard over C, at least 1)."""

    sends: jax.Array
    position: jax.Array
    rounds: jax.Array

    @classmethod
    def of(cls, expert_ids, experts_per_shard: int, shards: int, capacity: int) -> _Queues:
        destination = expert_ids // experts_per_shard  # [N_, k]
        sends = jnp.any(destination[:, :, None] == jnp.arange(shards), axis=1)
        position = jnp.cumsum(sends, axis=0) - 1
        longest = jnp.max(jnp.sum(sends, axis=0))
        # every device runs the same rounds: the max over the axes the count varies over
        # (it is the same along the others)
        axes = tuple(sorted(sharding.varying_axes(longest)))
        longest = jax.lax.pmax(longest, axes) if axes else longest
        return cls(sends, position, jnp.maximum(1, -(-longest // capacity)))

    def undelivered(self, expert_ids, experts_per_shard: int, capacity: int, rounds) -> jax.Array:
        """Assignments (token, expert) whose row would sit beyond `rounds` rounds of C rows:
        what a dropless layer that ran out of rounds would drop (0 when it runs `rounds`)."""
        late = self.sends & (self.position >= rounds * capacity)  # [N_, P]
        destination = expert_ids // experts_per_shard
        late_assignment = jnp.take_along_axis(late, destination, axis=1)  # [N_, k]
        return jnp.sum(late_assignment)


def _send_layout(queues: _Queues, round_index, capacity: int):
    """Round `round_index`'s send buffers: (slot [N_, P]: each token's row in the flat [P C]
    buffer, P C for "not sent this round"; token [P C]: the token in each row, N_ if empty)."""
    num_tokens, shards = queues.sends.shape
    in_round = queues.sends & (queues.position // capacity == round_index)
    slot = jnp.where(in_round, jnp.arange(shards) * capacity + queues.position % capacity,
                     shards * capacity)
    token = jnp.full(shards * capacity, num_tokens, jnp.int32).at[slot.reshape(-1)].set(
        jnp.repeat(jnp.arange(num_tokens, dtype=jnp.int32), shards), mode="drop")
    return slot.astype(jnp.int32), token


def dropless_moe_local(x, expert_ids, weights, experts: FFN, cfg: MoEConfig, matmul: Matmul,
                       kernel: str, expert_axis=None, fp8_dispatch: bool = False):
    """One shard's routed-expert output: x [N_, D], expert_ids and weights [N_, k] ->
    (y [N_, D], the shard's DispatchStats: padded and useful rows, rows sent, send-buffer rows,
    exchange rounds, undelivered assignments).
    `kernel` (`grouped_kernel`): ragged (ragged_dot and ragged_all_to_all: GPU/TPU), tiles,
    blocks or blas (CPU).
    `fp8_dispatch`: the token rows travel as e4m3 with one power-of-two scale per 1 x B slice
    (B = precision.fp8_block_size, DeepSeek's 1 x 128), the results come back in the compute
    dtype; on one shard the rows get the same rounding, so one device computes what a mesh
    does.

    Under expert parallelism the exchange runs in rounds of C rows per (source, destination)
    pair (`pair_capacity`): round r sends the rows at positions [r C, (r + 1) C) of each pair's
    queue. Round 0 always runs; round r > 0 runs (lax.cond, the same on every device) only
    when some queue is longer than r C, and is rematerialised in the backward, so the
    buffers and saved activations are those of one round."""
    num_tokens, top_k = expert_ids.shape
    shards = 1 if expert_axis is None else jax.lax.axis_size(expert_axis)
    cut = group_rows(cfg, num_tokens, shards, kernel)
    send_tile = matmul.fp8_block_size
    if shards == 1:
        if fp8_dispatch:
            x = Exchange(None).out(x.astype(matmul.dtype), fp8=True, tile=send_tile)
        y, stats = grouped_experts(x, expert_ids, weights, experts, matmul, cut,
                                   num_tokens * top_k, kernel)
        one = jnp.ones((), jnp.float32)
        return y, stats.replace(rows_sent=num_tokens * one, send_buffer_rows=num_tokens * one,
                                exchanges=one)
    local_experts = experts.w_gate.shape[0]
    capacity = pair_capacity(cfg, num_tokens, shards)
    queues = _Queues.of(expert_ids, local_experts, shards, capacity)
    # the experts cast to vary like the tokens once, before the rounds: their gradient then
    # accumulates over the rounds and is summed over the batch axes once, not once per round
    x, experts = same_varying_axes(x, experts)

    def exchange_round(round_index, x_, weights_, experts_):
        return _exchange_round(x_, expert_ids, weights_, experts_, queues, round_index,
                               capacity, cfg, matmul, kernel, expert_axis, fp8_dispatch,
                               cut)

    y, stats = _summed_repeats(exchange_round, -(-num_tokens // capacity), queues.rounds,
                               x, weights, experts)
    undelivered = queues.undelivered(expert_ids, local_experts, capacity, queues.rounds)
    return y, stats.replace(dropped=stats.dropped + undelivered.astype(jnp.float32),
                            overflow_rounds=(queues.rounds - 1).astype(jnp.float32),
                            exchanges=jnp.ones((), jnp.float32))


def _exchange_round(x, expert_ids, weights, experts: FFN, queues: _Queues, round_index,
                    capacity: int, cfg: MoEConfig, matmul: Matmul, kernel: str,
                    expert_axis, fp8_dispatch: bool, cut: GroupRows):
    """One round: this round's rows out, the local experts on what arrived, the results back
    -> (this round's share of y [N_, D], its DispatchStats)."""
    num_tokens, top_k = expert_ids.shape
    shards, local_experts = queues.sends.shape[1], experts.w_gate.shape[0]
    rows = shards * capacity
    with jax.named_scope("dispatch"):
        slot, token = _send_layout(queues, round_index, capacity)
        send_rows = grouped.take_rows(x.astype(matmul.dtype), token, slot)
        shard_of_row = jnp.arange(rows) // capacity
        ids_of_row = jnp.concatenate([expert_ids, jnp.full((1, top_k), -1, expert_ids.dtype)])[
            token]
        on_shard = ids_of_row // local_experts == shard_of_row[:, None]
        send_ids = jnp.where(on_shard, ids_of_row - shard_of_row[:, None] * local_experts, -1)
        send_weights = grouped.take_rows(weights, token, slot) * on_shard
        slots = min(top_k, local_experts)  # a row reaches at most this many local experts
        send_ids, send_weights = compact_slots(send_ids, send_weights, slots)
        sent_per_shard = jnp.sum(token.reshape(shards, capacity) < num_tokens, axis=1)
        exchange = Exchange(expert_axis, sent_per_shard if kernel == "ragged" else None)
        # ids travel as float32 beside the weights (exact below 2^24): one message, not two;
        # shifted by one, so that a row nobody wrote (the ragged exchange leaves zeros) reads
        # as id -1: an empty row is neither computed nor counted as useful
        received_rows = exchange.out(send_rows, fp8=fp8_dispatch, tile=matmul.fp8_block_size)
        received_meta = exchange.out(
            jnp.concatenate([(send_ids + 1).astype(jnp.float32), send_weights], 1))
        received_ids = received_meta[:, :slots].astype(jnp.int32) - 1
    computed, stats = passes_of_grouped_experts(
        received_rows, received_ids, received_meta[:, slots:], experts, matmul, cut,
        pass_capacity(cfg, num_tokens, shards, rows * slots), kernel)
    with jax.named_scope("combine"):
        returned = exchange.back(computed)  # [P C, D]: row p C + c computed on shard p
        y = _sum_destinations(returned, slot, token, cfg, capacity)
    return y, stats.replace(rows_sent=jnp.sum(token < num_tokens).astype(jnp.float32),
                            send_buffer_rows=jnp.asarray(rows, jnp.float32))


def _sum_destinations(returned, slot, token, cfg: MoEConfig, capacity: int):
    """y [N_, D]: each token's sum of the rows its destinations returned this round, gathered
    as [N_, d, D] with d = max_destinations (not [N_, P, D]): a token reaches at most d
    shards."""
    num_tokens, shards = slot.shape
    rows = shards * capacity
    most = max_destinations(cfg, shards)
    sent = slot < rows
    rank = jnp.cumsum(sent, axis=1) - 1  # [N_, P]: the destination's place among the token's
    pick = sent[:, :, None] & (rank[:, :, None] == jnp.arange(most))  # [N_, P, d]
    row_of = jnp.where(jnp.any(pick, axis=1),
                       jnp.sum(jnp.where(pick, slot[:, :, None], 0), axis=1), rows)  # [N_, d]
    shard_of_row = jnp.arange(rows) // capacity
    token_rank = rank[jnp.minimum(token, num_tokens - 1), shard_of_row]
    reader = jnp.where(token < num_tokens, token * most + token_rank, num_tokens * most)
    per_destination = grouped.take_rows(returned, row_of.reshape(-1), reader[:, None])
    return jnp.sum(per_destination.reshape(num_tokens, most, -1), axis=1)


def _row_stats(padded, useful, unplaced, sent, send_buffer) -> DispatchStats:
    """One exchange's dropless statistics as float32 counts; dropped: the assignments the
    sorted buffer had no row for (overflow rounds 0: the caller adds rounds)."""
    f32 = jnp.float32
    return DispatchStats(dropped=jnp.asarray(unplaced, f32), padded_rows=jnp.asarray(padded, f32),
                         useful_rows=jnp.asarray(useful, f32), rows_sent=jnp.asarray(sent, f32),
                         send_buffer_rows=jnp.asarray(send_buffer, f32),
                         overflow_rounds=jnp.zeros((), f32), overflow_passes=jnp.zeros((), f32),
                         exchanges=jnp.ones((), f32))


def compact_slots(ids, weights, slots: int):
    """ids [M, k] (-1: an expert on another shard) and weights [M, k] -> [M, slots] each, the
    valid entries first, in order. Masked sums rather than a gather, so that the weights'
    gradient has no scatter-add."""
    valid = ids >= 0
    position = jnp.cumsum(valid, axis=1) - 1
    pick = valid[:, :, None] & (position[:, :, None] == jnp.arange(slots))  # [M, k, slots]
    compact_ids = jnp.where(jnp.any(pick, axis=1),
                            jnp.sum(jnp.where(pick, ids[:, :, None], 0), axis=1), -1)
    compact_weights = jnp.sum(jnp.where(pick, weights[:, :, None], 0), axis=1)
    return compact_ids, compact_weights


def dropless_moe(x, expert_ids, weights, experts: FFN, cfg: MoEConfig, matmul: Matmul,
                 fp8_dispatch: bool = False):
    """Routed-expert output for x [B, T, D] with nothing dropped; returns (y [B, T, D],
    DispatchStats summed over shards: padded rows, useful rows, rows sent, send-buffer rows).
    `fp8_dispatch`: the outgoing token rows in e4m3 (dropless_moe_local)."""
    kernel = grouped_kernel(cfg, bool(matmul.fp8), matmul.dtype)

    def local(x_, ids_, w_, experts_, expert_axis):
        return dropless_moe_local(x_, ids_, w_, experts_, cfg, matmul, kernel, expert_axis,
                                  fp8_dispatch)

    return on_expert_shards(local, x, expert_ids, weights, experts)
