"""Forward+backward throughput of one MoE layer (`moe_ffn`) on CPU, against the machine's peak.

    python scripts/bench_moe.py [--repeats 5] [--quick] [--json PATH] [--devices 8]

One step is a jitted `jax.value_and_grad` of sum(y^2) w.r.t. the layer's params and its input
x [B, T, D], in float32 compute, router included, no shared experts. Shapes:
- coarse:         D=512, F=1024, E=16, k=2
- fine-grained:   D=512, F=256,  E=64, k=8 (DeepSeek-like)
both on 8 x 1024 tokens. Useful FLOPs count only the active experts and the router:
    3 (fwd + bwd) x [2 T k x 3 D F (three expert matmuls) + 2 T D E (router)]
useful GFLOP/s = useful FLOPs / median step time. The peak is a plain float32 matmul in the same
process, run just before every timed step, so that a row and its peak see the same load from
other work on the machine (CPU timings here are noisy: compare ratios, not absolute numbers).

The single-device rows run in this process; the rows on a (data=1, fsdp=1, expert=N) mesh of
fake CPU devices run in a child process (XLA_FLAGS must be set before jax starts). Those rows are
for information only: the N fake devices share the same cores, and capacity is per shard.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if importlib.util.find_spec("moejax") is None:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

import moejax
from moejax import params as P
from moejax.config import MeshConfig
from moejax.model.moe import moe_ffn, moe_specs
from moejax.sharding import BATCH_AXES

BATCH, SEQ, QUICK_SEQ = 8, 1024, 128  # T = BATCH x SEQ tokens
PEAK_SIZE, QUICK_PEAK_SIZE = 4096, 2048  # the peak is an n x n x n float32 matmul
FLOP_FORMULA = "useful FLOPs = 3 (fwd+bwd) x [2 T k x 3 D F (expert matmuls) + 2 T D E (router)]"
TARGETS = {"coarse": 0.50, "fine-grained": 0.40}  # useful / peak, capacity back-end, factor 1.0
TARGET_SPEEDUP = 5.0  # capacity over dense at E=16 (the coarse shape)


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    d_model: int
    ffn_dim: int  # F of one expert
    num_experts: int
    top_k: int


SHAPES = (Shape("coarse", 512, 1024, 16, 2), Shape("fine-grained", 512, 256, 64, 8))


@dataclasses.dataclass(frozen=True)
class Case:
    shape: Shape
    dispatch: str  # capacity | dense
    capacity_factor: float | None  # None for dense

    @property
    def backend(self) -> str:
        if self.dispatch == "dense":
            return "dense"
        return f"capacity {self.capacity_factor}"


def single_device_cases() -> list[Case]:
    coarse = SHAPES[0]
    cases = [Case(s, "capacity", cf) for s in SHAPES for cf in (1.0, 1.25)]
    return cases + [Case(coarse, "dense", None)]  # dense only at E=16: it computes all E experts


def mesh_cases() -> list[Case]:
    return [Case(s, "capacity", 1.0) for s in SHAPES]


def useful_flops(shape: Shape, tokens: int) -> float:
    """FLOPs of one fwd+bwd step that a perfect implementation would do (see FLOP_FORMULA)."""
    d, f, e, k = shape.d_model, shape.ffn_dim, shape.num_experts, shape.top_k
    return 3 * (2 * tokens * k * 3 * d * f + 2 * tokens * d * e)


def make_config(case: Case, seq: int, num_devices: int) -> moejax.Config:
    s = case.shape
    overrides = [
        f"model.d_model={s.d_model}",
        f"moe.expert_ffn_dim={s.ffn_dim}",
        f"moe.num_experts={s.num_experts}",
        f"moe.top_k={s.top_k}",
        "moe.num_shared_experts=0",
        f"moe.dispatch={case.dispatch}",
        f"moe.capacity_factor={'null' if case.capacity_factor is None else case.capacity_factor}",
        "precision.compute_dtype=float32",
        f"train.seq_len={seq}",
        f"train.global_batch_size={BATCH}",
        "mesh.data=1",
        "mesh.fsdp=1",
        "mesh.expert=-1",  # every device on the expert axis
    ]
    return moejax.load_config(None, overrides, num_devices=num_devices)


def make_step(cfg: moejax.Config):
    """Jitted (params, x, bias, temperature) -> ((loss, dropped fraction), (dparams, dx))."""

    def loss(params, x, bias, temperature):
        y, stats = moe_ffn(params, x, bias, temperature, cfg)  # matmuls: cfg.precision, float32
        return jnp.sum(jnp.square(y)), stats["dropped_fraction"]

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def make_inputs(cfg: moejax.Config, seq: int, mesh):
    """Params, x [B, T, D], router bias zeros [E] and temperature 1.0, placed on the mesh."""
    specs = moe_specs(cfg)
    params = P.init(specs, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (BATCH, seq, cfg.model.d_model), jnp.float32)
    bias, temperature = jnp.zeros(cfg.moe.num_experts, jnp.float32), jnp.float32(1.0)
    if mesh is not None:
        params = jax.device_put(params, P.shardings(specs, mesh))
        x = jax.device_put(x, NamedSharding(mesh, PartitionSpec(BATCH_AXES)))
        replicated = NamedSharding(mesh, PartitionSpec())
        bias, temperature = jax.device_put((bias, temperature), replicated)
    return params, x, bias, temperature


def make_peak(size: int, mesh):
    """A zero-argument callable running one size^3 float32 matmul, and its FLOPs.

    On a mesh the left operand's rows are split over every device (each multiplies its
    [size / N, size] block by the whole right operand), so the devices share the work; left
    replicated, as arrays made under `jax.set_mesh` are, every device would repeat all of it.
    """
    a = jax.random.normal(jax.random.key(2), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(3), (size, size), jnp.float32)
    if mesh is not None:
        a = jax.device_put(a, NamedSharding(mesh, PartitionSpec(BATCH_AXES, None)))
        b = jax.device_put(b, NamedSharding(mesh, PartitionSpec()))
    matmul = jax.jit(jnp.matmul)
    return (lambda: matmul(a, b)), 2 * size**3


def seconds(run) -> float:
    started = time.perf_counter()
    jax.block_until_ready(run())
    return time.perf_counter() - started


def measure(runs: dict[str, object], peak_run, repeats: int):
    """Seconds per call of each (already warmed-up) zero-argument callable, `repeats` each,
    and of the peak matmul run just before each of those calls.

    Interleaved: each round runs every callable once, in an order rotated by one per round, so
    that load from other work on the machine falls on every case alike; pairing each call with
    a peak measured seconds earlier makes their ratio see the same load.
    Returns ({label: [seconds]}, {label: [seconds of the paired peak matmuls]}).
    """
    names = list(runs)
    times = {name: [] for name in names}
    peak_times = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            peak_times[name].append(seconds(peak_run))
            times[name].append(seconds(runs[name]))
        print(f"  round {round_ + 1}/{repeats} done", flush=True)
    return times, peak_times


def expert_mesh(num_devices: int):
    """The (data=1, fsdp=1, expert=N) mesh, or None on one device."""
    if num_devices == 1:
        return None
    return moejax.make_mesh(MeshConfig(data=1, fsdp=1, expert=num_devices))


def prepare_case(case: Case, seq: int, num_devices: int, mesh):
    """A zero-argument step callable (compiled and warmed up) and its dropped fraction."""
    cfg = make_config(case, seq, num_devices)
    step, args = make_step(cfg), make_inputs(cfg, seq, mesh)
    (_, dropped), _ = jax.block_until_ready(step(*args))  # compile + warm-up, not timed
    return (lambda: step(*args)), float(dropped)


def run_cases(cases: list[Case], num_devices: int, seq: int, peak_size: int, repeats: int):
    """Table rows (dicts) for `cases` on `num_devices` devices, the peak measured alongside."""
    mesh = expert_mesh(num_devices)
    runs, dropped, case_of = {}, {}, {}
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        for case in cases:
            label = f"{case.shape.name} {case.backend}"
            print(f"  compiling + warm-up: {label}", flush=True)
            runs[label], dropped[label] = prepare_case(case, seq, num_devices, mesh)
            case_of[label] = case
        peak_run, peak_flops = make_peak(peak_size, mesh)
        jax.block_until_ready(peak_run())  # compile + warm-up
        times, peak_times = measure(runs, peak_run, repeats)
    return [
        table_row(case_of[label], seq, num_devices, times[label], peak_flops, peak_times[label],
                  dropped[label])
        for label in runs
    ]


def table_row(case: Case, seq: int, num_devices: int, times, peak_flops, peak_times, dropped):
    """One result as a flat dict (the JSON record); times in seconds, rates in FLOP/s.

    The load from other work changes by 2-3x within a run, so useful/peak is not the ratio of
    the two medians (which may come from different rounds) but the median over repeats of each
    step against the peak matmul run just before it: step time in units of that matmul's time.
    """
    step_s = statistics.median(times)
    flops = useful_flops(case.shape, BATCH * seq)
    in_peak_matmuls = statistics.median(t / p for t, p in zip(times, peak_times))
    s = case.shape
    return {
        "shape": s.name, "D": s.d_model, "F": s.ffn_dim, "E": s.num_experts, "k": s.top_k,
        "tokens": BATCH * seq,
        "backend": case.backend,
        "devices": num_devices,
        "ms_per_step": 1e3 * step_s,
        "ms_per_step_all": [1e3 * t for t in times],
        "peak_ms_all": [1e3 * t for t in peak_times],
        "useful_gflops": flops / step_s / 1e9,
        "peak_gflops": peak_flops / statistics.median(peak_times) / 1e9,
        "step_in_peak_matmuls": in_peak_matmuls,
        "ratio": flops / peak_flops / in_peak_matmuls,
        "dropped_fraction": dropped,
    }


def run_mesh_child(args, num_devices: int) -> list[dict]:
    """Re-run this script with `num_devices` fake CPU devices; returns the rows it measured."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={num_devices}"
    ).strip()
    with tempfile.TemporaryDirectory() as tmp:
        rows_path = Path(tmp) / "rows.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--repeats", str(args.repeats),
                   "--devices", str(num_devices), "--child-rows", str(rows_path)]
        if args.quick:
            command.append("--quick")
        subprocess.run(command, env=env, check=True)
        return json.loads(rows_path.read_text())


