"""Streaming safetensors I/O in a layout (see moejax.convert.layout).

Reading fills one preallocated host array per parameter, one checkpoint file at a time and one
tensor at a time (files are memory-mapped, see moejax.convert.tensor_file; block-fp8 tensors are
dequantised on the way), then moves each parameter to its devices and drops the host copy: the
model is never held twice in host memory. Writing fetches one layer of one parameter at a time
from the devices and writes files of at most `max_shard_bytes` (one tensor larger than that gets
a file of its own), with a `model.safetensors.index.json` when there is more than one file, as
Hugging Face checkpoints do.

Both directions work on a flat {leaf path: array} of the parameters plus the router state's
leaves under ("router_state", ...) (see `checkpoint_leaves`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from safetensors.numpy import save_file

from moejax import params as P
from moejax.convert.layout import (
    BLOCK_STACKS,
    ROUTER_STATE,
    ConversionError,
    LeafPath,
    TensorMap,
    leaf_specs,
)
from moejax.convert.quantization import SCALE_SUFFIX, dequantize, is_fp8
from moejax.convert.tensor_file import TensorFile, read_header

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 4 * 2**30
COMPARE_ROWS = 4096  # rows per step when checking a duplicated tensor (bounds the temporaries)


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
        return dict.fromkeys(read_header(single)["tensors"], single)
    raise ConversionError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}: only "
                          "safetensors checkpoints can be converted.")


def router_state_leaves(router_state) -> dict[LeafPath, object]:
    """{(ROUTER_STATE, field): leaf} of a moejax RouterState."""
    return {(ROUTER_STATE, *path): leaf for path, leaf in leaf_specs(router_state)[0].items()}


def checkpoint_leaves(params, router_state=None) -> dict[LeafPath, object]:
    """{leaf path: leaf} of the parameters (the router state they carry included), then of
    `router_state` (when given, in place of the carried one)."""
    leaves = dict(leaf_specs(params)[0])
    if router_state is not None:
        leaves.update(router_state_leaves(router_state))
    return leaves


def host_arrays(specs, dtype, router_state) -> dict[LeafPath, np.ndarray]:
    """Host arrays to read into: uninitialised ones in `dtype` for the parameter `specs` (a
    complete layout fills every element), and copies of `router_state`'s leaves (a checkpoint
    without router tensors leaves those values)."""
    host = {path: np.empty(spec.shape, dtype) for path, spec in leaf_specs(specs)[0].items()}
    host.update({path: np.array(leaf) for path, leaf in router_state_leaves(router_state).items()})
    return host


def read_tensors(files: dict[str, Path], layout: list[TensorMap], host: dict,
                 block: tuple[int, int] | None = None) -> None:
    """Fill `host` from the checkpoint tensors the layout names, dequantising block-fp8 tensors
    (`block` = the quantisation block, None for an unquantised checkpoint); then check every
    duplicated tensor against the values read."""
    stored = [t for t in layout if t.duplicate_of is None]
    repeated = [t for t in layout if t.duplicate_of is not None]
    for tensor, value in _stream(files, stored, block):
        for placement in tensor.placements:
            host[placement.leaf][placement.index] = placement.to_moejax(value)
    for tensor, value in _stream(files, repeated, block):
        _check_duplicate(tensor, value, host)


def _stream(files: dict[str, Path], tensors: list[TensorMap],
            block) -> Iterator[tuple[TensorMap, np.ndarray]]:
    """(tensor, value) for each tensor, one file at a time (its memory map is released when the
    next file starts and the previous values are gone)."""
    by_file: dict[Path, list[TensorMap]] = {}
    for tensor in tensors:
        by_file.setdefault(files[tensor.name], []).append(tensor)
    for path, group in sorted(by_file.items()):
        file = TensorFile(path)
        for tensor in group:
            yield tensor, _read(file, tensor, files, block)


def _get(file: TensorFile, name: str) -> np.ndarray:
    if name not in file.entries:
        raise ConversionError(
            f"{file.path.name} lacks tensor {name!r} that {INDEX_FILE} places there: the "
            "checkpoint is incomplete or its index is stale.")
    return file.get(name)


def _read(file: TensorFile, tensor: TensorMap, files: dict[str, Path], block) -> np.ndarray:
    """One tensor's value (a view of the file, or a float32 array once dequantised)."""
    value = _get(file, tensor.name)
    if value.shape != tensor.shape:
        raise ConversionError(
            f"tensor {tensor.name!r} has shape {value.shape} in {file.path.name} but the config "
            f"implies {tensor.shape}: config.json does not match the weights.")
    scale_name = tensor.name + SCALE_SUFFIX
    if block is not None and scale_name in files:
        scale_file = file if files[scale_name] == file.path else TensorFile(files[scale_name])
        return dequantize(value, _get(scale_file, scale_name), block, tensor.name)
    if is_fp8(value.dtype):
        raise ConversionError(
            f"tensor {tensor.name!r} is stored as {value.dtype.name} without {scale_name!r} "
            "(or config.json lacks the fp8 quantization_config): moejax cannot scale it back.")
    return value


