"""Explicit data-parallel gradient reduction, optionally compressed, with error feedback; and
the one-step-delayed expert update (train.grad_compression, train.expert_grad_delay).

The implicit step (grad_compression=none) lets GSPMD place the gradient collectives. The
explicit one computes every replica's own gradient inside one `jax.shard_map`, manual over every
mesh axis (as the pipeline's: the model then runs its per-shard code, the MoE layer its expert
all_to_all), and reduces them itself onto the shards the AdamW moments live on (ZeRO-1,
state.moment_sharding):

- dense leaves are summed over every batch axis (data, fsdp, expert), expert leaves over data
  and fsdp only (their expert axis holds different experts; the all_to_all's backward already
  brought each expert the cotangents of every token it served);
- the sum is reduce-scattered along the dimensions the moment is split on and all-reduced over
  any batch axis that splits none, then divided by the number of batch shards (each replica's
  loss is the mean over its own rows).

Payloads (`COMPRESSIONS`):
  f32       reduce-scatter in float32 (the implicit step's numbers, explicitly);
  bf16      the payload cast to bfloat16, exchanged with one all_to_all, summed in float32;
  fp8       e4m3 with one float32 scale per 1 x FP8_BLOCK slice (fp8.quantize_tiles), likewise;
  powersgd  rank-r PowerSGD (Vogels et al. 2019) on matrices: all-reduce P = M Q, orthonormalise,
            all-reduce Q = M^T P, gradient ~ P Q^T; Q warm-starts the next step. Vectors and
            matrices too small to gain go as f32.
With train.grad_error_feedback, what a replica's compression lost is added to its next gradient
(the residual is kept per replica in the train state: `GradSyncState.error`).

With mesh.pipe > 1 the train step refuses these keys (config validation): the reduction would
have to run inside the pipeline's shard_map. `leaf_plans` still keeps `pipe` splits so that
tools/grad_compression can count the reduction's bytes on a pipelined plan.

Shapes: R replicas of a leaf (the product of its reduced axes), N devices a payload is scattered
over, r the PowerSGD rank. Per-shard values end in `_`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec

from moejax import params as P
from moejax import sharding
from moejax.config import Config
from moejax.fp8 import quantize_tiles

COMPRESSIONS = ("none", "f32", "bf16", "fp8", "powersgd")
FP8_BLOCK = 128  # elements per e4m3 scale (DeepSeek-V3's 1 x 128 activation tiles)
POWERSGD_SEED = 17  # initial Q factors (any fixed key: they are warm-started afterwards)


@struct.dataclass
class GradSyncState:
    """Gradient-communication state; each dict maps a leaf name (leaf_name) to an array.

    error: per-replica compression residual [R, *local shape] (error feedback), or None;
    q: PowerSGD right factors [..., cols, r] (the same on every replica), or None;
    delayed: the previous step's reduced expert gradients, sharded like their AdamW moments
    (train.expert_grad_delay), or None."""

    error: dict | None = None
    q: dict | None = None
    delayed: dict | None = None


@dataclasses.dataclass(frozen=True)
class LeafPlan:
    """How one parameter's gradient is reduced on a mesh (all static)."""

    name: str
    shape: tuple[int, ...]  # the parameter's global shape
    expert: bool  # has an `experts` dimension (split over `expert`, not reduced over it)
    local: PartitionSpec  # its spec inside the shard_map: experts over `expert`, rest whole
    target: PartitionSpec  # where the reduced gradient goes: the AdamW moment's spec
    reduce_axes: tuple[str, ...]  # batch axes the replicas' gradients are summed over
    matrix: bool  # >= 2 non-layer dimensions (a PowerSGD candidate)

    def scatter_axes(self) -> list[tuple[str, ...]]:
        """Per dimension, the mesh axes the sum is scattered over (target minus local)."""
        local = sharding._entries(self.local, len(self.shape))
        target = sharding._entries(self.target, len(self.shape))
        return [tuple(a for a in t if a not in l) for t, l in zip(target, local)]

    def sum_only_axes(self) -> tuple[str, ...]:
        scattered = {a for axes in self.scatter_axes() for a in axes}
        return tuple(a for a in self.reduce_axes if a not in scattered)

    def local_shape(self, mesh) -> tuple[int, ...]:
        entries = sharding._entries(self.local, len(self.shape))
        return tuple(d // math.prod(mesh.shape[a] for a in e) for d, e in zip(self.shape, entries))

    def replicas(self, mesh) -> int:
        return math.prod(mesh.shape[a] for a in self.reduce_axes)

    def powersgd_rank(self, cfg: Config, mesh) -> int:
        """The rank this leaf is compressed to, or 0 to send it as f32 (vectors, and matrices
        where r (rows + cols) is not below half of rows x cols)."""
        if cfg.train.grad_compression != "powersgd" or not self.matrix:
            return 0
        if any(sharding._entries(self.local, len(self.shape))[-2:]):
            return 0  # a matrix split over `pipe` (planning a pipelined mesh): sent as f32
        rows, cols = self.local_shape(mesh)[-2:]
        r = cfg.train.powersgd_rank
        return r if r * (rows + cols) * 2 <= rows * cols else 0


def leaf_name(path) -> str:
    """'moe_blocks__ffn__w_gate' (no dots: orbax joins nested keys with them)."""
    return "__".join(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k))))
                     for k in path)


