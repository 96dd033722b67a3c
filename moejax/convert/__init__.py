"""Checkpoint conversion: Hugging Face checkpoints (Mixtral, Qwen3-MoE, DeepSeek-V3, including
its block-fp8 release and MTP layers) <-> moejax parameters and router state, and moejax's own
parameter checkpoint format used by scripts/convert_hf.py."""

from moejax.convert.architectures import ARCHITECTURES, UNSUPPORTED
from moejax.convert.hf import config_from_hf, load_hf, save_hf
from moejax.convert.layout import ConversionError
from moejax.convert.native import load_moejax, save_moejax

SUPPORTED_ARCHITECTURES = tuple(sorted(ARCHITECTURES))

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "UNSUPPORTED",
    "ConversionError",
    "config_from_hf",
    "load_hf",
    "load_moejax",
    "save_hf",
    "save_moejax",
]
