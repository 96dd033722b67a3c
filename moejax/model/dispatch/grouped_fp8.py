"""fp8 grouped GEMMs over rows sorted by expert: the dropless dispatch's expert SwiGLU under
`precision.fp8` (grouped.py has the compute-dtype one), forward, dgrad and wgrad in fp8.

`grouped_fp8_matmul(rows [R, K], w [E_, K, N], groups, ...)` computes, for each expert e, the
rows of e's group times w[e], with the numerics of `moejax.fp8.fp8_matmul(rows_e, w[e])` on
that expert's rows alone (rows_e: its assignments, without the padding):

- `tensor`: one scale per expert for each operand (the expert's rows, its weight matrix, and in
  the backward its rows' gradient), e4m3 forward, e5m2 gradients. The rows of one expert are
  a tensor of their own: the scale does not depend on the row tile, on which other experts
  share the buffer, or on the expert-parallel layout (with mesh.data=1 an expert's rows are the
  same on one device and on P shards). The wgrad is then one GEMM per expert with two scalar
  scales, which a grouped kernel runs as it is; scales per row tile would need a scaled
  partial product per tile.
- `block`: DeepSeek-V3's 1 x B activation tiles and B x B weight blocks (B =
  precision.fp8_block_size) with f32 promotion per B-wide K chunk. The wgrad tiles the rows
  along M in chunks of B rows counted from the first row of each expert's group, as
  `fp8_matmul` on the expert's rows does.

Padding rows (a group's tail up to a whole row tile, and the unused tiles) never count: they
are zeroed before any amax, so their content changes no scale and no product.

Kernels (`kernel`), chosen like grouped.py's (`moe.kernels`: tiles on CPU, ragged elsewhere):
- `tiles`: the CPU form, one row tile at a time with the tile's expert weights, used tiles only.
  fp8 dots of codes with f32 accumulation, scales applied to the f32 products: an exact
  emulation (XLA:CPU computes fp8 dots exactly in f32).
- `ragged`: `jax.lax.ragged_dot` on the fp8 codes (GPU/TPU's grouped GEMM, which lowers as a
  `chlo.ragged_dot` with fp8 operands), scales applied per output row; the tensor wgrad is one
  `ragged_dot_general` contracting the ragged row axis. The block recipe runs one ragged_dot
  per K chunk (its scales vary along K, which no grouped GEMM of XLA applies).
The block wgrad, whose scales vary along the rows, is a loop over row chunks in both.

Residuals kept for the backward: `tensor` keeps the fp8 codes of the rows (1 byte a value) and
the per-expert scales, not the rows; `block` keeps the rows, which the wgrad quantises again
along M (DeepSeek's recipe), and the weights' codes and block scales.

Shapes: R rows of the sorted buffer (whole tiles), E_ local experts, K contraction, N output
width, B fp8 block size, C row chunks (static bound ceil(R / B) + E_).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from moejax import fp8
from moejax.model.dispatch import grouped
from moejax.model.layers import FFN

KERNELS = ("tiles", "ragged")
_F32 = jnp.float32


@struct.dataclass
class GroupRows:
    """How the rows of a sorted buffer [R, ...] belong to the experts' groups."""

    expert_of_row: jax.Array  # [R] int32: the row's expert, E_ for padding rows
    tile_expert: jax.Array  # [R / tile] int32: the expert of each tile (grouped.TileLayout)
    used_tiles: jax.Array  # [] int32
    group_rows: jax.Array  # [E_] int32: assignments of each expert (rows without padding)
    group_start: jax.Array  # [E_] int32: each group's first row
    group_sizes: jax.Array  # [E_] int32: each group's rows in whole tiles (ragged_dot's sizes)
    tile: int = struct.field(pytree_node=False)


