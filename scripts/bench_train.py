"""Train-step throughput and held-out loss of the default model (configs/tiny.yaml, what
`python scripts/train.py` runs) with its dropless MoE dispatch against other dispatch modes,
in one process.

    python scripts/train.py                          # the run this script stands in for
    python scripts/bench_train.py [--steps 100] [--seeds 0,1,2] [--quick] [--json PATH]

Systems: the preset as it is (moe.dispatch=dropless), `moe.dispatch=capacity
moe.capacity_factor=null` (worst-case buffers of all N tokens per expert: what "dropless" meant
before the dropless dispatch), and capacity 1.0 (drops; information only). For each seed, every
system starts from the same initial parameters (train.seed) and reads the same batches, with
train.steps=--steps (the learning-rate schedule completes); the steps run in interleaved blocks
(each round runs --block steps of every system, order rotated per round; batches are fetched
before the clock starts, compilation happens before the first round), and the tokens/s ratio is
taken per round against the same round. After the last step, the held-out loss is measured the
way `moejax.train` reports it (train.eval_batches batches of the validation split).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import sys
from pathlib import Path

if importlib.util.find_spec("moejax") is None:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax

import moejax
from moejax.tools import bench
from moejax.training import host_memory

PRESET = "tiny"  # the default of scripts/train.py
SYSTEMS = {
    "dropless (preset)": [],
    "capacity null (old dropless)": ["moe.dispatch=capacity", "moe.capacity_factor=null"],
    "capacity 1.0 (drops)": ["moe.dispatch=capacity", "moe.capacity_factor=1.0"],
}
DROPLESS, NULL = "dropless (preset)", "capacity null (old dropless)"
TARGET_SPEEDUP = 1.5  # dropless tokens/s over capacity null


def run_seed(seed: int, args) -> dict:
    runs = {}
    for label, overrides in SYSTEMS.items():
        if args.quick and label not in (DROPLESS, NULL):
            continue
        cfg = moejax.load_config(PRESET, [*overrides, f"train.steps={args.steps}",
                                          f"train.seed={seed}"])
        print(f"  seed {seed}: preparing {label}", flush=True)
        runs[label] = bench.prepare_train_run(cfg, seed)
    times = bench.interleaved_training(runs, args.steps // args.block, args.block, log=print)
    tokens = {label: args.block * run.tokens_per_step for label, run in runs.items()}
    return {
        "seed": seed,
        "tokens_per_s_all": {label: [tokens[label] / t for t in ts] for label, ts in times.items()},
        "speedup_all": {label: bench.round_ratios(times[label], times[DROPLESS])
                        for label in times if label != DROPLESS},
        "held_out": {label: bench.held_out_loss(run) for label, run in runs.items()},
    }


def summarise(results: list[dict]) -> dict:
    labels = list(results[0]["held_out"])
    summary = {}
    for label in labels:
        tps = [v for r in results for v in r["tokens_per_s_all"][label]]
        losses = [r["held_out"][label] for r in results]
        summary[label] = {
            "tokens_per_s": statistics.median(tps),
            "held_out_mean": statistics.mean(losses),
            "held_out_seed_spread": max(losses) - min(losses),
            "held_out": losses,
        }
        if label != DROPLESS:
            summary[label]["dropless_speedup"] = bench.per_round_summary(
                [v for r in results for v in r["speedup_all"][label]])
            summary[label]["held_out_minus_dropless"] = [
                r["held_out"][label] - r["held_out"][DROPLESS] for r in results]
    return summary


def table(summary: dict) -> str:
    lines = [("| dispatch | tokens/s (median block) | dropless speed over it (per round) "
             "| held-out loss per seed | mean | seed spread (max - min) |"),
             "|---|---|---|---|---|---|"]
    for label, s in summary.items():
        speed = s.get("dropless_speedup")
        speed = "-" if speed is None else (f"{speed['median']:.2f}x [{speed['min']:.2f}-"
                                           f"{speed['max']:.2f}], n={speed['n']}")
        losses = ", ".join(f"{v:.4f}" for v in s["held_out"])
        lines.append(f"| {label} | {s['tokens_per_s']:,.0f} | {speed} | {losses} "
                     f"| {s['held_out_mean']:.4f} | {s['held_out_seed_spread']:.4f} |")
    return "\n".join(lines)


def targets(summary: dict) -> list[str]:
    null, dropless = summary[NULL], summary[DROPLESS]
    s = null["dropless_speedup"]
    lines = [(f"dropless tokens/s over capacity null {s['median']:.2f}x [{s['min']:.2f}-"
             f"{s['max']:.2f}] (target >= {TARGET_SPEEDUP}x): "
             f"{'met' if s['median'] >= TARGET_SPEEDUP else 'MISSED'}")]
    gap = dropless["held_out_mean"] - null["held_out_mean"]
    seeds = len(dropless["held_out"])
    if seeds > 1:
        spread = max(dropless["held_out_seed_spread"], null["held_out_seed_spread"])
        lines.append(f"held-out loss, mean over {seeds} seeds: dropless - capacity null = "
                     f"{gap:+.4f} nats/token, seed-to-seed spread up to {spread:.4f}: "
                     f"{'within' if abs(gap) <= spread else 'OUTSIDE'} the spread")
    else:
        lines.append(f"held-out loss: dropless - capacity null = {gap:+.4f} nats/token "
                     "(one seed: no spread to compare with)")
    return lines


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100,
                        help="train steps per system and seed (train.steps; default 100)")
    parser.add_argument("--block", type=int, default=10,
                        help="steps per system per round (default 10)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated train.seed values")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: dropless and capacity null, seed 0, 10 steps")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this path")
    args = parser.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if args.quick:
        args.steps, args.block, args.seeds = 10, 5, [0]
    if args.steps % args.block:
        parser.error(f"--steps {args.steps} must be a multiple of --block {args.block}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    memory = host_memory.apply("auto")  # as train.py does, before jax starts
    cfg = moejax.load_config(PRESET, [])
    header = (f"{datetime.date.today()}, {platform.node() or 'host'}: {bench.cpu_threads()} cores "
              f"({jax.devices()[0].device_kind}, {jax.device_count()} device), jax "
              f"{jax.__version__}, load average {os.getloadavg()[0]:.1f} at start; {memory}")
    print(header, flush=True)
    print(f"configs/{PRESET}.yaml: {cfg.model.num_layers} layers, d_model {cfg.model.d_model}, "
          f"E {cfg.moe.num_experts}, k {cfg.moe.top_k}, batch {cfg.train.global_batch_size} x "
          f"{cfg.train.seq_len} tokens, {cfg.precision.compute_dtype}; {args.steps} steps per "
          f"system and seed, blocks of {args.block}, seeds {args.seeds}", flush=True)
    results = [run_seed(seed, args) for seed in args.seeds]
    summary = summarise(results)
    print()
    print(table(summary))
    print()
    lines = targets(summary)
    print("Targets:")
    for line in lines:
        print("  " + line)
    if args.json:
        record = {"header": header,
                  "command": " ".join(["python", "scripts/bench_train.py", *(argv or sys.argv[1:])]),
                  "steps": args.steps, "block": args.block, "seeds": args.seeds,
                  "systems": SYSTEMS, "results": results, "summary": summary, "targets": lines}
        args.json.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