def markdown_table(rows: list[dict]) -> str:
    header = ("| shape (D, F, E, k) | back-end | devices | ms/step | useful GFLOP/s "
              "| peak GFLOP/s | useful/peak | dropped |")
    lines = [header, "|" + "---|" * 8]
    for r in rows:
        lines.append(
            f"| {r['shape']} ({r['D']}, {r['F']}, {r['E']}, {r['k']}) | {r['backend']} "
            f"| {r['devices']} | {r['ms_per_step']:.0f} | {r['useful_gflops']:.1f} "
            f"| {r['peak_gflops']:.1f} | {r['ratio']:.0%} | {r['dropped_fraction']:.1%} |"
        )
    return "\n".join(lines)


def notes(tokens: int, peak_size: int) -> list[str]:
    """What the table's columns mean, printed under it."""
    return [
        f"- {FLOP_FORMULA}, T = {tokens}",
        "- useful GFLOP/s = useful FLOPs / median step time (ms/step)",
        f"- peak = median {peak_size}^3 float32 matmul, run in this process before every timed step",
        "- useful/peak and capacity/dense speedup: median over repeats of each step against the",
        "  peak matmul run just before it (other work on the machine changes the load per round)",
        "- dropped = token copies over capacity (untrained router; per shard on the mesh)",
    ]


