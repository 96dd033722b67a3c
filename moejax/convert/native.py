"""moejax's own parameter checkpoint: a directory with config.yaml (moejax.config.config_to_yaml)
and safetensors files in the native layout (moejax.convert.layout.native_layout: one tensor per
leaf, split per layer for the block stacks, named by attribute path, e.g.
"moe_blocks.3.attn.wq" [D, H, Q]; sharded with model.safetensors.index.json when large).

Parameters only, no optimizer state: it is the exchange format of scripts/convert_hf.py, not a
training checkpoint (those are orbax, see moejax.training.checkpoint).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moejax.config import Config, config_to_yaml, load_config
from moejax.convert import shards
from moejax.convert.hf import mesh_section, param_specs
from moejax.convert.layout import ConversionError, native_layout

CONFIG_FILE = "config.yaml"


def save_moejax(config: Config, params, path, *,
                max_shard_bytes: int = shards.DEFAULT_MAX_SHARD_BYTES) -> list[Path]:
    """Write config.yaml and the parameters (in their own dtype) into directory `path`."""
    directory = Path(path)
    written = shards.write_checkpoint(directory, native_layout(param_specs(config)), params,
                                      max_shard_bytes=max_shard_bytes,
                                      metadata={"format": "moejax"})
    (directory / CONFIG_FILE).write_text(config_to_yaml(config))
    return written


def load_moejax(path, mesh=None) -> tuple[Config, object]:
    """(config, params) saved by save_moejax; with a mesh, sharded on it. The config's mesh
    section is replaced by the mesh's axis sizes (the defaults without a mesh), so that a
    checkpoint saved on many devices converts on one."""
    directory = Path(path)
    if not (directory / CONFIG_FILE).exists():
        raise ConversionError(f"{directory} has no {CONFIG_FILE}: give a directory written by "
                              "save_moejax (scripts/convert_hf.py to-moejax).")
    overrides, num_devices = mesh_section(mesh)
    cfg = load_config(directory / CONFIG_FILE, overrides, num_devices=num_devices)
    specs = param_specs(cfg)
    layout = native_layout(specs)
    files = shards.tensor_files(directory)
    missing = [t.name for t in layout if t.name not in files]
    if missing:
        raise ConversionError(f"{directory} lacks {len(missing)} parameters that its "
                              f"{CONFIG_FILE} implies, e.g. {missing[0]!r}.")
    host = shards.read_host_params(files, layout, specs, np.dtype(cfg.precision.param_dtype))
    return cfg, shards.place_params(host, specs, mesh)
