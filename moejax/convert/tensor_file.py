"""Read-only safetensors files as numpy memory maps.

A safetensors file is an 8-byte little-endian header length, a JSON header (per tensor: dtype,
shape and byte offsets into the data that follows) and the raw little-endian data. Mapping it
reads nothing until a tensor is used, and gives every dtype the checkpoints use, bfloat16 and
fp8 included, through ml_dtypes (safetensors' own numpy and flax readers lack fp8).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from moejax.convert.layout import ConversionError

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
MAX_HEADER_BYTES = 100 * 2**20  # a larger header means a file that is not safetensors


def read_header(path: Path) -> dict:
    """{tensor name: {"dtype", "shape", "data_offsets"}} and the byte offset of the data."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        size = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
        if not 0 < size <= MAX_HEADER_BYTES:
            raise ConversionError(f"{path} is not a safetensors file (bad header length).")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return {"tensors": header, "data_start": 8 + size}


class TensorFile:
    """One safetensors file: its tensor names and shapes, and each tensor as a read-only
    array that views the memory map (copy what you keep)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        header = read_header(self.path)
        self.entries: dict[str, dict] = header["tensors"]
        self._data_start = header["data_start"]
        self._map = None

    def names(self) -> set[str]:
        return set(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        entry = self.entries[name]
        dtype = DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ConversionError(f"tensor {name!r} in {self.path.name} has dtype "
                                  f"{entry['dtype']} that moejax cannot read.")
        shape = self.shape(name)
        begin, end = entry["data_offsets"]
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise ConversionError(f"tensor {name!r} in {self.path.name} has {end - begin} bytes "
                                  f"for shape {shape} of {entry['dtype']}: the file is corrupt.")
        if begin == end:
            return np.empty(shape, dtype)
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._map[self._data_start + begin:self._data_start + end]
        if raw.size != end - begin:
            raise ConversionError(f"{self.path.name} ends inside tensor {name!r}: the file is "
                                  "truncated (an interrupted download?).")
        return raw.view(dtype).reshape(shape)
