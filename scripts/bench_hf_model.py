"""Whole-model train step: moejax against Hugging Face transformers' DeepseekV3ForCausalLM,
tokens/s on the same tiny DeepSeek-shaped model, weights and batches, in one process.

    python scripts/bench_hf_model.py                        # 6 rounds of 10 steps per system
    python scripts/bench_hf_model.py --rounds 8 --json docs/bench_hf_model.json
    python scripts/bench_hf_model.py --quick --busy-ok      # smoke test: 2 rounds of 2 steps

moejax: configs/tiny_deepseek_v3.yaml with model.mtp_depth=0 (MLA, group-limited sigmoid
routing, a shared expert, a dense first layer, dropless MoE, float32), the trainer's own step
(training.run.build_run, as `moejax.train`). HF: DeepseekV3ForCausalLM of the same shape,
built by moejax's converter (moejax.convert.save_hf, then from_pretrained) from moejax's
initial weights, at transformers' defaults (grouped_mm experts, sdpa attention) and torch's
own thread count; AdamW with moejax's hyperparameters and learning-rate schedule, global-norm
clipping. Both start from the same weights (their initial cross-entropy on one batch must
agree to 1e-4) and read the same batches.

Measured (moejax/tools/bench_hf_model.py):
- tokens/s in interleaved blocks: each round runs --block steps of each system on the same
  batches (placed before the clock starts), order rotated per round; the moejax / HF ratio is
  taken per round and reported as median [min-max] over the rounds (target >= 1.25x);
- the first step (trace, lower, compile, run) of the default preset (configs/tiny.yaml, what
  `python scripts/train.py` runs; target < 5 s) and of the DeepSeek-shaped config, each
  compiled fresh in this process, and HF's first step; the default preset's again in two new
  processes, a launch and a relaunch sharing the trainer's persistent compilation cache
  (train.compilation_cache), as relaunching or resuming `python scripts/train.py` finds it;
- where a step's time goes: moejax's ops from a jax.profiler trace, mapped to attention, MoE,
  dense FFN, embedding/head/loss, optimizer and other through the compiled HLO's stack frames,
  plus host overhead (wall - op-busy time); HF's by module hooks.

The 1-minute load average is recorded at start and end. With --json and a load above 1.0 at
start, the script refuses (exit 2) unless --busy-ok, which marks the record provisional (as a
load above 1.0 at the end does). Mind the load: torch's OpenMP threads slow down far more than
XLA's when another process takes a core (HF's step ranged 0.23-5.9 s beside another
benchmark, moejax's 0.4-0.8 s), which flatters moejax.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

if importlib.util.find_spec("moejax") is None:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moejax.tools import bench
from moejax.tools import bench_hf_model as tool


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds (default 6)")
    parser.add_argument("--block", type=int, default=10,
                        help="steps per system per round (default 10)")
    parser.add_argument("--profile-steps", type=int, default=5,
                        help="steps profiled per system for the breakdown (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="train.seed: weights and batches")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 2 rounds of 2 steps, 2 profiled steps")
    parser.add_argument("--json", type=Path, help="also write the record as JSON to this path")
    parser.add_argument("--busy-ok", action="store_true",
                        help="write --json even when the load average is above 1.0 at start "
                             "(the record is marked provisional)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.block, args.profile_steps = 2, 2, 2
    if min(args.rounds, args.block, args.profile_steps) < 1:
        parser.error("--rounds, --block and --profile-steps must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    load = bench.load_average()
    reason = bench.record_refusal(args.json, args.rounds, args.quick, args.busy_ok, load)
    if reason:
        print(f"bench_hf_model: {reason}", file=sys.stderr)
        return 2
    options = tool.Options(rounds=args.rounds, block=args.block,
                           profile_steps=args.profile_steps, seed=args.seed, quick=args.quick)
    record = tool.run_benchmark(options)
    end = record["load_end"]
    record["provisional"] = [why for why, on in (
        (f"load {load or 0:.2f} > {bench.BUSY_LOAD} at start",
         load is not None and load > bench.BUSY_LOAD),
        (f"load {end or 0:.2f} > {bench.BUSY_LOAD} at end",
         end is not None and end > bench.BUSY_LOAD),
        ("--quick", args.quick)) if on]
    record["command"] = " ".join(["python", "scripts/bench_hf_model.py",
                                  *(sys.argv[1:] if argv is None else argv)])
    print()
    print(tool.report(record))
    if args.json:
        args.json.write_text(json.dumps(record, indent=1) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