def _kept_inside(logical: str | None, axis: str, mesh) -> bool:
    """Whether a stored dimension stays split over mesh `axis` inside the shard_map."""
    return (axis == "pipe" and mesh.shape["pipe"] > 1) or (axis == "expert"
                                                            and logical == "experts")


def _is_matrix(spec: P.ParamSpec) -> bool:
    return sum(axis not in P.LAYER_AXES for axis in spec.logical_axes) >= 2


@functools.lru_cache(maxsize=16)
def leaf_plans(cfg: Config, mesh) -> tuple[LeafPlan, ...]:
    """One LeafPlan per parameter leaf, in jax.tree.leaves order."""
    from moejax.model.transformer import param_specs

    plans = []
    for path, spec in jax.tree_util.tree_flatten_with_path(param_specs(cfg), is_leaf=P.is_spec)[0]:
        expert = "experts" in spec.logical_axes
        stored = sharding.named_sharding(mesh, spec.logical_axes, spec.shape).spec
        # inside the shard_map: experts over `expert`, every other dimension whole (gathered
        # over fsdp on entry, as ZeRO-3 does), but kept split over `pipe` (reduction_program
        # on a pipelined plan; the train step itself refuses mesh.pipe > 1)
        local = sharding._spec([tuple(a for a in e if _kept_inside(n, a, mesh)) for n, e in zip(
            spec.logical_axes, sharding._entries(stored, len(spec.shape)))])
        target = sharding.spread_over(stored, spec.shape, mesh, sharding.ZERO_AXES)
        reduce_axes = tuple(a for a in sharding.BATCH_AXES if not (expert and a == "expert"))
        plans.append(LeafPlan(leaf_name(path), spec.shape, expert, local, target, reduce_axes,
                              _is_matrix(spec)))
    return tuple(plans)


def uses_explicit(cfg: Config) -> bool:
    return cfg.train.grad_compression != "none"


def uses_error_feedback(cfg: Config) -> bool:
    return cfg.train.grad_compression in ("bf16", "fp8", "powersgd") and cfg.train.grad_error_feedback


def expert_leaf_names(cfg: Config, mesh) -> tuple[str, ...]:
    return tuple(p.name for p in leaf_plans(cfg, mesh) if p.expert)


# ---------------------------------------------------------------------------------------------
# state: creation and shardings


