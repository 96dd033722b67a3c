"""Causal self-attention: grouped-query attention (GQA) or DeepSeek's multi-head latent attention
(MLA), both with RoPE, softmax in float32, and an optional cache for generation.

Every attention layer splits into `cache_entries` (what a generation cache stores per token: GQA
the rotated keys and the values, MLA the normalised key/value latent and the one rotated RoPE
key) and an attend step over those entries. Training attends over the entries of the sequence
itself; generation writes the new entries into the cache at their positions and attends over the
whole cache, with positions not yet written hidden by the causal mask.

Training attention (no cache) runs one of four kernels, chosen by `attention_kernel`: the
materialised scores [B, H, T, T] ("plain"), the blockwise online softmax of
moejax/model/blockwise.py ("blockwise", memory linear in T), cuDNN's flash attention through
`jax.nn.dot_product_attention` on NVIDIA GPUs ("cudnn"), or OpenBLAS GEMMs in one XLA:CPU
custom call per direction (moejax/model/cpu_attention.py, "blas": CPU, float32, memory linear
in T). Generation keeps the plain form: a decode step's scores are [B, H, 1, S], and the
absorbed MLA form attends over the latents.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
from flax import struct

from moejax.config import ModelConfig
from moejax.model import cpu_attention, cpu_kernels
from moejax.model.blockwise import blockwise_attention
from moejax.model.layers import Matmul, apply_rope, rms_norm, rope_tables, yarn_mscale
from moejax.params import ParamSpec, normal_init, ones_init
from moejax.sharding import whole_or_one_shard

# DeepSeek normalises both MLA latents with eps 1e-6 whatever model.norm_eps says (its reference
# code and transformers' DeepseekV3 agree), so checkpoints with another norm eps import exactly.
LATENT_NORM_EPS = 1e-6


@struct.dataclass
class Attention:
    """wq [D, H, Q], wk and wv [D, K, Q], wo [H, Q, D]; q_norm and k_norm [Q] are the per-head
    RMSNorm weights of model.qk_norm (None when it is off)."""

    wq: jax.Array
    wk: jax.Array
    wv: jax.Array
    wo: jax.Array
    q_norm: jax.Array | None = None
    k_norm: jax.Array | None = None


@struct.dataclass
class LatentAttention:
    """MLA with H heads, Qn no-position and Qr RoPE query/key dims, V value dims.

    Queries: wq_a [D, Rq] -> RMSNorm(q_a_norm [Rq]) -> wq_b [Rq, H, Qn + Qr], or wq [D, H, Qn + Qr]
    directly when q_lora_rank is 0 (wq_a, q_a_norm and wq_b are then None).
    Keys/values: wkv_a [D, Rkv + Qr] gives the latent (normalised by kv_a_norm [Rkv]) and the one
    RoPE key shared by all heads; wkv_b [Rkv, H, Qn + V] expands the latent to per-head no-position
    keys and values. wo [H, V, D]."""

    wkv_a: jax.Array
    kv_a_norm: jax.Array
    wkv_b: jax.Array
    wo: jax.Array
    wq: jax.Array | None = None
    wq_a: jax.Array | None = None
    q_a_norm: jax.Array | None = None
    wq_b: jax.Array | None = None


def attention_specs(m: ModelConfig) -> Attention | LatentAttention:
    init = normal_init(m.init_std)
    d = m.d_model
    if m.attention == "mla":
        return _latent_attention_specs(m)
    h, kv, q = m.num_heads, m.num_kv_heads, m.head_dim
    return Attention(
        wq=ParamSpec((d, h, q), ("embed", "heads", "head_dim"), init),
        wk=ParamSpec((d, kv, q), ("embed", "kv_heads", "head_dim"), init),
        wv=ParamSpec((d, kv, q), ("embed", "kv_heads", "head_dim"), init),
        wo=ParamSpec((h, q, d), ("heads", "head_dim", "embed"), init),
        q_norm=ParamSpec((q,), ("head_dim",), ones_init) if m.qk_norm else None,
        k_norm=ParamSpec((q,), ("head_dim",), ones_init) if m.qk_norm else None,
    )


def _latent_attention_specs(m: ModelConfig) -> LatentAttention:
    init = normal_init(m.init_std)
    d, h = m.d_model, m.num_heads
    qk_dim = m.qk_nope_head_dim + m.qk_rope_head_dim
    query = {"wq": ParamSpec((d, h, qk_dim), ("embed", "heads", "head_dim"), init)}
    if m.q_lora_rank:
        query = {
            "wq_a": ParamSpec((d, m.q_lora_rank), ("embed", "latent"), init),
            "q_a_norm": ParamSpec((m.q_lora_rank,), ("latent",), ones_init),
            "wq_b": ParamSpec((m.q_lora_rank, h, qk_dim), ("latent", "mla_heads", "head_dim"),
                              init),
        }
    return LatentAttention(
        wkv_a=ParamSpec((d, m.kv_lora_rank + m.qk_rope_head_dim), ("embed", "latent"), init),
        kv_a_norm=ParamSpec((m.kv_lora_rank,), ("latent",), ones_init),
        wkv_b=ParamSpec((m.kv_lora_rank, h, m.qk_nope_head_dim + m.v_head_dim),
                        ("latent", "mla_heads", "head_dim"), init),
        wo=ParamSpec((h, m.v_head_dim, d), ("heads", "head_dim", "embed"), init),
        **query,
    )


def cache_entry_shapes(m: ModelConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per-token shapes of the two cached arrays: GQA keys and values [K, Q] each; MLA the
    latent [Rkv] and the RoPE key [Qr] (the compressed cache: no per-head arrays)."""
    if m.attention == "mla":
        return (m.kv_lora_rank,), (m.qk_rope_head_dim,)
    return (m.num_kv_heads, m.head_dim), (m.num_kv_heads, m.head_dim)


