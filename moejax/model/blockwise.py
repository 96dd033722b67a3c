"""Blockwise (flash-style) causal self-attention: never a [T, T] score matrix, forward or backward.

The sequence is cut into blocks of `block` positions (the last one padded). Query block i visits
key blocks 0 .. i only (the causal skip: about half the score work of the materialised
attention) and keeps an online softmax: the running row maximum m, the running sum of
exp(s - m) and the running weighted sum of values, rescaled whenever m grows. The forward saves
q, k, v, the output and the per-row log-sum-exp; the custom backward recomputes each block's
probabilities from the log-sum-exp (FlashAttention-2): for each key block j, the query blocks
i >= j give dk_j and dv_j, and add into dq. Live temporaries are a few [B, K, G, b, b] score
blocks plus O(T) arrays, so memory grows linearly in T (docs/attention.md).

Shapes: B batch, T sequence (padded to Tp, a multiple of the block b), K key/value heads, G query
heads per key/value head (GQA; MLA and MHA have G = 1 after folding), Qk query/key dims, Qv
value dims. Attention is causal by index (query t sees keys s <= t): the self-attention of a
training pass, whose positions are consecutive. Softmax and every accumulation are float32;
the matmul operands stay in the input dtype (the compute dtype), as in the materialised path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moejax.sharding import varying_axes


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float,
                        block: int) -> jax.Array:
    """q [B, T, K, G, Qk], k [B, T, K, Qk], v [B, T, K, Qv] -> out [B, T, K, G, Qv] (v's dtype).

    softmax(scale * q.k over causally visible keys) @ v, computed `block` positions at a time;
    any T (the tail block is zero-padded: a padded key is never visible to a real query, and a
    padded query's output is cut off, so its zero cotangent adds nothing to dk or dv)."""
    seq = q.shape[1]
    block = min(block, seq)
    padded = -(-seq // block) * block

    def pad(x):
        return jnp.pad(x, [(0, 0), (0, padded - seq)] + [(0, 0)] * (x.ndim - 2))

    return _flash(pad(q), pad(k), pad(v), float(scale), block)[:, :seq]


def _block(x: jax.Array, i, block: int) -> jax.Array:
    """Positions i * block .. (i + 1) * block - 1 of x [B, Tp, ...]."""
    return jax.lax.dynamic_slice_in_dim(x, i * block, block, axis=1)


def _full(shape, value, like: jax.Array) -> jax.Array:
    """A float32 constant that varies over the same shard_map axes as `like` (a loop carry must
    keep its type inside the pipeline's shard_map); a plain constant outside one."""
    axes = tuple(sorted(varying_axes(like)))
    x = jnp.full(shape, value, jnp.float32)
    return jax.lax.pcast(x, axes, to="varying") if axes else x


def _scores(q_i, k_j, i, j, block: int, scale: float) -> jax.Array:
    """Scaled float32 scores [B, K, G, b, b] of query block i against key block j, -inf where
    the key comes after the query."""
    s = jnp.einsum("bqkgd,bskd->bkgqs", q_i, k_j, preferred_element_type=jnp.float32) * scale
    rows = i * block + jnp.arange(block)
    cols = j * block + jnp.arange(block)
    return jnp.where(rows[:, None] >= cols[None, :], s, -jnp.inf)


def _forward(q, k, v, scale: float, block: int):
    """-> (out [B, Tp, K, G, Qv] in v's dtype, lse [n, B, K, G, b] float32), n = Tp / b."""
    batch, padded, kv_heads, groups, _ = q.shape
    v_dim = v.shape[-1]

    def query_block(i):
        q_i = _block(q, i, block)

        def key_block(j, carry):
            row_max, row_sum, acc = carry  # [B, K, G, b], [B, K, G, b], [B, K, G, b, Qv]
            s = _scores(q_i, _block(k, j, block), i, j, block, scale)
            new_max = jnp.maximum(row_max, jnp.max(s, axis=-1))
            p = jnp.exp(s - new_max[..., None])
            rescale = jnp.exp(row_max - new_max)  # 0 on the first block (row_max = -inf)
            pv = jnp.einsum("bkgqs,bskv->bkgqv", p.astype(v.dtype), _block(v, j, block),
                            preferred_element_type=jnp.float32)
            return (new_max, row_sum * rescale + jnp.sum(p, axis=-1),
                    acc * rescale[..., None] + pv)

        rows = (batch, kv_heads, groups, block)
        init = (_full(rows, -jnp.inf, q_i), _full(rows, 0.0, q_i),
                _full((*rows, v_dim), 0.0, q_i))
        # Every row sees its own position in the diagonal block, so row_sum > 0 at the end.
        row_max, row_sum, acc = jax.lax.fori_loop(0, i + 1, key_block, init)
        out_i = jnp.moveaxis(acc / row_sum[..., None], 3, 1).astype(v.dtype)  # [B, b, K, G, Qv]
        return out_i, row_max + jnp.log(row_sum)

    outs, lse = jax.lax.map(query_block, jnp.arange(padded // block))  # [n, B, b, K, G, Qv]
    out = jnp.moveaxis(outs, 0, 1).reshape(batch, padded, kv_heads, groups, v_dim)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _flash(q, k, v, scale: float, block: int) -> jax.Array:
    return _forward(q, k, v, scale, block)[0]


def _flash_fwd(q, k, v, scale: float, block: int):
    out, lse = _forward(q, k, v, scale, block)
    return out, (q, k, v, out, lse)


def _flash_bwd(scale: float, block: int, residuals, d_out):
    """FlashAttention-2's backward: ds = p * (dp - rowsum(d_out * out)), dp = d_out . v."""
    q, k, v, out, lse = residuals
    num_blocks = q.shape[1] // block
    # delta [n, B, K, G, b]: rowsum(d_out * out), the softmax backward's per-row term
    delta = jnp.einsum("btkgv,btkgv->bkgt", d_out.astype(jnp.float32), out.astype(jnp.float32))
    delta = jnp.moveaxis(delta.reshape(*delta.shape[:3], num_blocks, block), 3, 0)

    def key_block(dq, j):
        k_j, v_j = _block(k, j, block), _block(v, j, block)

        def query_block(i, carry):
            dq, dk_j, dv_j = carry
            q_i, do_i = _block(q, i, block), _block(d_out, i, block)
            p = jnp.exp(_scores(q_i, k_j, i, j, block, scale) - lse[i][..., None])
            dv_j = dv_j + jnp.einsum("bkgqs,bqkgv->bskv", p.astype(v.dtype), do_i,
                                     preferred_element_type=jnp.float32)
            dp = jnp.einsum("bqkgv,bskv->bkgqs", do_i, v_j, preferred_element_type=jnp.float32)
            ds = p * (dp - delta[i][..., None]) * scale  # d(unscaled scores) [B, K, G, b, b]
            dk_j = dk_j + jnp.einsum("bkgqs,bqkgd->bskd", ds.astype(q.dtype), q_i,
                                     preferred_element_type=jnp.float32)
            dq_i = jnp.einsum("bkgqs,bskd->bqkgd", ds.astype(k.dtype), k_j,
                              preferred_element_type=jnp.float32)
            dq = jax.lax.dynamic_update_slice_in_dim(dq, _block(dq, i, block) + dq_i,
                                                     i * block, axis=1)
            return dq, dk_j, dv_j

        init = (dq, _full(k_j.shape, 0.0, d_out), _full(v_j.shape, 0.0, d_out))
        dq, dk_j, dv_j = jax.lax.fori_loop(j, num_blocks, query_block, init)
        return dq, (dk_j, dv_j)

    dq, (dk, dv) = jax.lax.scan(key_block, _full(q.shape, 0.0, d_out), jnp.arange(num_blocks))

    def unblock(x, like):  # [n, B, b, ...] -> [B, Tp, ...] in the primal's dtype
        return jnp.moveaxis(x, 0, 1).reshape(like.shape).astype(like.dtype)

    return dq.astype(q.dtype), unblock(dk, k), unblock(dv, v)


_flash.defvjp(_flash_fwd, _flash_bwd)
