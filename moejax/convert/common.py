"""What the architecture mappings share: the `Architecture` record, layout pieces common to the
Hugging Face decoders (norms, SwiGLU projections, routed experts, embedding and head) and the
config pieces (feature checks, RoPE and YaRN both ways).

Leaf paths name a block by its stack and index: ("moe_blocks",) with (layer,), or
("mtp", "block") with (depth,) for a multi-token-prediction module.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

from moejax.config import Config, ModelConfig
from moejax.convert.layout import (
    ConversionError,
    LeafPath,
    Placement,
    TensorMap,
    fused_gate_up_half,
    identity,
    single,
    swap_last_axes,
)
from moejax.model.layers import yarn_mscale


@dataclasses.dataclass(frozen=True)
class LayoutOptions:
    """How a checkpoint lays out what the config alone does not say."""

    fused_experts: bool = False  # transformers >= 5 fused gate_up_proj [E, 2F, D], down_proj
    router_temperature: float = 1.0  # folded into softmax routers on export
    rope_interleave: bool = True  # DeepSeek: RoPE dims in adjacent pairs (its default)


@dataclasses.dataclass(frozen=True)
class Architecture:
    name: str  # the class name in config.json "architectures", e.g. "MixtralForCausalLM"
    model_type: str
    overrides_from_hf: Callable[[dict], list[str]]  # config.json -> moejax dotted overrides
    config_to_hf: Callable[[Config], dict]  # the inverse
    export_problems: Callable[[Config], list[str]]  # why a moejax config cannot be exported
    layout: Callable[[Config, LayoutOptions], list[TensorMap]]
    # whether checkpoints may carry multi-token-prediction layers (num_nextn_predict_layers)
    has_mtp: bool = False


# Layout pieces. nn.Linear stores [out, in]; moejax [in, out].


def linear(name: str, leaf: LeafPath, index: tuple[int, ...], shape) -> TensorMap:
    """An nn.Linear weight [out, in] <-> leaf[index] [in, out]."""
    return single(name, leaf, index, swap_last_axes, swap_last_axes, tuple(shape))


def vector(name: str, leaf: LeafPath, index: tuple[int, ...], size: int) -> TensorMap:
    """A norm weight (or other vector) stored the same way in both."""
    return single(name, leaf, index, identity, identity, (size,))


def block_norm_maps(prefix: str, block: LeafPath, index: tuple[int, ...], d: int):
    return [vector(f"{prefix}.input_layernorm.weight", (*block, "attn_norm"), index, d),
            vector(f"{prefix}.post_attention_layernorm.weight", (*block, "ffn_norm"), index, d)]


def swiglu_maps(module: str, ffn: LeafPath, index: tuple[int, ...], d: int, f: int,
                projections=("gate_proj", "up_proj", "down_proj")) -> list[TensorMap]:
    """One SwiGLU MLP `module` (gate, up and down projections) <-> an FFN's w_gate, w_up,
    w_down at `ffn`[index]."""
    gate, up, down = projections
    return [linear(f"{module}.{gate}.weight", (*ffn, "w_gate"), index, (f, d)),
            linear(f"{module}.{up}.weight", (*ffn, "w_up"), index, (f, d)),
            linear(f"{module}.{down}.weight", (*ffn, "w_down"), index, (d, f))]


def routed_expert_maps(module: str, ffn: LeafPath, index: tuple[int, ...], cfg: Config,
                       fused: bool, projections=("gate_proj", "up_proj", "down_proj")):
    """The routed experts of one MoE layer: one SwiGLU per expert under `module`.experts.{e},
    or (fused, as transformers >= 5 can save them) one gate_up_proj [E, 2F, D] and one
    down_proj [E, D, F] (read only)."""
    d, f, e = cfg.model.d_model, cfg.moe.expert_ffn_dim, cfg.moe.num_experts
    if not fused:
        return [tensor for expert in range(e)
                for tensor in swiglu_maps(f"{module}.experts.{expert}", ffn, (*index, expert),
                                          d, f, projections)]
    gate_up = tuple(Placement((*ffn, param), index,
                              functools.partial(fused_gate_up_half, half=half), None)
                    for half, param in enumerate(("w_gate", "w_up")))
    down = (Placement((*ffn, "w_down"), index, swap_last_axes, None),)
    return [TensorMap(f"{module}.experts.gate_up_proj", (e, 2 * f, d), gate_up),
            TensorMap(f"{module}.experts.down_proj", (e, d, f), down)]


def embedding_map(cfg: Config) -> TensorMap:
    m = cfg.model
    return single("model.embed_tokens.weight", ("embed",), (), identity, identity,
                  (m.vocab_size, m.d_model))


def final_maps(cfg: Config) -> list[TensorMap]:
    """The final norm and the output head."""
    m = cfg.model
    return [vector("model.norm.weight", ("final_norm",), (), m.d_model),
            linear("lm_head.weight", ("lm_head",), (), (m.vocab_size, m.d_model))]


# Config pieces.


def check_common_features(hf: dict, name: str) -> None:
    """Refuse the options no moejax model has, with one sentence each."""
    if hf.get("tie_word_embeddings", False):
        raise ConversionError(f"{name} with tie_word_embeddings=true is not supported: moejax "
                              "keeps a separate output head.")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{name} with hidden_act={hf['hidden_act']!r} is not supported: "
                              "moejax experts are SwiGLU (silu).")
    if hf.get("attention_bias", False):
        raise ConversionError(f"{name} with attention_bias=true is not supported: moejax "
                              "attention projections have no bias.")


def _rope_parameters(hf: dict) -> dict:
    """The RoPE dict of config.json: transformers >= 5 writes rope_parameters, older versions
    rope_scaling (which transformers 5 still prefers when both are there)."""
    return dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})


def rope_overrides(hf: dict, name: str, default_theta: float) -> list[str]:
    """model.rope_* overrides: plain RoPE or YaRN (other scalings are refused)."""
    rope = _rope_parameters(hf)
    theta = float(rope.get("rope_theta", hf.get("rope_theta", default_theta)))
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    partial = rope.get("partial_rotary_factor") or hf.get("partial_rotary_factor") or 1.0
    if partial != 1.0:
        raise ConversionError(f"{name} with partial_rotary_factor={partial} is not supported: "
                              "moejax rotates every RoPE dimension.")
    overrides = [f"model.rope_theta={theta!r}"]
    if rope_type == "default":
        return overrides + ["model.rope_scaling=none"]
    if rope_type != "yarn":
        raise ConversionError(f"{name} with RoPE scaling {rope_type!r} is not supported: moejax "
                              "implements plain RoPE and YaRN.")
    return overrides + _yarn_overrides(rope, hf, name)


def _yarn_overrides(rope: dict, hf: dict, name: str) -> list[str]:
    """YaRN as transformers computes it (its defaults and precedence included): the original
    context is a top-level original_max_position_embeddings, else the RoPE dict's, else
    max_position_embeddings; a missing factor is max_position_embeddings / that; beta_fast 32
    and beta_slow 1; a missing mscale or mscale_all_dim is 0 (moejax then scales cos/sin by
    mscale(factor))."""
    original = (hf.get("original_max_position_embeddings")
                or rope.get("original_max_position_embeddings") or hf["max_position_embeddings"])
    factor = rope.get("factor")
    factor = float(hf["max_position_embeddings"] / original if factor is None else factor)
    mscale, all_dim = float(rope.get("mscale") or 0.0), float(rope.get("mscale_all_dim") or 0.0)
    if rope.get("truncate", True) is False:
        raise ConversionError(f"{name} with YaRN truncate=false is not supported: moejax rounds "
                              "the ramp bounds to whole dimensions.")
    implied = (yarn_mscale(factor, mscale) / yarn_mscale(factor, all_dim) if mscale and all_dim
               else yarn_mscale(factor))
    given = rope.get("attention_factor")
    if given is not None and abs(float(given) - implied) > 1e-12:
        raise ConversionError(f"{name} with YaRN attention_factor={given} is not supported: "
                              f"moejax derives it from factor and mscale ({implied}).")
    return ["model.rope_scaling=yarn", f"model.yarn_factor={factor!r}",
            f"model.yarn_beta_fast={float(rope.get('beta_fast') or 32)!r}",
            f"model.yarn_beta_slow={float(rope.get('beta_slow') or 1)!r}",
            f"model.yarn_original_max_len={int(original)}",
            f"model.yarn_mscale={mscale!r}", f"model.yarn_mscale_all_dim={all_dim!r}"]


def rope_to_hf(m: ModelConfig) -> dict:
    """RoPE keys of config.json: rope_parameters (transformers >= 5) and the older spellings,
    rope_theta and (for YaRN) rope_scaling."""
    rope = {"rope_type": "default", "rope_theta": m.rope_theta}
    if m.rope_scaling == "yarn":
        rope.update(rope_type="yarn", factor=m.yarn_factor, beta_fast=m.yarn_beta_fast,
                    beta_slow=m.yarn_beta_slow,
                    original_max_position_embeddings=m.yarn_original_max_len,
                    mscale=m.yarn_mscale, mscale_all_dim=m.yarn_mscale_all_dim)
        return {"rope_theta": m.rope_theta, "rope_parameters": rope, "rope_scaling": dict(rope)}
    return {"rope_theta": m.rope_theta, "rope_parameters": rope}


def base_to_hf(cfg: Config, name: str, model_type: str) -> dict:
    """config.json keys every exported architecture has."""
    m = cfg.model
    return {
        "architectures": [name],
        "model_type": model_type,
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "hidden_act": "silu",
        "rms_norm_eps": m.norm_eps,
        **rope_to_hf(m),
        "initializer_range": m.init_std,
        # the context the model is meant for: YaRN's extended one, else the training length
        "max_position_embeddings": (int(m.yarn_original_max_len * m.yarn_factor)
                                    if m.rope_scaling == "yarn" else cfg.train.seq_len),
        "tie_word_embeddings": False,
        "attention_dropout": 0.0,
        "num_experts_per_tok": cfg.moe.top_k,
    }


def base_overrides(hf: dict) -> list[str]:
    """Overrides every imported architecture shares (router and dispatch choices included:
    HF models never drop tokens)."""
    return [
        f"model.vocab_size={hf['vocab_size']}",
        f"model.d_model={hf['hidden_size']}",
        f"model.num_layers={hf['num_hidden_layers']}",
        f"model.num_heads={hf['num_attention_heads']}",
        f"model.norm_eps={float(hf['rms_norm_eps'])!r}",
        f"model.init_std={float(hf.get('initializer_range', 0.02))!r}",
        f"moe.top_k={hf['num_experts_per_tok']}",
        "moe.temperature=1.0",
        "moe.capacity_factor=null",
    ]