def rope_dim(m: ModelConfig) -> int:
    return m.qk_rope_head_dim if m.attention == "mla" else m.head_dim


def softmax_scale(m: ModelConfig) -> float:
    """1/sqrt(query-key dims); DeepSeek's MLA also multiplies by YaRN's mscale squared."""
    if m.attention == "gqa":
        return m.head_dim**-0.5
    scale = (m.qk_nope_head_dim + m.qk_rope_head_dim) ** -0.5
    if m.rope_scaling == "yarn" and m.yarn_mscale_all_dim:
        scale *= yarn_mscale(m.yarn_factor, m.yarn_mscale_all_dim) ** 2
    return scale


def gpu_compute_capability() -> float:
    """The first device's CUDA compute capability (9.0 on H100); 0 when it has none (CPU, TPU,
    ROCm)."""
    try:
        return float(getattr(jax.devices()[0], "compute_capability", 0) or 0)
    except ValueError:  # ROCm names its architecture ("gfx90a")
        return 0.0


def cudnn_allows(qk_dim: int, v_dim: int, dtype, backend: str, compute_capability: float) -> bool:
    """Whether cuDNN's flash attention takes these shapes (jax's own checks, for the padded head
    dim max(Qk, Qv): 16-bit operands, Ampere or later, a multiple of 8 up to 128 (256 on
    Hopper and later))."""
    head_dim = max(qk_dim, v_dim)
    return (backend == "gpu" and compute_capability >= 8.0
            and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            and head_dim % 8 == 0 and head_dim <= (256 if compute_capability >= 9.0 else 128))


