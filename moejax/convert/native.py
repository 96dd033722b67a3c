"""moejax's own parameter checkpoint: a directory with config.yaml (moejax.config.config_to_yaml)
and safetensors files in the native layout (moejax.convert.layout.native_layout: one tensor per
leaf, split per layer for the block stacks and per depth for the MTP modules, named by attribute
path, e.g. "moe_blocks.3.attn.wq" [D, H, Q]; sharded with model.safetensors.index.json when
large), plus the router state as "router_state.bias" [L_moe + D_mtp, E] and
"router_state.temperature" [] (float32).

Parameters and router state only, no optimizer state: it is the exchange format of
scripts/convert_hf.py, not a training checkpoint (those are orbax, see
moejax.training.checkpoint).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moejax.config import Config, config_to_yaml, load_config
from moejax.convert import shards
from moejax.convert.hf import exported_router_state, mesh_section, param_specs
from moejax.convert.layout import (
    ROUTER_STATE,
    ConversionError,
    Placement,
    TensorMap,
    identity,
    leaf_specs,
    native_layout,
)
from moejax.model.transformer import init_router_state

CONFIG_FILE = "config.yaml"


def _router_state_layout(router_state) -> list[TensorMap]:
    return [TensorMap(".".join((ROUTER_STATE, *path)), tuple(leaf.shape),
                      (Placement((ROUTER_STATE, *path), (), identity, identity),))
            for path, leaf in leaf_specs(router_state)[0].items()]


def save_moejax(config: Config, params, path, *, router_state=None,
                max_shard_bytes: int = shards.DEFAULT_MAX_SHARD_BYTES) -> list[Path]:
    """Write config.yaml, the parameters (in their own dtype) and the router state (default:
    the one `params` carry, else init_router_state(config)) into directory `path`."""
    directory = Path(path)
    router_state = exported_router_state(config, params, router_state)
    layout = native_layout(param_specs(config)) + _router_state_layout(router_state)
    written = shards.write_checkpoint(directory, layout,
                                      shards.checkpoint_leaves(params, router_state),
                                      max_shard_bytes=max_shard_bytes,
                                      metadata={"format": "moejax"})
    (directory / CONFIG_FILE).write_text(config_to_yaml(config))
    return written


def load_moejax(path, mesh=None, *, with_router_state: bool = False):
    """(config, params) saved by save_moejax, the parameters carrying the router state (see
    moejax.convert.load_hf), or (config, params, router_state) with `with_router_state`; with a
    mesh, sharded on it (the router state replicated). The config's mesh section is replaced by
    the mesh's axis sizes (the defaults without a mesh), so that a checkpoint saved on many
    devices converts on one. A directory without router state tensors gives
    init_router_state(config)."""
    directory = Path(path)
    if not (directory / CONFIG_FILE).exists():
        raise ConversionError(f"{directory} has no {CONFIG_FILE}: give a directory written by "
                              "save_moejax (scripts/convert_hf.py to-moejax).")
    overrides, num_devices = mesh_section(mesh)
    cfg = load_config(directory / CONFIG_FILE, overrides, num_devices=num_devices)
    specs = param_specs(cfg)
    files = shards.tensor_files(directory)
    layout = native_layout(specs)
    missing = [t.name for t in layout if t.name not in files]
    if missing:
        raise ConversionError(f"{directory} lacks {len(missing)} parameters that its "
                              f"{CONFIG_FILE} implies, e.g. {missing[0]!r}.")
    initial_state = init_router_state(cfg)
    layout += [t for t in _router_state_layout(initial_state) if t.name in files]
    host = shards.host_arrays(specs, np.dtype(cfg.precision.param_dtype), initial_state)
    shards.read_tensors(files, layout, host)
    router_state = shards.place_router_state(host, initial_state, mesh)
    params = shards.place_params(host, specs, mesh).replace(router_state=router_state)
    return (cfg, params, router_state) if with_router_state else (cfg, params)
