"""Hugging Face checkpoints <-> moejax (config, params, router state).

`load_hf` reads a local checkpoint directory (config.json plus model.safetensors, or shards
listed in model.safetensors.index.json) of a supported architecture (Mixtral, Qwen3-MoE,
DeepSeek-V3), streaming it file by file and dequantising block-fp8 weights (DeepSeek's released
checkpoints); `save_hf` writes one that transformers' `from_pretrained` loads. Expert weights
are written one tensor per expert (the layout of the released checkpoints, which transformers
4.x and 5.x both read); both that layout and transformers >= 5's fused
`gate_up_proj`/`down_proj` layout are read.

DeepSeek-V3's multi-token-prediction layers (model.layers.{num_hidden_layers + k}) are read into
params.mtp when the checkpoint has them (transformers' own save_pretrained drops them), and its
`e_score_correction_bias` into the router state, which the loaded parameters carry
(params.router_state) so that forward, loss_fn and generate use it unasked.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from moejax import params as P
from moejax.config import MESH_AXES, Config, ConfigError, MeshConfig, load_config
from moejax.convert import quantization, shards
from moejax.convert.architectures import ARCHITECTURES, Architecture, architecture
from moejax.convert.common import LayoutOptions
from moejax.convert.layout import ConversionError, TensorMap
from moejax.model.transformer import RouterState, init_router_state, model_specs

# Tensors that some checkpoints carry but that moejax recomputes (RoPE frequency tables).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# config.json dtypes that set moejax's precision (others leave moejax's defaults).
CHECKPOINT_DTYPES = ("float32", "bfloat16", "float16")


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


def declared_mtp_layers(hf_config: dict) -> int:
    return int(hf_config.get("num_nextn_predict_layers") or 0)


def mtp_depth(hf_config: dict, tensor_names: Iterable[str]) -> int:
    """num_nextn_predict_layers when the checkpoint holds the first MTP layer's tensors
    (model.layers.{num_hidden_layers}.*), else 0."""
    prefix = f"model.layers.{hf_config['num_hidden_layers']}."
    present = any(name.startswith(prefix) for name in tensor_names)
    return declared_mtp_layers(hf_config) if present else 0


def checkpoint_dtype(hf_config: dict) -> str | None:
    """The dtype config.json says the weights are in ("dtype" from transformers 5, else
    "torch_dtype"), when moejax has it as a precision dtype; else None."""
    name = hf_config.get("dtype") or hf_config.get("torch_dtype")
    name = str(name).removeprefix("torch.") if name else None
    return name if name in CHECKPOINT_DTYPES else None


def precision_overrides(hf_config: dict) -> list[str]:
    """Parameters stored and computed in the checkpoint's dtype (float32 weights give float32
    logits, as transformers does); moejax's defaults when config.json names none."""
    dtype = checkpoint_dtype(hf_config)
    if dtype is None:
        return []
    return [f"precision.param_dtype={dtype}", f"precision.compute_dtype={dtype}"]


def config_from_hf(hf_config: dict, overrides=(), mesh=None, *,
                   tensor_names: Iterable[str] = ()) -> Config:
    """The moejax Config of an HF config.json dict (precision in the checkpoint's dtype, see
    precision_overrides), then the dotted `overrides`; the mesh section is that of `mesh` (see
    mesh_section). model.mtp_depth comes from the checkpoint's `tensor_names` (see mtp_depth):
    0 without them."""
    arch = hf_architecture(hf_config)
    quantization.block_size(hf_config)  # refuses quantisation schemes moejax cannot read
    mesh_overrides, num_devices = mesh_section(mesh)
    try:
        mapped = arch.overrides_from_hf(hf_config) + precision_overrides(hf_config)
        if arch.has_mtp:
            mapped.append(f"model.mtp_depth={mtp_depth(hf_config, tensor_names)}")
    except KeyError as err:
        raise ConversionError(f"config.json of this {arch.name} lacks the key {err.args[0]!r} "
                              "that moejax needs.") from None
    try:
        return load_config(None, [*mapped, *mesh_overrides, *overrides], num_devices=num_devices)
    except ConfigError as err:
        raise ConversionError(f"config.json of this {arch.name} does not make a valid moejax "
                              f"config: {err}") from None


def _skipped_mtp_layer(name: str, hf_config: dict, cfg: Config) -> bool:
    """Whether `name` belongs to an MTP layer the checkpoint declares but the config leaves out
    (override model.mtp_depth=0 to load the main model only)."""
    first = hf_config["num_hidden_layers"] + cfg.model.mtp_depth
    last = hf_config["num_hidden_layers"] + declared_mtp_layers(hf_config)
    return any(name.startswith(f"model.layers.{i}.") for i in range(first, last))


