"""Hugging Face architectures moejax converts to and from, by their config.json class name.

Each supported architecture is an `Architecture` (see moejax.convert.common): how its config.json
maps to moejax config overrides (and back), which moejax configs it cannot express, and its
tensor layout. Mixtral and Qwen3-MoE live in moejax.convert.llama_style, DeepSeek-V3 in
moejax.convert.deepseek. UNSUPPORTED names architectures people ask for, with the reason.
"""

from __future__ import annotations

from moejax.convert.common import Architecture, LayoutOptions
from moejax.convert.deepseek import DEEPSEEK_V3
from moejax.convert.layout import ConversionError
from moejax.convert.llama_style import MIXTRAL, QWEN3_MOE

ARCHITECTURES = {arch.name: arch for arch in (MIXTRAL, QWEN3_MOE, DEEPSEEK_V3)}
UNSUPPORTED = {
    "Qwen2MoeForCausalLM": "its shared expert is gated by sigmoid(Linear(h -> 1)), which moejax "
                           "does not have",
}

__all__ = ["ARCHITECTURES", "UNSUPPORTED", "Architecture", "LayoutOptions", "architecture"]


def architecture(name: str) -> Architecture:
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    reason = UNSUPPORTED.get(name, "moejax has no mapping for it")
    raise ConversionError(f"architecture {name!r} cannot be converted ({reason}): supported "
                          f"architectures are {sorted(ARCHITECTURES)}.")
