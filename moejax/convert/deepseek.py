"""DeepSeek-V3 (DeepseekV3ForCausalLM): MLA attention, a sigmoid group-limited router with a
selection bias, shared experts, leading dense layers and (in the released weights) MTP layers.

Tensor layout, per HF layer `model.layers.{i}` (dense for i < first_k_dense_replace):
- self_attn: q_a_proj, q_a_layernorm, q_b_proj (or q_proj when q_lora_rank is None),
  kv_a_proj_with_mqa [Rkv + Qr, D], kv_a_layernorm, kv_b_proj [H (Qn + V), Rkv], o_proj. With
  rope_interleave (the default) the RoPE dims of queries and of the shared key come in adjacent
  pairs; moejax rotates halves, so those rows are reordered (evens, then odds) both ways.
- mlp: gate_proj/up_proj/down_proj (dense), or gate.weight [E, D], gate.e_score_correction_bias
  [E] (a row of RouterState.bias, not a parameter), experts (per expert, or fused) and
  shared_experts (one SwiGLU of width n_shared_experts * F, as moejax's `MoE.shared`).
- MTP depth k at `model.layers.{num_hidden_layers + k}`: embed_tokens (a copy of the
  embedding), enorm, hnorm, eh_proj [D, 2D] (embedding half first, as moejax's proj), a full
  MoE layer, shared_head.norm and shared_head.head (a copy of lm_head). Its router bias is
  RouterState.bias row L_moe + k.
The latent norms (q_a_layernorm, kv_a_layernorm) use eps 1e-6 whatever rms_norm_eps says, in
transformers and in moejax (attention.LATENT_NORM_EPS) alike.
"""

from __future__ import annotations

import functools

from moejax.config import Config
from moejax.convert.common import (
    Architecture,
    LayoutOptions,
    base_overrides,
    base_to_hf,
    block_norm_maps,
    check_common_features,
    embedding_map,
    final_maps,
    linear,
    rope_overrides,
    routed_expert_maps,
    swiglu_maps,
    vector,
)
from moejax.convert.layout import (
    ROUTER_BIAS,
    ConversionError,
    LeafPath,
    TensorMap,
    heads_to_linear,
    heads_to_out_linear,
    identity,
    linear_to_heads,
    out_linear_to_heads,
    rope_halves_from_pairs,
    rope_pairs_from_halves,
    single,
    swap_last_axes,
)

NAME = "DeepseekV3ForCausalLM"


# Conversions; rope_dim is the number of trailing RoPE dims to reorder (0: none).


def _heads_from_hf(x, heads: int, rope_dim: int):
    """q_proj / q_b_proj [H (Qn + Qr), in] -> [in, H, Qn + Qr], RoPE dims as halves."""
    w = linear_to_heads(x, heads)
    return rope_halves_from_pairs(w, rope_dim) if rope_dim else w


def _heads_to_hf(w, rope_dim: int):
    return heads_to_linear(rope_pairs_from_halves(w, rope_dim) if rope_dim else w)


def _kv_a_from_hf(x, rope_dim: int):
    """kv_a_proj_with_mqa [Rkv + Qr, D] -> wkv_a [D, Rkv + Qr], RoPE dims as halves."""
    return rope_halves_from_pairs(x.T, rope_dim) if rope_dim else x.T


def _kv_a_to_hf(w, rope_dim: int):
    return (rope_pairs_from_halves(w, rope_dim) if rope_dim else w).T


# Layout.


def _query_maps(prefix: str, attn: LeafPath, index, cfg: Config, rope_dim: int):
    m = cfg.model
    h, qk, rank = m.num_heads, m.qk_nope_head_dim + m.qk_rope_head_dim, m.q_lora_rank
    from_hf = functools.partial(_heads_from_hf, heads=h, rope_dim=rope_dim)
    to_hf = functools.partial(_heads_to_hf, rope_dim=rope_dim)
    if not rank:
        return [single(f"{prefix}.q_proj.weight", (*attn, "wq"), index, from_hf, to_hf,
                       (h * qk, m.d_model))]
    return [linear(f"{prefix}.q_a_proj.weight", (*attn, "wq_a"), index, (rank, m.d_model)),
            vector(f"{prefix}.q_a_layernorm.weight", (*attn, "q_a_norm"), index, rank),
            single(f"{prefix}.q_b_proj.weight", (*attn, "wq_b"), index, from_hf, to_hf,
                   (h * qk, rank))]


