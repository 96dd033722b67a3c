"""Streaming safetensors I/O in a layout (see moejax.convert.layout).

Reading fills one preallocated host array per parameter, one checkpoint file at a time and one
tensor at a time, then moves each parameter to its devices and drops the host copy: the model is
never held twice in host memory. Writing fetches one layer of one parameter at a time from the
devices and writes files of at most `max_shard_bytes` (one tensor larger than that gets a file
of its own), with a `model.safetensors.index.json` when there is more than one file, as
Hugging Face checkpoints do.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from moejax import params as P
from moejax.convert.layout import BLOCK_STACKS, ConversionError, LeafPath, TensorMap, leaf_specs

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 4 * 2**30


def tensor_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> the file that holds it, from the index of a sharded checkpoint or from the
    header of a single-file one."""
    index = directory / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        missing = sorted({f for f in weight_map.values() if not (directory / f).exists()})
        if missing:
            raise ConversionError(
                f"{directory} lacks the shard files {missing} named in {INDEX_FILE}: copy them "
                "there or download the checkpoint again.")
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / SINGLE_FILE
    if single.exists():
        with safe_open(single, framework="numpy") as reader:
            names = reader.keys()  # safe_open is not iterable itself
        return dict.fromkeys(names, single)
    raise ConversionError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}: only "
                          "safetensors checkpoints can be converted.")


@contextlib.contextmanager
def _arrays_on_host():
    """safetensors' flax reader (the one that handles bfloat16 and fp8) makes jax arrays: keep
    them in host memory rather than on an accelerator."""
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:  # no CPU backend initialised (JAX_PLATFORMS names only accelerators)
        yield
        return
    with jax.default_device(cpu):
        yield


def read_host_params(files: dict[str, Path], layout: list[TensorMap], specs, dtype) -> dict:
    """{leaf path: host array in `dtype`} filled from the checkpoint tensors the layout names."""
    leaves, _ = leaf_specs(specs)
    host = {path: np.empty(spec.shape, dtype) for path, spec in leaves.items()}
    by_file: dict[Path, list[TensorMap]] = {}
    for tensor in layout:
        by_file.setdefault(files[tensor.name], []).append(tensor)
    for file, tensors in sorted(by_file.items()):
        with _arrays_on_host(), safe_open(file, framework="flax") as reader:
            present = set(reader.keys())
            for tensor in tensors:
                if tensor.name not in present:
                    raise ConversionError(
                        f"{file.name} lacks tensor {tensor.name!r} that {INDEX_FILE} places "
                        "there: the checkpoint is incomplete or its index is stale.")
                shape = tuple(reader.get_slice(tensor.name).get_shape())
                if shape != tensor.shape:
                    raise ConversionError(
                        f"tensor {tensor.name!r} has shape {shape} in {file.name} but the config "
                        f"implies {tensor.shape}: config.json does not match the weights.")
                value = np.asarray(reader.get_tensor(tensor.name))
                for placement in tensor.placements:
                    host[placement.leaf][placement.index] = placement.to_moejax(value)
    return host


def place_params(host: dict, specs, mesh):
    """Host arrays -> the parameter pytree on devices (sharded when a mesh is given), releasing
    each host array once its device copy exists."""
    leaves, treedef = leaf_specs(specs)
    if mesh is None:
        targets = [None] * len(leaves)
    else:
        targets = jax.tree.leaves(P.shardings(specs, mesh))
    placed = [jax.device_put(host.pop(path), target) for path, target in zip(leaves, targets)]
    return jax.tree.unflatten(treedef, placed)


class _LayerFetcher:
    """Host copies of parameter slices, fetched one (leaf, layer) at a time and reused by every
    tensor of that layer (the experts of one layer share one fetch); the cache only holds the
    current layer."""

    def __init__(self, params):
        leaves, _ = leaf_specs(params)
        self.leaves: dict[LeafPath, jax.Array] = leaves
        self.layer_key = None
        self.cache: dict[LeafPath, np.ndarray] = {}

    def get(self, leaf: LeafPath, index: tuple[int, ...]) -> np.ndarray:
        stacked = leaf[0] in BLOCK_STACKS
        layer_key = (leaf[0], index[0]) if stacked else None
        if layer_key != self.layer_key:
            self.cache.clear()
            self.layer_key = layer_key
        if leaf not in self.cache:
            array = self.leaves[leaf]
            self.cache[leaf] = np.asarray(jax.device_get(array[index[0]] if stacked else array))
        return self.cache[leaf][index[1:] if stacked else index]


def _plan_shards(layout: list[TensorMap], itemsizes: list[int], max_shard_bytes: int):
    """Consecutive groups of tensors of at most max_shard_bytes each."""
    shards, current, current_bytes = [], [], 0
    for tensor, itemsize in zip(layout, itemsizes):
        size = math.prod(tensor.shape) * itemsize
        if current and current_bytes + size > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(tensor)
        current_bytes += size
    return shards + [current] if current else shards


def _tensor_dtypes(layout: list[TensorMap], params, dtype) -> list[np.dtype]:
    leaves, _ = leaf_specs(params)
    if dtype is not None:
        return [np.dtype(dtype)] * len(layout)
    return [np.dtype(leaves[t.placements[0].leaf].dtype) for t in layout]


def _tensors(shard: list[TensorMap], dtypes, fetcher: _LayerFetcher) -> Iterator:
    for tensor, dtype in zip(shard, dtypes):
        placement = tensor.placements[0]
        value = placement.to_checkpoint(fetcher.get(placement.leaf, placement.index))
        yield tensor.name, np.ascontiguousarray(value, dtype=dtype)


def write_checkpoint(directory: Path, layout: list[TensorMap], params, *, dtype=None,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                     metadata: dict[str, str] | None = None) -> list[Path]:
    """Write `params` in `layout` (tensors in the parameters' dtype unless `dtype` is given)."""
    directory.mkdir(parents=True, exist_ok=True)
    dtypes = _tensor_dtypes(layout, params, dtype)
    shards = _plan_shards(layout, [d.itemsize for d in dtypes], max_shard_bytes)
    if len(shards) == 1:
        names = [SINGLE_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    fetcher, weight_map, start = _LayerFetcher(params), {}, 0
    for shard, name in zip(shards, names):
        shard_dtypes = dtypes[start:start + len(shard)]
        start += len(shard)
        save_file(dict(_tensors(shard, shard_dtypes, fetcher)), directory / name, metadata=metadata)
        weight_map.update({tensor.name: name for tensor in shard})
    if len(shards) > 1:
        total = sum(math.prod(t.shape) * d.itemsize for t, d in zip(layout, dtypes))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [directory / name for name in names]
