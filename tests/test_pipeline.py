"""Pipeline parallelism (moejax/model/pipeline.py): the same loss, router losses, expert counts
and gradients as one device on meshes with a `pipe` axis, with MLA, MTP, a first-k dense layer,
group-limited routing, every router loss and the default dropless dispatch; the compiled step's
collectives; the config refusals.

Every model-level case costs a whole-model compile (~12 s here), so the suite checks two of the
eight (schedule, mesh) cases; scripts/bench_pipeline.py --check runs all eight
(docs/bench_pipeline.md)."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import max_relative_error, tiny_config
from test_mesh_equivalence import CONFIGS, _batch, _router_state, on_mesh, shardings

import moejax
from moejax.config import ConfigError, MeshConfig
from moejax.model import cpu_kernels, cpu_swiglu, pipeline
from moejax.model.pipeline import Schedule
from moejax.sharding import batch_sharding
from moejax.tools.hlo_stats import shape_bytes

# one dense layer, then 4 MoE layers: 2 stages of 2, 4 of 1, or 2 stages x 2 virtual of 1
PIPELINE_CONFIG = (*CONFIGS["deepseek_v3"], "model.num_layers=5")
SCHEDULES = {"gpipe": ("train.microbatches=2",),
             "interleaved": ("train.microbatches=2", "train.pipeline_schedule=interleaved",
                             "train.virtual_stages=2")}
MESHES = {  # MeshConfig(data, fsdp, expert, pipe)
    "pipe2_expert4": MeshConfig(1, 1, 4, 2),
    "pipe2_data2_expert2": MeshConfig(2, 1, 2, 2),
    "pipe4_expert2": MeshConfig(1, 1, 2, 4),
    "pipe2_fsdp2_expert2": MeshConfig(1, 2, 2, 2),
}
CASES = [("gpipe", "pipe2_fsdp2_expert2"), ("interleaved", "pipe2_expert4")]


def _grad_fn(cfg, batch):
    return jax.value_and_grad(
        lambda p: moejax.loss_fn(p, batch, cfg, _router_state(cfg)), has_aux=True)


@functools.cache
def single_device(overrides: tuple):
    """(params, loss, metrics, grads) of tiny with `overrides` on one device: the reference a
    pipelined mesh must equal."""
    cfg = tiny_config(*overrides)
    params = moejax.init_params(cfg, jax.random.key(0))
    (loss, metrics), grads = jax.jit(_grad_fn(cfg, _batch(cfg)))(params)
    return params, loss, metrics, grads


def reference():
    return single_device(PIPELINE_CONFIG)


@functools.cache
def pipelined(schedule, mesh_name):
    """(loss, metrics, grads, compiled HLO text) of one (schedule, mesh) case."""
    params = reference()[0]
    cfg = tiny_config(*PIPELINE_CONFIG, *SCHEDULES[schedule]).replace(mesh=MESHES[mesh_name])
    mesh = moejax.make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        sharded = on_mesh(params, shardings(cfg, mesh))
        batch = on_mesh(_batch(cfg), batch_sharding(mesh))
        compiled = jax.jit(_grad_fn(cfg, batch)).lower(sharded).compile()
        (loss, metrics), grads = compiled(sharded)
    return loss, metrics, grads, compiled.as_text()


@pytest.mark.parametrize("schedule,mesh_name", CASES)
def test_loss_and_grads_match_single_device(schedule, mesh_name):
    _, expected_loss, expected_metrics, expected_grads = reference()
    loss, metrics, grads, _ = pipelined(schedule, mesh_name)

    assert abs(float(loss) - float(expected_loss)) <= 1e-5 * abs(float(expected_loss))
    assert float(expected_metrics["switch_loss"]) > 0 and float(expected_metrics["mtp_aux_loss"]) > 0
    for name in ("cross_entropy", "switch_loss", "seq_balance_loss", "z_loss", "aux_loss",
                 "mtp_aux_loss", "mtp_cross_entropy_1"):
        assert max_relative_error(metrics[name], expected_metrics[name]) <= 1e-5, name
    assert float(metrics["dropped_fraction"]) == 0.0
    assert jnp.array_equal(metrics["expert_counts"], expected_metrics["expert_counts"])
    assert max_relative_error(grads, expected_grads) <= 1e-5


# Uneven stages: tiny as shipped (1 dense + 3 MoE layers: stages of 2 and 1) on pipe2 x expert4,
# and the DeepSeek-shaped model with 1 dense + 5 MoE layers placed [1, 2, 1, 1] by
# train.pipeline_layers_per_stage on pipe4 x expert2.
UNEVEN = {"tiny_pipe2_expert4": ((), MeshConfig(1, 1, 4, 2)),
          "six_layers_pipe4_expert2": ((*CONFIGS["deepseek_v3"], "model.num_layers=6",
                                        "train.pipeline_layers_per_stage=[1,2,1,1]"),
                                       MeshConfig(1, 1, 2, 4))}


@pytest.mark.parametrize("case", UNEVEN)
def test_uneven_stages_match_single_device(case):
    overrides, mesh_cfg = UNEVEN[case]
    params, expected_loss, expected_metrics, expected_grads = single_device(
        (*overrides, "train.microbatches=2"))
    cfg = tiny_config(*overrides, "train.microbatches=2").replace(mesh=mesh_cfg)
    mesh = moejax.make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        stored = on_mesh(params, shardings(cfg, mesh))
        # no stage stores the stack whole: each weight is split over `pipe` along a dimension
        for leaf in jax.tree.leaves(stored.moe_blocks):
            assert leaf.addressable_shards[0].data.size * 2 <= leaf.size, leaf.sharding
        batch = on_mesh(_batch(cfg), batch_sharding(mesh))
        (loss, metrics), grads = jax.jit(_grad_fn(cfg, batch))(stored)
    assert abs(float(loss) - float(expected_loss)) <= 1e-5 * abs(float(expected_loss))
    assert jnp.array_equal(metrics["expert_counts"], expected_metrics["expert_counts"])
    assert max_relative_error(grads, expected_grads) <= 1e-5


# 1F1B: DeepSeek-V3 in small (MLA with YaRN, MTP, a dense first layer, dropless, group-limited
# routing) without the switch loss, which 1f1b refuses; m = 5 microbatches, more than the
# 2p - 1 = 3 inputs pipe2 keeps, so its slots are reused, and not a multiple of p, so the
# stream split over the stages is padded (pipe2: k = 3 per stage; pipe4: k = 2, the last stage
# holds none). pipe4 x expert2 has uneven stages (5 MoE layers: 2, 1, 1, 1).
ONE_F_ONE_B_CONFIG = (*CONFIGS["deepseek_v3"], "moe.switch_loss_coef=0", "model.num_layers=6",
                      "train.global_batch_size=40", "train.microbatches=5")
ONE_F_ONE_B_MESHES = {"pipe2_data2_expert2": MeshConfig(2, 1, 2, 2),
                      "pipe4_expert2": MeshConfig(1, 1, 2, 4)}


@pytest.mark.parametrize("mesh_name", ONE_F_ONE_B_MESHES)
def test_one_f_one_b_matches_single_device(mesh_name):
    params, expected_loss, expected_metrics, expected_grads = single_device(ONE_F_ONE_B_CONFIG)
    cfg = tiny_config(*ONE_F_ONE_B_CONFIG, "train.pipeline_schedule=1f1b").replace(
        mesh=ONE_F_ONE_B_MESHES[mesh_name])
    mesh = moejax.make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        stored = on_mesh(params, shardings(cfg, mesh))
        batch = on_mesh(_batch(cfg), batch_sharding(mesh))
        compiled = jax.jit(_grad_fn(cfg, batch)).lower(stored).compile()
        (loss, metrics), grads = compiled(stored)
    # the gradients reach jax.grad through sum(grad * param): no all-gather may rebuild an
    # expert shard's whole stack of routed weights (jnp.vdot there flattened, and gathered, it)
    routed = stored.moe_blocks.ffn.w_gate
    shard_stack_bytes = routed.size * routed.dtype.itemsize // cfg.mesh.expert
    hlo = compiled.as_text()
    for line in hlo.splitlines():
        gathered = re.search(r"= (\S+) all-gather(-start)?\(", line)
        assert gathered is None or shape_bytes(gathered.group(1)) < shard_stack_bytes, line
    # the output head stays split over the stages by vocabulary: no device holds it whole
    width, vocab = cfg.model.d_model, cfg.model.vocab_size
    assert f"f32[{width},{vocab // cfg.mesh.pipe}]" in hlo and f"f32[{width},{vocab}]" not in hlo
    assert abs(float(loss) - float(expected_loss)) <= 1e-5 * abs(float(expected_loss))
    assert float(expected_metrics["seq_balance_loss"]) > 0 and float(expected_metrics["mtp_aux_loss"]) > 0
    for name in ("cross_entropy", "seq_balance_loss", "z_loss", "aux_loss", "mtp_aux_loss",
                 "mtp_cross_entropy_1"):
        assert max_relative_error(metrics[name], expected_metrics[name]) <= 1e-5, name
    assert jnp.array_equal(metrics["expert_counts"], expected_metrics["expert_counts"])
    assert max_relative_error(grads, expected_grads) <= 1e-5


def test_a_checkpoint_of_uneven_stages_resumes_on_another_pipe_size(tmp_path):
    """The stack keeps its [L, ...] shape whatever the stages: a checkpoint written on pipe2
    (stages of 2 and 1 layers, the stack split over `pipe` along another dimension) restores
    on pipe3 x expert2 (one layer per stage, split over `pipe` by layer) and without a
    pipeline, value for value, in the new layout."""
    from moejax.training.checkpoint import Checkpoints
    from moejax.training.run import build_run

    uneven = build_run(tiny_config("mesh.pipe=2", "mesh.expert=4", "train.microbatches=2"))
    writer = Checkpoints(tmp_path, keep=1)
    writer.save(1, uneven.state, {"position": 0})
    writer.close()
    for overrides in (("mesh.expert=8",), ("mesh.pipe=3", "mesh.expert=2"),
                      ("mesh.pipe=2", "mesh.expert=4", "train.pipeline_schedule=1f1b")):
        target = build_run(tiny_config(*overrides), abstract=True).state
        restored, _ = Checkpoints(tmp_path).restore(1, target)
        for saved, back, like in zip(jax.tree.leaves(uneven.state), jax.tree.leaves(restored),
                                     jax.tree.leaves(target)):
            assert back.sharding.is_equivalent_to(like.sharding, back.ndim)
            assert (jax.device_get(saved) == jax.device_get(back)).all()


def test_compiled_step_permutes_activations_and_never_gathers_a_stack_over_pipe():
    """GPipe on (pipe2, fsdp2, expert2): collective-permutes move the microbatches between
    stages, and no all-gather rebuilds the layer axis of a stack (each stage keeps its own
    layers; the fsdp gathers of a stage's weights stay within the stage). Weights are float:
    integer gathers are token ids (the embedding, split over pipe by vocabulary)."""
    hlo = pipelined("gpipe", "pipe2_fsdp2_expert2")[3]
    assert re.search(r"collective-permute(-start)?\(", hlo)
    num_layers = 4  # the pipelined (MoE) stack; each stage holds 2
    for line in hlo.splitlines():
        if re.search(r"all-gather(-start)?\(", line) and "dimensions={0}" in line:
            result = re.search(r"= \(?[fb][a-z0-9]*\[(\d+)", line)
            assert result is None or int(result.group(1)) != num_layers, line


def test_the_head_runs_per_microbatch_on_the_stages_not_on_the_whole_shard():
    """GPipe on (pipe2, fsdp2, expert2), 2 microbatches: the output head's logits exist only
    for one microbatch's rows of a batch shard (the pipeline's tail), never for the shard's
    whole batch, as they did when the head ran after the pipeline on every stage."""
    hlo = pipelined("gpipe", "pipe2_fsdp2_expert2")[3]
    cfg = tiny_config(*PIPELINE_CONFIG, *SCHEDULES["gpipe"])
    rows = cfg.train.global_batch_size // 4  # 4 batch shards: data 1 x fsdp 2 x expert 2
    seq, vocab = cfg.train.seq_len, cfg.model.vocab_size
    assert f"f32[{rows // 2},{seq},{vocab}]" in hlo
    assert f"f32[{rows},{seq},{vocab}]" not in hlo


def group_size(line: str) -> int:
    """Devices in each replica group of a collective's HLO line, in any of XLA's notations:
    mesh['axis_0'=2,...] (device_ids=...) {'axis_2'}, iota [groups,size]<=[n], or explicit {{0,1},{2,3}}."""
    named = re.search(r"mesh\[([^\]]*)\][^{]*\{([^}]*)\}", line)
    if named:
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", named.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", named.group(2)))
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)
    if iota:
        return int(iota.group(2))
    return len(re.search(r"replica_groups=\{\{([^}]*)\}", line).group(1).split(","))


def test_interleaved_step_moves_blocks_by_permutes_not_whole_stack_gathers():
    """Interleaved on (pipe2, expert4), the MoE stack alone (moe_stack, as
    scripts/bench_pipeline.py times it): the blocks a stage runs but does not store arrive by
    collective-permutes; every all-gather over `pipe` left is of statistics, smaller than one
    layer's local expert gates (a gather of the stack over pipe, as GSPMD did it, would be
    whole weight stacks). Gathers within a stage (MLA's head-split weights over `expert`) are
    not moves between stages."""
    from moejax.tools.bench_pipeline import stack_step

    cfg = tiny_config(*PIPELINE_CONFIG, *SCHEDULES["interleaved"]).replace(
        mesh=MESHES["pipe2_expert4"])
    hlo = stack_step(cfg, moejax.make_mesh(cfg.mesh))[1].as_text()
    local_expert_gates = cfg.model.d_model * cfg.moe.expert_ffn_dim * cfg.moe.num_experts // 4
    assert len(re.findall(r"collective-permute(-start)?\(", hlo)) > 0
    for line in hlo.splitlines():
        if re.search(r"all-gather(-start)?\(", line) and group_size(line) == 2:  # pipe2
            dims = re.search(r"= \(?[a-z0-9]+\[([0-9,]*)\]", line).group(1)
            assert math.prod(int(d) for d in dims.split(",") if d) < local_expert_gates, line


def test_schedule_bubble_and_work_order():
    gpipe, circular = Schedule(4, 1, 8), Schedule(4, 2, 8)
    assert gpipe.ticks == 11 and gpipe.theoretical_bubble == pytest.approx(3 / 11)
    assert circular.ticks == 19 and circular.theoretical_bubble == pytest.approx(3 / 19)
    # circular: microbatches 0-3 pass virtual stage 0, then 1, before microbatches 4-7 enter
    items = [tuple(int(i) for i in circular.item(w)) for w in range(16)]
    assert items[:8] == [(0, 0), (1, 0), (2, 0), (3, 0), (0, 1), (1, 1), (2, 1), (3, 1)]
    assert items[8] == (4, 0)
    assert list(circular.final_ticks()) == [7, 8, 9, 10, 15, 16, 17, 18]


@pytest.mark.parametrize("overrides,message", [
    (("mesh.pipe=4", "mesh.expert=2", "model.num_layers=3"),
     "the 2 pipelined layers are fewer than the 4 stages"),
    (("mesh.pipe=2", "mesh.expert=4", "model.num_layers=6", "train.microbatches=2",
      "train.pipeline_schedule=interleaved", "train.virtual_stages=2"),
     "the 5 pipelined layers do not split evenly into 4 blocks"),
    (("mesh.pipe=2", "mesh.expert=4", "model.num_layers=5",
      "train.pipeline_layers_per_stage=[3,2]"),
     ("train.pipeline_layers_per_stage=[3, 2] must give each of the 2 stages at least one "
      "layer, 4 in all")),
    (("mesh.pipe=2", "mesh.expert=4", "model.num_layers=5", "train.microbatches=3"),
     "is not divisible by train.microbatches=3"),
    (("mesh.pipe=2", "mesh.expert=4", "model.num_layers=5", "train.virtual_stages=2"),
     "the interleaved schedule needs virtual_stages >= 2"),
    (("train.pipeline_schedule=1f2b",), "train.pipeline_schedule='1f2b' is unknown"),
    (("mesh.pipe=2", "mesh.expert=4", "model.num_layers=5", "moe.switch_loss_coef=0.01",
      "train.pipeline_schedule=1f1b"), "set moe.switch_loss_coef=0 (it is 0.01) or use gpipe"),
])
def test_impossible_pipelines_are_refused_with_one_sentence(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        tiny_config("train.global_batch_size=8", *overrides)
    text = str(err.value)
    assert "\n" not in text and text.endswith(".")


def test_the_dense_first_layers_run_per_microbatch_not_on_the_whole_shard():
    """The first-k dense layers run before the pipeline one microbatch at a time: their SwiGLU
    hidden activations exist for one microbatch's rows of a batch shard, never for the
    shard's whole batch (which made them 713 of the 785 GB of the 671B PP16 plan's
    temporaries)."""
    hlo = pipelined("gpipe", "pipe2_fsdp2_expert2")[3]
    cfg = tiny_config(*PIPELINE_CONFIG, *SCHEDULES["gpipe"])
    rows = cfg.train.global_batch_size // 4  # 4 batch shards: data 1 x fsdp 2 x expert 2
    seq, hidden = cfg.train.seq_len, cfg.model.ffn_dim
    assert cfg.model.num_dense_layers == 1
    # SwiGLU's activations at the dense FFN's width (the experts' and the shared expert's are
    # moe.expert_ffn_dim wide): on CPU in float32 the pre-activations [rows, F] the SwiGLU's
    # FFI call returns (cpu_swiglu.py), else XLA's silu
    assert hidden not in (cfg.moe.expert_ffn_dim, cfg.moe.expert_ffn_dim * cfg.moe.num_shared_experts)
    assert cpu_kernels.runs(cfg.precision.compute_dtype)
    calls = [line for line in hlo.splitlines() if f'"{cpu_swiglu.FORWARD_TARGET}"' in line]
    activation_rows = {int(rows_) for line in calls
                       for rows_ in re.findall(rf"f32\[(\d+),{hidden}\]", line)}
    assert rows // 2 * seq in activation_rows, activation_rows
    assert rows * seq not in activation_rows, activation_rows


@pytest.mark.parametrize("microbatches", [4, 5, 6, 7, 9])
def test_conveyors_bring_each_microbatch_in_time_and_its_gradient_home(microbatches):
    """1F1B's stream stays split over the stages (stage s holds microbatches s k .. s k + k - 1,
    k = ceil(m / p)): the input conveyor hands stage 0 microbatch t at tick t, and the gradient
    conveyor, fed microbatch u's gradient at stage 0 at tick u + 2p - 2, leaves every gradient
    on the stage and slot its microbatch came from, for m a multiple of p = 4 or not."""
    p = 4
    k = -(-microbatches // p)
    mesh = jax.make_mesh((p,), ("pipe",), devices=jax.devices()[:p])
    ids = jnp.arange(p * k, dtype=jnp.float32)  # padding ids >= m: never read, never returned
    ticks = microbatches + 2 * p - 2

    def run(queue):
        def tick(carry, t):
            queue_, gradients = carry
            fresh, queue_ = pipeline._input_conveyor(queue_, t)
            u = t - (2 * p - 2)
            gradient = jnp.where((u >= 0) & (u < microbatches), u + 100.0, 0.0)
            gradients = pipeline._gradient_conveyor(gradients, gradient, t, microbatches)
            return (queue_, gradients), fresh

        (_, gradients), fresh = jax.lax.scan(tick, (queue, jnp.zeros_like(queue)),
                                             jnp.arange(ticks))
        return fresh[None], pipeline._delivered_gradients(gradients, ticks, microbatches)

    spec = jax.sharding.PartitionSpec("pipe")
    ids = jax.device_put(ids, jax.sharding.NamedSharding(mesh, spec))
    fresh, delivered = jax.jit(jax.shard_map(run, mesh=mesh, in_specs=spec,
                                             out_specs=(spec, spec)))(ids)
    fresh, delivered, ids = (np.asarray(a) for a in (fresh, delivered, ids))
    assert fresh[0, :microbatches].tolist() == list(range(microbatches))  # stage 0's row
    real = np.arange(p * k) < microbatches
    assert delivered.tolist() == np.where(real, ids + 100.0, 0.0).tolist()
