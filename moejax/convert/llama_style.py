"""Mixtral and Qwen3-MoE: Llama-style decoders (RMSNorm, rotate-half RoPE, grouped-query
attention, SwiGLU experts under a softmax top-k router). They share one layout builder that
differs only in module names, Qwen3's per-head q/k norms and Qwen3's optional leading dense
layers. Both may use YaRN (transformers scales only cos/sin for them, as moejax's GQA does).
"""

from __future__ import annotations

import dataclasses
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
    rope_overrides,
    routed_expert_maps,
    swiglu_maps,
    vector,
)
from moejax.convert.layout import (
    ConversionError,
    TensorMap,
    heads_to_linear,
    heads_to_out_linear,
    linear_to_heads,
    out_linear_to_heads,
    single,
    swap_last_axes,
)


@dataclasses.dataclass(frozen=True)
class _Names:
    """Module names of one Llama-style MoE architecture (per-expert checkpoint layout)."""

    moe_module: str  # the sparse MoE block of a layer: "block_sparse_moe" (Mixtral) or "mlp"
    expert_projections: tuple[str, str, str]  # an expert's gate, up and down projections


def _attention_maps(prefix: str, stack: str, layer: int, cfg: Config) -> list[TensorMap]:
    m = cfg.model
    leaf = (stack, "attn")
    d, q = m.d_model, m.head_dim
    maps = []
    for proj, param, heads in (("q", "wq", m.num_heads), ("k", "wk", m.num_kv_heads),
                               ("v", "wv", m.num_kv_heads)):
        maps.append(single(f"{prefix}.self_attn.{proj}_proj.weight", (*leaf, param), (layer,),
                           functools.partial(linear_to_heads, heads=heads), heads_to_linear,
                           (heads * q, d)))
    maps.append(single(f"{prefix}.self_attn.o_proj.weight", (*leaf, "wo"), (layer,),
                       functools.partial(out_linear_to_heads, heads=m.num_heads),
                       heads_to_out_linear, (d, m.num_heads * q)))
    if m.qk_norm:
        maps += [vector(f"{prefix}.self_attn.{norm}.weight", (*leaf, norm), (layer,), q)
                 for norm in ("q_norm", "k_norm")]
    return maps + block_norm_maps(prefix, (stack,), (layer,), d)


def _router_to_hf(w, temperature: float):
    """router [D, E] -> gate.weight [E, D], with the softmax temperature folded in:
    softmax(x W / T) = softmax(x (W / T)), and HF routers have no temperature."""
    return (w / temperature).T


def _moe_maps(prefix: str, layer: int, cfg: Config, names: _Names,
              options: LayoutOptions) -> list[TensorMap]:
    """The router and the routed experts (transformers >= 5's fused layout always names the
    sparse block "mlp")."""
    leaf = ("moe_blocks", "ffn")
    module = f"{prefix}.{'mlp' if options.fused_experts else names.moe_module}"
    to_hf = functools.partial(_router_to_hf, temperature=options.router_temperature)
    router = single(f"{module}.gate.weight", (*leaf, "router"), (layer,),
                    swap_last_axes, to_hf, (cfg.moe.num_experts, cfg.model.d_model))
    return [router, *routed_expert_maps(module, leaf, (layer,), cfg, options.fused_experts,
                                        names.expert_projections)]


def _llama_style_layout(cfg: Config, options: LayoutOptions, names: _Names) -> list[TensorMap]:
    """HF layer i is dense_blocks[i] for the first num_dense_layers, else moe_blocks[i - that]."""
    m = cfg.model
    maps = [embedding_map(cfg)]
    for hf_layer in range(m.num_layers):
        prefix = f"model.layers.{hf_layer}"
        if hf_layer < cfg.num_dense_layers:
            maps += _attention_maps(prefix, "dense_blocks", hf_layer, cfg)
            maps += swiglu_maps(f"{prefix}.mlp", ("dense_blocks", "ffn"), (hf_layer,),
                                m.d_model, m.ffn_dim)
        else:
            layer = hf_layer - cfg.num_dense_layers
            maps += _attention_maps(prefix, "moe_blocks", layer, cfg)
            maps += _moe_maps(prefix, layer, cfg, names, options)
    return maps + final_maps(cfg)


# Config mapping.


def _common_overrides(hf: dict, name: str, default_theta: float) -> list[str]:
    check_common_features(hf, name)
    heads = hf["num_attention_heads"]
    return base_overrides(hf) + rope_overrides(hf, name, default_theta) + [
        "model.attention=gqa",
        f"model.num_kv_heads={hf.get('num_key_value_heads') or heads}",
        f"model.head_dim={hf.get('head_dim') or hf['hidden_size'] // heads}",
        "model.mtp_depth=0",
        "moe.router=softmax_topk",
        "moe.routed_scaling_factor=1.0",
        "moe.num_shared_experts=0",
        "moe.num_groups=1",
        "moe.topk_groups=1",
    ]


def _common_to_hf(cfg: Config, name: str, model_type: str) -> dict:
    return {**base_to_hf(cfg, name, model_type), "num_key_value_heads": cfg.model.num_kv_heads,
            "head_dim": cfg.model.head_dim}


