"""Dropless dispatch: equal to the dense oracle on one device and to one device on every mesh
(loss and every gradient), under ordinary and adversarial routing (every token to one expert;
every token to the experts of one shard, which fills a shard's buffers to their bound), nothing
dropped, no buffer overflow, and permutation gradients that are gathers, never scatters."""

import contextlib
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import max_relative_error, tiny_config
from jax.extend.core import jaxprs_in_params
from jax.sharding import NamedSharding, PartitionSpec

import moejax
from moejax import params as P
from moejax.config import MeshConfig
from moejax.model.dispatch import grouped
from moejax.model.dispatch.dropless import (
    _Queues,
    compact_slots,
    group_rows,
    grouped_kernel,
    max_destinations,
    pair_capacity,
    pass_capacity,
    static_rows,
)
from moejax.model.moe import moe_ffn, moe_specs
from moejax.sharding import batch_sharding

MESHES = {"data2_expert4": (2, 1, 4), "fsdp2_expert4": (1, 2, 4), "expert8": (1, 1, 8)}
ROUTERS = {"deepseek": ("moe.router=deepseek", "moe.num_groups=4", "moe.topk_groups=2"),
           "softmax_topk": ("moe.router=softmax_topk", "moe.temperature=0.7")}
BATCH = (8, 16)  # [B, T] tokens


def layer_config(router: str, *overrides):
    return tiny_config(*ROUTERS[router], "moe.num_shared_experts=1", "moe.switch_loss_coef=0.01",
                       "moe.z_loss_coef=0.001", *overrides)


