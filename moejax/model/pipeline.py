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
    # layers of the pipelined stack on each stage (gpipe, 1f1b); None: equal blocks
    layers_per_stage: tuple[int, ...] | None = None
    one_f_one_b: bool = False  # the 1f1b schedule (one_f_one_b)

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
        """m v + p - 1; 1f1b: m + 2p - 2 ticks of one forward and one backward each."""
        if self.one_f_one_b:
            return self.microbatches + 2 * self.stages - 2
        return self.work_items + self.stages - 1

    @property
    def theoretical_bubble(self) -> float:
        """Idle fraction of a stage's ticks: (p - 1) / (m v + p - 1); 1f1b, whose every tick
        runs a forward and a backward: (2p - 2) / (m + 2p - 2)."""
        return (self.ticks - self.work_items) / self.ticks

    def kept_block_inputs(self, layers: int) -> int:
        """Microbatch inputs [B_/m, T, D] a stage of `layers` layer slots keeps for its
        backward: GPipe and interleaved (the remat scan over ticks) one per slot per tick;
        1f1b one per microbatch between its forward and backward, at most 2p - 1."""
        if self.one_f_one_b:
            return min(self.microbatches, 2 * self.stages - 1)
        return layers * self.virtual_stages * self.ticks

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
    return Schedule(stages, cfg.train.virtual_stages, cfg.train.microbatches, counts,
                    cfg.train.pipeline_schedule == "1f1b")


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
    # the 1f1b schedule (one_f_one_b): loss(outputs, loss_inputs) -> [] of one microbatch shard
    loss: object = None
    loss_inputs: object = None
    # 1f1b: `fn` splits its work by vocabulary over this axis (`pipe`; weight_specs split the
    # tables over it): every stage runs it on the last stage's output, not the last alone
    vocab_axis: str | None = None


def pipelined_stack(stack, stack_specs, x, per_layer, block_fn, schedule: Schedule,
                    tail: Tail | None = None):
    """Run the stack over the pipeline stages.

    stack and per_layer: pytrees with leaves [L, ...] (layer parameters, per-layer inputs such
    as the router bias); stack_specs: each stack leaf's spec inside the shard_map
    (sharding.stage_spec); x [B, T, D]; `block_fn(blocks, x_ [B_/m, T, D], per_layer) -> (x_,
    outputs with leaves [c, ...])` runs one block of c layers on one shard of one microbatch.
    Returns (x [B, T, D] after every layer, outputs with leaves [L, m S, ...]), and with a
    `tail` its outputs, leaves [m S, ...] by microbatch and shard."""
    m = schedule.microbatches
    num_layers = jax.tree.leaves(stack)[0].shape[0]
    slots = _Slots.of(schedule, num_layers)
    by_microbatch = functools.partial(split_microbatches, microbatches=m)
    micro = by_microbatch(x)  # each microbatch keeps the batch's sharding over data axes
    rows = PartitionSpec(None, sharding.BATCH_AXES)
    stored, specs = _stored(stack, stack_specs, per_layer, schedule, slots)
    pipe_dims = _pipe_dims(stack_specs)
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


def _stored(stack, stack_specs, per_layer, schedule: Schedule, slots: _Slots):
    """The stack and per-layer inputs as the shard_map takes them, and their specs: [L, ...]
    for uneven stages (each stage regroups its layers inside, _stage_blocks), else
    [p, v, c, ...] (stage s stores blocks s v .. s v + v - 1, its own shard)."""
    if schedule.uneven:
        return (stack, per_layer), (stack_specs, jax.tree.map(lambda _: PartitionSpec(),
                                                              per_layer))
    p, v = schedule.stages, schedule.virtual_stages
    stored = jax.tree.map(lambda leaf: leaf.reshape(p, v, slots.per_block, *leaf.shape[1:]),
                          (stack, per_layer))
    return stored, (stack_specs, jax.tree.map(lambda _: PartitionSpec(PIPE), per_layer))


