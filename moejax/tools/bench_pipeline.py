"""What scripts/bench_pipeline.py measures about pipeline parallelism (moejax/model/pipeline.py):
- `equality_matrix`: loss and gradients of every (schedule, mesh) case against one device;
- `bubble`: the measured idle fraction of each schedule next to its theory, and the compiled
  per-stage memory;
- `training_comparison`: per-step losses of a pipelined run against an unpipelined one, and a
  pipelined run resumed without the pipeline.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

from moejax.config import Config, MeshConfig, load_config
from moejax.model import pipeline, transformer
from moejax.params import shardings as param_shardings
from moejax.sharding import batch_sharding, make_mesh
from moejax.tools import bench

MESHES = {  # MeshConfig(data, fsdp, expert, pipe)
    "pipe2_expert4": MeshConfig(1, 1, 4, 2),
    "pipe2_data2_expert2": MeshConfig(2, 1, 2, 2),
    "pipe4_expert2": MeshConfig(1, 1, 2, 4),
    "pipe2_fsdp2_expert2": MeshConfig(1, 2, 2, 2),
}
# DeepSeek-V3 in small (as tests/test_mesh_equivalence.py): MLA with a query latent and YaRN,
# one MTP module, group-limited sigmoid routing, a shared expert, one first dense layer, every
# router loss; 1 dense + 8 MoE layers so that 4 stages x 2 virtual stages get one layer each.
CHECK_CONFIG = (
    "precision.compute_dtype=float32", "model.d_model=32", "model.ffn_dim=64",
    "moe.expert_ffn_dim=16", "train.seq_len=16", "train.global_batch_size=8",
    "model.num_layers=9", "model.num_dense_layers=1", "moe.router=deepseek", "moe.num_groups=4",
    "moe.topk_groups=2", "moe.num_shared_experts=1", "moe.routed_scaling_factor=2.5",
    "moe.switch_loss_coef=0.01", "moe.seq_balance_loss_coef=0.01", "moe.z_loss_coef=0.001",
    "model.attention=mla", "model.q_lora_rank=16", "model.kv_lora_rank=16",
    "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=4", "model.v_head_dim=8",
    "model.rope_scaling=yarn", "model.yarn_factor=4", "model.yarn_original_max_len=8",
    "model.mtp_depth=1",
)


# uneven: gpipe with the 8 MoE layers of CHECK_CONFIG placed unevenly by stage count
UNEVEN_LAYERS = {2: "[5,3]", 4: "[3,2,2,1]"}


def schedule_overrides(schedule: str, stages: int, microbatches: int) -> tuple[str, ...]:
    virtual = 2 if schedule == "interleaved" else 1
    placed = (f"train.pipeline_layers_per_stage={UNEVEN_LAYERS[stages]}",) if (
        schedule == "uneven") else ()
    return (f"train.microbatches={microbatches}",
            f"train.pipeline_schedule={'gpipe' if schedule == 'uneven' else schedule}",
            f"train.virtual_stages={virtual}", *placed)


def _loss_and_grads(cfg: Config, params, batch, router):
    fn = jax.value_and_grad(lambda p: transformer.loss_fn(p, batch, cfg, router), has_aux=True)
    (loss, metrics), grads = jax.jit(fn)(params)
    return loss, metrics, grads


def _relative(actual, expected) -> float:
    def leaf(a, e):
        return float(jnp.max(jnp.abs(a - e)) / (jnp.max(jnp.abs(e)) + 1e-30))

    return max(jax.tree.leaves(jax.tree.map(leaf, actual, expected)))


def equality_matrix(log=print) -> list[dict]:
    """Every (schedule, mesh) case against one device: max relative errors."""
    base = load_config("tiny", CHECK_CONFIG)
    params = transformer.init_params(base, jax.random.key(0))
    router = transformer.init_router_state(base)
    router = router.replace(bias=0.05 * jax.random.normal(jax.random.key(7), router.bias.shape))
    tokens = jax.random.randint(jax.random.key(3), (8, 17), 0, base.model.vocab_size)
    expected = _loss_and_grads(base, params, {"tokens": tokens}, router)
    rows = []
    for schedule in ("gpipe", "interleaved", "uneven"):
        for name, mesh_cfg in MESHES.items():
            shards = mesh_cfg.data * mesh_cfg.fsdp * mesh_cfg.expert
            microbatches = 8 // shards
            cfg = load_config("tiny", (*CHECK_CONFIG, *schedule_overrides(
                schedule, mesh_cfg.pipe, microbatches))).replace(mesh=mesh_cfg)
            mesh = make_mesh(cfg.mesh)
            with jax.set_mesh(mesh):
                sharded = jax.device_put(params, param_shardings(transformer.model_specs(cfg), mesh))
                batch = {"tokens": jax.device_put(tokens, batch_sharding(mesh))}
                loss, metrics, grads = _loss_and_grads(cfg, sharded, batch, router)
            row = {"schedule": schedule, "mesh": name, "microbatches": microbatches,
                   "loss": _relative(loss, expected[0]),
                   "router_losses": max(_relative(metrics[k], expected[1][k]) for k in
                                        ("switch_loss", "seq_balance_loss", "z_loss",
                                         "mtp_aux_loss")),
                   "expert_counts_equal": bool(jnp.array_equal(
                       metrics["expert_counts"], expected[1]["expert_counts"])),
                   "grads": _relative(grads, expected[2])}
            log(f"  {schedule:11s} {name:20s} loss {row['loss']:.1e} grads {row['grads']:.1e} "
                f"counts equal {row['expert_counts_equal']}")
            rows.append(row)
    return rows


@dataclasses.dataclass(frozen=True)
class _NoBubble(pipeline.Schedule):
    """The same work items with the p - 1 bubble ticks cut off (wrong results, same work per
    tick): the time the schedule would take without its bubble."""

    @property
    def ticks(self) -> int:
        return self.work_items


def stack_step(cfg: Config, mesh, without_bubble: bool = False):
    """A compiled forward + backward of the pipelined MoE stack alone (no embedding, head or
    optimizer, so that the step time is the pipeline's) -> (run(), compiled)."""
    params = transformer.init_params(cfg, jax.random.key(0), mesh)
    batch = cfg.train.global_batch_size
    x = jax.random.normal(jax.random.key(1), (batch, cfg.train.seq_len, cfg.model.d_model))
    router = transformer.init_router_state(cfg)

    schedule = pipeline.Schedule(mesh.shape["pipe"], cfg.train.virtual_stages,
                                 cfg.train.microbatches,
                                 one_f_one_b=cfg.train.pipeline_schedule == "1f1b")
    if without_bubble:
        schedule = _NoBubble(**dataclasses.asdict(schedule))

    def loss(blocks, x):
        if schedule.one_f_one_b:  # the same loss, each microbatch's part taken by the tail
            value, _, _ = transformer.moe_stack(blocks, x, cfg, router, schedule, _square_tail(x))
            return value
        y, _ = transformer.moe_stack(blocks, x, cfg, router, schedule)
        return jnp.mean(jnp.square(y))

    with jax.set_mesh(mesh):
        x = jax.device_put(x, batch_sharding(mesh))
        compiled = jax.jit(jax.grad(loss)).lower(params.moe_blocks, x).compile()
    return (lambda: compiled(params.moe_blocks, x)), compiled


def _square_tail(x) -> pipeline.Tail:
    """1f1b's tail for the stack alone: each microbatch's mean square, the loss stack_step
    takes of the whole batch (the mean of equal microbatches' means)."""
    return pipeline.Tail(fn=lambda weights, hidden, rows: {"square": jnp.mean(jnp.square(hidden))},
                         weights=(), weight_specs=(), rows=jnp.zeros((x.shape[0], 1), jnp.int32),
                         loss=lambda outputs, _: outputs["square"],
                         loss_inputs=jnp.zeros((), jnp.float32))


SCHEDULES = ("gpipe", "interleaved", "1f1b")


def bubble(microbatch_counts, rounds: int, log=print) -> list[dict]:
    """(pipe 4, expert 2), 8 MoE layers: for GPipe, interleaved (v = 2) and 1F1B at each
    number of microbatches, the measured bubble 1 - T(without bubble ticks) / T(schedule), next
    to the theory (Schedule.theoretical_bubble), and the compiled per-stage memory."""
    rows = []
    for microbatches in microbatch_counts:
        runs, compiled = {}, {}
        for schedule in SCHEDULES:
            cfg = load_config("tiny", (
                "model.num_layers=8", "model.num_dense_layers=0", "train.seq_len=64",
                "train.global_batch_size=" + str(4 * microbatches),
                *schedule_overrides(schedule, 4, microbatches))).replace(mesh=MESHES["pipe4_expert2"])
            mesh = make_mesh(cfg.mesh)
            runs[schedule], compiled[schedule] = stack_step(cfg, mesh)
            runs[schedule + " without bubble"], _ = stack_step(cfg, mesh, without_bubble=True)
        for run in runs.values():
            jax.block_until_ready(run())  # warm up
        times, _ = bench.interleaved_rounds(runs, rounds)
        for schedule in SCHEDULES:
            virtual = 2 if schedule == "interleaved" else 1
            theory = pipeline.Schedule(4, virtual, microbatches,
                                       one_f_one_b=schedule == "1f1b").theoretical_bubble
            idle = [1 - r for r in bench.round_ratios(times[schedule + " without bubble"],
                                                      times[schedule])]
            row = {"schedule": schedule, "stages": 4, "virtual_stages": virtual,
                   "microbatches": microbatches, "theory": theory,
                   "measured": bench.per_round_summary(idle),
                   "step_seconds": bench.per_round_summary(bench.timed(times[schedule])),
                   "memory": bench.memory_stats(compiled[schedule])}
            log(f"  {schedule:11s} m={microbatches:2d}: bubble measured "
                f"{row['measured']['median']:.3f} theory {theory:.3f}, temp "
                f"{bench.mib(row['memory']['temp']):.1f} MiB")
            rows.append(row)
    return rows


def training_comparison(steps: int, log=print) -> dict:
    """The tiny preset (1 dense + 4 MoE layers) for `steps` steps on (pipe 2, expert 4) and on
    (expert 8) without a pipeline: per-step losses; then the pipelined run stopped half way and
    resumed on (expert 8)."""
    from moejax.training.loop import train

    common = ("model.num_layers=5", f"train.steps={steps}", f"train.checkpoint_every={steps // 2}",
              "train.warmup_steps=5", "train.eval_every=0", "train.log_every=5")
    plain = load_config("tiny", (*common, "mesh.expert=8"))
    piped = load_config("tiny", (*common, "mesh.expert=4", "mesh.pipe=2", "train.microbatches=2"))
    # the control: another mesh without a pipeline, to show how far any change of mesh drifts
    control = load_config("tiny", (*common, "mesh.data=2", "mesh.expert=4"))
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for name, cfg in (("pipe1", plain), ("pipe2", piped), ("data2_expert4", control)):
            runs[name] = dict(train(cfg, Path(tmp) / name, progress=False)["train_losses"])
            log(f"  {name}: final loss {runs[name][steps]:.4f}")
        train(piped, Path(tmp) / "resumed", progress=False, max_steps=steps // 2)
        resumed = dict(train(plain, Path(tmp) / "resumed", resume=True,
                             progress=False)["train_losses"])

    def worst(a, b):
        return max(abs(a[s] - b[s]) / abs(b[s]) for s in set(a) & set(b))

    result = {"steps": steps, "pipe1": runs["pipe1"], "pipe2": runs["pipe2"],
              "pipe2_then_pipe1": resumed,
              "data2_expert4": runs["data2_expert4"],
              "max_relative_pipe2_vs_pipe1": worst(runs["pipe2"], runs["pipe1"]),
              "max_relative_data2_expert4_vs_pipe1": worst(runs["data2_expert4"], runs["pipe1"]),
              "first_step_over_1e-5": {name: min((s for s in runs[name] if abs(
                  runs[name][s] - runs["pipe1"][s]) > 1e-5 * abs(runs["pipe1"][s])), default=None)
                  for name in ("pipe2", "data2_expert4")},
              "max_relative_resumed_vs_pipe2": worst(resumed, runs["pipe2"])}
    log(f"  pipe2 vs pipe1: max relative loss difference {result['max_relative_pipe2_vs_pipe1']:.1e} "
        f"(control data2_expert4 vs pipe1: {result['max_relative_data2_expert4_vs_pipe1']:.1e}; "
        f"first step over 1e-5: {result['first_step_over_1e-5']}); "
        f"pipe2 resumed on pipe1 vs pipe2: {result['max_relative_resumed_vs_pipe2']:.1e}")
    return result
