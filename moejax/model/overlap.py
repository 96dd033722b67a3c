"""The MoE layer in two halves, so that exchange and compute can interleave (moe.overlap_halves).

The tokens are split along the sequence (every batch shard keeps its rows, so no data moves),
and each half runs its own dispatch -> experts -> combine, then adds its shared expert:

    half 0:  dispatch a2a | experts | combine a2a | + shared
    half 1:        dispatch a2a | experts | combine a2a | + shared

Nothing of half 1 depends on half 0 (routing is token-local and ran on the whole batch
before), so a scheduler may run half 0's expert GEMMs and both halves' shared experts while
half 1's all-to-all is in flight, and half 1's experts while half 0's results travel back. On
GPU, XLA's latency-hiding scheduler does that with async collectives; XLA:CPU runs collectives
synchronously (docs/overlap.md). Per token the arithmetic is that of the whole-batch layer, so
the output equals it; only the dispatch statistics (padding rows) differ.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

HALVES = 2


def in_halves(routed, shared, x: jax.Array, expert_ids: jax.Array, weights: jax.Array):
    """x [B, T, D], expert_ids and weights [B, T, k]; `routed(x_, ids_, weights_) -> (y_,
    dropped [], rows [4] or None)` and `shared(x_) -> y_ or None` on [B, T / 2, ...] halves.
    Returns (routed + shared [B, T, D], dropped summed, rows summed or None). An odd T splits
    unequally (the MTP modules see T - 1 tokens); a single token (generation) is not split."""
    seq = x.shape[1]
    bounds = [0, seq // HALVES, seq] if seq >= HALVES else [0, seq]  # odd: unequal halves
    outputs, dropped, rows = [], [], []
    for h in range(len(bounds) - 1):
        part = slice(bounds[h], bounds[h + 1])
        with jax.named_scope(f"half{h}"):
            y, dropped_h, rows_h = routed(x[:, part], expert_ids[:, part], weights[:, part])
            shared_y = shared(x[:, part])
        outputs.append(y if shared_y is None else y + shared_y)
        dropped.append(dropped_h)
        rows.append(rows_h)
    total_rows = None if rows[0] is None else sum(rows)
    return jnp.concatenate(outputs, axis=1), sum(dropped), total_rows