def _check_duplicate(tensor: TensorMap, value: np.ndarray, host: dict) -> None:
    """The duplicate must equal what its leaf holds, compared in the checkpoint's layout."""
    placement = tensor.placements[0]
    expected = placement.to_checkpoint(host[placement.leaf][placement.index])
    for start in range(0, value.shape[0], COMPARE_ROWS):
        rows = slice(start, start + COMPARE_ROWS)
        if not np.array_equal(np.asarray(value[rows], expected.dtype), expected[rows]):
            raise ConversionError(
                f"tensor {tensor.name!r} differs from {tensor.duplicate_of!r}: moejax keeps one "
                "copy for the main model and its MTP modules, so both must be equal.")


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


def place_router_state(host: dict, template, mesh):
    """The router state read into `host`, shaped like `template` (a RouterState), replicated
    over the mesh's devices when a mesh is given."""
    paths, treedef = leaf_specs(template)
    target = None if mesh is None else NamedSharding(mesh, PartitionSpec())
    return jax.tree.unflatten(treedef, [jax.device_put(host.pop((ROUTER_STATE, *path)), target)
                                        for path in paths])


class _LayerFetcher:
    """Host copies of leaf slices. A stacked leaf is fetched one layer at a time and reused by
    every tensor of that layer (the experts of one layer share one fetch); the cache only holds
    the current layer. Other leaves (embedding, head, router state) are fetched on each use."""

    def __init__(self, leaves: dict[LeafPath, jax.Array]):
        self.leaves = leaves
        self.layer_key = None
        self.cache: dict[LeafPath, np.ndarray] = {}

    def get(self, leaf: LeafPath, index: tuple[int, ...]) -> np.ndarray:
        if leaf[0] not in BLOCK_STACKS:
            return np.asarray(jax.device_get(self.leaves[leaf]))[index]
        layer_key = (leaf[0], index[0])
        if layer_key != self.layer_key:
            self.cache.clear()
            self.layer_key = layer_key
        if leaf not in self.cache:
            self.cache[leaf] = np.asarray(jax.device_get(self.leaves[leaf][index[0]]))
        return self.cache[leaf][index[1:]]


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


def _tensor_dtypes(layout: list[TensorMap], leaves: dict, dtype) -> list[np.dtype]:
    """Each tensor's own fixed dtype, else `dtype`, else its leaf's dtype."""
    return [np.dtype(t.dtype or dtype or leaves[t.placements[0].leaf].dtype) for t in layout]


def _tensors(shard: list[TensorMap], dtypes, fetcher: _LayerFetcher) -> Iterator:
    for tensor, dtype in zip(shard, dtypes):
        placement = tensor.placements[0]
        value = placement.to_checkpoint(fetcher.get(placement.leaf, placement.index))
        yield tensor.name, np.asarray(value, dtype=dtype, order="C")  # keeps 0-d arrays 0-d


def write_checkpoint(directory: Path, layout: list[TensorMap], leaves: dict[LeafPath, object],
                     *, dtype=None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                     metadata: dict[str, str] | None = None) -> list[Path]:
    """Write `leaves` (see checkpoint_leaves) in `layout`, tensors in their leaves' dtype unless
    `dtype` is given."""
    directory.mkdir(parents=True, exist_ok=True)
    dtypes = _tensor_dtypes(layout, leaves, dtype)
    shards = _plan_shards(layout, [d.itemsize for d in dtypes], max_shard_bytes)
    if len(shards) == 1:
        names = [SINGLE_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    fetcher, weight_map, start = _LayerFetcher(leaves), {}, 0
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