def _pipe_dims(stack_specs):
    return jax.tree.map(_pipe_dim, stack_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


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


def one_f_one_b(stack, stack_specs, x, per_layer, block_fn, layer_fn, block_loss,
                schedule: Schedule, tail: Tail):
    """The stack and its tail trained with the 1F1B schedule: loss and gradients in one pass.

    Same arguments as `pipelined_stack`, except x: the stream in the `over_stages` layout
    [p k, B / m, T, D] (stage s holds microbatches s k ..), plus `layer_fn(layer, x_,
    (active [], layer inputs)) -> (x_, outputs)`, one layer of `block_fn` (the backward runs
    layer by layer, each layer's gradient added to the accumulator in place), and
    `block_loss(outputs with leaves [c, ...]) -> [c]`,
    each layer's loss term from its outputs (the router losses), and `tail.loss(tail outputs,
    tail.loss_inputs) -> []`, one microbatch shard's loss from the tail's outputs. The step's
    loss is their mean over microbatches and batch shards (so it must be linear in the
    per-microbatch terms). Returns (loss [], outputs [L, m S, ...], tail outputs [m S, ...]):
    the loss carries the gradients of `stack`, `x` and `tail.weights` computed inside (see
    `_with_gradients`), so jax.grad of anything linear in it, the loss itself scaled, works."""
    m = schedule.microbatches
    num_layers = jax.tree.leaves(stack)[0].shape[0]
    slots = _Slots.of(schedule, num_layers)
    sg = jax.lax.stop_gradient
    rows = PartitionSpec(None, sharding.BATCH_AXES)
    (stored_stack, stored_per_layer), (stack_in_specs, per_layer_specs) = _stored(
        sg(stack), stack_specs, per_layer, schedule, slots)
    by_stage_and_shard = PartitionSpec(PIPE, sharding.BATCH_AXES)
    assert x.shape[0] == schedule.stages * -(-m // schedule.stages), "x: over_stages layout"
    loop = functools.partial(_one_f_one_b_loop, block_fn=block_fn, layer_fn=layer_fn,
                             block_loss=block_loss,
                             tail=tail, schedule=schedule, slots=slots,
                             pipe_dims=_pipe_dims(stack_specs))
    by_microbatch = functools.partial(split_microbatches, microbatches=m)
    run = jax.shard_map(
        loop, in_specs=(stack_in_specs, per_layer_specs, by_stage_and_shard, tail.weight_specs,
                        rows, PartitionSpec()),
        out_specs=(PartitionSpec(), (stack_in_specs, by_stage_and_shard, tail.weight_specs),
                   by_stage_and_shard, by_stage_and_shard))
    loss, grads, outputs, tail_outputs = run(
        stored_stack, stored_per_layer, sg(x), sg(tail.weights),
        jax.tree.map(by_microbatch, tail.rows), tail.loss_inputs)
    grad_stack, grad_micro, grad_tail = grads
    grad_stack = jax.tree.map(lambda g, w: g.reshape(w.shape), grad_stack, stack)
    loss = _with_gradients(loss, (stack, x, tail.weights),
                           (grad_stack, grad_micro, grad_tail))
    outputs = jax.tree.map(lambda leaf: _by_layer(leaf, schedule, slots), outputs)
    last = jax.tree.map(lambda leaf: leaf[-1].swapaxes(0, 1).reshape(-1, *leaf.shape[3:]),
                        tail_outputs)  # the last stage's [S, m, ...] -> [m S, ...]
    return loss, outputs, last


def _with_gradients(value, primals, grads):
    """`value` (gradient-free), to which jax.grad attaches `grads` for `primals`: adds
    sum(grad . primal) - the same, which is exactly 0 but differentiates to `grads`."""
    pairs = [(g, w) for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(primals))
             if jnp.issubdtype(w.dtype, jnp.floating)]
    # elementwise, then summed: each device's shard stays where it is (jnp.vdot flattens both,
    # which gathered every stack whole)
    linear = sum(jnp.sum(jax.lax.stop_gradient(g).astype(jnp.float32) * w.astype(jnp.float32))
                 for g, w in pairs)
    return jax.lax.stop_gradient(value) + (linear - jax.lax.stop_gradient(linear))


def _one_f_one_b_loop(stack, per_layer, micro, tail_weights, tail_rows, loss_inputs, *,
                      block_fn, layer_fn, block_loss, tail: Tail, schedule: Schedule,
                      slots: _Slots, pipe_dims):
    """One device's 1F1B ticks. Stage s runs the forward of microbatch t - s and the backward
    of microbatch t - (2p - 2 - s) at tick t (m + 2p - 2 ticks); the last stage runs the tail
    and its backward on the microbatch it has just finished, so its backward follows at once.
    A stage keeps the inputs of at most 2p - 1 microbatches (those between its forward and
    backward) and recomputes its block's forward in the backward, layer by layer. The stream
    and its gradient stay split over the stages (micro [k, B_/m, T, D]: microbatches
    s k .. s k + k - 1): two conveyors move one microbatch per tick, the inputs towards
    stage 0 just in time (`_input_conveyor`), the input gradients from stage 0 up to the stage
    that holds the microbatch (`_gradient_conveyor`), so no stage holds all m of either. Every
    stage runs every part of a tick, the idle ones on masked values (a `lax.cond` on the stage
    would skip them, but XLA:CPU deadlocks when a branch holds a collective, docs/pipeline.md).
    Returns (the loss summed over every microbatch shard, the gradients of (stack, micro,
    tail_weights) in their input layouts, per-tick block outputs [1, 1, m, c, ...], tail
    outputs [1, 1, m, ...])."""
    p, m = schedule.stages, schedule.microbatches
    stage = jax.lax.axis_index(PIPE)
    shards = 1
    for axis in sharding.BATCH_AXES:
        shards *= jax.lax.axis_size(axis)
    scale = 1.0 / (m * shards)  # the loss is the mean over microbatches and batch shards

    def placed(stack_, micro_, tail_weights_):
        """What the ticks read, cast to varying once here (so the transposes of these casts
        sum each gradient once per step, over the axes it is summed over); and, not
        differentiated, this stage's per-layer inputs."""
        blocks, layer_inputs_ = _stage_blocks((stack_, per_layer), schedule, slots, pipe_dims,
                                              stage)
        blocks = jax.tree.map(lambda leaf: _varying_over_batch_axes(leaf[0]), blocks)
        tail_weights_ = jax.tree.map(lambda w: _varying_over(w, (*sharding.BATCH_AXES, PIPE)),
                                     tail_weights_)
        return (blocks, micro_, tail_weights_), layer_inputs_

    (block, micro, tail_weights), placed_vjp, layer_inputs = jax.vjp(
        placed, stack, micro, tail_weights, has_aux=True)
    active = jnp.asarray(slots.active)[stage][0]  # [c]
    inputs = (active, jax.tree.map(lambda leaf: leaf[0], layer_inputs))
    tail_rows = jax.lax.pcast(tail_rows, (PIPE,), to="varying")
    every_axis = (*sharding.BATCH_AXES, PIPE)

    def block_with_loss(block_, x_in):
        y, outputs = block_fn(block_, x_in, inputs)
        return (y, jnp.sum(jnp.where(active, block_loss(outputs), 0.0))), outputs

    def block_backward(x_in, d_out, loss_seed, grad_block):
        """The block's backward for input x_in, layer by layer: the forward again to get each
        layer's input ([c, B_/m, T, D]), then from the last layer down one jax.vjp of that
        layer (its output cotangent, and `loss_seed` for its router loss), its weight gradient
        added to `grad_block` in place (a whole block's gradient per tick, then added, was
        5 GB of the 671B plan's peak). -> (d x_in, grad_block)."""
        def forward_layer(x_, layer_and_inputs):
            layer, layer_inputs = layer_and_inputs
            return layer_fn(layer, x_, layer_inputs)[0], x_

        _, layer_x = jax.lax.scan(forward_layer, x_in, (block, inputs))

        def backward_layer(carry, index):
            d_y_, grad = carry
            layer, layer_inputs = jax.tree.map(lambda leaf: leaf[index], (block, inputs))

            def with_loss(layer_, x_):
                y_, outputs = layer_fn(layer_, x_, layer_inputs)
                one = jnp.sum(block_loss(jax.tree.map(lambda leaf: leaf[None], outputs)))
                return y_, jnp.where(layer_inputs[0], one, 0.0)  # [0]: active

            (y_, layer_loss), layer_vjp = jax.vjp(with_loss, layer, layer_x[index])
            d_layer, d_x_ = layer_vjp((_typed_like(d_y_, y_), _typed_like(loss_seed, layer_loss)))
            grad = jax.tree.map(
                lambda g, d: jax.lax.dynamic_update_index_in_dim(g, g[index] + d, index, 0),
                grad, d_layer)
            return (d_x_, grad), None

        layers = jax.tree.leaves(block)[0].shape[0]
        (d_x_in, grad_block), _ = jax.lax.scan(backward_layer, (d_out, grad_block),
                                               jnp.arange(layers - 1, -1, -1))
        return d_x_in, grad_block

    def tail_with_loss(weights, hidden, rows_):
        outputs = tail.fn(weights, hidden, rows_)
        return tail.loss(outputs, loss_inputs), outputs

    slots_kept = min(m, 2 * p - 1)
    forward_ring = [(s, s + 1) for s in range(p - 1)]
    backward_ring = [(s + 1, s) for s in range(p - 1)]
    is_last = stage == p - 1

    def tick(carry, t):
        received, cotangent, queue, kept, grads, loss = carry
        forward = t - stage
        f_ok = (forward >= 0) & (forward < m)
        forward = jnp.clip(forward, 0, m - 1)
        fresh, queue = _input_conveyor(queue, t)
        x_in = jnp.where(stage == 0, fresh, received)
        (y, block_aux), outputs = block_with_loss(block, x_in)
        slot = forward % slots_kept
        kept = kept.at[slot].set(jnp.where(f_ok, x_in, kept[slot]))

        # the tail, on the microbatch the last stage has just finished: there alone, or (split
        # by vocabulary) on every stage, the last stage's output sent to all. The loss is
        # seeded on the last stage only: split by vocabulary, the psums inside the tail carry
        # the seed to every stage's slice (seeding each stage would count the loss p times)
        finished = t - (p - 1)
        tail_ok = is_last & (finished >= 0) & (finished < m)
        hidden = y if tail.vocab_axis is None else jax.lax.psum(
            jnp.where(is_last, y, jnp.zeros_like(y)), PIPE)
        rows_ = jax.tree.map(lambda leaf: leaf[jnp.clip(finished, 0, m - 1)], tail_rows)
        tail_loss, tail_vjp, tail_outputs = jax.vjp(
            lambda w, h: tail_with_loss(w, h, rows_), tail_weights, hidden, has_aux=True)
        d_tail, d_y = tail_vjp(_typed_like(jnp.where(tail_ok, scale, 0.0), tail_loss))

        backward = t - (2 * p - 2 - stage)
        b_ok = (backward >= 0) & (backward < m)
        backward = jnp.clip(backward, 0, m - 1)
        d_out = jnp.where(b_ok, jnp.where(is_last, d_y, cotangent), 0.0)
        d_x, grad_block = block_backward(kept[backward % slots_kept], d_out,
                                         jnp.where(b_ok, scale, 0.0), grads[0])
        d_micro = _gradient_conveyor(grads[1], jnp.where(b_ok, d_x, 0.0), t, m)
        grads = (grad_block, d_micro, _add(grads[2], d_tail))
        loss = (loss + jnp.where(tail_ok, scale * tail_loss, 0.0)
                + jnp.where(f_ok, scale * block_aux, 0.0))
        carry = (jax.lax.ppermute(y, PIPE, forward_ring),
                 jax.lax.ppermute(d_x, PIPE, backward_ring), queue, kept, grads, loss)
        return carry, (outputs, tail_outputs)

    zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
    kept = jnp.repeat(zeros(micro[:1]), slots_kept, axis=0)  # micro holds k, maybe < 2p - 1
    first = (zeros(micro[0]), zeros(micro[0]), micro, kept,
             (zeros(block), zeros(micro), zeros(tail_weights)),
             _varying_over(jnp.zeros((), jnp.float32), every_axis))
    (_, _, _, _, grads, loss), (outputs, tail_outputs) = jax.lax.scan(
        tick, first, jnp.arange(schedule.ticks))
    grads = placed_vjp((grads[0], _delivered_gradients(grads[1], schedule.ticks, m),
                         grads[2]))
    # ticks stage .. stage + m - 1 ran this stage's forwards in microbatch order
    mine = jax.tree.map(
        lambda leaf: jax.lax.dynamic_slice_in_dim(leaf, stage, m)[None, None],
        (outputs, tail_outputs))
    return jax.lax.psum(loss, every_axis), grads, *mine


def _input_conveyor(queue, t):
    """Tick t of the input conveyor: queue [k, ...] on each stage (stage s starts with
    microbatches s k + i in slot i) -> (the microbatch stage 0 runs at tick t, the queue after
    the tick). Read as one register of p k positions, everything moves one position towards
    stage 0 per tick, so position t (microbatch t) reaches stage 0's position 0 at tick t. The
    values stay in their slots: position j of a stage sits in slot (j + t) mod k, so at tick t
    slot t mod k holds the stage's position 0, which leaves for stage s - 1 (stage 0 runs it)
    and is refilled by stage s + 1's: one microbatch per link and tick."""
    k, p = queue.shape[0], jax.lax.axis_size(PIPE)
    head = t % k
    leaving = queue[head]
    arriving = jax.lax.ppermute(leaving, PIPE, [(s + 1, s) for s in range(p - 1)])
    return leaving, queue.at[head].set(arriving)


def _gradient_conveyor(queue, gradient, t, microbatches: int):
    """Tick t of the gradient conveyor: stage 0 puts the input gradient of the microbatch it
    has just run backward (`gradient`, zeros on other stages and idle ticks) into the register
    at position (p k - m) mod k, on stage 0, and everything moves one position away from
    stage 0 per tick. Position j of a stage sits in slot (j - t) mod k, so slot
    (k - 1 - t) mod k holds the stage's top position, which leaves for stage s + 1 and is
    refilled from stage s - 1. Positions below the insertion point stay empty, so inserting
    there overwrites nothing. Microbatch u, inserted at tick u + 2p - 2, ends at position
    p k - 1 - u - q k with q = (p k - m) // k (`_delivered_gradients` turns that into the
    input layout)."""
    k, p = queue.shape[0], jax.lax.axis_size(PIPE)
    top = (k - 1 - t) % k
    arriving = jax.lax.ppermute(queue[top], PIPE, [(s, s + 1) for s in range(p - 1)])
    queue = queue.at[top].set(arriving)
    insert = ((p * k - microbatches) % k - 1 - t) % k
    stage_zero = jax.lax.axis_index(PIPE) == 0
    return queue.at[insert].set(jnp.where(stage_zero, gradient, queue[insert]))


def _delivered_gradients(queue, ticks: int, microbatches: int):
    """The gradient conveyor after `ticks` ticks -> each stage's microbatches' gradients in the
    input layout [k, ...]. Stage s's position j (slot (j - ticks) mod k) holds microbatch
    (p - 1 - q - s) k + k - 1 - j (q as in `_gradient_conveyor`), which belongs to stage
    p - 1 - q - s at slot k - 1 - j: one permutation of the stages and a reversal."""
    k, p = queue.shape[0], jax.lax.axis_size(PIPE)
    spare_stages = (p * k - microbatches) // k  # q: the last q stages hold no microbatch
    by_position = queue[(np.arange(k) - ticks) % k]
    owners = [(s, p - 1 - spare_stages - s) for s in range(p - spare_stages)]
    return jax.lax.ppermute(by_position[::-1], PIPE, owners)


def _typed_like(cotangent, value):
    """`cotangent` cast to vary over the mesh axes `value` varies over, as a VJP requires."""
    return _varying_over(cotangent, sharding.varying_axes(value))


def _add(tree, other):
    return jax.tree.map(jnp.add, tree, other)


def split_microbatches(leaf, microbatches: int):
    """[B, ...] -> [m, B / m, ...]: microbatch j holds rows j, j + m, ... (so each keeps the
    batch's sharding over the data axes)."""
    return leaf.reshape(leaf.shape[0] // microbatches, microbatches, *leaf.shape[1:]).swapaxes(0, 1)


def joined_microbatches(micro):
    """The inverse of `split_microbatches`: [m, B / m, ...] -> [B, ...]."""
    return micro.swapaxes(0, 1).reshape(-1, *micro.shape[2:])


def over_stages(leaf, microbatches: int, stages: int):
    """[B, ...] -> [p k, B / m, ...] with k = ceil(m / p): the microbatches of
    `split_microbatches` in order, zero-padded to p k and split over `pipe`, so that stage s
    holds microbatches s k .. s k + k - 1 (and the rows over the batch axes as before). The
    layout the 1f1b schedule takes its input in (`one_f_one_b`): no stage holds the whole
    stream."""
    micro = split_microbatches(leaf, microbatches)
    pad = stages * -(-microbatches // stages) - microbatches
    if pad:
        micro = jnp.concatenate([micro, jnp.zeros((pad, *micro.shape[1:]), micro.dtype)])
    if sharding.current_mesh() is None or sharding.manual_axes():
        return micro
    return jax.lax.with_sharding_constraint(micro, PartitionSpec(PIPE, sharding.BATCH_AXES))


def from_stages(micro, microbatches: int):
    """The inverse of `over_stages`: [p k, B / m, ...] -> [B, ...] (gathered over `pipe`)."""
    return joined_microbatches(micro[:microbatches])


def microbatched(fn, micro, weights):
    """fn(weights, x_ [B_ / m, ...]) -> [B_ / m, ...] on every microbatch of micro
    [p k, B / m, ...] (`over_stages`): stage s runs its k microbatches s k .. s k + k - 1, one
    at a time, and keeps the results where they are (same layout out). Inside one shard_map, so
    the working set is one microbatch's and the gradient of `weights` (entering whole)
    accumulates locally and is summed over the batch axes and `pipe` once (a loop under GSPMD
    all-reduced it at every microbatch). Used for the first-k dense layers before the
    pipeline: each stage computes and keeps 1 / p of their work (padding microbatches past
    the last one run on zeros, and nothing reads them)."""
    by_stage = PartitionSpec(PIPE, sharding.BATCH_AXES)

    def local(micro_, weights_):
        weights_ = jax.tree.map(lambda w: _varying_over(w, (*sharding.BATCH_AXES, PIPE)),
                                weights_)
        return jax.lax.map(lambda xm: fn(weights_, xm).astype(micro_.dtype), micro_)

    whole = jax.tree.map(lambda _: PartitionSpec(), weights)
    return jax.shard_map(local, in_specs=(by_stage, whole), out_specs=by_stage)(micro, weights)


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