def init_sync_state(cfg: Config, mesh) -> GradSyncState | None:
    """The fresh state (traceable; zeros and fixed-key Q factors), or None when the config
    keeps none (the field then stays None and older checkpoints restore unchanged)."""
    error = q = delayed = None
    plans = leaf_plans(cfg, mesh)
    if uses_error_feedback(cfg):
        error = {p.name: jnp.zeros((p.replicas(mesh), *p.shape), jnp.float32) for p in plans}
    ranks = {p.name: p.powersgd_rank(cfg, mesh) for p in plans}
    if any(ranks.values()):
        keys = jax.random.split(jax.random.key(POWERSGD_SEED), len(plans))
        q = {p.name: jax.random.normal(k, (*p.shape[:-2], p.shape[-1], ranks[p.name]),
                                       jnp.float32)
             for p, k in zip(plans, keys) if ranks[p.name]}
    if cfg.train.expert_grad_delay:
        delayed = {p.name: jnp.zeros(p.shape, jnp.float32) for p in plans if p.expert}
    if error is None and q is None and delayed is None:
        return None
    return GradSyncState(error=error, q=q, delayed=delayed)


def _error_spec(plan: LeafPlan) -> PartitionSpec:
    """[R, *shape]: replicas over the reduced axes, then the local spec."""
    return PartitionSpec(plan.reduce_axes, *sharding._entries(plan.local, len(plan.shape)))


def _q_spec(plan: LeafPlan) -> PartitionSpec:
    """[..., cols, r]: the leading dims as in the local spec (experts over `expert`)."""
    entries = sharding._entries(plan.local, len(plan.shape))[:-2]
    return sharding._spec([*entries, (), ()])


def sync_state_shardings(cfg: Config, mesh, shapes: GradSyncState | None):
    if shapes is None:
        return None
    by_name = {p.name: p for p in leaf_plans(cfg, mesh)}

    def named(specs: dict | None, spec_of):
        if specs is None:
            return None
        return {name: NamedSharding(mesh, spec_of(by_name[name])) for name in specs}

    return GradSyncState(error=named(shapes.error, _error_spec), q=named(shapes.q, _q_spec),
                         delayed=named(shapes.delayed, lambda p: p.target))


# ---------------------------------------------------------------------------------------------
# payloads


