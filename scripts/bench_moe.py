"""Forward+backward speed and memory of one MoE layer on CPU (`--help`: what it measures and
how; the code: moejax.tools.bench_moe).

    python scripts/bench_moe.py --json docs/bench_moe.json   # 5 rounds; refuses a busy machine
    python scripts/bench_moe.py [--rounds 5] [--busy-ok] [--hf-threads 1 ...] [--slow-rounds 3]
                                [--tile-sweep] [--devices 8]
    python scripts/bench_moe.py --quick --busy-ok              # smoke test, a minute or two
    python scripts/bench_moe.py --tables-from docs/bench_moe.json   # reprint, measure nothing

Exit status 2, before anything is measured, when a --json record would not be honest (see
`moejax.tools.bench_moe.refusal`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

if importlib.util.find_spec("moejax") is None:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moejax.tools import bench, bench_moe


def parse_args(argv):
    parser = argparse.ArgumentParser(description=bench_moe.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=bench_moe.MIN_ROUNDS,
                        help=f"interleaved rounds (default {bench_moe.MIN_ROUNDS}; a --json "
                             f"record needs >= {bench_moe.MIN_ROUNDS})")
    parser.add_argument("--json", type=Path, help="also write everything as JSON to this path")
    parser.add_argument("--busy-ok", action="store_true",
                        help=f"run even if the 1-minute load at start is > {bench_moe.BUSY_LOAD}"
                             "; the record is then marked provisional")
    parser.add_argument("--hf-threads", type=int, nargs="+", default=[], metavar="N",
                        help="extra HF grouped_mm rows pinned to these torch thread counts "
                             "(information only; the headline row runs at torch's default)")
    parser.add_argument("--slow-rounds", type=int, default=0,
                        help="interleaved rounds of capacity null and HF eager against "
                             "dropless (default 0: both skipped)")
    parser.add_argument("--tile-sweep", action="store_true",
                        help=f"also time dropless at moe.tile_rows {bench_moe.TILE_SWEEP}")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: {', '.join(bench_moe.QUICK_SHAPES)} and scaling at "
                             f"T = {bench_moe.QUICK_TOKENS}, 2 rounds, no slow systems, no mesh "
                             "rows; never into docs/")
    parser.add_argument("--no-torch", action="store_true", help="skip the Hugging Face rows")
    parser.add_argument("--devices", type=int, default=1,
                        help="fake CPU devices for the expert-parallel rows (information only; "
                             "default 1: none)")
    parser.add_argument("--mesh-rounds", type=int, default=3)
    parser.add_argument("--tables-from", type=Path,
                        help="print the tables of a run saved with --json, measuring nothing")
    parser.add_argument("--child-rows", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-scaling", type=Path, help=argparse.SUPPRESS)
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
    if args.child_scaling:  # the child: scaling rows only, with train.py's host memory
        bench_moe.child_scaling(args, args.child_scaling)
        return 0
    load = bench.load_average()  # before anything is measured
    problem = bench_moe.refusal(args, load)
    if problem:
        print(f"bench_moe: refused: {problem}", file=sys.stderr)
        return 2
    if load is not None and load > bench_moe.BUSY_LOAD and not args.busy_ok:
        print(f"bench_moe: warning: 1-minute load {load:.2f} > {bench_moe.BUSY_LOAD} at start: "
              "the figures are provisional", file=sys.stderr)
    command = " ".join(["python", "scripts/bench_moe.py", *(argv or sys.argv[1:])])
    record = bench_moe.run(args, command, Path(__file__).resolve(), load)
    if args.json:
        args.json.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
