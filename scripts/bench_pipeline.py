"""Pipeline parallelism on 8 fake CPU devices: equality with one device, bubble, training.

    python scripts/bench_pipeline.py [--check] [--bubble 4,8] [--train-steps 50] [--rounds 5]
                                     [--out docs/bench_pipeline]

--check: loss, router losses, expert counts and gradients of GPipe, interleaved and uneven
GPipe stages (train.pipeline_layers_per_stage) on (pipe2, expert4), (pipe2, data2, expert2),
(pipe4, expert2) and (pipe2, fsdp2, expert2) against one device (DeepSeek-V3 in small: MLA,
MTP, a first dense layer, dropless).
--bubble: on (pipe4, expert2), the forward + backward of the pipelined MoE stack (8 layers)
with each schedule, timed against the same work with the p - 1 bubble ticks cut off, in
interleaved rounds; measured bubble = 1 - T(without bubble) / T(schedule), per round. The
fake devices share the CPU, so a bubble tick costs what a useful one does (on accelerators it
would be idle time of the same length). Also XLA's per-device memory analysis of each step.
--train-steps: the tiny preset (1 dense + 4 MoE layers) trained on (pipe2, expert4) and on
(expert8), and a pipe2 run stopped half way and resumed on expert8.
Results: OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
if importlib.util.find_spec("moejax") is None:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax

jax.config.update("jax_default_matmul_precision", "highest")  # f32 equality at 1e-5

from moejax.tools import bench, bench_pipeline


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--bubble", default="", help="comma-separated microbatch counts")
    parser.add_argument("--train-steps", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="docs/bench_pipeline")
    return parser.parse_args(argv)


def markdown(results: dict, command: str) -> str:
    lines = ["# Pipeline parallelism (scripts/bench_pipeline.py)", "",
             (f"Command: `{command}` ({results['date']}, jax {jax.__version__}, 8 fake CPU "
              "devices on a shared 2-core machine; load average "
              f"{results['load_average_start']:.1f} at the start, "
              f"{results['load_average_end']:.1f} at the end"
              f"{': timings provisional' if results['load_average_start'] > 1 else ''})."), ""]
    if "check" in results:
        lines += ["## Equality with one device (max relative error)", "",
                  "| schedule | mesh | microbatches | loss | router losses | grads | expert counts |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['schedule']} | {r['mesh']} | {r['microbatches']} | {r['loss']:.1e} | "
                  f"{r['router_losses']:.1e} | {r['grads']:.1e} | "
                  f"{'equal' if r['expert_counts_equal'] else 'DIFFER'} |" for r in results["check"]]
        lines.append("")
    if "bubble" in results:
        lines += ["## Bubble, (pipe4, expert2), 8 MoE layers", "",
                  ("| schedule | v | m | theory (p-1)/(mv+p-1) | measured median [min, max] | "
                   "step s | temp MiB per device |"), "|---|---|---|---|---|---|---|"]
        for r in results["bubble"]:
            m = r["measured"]
            lines.append(
                f"| {r['schedule']} | {r['virtual_stages']} | {r['microbatches']} | "
                f"{r['theory']:.3f} | {m['median']:.3f} [{m['min']:.3f}, {m['max']:.3f}] | "
                f"{r['step_seconds']['median']:.2f} | {bench.mib(r['memory']['temp']):.1f} |")
        lines.append("")
    if "training" in results:
        t = results["training"]
        first = t["first_step_over_1e-5"]
        lines += [f"## Training, {t['steps']} steps", "",
                  (f"- (pipe2, expert4) vs (expert8), per step: max relative loss difference "
                   f"{t['max_relative_pipe2_vs_pipe1']:.1e} (first step over 1e-5: "
                   f"{first['pipe2']})"),
                  (f"- control without a pipeline, (data2, expert4) vs (expert8): "
                   f"{t['max_relative_data2_expert4_vs_pipe1']:.1e} (first step over 1e-5: "
                   f"{first['data2_expert4']})"),
                  (f"- pipe2 stopped at step {t['steps'] // 2} and resumed on (expert8) vs the "
                   f"straight pipe2 run: {t['max_relative_resumed_vs_pipe2']:.1e}"), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    results = {"date": datetime.date.today().isoformat(), "jax": jax.__version__,
               "load_average_start": os.getloadavg()[0]}
    if args.check:
        print("equality with one device:")
        results["check"] = bench_pipeline.equality_matrix()
    if args.bubble:
        print("bubble:")
        counts = [int(m) for m in args.bubble.split(",")]
        results["bubble"] = bench_pipeline.bubble(counts, args.rounds)
    if args.train_steps:
        print("training:")
        results["training"] = bench_pipeline.training_comparison(args.train_steps)
    results["load_average_end"] = os.getloadavg()[0]
    command = "python scripts/bench_pipeline.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(markdown(results, command.strip()))
    print(f"wrote {out}.json and {out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
