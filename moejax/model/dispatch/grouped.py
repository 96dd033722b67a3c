"""Grouped expert computation over rows sorted by expert: the building blocks of the dropless
dispatch (dropless.py beside it).

- `take_rows`: a gather of rows whose gradient is again a gather, through the known inverse map
  (plain autodiff of a gather is a scatter-add, slow on every backend).
- `TileLayout`: assignments sorted by expert (stable), each expert's group padded to a multiple
  of `tile` rows, inside a buffer of a static number of rows R.
- `tiled_swiglu`: the experts' SwiGLU over that buffer, one row tile at a time with the tile's
  expert weights, for the used tiles only, with a hand-written backward in the same tiles. This is
  the CPU grouped GEMM: XLA:CPU runs `jax.lax.ragged_dot` as E dense GEMMs (E times the work).
  Off CPU `ragged_swiglu` runs `ragged_dot`, a native grouped GEMM there.
- `blocked_swiglu`: with `moe.kernels=blocks`, each expert's first C0 rows as one batched
  GEMM over [E, C0, D] (the overflow goes to tiles in a second pass, dropless.py).
- `blas_swiglu`: with `moe.kernels=blas` (auto on CPU where it builds), each expert's group,
  unpadded, its SwiGLU one XLA FFI call over BLAS GEMMs (moejax/model/cpu_swiglu.py).
- `combine_rows`: each row's weighted sum of its k results, whose backward is one gather (on
  CPU one kernel pass, moejax/model/cpu_combine.py).

Shapes: M rows of input, A assignments (M k), R rows of the sorted buffer (a multiple of tile),
E_ local experts, D model width, F expert width.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import struct

from moejax.model import cpu_combine, cpu_swiglu
from moejax.model.layers import FFN, swiglu_grads
from moejax.sharding import same_varying_axes, varying_axes


def _rows_or_zero(x: jax.Array, index: jax.Array) -> jax.Array:
    """x[index] with a zero row where index == len(x) (none). The clamped gather and the select
    fuse into the consumer's pass; concatenating a zero row to x first copies all of x."""
    if x.shape[0] == 0:
        return jnp.zeros((*index.shape, *x.shape[1:]), x.dtype)
    rows = x[jnp.minimum(index, x.shape[0] - 1)]
    valid = (index < x.shape[0]).reshape(index.shape + (1,) * (x.ndim - 1))
    return jnp.where(valid, rows, jnp.zeros((), x.dtype))


@jax.custom_vjp
def take_rows(source: jax.Array, index: jax.Array, inverse: jax.Array) -> jax.Array:
    """out[r] = source[index[r]] (index == S gives a zero row); source [S, ...], index [R].

    `inverse` [S, m] lists, for each source row, the out rows that read it (R = none): every r
    with index[r] == s appears in inverse[s]. The gradient is then the gather
    d_source[s] = sum_i d_out[inverse[s, i]]."""
    return _rows_or_zero(source, index)


def _take_rows_fwd(source, index, inverse):
    return take_rows(source, index, inverse), inverse


def _take_rows_bwd(inverse, d_out):
    # one [S, ...] gather per slot, added: XLA fuses them into one pass, where gathering all
    # m slots first builds an [S, m, ...] buffer and then reduces it
    d_source = sum(_rows_or_zero(d_out, inverse[:, i]) for i in range(inverse.shape[1]))
    return d_source, None, None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


@jax.custom_vjp
def combine_rows(computed: jax.Array, row_of_assignment: jax.Array,
                 assignment_of_row: jax.Array, weights: jax.Array) -> jax.Array:
    """y [M, D] = sum_j weights[m, j] * computed[row_of_assignment[m, j]]: each input row's
    weighted sum of its k results in the sorted buffer computed [R, D] (row R: none, adds 0).
    assignment_of_row [R] is the inverse map (M k for a padding row).

    Forward: one [M, D] gather per slot. Backward: one [R, D] gather of d_y by each buffer
    row's token, scaled by that row's weight (not the k [R, D] buffers that the transpose of k
    gathers would build), and each assignment's weight gradient from its row."""
    top_k = weights.shape[1]
    y = 0
    for j in range(top_k):
        y = y + weights[:, j:j + 1] * _rows_or_zero(computed, row_of_assignment[:, j])
    return y


def _combine_rows_fwd(computed, row_of_assignment, assignment_of_row, weights):
    y = combine_rows(computed, row_of_assignment, assignment_of_row, weights)
    return y, (computed, row_of_assignment, assignment_of_row, weights)


