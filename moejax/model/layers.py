"""Building blocks shared by the attention and FFN layers: norms, RoPE, projections, SwiGLU."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from moejax.config import PrecisionConfig
from moejax.fp8 import fp8_matmul, varying_axes
from moejax.params import ParamSpec, normal_init


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, computed in float32, returned in the input dtype."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (normed * weight.astype(jnp.float32)).astype(x.dtype)


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables [T, Q/2] for rotary position embeddings (float32)."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [B, T, H, Q] by position; pairs are (i, i + Q/2) (the "rotate half" layout)."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class Matmul:
    """How one group of layers multiplies activations by weights: in `dtype`, or through an
    fp8 recipe ("tensor" or "block", see moejax/fp8.py) with results in `dtype`."""

    dtype: jnp.dtype
    fp8: str | None = None
    fp8_block_size: int = 128

    def __call__(self, x: jax.Array, w: jax.Array) -> jax.Array:
        """x [..., K] @ w [K, N] -> [..., N]; or grouped x [G, ..., K] @ w [G, K, N]."""
        if self.fp8:
            x, w = _same_varying_axes(x.astype(self.dtype), w.astype(self.dtype))
            return fp8_matmul(x, w, recipe=self.fp8, out_dtype=self.dtype,
                              block_size=self.fp8_block_size)
        return jnp.matmul(x.astype(self.dtype), w.astype(self.dtype))


def _same_varying_axes(x: jax.Array, w: jax.Array):
    """Inside shard_map, mark x and w as varying over the same mesh axes before a custom-vjp
    GEMM: a weight replicated over `data` then gets its gradient summed over `data` by the
    cast's transpose, as a plain matmul would (a custom vjp cannot do that by itself)."""
    x_axes, w_axes = varying_axes(x), varying_axes(w)
    if w_axes - x_axes:
        x = jax.lax.pcast(x, tuple(sorted(w_axes - x_axes)), to="varying")
    if x_axes - w_axes:
        w = jax.lax.pcast(w, tuple(sorted(x_axes - w_axes)), to="varying")
    return x, w


FP8_LAYER_GROUPS = ("attention", "dense_ffn", "shared", "experts")


def layer_matmuls(precision: PrecisionConfig) -> dict[str, Matmul]:
    """The Matmul of each layer group; fp8 only where `precision.fp8_layers` says. Embedding,
    output head, router, norms and the attention softmax never use fp8 (as in DeepSeek-V3)."""
    dtype = jnp.dtype(precision.compute_dtype)
    fp8 = None if precision.fp8 == "none" else precision.fp8
    chosen = set(precision.fp8_layer_groups)
    return {group: Matmul(dtype, fp8 if group in chosen else None, precision.fp8_block_size)
            for group in FP8_LAYER_GROUPS}


@struct.dataclass
class FFN:
    """SwiGLU feed-forward weights: w_gate, w_up [D, F], w_down [F, D]."""

    w_gate: jax.Array
    w_up: jax.Array
    w_down: jax.Array


def ffn_specs(d_model: int, ffn_dim: int, init_std: float) -> FFN:
    init = normal_init(init_std)
    return FFN(
        w_gate=ParamSpec((d_model, ffn_dim), ("embed", "mlp"), init),
        w_up=ParamSpec((d_model, ffn_dim), ("embed", "mlp"), init),
        w_down=ParamSpec((ffn_dim, d_model), ("mlp", "embed"), init),
    )


def swiglu(p: FFN, x: jax.Array, matmul: Matmul) -> jax.Array:
    """down(silu(x @ gate) * (x @ up)); x [..., D] -> [..., D] in the compute dtype.

    Also the batched expert form: x [E, S, D] with weights [E, D, F] and [E, F, D]."""
    hidden = jax.nn.silu(matmul(x, p.w_gate)) * matmul(x, p.w_up)
    return matmul(hidden, p.w_down)