def find_row(rows, shape: str, backend: str, devices: int = 1) -> dict | None:
    key = (shape, backend, devices)
    return next((r for r in rows if (r["shape"], r["backend"], r["devices"]) == key), None)


def check_targets(rows: list[dict]) -> list[str]:
    """One line per target of the issue: measured value, target, met or missed."""
    lines = []
    for shape, target in TARGETS.items():
        row = find_row(rows, shape, "capacity 1.0")
        if row:
            verdict = "met" if row["ratio"] >= target else "MISSED"
            lines.append(f"{shape}: useful/peak {row['ratio']:.0%} (target >= {target:.0%}): {verdict}")
    capacity, dense = find_row(rows, "coarse", "capacity 1.0"), find_row(rows, "coarse", "dense")
    if capacity and dense:
        speedup = dense["step_in_peak_matmuls"] / capacity["step_in_peak_matmuls"]
        verdict = "met" if speedup >= TARGET_SPEEDUP else "MISSED"
        lines.append(f"coarse (E=16): capacity 1.0 is {speedup:.1f}x faster than dense "
                     f"(target >= {TARGET_SPEEDUP:g}x): {verdict}")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed steps per case, interleaved; the median is reported (default 5)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: {BATCH} x {QUICK_SEQ} tokens, {QUICK_PEAK_SIZE}^3 peak")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON to this path")
    parser.add_argument("--devices", type=int, default=8,
                        help="fake CPU devices for the expert-parallel rows; 1 skips them")
    parser.add_argument("--child-rows", type=Path, help=argparse.SUPPRESS)  # set by run_mesh_child
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seq = QUICK_SEQ if args.quick else SEQ
    peak_size = QUICK_PEAK_SIZE if args.quick else PEAK_SIZE
    if args.child_rows:  # we are the child: only the mesh rows, on the fake devices
        if jax.device_count() != args.devices:
            sys.exit(f"expected {args.devices} devices, found {jax.device_count()}: set XLA_FLAGS="
                     f"--xla_force_host_platform_device_count={args.devices} before jax starts.")
        rows = run_cases(mesh_cases(), args.devices, seq, peak_size, args.repeats)
        args.child_rows.write_text(json.dumps(rows))
        return 0
    print(f"{jax.device_count()} device(s): {jax.devices()[0].device_kind}; "
          f"tokens T = {BATCH} x {seq}; float32; {args.repeats} interleaved repeats", flush=True)
    rows = run_cases(single_device_cases(), 1, seq, peak_size, args.repeats)
    if args.devices > 1:
        print(f"expert-parallel rows: child process on {args.devices} fake devices", flush=True)
        rows += run_mesh_child(args, args.devices)
    print()
    print(markdown_table(rows))
    print()
    for line in notes(BATCH * seq, peak_size):
        print(line)
    print("Targets (single device):")
    for line in check_targets(rows):
        print("  " + line)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