def adversarial_bias(cfg, kind: str) -> jax.Array:
    """Selection bias that sends every token to expert 0 (plus its next choices), or every
    token to the experts of the first of 4 expert shards (all its choices there)."""
    bias = jnp.zeros(cfg.moe.num_experts)
    if kind == "one_expert":
        return bias.at[0].set(10.0)
    if kind == "one_shard":
        return bias.at[: cfg.moe.num_experts // 4].set(10.0)
    return 0.1 * jax.random.normal(jax.random.key(2), bias.shape)


def layer_loss(params, x, bias, cfg):
    y, stats = moe_ffn(params, x, bias, 1.0, cfg)
    loss = jnp.sum(jnp.square(y)) + stats["switch_loss"] + stats["z_loss"]
    return loss, stats


@functools.cache
def layer_inputs(router: str):
    cfg = layer_config(router)
    params = P.init(moe_specs(cfg), jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (*BATCH, cfg.model.d_model))
    return params, x


def loss_and_grads(cfg, params, x, bias):
    fn = jax.value_and_grad(layer_loss, argnums=(0, 1), has_aux=True)
    return jax.jit(fn, static_argnums=3)(params, x, bias, cfg)


@functools.cache
def single_device(router: str, routing: str, dispatch: str = "dropless", kernels: str = "auto"):
    cfg = layer_config(router, f"moe.dispatch={dispatch}", f"moe.kernels={kernels}")
    params, x = layer_inputs(router)
    return loss_and_grads(cfg, params, x, adversarial_bias(cfg, routing))


# the adversarial cases steer routing with the selection bias, which only the deepseek router has
@pytest.mark.parametrize("router,routing,kernels", [
    ("deepseek", "random", "auto"), ("deepseek", "one_expert", "auto"),
    ("deepseek", "one_shard", "auto"), ("softmax_topk", "random", "auto"),
    ("deepseek", "random", "blocks"), ("deepseek", "one_expert", "blocks"),
    ("deepseek", "one_expert", "tiles")])
def test_dropless_equals_dense_oracle(router, routing, kernels):
    """auto is blas on CPU in float32 (one BLAS GEMM per expert group); tiles runs row tiles;
    blocks puts each expert's first ~N k / E rows in one batched GEMM and the rest (under
    one_expert routing, nearly all of expert 0's) in a second pass of tiles."""
    (loss, stats), grads = single_device(router, routing, kernels=kernels)
    (expected_loss, _), expected_grads = single_device(router, routing, "dense")
    assert float(stats["dropped_fraction"]) == 0.0
    assert abs(float(loss) - float(expected_loss)) <= 1e-5 * abs(float(expected_loss))
    assert max_relative_error(grads, expected_grads) <= 1e-5
    if routing == "one_expert":
        assert int(stats["expert_counts"][0]) == BATCH[0] * BATCH[1]


# ordinary routing on every mesh is tests/test_mesh_equivalence.py's (the whole model)
@pytest.mark.parametrize("mesh_name,routing,kernels", [
    *((mesh, routing, "auto") for mesh in MESHES for routing in ("one_expert", "one_shard")),
    ("data2_expert4", "random", "blocks"), ("data2_expert4", "one_shard", "blocks"),
    ("data2_expert4", "one_shard", "tiles")])
def test_dropless_on_meshes_equals_one_device(routing, mesh_name, kernels):
    """Every mesh computes what one device does, with the CPU's default (blas), tiles and
    blocks (whose overflow pass runs under one_shard routing and not, or barely, under random
    routing)."""
    (expected_loss, expected_stats), expected_grads = single_device("deepseek", routing)
    cfg = layer_config("deepseek", f"moe.kernels={kernels}").replace(
        mesh=MeshConfig(*MESHES[mesh_name]))
    mesh = moejax.make_mesh(cfg.mesh)
    params, x = layer_inputs("deepseek")
    with jax.set_mesh(mesh):
        params = jax.device_put(params, P.shardings(moe_specs(cfg), mesh))
        x = jax.device_put(x, batch_sharding(mesh))
        bias = jax.device_put(adversarial_bias(cfg, routing), NamedSharding(mesh, PartitionSpec()))
        (loss, stats), grads = loss_and_grads(cfg, params, x, bias)
    assert float(stats["dropped_fraction"]) == 0.0
    assert jnp.array_equal(stats["expert_counts"], expected_stats["expert_counts"])
    assert abs(float(loss) - float(expected_loss)) <= 1e-5 * abs(float(expected_loss))
    assert max_relative_error(grads, expected_grads) <= 1e-5
    assert 0.0 < float(stats["exchange_fill"]) <= 1.0
    if routing == "one_shard":  # every token to experts 0 and 1: shard 0 (or 0 and 1 on 8)
        shards_hit = -(-2 // (cfg.moe.num_experts // cfg.mesh.expert))
        assert float(stats["exchange_fill"]) == pytest.approx(shards_hit / cfg.mesh.expert)


BOUNDED = "moe.receive_factor=1.25"


def one_shard_layer(router: str, *overrides):
    """(config, params, x, bias) with every token's experts on the first of 4 expert shards:
    the deepseek router through its selection bias; softmax_topk (no bias) through the
    router's weights on a constant first feature of x."""
    cfg = layer_config(router, *overrides)
    params, x = layer_inputs(router)
    if router == "softmax_topk":
        first_shard = jnp.arange(cfg.moe.num_experts) < cfg.moe.num_experts // 4
        params = dataclasses.replace(
            params, router=params.router.at[0].set(jnp.where(first_shard, 3.0, -3.0)))
        x = x.at[..., 0].set(5.0)
    return cfg, params, x, adversarial_bias(cfg, "one_shard")


@pytest.mark.parametrize("mesh_name", ["expert4", "data2_expert4"])
@pytest.mark.parametrize("router", ROUTERS)
def test_bounded_dropless_sends_overflow_in_rounds_and_equals_the_dense_oracle(router,
                                                                              mesh_name):
    """moe.receive_factor=1.25 sizes each pair's exchange buffer for balanced routing; every
    token to one shard's experts overfills the pairs into that shard, and the rows beyond
    travel in further rounds: the layer still equals the dense oracle and drops nothing."""
    cfg, params, x, bias = one_shard_layer(router, BOUNDED)
    mesh_shape = {"expert4": (1, 1, 4), "data2_expert4": (2, 1, 4)}[mesh_name]
    tokens_per_shard = BATCH[0] * BATCH[1] // int(np.prod(mesh_shape))
    capacity = pair_capacity(cfg.moe, tokens_per_shard, 4)
    assert capacity < tokens_per_shard  # a bounded buffer, not the worst case
    dense = cfg.replace(moe=dataclasses.replace(cfg.moe, dispatch="dense"))
    (expected_loss, _), expected_grads = loss_and_grads(dense, params, x, bias)
    cfg = cfg.replace(mesh=MeshConfig(*mesh_shape))
    mesh = moejax.make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        params = jax.device_put(params, P.shardings(moe_specs(cfg), mesh))
        x = jax.device_put(x, batch_sharding(mesh))
        (loss, stats), grads = loss_and_grads(cfg, params, x, bias)
    assert int(stats["expert_counts"][:2].sum()) == 2 * BATCH[0] * BATCH[1]  # all on shard 0
    # every shard queues all its tokens for shard 0: ceil(N_ / C) rounds
    rounds = -(-tokens_per_shard // capacity)
    assert float(stats["overflow_rounds"]) == rounds - 1 >= 1
    # shard 0 receives 4 x (rows of the round) rows of 2 assignments each round and sorts them
    # A = 1.25 N_ k at a time: the passes beyond the first, as a mean over the 4 shards
    per_pass = pass_capacity(cfg.moe, tokens_per_shard, 4, 4 * capacity * 2)
    received = [4 * 2 * min(capacity, tokens_per_shard - r * capacity) for r in range(rounds)]
    extra_passes = sum(-(-n // per_pass) - 1 for n in received)
    assert float(stats["overflow_passes"]) == extra_passes / 4 > 0
    assert float(stats["dropped_fraction"]) == 0.0
    assert abs(float(loss) - float(expected_loss)) <= 1e-5 * abs(float(expected_loss))
    assert max_relative_error(grads, expected_grads) <= 1e-5


def test_undelivered_assignments_count_rows_beyond_the_rounds_run():
    """The dropped count of bounded dropless comes from the queues: 16 tokens, each with both
    experts on shard 0 of 4, in pair buffers of 10 rows need 2 rounds; with 1 the last 6
    tokens' 12 assignments would be lost, with 2 none."""
    expert_ids = jnp.tile(jnp.array([[0, 1]]), (16, 1))
    queues = _Queues.of(expert_ids, experts_per_shard=2, shards=4, capacity=10)
    assert int(queues.rounds) == 2
    assert int(queues.undelivered(expert_ids, 2, 10, rounds=1)) == 12
    assert int(queues.undelivered(expert_ids, 2, 10, rounds=2)) == 0


def test_group_limited_routing_reaches_at_most_topk_groups_shards():
    """4 groups of 2 experts on 4 expert shards, 2 groups kept, k = 4: a token reaches at most 2
    shards, so at most half of the send buffer's pair slots are used."""
    cfg = layer_config("deepseek", "moe.top_k=4").replace(mesh=MeshConfig(2, 1, 4))
    assert max_destinations(cfg.moe, 4) == 2
    mesh = moejax.make_mesh(cfg.mesh)
    params = P.init(moe_specs(cfg), jax.random.key(0), mesh)
    x = jax.device_put(jax.random.normal(jax.random.key(1), (*BATCH, cfg.model.d_model)),
                       batch_sharding(mesh))
    with jax.set_mesh(mesh):
        _, stats = jax.jit(moe_ffn, static_argnums=4)(params, x, jnp.zeros(8), 1.0, cfg)
    assert 0.25 < float(stats["exchange_fill"]) <= max_destinations(cfg.moe, 4) / 4
    assert max_destinations(dataclasses.replace(cfg.moe, num_groups=1), 4) == 4


def traced_shapes(fn, *args, per_shard: bool) -> tuple[set, list]:
    """(every shape an equation of fn's program outputs, the operand shape of every all_to_all),
    from its jaxpr and sub-jaxprs (custom_vjp, loops); `per_shard`: only inside shard_maps
    (outside, the backward's residuals are the shards' stacked, [P R, F] and the like)."""
    shapes, exchanged = set(), []
    stack = [(jax.make_jaxpr(fn)(*args).jaxpr, not per_shard)]
    while stack:
        jaxpr, recording = stack.pop()
        for eqn in jaxpr.eqns:
            if recording:
                shapes.update(tuple(v.aval.shape) for v in eqn.outvars)
            if eqn.primitive.name == "all_to_all":
                exchanged.append(tuple(eqn.invars[0].aval.shape))
            inside = recording or eqn.primitive.name == "shard_map"
            stack += [(sub, inside) for sub in jaxprs_in_params(eqn.params)]
    return shapes, exchanged


@pytest.mark.parametrize("mesh_shape, overrides", [(None, ()), ((2, 1, 4), ()), ((1, 1, 8), ()),
                                                   ((2, 1, 4), (BOUNDED,)),
                                                   (None, ("moe.kernels=blocks",))])
def test_static_rows_are_the_traced_buffer_shapes(mesh_shape, overrides):
    """`static_rows` is what the layer's program allocates, forward and backward: exchange
    buffers of P C rows ([P C, D] and [P C, 2 s] metadata; C = N_ unless moe.receive_factor
    bounds it, in every round), the combine's [M, D], the sorted buffer [R, D] (R from the
    assignments of one pass) with its pre-activations [R, F], no larger [*, F] buffer and no
    [P C s, D] one; with moe.kernels=blocks also the blocks' [E_ C0, D] and [E_, C0, F].
    F = 24 is a width no other array has."""
    cfg = layer_config("deepseek", "moe.expert_ffn_dim=24", *overrides)
    params = P.init(moe_specs(cfg), jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (*BATCH, cfg.model.d_model))
    shards, batch_shards = 1, 1
    if mesh_shape is not None:
        cfg = cfg.replace(mesh=MeshConfig(*mesh_shape))
        shards, batch_shards = mesh_shape[2], int(np.prod(mesh_shape))
    tokens, e, width = BATCH[0] * BATCH[1] // batch_shards, cfg.moe, cfg.model.d_model
    capacity = pair_capacity(e, tokens, shards)
    bound = static_rows(tokens, e.num_experts, e.top_k, shards,
                        group_rows(e, tokens, shards, grouped_kernel(e, fp8=False)), capacity,
                        pass_capacity(e, tokens, shards,
                                      shards * capacity * min(e.top_k, e.num_experts // shards)))
    step = jax.grad(lambda p, x: layer_loss(p, x, jnp.zeros(8), cfg)[0], argnums=(0, 1))
    with contextlib.ExitStack() as stack:
        if mesh_shape is not None:
            stack.enter_context(jax.set_mesh(moejax.make_mesh(cfg.mesh)))
        shapes, exchanged = traced_shapes(step, params, x, per_shard=mesh_shape is not None)
    assert {(bound.sorted_rows, width), (bound.sorted_rows, 24),
            (bound.combine_rows, width)} <= shapes
    assert max(s[0] for s in shapes if len(s) == 2 and s[1] == 24) == bound.sorted_rows
    local_experts = e.num_experts // shards
    if bound.block_rows:  # moe.kernels=blocks: [E_ C0, D] blocks, the overflow's tiles
        assert {(local_experts * bound.block_rows, width),
                (local_experts, bound.block_rows, 24)} <= shapes
    if bound.pass_assignments < bound.assignment_rows:  # passes: no buffer of every assignment
        assert (bound.assignment_rows, width) not in shapes
    if shards == 1:
        assert not exchanged and bound.exchange_rows == 0
    else:  # Exchange sends [P, N_, W]
        assert {s[0] * s[1] for s in exchanged} == {bound.exchange_rows}
        assert {s[-1] for s in exchanged} == {width, 2 * bound.slots}


def test_exchanged_rows_carry_only_the_local_expert_slots():
    """A row sent to a shard of E_ experts carries min(k, E_) (id, weight) slots, the valid ones
    first: the receiver's sorted and combine buffers are sized by that, not by k."""
    ids = jnp.array([[-1, 3, -1, 1], [-1, -1, -1, -1], [0, -1, 2, -1]], jnp.int32)
    weights = jnp.array([[0.0, 0.5, 0.0, 0.25], [0.0] * 4, [0.125, 0.0, 0.0625, 0.0]])
    compact_ids, compact_weights = compact_slots(ids, weights, 2)
    np.testing.assert_array_equal(compact_ids, [[3, 1], [-1, -1], [0, 2]])
    np.testing.assert_array_equal(compact_weights, [[0.5, 0.25], [0, 0], [0.125, 0.0625]])
    slot_scale = jnp.array([1.0, 2.0])
    d_weights = jax.grad(lambda w: jnp.sum(compact_slots(ids, w, 2)[1] * slot_scale))(weights)
    np.testing.assert_array_equal(d_weights, [[0, 1, 0, 2], [0, 0, 0, 0], [1, 0, 2, 0]])


def test_tile_layout_sorts_stably_and_pads_to_tiles():
    ids = jnp.array([2, 0, 2, 5, 0, 2, 1], jnp.int32)  # 5 = "no local expert" for E_ = 5
    rows = grouped.padded_rows(len(ids), 5, tile=4)
    layout = grouped.tile_layout(ids, 5, tile=4, num_rows=rows)
    assert rows == 24  # 7 + 5 x 3 = 22, rounded up to whole tiles of 4
    # expert 0: rows 0-1 (assignments 1, 4); expert 1: row 4 (6); expert 2: rows 8-10 (0, 2, 5)
    np.testing.assert_array_equal(layout.row_of_assignment, [8, 0, 9, rows, 1, 10, 4])
    assert int(layout.used_tiles) == 3 and int(layout.useful_rows) == 6
    np.testing.assert_array_equal(layout.tile_expert[:3], [0, 1, 2])
    assert all(int(layout.assignment_of_row[r]) == len(ids) for r in (2, 3, 5, 11))
    assert int(layout.unplaced) == 0
    # a buffer below the bound has no row for expert 2's group (rows 8-10): counted, not hidden
    assert int(grouped.tile_layout(ids, 5, tile=4, num_rows=8).unplaced) == 3


@pytest.mark.parametrize("num_experts", [5, 2**31 // 4000], ids=["packed keys", "argsort"])
def test_sort_by_expert_is_the_stable_argsort(num_experts):
    """Both ways (one sort of unique int32 keys expert * A + assignment, and the stable argsort
    where (E + 1) A overflows int32) give the stable order, ties in assignment order."""
    ids = jax.random.randint(jax.random.key(3), (4000,), 0, 6).astype(jnp.int32)  # 5: none
    order, sorted_ids = grouped.sort_by_expert(ids, num_experts)
    np.testing.assert_array_equal(order, np.argsort(np.asarray(ids), kind="stable"))
    np.testing.assert_array_equal(sorted_ids, np.sort(np.asarray(ids)))


def test_take_rows_gradient_equals_the_gather_gradient():
    source = jax.random.normal(jax.random.key(0), (5, 3))
    index = jnp.array([4, 0, 5, 2, 0, 1])  # 5: a zero row; source row 0 read twice, 3 never
    inverse = jnp.array([[1, 4], [5, 6], [3, 6], [6, 6], [0, 6]])  # 6 = R: no reader
    cotangent = jax.random.normal(jax.random.key(1), (6, 3))

    def plain(s):
        return jnp.concatenate([s, jnp.zeros((1, 3))])[index]

    expected = jax.vjp(plain, source)[1](cotangent)[0]
    actual = jax.vjp(lambda s: grouped.take_rows(s, index, inverse), source)[1](cotangent)[0]
    np.testing.assert_allclose(actual, expected, rtol=1e-6)


def test_backward_has_no_float_scatter():
    """The permutation's gradients are gathers through the inverse map: outside the router
    (whose top-k gather of [B, T, k] scores transposes to a small scatter), the only scatters in
    the compiled step are the integer ones that build the layout."""
    cfg = layer_config("deepseek")
    params, x = layer_inputs("deepseek")
    fn = jax.jit(jax.grad(lambda p, x: layer_loss(p, x, jnp.zeros(8), cfg)[0], argnums=(0, 1)))
    # compiled as users compile it: without fusion emitters (tests/conftest.py) XLA:CPU expands
    # every scatter into a loop, and the check would find none
    options = ({"xla_cpu_use_fusion_emitters": True}
               if "xla_cpu_use_fusion_emitters=false" in os.environ.get("XLA_FLAGS", "") else {})
    hlo = fn.lower(params, x).compile(compiler_options=options).as_text()
    scatters = [line for line in hlo.splitlines() if " scatter(" in line]
    dispatch = [line for line in scatters if "(route)" not in line]
    assert dispatch and not [line for line in dispatch if " f32[" in line.split("scatter(")[0]]


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name):
    """jax.lax.ragged_all_to_all's documented semantics from dense collectives (XLA:CPU cannot
    run the real one): slice [input_offsets[p], + send_sizes[p]) goes to shard p and is written
    there at output_offsets[p]; rows not written keep `output`."""
    del recv_sizes  # implied by what the senders send
    shards, rows = input_offsets.shape[0], operand.shape[0]
    padded = jnp.concatenate([operand, jnp.zeros_like(operand)])
    index = input_offsets[:, None] + jnp.arange(rows)  # [P, rows]
    valid = jnp.arange(rows)[None, :] < send_sizes[:, None]
    blocks = jnp.where(valid[..., None], padded[index], 0)
    exchanged = jax.lax.all_to_all(blocks, axis_name, 0, 0, tiled=True)
    valid_in = jax.lax.all_to_all(valid, axis_name, 0, 0, tiled=True)
    landing = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
    result = jnp.concatenate([output, jnp.zeros_like(output)])
    for source in range(shards):
        target = landing[source] + jnp.arange(rows)
        current = result[target]
        result = result.at[target].set(jnp.where(valid_in[source][:, None], exchanged[source],
                                                 current))
    return result[:rows]


def test_ragged_kernels_equal_the_cpu_path(monkeypatch):
    """moe.kernels=ragged (ragged_dot and ragged_all_to_all, the GPU/TPU path) gives the CPU
    path's loss and gradients on (data2, expert4), with ragged_all_to_all emulated from its
    documented semantics; the real one lowers (3 exchanges forward). XLA:CPU lowers ragged_dot
    to masked dense GEMMs, so the program is checked for it before lowering."""
    (expected_loss, _), expected_grads = single_device("deepseek", "random")
    cfg = layer_config("deepseek", "moe.kernels=ragged").replace(mesh=MeshConfig(2, 1, 4))
    mesh = moejax.make_mesh(cfg.mesh)
    params, x = layer_inputs("deepseek")
    with jax.set_mesh(mesh):
        params = jax.device_put(params, P.shardings(moe_specs(cfg), mesh))
        x = jax.device_put(x, batch_sharding(mesh))
        bias = adversarial_bias(cfg, "random")
        forward = jax.jit(lambda p, x: moe_ffn(p, x, bias, 1.0, cfg)[0])
        assert forward.lower(params, x).as_text().count("ragged_all_to_all") == 3
        assert "ragged_dot" in str(jax.make_jaxpr(forward)(params, x))
        monkeypatch.setattr(jax.lax, "ragged_all_to_all", emulated_ragged_all_to_all)
        (loss, stats), grads = loss_and_grads(cfg, params, x, bias)
        (_, cpu_stats), _ = loss_and_grads(cfg.replace(moe=dataclasses.replace(
            cfg.moe, kernels="tiles")), params, x, bias)
    assert float(stats["dropped_fraction"]) == 0.0
    # the same work: rows the ragged exchange left empty are neither computed nor counted
    for work in ("padding_overhead", "exchange_fill"):
        assert float(stats[work]) == float(cpu_stats[work]), work
    assert abs(float(loss) - float(expected_loss)) <= 1e-5 * abs(float(expected_loss))
    assert max_relative_error(grads, expected_grads) <= 1e-5