def _combine_rows_bwd(residuals, d_y):
    computed, row_of_assignment, assignment_of_row, weights = residuals
    top_k = weights.shape[1]
    token_of_row = assignment_of_row // top_k  # M: a padding row
    weight_of_row = _rows_or_zero(weights.reshape(-1), assignment_of_row)  # [R]
    if cpu_combine.applies(d_y, computed, weight_of_row):  # one pass (cpu_combine.py)
        d_computed, d_weight_of_row = cpu_combine.combine_backward(d_y, computed, token_of_row,
                                                                   weight_of_row)
    else:
        d_y_of_row = _rows_or_zero(d_y, token_of_row)  # [R, D]
        d_computed = weight_of_row[:, None].astype(d_y.dtype) * d_y_of_row
        d_weight_of_row = jnp.sum(d_y_of_row * computed, axis=1, dtype=jnp.float32)  # [R]
    d_weights = _rows_or_zero(d_weight_of_row, row_of_assignment).astype(weights.dtype)
    return d_computed.astype(computed.dtype), None, None, d_weights


combine_rows.defvjp(_combine_rows_fwd, _combine_rows_bwd)


def padded_rows(max_assignments: int, num_experts: int, tile: int) -> int:
    """R, the static buffer bound: every assignment plus at most tile - 1 padding rows per
    expert, rounded up to whole tiles."""
    return math.ceil((max_assignments + num_experts * (tile - 1)) / tile) * tile


@struct.dataclass
class TileLayout:
    row_of_assignment: jax.Array  # [A] int32: buffer row of each assignment (R: not routed here)
    assignment_of_row: jax.Array  # [R] int32: assignment in each buffer row (A: padding)
    tile_expert: jax.Array  # [(R - E C0) / tile] int32: the expert whose weights each tile uses
    # [E] int32: each expert's rows in the tiles part of the buffer (its group, or overflow,
    # padded to whole tiles); in expert order from row E C0 on
    group_rows: jax.Array
    used_tiles: jax.Array  # [] int32: tiles holding at least one assignment's group
    useful_rows: jax.Array  # [] int32: assignments routed here
    # [] int32: routed assignments whose row fell beyond the buffer (lost): 0 when `num_rows`
    # is a true bound (padded_rows of the assignments)
    unplaced: jax.Array
    tile: int = struct.field(pytree_node=False)
    # C0: rows [e C0, (e + 1) C0) are expert e's block (its first C0 assignments); the tiles
    # start after the E C0 block rows. 0: tiles only
    block_rows: int = struct.field(pytree_node=False, default=0)


def sort_by_expert(expert_of_assignment: jax.Array, num_experts: int):
    """(order, sorted experts) of a stable sort of assignments [A] by expert id in
    [0, num_experts]. Where (E + 1) A fits in int32, one sort of the unique keys
    expert * A + assignment (a single int32 operand: XLA:CPU sorts it several times faster
    than a stable two-operand sort); else the stable argsort."""
    num_assignments = expert_of_assignment.shape[0]
    if (num_experts + 1) * num_assignments > jnp.iinfo(jnp.int32).max:
        order = jnp.argsort(expert_of_assignment, stable=True)
        return order, expert_of_assignment[order]
    assignment = jnp.arange(num_assignments, dtype=jnp.int32)
    keys = jnp.sort(expert_of_assignment.astype(jnp.int32) * num_assignments + assignment)
    return keys % num_assignments, keys // num_assignments


