"""Train-step tokens/s of one preset in two (or more) checkouts of moejax, e.g. this one against
the commit before a speed change, on the same machine, interleaved.

    git archive fa9feeb | tar -x -C /tmp/before    # a checkout of the earlier commit
    python scripts/compare_checkouts.py /tmp/before . [--preset tiny] [--rounds 3] [--json F]

Each round runs every checkout once, in its own process (order rotated per round), importing
moejax from that checkout: the trainer's step for the preset (moejax.tools.bench.prepare_train_run,
compiled and run once before timing), then --blocks blocks of 10 steps on the training data;
the figure of a run is its median block's tokens/s, and each checkout's speed over the first's
is taken per round. Each child first sets the host memory the way that checkout's train.py
does (moejax.training.host_memory where the checkout has it, else malloc as it is). The 1-minute
load average is recorded at start and end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = """
import sys, statistics
sys.path.insert(0, sys.argv[1])
import moejax
from moejax.tools import bench
assert moejax.__file__.startswith(sys.argv[1]), moejax.__file__
try:  # what this checkout's train.py does before jax starts
    from moejax.training import host_memory
    print(host_memory.apply("auto"))
except ImportError:
    print("host memory: malloc unchanged (this checkout's train.py has no setting)")
run = bench.prepare_train_run(moejax.load_config(sys.argv[2], ["train.steps=100"]), 0)
blocks = [10 * run.tokens_per_step / bench.train_block(run, 10) for _ in range(int(sys.argv[3]))]
print(statistics.median(blocks))
"""


def tokens_per_second(checkout: Path, preset: str, blocks: int) -> tuple[float, str]:
    """(the checkout's median block tokens/s, its host memory line) from a child process."""
    result = subprocess.run([sys.executable, "-c", CHILD, str(checkout), preset, str(blocks)],
                            capture_output=True, text=True, check=True)
    lines = result.stdout.strip().splitlines()
    memory = next(line for line in lines if line.startswith("host memory:"))
    return float(lines[-1]), memory


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkouts", nargs="+", type=Path)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    checkouts = [c.resolve() for c in args.checkouts]
    load_start = os.getloadavg()[0]
    speeds = {str(c): [] for c in checkouts}
    memory = {}
    for round_ in range(args.rounds):
        shift = round_ % len(checkouts)
        for checkout in checkouts[shift:] + checkouts[:shift]:
            speed, memory[str(checkout)] = tokens_per_second(checkout, args.preset, args.blocks)
            speeds[str(checkout)].append(speed)
        print(f"round {round_ + 1}: " + ", ".join(f"{Path(c).name or c} {s[-1]:,.0f} tok/s"
                                                  for c, s in speeds.items()), flush=True)
    first = speeds[str(checkouts[0])]
    record = {"preset": args.preset, "rounds": args.rounds, "load_start": load_start,
              "load_end": os.getloadavg()[0], "tokens_per_s": speeds, "host_memory": memory,
              "over_first": {c: [a / b for a, b in zip(s, first)] for c, s in speeds.items()}}
    print(f"load average {load_start:.2f} at start, {record['load_end']:.2f} at end")
    for checkout, ratios in record["over_first"].items():
        print(f"{checkout}: median {statistics.median(speeds[checkout]):,.0f} tok/s, over "
              f"{checkouts[0]} {statistics.median(ratios):.2f}x [{min(ratios):.2f}-"
              f"{max(ratios):.2f}]; {memory[checkout]}")
    if args.json:
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
