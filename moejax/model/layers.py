"""Building blocks shared by the attention and FFN layers: norms, RoPE, projections, SwiGLU."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from moejax.config import ModelConfig, PrecisionConfig
from moejax.fp8 import fp8_matmul
from moejax.model import cpu_kernels, cpu_matmul, cpu_swiglu
from moejax.params import ParamSpec, normal_init
from moejax.sharding import same_varying_axes


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, computed in float32, returned in the input dtype."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (normed * weight.astype(jnp.float32)).astype(x.dtype)


def rope_tables(positions: jax.Array, dim: int, m: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables [T, dim/2] (float32) at integer `positions` [T] for `dim` rotary dims,
    with YaRN's frequencies and cos/sin scale when model.rope_scaling is yarn."""
    inv_freq, scale = rope_frequencies(dim, m)
    angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def rope_frequencies(dim: int, m: ModelConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies [dim/2] (float32) and the cos/sin scale (1 without YaRN).

    YaRN keeps the high frequencies (more than beta_fast rotations over the original context),
    divides the low ones (fewer than beta_slow rotations) by the factor, and ramps linearly
    between them over the dimension index."""
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv_freq = (1.0 / np.float32(m.rope_theta) ** exponents).astype(np.float32)
    if m.rope_scaling != "yarn":
        return inv_freq, 1.0

    def dim_of_rotations(rotations: float) -> float:
        """The dimension index whose wavelength fits `rotations` times in the original context."""
        wavelengths = m.yarn_original_max_len / (rotations * 2 * math.pi)
        return dim * math.log(wavelengths) / (2 * math.log(m.rope_theta))

    low = max(math.floor(dim_of_rotations(m.yarn_beta_fast)), 0)
    high = min(math.ceil(dim_of_rotations(m.yarn_beta_slow)), dim - 1)
    high = high + 0.001 if high == low else high  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    inv_freq = inv_freq / m.yarn_factor * ramp + inv_freq * (1 - ramp)
    return inv_freq.astype(np.float32), yarn_cos_sin_scale(m)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction 0.1 * mscale * ln(factor) + 1 (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_cos_sin_scale(m: ModelConfig) -> float:
    if m.yarn_mscale and m.yarn_mscale_all_dim:
        return yarn_mscale(m.yarn_factor, m.yarn_mscale) / yarn_mscale(m.yarn_factor,
                                                                       m.yarn_mscale_all_dim)
    return yarn_mscale(m.yarn_factor)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [B, T, H, Q] (or [B, T, Q]) by position with tables [T, Q/2]; pairs are
    (i, i + Q/2) (the "rotate half" layout)."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    if x.ndim == 4:
        cos, sin = cos[:, None, :], sin[:, None, :]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class Matmul:
    """How one group of layers multiplies activations by weights: in `dtype`, or through an
    fp8 recipe ("tensor" or "block", see moejax/fp8.py) with results in `dtype`. A 2-D weight
    on CPU in float32 goes through moejax's BLAS kernel (cpu_matmul.py) where it builds, on
    whole arrays or one shard (not under GSPMD on a mesh)."""

    dtype: jnp.dtype
    fp8: str | None = None
    fp8_block_size: int = 128

    def __call__(self, x: jax.Array, w: jax.Array) -> jax.Array:
        """x [..., K] @ w [K, N] -> [..., N]; or grouped x [G, ..., K] @ w [G, K, N]."""
        if self.fp8:
            x, w = same_varying_axes(x.astype(self.dtype), w.astype(self.dtype))
            return fp8_matmul(x, w, recipe=self.fp8, out_dtype=self.dtype,
                              block_size=self.fp8_block_size)
        x, w = x.astype(self.dtype), w.astype(self.dtype)
        if w.ndim == 2 and cpu_kernels.runs_here(self.dtype):
            return cpu_matmul.matmul(x, w)  # XLA:CPU's own dots: cpu_matmul.py says why
        return jnp.matmul(x, w)


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

    Also the batched expert form: x [E, S, D] with weights [E, D, F] and [E, F, D]. On CPU in
    float32 it is one XLA FFI call each way where moejax's CPU kernels build, on whole arrays or
    one shard (cpu_swiglu.py: the activation beside the GEMMs; cpu_kernels.runs_here).
    Otherwise, without fp8, the backward is written out (`_swiglu`): autodiff's version left
    XLA:CPU fusing silu's derivative with a transpose for the weight gradient (the tiny
    DeepSeek-shaped step's dense layer took 36 ms per step, 15 ms with this:
    docs/bench_hf_model.md)."""
    if matmul.fp8:
        hidden = jax.nn.silu(matmul(x, p.w_gate)) * matmul(x, p.w_up)
        return matmul(hidden, p.w_down)
    weights = FFN(*(w.astype(matmul.dtype) for w in (p.w_gate, p.w_up, p.w_down)))
    x, weights = same_varying_axes(x.astype(matmul.dtype), weights)
    if cpu_kernels.runs_here(matmul.dtype):
        return cpu_swiglu.dense_swiglu(x, weights.w_gate, weights.w_up, weights.w_down)
    return _swiglu(weights, x)


@jax.custom_vjp
def _swiglu(p: FFN, x: jax.Array) -> jax.Array:
    return _swiglu_fwd(p, x)[0]


def _swiglu_fwd(p: FFN, x):
    gate, up = x @ p.w_gate, x @ p.w_up
    return (jax.nn.silu(gate) * up) @ p.w_down, (p, x, gate, up)


def swiglu_grads(gate, up, d_out, w_down_t):
    """SwiGLU's backward through its activation, from the pre-activations gate, up [..., F],
    the output gradient d_out and w_down transposed: (d_gate, d_up, the hidden silu(gate) up)."""
    sig = jax.nn.sigmoid(gate)
    silu = gate * sig
    d_hidden = d_out @ w_down_t
    return d_hidden * up * (sig * (1 + gate * (1 - sig))), d_hidden * silu, silu * up


def _swiglu_bwd(residuals, d_out):
    p, x, gate, up = residuals
    d_gate, d_up, hidden = swiglu_grads(gate, up, d_out, p.w_down.swapaxes(-1, -2))
    d_x = d_gate @ p.w_gate.swapaxes(-1, -2) + d_up @ p.w_up.swapaxes(-1, -2)
    # weight gradients as GEMMs over the rows: [..., D] and [..., F] flattened to [rows, *]
    # (per expert with batched weights [E, D, F])
    lead = p.w_gate.shape[:-2]

    def rows(a):
        return a.reshape(*lead, -1, a.shape[-1])

    def outer(a, b):  # sum over rows of a^T b
        return rows(a).swapaxes(-1, -2) @ rows(b)

    d_p = FFN(outer(x, d_gate), outer(x, d_up), outer(hidden, d_out))
    return d_p, d_x


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)