def _split_layout(local_shape, plan: LeafPlan, mesh):
    """How a local [shape] splits into target chunks: (split shape, with each scattered
    dimension d as [n, d / n]; the axis order that puts the n's first, then the rest)."""
    split_shape, fronts, rest = [], [], []
    for dim, axes in zip(local_shape, plan.scatter_axes()):
        n = math.prod(mesh.shape[a] for a in axes)
        if axes:
            fronts.append(len(split_shape))
            split_shape += [n, dim // n]
        else:
            split_shape.append(dim)
        rest.append(len(split_shape) - 1)
    return split_shape, fronts + rest, rest


def _chunks_first(x_, plan: LeafPlan, mesh):
    """x_ [local shape] -> ([N, *chunk shape], chunk shape) where the N chunks are the target
    shards of the scatter axes, in the order all_to_all over those axes numbers the devices."""
    split_shape, order, rest = _split_layout(x_.shape, plan, mesh)
    moved = jnp.transpose(x_.reshape(split_shape), order)
    chunk_shape = tuple(split_shape[i] for i in rest)
    return moved.reshape(-1, *chunk_shape), chunk_shape


def _flat_scatter_axes(plan: LeafPlan) -> tuple[str, ...]:
    return tuple(a for axes in plan.scatter_axes() for a in axes)


def _encode(x, compression: str):
    """[N, ...] f32 -> payload pytree (each leaf [N, ...])."""
    if compression == "bf16":
        return x.astype(jnp.bfloat16)
    flat = x.reshape(x.shape[0], -1)
    q, scales = quantize_tiles(flat, FP8_BLOCK)  # e4m3 [N, S], f32 [N, ceil(S / block)]
    return q, scales


def _decode(payload, shape, compression: str):
    """The payload's f32 values, shaped `shape` ([N, ...])."""
    if compression == "bf16":
        return payload.astype(jnp.float32)
    q, scales = payload
    size = q.shape[-1]
    values = q.astype(jnp.float32) * jnp.repeat(scales, FP8_BLOCK, axis=-1)[:, :size]
    return values.reshape(shape)


def _reduce_quantized(m_, plan: LeafPlan, mesh, compression: str):
    """m_ [local shape] f32 -> (this device's target shard of the sum over replicas, what the
    compression lost [local shape]). One all_to_all of the payload over the scatter axes, sum
    in f32; a batch axis that splits no dimension of the target adds an f32 psum."""
    chunks, chunk_shape = _chunks_first(m_, plan, mesh)
    payload = _encode(chunks, compression)
    sent = _decode(payload, chunks.shape, compression)
    axes = _flat_scatter_axes(plan)
    if axes:
        payload = jax.tree.map(lambda a: jax.lax.all_to_all(a, axes, 0, 0, tiled=True), payload)
    summed = jnp.sum(_decode(payload, chunks.shape, compression), axis=0).reshape(chunk_shape)
    if plan.sum_only_axes():
        summed = jax.lax.psum(summed, plan.sum_only_axes())
    lost = (chunks - sent).reshape(chunks.shape)
    return summed, _unchunk(lost, m_.shape, plan, mesh)


def _unchunk(chunks, local_shape, plan: LeafPlan, mesh):
    """Inverse of _chunks_first."""
    split_shape, order, _ = _split_layout(local_shape, plan, mesh)
    moved_shape = [split_shape[i] for i in order]
    inverse = [order.index(i) for i in range(len(order))]
    return jnp.transpose(chunks.reshape(moved_shape), inverse).reshape(local_shape)


def _reduce_f32(g_, plan: LeafPlan):
    """Reduce-scatter in f32 along each dimension the target splits, psum over the rest."""
    out = g_
    for dim, axes in enumerate(plan.scatter_axes()):
        if axes:
            out = jax.lax.psum_scatter(out, axes, scatter_dimension=dim, tiled=True)
    if plan.sum_only_axes():
        out = jax.lax.psum(out, plan.sum_only_axes())
    return out


def _local_slice(x_, plan: LeafPlan, mesh):
    """This device's target shard of x_ [local shape], equal on every replica (no exchange)."""
    for dim, axes in enumerate(plan.scatter_axes()):
        if not axes:
            continue
        n = math.prod(mesh.shape[a] for a in axes)
        index = 0
        for a in axes:  # row-major over the axes, as the spec numbers the shards
            index = index * mesh.shape[a] + jax.lax.axis_index(a)
        size = x_.shape[dim] // n
        x_ = jax.lax.dynamic_slice_in_dim(x_, index * size, size, axis=dim)
    return x_


def _orthonormalise(p):
    """Columns of p [..., rows, r] made orthonormal (reduced QR)."""
    return jnp.linalg.qr(p)[0]


def _powersgd(m_, q_, plan: LeafPlan, mesh):
    """m_ [..., rows, cols] (this replica's gradient plus residual), q_ [..., cols, r] ->
    (target shard of the rank-r approximation of the replicas' sum, the new q, the
    approximation of this replica's share [local shape])."""
    axes = plan.reduce_axes
    p = jax.lax.psum(m_ @ q_, axes)  # [..., rows, r]
    p = _orthonormalise(p)
    q_new = jax.lax.psum(jnp.swapaxes(m_, -1, -2) @ p, axes)  # [..., cols, r]
    approx = p @ jnp.swapaxes(q_new, -1, -2)  # [..., rows, cols], the sum's approximation
    share = approx / plan.replicas(mesh)
    return _local_slice(approx, plan, mesh), q_new, share


# ---------------------------------------------------------------------------------------------
# the reduction


def reduce_gradients(grads_: list, sync: GradSyncState | None, plans, cfg: Config, mesh):
    """Inside the shard_map: every replica's gradients (leaves in plan order, local shapes) ->
    (the reduced mean gradients' target shards, the new error and q dicts)."""
    compression = cfg.train.grad_compression
    shards = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
    error = None if sync is None else sync.error
    qs = None if sync is None else sync.q
    out, new_error, new_q = [], {}, {}
    for g_, plan in zip(grads_, plans):
        m_ = g_ if error is None else g_ + error[plan.name][0]
        if compression == "f32":
            reduced, lost = _reduce_f32(m_, plan), None
        elif qs is not None and plan.name in qs:
            reduced, new_q[plan.name], share = _powersgd(m_, qs[plan.name], plan, mesh)
            lost = m_ - share
        elif compression in ("bf16", "fp8"):
            reduced, lost = _reduce_quantized(m_, plan, mesh, compression)
        else:  # powersgd on a vector or a small matrix: sent as f32
            reduced, lost = _reduce_f32(m_, plan), jnp.zeros_like(m_)
        if error is not None:
            new_error[plan.name] = lost[None]
        out.append(reduced / shards)
    return out, (new_error or None), (new_q or None)


def _metric_reduce(name: str, value, axes):
    """Each replica's statistics -> the global batch's: counts add, means average."""
    if name == "expert_counts":
        return jax.lax.psum(value, axes)
    return jax.lax.pmean(value, axes)


def explicit_gradients(value_and_grad, params, batch: dict, extras, sync, cfg: Config, mesh):
    """(loss, metrics, grads in their moments' shardings, new sync state (error, q)).

    `value_and_grad(params, batch, extras) -> (loss, metrics, grads)` is one replica's (its
    batch rows' mean loss); it runs inside a shard_map manual over every mesh axis. `extras`
    (router state, scalars) enter it replicated."""
    plans = leaf_plans(cfg, mesh)
    leaves, treedef = jax.tree.flatten(params)
    batch_spec = PartitionSpec(sharding.BATCH_AXES)
    replicated = PartitionSpec()
    error = None if sync is None else sync.error
    qs = None if sync is None else sync.q
    in_sync = GradSyncState(
        error=None if error is None else {p.name: _error_spec(p) for p in plans},
        q=None if qs is None else {name: _q_spec(next(p for p in plans if p.name == name))
                                   for name in qs})
    batch_axes = tuple(sharding.BATCH_AXES)

    def body(leaves_, batch_, extras_, sync_):
        # varying over the batch axes before differentiating: otherwise the transpose of the
        # implicit invariant -> varying cast would psum each gradient (the implicit reduction)
        varying = [jax.lax.pcast(x, tuple(a for a in plan.reduce_axes
                                          if a not in sharding.varying_axes(x)), to="varying")
                   if set(plan.reduce_axes) - sharding.varying_axes(x) else x
                   for x, plan in zip(leaves_, plans)]
        loss, metrics, grads = value_and_grad(jax.tree.unflatten(treedef, varying), batch_,
                                              extras_)
        reduced, new_error, new_q = reduce_gradients(jax.tree.leaves(grads), sync_, plans, cfg,
                                                     mesh)
        loss = jax.lax.pmean(loss, batch_axes)
        metrics = {k: _metric_reduce(k, v, batch_axes) for k, v in metrics.items()}
        return loss, metrics, reduced, GradSyncState(error=new_error, q=new_q)

    out_sync = GradSyncState(error=in_sync.error, q=in_sync.q)
    run = jax.shard_map(
        body, mesh=mesh,
        in_specs=([p.local for p in plans], batch_spec, replicated, in_sync),
        out_specs=(replicated, replicated, [p.target for p in plans], out_sync),
    )
    loss, metrics, reduced, new_sync = run(leaves, batch, extras,
                                           GradSyncState(error=error, q=qs))
    return loss, metrics, jax.tree.unflatten(treedef, reduced), new_sync


def delay_expert_gradients(grads, delayed: dict, cfg: Config, mesh):
    """(grads with each expert leaf replaced by the previous step's, the new delayed dict):
    the expert update uses a one-step-stale gradient, so its reduction can overlap the next
    step's forward (the seed's asynchronous expert updates). Step 0 applies a zero gradient."""
    plans = leaf_plans(cfg, mesh)
    leaves, treedef = jax.tree.flatten(grads)
    new_delayed, out = {}, []
    for g, plan in zip(leaves, plans):
        if plan.expert:
            new_delayed[plan.name] = g.astype(jnp.float32)
            g = delayed[plan.name].astype(g.dtype)
        out.append(g)
    return jax.tree.unflatten(treedef, out), new_delayed
