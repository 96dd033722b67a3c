"""Compiled temporaries (and optionally CPU speed) of one attention layer, forward + backward,
materialised vs blockwise (`--help`: what it measures; the code: moejax.tools.attention_memory).

    python scripts/bench_attention.py [--seq-lens 1024 2048 4096 8192] [--json PATH]
    python scripts/bench_attention.py --time [--rounds 5]
    python scripts/bench_attention.py --tables-from docs/attention.json   # reprint, measure nothing
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

if importlib.util.find_spec("moejax") is None:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moejax.tools import attention_memory


def parse_args(argv):
    parser = argparse.ArgumentParser(description=attention_memory.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=attention_memory.SEQ_LENS)
    parser.add_argument("--block", type=int, default=None,
                        help="model.attention_block of the blockwise rows (default: the config's)")
    parser.add_argument("--time", action="store_true",
                        help="also time the GQA layer on this machine, plain vs blockwise at "
                             "each of --time-blocks")
    parser.add_argument("--time-seq-lens", type=int, nargs="+",
                        default=attention_memory.TIME_SEQ_LENS)
    parser.add_argument("--time-blocks", type=int, nargs="+", default=attention_memory.TIME_BLOCKS)
    parser.add_argument("--time-preset", default="small",
                        help="the preset whose attention layer --time runs (default small)")
    parser.add_argument("--time-override", action="append", default=[],
                        help="KEY=VALUE config override of the timed layer (repeatable), e.g. "
                             "precision.compute_dtype=float32")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory table")
    parser.add_argument("--json", type=Path, help="also write everything as JSON to this path")
    parser.add_argument("--tables-from", type=Path,
                        help="print the tables of a run saved with --json, measuring nothing")
    return parser.parse_args(argv)


def print_tables(record: dict) -> None:
    print(f"{record['command']}\nload average at start: {record['load_average_start']}, "
          f"at end: {record['load_average_end']}")
    if "memory" in record:
        print(attention_memory.memory_table(record["memory"]))
    if "speed" in record:
        print(attention_memory.speed_table(record["speed"]))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.tables_from:
        print_tables(json.loads(args.tables_from.read_text()))
        return 0
    command = " ".join(["python", "scripts/bench_attention.py", *(argv or sys.argv[1:])])
    record = {"command": command, "load_average_start": os.getloadavg(),
              **attention_memory.environment()}
    print(f"{command}\nload average at start: {record['load_average_start']}")
    if not args.no_memory:
        record["memory"] = attention_memory.memory_rows(args.seq_lens, args.block)
        print(attention_memory.memory_table(record["memory"]))
    if args.time:
        record["speed"] = attention_memory.speed_rows(args.time_seq_lens, args.time_blocks,
                                                      args.rounds, args.time_preset,
                                                      tuple(args.time_override))
        print(attention_memory.speed_table(record["speed"]))
    record["load_average_end"] = os.getloadavg()
    print(f"load average at end: {record['load_average_end']}")
    if args.json:
        args.json.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