def _mla_maps(prefix: str, block: LeafPath, index, cfg: Config, options: LayoutOptions):
    m = cfg.model
    attn, module = (*block, "attn"), f"{prefix}.self_attn"
    rope_dim = m.qk_rope_head_dim if options.rope_interleave else 0
    h, rank = m.num_heads, m.kv_lora_rank
    return _query_maps(module, attn, index, cfg, rope_dim) + [
        single(f"{module}.kv_a_proj_with_mqa.weight", (*attn, "wkv_a"), index,
               functools.partial(_kv_a_from_hf, rope_dim=rope_dim),
               functools.partial(_kv_a_to_hf, rope_dim=rope_dim),
               (rank + m.qk_rope_head_dim, m.d_model)),
        vector(f"{module}.kv_a_layernorm.weight", (*attn, "kv_a_norm"), index, rank),
        single(f"{module}.kv_b_proj.weight", (*attn, "wkv_b"), index,
               functools.partial(linear_to_heads, heads=h), heads_to_linear,
               (h * (m.qk_nope_head_dim + m.v_head_dim), rank)),
        single(f"{module}.o_proj.weight", (*attn, "wo"), index,
               functools.partial(out_linear_to_heads, heads=h), heads_to_out_linear,
               (m.d_model, h * m.v_head_dim)),
    ]


def _moe_maps(prefix: str, block: LeafPath, index, bias_row: int, cfg: Config,
              options: LayoutOptions) -> list[TensorMap]:
    """Router, its selection bias (kept float32, as the released weights), routed and shared
    experts."""
    d, e = cfg.model.d_model, cfg.moe.num_experts
    module, ffn = f"{prefix}.mlp", (*block, "ffn")
    maps = [linear(f"{module}.gate.weight", (*ffn, "router"), index, (e, d)),
            single(f"{module}.gate.e_score_correction_bias", ROUTER_BIAS, (bias_row,),
                   identity, identity, (e,), dtype="float32")]
    maps += routed_expert_maps(module, ffn, index, cfg, options.fused_experts)
    if cfg.moe.num_shared_experts:
        maps += swiglu_maps(f"{module}.shared_experts", (*ffn, "shared"), index, d,
                            cfg.moe.num_shared_experts * cfg.moe.expert_ffn_dim)
    return maps


def _layer_maps(hf_layer: int, cfg: Config, options: LayoutOptions) -> list[TensorMap]:
    """HF layer i is dense_blocks[i] for the first num_dense_layers, else moe_blocks[i - that]."""
    m, prefix = cfg.model, f"model.layers.{hf_layer}"
    if hf_layer < cfg.num_dense_layers:
        block, index = ("dense_blocks",), (hf_layer,)
        ffn = swiglu_maps(f"{prefix}.mlp", (*block, "ffn"), index, m.d_model, m.ffn_dim)
    else:
        layer = hf_layer - cfg.num_dense_layers
        block, index = ("moe_blocks",), (layer,)
        ffn = _moe_maps(prefix, block, index, layer, cfg, options)
    return (_mla_maps(prefix, block, index, cfg, options)
            + block_norm_maps(prefix, block, index, m.d_model) + ffn)


def _mtp_maps(depth: int, cfg: Config, options: LayoutOptions) -> list[TensorMap]:
    m = cfg.model
    prefix, block, index = f"model.layers.{m.num_layers + depth}", ("mtp", "block"), (depth,)
    d, v = m.d_model, m.vocab_size
    return [
        single(f"{prefix}.embed_tokens.weight", ("embed",), (), identity, identity, (v, d),
               duplicate_of="model.embed_tokens.weight"),
        vector(f"{prefix}.enorm.weight", ("mtp", "embed_norm"), index, d),
        vector(f"{prefix}.hnorm.weight", ("mtp", "hidden_norm"), index, d),
        linear(f"{prefix}.eh_proj.weight", ("mtp", "proj"), index, (d, 2 * d)),
        *_mla_maps(prefix, block, index, cfg, options),
        *block_norm_maps(prefix, block, index, d),
        *_moe_maps(prefix, block, index, cfg.num_moe_layers + depth, cfg, options),
        vector(f"{prefix}.shared_head.norm.weight", ("mtp", "final_norm"), index, d),
        single(f"{prefix}.shared_head.head.weight", ("lm_head",), (), swap_last_axes,
               swap_last_axes, (v, d), duplicate_of="lm_head.weight"),
    ]


def _deepseek_layout(cfg: Config, options: LayoutOptions) -> list[TensorMap]:
    maps = [embedding_map(cfg)]
    for hf_layer in range(cfg.model.num_layers):
        maps += _layer_maps(hf_layer, cfg, options)
    maps += final_maps(cfg)
    for depth in range(cfg.model.mtp_depth):
        maps += _mtp_maps(depth, cfg, options)
    return maps


