"""Hugging Face architectures moejax converts to and from: config mapping and tensor layout.

Each supported architecture is an `Architecture`: how its config.json maps to moejax config
overrides (and back), which moejax configs it cannot express, and its tensor layout. Mixtral and
Qwen3-MoE are both Llama-style decoders (RMSNorm, rotate-half RoPE, grouped-query attention,
SwiGLU experts under a softmax top-k router), so they share one layout builder that differs only
in module names, Qwen3's per-head q/k norms and Qwen3's optional leading dense layers.

Adding DeepseekV3ForCausalLM (listed in UNSUPPORTED until moejax implements MLA) needs:
- config: router=deepseek, n_group/topk_group -> num_groups/topk_groups, routed_scaling_factor,
  norm_topk_prob -> normalize_weights, first_k_dense_replace -> num_dense_layers,
  n_shared_experts -> num_shared_experts (HF's shared_experts MLP is already the fused
  num_shared * F wide SwiGLU that moejax uses);
- tensors: MLA (q_a/q_b/kv_a/kv_b projections and their latent norms), with q_pe/k_pe columns
  permuted when rope_interleave is true (HF pairs adjacent dims, moejax pairs i and i + Q/2);
  `mlp.gate.e_score_correction_bias` belongs in RouterState.bias, not in the params, so load_hf
  would also return a router state; fp8 weights with 128x128 `weight_scale_inv` blocks must be
  dequantised while reading; the MTP layer (index num_hidden_layers) is skipped or mapped once
  moejax has MTP.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

from moejax.config import Config
from moejax.convert.layout import (
    ConversionError,
    Placement,
    TensorMap,
    fused_gate_up_half,
    heads_to_linear,
    heads_to_out_linear,
    identity,
    linear_to_heads,
    out_linear_to_heads,
    swap_last_axes,
)


@dataclasses.dataclass(frozen=True)
class Architecture:
    name: str  # the class name in config.json "architectures", e.g. "MixtralForCausalLM"
    model_type: str
    overrides_from_hf: Callable[[dict], list[str]]  # config.json -> moejax dotted overrides
    config_to_hf: Callable[[Config], dict]  # the inverse, without the common keys
    export_problems: Callable[[Config], list[str]]  # why a moejax config cannot be exported
    # (cfg, fused_experts, router_temperature) -> the checkpoint layout
    layout: Callable[[Config, bool, float], list[TensorMap]]


@dataclasses.dataclass(frozen=True)
class _Names:
    """Module names of one Llama-style MoE architecture (per-expert checkpoint layout)."""

    moe_module: str  # the sparse MoE block of a layer: "block_sparse_moe" (Mixtral) or "mlp"
    expert_projections: tuple[str, str, str]  # an expert's gate, up and down projections


def _linear_map(name, leaf, index, to_moejax, to_hf, shape) -> TensorMap:
    return TensorMap(name, shape, (Placement(leaf, index, to_moejax, to_hf),))


def _attention_maps(prefix: str, stack: str, layer: int, cfg: Config) -> list[TensorMap]:
    m = cfg.model
    leaf = (stack, "attn")
    d, q = m.d_model, m.head_dim
    maps = []
    for proj, param, heads in (("q", "wq", m.num_heads), ("k", "wk", m.num_kv_heads),
                               ("v", "wv", m.num_kv_heads)):
        maps.append(_linear_map(f"{prefix}.self_attn.{proj}_proj.weight", (*leaf, param), (layer,),
                                functools.partial(linear_to_heads, heads=heads), heads_to_linear,
                                (heads * q, d)))
    maps.append(_linear_map(f"{prefix}.self_attn.o_proj.weight", (*leaf, "wo"), (layer,),
                            functools.partial(out_linear_to_heads, heads=m.num_heads),
                            heads_to_out_linear, (d, m.num_heads * q)))
    if m.qk_norm:
        for norm in ("q_norm", "k_norm"):
            maps.append(_linear_map(f"{prefix}.self_attn.{norm}.weight", (*leaf, norm), (layer,),
                                    identity, identity, (q,)))
    for hf_norm, norm in (("input_layernorm", "attn_norm"),
                          ("post_attention_layernorm", "ffn_norm")):
        maps.append(_linear_map(f"{prefix}.{hf_norm}.weight", (stack, norm), (layer,),
                                identity, identity, (d,)))
    return maps


def _dense_ffn_maps(prefix: str, layer: int, cfg: Config) -> list[TensorMap]:
    d, f = cfg.model.d_model, cfg.model.ffn_dim
    leaf = ("dense_blocks", "ffn")
    return [
        _linear_map(f"{prefix}.mlp.{proj}.weight", (*leaf, param), (layer,), swap_last_axes,
                    swap_last_axes, shape)
        for proj, param, shape in (("gate_proj", "w_gate", (f, d)), ("up_proj", "w_up", (f, d)),
                                   ("down_proj", "w_down", (d, f)))
    ]


def _router_to_hf(w, temperature: float):
    """router [D, E] -> gate.weight [E, D], with the softmax temperature folded in:
    softmax(x W / T) = softmax(x (W / T)), and HF routers have no temperature."""
    return (w / temperature).T


def _moe_maps(prefix: str, layer: int, cfg: Config, names: _Names, fused: bool,
              temperature: float) -> list[TensorMap]:
    """The router and the routed experts: one tensor per expert and projection, or (fused, as
    transformers >= 5 can save them) one gate_up_proj [E, 2F, D] and one down_proj [E, D, F]."""
    d, f, e = cfg.model.d_model, cfg.moe.expert_ffn_dim, cfg.moe.num_experts
    leaf = ("moe_blocks", "ffn")
    module = "mlp" if fused else names.moe_module
    maps = [_linear_map(f"{prefix}.{module}.gate.weight", (*leaf, "router"), (layer,),
                        swap_last_axes, functools.partial(_router_to_hf, temperature=temperature),
                        (e, d))]
    if fused:
        gate_up = tuple(Placement((*leaf, param), (layer,),
                                  functools.partial(fused_gate_up_half, half=half), None)
                        for half, param in enumerate(("w_gate", "w_up")))
        down = (Placement((*leaf, "w_down"), (layer,), swap_last_axes, None),)
        return maps + [TensorMap(f"{prefix}.mlp.experts.gate_up_proj", (e, 2 * f, d), gate_up),
                       TensorMap(f"{prefix}.mlp.experts.down_proj", (e, d, f), down)]
    gate, up, down_name = names.expert_projections
    for expert in range(e):
        base = f"{prefix}.{names.moe_module}.experts.{expert}"
        for proj, param, shape in ((gate, "w_gate", (f, d)), (up, "w_up", (f, d)),
                                   (down_name, "w_down", (d, f))):
            maps.append(_linear_map(f"{base}.{proj}.weight", (*leaf, param), (layer, expert),
                                    swap_last_axes, swap_last_axes, shape))
    return maps


def _llama_style_layout(cfg: Config, fused_experts: bool, router_temperature: float,
                        names: _Names) -> list[TensorMap]:
    """HF layer i is dense_blocks[i] for the first num_dense_layers, else moe_blocks[i - that]."""
    m = cfg.model
    maps = [_linear_map("model.embed_tokens.weight", ("embed",), (), identity, identity,
                        (m.vocab_size, m.d_model))]
    for hf_layer in range(m.num_layers):
        prefix = f"model.layers.{hf_layer}"
        if hf_layer < cfg.num_dense_layers:
            maps += _attention_maps(prefix, "dense_blocks", hf_layer, cfg)
            maps += _dense_ffn_maps(prefix, hf_layer, cfg)
        else:
            layer = hf_layer - cfg.num_dense_layers
            maps += _attention_maps(prefix, "moe_blocks", layer, cfg)
            maps += _moe_maps(prefix, layer, cfg, names, fused_experts, router_temperature)
    maps.append(_linear_map("model.norm.weight", ("final_norm",), (), identity, identity,
                            (m.d_model,)))
    maps.append(_linear_map("lm_head.weight", ("lm_head",), (), swap_last_axes, swap_last_axes,
                            (m.vocab_size, m.d_model)))
    return maps


# Config mapping.


def _rope_theta(hf: dict, default: float) -> float:
    """rope_theta from transformers >= 5 (`rope_parameters`) or older (top-level) config.json."""
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = (rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
                 or "default")
    if rope_type != "default":
        raise ConversionError(f"RoPE scaling {rope_type!r} is not supported: moejax implements "
                              "plain RoPE only.")
    return float(rope.get("rope_theta", hf.get("rope_theta", default)))


def _common_overrides(hf: dict, name: str, default_theta: float) -> list[str]:
    if hf.get("tie_word_embeddings", False):
        raise ConversionError(f"{name} with tie_word_embeddings=true is not supported: moejax "
                              "keeps a separate output head.")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{name} with hidden_act={hf['hidden_act']!r} is not supported: "
                              "moejax experts are SwiGLU (silu).")
    if hf.get("attention_bias", False):
        raise ConversionError(f"{name} with attention_bias=true is not supported: moejax "
                              "attention projections have no bias.")
    heads = hf["num_attention_heads"]
    return [
        f"model.vocab_size={hf['vocab_size']}",
        f"model.d_model={hf['hidden_size']}",
        f"model.num_layers={hf['num_hidden_layers']}",
        f"model.num_heads={heads}",
        f"model.num_kv_heads={hf.get('num_key_value_heads') or heads}",
        f"model.head_dim={hf.get('head_dim') or hf['hidden_size'] // heads}",
        f"model.rope_theta={_rope_theta(hf, default_theta)!r}",
        f"model.norm_eps={float(hf['rms_norm_eps'])!r}",
        f"model.init_std={float(hf.get('initializer_range', 0.02))!r}",
        f"moe.top_k={hf['num_experts_per_tok']}",
        "moe.router=softmax_topk",
        "moe.temperature=1.0",
        "moe.routed_scaling_factor=1.0",
        "moe.num_shared_experts=0",
        "moe.num_groups=1",
        "moe.topk_groups=1",
        "moe.capacity_factor=null",
    ]


def _common_to_hf(cfg: Config, name: str, model_type: str) -> dict:
    m = cfg.model
    return {
        "architectures": [name],
        "model_type": model_type,
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.num_kv_heads,
        "head_dim": m.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": m.norm_eps,
        # both spellings: transformers >= 5 reads rope_parameters, older versions rope_theta
        "rope_theta": m.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "initializer_range": m.init_std,
        "max_position_embeddings": cfg.train.seq_len,
        "tie_word_embeddings": False,
        "attention_dropout": 0.0,
        "num_experts_per_tok": cfg.moe.top_k,
    }


def _common_export_problems(cfg: Config) -> list[str]:
    e = cfg.moe
    checks = [
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
ARCHITECTURES = {arch.name: arch for arch in (MIXTRAL, QWEN3_MOE)}
UNSUPPORTED = {
    "DeepseekV3ForCausalLM": "its MLA attention is not supported by moejax yet",
}


def architecture(name: str) -> Architecture:
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    reason = UNSUPPORTED.get(name, "moejax has no mapping for it")
    raise ConversionError(f"architecture {name!r} cannot be converted ({reason}): supported "
                          f"architectures are {sorted(ARCHITECTURES)}.")
