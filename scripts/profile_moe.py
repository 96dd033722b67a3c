"""Where one MoE layer's forward + backward spends its time on this CPU, op by op (the XLA
thunks of a jax.profiler trace, summed per step; moejax/tools/profile_ops.py).

    python scripts/profile_moe.py [--shape E=128] [--dispatch dropless] [--steps 5] [--top 25]

Shapes are scripts/bench_moe.py's (coarse, fine-grained, E=128). Times are provisional on a
shared machine; the load average is printed with them.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

if importlib.util.find_spec("moejax") is None:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax

from moejax.tools import bench
from moejax.tools.profile_ops import op_times


def main(argv=None) -> int:
    shapes = {shape.name: shape for shape in bench.LAYER_SHAPES}
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=shapes, default="E=128")
    parser.add_argument("--dispatch", choices=("dropless", "capacity", "dense"), default="dropless")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    step = bench.moe_layer_step(bench.layer_config(shapes[args.shape], args.dispatch))
    start = time.perf_counter()
    for _ in range(args.steps):
        jax.block_until_ready(step.run())
    wall = (time.perf_counter() - start) / args.steps * 1e3
    print(f"{args.shape}, {args.dispatch}: {wall:.1f} ms per step (load average {load:.1f} "
          f"at start, {os.getloadavg()[0]:.1f} now); ops by time per step:")
    for op in op_times(step.run, args.steps)[:args.top]:
        print(f"  {op['ms_per_step']:9.2f} ms  {op['calls_per_step']:7.1f}x  {op['name']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
