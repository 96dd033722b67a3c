"""The transformer: embedding, a stack of dense-FFN blocks, a stack of MoE blocks, output head.

Each stack's blocks share one set of stacked parameters (leading `layers` axis) and run under
`jax.lax.scan`, optionally rematerialised. `forward` is a pure function of the parameters, the
tokens and the router state; auxiliary outputs are returned, never hidden in collections.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import struct

from moejax import params as P
from moejax.config import Config
from moejax.model.attention import Attention, attention_specs, causal_attention
from moejax.model.layers import FFN, ffn_specs, layer_matmuls, rms_norm, rope_tables, swiglu
from moejax.model.moe import MoE, moe_ffn, moe_specs
from moejax.sharding import constrain

ACTIVATION_AXES = ("act_batch", "act_seq", "act_embed")
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@struct.dataclass
class Block:
    attn_norm: jax.Array  # [D]
    attn: Attention
    ffn_norm: jax.Array  # [D]
    ffn: FFN | MoE


@struct.dataclass
class Transformer:
    embed: jax.Array  # [V, D]
    dense_blocks: Block | None  # leaves stacked [L_dense, ...]
    moe_blocks: Block | None  # leaves stacked [L_moe, ...]
    final_norm: jax.Array  # [D]
    lm_head: jax.Array  # [D, V]


@struct.dataclass
class RouterState:
    """Router state that is not trained by gradients."""

    bias: jax.Array  # [L_moe, E] float32 selection bias (aux-loss-free balancing)
    temperature: jax.Array  # [] float32, softmax_topk temperature


def model_specs(cfg: Config) -> Transformer:
    m = cfg.model
    norm = P.ParamSpec((m.d_model,), ("embed",), P.ones_init)
    init = P.normal_init(m.init_std)

    def stack(ffn, num_layers):
        if num_layers == 0:
            return None
        block = Block(attn_norm=norm, attn=attention_specs(m), ffn_norm=norm, ffn=ffn)
        return jax.tree.map(lambda s: P.stacked(s, num_layers), block, is_leaf=P.is_spec)

    return Transformer(
        embed=P.ParamSpec((m.vocab_size, m.d_model), ("vocab", "embed"), init),
        dense_blocks=stack(ffn_specs(m.d_model, m.ffn_dim, m.init_std), cfg.num_dense_layers),
        moe_blocks=stack(moe_specs(cfg) if cfg.num_moe_layers else None, cfg.num_moe_layers),
        final_norm=norm,
        lm_head=P.ParamSpec((m.d_model, m.vocab_size), ("embed", "vocab"), init),
    )


def init_params(cfg: Config, key: jax.Array, mesh=None) -> Transformer:
    """Parameters in `precision.param_dtype`, created sharded when a mesh is given."""
    specs = jax.tree.map(
        lambda s: P.ParamSpec(s.shape, s.logical_axes, s.init, cfg.precision.param_dtype),
        model_specs(cfg), is_leaf=P.is_spec,
    )
    return P.init(specs, key, mesh)


def init_router_state(cfg: Config) -> RouterState:
    return RouterState(
        bias=jnp.zeros((cfg.num_moe_layers, max(cfg.moe.num_experts, 1)), jnp.float32),
        temperature=jnp.asarray(cfg.moe.temperature, jnp.float32),
    )


def _run_stack(blocks: Block, x, per_layer, layer_fn, cfg: Config):
    """Scan `layer_fn(block, x, per_layer_input) -> (x, stats)` over the stacked blocks."""
    body = lambda carry, inputs: layer_fn(inputs[0], carry, inputs[1])
    if cfg.model.remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[cfg.model.remat])
    return jax.lax.scan(body, x, (blocks, per_layer))


def forward(params: Transformer, tokens: jax.Array, cfg: Config, router_state=None):
    """tokens [B, T] int -> (logits [B, T, V] float32, aux dict of MoE statistics)."""
    m = cfg.model
    dtype = jnp.dtype(cfg.precision.compute_dtype)
    matmuls = layer_matmuls(cfg.precision)
    router_state = init_router_state(cfg) if router_state is None else router_state
    rope = rope_tables(tokens.shape[1], m.head_dim, m.rope_theta)

    def attention_block(block: Block, x):
        h = rms_norm(x, block.attn_norm, m.norm_eps)
        x = x + causal_attention(block.attn, h, rope, m, matmuls["attention"]).astype(x.dtype)
        return constrain(x, ACTIVATION_AXES), rms_norm(x, block.ffn_norm, m.norm_eps)

    def dense_layer(block: Block, x, _):
        x, h = attention_block(block, x)
        return constrain(x + swiglu(block.ffn, h, matmuls["dense_ffn"]).astype(x.dtype), ACTIVATION_AXES), None

    def moe_layer(block: Block, x, bias):
        x, h = attention_block(block, x)
        y, stats = moe_ffn(block.ffn, h, bias, router_state.temperature, cfg, matmuls)
        return constrain(x + y, ACTIVATION_AXES), stats

    x = constrain(params.embed[tokens].astype(jnp.float32), ACTIVATION_AXES)
    if params.dense_blocks is not None:
        x, _ = _run_stack(params.dense_blocks, x, jnp.zeros(cfg.num_dense_layers), dense_layer, cfg)
    layer_stats = None
    if params.moe_blocks is not None:
        x, layer_stats = _run_stack(params.moe_blocks, x, router_state.bias, moe_layer, cfg)
    x = rms_norm(x, params.final_norm, m.norm_eps)
    logits = jnp.einsum("btd,dv->btv", x.astype(dtype), params.lm_head.astype(dtype),
                        preferred_element_type=jnp.float32)
    return logits, _aux_outputs(layer_stats, cfg)


def _aux_outputs(layer_stats, cfg: Config) -> dict:
    """Per-layer statistics -> the aux dict: losses summed over MoE layers, loads per layer."""
    e = cfg.moe
    if layer_stats is None:
        zero = jnp.zeros((), jnp.float32)
        return {"switch_loss": zero, "seq_balance_loss": zero, "z_loss": zero,
                "aux_loss": zero, "dropped_fraction": zero,
                "expert_counts": jnp.zeros((0, max(e.num_experts, 1)), jnp.float32)}
    aux = {name: jnp.sum(layer_stats[name]) for name in ("switch_loss", "seq_balance_loss", "z_loss")}
    aux["aux_loss"] = (e.switch_loss_coef * aux["switch_loss"]
                       + e.seq_balance_loss_coef * aux["seq_balance_loss"]
                       + e.z_loss_coef * aux["z_loss"])
    aux["dropped_fraction"] = jnp.mean(layer_stats["dropped_fraction"])
    aux["expert_counts"] = layer_stats["expert_counts"]  # [L_moe, E]
    return aux


def loss_fn(params: Transformer, batch: dict, cfg: Config, router_state=None):
    """Next-token cross-entropy plus the weighted router losses.

    batch["tokens"] is [B, T + 1]: inputs are tokens[:, :-1], targets tokens[:, 1:].
    Returns (loss, metrics) with every loss term reported separately.
    """
    tokens = batch["tokens"]
    logits, aux = forward(params, tokens[:, :-1], cfg, router_state)
    cross_entropy = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]))
    metrics = {"cross_entropy": cross_entropy, **aux}
    return cross_entropy + aux["aux_loss"], metrics


def count_params(cfg: Config) -> dict[str, int]:
    """Total and active (per token) parameter counts, from the declarations alone.

    Active counts k of the E routed experts of each MoE layer, and everything else in full.
    """
    specs = model_specs(cfg)
    total = P.count(specs)
    routed = 0
    if specs.moe_blocks is not None:
        ffn = specs.moe_blocks.ffn
        routed = ffn.w_gate.size + ffn.w_up.size + ffn.w_down.size
    inactive = routed - routed * cfg.moe.top_k // max(cfg.moe.num_experts, 1)
    return {"total": total, "active": total - inactive, "routed_experts": routed,
            "embedding": specs.embed.size, "lm_head": specs.lm_head.size}
