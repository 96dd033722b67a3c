"""Block-quantised fp8 checkpoints (DeepSeek-V3's released weights), dequantised on import.

config.json says `"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128],
...}`; each quantised weight W [out, in] is stored as float8_e4m3fn next to `<name>_scale_inv`
[ceil(out / 128), ceil(in / 128)] (float32), and W = fp8 value * scale_inv of its 128 x 128
block, the blocks at the right and bottom edges cropped to the tensor.
"""

from __future__ import annotations

import math

import numpy as np

from moejax.convert.layout import ConversionError

SCALE_SUFFIX = "_scale_inv"  # "...weight" -> "...weight_scale_inv"


def block_size(hf_config: dict) -> tuple[int, int] | None:
    """(rows, cols) of the quantisation blocks, or None for an unquantised checkpoint."""
    quantization = hf_config.get("quantization_config")
    if not quantization:
        return None
    method = quantization.get("quant_method")
    if method != "fp8":
        raise ConversionError(f"quantization_config quant_method={method!r} is not supported: "
                              "moejax dequantises block-wise fp8 (quant_method fp8) only.")
    block = quantization.get("weight_block_size")
    if not (isinstance(block, list | tuple) and len(block) == 2
            and all(isinstance(b, int) and b > 0 for b in block)):
        raise ConversionError(f"fp8 quantization_config weight_block_size={block!r} is not "
                              "supported: moejax needs block-wise scales [rows, cols].")
    if quantization.get("activation_scheme", "dynamic") != "dynamic":
        raise ConversionError(f"fp8 activation_scheme={quantization['activation_scheme']!r} is "
                              "not supported: moejax reads dynamic (unscaled) activations only.")
    return tuple(block)


def is_fp8(dtype: np.dtype) -> bool:
    return dtype.name.startswith("float8")


def dequantize(weight: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int],
               name: str) -> np.ndarray:
    """weight [..., out, in] (fp8) times its block's scale_inv [..., ceil(out/bo), ceil(in/bi)]
    -> float32 [..., out, in]; one block row at a time, so only the result is allocated."""
    rows, cols = weight.shape[-2:]
    block_rows, block_cols = block
    expected = (*weight.shape[:-2], math.ceil(rows / block_rows), math.ceil(cols / block_cols))
    if scale_inv.shape != expected:
        raise ConversionError(
            f"tensor {name!r} {weight.shape} has {SCALE_SUFFIX} of shape {scale_inv.shape}, but "
            f"{block_rows}x{block_cols} blocks need {expected}: the scales do not match.")
    out = weight.astype(np.float32)
    scale = scale_inv.astype(np.float32)
    for i in range(expected[-2]):
        per_column = np.repeat(scale[..., i, :], block_cols, axis=-1)[..., None, :cols]
        out[..., i * block_rows:(i + 1) * block_rows, :] *= per_column
    return out
