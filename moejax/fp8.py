"""FP8 matrix multiplies with quantised forward AND backward GEMMs.

Two recipes, chosen per call with ``fp8_matmul(x, w, recipe=...)``:

``"tensor"``: online (current) per-tensor scaling. One scalar scale per operand,
    computed from the operand itself (``scale = max(amax, 1e-12) / fp8_max``).
    Forward e4m3(x) x e4m3(w); input gradient e5m2(g) x e4m3(w); weight gradient
    e4m3(x) x e5m2(g). The fp8 arrays are fed straight into ``lax.dot_general``
    with ``preferred_element_type=float32`` and the f32 result is multiplied by
    the product of the two scalar scales, so XLA:GPU (sm >= 8.9) can rewrite every
    dot into a cuBLASLt fp8 GEMM. e5m2 x e5m2 never occurs.

``"block"``: DeepSeek-V3 fine-grained scaling, all operands e4m3. Activations get
    one scale per 1 x block_size tile along the contraction dimension, weights one
    scale per block_size x block_size block, ``scale = max(amax, 1e-4) / 448``.
    Each block_size-wide K chunk is multiplied in fp8 with f32 accumulation, the
    chunk's scales are applied to that partial product and the partial products
    are summed in f32, chunk by chunk (DeepSeek's promotion to f32 every 128
    elements of K). Dgrad tiles the gradient along N and reuses the weight
    blocks; wgrad tiles x^T and g^T along M (the tokens). This is an EXACT
    EMULATION of the numerics: a scan of K/block_size small GEMMs plus
    elementwise scaling. No speedup is expected on Hopper; use it to measure
    accuracy, use ``"tensor"`` for speed.

Quantisation is always: compute in f32, divide by the scale, clip to +-fp8_max,
cast (round to nearest even). (XLA compiles x / s as x * (1/s): a one-ulp f32
difference before the fp8 rounding.) Padding (K or N not a multiple of
block_size) is with zeros, which changes neither a tile's amax nor any sum.

Error bounds (asserted in tests/test_fp8.py on N(0,1) data; measured values there)
----------------------------------------------------------------------------------
Unit roundoff u = 2^-(mantissa bits + 1): e4m3 u4 = 2^-4 = 0.0625, e5m2 u5 = 2^-3.
A quantised element is q*s = x*(1 + d) with |d| <= u while |x|/s is in the normal
range (>= 2^-6 for e4m3, 2^-14 for e5m2); below it the absolute error is at most
half the smallest subnormal: h = 2^-10*s (e4m3), 2^-17*s (e5m2). Round to nearest
with a log-uniform mantissa m gives RMS(d) = u*sqrt(E[1/m^2]/3) = 0.425*u.

GEMM, relative Frobenius error against the exact product; the per-element errors
of x and w are independent and zero-mean and the data has random signs, so
    expected  err = sqrt(RMS(d_x)^2 + RMS(d_w)^2) = 0.601*u4 = 0.0376
    bound     err <= sqrt(u_x^2 + u_w^2) = sqrt(2)*u4       = 0.0884
measured 0.037-0.038 for both recipes (f32 accumulation adds ~sqrt(K)*2^-24).

Outliers: a few entries of size A among N(0,1) activations; error on the rows
without outliers. "block": only the outliers' own 1 x block_size tiles change
scale, clean rows keep the Gaussian error (measured 0.037 for A = 1e4 and 3e5).
"tensor": s = A/448, so values below t = 2^-6*s become subnormal with error <= h:
    err^2 ~= RMS(d)^2 * (E[x^2; |x| > t] + 1) + P(|x| < t) * h^2/3.
A = 1e4: t = 0.35, h = 0.022, err 0.038 predicted and measured. e4m3 spans ~18
binades (2^-9..448), which absorbs a 1e4 outlier. A = 3e5: h = 0.65, nearly every
value is subnormal, err 0.379 predicted, 0.381 measured, 10x the block recipe.
Per-tensor e4m3 degrades once amax exceeds ~3e4 typical values (1.3x at 3e4,
3.5x at 1e5).

Gradients of 0.5*sum(y^2), y = fp8_matmul(x, w): the cotangent carries the
forward error (<= sqrt(2)*u4) and is quantised again with the other operand, so
to first order
    tensor: dx, dw  err <= sqrt(2*u4^2 + u5^2 + u4^2) = 0.165
    block:  dx, dw  err <= sqrt(2*u4^2 + u4^2 + u4^2) = 2*u4 = 0.125
measured: tensor dx 0.059-0.060, dw 0.066-0.068; block dx 0.045-0.046, dw 0.047-0.049.

Per-token dispatch quantisation (``quantize_per_token``): power-of-two scale
s = 2^ceil(log2(amax/448)), so amax/s is in (224, 448] and dequantisation is
exact; |x - q*s| <= 2^-4*|x| + 2^-10*s for every element. ``send_in_fp8`` applies it
per row or per 1 x tile slice of a row (the dropless dispatch: 1 x 128, DeepSeek's).

The same two recipes on rows sorted by expert (one grouped GEMM over all local
experts, forward and backward): moejax/model/dispatch/grouped_fp8.py, built from the
helpers here (cast_to_fp8, quantize_tiles/blocks, chunked_scaled_matmul).

Sharding: every function here is local (no collectives). Inside ``shard_map`` the
per-tensor amax is the local shard's; under plain ``jit`` with sharded operands it
becomes a global max (one scalar all-reduce).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from moejax.sharding import varying_axes

E4M3 = jnp.float8_e4m3fn
E5M2 = jnp.float8_e5m2
RECIPES = ("tensor", "block")

# Floor on amax for per-tensor and per-token scales: keeps the scale a normal
# f32 for an all-zero tensor, far below any real activation or gradient amax.
TENSOR_AMAX_FLOOR = 1e-12
# DeepSeek-V3's floor for tile/block scales.
BLOCK_AMAX_FLOOR = 1e-4
# Explicit, so that a global jax_default_matmul_precision="highest" does not put a
# meaningless HIGHEST on fp8 dots (precision only selects f32/bf16 algorithms).
FP8_PRECISION = lax.Precision.DEFAULT


def fp8_max(dtype) -> float:
    return float(jnp.finfo(dtype).max)


def cast_to_fp8(x, scale, dtype):
    """x / scale (scale broadcastable to x), clipped to the finite fp8 range, cast."""
    bound = fp8_max(dtype)
    return jnp.clip(x.astype(jnp.float32) / scale, -bound, bound).astype(dtype)


def pad_axis_to_multiple(x, axis: int, multiple: int):
    """Zero-pad `axis` of x up to the next multiple of `multiple`."""
    size = x.shape[axis]
    padding = -size % multiple
    if padding == 0:
        return x
    pad_widths = [(0, 0)] * x.ndim
    pad_widths[axis] = (0, padding)
    return jnp.pad(x, pad_widths)


def quantize_tensor(x, dtype):
    """Per-tensor quantisation: returns (q of `dtype`, scalar f32 scale), x ~= q * scale."""
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)))
    scale = jnp.maximum(amax, TENSOR_AMAX_FLOOR) / fp8_max(dtype)
    return cast_to_fp8(x, scale, dtype), scale


def quantize_tiles(x, block_size: int = 128):
    """e4m3 with one scale per 1 x block_size tile along the last axis.

    x: [..., K]. Returns q: e4m3 [..., K] and scales: f32 [..., ceil(K / block_size)];
    x[..., k] ~= q[..., k] * scales[..., k // block_size].
    """
    size = x.shape[-1]
    padded = pad_axis_to_multiple(x.astype(jnp.float32), -1, block_size)
    tiles = padded.reshape(*padded.shape[:-1], -1, block_size)
    amax = jnp.max(jnp.abs(tiles), axis=-1)
    scales = jnp.maximum(amax, BLOCK_AMAX_FLOOR) / fp8_max(E4M3)
    q = cast_to_fp8(tiles, scales[..., None], E4M3).reshape(padded.shape)
    return q[..., :size], scales


def quantize_blocks(w, block_size: int = 128):
    """e4m3 with one scale per block_size x block_size block of the last two axes.

    w: [..., K, N]. Returns q: e4m3 [..., K, N] and scales: f32 [..., ceil(K/B), ceil(N/B)];
    w[..., k, n] ~= q[..., k, n] * scales[..., k // B, n // B].
    """
    rows, cols = w.shape[-2:]
    padded = pad_axis_to_multiple(w.astype(jnp.float32), -2, block_size)
    padded = pad_axis_to_multiple(padded, -1, block_size)
    lead = padded.shape[:-2]
    blocks = padded.reshape(*lead, padded.shape[-2] // block_size, block_size,
                            padded.shape[-1] // block_size, block_size)
    amax = jnp.max(jnp.abs(blocks), axis=(-3, -1))
    scales = jnp.maximum(amax, BLOCK_AMAX_FLOOR) / fp8_max(E4M3)
    q = cast_to_fp8(blocks, scales[..., :, None, :, None], E4M3).reshape(padded.shape)
    return q[..., :rows, :cols], scales


def quantize_per_token(x):
    """e4m3 with one power-of-two scale per row (token) of x: [..., D].

    Returns q: e4m3 [..., D] and scale: f32 [..., 1]. amax / scale is in (224, 448],
    so q * scale is exact in f32 and the scale costs nothing to apply.
    """
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1, keepdims=True)
    ratio = jnp.maximum(amax, TENSOR_AMAX_FLOOR) / fp8_max(E4M3)
    # ratio = mantissa * 2^exponent with mantissa in [0.5, 1): the smallest power
    # of two >= ratio is 2^(exponent - 1) when ratio is itself a power of two.
    # (Arithmetic, not jnp.where: jax 0.12's frexp drops the sharding of its exponent
    # output under an explicit mesh, and select needs equal shardings where `-` does not.)
    mantissa, exponent = jnp.frexp(ratio)
    exponent = exponent - (mantissa == 0.5).astype(exponent.dtype)
    scale = jnp.ldexp(jnp.ones_like(ratio), exponent)
    return cast_to_fp8(x, scale, E4M3), scale


def dequantize_per_token(q, scale, dtype):
    """Inverse of quantize_per_token: q [..., D] fp8, scale [..., 1] -> dtype [..., D]."""
    return (q.astype(jnp.float32) * scale).astype(dtype)


def send_in_fp8(x, send, tile: int | None = None):
    """Apply a linear collective `send` (e.g. the MoE dispatch all_to_all) to x in fp8.

    Forward: quantize_per_token, `send` the codes and the scales, dequantise to x.dtype.
    x [..., D]: one power-of-two scale per row ([..., 1] scales), or with `tile` one per
    1 x tile slice of the row ([..., ceil(D / tile), 1] scales; DeepSeek-V3 sends 1 x 128
    tiles), the last slice zero-padded (zeros change no amax; they travel as zero codes).
    Backward: the cotangent goes through the transpose of `send` in its own dtype,
    unquantised. Differentiating a plain cast to fp8 instead would round the (unscaled)
    gradient to e4m3 and flush small gradients to zero.
    `send` must be linear and act the same on any trailing axes, for instance
    ``lambda t: lax.all_to_all(t, "expert", 0, 0, tiled=True)`` inside shard_map.
    """
    return _send_in_fp8(x, send, tile)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _send_in_fp8(x, send, tile):
    return _send_in_fp8_fwd(x, send, tile)[0]


def _send_in_fp8_fwd(x, send, tile):
    if tile is None:
        q, scale = quantize_per_token(x)
        received = dequantize_per_token(send(q), send(scale), x.dtype)
    else:
        width = x.shape[-1]
        padded = pad_axis_to_multiple(x, -1, tile)
        q, scale = quantize_per_token(padded.reshape(*x.shape[:-1], -1, tile))
        received = dequantize_per_token(send(q), send(scale), x.dtype)
        received = received.reshape(padded.shape)[..., :width]
    return received, jax.linear_transpose(send, x)


def _send_in_fp8_bwd(send, tile, send_transpose, cotangent):
    del send, tile
    return send_transpose(cotangent)


_send_in_fp8.defvjp(_send_in_fp8_fwd, _send_in_fp8_bwd)


# --------------------------------------------------------------------------- GEMMs


class _GemmConfig(NamedTuple):
    """Static (hashable) arguments of the custom-vjp GEMM."""
    recipe: str
    out_dtype: np.dtype
    block_size: int
    x_dtype: np.dtype
    w_dtype: np.dtype
    batched: bool  # x: [G, M, K], w: [G, K, N] if True, else x: [M, K], w: [K, N]


def _scaled_dot(a, b, a_contract: int, b_contract: int, batched: bool, scale):
    """dot_general of two fp8 arrays, f32 accumulation, times a scalar scale.

    Axes are counted after the optional leading group axis (the batch dimension).
    """
    offset = 1 if batched else 0
    batch_dims = ((0,), (0,)) if batched else ((), ())
    contract_dims = ((a_contract + offset,), (b_contract + offset,))
    product = lax.dot_general(a, b, (contract_dims, batch_dims), precision=FP8_PRECISION,
                              preferred_element_type=jnp.float32)
    return product * scale


def _tensor_forward(x, w, config: _GemmConfig):
    x_q, x_scale = quantize_tensor(x, E4M3)
    w_q, w_scale = quantize_tensor(w, E4M3)
    # x: [M, K] . w: [K, N] -> [M, N] (all with an optional leading G).
    out = _scaled_dot(x_q, w_q, 1, 0, config.batched, x_scale * w_scale)
    return out.astype(config.out_dtype), (x_q, x_scale, w_q, w_scale)


def _tensor_backward(residuals, grad, config: _GemmConfig):
    x_q, x_scale, w_q, w_scale = residuals
    g_q, g_scale = quantize_tensor(grad, E5M2)
    # dgrad: g [M, N] . w [K, N] over N -> [M, K].
    grad_x = _scaled_dot(g_q, w_q, 1, 1, config.batched, g_scale * w_scale)
    # wgrad: x [M, K] . g [M, N] over M -> [K, N].
    grad_w = _scaled_dot(x_q, g_q, 0, 0, config.batched, x_scale * g_scale)
    return grad_x.astype(config.x_dtype), grad_w.astype(config.w_dtype)


def chunked_scaled_matmul(a_q, a_scales, b_q, b_scales, block_size: int):
    """DeepSeek-style fp8 GEMM with per-chunk scales and f32 partial-sum promotion.

    a_q: e4m3 [G, M, K], a_scales: f32 [G, M, C]; b_q: e4m3 [G, N, K],
    b_scales: f32 [G, N, C]; C = ceil(K / block_size), the contraction is over K.
    Returns f32 [G, M, N]: acc = 0, then for each chunk c in order
        acc = acc + (a_q[c] . b_q[c]^T) * (a_scales[:, :, c, None] * b_scales[:, None, :, c])
    where a_q[c] is the c-th block_size slice of K, every operation rounded to f32
    (no fused multiply-add).
    """
    def chunks_first(q):  # [G, R, K] -> [C, G, R, block_size]
        q = pad_axis_to_multiple(q, -1, block_size)
        q = q.reshape(*q.shape[:-1], -1, block_size)
        return jnp.moveaxis(q, -2, 0)

    def add_chunk(carry, chunk):
        accumulator, previous_scaled_partial = carry
        a_chunk, b_chunk, a_chunk_scales, b_chunk_scales = chunk
        partial = lax.dot_general(a_chunk, b_chunk, (((2,), (2,)), ((0,), (0,))),
                                  precision=FP8_PRECISION, preferred_element_type=jnp.float32)
        # As in DeepGEMM, the two scales are multiplied first.
        scale = a_chunk_scales[:, :, None] * b_chunk_scales[:, None, :]
        # The add takes the previous chunk's scaled partial: no multiply feeds it,
        # so XLA cannot contract it into an FMA (which it does or not depending on
        # fusion and vectorisation) and every step rounds to f32 as written.
        return (accumulator + previous_scaled_partial, partial * scale), None

    chunks = (chunks_first(a_q), chunks_first(b_q),
              jnp.moveaxis(a_scales, -1, 0), jnp.moveaxis(b_scales, -1, 0))
    groups, rows = a_q.shape[:2]
    zeros = jnp.zeros((groups, rows, b_q.shape[1]), jnp.float32)
    # Inside shard_map the scan carry must vary over the same mesh axes as the partials.
    axes = tuple(sorted(frozenset().union(*(varying_axes(c) for c in chunks))))
    zeros = lax.pcast(zeros, axes, to="varying") if axes else zeros
    (accumulator, last_scaled_partial), _ = lax.scan(add_chunk, (zeros, zeros), chunks)
    return accumulator + last_scaled_partial


def rows_of_block_scales(block_scales, rows: int, block_size: int):
    """[G, R/B, C] block scales -> [G, rows, C] scale of each row's block."""
    return jnp.repeat(block_scales, block_size, axis=1)[:, :rows, :]


def _block_forward(x, w, config: _GemmConfig):
    """x: [G, M, K], w: [G, K, N] -> [G, M, N]."""
    block = config.block_size
    x_q, x_scales = quantize_tiles(x, block)             # [G, M, K], [G, M, Ck]
    w_q, w_scales = quantize_blocks(w, block)            # [G, K, N], [G, Ck, Cn]
    w_t_scales = rows_of_block_scales(jnp.swapaxes(w_scales, 1, 2), w.shape[2], block)
    out = chunked_scaled_matmul(x_q, x_scales, jnp.swapaxes(w_q, 1, 2), w_t_scales, block)
    return out.astype(config.out_dtype), (x, w_q, w_scales)


def _block_backward(residuals, grad, config: _GemmConfig):
    x, w_q, w_scales = residuals
    block = config.block_size
    # dgrad: g [G, M, N] tiled along N, times the forward's weight blocks.
    g_q, g_scales = quantize_tiles(grad, block)          # [G, M, N], [G, M, Cn]
    w_row_scales = rows_of_block_scales(w_scales, w_q.shape[1], block)  # [G, K, Cn]
    grad_x = chunked_scaled_matmul(g_q, g_scales, w_q, w_row_scales, block)
    # wgrad: x^T [G, K, M] and g^T [G, N, M], both tiled along M (tokens).
    x_t_q, x_t_scales = quantize_tiles(jnp.swapaxes(x, 1, 2), block)
    g_t_q, g_t_scales = quantize_tiles(jnp.swapaxes(grad, 1, 2), block)
    grad_w = chunked_scaled_matmul(x_t_q, x_t_scales, g_t_q, g_t_scales, block)
    return grad_x.astype(config.x_dtype), grad_w.astype(config.w_dtype)


def _gemm_forward(x, w, config: _GemmConfig):
    if config.recipe == "tensor":
        return _tensor_forward(x, w, config)
    if config.batched:
        return _block_forward(x, w, config)
    out, residuals = _block_forward(x[None], w[None], config)
    return out[0], residuals


def _gemm_backward(config: _GemmConfig, residuals, grad):
    if config.recipe == "tensor":
        return _tensor_backward(residuals, grad, config)
    if config.batched:
        return _block_backward(residuals, grad, config)
    grad_x, grad_w = _block_backward(residuals, grad[None], config)
    return grad_x[0], grad_w[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fp8_gemm(x, w, config: _GemmConfig):
    return _gemm_forward(x, w, config)[0]


def _fp8_gemm_fwd(x, w, config: _GemmConfig):
    return _gemm_forward(x, w, config)


_fp8_gemm.defvjp(_fp8_gemm_fwd, _gemm_backward)


def _check_args(x, w, recipe: str, block_size: int) -> None:
    if recipe not in RECIPES:
        raise ValueError(f"fp8_matmul recipe must be one of {RECIPES}, got {recipe!r}.")
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"fp8_matmul block_size must be a positive int, got {block_size!r}.")
    if w.ndim not in (2, 3):
        raise ValueError(f"fp8_matmul needs w of rank 2 [K, N] or 3 [G, K, N], got {w.shape}.")
    if x.ndim < w.ndim - 1 or x.shape[-1] != w.shape[-2]:
        raise ValueError(f"fp8_matmul shapes do not contract: x {x.shape}, w {w.shape}.")
    if w.ndim == 3 and (x.ndim < 2 or x.shape[0] != w.shape[0]):
        raise ValueError(
            f"fp8_matmul with w [G, K, N] needs x [G, ..., K], got x {x.shape}, w {w.shape}.")


def fp8_matmul(x, w, *, recipe: str, out_dtype=jnp.float32, block_size: int = 128):
    """FP8 x @ w with quantised forward and backward GEMMs (see module docstring).

    w [K, N]: x [..., K] -> [..., N].
    w [G, K, N] (grouped, e.g. local experts): x [G, ..., K] -> [G, ..., N].
    recipe: "tensor" (per-tensor current scaling, e4m3/e5m2, cuBLASLt-fusable) or
    "block" (DeepSeek-V3 1 x block_size / block_size^2 e4m3 scaling, emulated).
    Gradients come back in x.dtype and w.dtype.
    """
    _check_args(x, w, recipe, block_size)
    batched = w.ndim == 3
    config = _GemmConfig(recipe, jnp.dtype(out_dtype), block_size,
                         jnp.dtype(x.dtype), jnp.dtype(w.dtype), batched)
    n_out = w.shape[-1]
    if batched:
        inner_shape = x.shape[1:-1]
        out = _fp8_gemm(x.reshape(x.shape[0], -1, x.shape[-1]), w, config)
        return out.reshape(x.shape[0], *inner_shape, n_out)
    out = _fp8_gemm(x.reshape(-1, x.shape[-1]), w, config)
    return out.reshape(*x.shape[:-1], n_out)