def _common_export_problems(cfg: Config) -> list[str]:
    m, e = cfg.model, cfg.moe
    checks = [
        (m.attention == "gqa", f"model.attention={m.attention!r} (only gqa)"),
        (m.mtp_depth == 0, f"model.mtp_depth={m.mtp_depth} (no multi-token prediction)"),
        (e.num_experts > 0, "moe.num_experts=0 (a dense model)"),
        (e.router == "softmax_topk", f"moe.router={e.router!r} (only softmax_topk)"),
        (e.num_shared_experts == 0, f"moe.num_shared_experts={e.num_shared_experts}"),
        (e.routed_scaling_factor == 1.0, f"moe.routed_scaling_factor={e.routed_scaling_factor}"),
        (e.num_groups == 1, f"moe.num_groups={e.num_groups}"),
    ]
    return [problem for ok, problem in checks if not ok]


def _mixtral_overrides(hf: dict) -> list[str]:
    if hf.get("sliding_window") is not None:
        raise ConversionError(f"MixtralForCausalLM with sliding_window={hf['sliding_window']} is "
                              "not supported: moejax attention is full causal attention.")
    return _common_overrides(hf, "MixtralForCausalLM", default_theta=1e6) + [
        f"moe.num_experts={hf['num_local_experts']}",
        f"moe.expert_ffn_dim={hf['intermediate_size']}",
        f"model.ffn_dim={hf['intermediate_size']}",
        "moe.normalize_weights=true",
        "model.num_dense_layers=0",
        "model.qk_norm=false",
    ]


def _mixtral_to_hf(cfg: Config) -> dict:
    return {**_common_to_hf(cfg, "MixtralForCausalLM", "mixtral"),
            "num_local_experts": cfg.moe.num_experts,
            "intermediate_size": cfg.moe.expert_ffn_dim,
            "sliding_window": None,
            "router_jitter_noise": 0.0}


def _mixtral_export_problems(cfg: Config) -> list[str]:
    checks = [
        (cfg.moe.normalize_weights, "moe.normalize_weights=false"),
        (cfg.num_dense_layers == 0, f"{cfg.num_dense_layers} dense layers"),
        (not cfg.model.qk_norm, "model.qk_norm=true"),
    ]
    return _common_export_problems(cfg) + [problem for ok, problem in checks if not ok]


def _qwen3_dense_layers(hf: dict) -> int:
    """How many leading dense layers; any other dense-layer pattern is unsupported."""
    layers, experts = hf["num_hidden_layers"], hf.get("num_experts", hf.get("num_local_experts"))
    step, mlp_only = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or ())
    dense = [i for i in range(layers)
             if i in mlp_only or not experts or (i + 1) % step != 0]
    if dense != list(range(len(dense))):
        raise ConversionError(
            f"Qwen3MoeForCausalLM with dense layers {dense} (mlp_only_layers="
            f"{sorted(mlp_only)}, decoder_sparse_step={step}) is not supported: moejax's dense "
            "layers must be the first ones.")
    return len(dense)


def _qwen3_overrides(hf: dict) -> list[str]:
    if hf.get("use_sliding_window", False):
        raise ConversionError("Qwen3MoeForCausalLM with use_sliding_window=true is not "
                              "supported: moejax attention is full causal attention.")
    experts = hf.get("num_experts", hf.get("num_local_experts"))
    return _common_overrides(hf, "Qwen3MoeForCausalLM", default_theta=10000.0) + [
        f"moe.num_experts={experts}",
        f"moe.expert_ffn_dim={hf['moe_intermediate_size']}",
        f"model.ffn_dim={hf['intermediate_size']}",
        f"moe.normalize_weights={str(bool(hf.get('norm_topk_prob', False))).lower()}",
        f"model.num_dense_layers={_qwen3_dense_layers(hf)}",
        "model.qk_norm=true",
    ]


def _qwen3_to_hf(cfg: Config) -> dict:
    return {**_common_to_hf(cfg, "Qwen3MoeForCausalLM", "qwen3_moe"),
            "num_experts": cfg.moe.num_experts,
            "moe_intermediate_size": cfg.moe.expert_ffn_dim,
            "intermediate_size": cfg.model.ffn_dim,
            "norm_topk_prob": cfg.moe.normalize_weights,
            "decoder_sparse_step": 1,
            "mlp_only_layers": list(range(cfg.num_dense_layers)),
            "use_sliding_window": False,
            "sliding_window": None,
            "attention_bias": False}


def _qwen3_export_problems(cfg: Config) -> list[str]:
    problems = _common_export_problems(cfg)
    if not cfg.model.qk_norm:
        problems.append("model.qk_norm=false (Qwen3 always normalises q and k)")
    return problems


MIXTRAL = Architecture(
    name="MixtralForCausalLM",
    model_type="mixtral",
    overrides_from_hf=_mixtral_overrides,
    config_to_hf=_mixtral_to_hf,
    export_problems=_mixtral_export_problems,
    layout=functools.partial(_llama_style_layout,
                             names=_Names("block_sparse_moe", ("w1", "w3", "w2"))),
)
QWEN3_MOE = Architecture(
    name="Qwen3MoeForCausalLM",
    model_type="qwen3_moe",
    overrides_from_hf=_qwen3_overrides,
    config_to_hf=_qwen3_to_hf,
    export_problems=_qwen3_export_problems,
    layout=functools.partial(_llama_style_layout,
                             names=_Names("mlp", ("gate_proj", "up_proj", "down_proj"))),
)