def attention_kernel(m: ModelConfig, seq_len: int, dtype, backend: str | None = None,
                     compute_capability: float | None = None) -> str:
    """plain | blockwise | cudnn | blas for training attention over `seq_len` positions in
    `dtype`: model.attention_kernel when it names one, else (auto) as follows.

    model.attention_block 0 (or null) keeps the materialised scores everywhere. Otherwise cuDNN
    where it takes the shapes (one fused kernel that skips the masked blocks, at every length;
    not yet timed against the blockwise kernel: no GPU so far); on CPU in float32 the BLAS
    kernel where moejax's CPU kernels build, on whole arrays or one shard (at every length:
    docs/bench_hf_model.md times it; cpu_kernels.runs_here says why not on a mesh's GSPMD
    arrays); else the blockwise kernel once the sequence is longer than one block: a sequence
    of one block is the plain attention with the loops' overhead added. `backend` and
    `compute_capability` default to this process's first device (the tests pass them to check
    the choice without a GPU)."""
    backend = jax.default_backend() if backend is None else backend
    if m.attention_kernel == "blas" and backend != "cpu":
        raise ValueError(f"model.attention_kernel=blas runs on CPU only (this is {backend}): "
                         "use model.attention_kernel=auto.")
    if m.attention_kernel != "auto":
        return m.attention_kernel
    if not m.attention_block:
        return "plain"
    if compute_capability is None:
        compute_capability = gpu_compute_capability() if backend == "gpu" else 0.0
    if m.attention == "mla":
        qk_dim, v_dim = m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim
    else:
        qk_dim = v_dim = m.head_dim
    if cudnn_allows(qk_dim, v_dim, dtype, backend, compute_capability):
        return "cudnn"
    if cpu_kernels.runs_here(dtype, backend):
        return "blas"
    return "blockwise" if seq_len > m.attention_block else "plain"


def kernel_description(m: ModelConfig, seq_len: int, dtype) -> str:
    """One line for the start-up log: the training attention kernel at `seq_len`, and why auto
    did not take the BLAS one on CPU in float32 when it cannot be built here."""
    kernel = attention_kernel(m, seq_len, dtype)
    line = f"model.attention_kernel={m.attention_kernel} -> {kernel}"
    reason = cpu_kernels.unavailable_reason()
    if (m.attention_kernel == "auto" and kernel != "blas"
            and jax.default_backend() == "cpu" and jnp.dtype(dtype) == jnp.float32):
        if reason is not None:
            line += f" (blas unavailable: {reason})"
        elif not whole_or_one_shard():
            line += (" (blas: on one device or inside a shard_map only; here XLA partitions "
                     "attention over the mesh)")
    return line


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, kernel: str,
                    block: int) -> jax.Array:
    """Causal q [B, T, K, G, Qk], k [B, T, K, Qk], v [B, T, K, Qv] -> [B, T, K, G, Qv] by the
    blockwise, the BLAS or the cuDNN kernel (never [T, T] scores in memory)."""
    if kernel == "blockwise":
        return blockwise_attention(q, k, v, scale, block)
    if kernel == "blas":
        return cpu_attention.causal_attention(q, k, v, scale)
    batch, seq, kv_heads, groups, qk_dim = q.shape
    v_dim = v.shape[-1]
    # jax.nn.dot_product_attention wants one head dim for q, k and v: zero-pad the smaller
    # (MLA's 128 value dims to its 192 query/key dims); zero dims add nothing to q.k, and the
    # padded value dims of the output are cut off.
    head_dim = max(qk_dim, v_dim)

    def pad(x):
        return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, head_dim - x.shape[-1])])

    try:
        out = jax.nn.dot_product_attention(
            pad(q).reshape(batch, seq, kv_heads * groups, head_dim), pad(k), pad(v), scale=scale,
            is_causal=True, implementation="cudnn")  # query head k * G + g serves kv head k
    except NotImplementedError as err:
        # jax checks cuDNN's version and the GPU's architecture while tracing, beyond what
        # `cudnn_allows` knows: run the blockwise kernel instead, and say so once.
        warnings.warn(f"cuDNN attention refused ({err}); using the blockwise kernel", stacklevel=2)
        return blockwise_attention(q, k, v, scale, block)
    return out[..., :v_dim].reshape(batch, seq, kv_heads, groups, v_dim)


def _project(x: jax.Array, w: jax.Array, matmul: Matmul) -> jax.Array:
    """x [B, T, D] @ w [D, *out] -> [B, T, *out] as one [D, prod(out)] matmul."""
    out_shape = w.shape[1:]
    return matmul(x, w.reshape(w.shape[0], -1)).reshape(*x.shape[:-1], *out_shape)


