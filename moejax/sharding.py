"""Meshes, the one table that maps logical axes to mesh axes, and shard_map helpers.

Weights and activations name their dimensions with logical axes; only this module (and the MoE
and pipeline shard_map specs) names mesh axes. Parameters are sharded over `fsdp` (ZeRO-3) along
their model width, over `expert` along the expert dimension and over `pipe` along the pipelined
layer stack; the batch is sharded over every mesh axis but `pipe` (outside the MoE layers the
expert axis is one more data-parallel axis; every stage sees the whole batch, microbatch by
microbatch).
"""

from __future__ import annotations

import math

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from moejax.config import MESH_AXES, ConfigError, MeshConfig

BATCH_AXES = ("data", "fsdp", "expert")
# Mesh axes over which a parameter is repeated when no logical axis of it maps there: its AdamW
# moments are split over them as well (DeepSeek-V3's ZeRO-1 over the data-parallel ranks).
ZERO_AXES = ("data", "fsdp", "expert", "pipe")

# logical axis -> mesh axis (or axes); logical axes not listed are replicated.
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    # weights
    "embed": "fsdp",
    "experts": "expert",
    "layers": "pipe",  # the pipelined stack: stage s holds its contiguous block of layers
    # the pipelined stack when stages hold different numbers of layers: split over `pipe`
    # along another dimension instead (named_sharding), regrouped by stage on pipeline entry
    "uneven_layers": None,
    "dense_layers": None,
    "mtp_layers": None,
    "vocab": None,
    "mlp": None,
    "expert_mlp": None,
    "heads": None,
    "kv_heads": None,
    "head_dim": None,
    "latent": None,  # MLA low-rank latent widths
    # MLA's per-head up-projections wq_b and wkv_b have no model-width axis for fsdp: split by
    # head over fsdp and expert (where the head count divides) and gathered before use, so that
    # no device stores them whole (they are most of an MLA layer's attention weights)
    "mla_heads": ("fsdp", "expert"),
    # activations
    "act_batch": BATCH_AXES,
    "act_seq": None,
    "act_embed": None,
}


def make_mesh(mesh_cfg: MeshConfig, devices=None) -> jax.sharding.Mesh:
    """A mesh with axes (pipe, data, fsdp, expert) of Auto type, sized from config (-1 = the rest).

    Explicit sizes whose product is below the device count take the first devices (a
    1-device reference run on an 8-device host); every process must own some of them."""
    devices = jax.devices() if devices is None else devices
    sizes = mesh_cfg.axis_sizes(len(devices))
    used = devices[:math.prod(sizes)]
    if jax.process_count() > 1 and len({d.process_index for d in used}) < jax.process_count():
        raise ConfigError(
            f"mesh {dict(zip(MESH_AXES, sizes))} uses {len(used)} of {len(devices)} devices, "
            f"leaving some of the {jax.process_count()} processes without one: use all devices "
            "in a multi-process run.")
    return jax.make_mesh(
        sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=used
    )


def logical_to_spec(logical_axes: tuple[str | None, ...]) -> PartitionSpec:
    for name in logical_axes:
        if name is not None and name not in LOGICAL_RULES:
            raise KeyError(f"logical axis {name!r} has no sharding rule in moejax/sharding.py")
    return PartitionSpec(*(LOGICAL_RULES.get(name) if name else None for name in logical_axes))


def named_sharding(mesh, logical_axes, shape: tuple[int, ...] | None = None) -> NamedSharding:
    """The sharding of an array with these logical axes; given its `shape`, a dimension keeps
    only the mesh axes whose sizes divide it (e.g. 6 MLA heads on a 4-way `expert` axis stay
    whole) instead of failing to place."""
    spec = logical_to_spec(logical_axes)
    if shape is not None:
        # a weight outside the pipelined stack (embedding, head, first dense layers, MTP) and an
        # unevenly staged stack are split over `pipe` too, along a dimension it divides: every
        # stage would otherwise store them whole (ZeRO-3 over the stages; gathered where used)
        spec = spread_over(divisible_spec(spec, shape, mesh), shape, mesh, ("pipe",))
    return NamedSharding(mesh, spec)


def _entries(spec: PartitionSpec, ndim: int) -> list[tuple[str, ...]]:
    """The mesh axes of each of `ndim` dimensions, as tuples."""
    padded = tuple(spec) + (None,) * (ndim - len(spec))
    return [() if e is None else (e,) if isinstance(e, str) else tuple(e) for e in padded]


def _spec(entries: list[tuple[str, ...]]) -> PartitionSpec:
    return PartitionSpec(*(None if not e else e[0] if len(e) == 1 else e for e in entries))


def divisible_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh) -> PartitionSpec:
    """`spec` with each dimension cut to the longest prefix of its mesh axes whose product
    divides the dimension."""
    entries = []
    for dim, axes in zip(shape, _entries(spec, len(shape))):
        kept = ()
        for axis in axes:
            if dim % (math.prod(mesh.shape[a] for a in kept) * mesh.shape[axis]):
                break
            kept += (axis,)
        entries.append(kept)
    return _spec(entries)


