"""Benchmark building blocks for moejax.tools.bench_moe and scripts/bench_train.py.

The machine these run on is shared and noisy (its load changes by 2-3x within a run), so every
comparison is made inside one process with the compared systems interleaved: each round times
every system once (in an order rotated by one per round), and a ratio between two systems is
taken per round, against the same round, then summarised by its median and spread.

- `interleaved_rounds`, `round_ratios`, `spread`: the timing protocol.
- `LayerShape`, `useful_flops`, `layer_config`, `moe_layer_step`: one moejax MoE layer,
  forward + backward, compiled once, with its XLA memory analysis.
- `moe_layer_overlap`: that layer on a mesh, compiled with moe.overlap_halves off and on: the
  GEMMs independent of each all-to-all and where the schedule put them, and the step time.
- `hf_moe_step`: the same layer as Hugging Face's `DeepseekV3MoE` (torch), same weights, at
  torch's default threads (`torch_default_threads`) or pinned to a thread count.
- `load_average`, `record_refusal`: the machine's 1-minute load average, recorded at the start
  and end of a run, and when a benchmark refuses to write a record (busy, too few rounds).
- `dropless_buffer_bytes`: the bytes of the dropless layer's static buffer bounds
  (`moejax.model.dispatch.dropless.static_rows`), as arithmetic.
- `prepare_train_run`, `interleaved_training`, `held_out_loss`: whole-model train steps of
  several configs in one process, timed in interleaved blocks (compilation not timed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import statistics
import time
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from moejax import params as P
from moejax.config import Config, load_config
from moejax.model.dispatch.dropless import static_rows
from moejax.training.run import Run, build_run

__all__ = [
    "BATCH",
    "FLOP_FORMULA",
    "LAYER_SHAPES",
    "BenchRun",
    "LayerShape",
    "LayerStep",
    "cpu_threads",
    "dropless_buffer_bytes",
    "held_out_loss",
    "hf_moe_step",
    "in_peak_units",
    "interleaved_rounds",
    "interleaved_training",
    "layer_config",
    "load_average",
    "matmul_peak",
    "memory_stats",
    "mib",
    "moe_layer_overlap",
    "moe_layer_step",
    "per_round_summary",
    "prepare_train_run",
    "record_refusal",
    "round_ratios",
    "seconds",
    "timed",
    "torch_available",
    "torch_default_threads",
    "torch_matmul",
    "train_block",
    "useful_flops",
]

MIB = 2.0**20


# ---------------------------------------------------------------------------------------------
# Timing protocol


def seconds(run: Callable) -> float:
    """Wall time of one call, waiting for any jax arrays it returns."""
    started = time.perf_counter()
    jax.block_until_ready(run())
    return time.perf_counter() - started


def interleaved_rounds(runs: dict[str, Callable], rounds: int, peak: Callable | None = None,
                       max_rounds: dict[str, int] | None = None, log: Callable | None = None):
    """Time each (warmed-up) zero-argument callable once per round, `rounds` rounds.

    The order within a round rotates by one each round, so that slow phases of the machine's
    load fall on every system alike. With `peak` (e.g. a large matmul), it runs just before
    every timed call, so that a step can be put in units of a peak measured seconds earlier.
    `max_rounds[name]` runs a slow system in the first n rounds only (None in the others).
    Returns ({name: [seconds or None per round]}, {name: [seconds of the paired peak]})."""
    names = list(runs)
    times = {name: [None] * rounds for name in names}
    peaks = {name: [None] * rounds for name in names}
    for round_ in range(rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            if max_rounds and round_ >= max_rounds.get(name, rounds):
                continue
            if peak is not None:
                peaks[name][round_] = seconds(peak)
            times[name][round_] = seconds(runs[name])
        if log:
            log(f"  round {round_ + 1}/{rounds}: " + ", ".join(
                f"{name} {times[name][round_]:.2f}s" for name in names
                if times[name][round_] is not None))
    return times, peaks


def round_ratios(numerator: list, denominator: list) -> list[float]:
    """numerator[r] / denominator[r] for the rounds that timed both."""
    return [a / b for a, b in zip(numerator, denominator) if a is not None and b is not None]


def per_round_summary(values: list[float]) -> dict:
    """Median, min and max of per-round values (None when there are none)."""
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0, "all": []}
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values), "all": list(values)}


def timed(values: list) -> list[float]:
    return [v for v in values if v is not None]


# ---------------------------------------------------------------------------------------------
# One moejax MoE layer


@dataclasses.dataclass(frozen=True)
class LayerShape:
    name: str
    d_model: int
    ffn_dim: int  # F of one routed expert
    num_experts: int
    top_k: int
    tokens: int  # T, as BATCH sequences of tokens / BATCH
    num_groups: int = 1  # group-limited routing: G expert groups (moe.num_groups)
    topk_groups: int = 1  # groups kept per token (moe.topk_groups)

    def label(self) -> str:
        groups = (f", top-{self.topk_groups} of {self.num_groups} groups"
                  if self.num_groups > 1 else "")
        return (f"{self.name} (D {self.d_model}, F {self.ffn_dim}, E {self.num_experts}, "
                f"k {self.top_k}{groups}, T {self.tokens})")


BATCH = 8  # sequences; T / BATCH tokens each
# scripts/bench_moe.py's layer shapes (also scripts/check_gpu.py's coarse and fine-grained).
# DeepSeek-shaped: DeepSeek-V3's proportions (E 256, k 8, F = D / 3.5: 2048 / 7168) and its
# group-limited routing (n_group 8, topk_group 4), at a width this CPU can time.
LAYER_SHAPES = (LayerShape("coarse", 512, 1024, 16, 2, 8192),
                LayerShape("fine-grained", 512, 256, 64, 8, 8192),
                LayerShape("E=128", 256, 128, 128, 8, 4096),
                LayerShape("DeepSeek-shaped", 448, 128, 256, 8, 4096, num_groups=8,
                           topk_groups=4))
FLOP_FORMULA = ("useful FLOPs = 3 (fwd+bwd) x [2 T k x 3 D F (the k active experts' matmuls) "
                "+ 2 T D E (router)]")


def useful_flops(shape: LayerShape) -> float:
    """FLOPs of one fwd+bwd step that a perfect implementation would do (see FLOP_FORMULA)."""
    d, f, e, k, t = shape.d_model, shape.ffn_dim, shape.num_experts, shape.top_k, shape.tokens
    return 3.0 * (2 * t * k * 3 * d * f + 2 * t * d * e)


def layer_config(shape: LayerShape, dispatch: str, capacity_factor: float | None = None,
                 tile_rows: int | None = None, devices: int = 1,
                 kernels: str | None = None) -> Config:
    """The default config (deepseek router) with this layer shape and its expert groups, no
    shared experts, float32 compute, every one of `devices` devices on the expert axis;
    dispatch dropless | capacity | dense; `kernels`: moe.kernels (None: the config's auto)."""
    overrides = [
        f"model.d_model={shape.d_model}", f"moe.expert_ffn_dim={shape.ffn_dim}",
        f"moe.num_experts={shape.num_experts}", f"moe.top_k={shape.top_k}",
        f"moe.num_groups={shape.num_groups}", f"moe.topk_groups={shape.topk_groups}",
        "moe.num_shared_experts=0", f"moe.dispatch={dispatch}",
        f"moe.capacity_factor={'null' if capacity_factor is None else capacity_factor}",
        "precision.compute_dtype=float32", f"train.seq_len={shape.tokens // BATCH}",
        f"train.global_batch_size={BATCH}", "mesh.data=1", "mesh.fsdp=1", f"mesh.expert={devices}",
    ]
    if tile_rows is not None:
        overrides.append(f"moe.tile_rows={tile_rows}")
    if kernels is not None:
        overrides.append(f"moe.kernels={kernels}")
    return load_config(None, overrides, num_devices=devices)


def memory_stats(compiled) -> dict:
    """XLA's memory analysis of a compiled executable, in bytes. `total` = argument + output +
    temp - alias: every buffer the executable holds at once, at most (XLA:CPU reports no
    separate peak); `temp` is the executable's own workspace: activations, residuals for the
    backward, intermediate gradients."""
    m = compiled.memory_analysis()
    stats = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
             "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes}
    stats["total"] = stats["argument"] + stats["output"] + stats["temp"] - stats["alias"]
    peak = getattr(m, "peak_memory_in_bytes", 0)
    if peak:
        stats["peak_reported"] = peak
    return stats


@dataclasses.dataclass
class LayerStep:
    run: Callable  # zero-argument: one fwd+bwd step
    memory: dict  # memory_stats of the compiled step
    stats: dict  # the layer's statistics from the warm-up step (floats)
    params: object  # the layer's parameters (moejax MoE pytree)
    x: jax.Array  # [BATCH, T / BATCH, D]


def moe_layer_step(cfg: Config, seed: int = 0, mesh=None) -> LayerStep:
    """One MoE layer (`moe_ffn`, router included), jitted value_and_grad of sum(y^2) w.r.t. its
    params and input, compiled once (ahead of time, so that the memory analysis and the timed
    calls are the same executable) and run once to warm up. With a mesh the weights are
    sharded by their logical axes and the tokens over the batch axes (memory then per device)."""
    from jax.sharding import NamedSharding, PartitionSpec

    from moejax.model.moe import moe_ffn, moe_specs
    from moejax.sharding import BATCH_AXES

    keep = ("dropped_fraction", "padding_overhead", "exchange_fill")

    def loss(params, x, bias, temperature):
        y, stats = moe_ffn(params, x, bias, temperature, cfg)
        return jnp.sum(jnp.square(y)), {k: v for k, v in stats.items() if k in keep}

    specs = moe_specs(cfg)
    params = P.init(specs, jax.random.key(seed))
    x = jax.random.normal(jax.random.key(seed + 1),
                          (cfg.train.global_batch_size, cfg.train.seq_len, cfg.model.d_model))
    args = (params, x, jnp.zeros(cfg.moe.num_experts, jnp.float32), jnp.float32(1.0))
    if mesh is not None:
        args = (jax.device_put(params, P.shardings(specs, mesh)),
                jax.device_put(x, NamedSharding(mesh, PartitionSpec(BATCH_AXES))),
                *jax.device_put(args[2:], NamedSharding(mesh, PartitionSpec())))
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        compiled = step.lower(*args).compile()
        (_, stats), _ = jax.block_until_ready(compiled(*args))
    return LayerStep(lambda: compiled(*args), memory_stats(compiled),
                     {k: float(v) for k, v in stats.items()}, params, x)


def moe_layer_overlap(cfg: Config, mesh, rounds: int = 5) -> dict:
    """The MoE layer's forward + backward (value_and_grad of sum(y^2)) compiled on `mesh` with
    moe.overlap_halves off and on: per all-to-all, the GEMM-carrying instructions independent of
    it and where the schedule put them (hlo_stats.collective_overlap), and the step time over
    interleaved rounds (on XLA:CPU, whose collectives are synchronous: the cost of halving,
    not the gain of overlap)."""
    from jax.sharding import NamedSharding, PartitionSpec

    from moejax import sharding
    from moejax.model.moe import moe_ffn, moe_specs
    from moejax.tools import hlo_stats

    specs = moe_specs(cfg)
    params = P.init(specs, jax.random.key(0), mesh)
    x = jax.device_put(
        jax.random.normal(jax.random.key(1), (cfg.train.global_batch_size, cfg.train.seq_len,
                                              cfg.model.d_model)), sharding.batch_sharding(mesh))
    bias = jax.device_put(jnp.zeros(cfg.moe.num_experts), NamedSharding(mesh, PartitionSpec()))
    result, runs = {}, {}
    for on in (False, True):
        variant = cfg.replace(moe=dataclasses.replace(cfg.moe, overlap_halves=on))

        def loss(p, x_, c=variant):
            return jnp.sum(jnp.square(moe_ffn(p, x_, bias, 1.0, c)[0]))

        with jax.set_mesh(mesh):
            compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(params, x).compile()
        windows = hlo_stats.collective_overlap(compiled.as_text())
        name = "halves" if on else "whole"
        result[name] = {"all_to_alls": len(windows),
                        "independent_gemms": [w["independent"] for w in windows],
                        "scheduled_before": [w["before"] for w in windows],
                        "scheduled_after": [w["after"] for w in windows]}
        jax.block_until_ready(compiled(params, x))
        runs[name] = functools.partial(compiled, params, x)
    times, _ = interleaved_rounds(runs, rounds)
    for name in runs:
        result[name]["seconds"] = per_round_summary(timed(times[name]))
    return result


def matmul_peak(size: int) -> tuple[Callable, float]:
    """A zero-argument size^3 float32 XLA matmul (compiled, warmed up) and its FLOPs."""
    a = jax.random.normal(jax.random.key(2), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(3), (size, size), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    jax.block_until_ready(matmul(a, b))
    return (lambda: matmul(a, b)), 2.0 * size**3


def in_peak_units(times: list, peak_times: list) -> list[float]:
    """Each step's time over the time of the peak matmul run just before it."""
    return round_ratios(times, peak_times)


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers' DeepseekV3MoE (torch), the same layer


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def cpu_threads() -> int:
    """The cores this process may run on (XLA:CPU uses as many)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@functools.cache
def torch_default_threads() -> int:
    """torch's intra-op thread count as torch chose it (OMP_NUM_THREADS, else the physical
    cores), read once and kept: the first call must come before any torch.set_num_threads in
    this process (moejax.tools.bench_moe.run calls it first)."""
    import torch

    return torch.get_num_threads()


def load_average() -> float | None:
    """The machine's 1-minute load average (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


BUSY_LOAD = 1.0  # 1-minute load average at the start above which figures are provisional
MIN_ROUNDS = 5  # interleaved rounds a --json record needs (--quick aside)


def record_refusal(json_path, rounds: int, quick: bool, busy_ok: bool,
                   load: float | None) -> str | None:
    """Why a benchmark must not start (one line), or None: a --json record from a busy machine
    (load above BUSY_LOAD at the start) without --busy-ok, from fewer than MIN_ROUNDS rounds,
    or from --quick into docs/. Without --json nothing is refused."""
    if not json_path:
        return None
    if quick and "docs" in json_path.resolve().parts:
        return f"--quick never writes into docs/ ({json_path}): drop --quick or --json"
    if rounds < MIN_ROUNDS and not quick:
        return f"--rounds {rounds}: a --json record needs --rounds >= {MIN_ROUNDS}"
    if load is not None and load > BUSY_LOAD and not busy_ok:
        return (f"machine busy: 1-minute load {load:.2f} > {BUSY_LOAD} at start; wait for it, "
                "or pass --busy-ok to run anyway and mark the record provisional")
    return None


def hf_moe_step(shape: LayerShape, implementation: str, layer: LayerStep,
                threads: int | None = None) -> Callable:
    """A zero-argument fwd+bwd step (sum(y^2), gradients w.r.t. every weight and the input) of
    transformers' `DeepseekV3MoE` with this shape, float32, no shared experts, the shape's
    expert groups (n_group, topk_group), `experts_implementation` = implementation
    ("grouped_mm" or "eager"), carrying the weights of the moejax layer (so both route every
    token alike; zero e_score_correction_bias, as moejax's zero bias).

    The experts module dispatches on `config._experts_implementation` at each call
    (transformers.integrations.moe.use_experts_implementation); a PreTrainedModel resolves
    None to "grouped_mm" (`get_correct_experts_implementation`), so grouped_mm is what
    `DeepseekV3ForCausalLM` runs by default. On CPU with torch >= 2.10 grouped_mm is
    torch.nn.functional.grouped_mm; "eager" is the per-expert loop with index_add_.
    Each call sets torch's intra-op threads to `threads`, or with None back to torch's default
    (`torch_default_threads`), so a pinned step timed before it leaves no trace. The step
    carries `.module` and `.x` (the torch input) for checks."""
    import torch
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    threads = threads or torch_default_threads()
    config = DeepseekV3Config(
        hidden_size=shape.d_model, moe_intermediate_size=shape.ffn_dim,
        n_routed_experts=shape.num_experts, num_experts_per_tok=shape.top_k,
        n_shared_experts=0, n_group=shape.num_groups, topk_group=shape.topk_groups,
        norm_topk_prob=True,
        routed_scaling_factor=1.0, hidden_act="silu", experts_implementation=implementation)
    if config._experts_implementation != implementation:
        raise RuntimeError(f"transformers did not take experts_implementation={implementation!r}")
    with warnings.catch_warnings():  # the zero-width shared expert warns on its init
        warnings.simplefilter("ignore")
        module = DeepseekV3MoE(config).float()
    p = jax.device_get(layer.params)
    swap = (0, 2, 1)
    with torch.no_grad():
        module.gate.weight.copy_(torch.from_numpy(np.ascontiguousarray(p.router.T)))
        gate_up = np.concatenate([p.w_gate.transpose(swap), p.w_up.transpose(swap)], axis=1)
        module.experts.gate_up_proj.copy_(torch.from_numpy(np.ascontiguousarray(gate_up)))
        module.experts.down_proj.copy_(
            torch.from_numpy(np.ascontiguousarray(p.w_down.transpose(swap))))
    x = torch.from_numpy(np.array(layer.x)).requires_grad_()
    weights = [w for w in module.parameters() if w.requires_grad]

    def step():
        torch.set_num_threads(threads)
        for w in (*weights, x):
            w.grad = None
        y = module(x)
        loss = torch.sum(y * y)
        loss.backward()

    step()  # warm-up
    step.module, step.x = module, x
    return step


def torch_matmul(size: int, threads: int | None = None) -> tuple[Callable, float]:
    """A zero-argument size^3 float32 torch matmul (torch's own peak) and its FLOPs, at
    `threads` or (None) torch's default threads."""
    import torch

    threads = threads or torch_default_threads()
    a, b = torch.randn(size, size), torch.randn(size, size)

    def run():
        torch.set_num_threads(threads)
        torch.mm(a, b)

    run()
    return run, 2.0 * size**3


# ---------------------------------------------------------------------------------------------
# Dropless buffer bounds, by arithmetic


def dropless_buffer_bytes(tokens_per_device: int, d_model: int, ffn_dim: int, num_experts: int,
                          top_k: int, expert_shards: int, tile: int, bytes_per_value: int) -> dict:
    """Bytes of the dropless layer's main activation buffers on one device, from its static
    row bounds (`dropless.static_rows`: exchange rows P N_, sorted rows R, combine rows M):
    the exchange's send and receive buffers [P N_, D], out and back; the grouped SwiGLU's input
    and output [R, D] and its two pre-activations [R, F], kept for the backward; the combine's
    [M, D]. `useful` is the mean case: N_ k assignments of [D] in, [F] x 2 and [D] out."""
    n = tokens_per_device
    rows = static_rows(n, num_experts, top_k, expert_shards, tile)
    values = {
        "exchange (send + receive, out and back)": 4 * rows.exchange_rows * d_model,
        "sorted buffer in + out [R, D] x 2": 2 * rows.sorted_rows * d_model,
        "pre-activations [R, F] x 2": 2 * rows.sorted_rows * ffn_dim,
        "combine [M, D]": rows.combine_rows * d_model,
    }
    useful = n * top_k * (2 * d_model + 2 * ffn_dim)
    out = {name: v * bytes_per_value for name, v in values.items()}
    return {"exchange_rows": rows.exchange_rows, "sorted_rows": rows.sorted_rows,
            "useful_rows": n * top_k, "bytes": out, "total_bytes": sum(out.values()),
            "useful_bytes": useful * bytes_per_value}


def mib(x: float) -> float:
    return x / MIB



# ---------------------------------------------------------------------------------------------
# Train steps of a whole model


@dataclasses.dataclass
class BenchRun:
    """A config's run (the trainer's own state and step, `training.run.build_run`) with the
    data `moejax.train` would feed it."""

    run: Run
    train_iter: object
    eval_batches: list
    corpus: object

    @property
    def tokens_per_step(self) -> int:
        return self.run.tokens_per_step


def prepare_train_run(cfg: Config, seed: int) -> BenchRun:
    """The state, data and step that `moejax.train` would use for `cfg` with train.seed=`seed`,
    the step compiled and run once on a copy of the state (so the run itself has taken no
    step). Runs that differ only in their seed share one compiled step (build_run's cache)."""
    from moejax import data as data_lib
    from moejax.data import load_corpus

    corpus = load_corpus(cfg)
    t = cfg.train
    run = build_run(cfg, key=jax.random.key(seed))
    train_iter = data_lib.make_train_iterator(
        corpus.train_tokens, seq_len=t.seq_len, global_batch_size=t.global_batch_size, seed=seed)
    eval_batches = data_lib.make_eval_batches(
        corpus.val_tokens, seq_len=t.seq_len, batch_size=t.global_batch_size,
        num_batches=t.eval_batches)
    example = run.global_batch(eval_batches[0]["tokens"])
    # one untimed execution, on a copy (the step donates its state): compilation, first-call costs
    with jax.set_mesh(run.mesh):
        jax.block_until_ready(run.step(jax.tree.map(jnp.copy, run.state), example))
    return BenchRun(run, train_iter, eval_batches, corpus)


def train_block(bench_run: BenchRun, steps: int) -> float:
    """Run `steps` train steps of `bench_run` (its next batches, fetched and placed before the
    clock starts); returns their wall time in seconds."""
    run = bench_run.run
    batches = [run.global_batch(next(bench_run.train_iter)["tokens"]) for _ in range(steps)]
    jax.block_until_ready(batches)
    started = time.perf_counter()
    with jax.set_mesh(run.mesh):
        for batch in batches:
            run.state, metrics = run.step(run.state, batch)
        jax.block_until_ready(metrics["loss"])
    return time.perf_counter() - started


def interleaved_training(runs: dict[str, BenchRun], rounds: int, block: int,
                         log: Callable | None = None) -> dict[str, list[float]]:
    """Each round runs `block` steps of every run, in an order rotated per round; returns the
    seconds of each block ({label: [seconds per round]})."""
    names = list(runs)
    times = {name: [] for name in names}
    for round_ in range(rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(train_block(runs[name], block))
        if log:
            log(f"  round {round_ + 1}/{rounds}: " + ", ".join(
                f"{name} {block * runs[name].tokens_per_step / times[name][-1]:,.0f} tok/s"
                for name in names))
    return times


def held_out_loss(bench_run: BenchRun) -> float:
    """Mean held-out cross-entropy (nats/token) of the run's current state, as moejax.train
    reports it."""
    from moejax.training.loop import evaluate

    run = bench_run.run
    with jax.set_mesh(run.mesh):
        return evaluate(run.cfg, run.mesh, run.state, bench_run.eval_batches, run.eval_step,
                        bench_run.corpus)["loss"]