def _choose_layout(arch: Architecture, cfg: Config, hf_config: dict, names: set[str],
                   block) -> list[TensorMap]:
    """The per-expert layout or the fused one, whichever the checkpoint's tensor names match;
    tensors that moejax has no place for are an error (they would be silently dropped)."""
    interleave = bool(hf_config.get("rope_interleave", True))  # null means false to transformers
    candidates = [arch.layout(cfg, LayoutOptions(fused, 1.0, interleave)) for fused in (False, True)]
    missing = [[t.name for t in layout if t.name not in names] for layout in candidates]
    best = min(range(len(candidates)), key=lambda i: len(missing[i]))
    if missing[best]:
        raise ConversionError(
            f"the checkpoint lacks {len(missing[best])} tensors that its config.json implies, "
            f"e.g. {missing[best][0]!r}: the weights do not match config.json.")
    known = {t.name for t in candidates[best]}
    if block is not None:
        known |= {name + quantization.SCALE_SUFFIX for name in known}
    extra = sorted(n for n in names - known if not n.endswith(IGNORED_SUFFIXES)
                   and not _skipped_mtp_layer(n, hf_config, cfg))
    if extra and extra[0].endswith(quantization.SCALE_SUFFIX) and block is None:
        raise ConversionError(f"the checkpoint has fp8 scales such as {extra[0]!r} but config.json "
                              "has no fp8 quantization_config: add the one it was saved with.")
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


def _imported_router_state(cfg: Config) -> RouterState:
    """Zero selection bias (DeepSeek checkpoints overwrite it) and temperature 1 (HF routers
    have none: an exported temperature is folded into the router weights)."""
    return init_router_state(cfg).replace(temperature=jnp.ones((), jnp.float32))


def load_hf(path, mesh=None, *, overrides=(), with_router_state: bool = False):
    """(config, params) of a local Hugging Face checkpoint directory, ready for
    moejax.forward(params, tokens, config): the parameters carry the router state
    (params.router_state: DeepSeek's e_score_correction_bias) and the precision follows the
    checkpoint's dtype. `with_router_state` also returns that state: (config, params,
    router_state).

    `overrides` are dotted moejax config overrides applied after the mapping (for example
    "precision.compute_dtype=bfloat16", "precision.param_dtype=float32", or "model.mtp_depth=0"
    to leave out DeepSeek's MTP layers); parameters are stored in precision.param_dtype. With a
    `mesh` the parameters are placed with the model's shardings (the router state replicated)
    and the config's mesh section matches the mesh.
    """
    directory = Path(path)
    hf_config = read_hf_config(directory)
    arch = hf_architecture(hf_config)
    block = quantization.block_size(hf_config)
    files = shards.tensor_files(directory)
    cfg = config_from_hf(hf_config, overrides, mesh, tensor_names=files)
    layout = _choose_layout(arch, cfg, hf_config, set(files), block)
    specs = param_specs(cfg)
    initial_state = _imported_router_state(cfg)
    host = shards.host_arrays(specs, np.dtype(cfg.precision.param_dtype), initial_state)
    shards.read_tensors(files, layout, host, block)
    router_state = shards.place_router_state(host, initial_state, mesh)
    params = shards.place_params(host, specs, mesh).replace(router_state=router_state)
    return (cfg, params, router_state) if with_router_state else (cfg, params)


def save_hf(config: Config, params, path, architecture: str = "MixtralForCausalLM", *,
            router_state=None, dtype: str | None = None,
            max_shard_bytes: int = shards.DEFAULT_MAX_SHARD_BYTES) -> list[Path]:
    """Write `params` (and the router state) as a Hugging Face checkpoint of `architecture`
    into directory `path`; returns the safetensors files written.

    `router_state` defaults to the one `params` carry, else init_router_state(config) (see
    exported_router_state). Softmax routers get its temperature folded into their weights,
    since HF routers have none; DeepSeek-V3 gets its selection bias as `e_score_correction_bias`
    (float32). Other tensors keep the parameters' dtype unless `dtype` (e.g. "bfloat16") is
    given; config.json records the dtype written, which sets the precision on import.
    """
    arch = _exportable_architecture(config, architecture)
    router_state = exported_router_state(config, params, router_state)
    options = LayoutOptions(router_temperature=float(router_state.temperature))
    directory = Path(path)
    written = shards.write_checkpoint(directory, arch.layout(config, options),
                                      shards.checkpoint_leaves(params, router_state),
                                      dtype=dtype, max_shard_bytes=max_shard_bytes,
                                      metadata={"format": "pt"})
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


def exported_router_state(config: Config, params, router_state=None) -> RouterState:
    """The router state to write: `router_state`, else the one `params` carry, else
    init_router_state(config); its bias must have a row per router of `config`."""
    expected = init_router_state(config)
    router_state = router_state if router_state is not None else params.router_state
    if router_state is None:
        return expected
    if tuple(router_state.bias.shape) != tuple(expected.bias.shape):
        raise ConversionError(
            f"router_state.bias has shape {tuple(router_state.bias.shape)} but this config "
            f"needs {tuple(expected.bias.shape)} (one row per MoE layer, then per MTP depth).")
    return router_state
