"""Meshes and the one table that maps logical axes to mesh axes.

Weights and activations name their dimensions with logical axes; only this module (and the MoE
shard_map specs) names mesh axes. Parameters are sharded over `fsdp` (ZeRO-3) along their model
width and over `expert` along the expert dimension; the batch is sharded over every mesh axis
(outside the MoE layers the expert axis is one more data-parallel axis).
"""

from __future__ import annotations

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from moejax.config import MESH_AXES, MeshConfig

BATCH_AXES = ("data", "fsdp", "expert")

# logical axis -> mesh axis (or axes); logical axes not listed are replicated.
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    # weights
    "embed": "fsdp",
    "experts": "expert",
    "layers": None,
    "vocab": None,
    "mlp": None,
    "expert_mlp": None,
    "heads": None,
    "kv_heads": None,
    "head_dim": None,
    "latent": None,  # MLA low-rank latent widths
    # activations
    "act_batch": BATCH_AXES,
    "act_seq": None,
    "act_embed": None,
}


def make_mesh(mesh_cfg: MeshConfig, devices=None) -> jax.sharding.Mesh:
    """A mesh with axes (data, fsdp, expert) of Auto type, sized from config (-1 = the rest)."""
    devices = jax.devices() if devices is None else devices
    sizes = mesh_cfg.axis_sizes(len(devices))
    return jax.make_mesh(
        sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def logical_to_spec(logical_axes: tuple[str | None, ...]) -> PartitionSpec:
    for name in logical_axes:
        if name is not None and name not in LOGICAL_RULES:
            raise KeyError(f"logical axis {name!r} has no sharding rule in moejax/sharding.py")
    return PartitionSpec(*(LOGICAL_RULES.get(name) if name else None for name in logical_axes))


def named_sharding(mesh, logical_axes) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes))


def current_mesh():
    """The mesh entered with `jax.set_mesh`, or None when running without one."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
    """Sharding constraint on an activation; a no-op when no mesh is set."""
    if current_mesh() is None:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes))


def batch_sharding(mesh) -> NamedSharding:
    """Sharding of a [B, ...] batch array: rows over every mesh axis."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))