def causal_attention(p, x: jax.Array, positions: jax.Array, m: ModelConfig, matmul: Matmul,
                     cache: tuple[jax.Array, jax.Array] | None = None):
    """x [B, T, D] at integer positions [T] -> (out [B, T, D], cache entries).

    Without a cache, attends within x and returns its entries [B, T, ...]. With a cache (two
    arrays [B, S, ...] as `cache_entry_shapes`), writes x's entries at `positions` (which must be
    consecutive) and attends over all S slots; returns the updated cache."""
    cos, sin = rope_tables(positions, rope_dim(m), m)
    entries = cache_entries(p, x, (cos, sin), m, matmul)
    key_positions = positions
    if cache is not None:
        entries = tuple(jax.lax.dynamic_update_slice_in_dim(c, e.astype(c.dtype), positions[0], 1)
                        for c, e in zip(cache, entries))
        key_positions = jnp.arange(cache[0].shape[1])
    visible = key_positions[None, :] <= positions[:, None]  # [T, S] causal mask
    # The fused kernels are causal by index, which is the mask above when there is no cache
    # (training positions are consecutive).
    kernel = "plain" if cache is not None else attention_kernel(m, x.shape[1], matmul.dtype)
    if m.attention == "mla":
        out = _latent_attend(p, x, (cos, sin), entries, visible, m, matmul,
                             absorbed=cache is not None, kernel=kernel)
    else:
        out = _grouped_attend(p, x, (cos, sin), entries, visible, m, matmul, kernel)
    return out, entries


def cache_entries(p, x: jax.Array, rope: tuple, m: ModelConfig, matmul: Matmul):
    """What a cache keeps for the tokens of x [B, T, D]: GQA (rotated keys, values)
    [B, T, K, Q] each; MLA (normalised latent [B, T, Rkv], rotated shared RoPE key [B, T, Qr])."""
    if m.attention == "mla":
        compressed = matmul(x, p.wkv_a)
        latent, key_rope = jnp.split(compressed, [m.kv_lora_rank], axis=-1)
        return rms_norm(latent, p.kv_a_norm, LATENT_NORM_EPS), apply_rope(key_rope, *rope)
    k = _project(x, p.wk, matmul)
    if p.k_norm is not None:
        k = rms_norm(k, p.k_norm, m.norm_eps)
    return apply_rope(k, *rope), _project(x, p.wv, matmul)


def _softmax(scores: jax.Array, visible: jax.Array, dtype) -> jax.Array:
    """Masked softmax over the last (key) axis of float32 scores [..., T, S]."""
    return jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1).astype(dtype)


def _grouped_attend(p: Attention, x, rope, entries, visible, m: ModelConfig, matmul: Matmul,
                    kernel: str = "plain"):
    """Each of the K kv heads serves G = H / K query heads."""
    batch, seq, _ = x.shape
    groups = m.num_heads // m.num_kv_heads
    dtype = matmul.dtype
    k, v = entries
    q = _project(x, p.wq, matmul)
    if p.q_norm is not None:
        q = rms_norm(q, p.q_norm, m.norm_eps)
    q = apply_rope(q, *rope).reshape(batch, seq, m.num_kv_heads, groups, m.head_dim)
    if kernel != "plain":
        out = fused_attention(q, k.astype(q.dtype), v.astype(q.dtype), softmax_scale(m), kernel,
                              m.attention_block).astype(dtype)
    else:
        scores = jnp.einsum("btkgq,bskq->bkgts", q, k.astype(q.dtype),
                            preferred_element_type=jnp.float32) * softmax_scale(m)
        probs = _softmax(scores, visible, dtype)
        out = jnp.einsum("bkgts,bskq->btkgq", probs, v.astype(dtype))
    return matmul(out.reshape(batch, seq, m.num_heads * m.head_dim),
                  p.wo.reshape(m.num_heads * m.head_dim, m.d_model))


def _latent_queries(p: LatentAttention, x, rope, m: ModelConfig, matmul: Matmul):
    """-> (no-position queries [B, T, H, Qn], rotated RoPE queries [B, T, H, Qr])."""
    if p.wq_a is None:
        q = _project(x, p.wq, matmul)
    else:
        q = _project(rms_norm(matmul(x, p.wq_a), p.q_a_norm, LATENT_NORM_EPS), p.wq_b, matmul)
    q_nope, q_rope = jnp.split(q, [m.qk_nope_head_dim], axis=-1)
    return q_nope, apply_rope(q_rope, *rope)


