"""Forward+backward speed and memory of one MoE layer on CPU (`--help`: what it measures and
how; the code: moejax.tools.bench_moe).

    python scripts/bench_moe.py [--rounds 9] [--quick] [--json PATH] [--devices 8]
    python scripts/bench_moe.py --tables-from docs/bench_moe.json   # reprint, measure nothing
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

if importlib.util.find_spec("moejax") is None:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moejax.tools import bench_moe


def parse_args(argv):
    parser = argparse.ArgumentParser(description=bench_moe.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds (default 9)")
    parser.add_argument("--slow-rounds", type=int, default=3,
                        help="interleaved rounds of capacity null and HF eager against "
                             "dropless (0 skips both; default 3)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: the fine-grained shape and scaling at T = "
                             f"{bench_moe.QUICK_TOKENS}, 2 rounds, no slow systems, no tile sweep, no "
                             "mesh rows")
    parser.add_argument("--no-torch", action="store_true", help="skip the Hugging Face rows")
    parser.add_argument("--json", type=Path, help="also write everything as JSON to this path")
    parser.add_argument("--devices", type=int, default=8,
                        help="fake CPU devices for the expert-parallel rows; 1 skips them")
    parser.add_argument("--mesh-rounds", type=int, default=3)
    parser.add_argument("--tables-from", type=Path,
                        help="print the tables of a run saved with --json, measuring nothing")
    parser.add_argument("--child-rows", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.peak_size = bench_moe.QUICK_PEAK_SIZE if args.quick else bench_moe.PEAK_SIZE
    if args.quick:
        args.rounds, args.slow_rounds, args.mesh_rounds = 2, 0, 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.tables_from:
        bench_moe.print_saved(args.tables_from)
        return 0
    if args.child_rows:  # the child: mesh rows only, on the fake devices
        bench_moe.child_rows(args, args.child_rows)
        return 0
    command = " ".join(["python", "scripts/bench_moe.py", *(argv or sys.argv[1:])])
    record = bench_moe.run(args, command, Path(__file__).resolve())
    if args.json:
        args.json.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
