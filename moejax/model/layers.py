"""Building blocks shared by the attention and FFN layers: norms, RoPE, projections, SwiGLU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

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


def project(spec: str, x: jax.Array, w: jax.Array, dtype) -> jax.Array:
    """A weight projection `einsum(spec, x, w)` with both operands in the compute dtype."""
    return jnp.einsum(spec, x.astype(dtype), w.astype(dtype))


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


def swiglu(p: FFN, x: jax.Array, dtype) -> jax.Array:
    """down(silu(x @ gate) * (x @ up)); x [..., D] -> [..., D] in the compute dtype."""
    gate = project("...d,df->...f", x, p.w_gate, dtype)
    up = project("...d,df->...f", x, p.w_up, dtype)
    return project("...f,fd->...d", jax.nn.silu(gate) * up, p.w_down, dtype)