def spread_over(spec: PartitionSpec, shape: tuple[int, ...], mesh,
                axes: tuple[str, ...]) -> PartitionSpec:
    """`spec` further split over each of `axes` it does not use yet (ZeRO: optimizer state
    split over the data-parallel devices that hold the same parameter), each on the dimension
    with the most elements per shard that it divides; an axis that divides none is left out."""
    entries = _entries(spec, len(shape))
    for axis in axes:
        if mesh.shape.get(axis, 1) == 1 or any(axis in e for e in entries):
            continue
        size = mesh.shape[axis]
        per_shard = [dim // math.prod(mesh.shape[a] for a in e) for dim, e in zip(shape, entries)]
        fits = [d for d, n in enumerate(per_shard) if n % size == 0]
        if fits:
            best = max(fits, key=lambda d: per_shard[d])
            entries[best] = entries[best] + (axis,)
    return _spec(entries)


def current_mesh():
    """The mesh entered with `jax.set_mesh`, or None when running without one."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
    """Sharding constraint on an activation; a no-op when no mesh is set."""
    if current_mesh() is None or manual_axes():
        return x  # inside a shard_map (the pipeline's) every array is already one shard
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes))


def gathered_over_pipe(x: jax.Array, logical_axes: tuple[str | None, ...],
                       shape: tuple[int, ...], layer_of_stack: bool = False) -> jax.Array:
    """A weight stored split over `pipe` (named_sharding), constrained whole over it before
    use outside the pipeline: left to itself GSPMD splits the activations' model width over
    `pipe` to match and all-reduces them, which costs far more than gathering the weight.
    `layer_of_stack`: x is one layer of a stacked weight declared with `shape`."""
    mesh = current_mesh()
    if mesh is None or manual_axes() or mesh.shape.get("pipe", 1) == 1:
        return x
    entries = _entries(named_sharding(mesh, logical_axes, shape).spec, len(shape))
    entries = [tuple(a for a in e if a != "pipe") for e in entries]
    return jax.lax.with_sharding_constraint(x, _spec(entries[1:] if layer_of_stack else entries))


def batch_sharding(mesh) -> NamedSharding:
    """Sharding of a [B, ...] batch array: rows over every mesh axis."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def manual_axes() -> frozenset[str]:
    """Mesh axes an enclosing shard_map has made manual; empty outside one."""
    mesh = current_mesh()
    return frozenset() if mesh is None else frozenset(mesh.manual_axes)


def whole_or_one_shard() -> bool:
    """Whether code here runs on whole arrays or on one shard already, with no shard_map to
    add: no mesh set, a mesh of one device, or inside a shard_map (the pipeline's). On one
    device a shard_map would only add collectives over that device, which XLA:CPU still runs
    (the transpose's all-reduce of every expert weight's gradient is a full copy of them)."""
    mesh = current_mesh()
    return mesh is None or mesh.size == 1 or bool(manual_axes())


def stage_spec(logical_axes: tuple[str | None, ...], shape: tuple[int, ...]) -> PartitionSpec:
    """Spec of a pipelined-stack weight inside the pipeline's shard_map (manual over every
    axis): the expert dimension over `expert`, every other dimension whole (gathered over
    `fsdp` on entry). Equal stages: the weight reshaped [p, v, c, ...] by stage, the stage axis
    over `pipe`. Uneven stages: the stored [L, ...] weight keeps `pipe` on the dimension that
    named_sharding put it on (the pipeline regroups it by stage with one all_to_all)."""
    if "uneven_layers" not in logical_axes:
        rest = ("expert" if name == "experts" else None for name in logical_axes[1:])
        return PartitionSpec("pipe", None, None, *rest)
    stored = named_sharding(current_mesh(), logical_axes, shape).spec
    kept = [tuple(a for a in e if a == "pipe" or (a == "expert" and name == "experts"))
            for name, e in zip(logical_axes, _entries(stored, len(shape)))]
    return _spec(kept)


def varying_axes(x: jax.Array) -> frozenset:
    """Mesh axes a value varies over inside shard_map (jax 0.10: manual_axis_type; older
    versions: vma); empty outside shard_map."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)
    return frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))


def same_varying_axes(x: jax.Array, w):
    """Inside shard_map, mark x and the weights `w` (an array or a pytree of them) as varying
    over the same mesh axes before a custom-vjp GEMM: a weight replicated over `data` then gets
    its gradient summed over `data` by the cast's transpose, as a plain matmul would (a custom
    vjp cannot do that by itself)."""
    x_axes = varying_axes(x)
    w_axes = frozenset().union(*(varying_axes(leaf) for leaf in jax.tree.leaves(w)))
    if w_axes - x_axes:
        x = jax.lax.pcast(x, tuple(sorted(w_axes - x_axes)), to="varying")

    def widen(leaf):
        missing = (x_axes | w_axes) - varying_axes(leaf)
        return jax.lax.pcast(leaf, tuple(sorted(missing)), to="varying") if missing else leaf

    return x, jax.tree.map(widen, w)
