"""Pipeline parallelism: the layer stack split into stages over the `pipe` mesh axis.

Stage assignment. The pipelined stack (the MoE layers, or every layer of a dense model) is split
into p v blocks of c = L / (p v) consecutive layers; stage s runs blocks s, s + p, s + 2p, ...
(v "virtual stages" per device; v = 1 is plain GPipe, where stage s runs layers s c .. s c + c - 1,
exactly its shard of the stack's `layers` axis, so no weight ever moves). With v > 1 a stage
stores blocks s v .. s v + v - 1 (its shard) and fetches the blocks it runs from the stages
that store them with partial ppermutes inside the shard_map (_virtual_blocks). GPipe also takes
stages of different sizes (config.stage_layer_counts): the stack is then stored split over
`pipe` along another dimension (logical axis `uneven_layers`), each stage regroups its layers with
one all_to_all on entry (_regroup), and shorter stages pad to the longest with slots that pass
their input on (_Slots). The embedding and the first-k dense layers run before the pipeline, as
ordinary GSPMD code on every stage; the final norm, output head and MTP modules run after the
ticks inside the same shard_map as the pipeline's `Tail`: per microbatch under remat, stage s
taking microbatches s, s + p, ..., so the whole batch's logits and MTP buffers are never live
on one device.

Schedule. One `jax.shard_map`, manual over every mesh axis, scans over ticks. (Manual over `pipe`
alone, with the MoE layer's expert shard_map nested inside, is what jax 0.10.2 cannot
differentiate: the nested shard_map's residuals get specs over the outer `pipe` axis and fail to
lower.) Inside, each device holds its stage's weights with the expert dimension over `expert` and
every other dimension whole (gathered over `fsdp` once per step on entry: ZeRO-1-like for the
pipelined stack, as DeepSeek-V3 trained it), and its shard of each microbatch's rows; the MoE
layer runs its per-shard dispatch directly with the `expert` all_to_all. At each tick
every stage runs one block on one microbatch and passes the result to the next stage with one
`ppermute` round the ring (the last stage's output returns to stage 0 for the next virtual
stage). Work items are ordered so that no stage waits: in groups of q microbatches (q = p when
v > 1, else all m), a group passes every block of stage s before the next group enters:
    item w = g q v + r q + i  ->  microbatch g q + i, virtual stage r; stage s runs item t - s.
That takes m v + p - 1 ticks for m v useful ones: bubble (p - 1) / (m v + p - 1). The backward
pass is jax's transpose of the scan (all forwards, then all backwards: GPipe's memory profile).

Statistics. Each block's per-layer outputs (the MoE statistics) come back per microbatch and
batch shard, [L, m S, ...] (S data-parallel shards, equal rows each), for the caller to reduce
over the whole batch (router.merge_microbatches)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec

from moejax import sharding
from moejax.config import Config, stage_layer_counts

PIPE = "pipe"
BLOCK_NAME = "pipeline_block"  # the interleaved schedule's block of a tick (not saved per tick)


@dataclasses.dataclass(frozen=True)
class Schedule:
    stages: int  # p, the size of the `pipe` mesh axis
    virtual_stages: int  # v blocks per stage
    microbatches: int  # m
    # layers of the pipelined stack on each stage (gpipe); None: equal blocks
    layers_per_stage: tuple[int, ...] | None = None

    @property
    def uneven(self) -> bool:
        return self.layers_per_stage is not None and len(set(self.layers_per_stage)) > 1

    @property
    def group(self) -> int:
        """Microbatches that go round the ring together (q)."""
        return self.stages if self.virtual_stages > 1 else self.microbatches

    @property
    def work_items(self) -> int:
        return self.microbatches * self.virtual_stages

    @property
    def ticks(self) -> int:
        return self.work_items + self.stages - 1

    @property
    def theoretical_bubble(self) -> float:
        """Idle fraction of a stage's ticks: (p - 1) / (m v + p - 1)."""
        return (self.stages - 1) / self.ticks

    def item(self, w):
        """Work item w -> (microbatch, virtual stage r); w may be traced."""
        q, v = self.group, self.virtual_stages
        group, rest = w // (q * v), w % (q * v)
        return group * q + rest % q, rest // q

    def final_ticks(self) -> np.ndarray:
        """[m]: the tick at which the last stage finishes each microbatch's last block."""
        q, v = self.group, self.virtual_stages
        micro = np.arange(self.microbatches)
        last_item = (micro // q) * q * v + (v - 1) * q + micro % q
        return last_item + self.stages - 1


def pipe_stages() -> int:
    """The size of the current mesh's `pipe` axis (1 without a mesh)."""
    mesh = sharding.current_mesh()
    return mesh.shape[PIPE] if mesh is not None and PIPE in mesh.axis_names else 1


def schedule_for(cfg: Config) -> Schedule:
    stages = pipe_stages()
    counts = stage_layer_counts(cfg, stages) if stages > 1 else None
    return Schedule(stages, cfg.train.virtual_stages, cfg.train.microbatches, counts)


@dataclasses.dataclass(frozen=True)
class _Slots:
    """Where the stack's L layers run: each stage runs v blocks of c layer slots. Equal blocks
    fill every slot (c = L / (p v)); uneven stages (v = 1) are padded to the longest, c = max
    layers per stage, and a shorter stage's spare slots pass their input on unchanged (they
    run while the longest stage runs its extra layer, so they cost no time).
    layer [p, v, c]: the layer each slot runs (a spare slot repeats one of its stage's);
    active [p, v, c]: whether it is a real layer; of_layer [L]: each layer's slot, flattened
    in (v, p, c) order."""

    per_block: int
    layer: np.ndarray
    active: np.ndarray
    of_layer: np.ndarray

    @classmethod
    def of(cls, schedule: Schedule, num_layers: int) -> _Slots:
        p, v = schedule.stages, schedule.virtual_stages
        if not schedule.uneven:
            c = num_layers // (p * v)
            by_stage = np.arange(num_layers).reshape(p, v, c)  # stage s stores blocks s v + k
            return cls(c, by_stage, np.ones_like(by_stage, bool), np.arange(num_layers))
        counts = schedule.layers_per_stage
        c = max(counts)
        starts = np.cumsum((0, *counts[:-1]))
        slot = np.arange(c)
        layer = starts[:, None] + np.minimum(slot, np.asarray(counts)[:, None] - 1)
        active = slot < np.asarray(counts)[:, None]
        of_layer = np.concatenate([s * c + np.arange(n) for s, n in enumerate(counts)])
        return cls(c, layer[:, None], active[:, None], of_layer)


@dataclasses.dataclass(frozen=True)
class Tail:
    """What runs after the stack, per microbatch, split over the stages: stage s takes the
    finished microbatches s, s + p, ... (so no stage computes or holds the whole batch's
    output head, logits or MTP buffers), one at a time under remat (one microbatch's logits
    live at once). `fn(weights, hidden [B_/m, T, D], rows) -> outputs` on one shard of one
    microbatch; `weights` enter the shard_map with `weight_specs` (every stage has them),
    `rows` are per-row inputs with leaves [B, ...] (split into microbatches like x)."""

    fn: object
    weights: object
    weight_specs: object
    rows: object


def pipelined_stack(stack, stack_specs, x, per_layer, block_fn, schedule: Schedule,
                    tail: Tail | None = None):
    """Run the stack over the pipeline stages.

    stack and per_layer: pytrees with leaves [L, ...] (layer parameters, per-layer inputs such
    as the router bias); stack_specs: each stack leaf's spec inside the shard_map
    (sharding.stage_spec); x [B, T, D]; `block_fn(blocks, x_ [B_/m, T, D], per_layer) -> (x_,
    outputs with leaves [c, ...])` runs one block of c layers on one shard of one microbatch.
    Returns (x [B, T, D] after every layer, outputs with leaves [L, m S, ...]), and with a
    `tail` its outputs, leaves [m S, ...] by microbatch and shard."""
    p, v, m = schedule.stages, schedule.virtual_stages, schedule.microbatches
    num_layers = jax.tree.leaves(stack)[0].shape[0]
    slots = _Slots.of(schedule, num_layers)
    by_microbatch = functools.partial(split_microbatches, microbatches=m)
    micro = by_microbatch(x)  # each microbatch keeps the batch's sharding over data axes
    rows = PartitionSpec(None, sharding.BATCH_AXES)
    if schedule.uneven:
        # stored [L, ...]: each stage regroups its layers inside (_stage_blocks)
        stored = (stack, per_layer)
        specs = (stack_specs, jax.tree.map(lambda _: PartitionSpec(), per_layer))
    else:
        # [L, ...] -> [p, v, c, ...]: stage s stores blocks s v .. s v + v - 1, its own shard
        stored = jax.tree.map(lambda leaf: leaf.reshape(p, v, slots.per_block, *leaf.shape[1:]),
                              (stack, per_layer))
        specs = (stack_specs, jax.tree.map(lambda _: PartitionSpec(PIPE), per_layer))
    pipe_dims = jax.tree.map(_pipe_dim, stack_specs,
                             is_leaf=lambda x: isinstance(x, PartitionSpec))
    by_stage_and_shard = PartitionSpec(PIPE, sharding.BATCH_AXES)

    if tail is None:
        run = jax.shard_map(
            lambda stored_, micro_: _stage_loop(stored_, micro_, block_fn, schedule, slots,
                                                pipe_dims),
            in_specs=(specs, rows), out_specs=(rows, by_stage_and_shard))
        out, outputs = run(stored, micro)
    else:
        def run_stages(stored_, micro_, tail_weights, tail_rows):
            finished, outputs = _stage_loop(stored_, micro_, block_fn, schedule, slots,
                                            pipe_dims)
            tail_outputs = _tail_loop(finished, tail.fn, tail_weights, tail_rows, schedule)
            return finished, outputs, tail_outputs

        run = jax.shard_map(
            run_stages, in_specs=(specs, rows, tail.weight_specs, rows),
            out_specs=(rows, by_stage_and_shard, by_stage_and_shard))
        out, outputs, tail_outputs = run(stored, micro, tail.weights,
                                         jax.tree.map(by_microbatch, tail.rows))
    out = joined_microbatches(out)
    outputs = jax.tree.map(lambda leaf: _by_layer(leaf, schedule, slots), outputs)
    if tail is None:
        return out, outputs
    return out, outputs, jax.tree.map(lambda leaf: _by_microbatch(leaf, schedule), tail_outputs)


def _tail_loop(finished, fn, weights, rows, schedule: Schedule):
    """This stage's share of the tail: microbatches stage + p i, i < ceil(m / p) (a stage past
    the last microbatch repeats it; _by_microbatch leaves that out). Returns outputs with
    leaves [1, 1, ceil(m / p), ...]."""
    p, m = schedule.stages, schedule.microbatches
    stage = jax.lax.axis_index(PIPE)
    # read per stage inside the loop: cast once here, so their gradients are summed over pipe
    # (and the batch axes) once, not at every microbatch
    finished, rows = jax.lax.pcast((finished, rows), (PIPE,), to="varying")
    weights = jax.tree.map(lambda w: _varying_over(w, (*sharding.BATCH_AXES, PIPE)), weights)
    remat_fn = jax.checkpoint(fn)

    def one(_, i):
        j = jnp.minimum(stage + p * i, m - 1)
        take = lambda leaf: jax.lax.dynamic_index_in_dim(leaf, j, keepdims=False)
        return None, remat_fn(weights, take(finished), jax.tree.map(take, rows))

    _, outputs = jax.lax.scan(one, None, jnp.arange(-(-m // p)))
    return jax.tree.map(lambda leaf: leaf[None, None], outputs)


def _by_microbatch(leaf, schedule: Schedule):
    """[p, S, ceil(m / p), ...] by (stage, batch shard, round) -> [m S, ...] by (microbatch,
    shard): microbatch j ran on stage j % p in round j // p."""
    p, m = schedule.stages, schedule.microbatches
    j = np.arange(m)
    by_micro = leaf[j % p, :, j // p]  # [m, S, ...]
    return by_micro.reshape(m * leaf.shape[1], *leaf.shape[3:])


def _pipe_dim(spec: PartitionSpec) -> int:
    """The dimension a spec splits over `pipe`, or -1."""
    for dim, entry in enumerate(spec):
        if entry == PIPE or (isinstance(entry, tuple) and PIPE in entry):
            return dim
    return -1


def _stage_blocks(stored, schedule: Schedule, slots: _Slots, pipe_dims, stage):
    """This stage's blocks and per-layer inputs, leaves [v, c, ...]."""
    p, v = schedule.stages, schedule.virtual_stages
    stack, per_layer = stored
    if not schedule.uneven:
        blocks, per_layer = jax.tree.map(lambda leaf: leaf[0], (stack, per_layer))
        if v > 1:
            blocks, per_layer = jax.tree.map(lambda leaf: _virtual_blocks(leaf, p, v, stage),
                                             (blocks, per_layer))
        return blocks, per_layer
    mine = jnp.asarray(slots.layer)[stage]  # [1, c]: the layers this stage runs
    blocks = jax.tree.map(lambda leaf, dim: _regroup(leaf, slots, dim, mine), stack, pipe_dims)
    return blocks, jax.tree.map(lambda leaf: leaf[mine], per_layer)


def _regroup(leaf, slots: _Slots, pipe_dim: int, mine):
    """A stored stack weight [L, ...] (this device's part: split over `pipe` along pipe_dim,
    or whole when it is -1) -> this stage's layers [1, c, ...] whole, by one all_to_all over
    `pipe` that sends each stage its layers' part of pipe_dim."""
    if pipe_dim < 0:
        return leaf[mine]
    p, c = slots.layer.shape[0], slots.per_block
    by_stage = leaf[slots.layer.reshape(-1)].reshape(p, c, *leaf.shape[1:])
    return jax.lax.all_to_all(by_stage, PIPE, 0, pipe_dim + 1, tiled=True)


def _stage_loop(stored, micro, block_fn, schedule: Schedule, slots: _Slots, pipe_dims):
    """One device's ticks. stored: this stage's part of the stack and per-layer inputs
    (_stage_blocks); micro [m, B_/m, T, D], this shard's rows of every microbatch (every stage
    has them; only stage 0 reads them). Returns (the finished microbatches [m, B_/m, T, D],
    identical on every stage; this device's block outputs per work item, leaves
    [1, 1, m v, c, ...])."""
    p = schedule.stages
    stage = jax.lax.axis_index(PIPE)
    blocks, per_layer = _stage_blocks(stored, schedule, slots, pipe_dims, stage)
    per_layer = (jnp.asarray(slots.active)[stage], per_layer)  # [v, c] bool, then the inputs
    blocks = jax.tree.map(_varying_over_batch_axes, blocks)
    # micro is the same on every stage; read inside the loop as such, its gradient would be
    # summed over `pipe` at every tick (the whole [m, ...] array each time): cast once here
    micro = jax.lax.pcast(micro, (PIPE,), to="varying")
    ring = [(s, (s + 1) % p) for s in range(p)]

    def tick(received, t):
        w = jnp.clip(t - stage, 0, schedule.work_items - 1)
        microbatch, virtual = schedule.item(w)
        fresh = jax.lax.dynamic_index_in_dim(micro, microbatch, keepdims=False)
        x_in = jnp.where((stage == 0) & (virtual == 0), fresh, received)
        if schedule.virtual_stages == 1:
            # one block: a loop constant. Indexed inside the loop it would become a value of
            # every tick, and the backward would keep one copy of the block's weights per tick
            block, block_inputs = jax.tree.map(lambda leaf: leaf[0], (blocks, per_layer))
        else:
            block, block_inputs = jax.tree.map(
                lambda leaf: jax.lax.dynamic_index_in_dim(leaf, virtual, keepdims=False),
                (blocks, per_layer))
            # the indexed block would be a value of every tick, kept per tick for the
            # backward: named, and left out of what the backward keeps (it indexes again)
            block = checkpoint_name(block, BLOCK_NAME)
        y, outputs = block_fn(block, x_in, block_inputs)
        return jax.lax.ppermute(y, PIPE, ring), (y, outputs)

    if schedule.virtual_stages > 1:
        tick = jax.checkpoint(
            tick, policy=jax.checkpoint_policies.save_anything_except_these_names(BLOCK_NAME))
    first = jnp.zeros_like(micro[0])
    _, (ys, outputs) = jax.lax.scan(tick, first, jnp.arange(schedule.ticks))
    finished = ys[schedule.final_ticks()]  # meaningful on the last stage only
    finished = jax.lax.psum(jnp.where(stage == p - 1, finished, 0), PIPE)
    mine = jax.tree.map(
        lambda leaf: jax.lax.dynamic_slice_in_dim(leaf, stage, schedule.work_items)[None, None],
        outputs)  # the ticks stage .. stage + m v - 1 carry this stage's work items in order
    return finished, mine


def split_microbatches(leaf, microbatches: int):
    """[B, ...] -> [m, B / m, ...]: microbatch j holds rows j, j + m, ... (so each keeps the
    batch's sharding over the data axes)."""
    return leaf.reshape(leaf.shape[0] // microbatches, microbatches, *leaf.shape[1:]).swapaxes(0, 1)


def joined_microbatches(micro):
    """The inverse of `split_microbatches`: [m, B / m, ...] -> [B, ...]."""
    return micro.swapaxes(0, 1).reshape(-1, *micro.shape[2:])


def microbatched(fn, x, weights, microbatches: int):
    """fn(weights, x_ [B_ / m, ...]) -> [B_ / m, ...] on the m microbatches of x [B, ...], one
    at a time (rows j, j + m, ... of each batch shard form microbatch j, as `pipelined_stack`
    splits them), inside one shard_map: the working set is one microbatch's, and the gradient
    of `weights` (entering whole) accumulates locally over the microbatches and is summed over
    the batch axes once (a loop under GSPMD all-reduced it at every microbatch). Used for the
    first-k dense layers before the pipeline."""
    rows = PartitionSpec(sharding.BATCH_AXES)

    def local(x_, weights_):
        weights_ = jax.tree.map(_varying_over_batch_axes, weights_)
        micro = split_microbatches(x_, microbatches)
        return joined_microbatches(jax.lax.map(lambda xm: fn(weights_, xm), micro))

    whole = jax.tree.map(lambda _: PartitionSpec(), weights)
    return jax.shard_map(local, in_specs=(rows, whole), out_specs=rows)(x, weights)


def _varying_over_batch_axes(weight):
    """The weight marked as varying over every batch axis, outside the tick loop: used
    invariant inside it, each use would get its own cast, whose transpose sums the gradient
    over the batch axes at every layer of every tick; cast once here, the gradient accumulates
    locally over the ticks and is summed once per step."""
    return _varying_over(weight, sharding.BATCH_AXES)


def _varying_over(x, axes):
    missing = set(axes) - sharding.varying_axes(x)
    return jax.lax.pcast(x, tuple(sorted(missing)), to="varying") if missing else x


def _virtual_blocks(stored, stages: int, virtual: int, stage):
    """stored [v, c, ...]: this stage's stored blocks s v + k -> [v, c, ...]: the blocks j p + s
    it runs, fetched with one partial `ppermute` per (j, k) pair (block b is stored on stage
    b // v at slot b % v), so only the blocks that change stage move, never a whole stack."""
    runs = []
    for j in range(virtual):
        block = jnp.zeros_like(stored[0])
        for k in range(virtual):
            pairs = [(d, d * virtual + k - j * stages) for d in range(stages)
                     if 0 <= d * virtual + k - j * stages < stages]
            if pairs:
                received = jax.lax.ppermute(stored[k], PIPE, pairs)
                block = jnp.where((j * stages + stage) % virtual == k, received, block)
        runs.append(block)
    return jnp.stack(runs)


def _by_layer(leaf, schedule: Schedule, slots: _Slots):
    """[p, S, m v, c, ...] by (stage, batch shard, work item, slot in block) -> [L, m S, ...]
    by (layer, microbatch and shard), where work item g q v + r q + i of stage s ran its block
    r on microbatch g q + i (equal blocks: slot j of it is layer (r p + s) c + j); spare slots
    of uneven stages are left out."""
    p, v, q = schedule.stages, schedule.virtual_stages, schedule.group
    groups = schedule.microbatches // q
    shards, rest = leaf.shape[1], leaf.shape[4:]
    by_item = leaf.reshape(p, shards, groups, v, q, slots.per_block, *rest)
    by_slot = jnp.transpose(by_item, (3, 0, 5, 2, 4, 1, *range(6, by_item.ndim)))
    by_slot = by_slot.reshape(v * p * slots.per_block, groups * q * shards, *rest)
    return by_slot[slots.of_layer] if schedule.uneven else by_slot