# Config mapping.


# Keys of DeepSeek's own config.json that transformers ignores (it hard-codes these values):
# a checkpoint with other values would convert silently wrong.
FIXED_KEYS = {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "moe_layer_freq": 1}


def _deepseek_overrides(hf: dict) -> list[str]:
    check_common_features(hf, NAME)
    for key, expected in FIXED_KEYS.items():
        if hf.get(key, expected) != expected:
            raise ConversionError(f"{NAME} with {key}={hf[key]!r} is not supported: moejax (like "
                                  f"transformers) implements DeepSeek-V3's {key}={expected!r}.")
    heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    if kv_heads != heads:
        raise ConversionError(
            f"{NAME} with num_key_value_heads={kv_heads} != num_attention_heads={heads} is not "
            "supported: MLA expands a key and a value for every head.")
    dense = min(hf["first_k_dense_replace"] or 0, hf["num_hidden_layers"])
    return base_overrides(hf) + rope_overrides(hf, NAME, default_theta=10000.0) + [
        "model.attention=mla",
        f"model.num_kv_heads={heads}",  # unused by MLA
        f"model.head_dim={hf['qk_nope_head_dim'] + hf['qk_rope_head_dim']}",  # unused by MLA
        f"model.q_lora_rank={hf['q_lora_rank'] or 0}",
        f"model.kv_lora_rank={hf['kv_lora_rank']}",
        f"model.qk_nope_head_dim={hf['qk_nope_head_dim']}",
        f"model.qk_rope_head_dim={hf['qk_rope_head_dim']}",
        f"model.v_head_dim={hf['v_head_dim']}",
        "model.qk_norm=false",
        f"model.ffn_dim={hf['intermediate_size']}",
        f"model.num_dense_layers={dense}",
        f"moe.num_experts={hf['n_routed_experts']}",
        f"moe.expert_ffn_dim={hf['moe_intermediate_size']}",
        f"moe.num_shared_experts={hf['n_shared_experts'] or 0}",
        "moe.router=deepseek",
        f"moe.num_groups={hf['n_group'] or 1}",
        f"moe.topk_groups={hf['topk_group'] or 1}",
        f"moe.routed_scaling_factor={float(hf['routed_scaling_factor'])!r}",
        f"moe.normalize_weights={str(bool(hf['norm_topk_prob'])).lower()}",
    ]


def _deepseek_to_hf(cfg: Config) -> dict:
    m, e = cfg.model, cfg.moe
    return {**base_to_hf(cfg, NAME, "deepseek_v3"),
            "num_key_value_heads": m.num_heads,
            "q_lora_rank": m.q_lora_rank or None,
            "kv_lora_rank": m.kv_lora_rank,
            "qk_nope_head_dim": m.qk_nope_head_dim,
            "qk_rope_head_dim": m.qk_rope_head_dim,
            "v_head_dim": m.v_head_dim,
            "rope_interleave": True,  # what the layout writes (LayoutOptions' default)
            "intermediate_size": m.ffn_dim,
            "first_k_dense_replace": cfg.num_dense_layers,
            "n_routed_experts": e.num_experts,
            "moe_intermediate_size": e.expert_ffn_dim,
            "n_shared_experts": e.num_shared_experts,
            "n_group": e.num_groups,
            "topk_group": e.topk_groups,
            "routed_scaling_factor": e.routed_scaling_factor,
            "norm_topk_prob": e.normalize_weights,
            "num_nextn_predict_layers": m.mtp_depth,
            "attention_bias": False}


def _deepseek_export_problems(cfg: Config) -> list[str]:
    m, e = cfg.model, cfg.moe
    checks = [
        (m.attention == "mla", f"model.attention={m.attention!r} (only mla)"),
        (e.num_experts > 0, "moe.num_experts=0 (a dense model)"),
        (e.router == "deepseek", f"moe.router={e.router!r} (only deepseek)"),
        (m.mtp_depth == 0 or cfg.num_moe_layers > 0,
         "multi-token prediction in a model without MoE layers (DeepSeek's MTP layer is one)"),
    ]
    return [problem for ok, problem in checks if not ok]


DEEPSEEK_V3 = Architecture(
    name=NAME,
    model_type="deepseek_v3",
    overrides_from_hf=_deepseek_overrides,
    config_to_hf=_deepseek_to_hf,
    export_problems=_deepseek_export_problems,
    layout=_deepseek_layout,
    has_mtp=True,
)
