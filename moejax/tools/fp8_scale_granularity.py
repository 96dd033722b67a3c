"""Which scale granularity for the `tensor` recipe in the dropless grouped GEMM: one scale per
expert (what moejax does) or one per row tile. Prints the relative error (Frobenius, against
the exact f32 product) of the forward GEMM (on the rows without an outlier) and of the weight
gradient, per expert and per row tile, with the block recipe beside them, on token rows of
lognormal magnitudes with and without outlier tokens (one per expert).

    python scripts/fp8_scale_granularity.py  (the shell over `main` here)

Per-tile scales are emulated with fp8_matmul(recipe="tensor") on each tile of an expert's rows
against the expert's weights (forward) and summed per expert (wgrad). A few seconds on a CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from moejax.fp8 import fp8_matmul
from moejax.model.dispatch import grouped, grouped_fp8

EXPERTS, ROWS_PER_EXPERT, K, N, TILE = 8, 256, 512, 256, 32


def relative_error(approx, exact) -> float:
    approx, exact = np.asarray(approx, np.float64), np.asarray(exact, np.float64)
    return float(np.linalg.norm(approx - exact) / np.linalg.norm(exact))


def case(outlier: float, seed: int = 0):
    """rows [E R, K] grouped by expert, N(0, 1) times a lognormal (sigma 1) magnitude per
    token; with `outlier`, one token per expert scaled by it (activation outliers)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((EXPERTS * ROWS_PER_EXPERT, K)) * np.exp(
        rng.standard_normal((EXPERTS * ROWS_PER_EXPERT, 1)))
    if outlier:
        x[::ROWS_PER_EXPERT] *= outlier
    w = rng.standard_normal((EXPERTS, K, N)) / np.sqrt(K)
    g = rng.standard_normal((EXPERTS * ROWS_PER_EXPERT, N))
    return (jnp.asarray(a, jnp.float32) for a in (x, w, g))


def per_expert_and_block(x, w, g, recipe):
    ids = jnp.repeat(jnp.arange(EXPERTS, dtype=jnp.int32), ROWS_PER_EXPERT)
    layout = grouped.tile_layout(ids, EXPERTS, TILE, x.shape[0])
    groups = grouped_fp8.group_rows(layout, EXPERTS)
    out, vjp = jax.vjp(lambda a, b: grouped_fp8.grouped_fp8_matmul(a, b, groups, recipe=recipe),
                       x, w)
    return out, vjp(g)[1]


def per_tile(x, w, g):
    tiles = ROWS_PER_EXPERT // TILE
    x_t = x.reshape(EXPERTS, tiles, TILE, K)
    g_t = g.reshape(EXPERTS, tiles, TILE, N)

    def tile_gemm(a, b, cotangent):
        out, vjp = jax.vjp(lambda a, b: fp8_matmul(a, b, recipe="tensor"), a, b)
        return out, vjp(cotangent)[1]

    per_tile_fn = jax.vmap(jax.vmap(tile_gemm, in_axes=(0, None, 0)), in_axes=(0, 0, 0))
    out, d_w = per_tile_fn(x_t, w, g_t)
    return out.reshape(-1, N), d_w.sum(axis=1)


def main() -> int:
    print(f"{EXPERTS} experts x {ROWS_PER_EXPERT} rows, K={K}, N={N}, row tile {TILE}")
    print(f"{'outlier':>8} | {'fwd per expert':>14} {'per tile':>9} {'block':>7} | "
          f"{'wgrad per expert':>16} {'per tile':>9} {'block':>7}")
    for outlier in (0.0, 1e2, 1e4, 1e5):
        x, w, g = case(outlier)
        highest = jax.lax.Precision.HIGHEST
        exact_out = jnp.einsum("erk,ekn->ern", x.reshape(EXPERTS, -1, K), w,
                               precision=highest).reshape(-1, N)
        exact_dw = jnp.einsum("erk,ern->ekn", x.reshape(EXPERTS, -1, K),
                              g.reshape(EXPERTS, -1, N), precision=highest)
        clean = np.arange(x.shape[0]) % ROWS_PER_EXPERT != 0  # rows without the outlier
        expert_out, expert_dw = jax.jit(per_expert_and_block, static_argnums=3)(x, w, g, "tensor")
        block_out, block_dw = jax.jit(per_expert_and_block, static_argnums=3)(x, w, g, "block")
        tile_out, tile_dw = jax.jit(per_tile)(x, w, g)
        errors = [relative_error(np.asarray(a)[clean], np.asarray(exact_out)[clean])
                  for a in (expert_out, tile_out, block_out)]
        errors += [relative_error(a, exact_dw) for a in (expert_dw, tile_dw, block_dw)]
        print(f"{outlier:>8.0e} | {errors[0]:>14.4f} {errors[1]:>9.4f} {errors[2]:>7.4f} | "
              f"{errors[3]:>16.4f} {errors[4]:>9.4f} {errors[5]:>7.4f}")
    return 0
