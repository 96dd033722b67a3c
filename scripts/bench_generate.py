"""Speculative decoding (MTP drafts) against plain decoding on CPU: tokens/s and acceptance
(`--help`: what it measures and how; the code: moejax.tools.bench_generate).

    python scripts/bench_generate.py RUN_DIR [--rounds 7] [--new-tokens 128] [--json PATH]
    python scripts/bench_generate.py --table-from docs/bench_generate.json   # reprint only
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

if importlib.util.find_spec("moejax") is None:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moejax.tools import bench_generate


def parse_args(argv):
    parser = argparse.ArgumentParser(description=bench_generate.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, nargs="?",
                        help="training run directory of a model with MTP modules")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument("--new-tokens", type=int, default=128, help="per row (default 128)")
    parser.add_argument("--prompt-len", type=int, default=32,
                        help="prompt tokens, from the held-out split (default 32)")
    parser.add_argument("--batch", type=int, default=4, help="rows of the batched setting")
    parser.add_argument("--json", type=Path, help="also write everything as JSON to this path")
    parser.add_argument("--table-from", type=Path,
                        help="print the table of a run saved with --json, measuring nothing")
    args = parser.parse_args(argv)
    if args.table_from is None and args.run_dir is None:
        parser.error("give RUN_DIR (or --table-from PATH)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.table_from:
        bench_generate.print_saved(args.table_from)
        return 0
    command = " ".join(["python", "scripts/bench_generate.py", *(argv or sys.argv[1:])])
    record = bench_generate.run(args, command)
    if args.json:
        args.json.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