def group_rows(layout: grouped.TileLayout, num_experts: int) -> GroupRows:
    """The GroupRows of a TileLayout over `num_experts` local experts: an expert's assignments
    fill its group from the group's first row, padding follows (grouped.tile_layout)."""
    num_rows, tile = layout.assignment_of_row.shape[0], layout.tile
    num_assignments = layout.row_of_assignment.shape[0]
    valid = layout.assignment_of_row < num_assignments
    expert_of_row = jnp.where(valid, layout.tile_expert[jnp.arange(num_rows) // tile],
                              num_experts).astype(jnp.int32)
    counts = jnp.zeros(num_experts + 1, jnp.int32).at[expert_of_row].add(1)[:num_experts]
    sizes = (counts + tile - 1) // tile * tile
    return GroupRows(expert_of_row, layout.tile_expert, layout.used_tiles, counts,
                     (jnp.cumsum(sizes) - sizes).astype(jnp.int32), sizes.astype(jnp.int32),
                     tile)


class _Config(NamedTuple):
    """Static arguments of the custom-vjp grouped GEMM."""

    recipe: str
    kernel: str
    block_size: int
    out_dtype: np.dtype
    x_dtype: np.dtype
    w_dtype: np.dtype
    name: str  # the GEMM's role prefix in named scopes (e.g. "gate": fp8_gate_fprop)


# --------------------------------------------------------------------------- quantisation


def _masked(x, groups: GroupRows):
    """x [R, W] with the padding rows zeroed (they count in no amax and no product)."""
    valid = groups.expert_of_row < groups.group_rows.shape[0]
    return jnp.where(valid[:, None], x, jnp.zeros((), x.dtype))


def _per_expert(values, groups: GroupRows, fill: float):
    """[E_] per-expert values -> [R] per-row values (`fill` for padding rows)."""
    return jnp.concatenate([values, jnp.full((1,), fill, values.dtype)])[groups.expert_of_row]


def _quantize_per_expert(x, groups: GroupRows, dtype):
    """Masked rows x [R, W] -> (codes [R, W] of `dtype`, scales [E_]): one scale per expert,
    max(amax of its rows, floor) / fp8_max, as fp8.quantize_tensor on the expert's rows."""
    num_experts = groups.group_rows.shape[0]
    row_amax = jnp.max(jnp.abs(x.astype(_F32)), axis=1)
    amax = jax.ops.segment_max(row_amax, groups.expert_of_row, num_segments=num_experts + 1)
    scales = jnp.maximum(amax[:num_experts], fp8.TENSOR_AMAX_FLOOR) / fp8.fp8_max(dtype)
    return fp8.cast_to_fp8(x, _per_expert(scales, groups, 1.0)[:, None], dtype), scales


def _quantize_weights_per_expert(w, dtype):
    """w [E_, K, N] -> (codes, scales [E_]): fp8.quantize_tensor of each expert's matrix."""
    amax = jnp.max(jnp.abs(w.astype(_F32)), axis=(1, 2))
    scales = jnp.maximum(amax, fp8.TENSOR_AMAX_FLOOR) / fp8.fp8_max(dtype)
    return fp8.cast_to_fp8(w, scales[:, None, None], dtype), scales


class _RowChunks(NamedTuple):
    """The block wgrad's tiling of the rows: chunks of B rows from each group's first row."""

    chunk_of_row: jax.Array  # [R] int32: C for padding rows
    start: jax.Array  # [C] int32: first row of each chunk
    expert: jax.Array  # [C] int32
    used: jax.Array  # [] int32: chunks holding rows (the first `used`, by expert)


def _row_chunks(groups: GroupRows, block: int) -> _RowChunks:
    num_rows, num_experts = groups.expert_of_row.shape[0], groups.group_rows.shape[0]
    bound = math.ceil(num_rows / block) + num_experts  # sum_e ceil(rows_e / B)
    per_expert = (groups.group_rows + block - 1) // block
    first_chunk = jnp.cumsum(per_expert) - per_expert
    valid = groups.expert_of_row < num_experts
    expert = jnp.minimum(groups.expert_of_row, num_experts - 1)
    local = (jnp.arange(num_rows) - groups.group_start[expert]) // block
    chunk_of_row = jnp.where(valid, first_chunk[expert] + local, bound).astype(jnp.int32)
    chunk_expert = jnp.searchsorted(jnp.cumsum(per_expert), jnp.arange(bound), side="right")
    chunk_expert = jnp.minimum(chunk_expert, num_experts - 1).astype(jnp.int32)
    start = groups.group_start[chunk_expert] + block * (jnp.arange(bound)
                                                        - first_chunk[chunk_expert])
    return _RowChunks(chunk_of_row, start.astype(jnp.int32), chunk_expert,
                      jnp.sum(per_expert).astype(jnp.int32))


def _quantize_row_chunks(x, chunks: _RowChunks, block: int):
    """Masked rows x [R, W] -> (e4m3 codes [R + B, W], zero rows appended so that every chunk
    can be sliced whole; scales [C, W]): one scale per chunk per column, as fp8.quantize_tiles
    on the expert's rows transposed ([W, rows_e], tiles of 1 x B along the rows)."""
    bound = chunks.start.shape[0]
    amax = jax.ops.segment_max(jnp.abs(x.astype(_F32)), chunks.chunk_of_row,
                               num_segments=bound + 1)[:bound]
    scales = jnp.maximum(amax, fp8.BLOCK_AMAX_FLOOR) / fp8.fp8_max(fp8.E4M3)
    row_scales = jnp.concatenate([scales, jnp.ones((1, x.shape[1]), _F32)])[chunks.chunk_of_row]
    codes = fp8.cast_to_fp8(x, row_scales, fp8.E4M3)
    return jnp.concatenate([codes, jnp.zeros((block, x.shape[1]), codes.dtype)]), scales


# --------------------------------------------------------------------------- kernels


def _dot(a, b, contract):
    """fp8 a . b over ((a axes), (b axes)), accumulated in f32."""
    return lax.dot_general(a, b, (contract, ((), ())), precision=fp8.FP8_PRECISION,
                           preferred_element_type=_F32)


def _tile_loop(groups: GroupRows, rows, width: int, out_dtype, tile_fn):
    """out [R, width]: tile t of the used tiles = tile_fn(expert of t, t, rows' tile t); the
    other rows stay zero."""
    tile = groups.tile

    def body(t, out):
        e = groups.tile_expert[t]
        return grouped._put_tile(out, tile_fn(e, t, grouped._tile(rows, t, tile)), t, tile)

    zeros = grouped._zeros((rows.shape[0], width), out_dtype, rows)
    return lax.fori_loop(0, groups.used_tiles, body, zeros)


def _ragged(a, b, groups: GroupRows):
    """a [R, K] fp8 grouped with b [E_, K, N] fp8 -> f32 [R, N] (rows past the groups zero)."""
    return lax.ragged_dot(a, b, groups.group_sizes, precision=fp8.FP8_PRECISION,
                          preferred_element_type=_F32)


def _tensor_product(a_q, b_q, scales, groups: GroupRows, kernel: str, out_dtype):
    """Rows a_q [R, K] times their expert's b_q [E_, K, N], times the expert's scale [E_]."""
    if kernel == "ragged":
        product = _ragged(a_q, b_q, groups) * _per_expert(scales, groups, 0.0)[:, None]
        return product.astype(out_dtype)

    def tile_fn(e, t, a_tile):
        return (_dot(a_tile, b_q[e], ((1,), (0,))) * scales[e]).astype(out_dtype)

    return _tile_loop(groups, a_q, b_q.shape[2], out_dtype, tile_fn)


def _block_product(a_q, a_scales, b_q, b_scales, groups: GroupRows, block: int, kernel: str,
                   out_dtype):
    """DeepSeek's chunked product per group: rows a_q [R, K] with 1 x B tile scales [R, Ck],
    times their expert's b_q [E_, N, K] (contracted on K) with per-row scales [E_, N, Ck];
    fp8.chunked_scaled_matmul's order of operations, chunk by chunk."""
    width = b_q.shape[1]
    if kernel == "tiles":
        def tile_fn(e, t, a_tile):
            a_tile_scales = grouped._tile(a_scales, t, groups.tile)
            out = fp8.chunked_scaled_matmul(a_tile[None], a_tile_scales[None], b_q[e][None],
                                            b_scales[e][None], block)
            return out[0].astype(out_dtype)

        return _tile_loop(groups, a_q, width, out_dtype, tile_fn)
    a_chunks = _k_chunks_first(a_q, block)  # [Ck, R, B]
    b_chunks = jnp.swapaxes(_k_chunks_first(b_q, block), 2, 3)  # [Ck, E_, B, N]
    row_b_scales = jnp.concatenate([b_scales, jnp.ones((1, *b_scales.shape[1:]), _F32)])

    def add_chunk(carry, chunk):
        accumulator, previous = carry
        a_chunk, b_chunk, a_chunk_scales, b_chunk_scales = chunk
        scale = a_chunk_scales[:, None] * b_chunk_scales[groups.expert_of_row]
        # as fp8.chunked_scaled_matmul: the add never takes a product (no FMA contraction)
        return (accumulator + previous, _ragged(a_chunk, b_chunk, groups) * scale), None

    chunks = (a_chunks, b_chunks, jnp.moveaxis(a_scales, 1, 0), jnp.moveaxis(row_b_scales, 2, 0))
    zeros = grouped._zeros((a_q.shape[0], width), _F32, a_q)
    (accumulator, last), _ = lax.scan(add_chunk, (zeros, zeros), chunks)
    return (accumulator + last).astype(out_dtype)


def _k_chunks_first(q, block: int):
    """[..., K] -> [Ck, ..., B]: the K axis zero-padded and cut into chunks of B."""
    q = fp8.pad_axis_to_multiple(q, -1, block)
    return jnp.moveaxis(q.reshape(*q.shape[:-1], -1, block), -2, 0)


def _tensor_wgrad(x_q, g_q, scales, groups: GroupRows, kernel: str):
    """Per expert x_q_e^T g_q_e [E_, K, N] f32 times its scale [E_]."""
    num_experts = groups.group_rows.shape[0]
    if kernel == "ragged":
        numbers = lax.RaggedDotDimensionNumbers(
            dot_dimension_numbers=(((0,), (0,)), ((), ())), lhs_ragged_dimensions=[0],
            rhs_group_dimensions=[])
        product = lax.ragged_dot_general(x_q, g_q, groups.group_sizes, numbers,
                                         precision=fp8.FP8_PRECISION, preferred_element_type=_F32)
        return product * scales[:, None, None]
    tile = groups.tile

    def body(t, accumulator):
        e = groups.tile_expert[t]
        partial = _dot(grouped._tile(x_q, t, tile), grouped._tile(g_q, t, tile), ((0,), (0,)))
        return grouped._add_at(accumulator, e, partial)

    zeros = grouped._zeros((num_experts, x_q.shape[1], g_q.shape[1]), _F32, x_q)
    return lax.fori_loop(0, groups.used_tiles, body, zeros) * scales[:, None, None]


def _block_wgrad(x, g, groups: GroupRows, block: int):
    """Per expert sum over its row chunks c, in order, of (x_c^T g_c codes) * (sx_c sg_c^T):
    x [R, K] and g [R, N] masked, tiled 1 x B along the rows. -> [E_, K, N] f32."""
    num_experts = groups.group_rows.shape[0]
    chunks = _row_chunks(groups, block)
    x_q, x_scales = _quantize_row_chunks(x, chunks, block)
    g_q, g_scales = _quantize_row_chunks(g, chunks, block)
    chunk_of_row = jnp.concatenate([chunks.chunk_of_row,
                                    jnp.full((block,), chunks.start.shape[0], jnp.int32)])

    def body(c, carry):
        accumulator, previous, previous_expert = carry
        start = chunks.start[c]
        # the B rows from the chunk's start may reach into the next group: keep the chunk's
        in_chunk = (lax.dynamic_slice_in_dim(chunk_of_row, start, block) == c)[:, None]
        x_chunk, g_chunk = (jnp.where(in_chunk, lax.dynamic_slice_in_dim(q, start, block),
                                      jnp.zeros((), q.dtype)) for q in (x_q, g_q))
        scale = x_scales[c][:, None] * g_scales[c][None, :]
        # add the previous chunk's scaled partial: no multiply feeds the add (no FMA)
        accumulator = grouped._add_at(accumulator, previous_expert, previous)
        return accumulator, _dot(x_chunk, g_chunk, ((0,), (0,))) * scale, chunks.expert[c]

    zeros = grouped._zeros((num_experts, x.shape[1], g.shape[1]), _F32, x)
    first_expert = grouped._zeros((), jnp.int32, x)
    accumulator, last, last_expert = lax.fori_loop(0, chunks.used, body,
                                                   (zeros, zeros[0], first_expert))
    return grouped._add_at(accumulator, last_expert, last)


# --------------------------------------------------------------------------- recipes


def _tensor_forward(x, w, groups: GroupRows, config: _Config):
    x_q, x_scales = _quantize_per_expert(_masked(x, groups), groups, fp8.E4M3)
    w_q, w_scales = _quantize_weights_per_expert(w, fp8.E4M3)
    out = _tensor_product(x_q, w_q, x_scales * w_scales, groups, config.kernel, config.out_dtype)
    return out, (x_q, x_scales, w_q, w_scales, groups)


def _tensor_backward(residuals, grad, config: _Config):
    x_q, x_scales, w_q, w_scales, groups = residuals
    g_q, g_scales = _quantize_per_expert(_masked(grad, groups), groups, fp8.E5M2)
    with jax.named_scope(f"fp8_{config.name}_dgrad"):
        # g [R, N] . w_e [K, N] over N
        grad_x = _tensor_product(g_q, jnp.swapaxes(w_q, 1, 2), g_scales * w_scales, groups,
                                 config.kernel, config.x_dtype)
    with jax.named_scope(f"fp8_{config.name}_wgrad"):
        grad_w = _tensor_wgrad(x_q, g_q, x_scales * g_scales, groups, config.kernel)
    return grad_x, grad_w.astype(config.w_dtype)


def _block_forward(x, w, groups: GroupRows, config: _Config):
    block = config.block_size
    x = _masked(x, groups)
    x_q, x_scales = fp8.quantize_tiles(x, block)  # [R, K], [R, Ck]
    w_q, w_scales = fp8.quantize_blocks(w, block)  # [E_, K, N], [E_, Ck, Cn]
    w_t_scales = fp8.rows_of_block_scales(jnp.swapaxes(w_scales, 1, 2), w.shape[2], block)
    out = _block_product(x_q, x_scales, jnp.swapaxes(w_q, 1, 2), w_t_scales, groups, block,
                         config.kernel, config.out_dtype)
    return out, (x, w_q, w_scales, groups)


def _block_backward(residuals, grad, config: _Config):
    x, w_q, w_scales, groups = residuals
    block = config.block_size
    grad = _masked(grad, groups)
    with jax.named_scope(f"fp8_{config.name}_dgrad"):
        # g [R, N] tiled along N, times the forward's weight blocks
        g_q, g_scales = fp8.quantize_tiles(grad, block)
        w_row_scales = fp8.rows_of_block_scales(w_scales, w_q.shape[1], block)  # [E_, K, Cn]
        grad_x = _block_product(g_q, g_scales, w_q, w_row_scales, groups, block, config.kernel,
                                config.x_dtype)
    with jax.named_scope(f"fp8_{config.name}_wgrad"):
        grad_w = _block_wgrad(x, grad, groups, block)
    return grad_x, grad_w.astype(config.w_dtype)


def _forward(x, w, groups, config: _Config):
    with jax.named_scope(f"fp8_{config.name}_fprop"):
        if config.recipe == "tensor":
            return _tensor_forward(x, w, groups, config)
        return _block_forward(x, w, groups, config)


def _backward(config: _Config, residuals, grad):
    if config.recipe == "tensor":
        grad_x, grad_w = _tensor_backward(residuals, grad, config)
    else:
        grad_x, grad_w = _block_backward(residuals, grad, config)
    return grad_x, grad_w, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _grouped_gemm(x, w, groups, config: _Config):
    return _forward(x, w, groups, config)[0]


_grouped_gemm.defvjp(_forward, _backward)


def grouped_fp8_matmul(rows, w, groups: GroupRows, *, recipe: str, kernel: str = "tiles",
                       block_size: int = 128, out_dtype=None, name: str = "grouped"):
    """rows [R, K] sorted by expert (groups) @ w [E_, K, N] -> [R, N] in out_dtype (default
    rows.dtype), fp8 forward and backward (module docstring); padding rows give zeros.
    Gradients come back in rows.dtype and w.dtype. `name` labels the named scopes of its
    GEMMs: fp8_<name>_fprop, fp8_<name>_dgrad, fp8_<name>_wgrad."""
    if recipe not in fp8.RECIPES:
        raise ValueError(f"recipe must be one of {fp8.RECIPES}, got {recipe!r}.")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}.")
    if rows.ndim != 2 or w.ndim != 3 or rows.shape[1] != w.shape[1]:
        raise ValueError(f"grouped_fp8_matmul needs rows [R, K] and w [E_, K, N], got "
                         f"{rows.shape} and {w.shape}.")
    config = _Config(recipe, kernel, block_size, jnp.dtype(out_dtype or rows.dtype),
                     jnp.dtype(rows.dtype), jnp.dtype(w.dtype), name)
    return _grouped_gemm(rows, w, groups, config)


def grouped_swiglu_fp8(rows, experts: FFN, groups: GroupRows, *, recipe: str, kernel: str,
                       block_size: int = 128):
    """The experts' SwiGLU over the sorted rows [R, D] -> [R, D] with three fp8 grouped GEMMs
    (gate, up, down; each its own scales, as three fp8_matmul calls would); silu and the
    product stay in the rows' dtype."""
    def matmul(x, w, name):
        return grouped_fp8_matmul(x, w, groups, recipe=recipe, kernel=kernel,
                                  block_size=block_size, name=name)

    hidden = jax.nn.silu(matmul(rows, experts.w_gate, "gate")) * matmul(rows, experts.w_up, "up")
    return matmul(hidden, experts.w_down, "down")
