"""Hugging Face checkpoints <-> moejax (config, params).

`load_hf` reads a local checkpoint directory (config.json plus model.safetensors, or shards
listed in model.safetensors.index.json) of a supported architecture; `save_hf` writes one that
transformers' `from_pretrained` loads. Expert weights are written one tensor per expert (the
layout of the released checkpoints, which transformers 4.x and 5.x both read); both that layout
and transformers >= 5's fused `gate_up_proj`/`down_proj` layout are read.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from moejax import params as P
from moejax.config import MESH_AXES, Config, ConfigError, MeshConfig, load_config
from moejax.convert import shards
from moejax.convert.architectures import ARCHITECTURES, Architecture, architecture
from moejax.convert.layout import ConversionError, TensorMap
from moejax.model.transformer import model_specs

# Tensors that some checkpoints carry but that moejax recomputes (RoPE frequency tables).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_hf_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.exists():
        raise ConversionError(f"{directory} has no config.json: give the directory of a Hugging "
                              "Face checkpoint.")
    return json.loads(path.read_text())


def hf_architecture(hf_config: dict) -> Architecture:
    """The architecture config.json names, or (when it names none) the one of its model_type."""
    names = hf_config.get("architectures")
    if not names:
        by_type = {arch.model_type: arch for arch in ARCHITECTURES.values()}
        model_type = hf_config.get("model_type")
        if model_type not in by_type:
            raise ConversionError(f"config.json names no architecture and its model_type "
                                  f"{model_type!r} is not one of {sorted(by_type)}.")
        return by_type[model_type]
    if len(names) != 1:
        raise ConversionError(f"config.json names {len(names)} architectures {names}: expected "
                              "exactly one.")
    return architecture(names[0])


def mesh_section(mesh) -> tuple[list[str], int]:
    """(overrides that set the config's mesh section, the device count to validate against):
    the sizes of `mesh`, or without one the default sections on one device, so that converting
    never depends on the devices of the machine that converts."""
    if mesh is None:
        defaults = MeshConfig()
        return [f"mesh.{axis}={getattr(defaults, axis)}" for axis in MESH_AXES], 1
    return [f"mesh.{axis}={mesh.shape[axis]}" for axis in MESH_AXES], mesh.size


def config_from_hf(hf_config: dict, overrides=(), mesh=None) -> Config:
    """The moejax Config of an HF config.json dict, then the dotted `overrides`; the mesh
    section is that of `mesh` (see mesh_section)."""
    arch = hf_architecture(hf_config)
    mesh_overrides, num_devices = mesh_section(mesh)
    try:
        mapped = arch.overrides_from_hf(hf_config)
    except KeyError as err:
        raise ConversionError(f"config.json of this {arch.name} lacks the key {err.args[0]!r} "
                              "that moejax needs.") from None
    try:
        return load_config(None, [*mapped, *mesh_overrides, *overrides], num_devices=num_devices)
    except ConfigError as err:
        raise ConversionError(f"config.json of this {arch.name} does not make a valid moejax "
                              f"config: {err}") from None


def _choose_layout(arch: Architecture, cfg: Config, names: set[str]) -> list[TensorMap]:
    """The per-expert layout or the fused one, whichever the checkpoint's tensor names match;
    tensors that moejax has no place for are an error (they would be silently dropped)."""
    candidates = [arch.layout(cfg, fused, 1.0) for fused in (False, True)]
    missing = [[t.name for t in layout if t.name not in names] for layout in candidates]
    best = min(range(len(candidates)), key=lambda i: len(missing[i]))
    if missing[best]:
        raise ConversionError(
            f"the checkpoint lacks {len(missing[best])} tensors that its config.json implies, "
            f"e.g. {missing[best][0]!r}: the weights do not match config.json.")
    known = {t.name for t in candidates[best]}
    extra = sorted(n for n in names - known if not n.endswith(IGNORED_SUFFIXES))
    if extra:
        raise ConversionError(
            f"the checkpoint has {len(extra)} tensors that moejax has no place for, e.g. "
            f"{extra[0]!r}: this {arch.name} uses a feature moejax does not implement.")
    return candidates[best]


def param_specs(cfg: Config):
    """model_specs with every leaf in precision.param_dtype."""
    return jax.tree.map(
        lambda s: P.ParamSpec(s.shape, s.logical_axes, s.init, cfg.precision.param_dtype),
        model_specs(cfg), is_leaf=P.is_spec)


def load_hf(path, mesh=None, *, overrides=()) -> tuple[Config, object]:
    """(config, params) of a local Hugging Face checkpoint directory.

    `overrides` are dotted moejax config overrides applied after the mapping (for example
    "precision.compute_dtype=float32" or "precision.param_dtype=bfloat16"); parameters are
    stored in precision.param_dtype. With a `mesh` the parameters are placed with the model's
    shardings and the config's mesh section matches the mesh.
    """
    directory = Path(path)
    hf_config = read_hf_config(directory)
    cfg = config_from_hf(hf_config, overrides, mesh)
    files = shards.tensor_files(directory)
    layout = _choose_layout(hf_architecture(hf_config), cfg, set(files))
    specs = param_specs(cfg)
    host = shards.read_host_params(files, layout, specs, np.dtype(cfg.precision.param_dtype))
    return cfg, shards.place_params(host, specs, mesh)


def save_hf(config: Config, params, path, architecture: str = "MixtralForCausalLM", *,
            router_state=None, dtype: str | None = None,
            max_shard_bytes: int = shards.DEFAULT_MAX_SHARD_BYTES) -> list[Path]:
    """Write `params` as a Hugging Face checkpoint of `architecture` into directory `path`;
    returns the safetensors files written.

    The softmax temperature (router_state.temperature, else config.moe.temperature) is folded
    into the router weights, since HF routers have none. Tensors keep the parameters' dtype
    unless `dtype` (e.g. "bfloat16") is given.
    """
    arch = _exportable_architecture(config, architecture)
    temperature = float(config.moe.temperature if router_state is None
                        else router_state.temperature)
    directory = Path(path)
    layout = arch.layout(config, False, temperature)
    written = shards.write_checkpoint(directory, layout, params, dtype=dtype,
                                      max_shard_bytes=max_shard_bytes, metadata={"format": "pt"})
    tensor_dtype = np.dtype(dtype) if dtype else np.dtype(jax.tree.leaves(params)[0].dtype)
    hf_config = {**arch.config_to_hf(config), "dtype": tensor_dtype.name,
                 "torch_dtype": tensor_dtype.name}
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    return written


def _exportable_architecture(config: Config, name: str) -> Architecture:
    arch = architecture(name)
    problems = arch.export_problems(config)
    if problems:
        raise ConversionError(f"this moejax config cannot be written as {name}: "
                              f"{', '.join(problems)} has no equivalent there.")
    return arch