def tile_layout(expert_of_assignment: jax.Array, num_experts: int, tile: int,
                num_rows: int, block_rows: int = 0) -> TileLayout:
    """Sort assignments [A] by expert (a stable sort: token order within an expert; the value
    num_experts marks an assignment with no local expert) and pad each expert's group to whole
    tiles inside a buffer of `num_rows` rows. With `block_rows` C0 > 0 each expert's first C0
    assignments fill its block of rows [e C0, (e + 1) C0) and only the rest of its group (its
    overflow) goes to tiles after the E C0 block rows: with num_rows = E C0 the overflow is
    unplaced (`blocked_swiglu` computes the blocks, a second pass the overflow)."""
    num_assignments = expert_of_assignment.shape[0]
    block_end = num_experts * block_rows
    order, sorted_expert = sort_by_expert(expert_of_assignment, num_experts)
    counts = jnp.zeros(num_experts + 1, jnp.int32).at[expert_of_assignment].add(1)[:num_experts]
    overflow = jnp.maximum(counts - block_rows, 0)
    padded = (overflow + tile - 1) // tile * tile
    group_start = jnp.cumsum(counts) - counts
    padded_start = block_end + jnp.cumsum(padded) - padded
    routed = sorted_expert < num_experts
    expert = jnp.minimum(sorted_expert, num_experts - 1)
    rank = jnp.arange(num_assignments) - group_start[expert]
    row = jnp.where(rank < block_rows, expert * block_rows + rank,
                    padded_start[expert] + rank - block_rows)
    row_sorted = jnp.where(routed, row, num_rows).astype(jnp.int32)
    unplaced = jnp.sum(routed & (row_sorted >= num_rows))
    row_of_assignment = jnp.zeros(num_assignments, jnp.int32).at[order].set(row_sorted)
    assignment_of_row = jnp.full(num_rows, num_assignments, jnp.int32).at[row_sorted].set(
        order.astype(jnp.int32), mode="drop")
    tile_starts = jnp.arange((num_rows - block_end) // tile) * tile
    tile_expert = jnp.searchsorted(jnp.cumsum(padded), tile_starts, side="right")
    return TileLayout(row_of_assignment, assignment_of_row,
                      jnp.minimum(tile_expert, num_experts - 1).astype(jnp.int32),
                      padded.astype(jnp.int32),
                      (jnp.sum(padded) // tile).astype(jnp.int32),
                      jnp.sum(counts).astype(jnp.int32), unplaced.astype(jnp.int32), tile,
                      block_rows)


def _zeros(shape, dtype, like: jax.Array) -> jax.Array:
    """Zeros that vary over the same shard_map axes as `like` (a loop carry must keep its type)."""
    axes = tuple(sorted(varying_axes(like)))
    zeros = jnp.zeros(shape, dtype)
    return jax.lax.pcast(zeros, axes, to="varying") if axes else zeros


def _tile(x: jax.Array, t, tile: int) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(x, t * tile, tile)


def _put_tile(buffer: jax.Array, value: jax.Array, t, tile: int) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(buffer, value.astype(buffer.dtype), t * tile, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def tiled_swiglu(rows: jax.Array, experts: FFN, tile_expert: jax.Array, used_tiles: jax.Array,
                 tile: int) -> jax.Array:
    """rows [R, D] sorted by expert -> [R, D]: tile t computes SwiGLU with expert
    tile_expert[t]'s weights; only the first `used_tiles` tiles run (the rest stay zero)."""
    return _tiled_swiglu_fwd(rows, experts, tile_expert, used_tiles, tile)[0]


def _tiled_swiglu_fwd(rows, experts, tile_expert, used_tiles, tile):
    num_rows, width = rows.shape
    hidden_width = experts.w_gate.shape[-1]

    def body(t, carry):
        out, gate_pre, up_pre = carry
        e = tile_expert[t]
        x = _tile(rows, t, tile)
        g, u = x @ experts.w_gate[e], x @ experts.w_up[e]
        y = (jax.nn.silu(g) * u) @ experts.w_down[e]
        return (_put_tile(out, y, t, tile), _put_tile(gate_pre, g, t, tile),
                _put_tile(up_pre, u, t, tile))

    zeros = (_zeros((num_rows, width), rows.dtype, rows),
             _zeros((num_rows, hidden_width), rows.dtype, rows),
             _zeros((num_rows, hidden_width), rows.dtype, rows))
    out, gate_pre, up_pre = jax.lax.fori_loop(0, used_tiles, body, zeros)
    return out, (rows, experts, tile_expert, used_tiles, gate_pre, up_pre)


def _add_at(stack: jax.Array, e, value: jax.Array) -> jax.Array:
    """stack[e] += value, as an in-place dynamic update (not a scatter)."""
    return jax.lax.dynamic_update_index_in_dim(stack, stack[e] + value, e, 0)


def _tiled_swiglu_bwd(tile, residuals, d_out):
    rows, experts, tile_expert, used_tiles, gate_pre, up_pre = residuals
    weights = (experts.w_gate, experts.w_up, experts.w_down)
    d_weights = tuple(_zeros(w.shape, jnp.float32, rows) for w in weights)
    d_rows, d_weights = _tiled_backward(rows, experts, tile_expert, used_tiles, gate_pre, up_pre,
                                        d_out, d_weights, tile)
    d_experts = FFN(*(d.astype(w.dtype) for d, w in zip(d_weights, weights)))
    return d_rows, d_experts, None, None


def _tiled_backward(rows, experts: FFN, tile_expert, used_tiles, gate_pre, up_pre, d_out,
                    d_weights, tile: int):
    """The tiles' backward: (d_rows [R, D], the float32 weight gradients accumulated into
    `d_weights`, one (d_gate, d_up, d_down) triple of [E, ...] stacks)."""
    f32 = jnp.float32

    def body(t, carry):
        d_rows, d_gate, d_up, d_down = carry
        e = tile_expert[t]
        x, g, u, dy = (_tile(a, t, tile) for a in (rows, gate_pre, up_pre, d_out))
        d_g, d_u, hidden = swiglu_grads(g, u, dy, experts.w_down[e].T)
        d_x = d_g @ experts.w_gate[e].T + d_u @ experts.w_up[e].T
        d_gate = _add_at(d_gate, e, jnp.dot(x.T, d_g, preferred_element_type=f32))
        d_up = _add_at(d_up, e, jnp.dot(x.T, d_u, preferred_element_type=f32))
        d_down = _add_at(d_down, e, jnp.dot(hidden.T, dy, preferred_element_type=f32))
        return _put_tile(d_rows, d_x, t, tile), d_gate, d_up, d_down

    start = (_zeros(rows.shape, rows.dtype, rows), *d_weights)
    d_rows, *d_weights = jax.lax.fori_loop(0, used_tiles, body, start)
    return d_rows, tuple(d_weights)


tiled_swiglu.defvjp(_tiled_swiglu_fwd, _tiled_swiglu_bwd)


@jax.custom_vjp
def blocked_swiglu(rows: jax.Array, experts: FFN) -> jax.Array:
    """rows [E C0, D], expert e's block of C0 rows at [e C0, (e + 1) C0) -> [E C0, D]: one
    batched SwiGLU, [E, C0, D] x [E, D, F] (a single GEMM per weight for all experts, which
    XLA:CPU runs faster than the same rows in small per-tile GEMMs: docs/bench_moe.md). The
    backward is batched GEMMs from the saved pre-activations, as `tiled_swiglu`'s."""
    return _blocked_swiglu_fwd(rows, experts)[0]


def _blocked_swiglu_fwd(rows, experts):
    num_experts, width = experts.w_gate.shape[0], rows.shape[1]
    blocks = rows.reshape(num_experts, -1, width)
    gate = jnp.einsum("ecd,edf->ecf", blocks, experts.w_gate)
    up = jnp.einsum("ecd,edf->ecf", blocks, experts.w_up)
    y = jnp.einsum("ecf,efd->ecd", jax.nn.silu(gate) * up, experts.w_down)
    return y.reshape(rows.shape), (blocks, experts, gate, up)


def _blocked_swiglu_bwd(residuals, d_out):
    blocks, experts, gate, up = residuals
    f32 = jnp.float32
    d_blocks = d_out.reshape(blocks.shape)
    d_g, d_u, hidden = swiglu_grads(gate, up, d_blocks, experts.w_down.swapaxes(1, 2))
    d_x = (jnp.einsum("ecf,edf->ecd", d_g, experts.w_gate)
           + jnp.einsum("ecf,edf->ecd", d_u, experts.w_up))
    d_weights = (jnp.einsum("ecd,ecf->edf", blocks, d_g, preferred_element_type=f32),
                 jnp.einsum("ecd,ecf->edf", blocks, d_u, preferred_element_type=f32),
                 jnp.einsum("ecf,ecd->efd", hidden, d_blocks, preferred_element_type=f32))
    weights = (experts.w_gate, experts.w_up, experts.w_down)
    d_experts = FFN(*(d.astype(w.dtype) for d, w in zip(d_weights, weights)))
    return d_x.reshape(d_out.shape).astype(blocks.dtype), d_experts


blocked_swiglu.defvjp(_blocked_swiglu_fwd, _blocked_swiglu_bwd)


def ragged_swiglu(rows: jax.Array, experts: FFN, layout: TileLayout) -> jax.Array:
    """The same result with `jax.lax.ragged_dot` over the padded groups (a native grouped GEMM
    on GPU/TPU; rows past the used tiles belong to no group and stay zero)."""
    def grouped(x, w):
        return jax.lax.ragged_dot(x, w, layout.group_rows)

    hidden = jax.nn.silu(grouped(rows, experts.w_gate)) * grouped(rows, experts.w_up)
    return grouped(hidden, experts.w_down)


def blas_swiglu(rows: jax.Array, experts: FFN, group_rows: jax.Array) -> jax.Array:
    """rows [R, D] float32 sorted by expert, expert e's group_rows[e] rows after those of the
    experts before it -> [R, D] (rows past the groups zero): SwiGLU with each expert's weights,
    one BLAS GEMM per group and weight with the activation beside them, the whole layer one XLA
    FFI call forward and one backward (cpu_swiglu.grouped_swiglu)."""
    # under shard_map the rows and weights vary like the group sizes (which vary with the
    # routing), so that the FFI calls' results, and the gradients, have the inputs' type
    rows, (experts, group_rows) = same_varying_axes(rows, (experts, group_rows))
    return cpu_swiglu.grouped_swiglu(rows, experts.w_gate, experts.w_up, experts.w_down,
                                     group_rows)