def _latent_attend(p: LatentAttention, x, rope, entries, visible, m: ModelConfig,
                   matmul: Matmul, absorbed: bool, kernel: str = "plain"):
    """Scores = q_nope . k_nope + q_rope . k_rope, with k_nope and v expanded from the latent.

    `absorbed` (generation) never expands the cached latents: it folds the key expansion into
    the queries (q_nope @ wk_b^T, per head) and the value expansion after the weighted sum,
    so each step reads only the [S, Rkv + Qr] cache. Both forms are the same function."""
    batch, seq, _ = x.shape
    dtype = matmul.dtype
    latent, key_rope = (e.astype(dtype) for e in entries)
    q_nope, q_rope = _latent_queries(p, x, rope, m, matmul)
    if kernel != "plain":
        out = _latent_fused(p, latent, key_rope, q_nope, q_rope, m, matmul, kernel)
        return matmul(out.reshape(batch, seq, m.num_heads * m.v_head_dim),
                      p.wo.reshape(m.num_heads * m.v_head_dim, m.d_model))
    rope_scores = jnp.einsum("bthr,bsr->bhts", q_rope, key_rope.astype(q_rope.dtype),
                             preferred_element_type=jnp.float32)
    if absorbed:
        wk_b, wv_b = jnp.split(p.wkv_b.astype(dtype), [m.qk_nope_head_dim], axis=-1)
        q_latent = jnp.einsum("bthn,chn->bthc", q_nope.astype(dtype), wk_b)
        nope_scores = jnp.einsum("bthc,bsc->bhts", q_latent, latent,
                                 preferred_element_type=jnp.float32)
        probs = _softmax((nope_scores + rope_scores) * softmax_scale(m), visible, dtype)
        out = jnp.einsum("bthc,chv->bthv", jnp.einsum("bhts,bsc->bthc", probs, latent), wv_b)
    else:
        k_nope, v = jnp.split(_project(latent, p.wkv_b, matmul), [m.qk_nope_head_dim], axis=-1)
        nope_scores = jnp.einsum("bthn,bshn->bhts", q_nope.astype(dtype), k_nope,
                                 preferred_element_type=jnp.float32)
        probs = _softmax((nope_scores + rope_scores) * softmax_scale(m), visible, dtype)
        out = jnp.einsum("bhts,bshv->bthv", probs, v.astype(dtype))
    return matmul(out.reshape(batch, seq, m.num_heads * m.v_head_dim),
                  p.wo.reshape(m.num_heads * m.v_head_dim, m.d_model))


def _latent_fused(p: LatentAttention, latent, key_rope, q_nope, q_rope, m: ModelConfig,
                  matmul: Matmul, kernel: str) -> jax.Array:
    """MLA through a fused kernel -> [B, T, H, V]: per-head queries and keys of Qn + Qr dims
    (the shared RoPE key repeated over the H heads), so q.k = q_nope.k_nope + q_rope.k_rope as in
    the plain form; each head is its own key/value head (K = H, G = 1)."""
    dtype = matmul.dtype
    k_nope, v = jnp.split(_project(latent, p.wkv_b, matmul), [m.qk_nope_head_dim], axis=-1)
    if kernel == "blas":  # takes the RoPE parts apart: no concatenation, the shared key once
        out = cpu_attention.causal_attention(
            q_nope.astype(dtype)[:, :, :, None, :], k_nope.astype(dtype), v.astype(dtype),
            softmax_scale(m), q_rope=q_rope.astype(dtype)[:, :, :, None, :],
            k_rope=key_rope.astype(dtype)[:, :, None, :])
        return out[:, :, :, 0, :]
    batch, seq, heads, _ = k_nope.shape
    key_rope = jnp.broadcast_to(key_rope[:, :, None, :].astype(dtype),
                                (batch, seq, heads, m.qk_rope_head_dim))
    q = jnp.concatenate([q_nope.astype(dtype), q_rope.astype(dtype)], axis=-1)
    k = jnp.concatenate([k_nope.astype(dtype), key_rope], axis=-1)
    out = fused_attention(q[:, :, :, None, :], k, v.astype(dtype), softmax_scale(m), kernel,
                          m.attention_block)
    return out[:, :, :, 0, :]
