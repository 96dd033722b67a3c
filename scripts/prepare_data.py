"""Tokenize a corpus into train.bin / val.bin / meta.json for moejax training.

    python scripts/prepare_data.py OUT_DIR [FILES_OR_GLOBS...]
        [--tokenizer byte|path/to/tokenizer.json] [--holdout-every 50] [--overwrite]

With no sources it tokenizes the running Python's standard library (.py files). Quote globs
so the shell does not expand them; ``**`` matches across directories. OUT_DIR must be new or
empty; --overwrite replaces an existing corpus there once the new one is complete.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

if importlib.util.find_spec("moejax") is None:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moejax import data


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", help="directory to write train.bin, val.bin and meta.json into")
    parser.add_argument(
        "sources",
        nargs="*",
        help="files or globs to tokenize (default: the Python standard library)",
    )
    parser.add_argument(
        "--tokenizer",
        default="byte",
        help="'byte' (default) or path to a Hugging Face tokenizer.json",
    )
    parser.add_argument(
        "--holdout-every",
        type=int,
        default=data.DEFAULT_HOLDOUT_EVERY,
        help="files 0, N, 2N, ... (sorted order) go to the val split (default: %(default)s)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the corpus already in OUT_DIR (only once the new one is complete)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        if args.sources:
            corpus_dir = data.prepare_corpus(
                args.sources,
                args.out_dir,
                args.tokenizer,
                args.holdout_every,
                overwrite=args.overwrite,
            )
        else:
            corpus_dir = data.prepare_stdlib_corpus(
                args.out_dir, args.tokenizer, args.holdout_every, overwrite=args.overwrite
            )
        meta = data.read_meta(corpus_dir)
    except (ValueError, OSError) as exc:
        print(f"prepare_data.py: error: {exc}", file=sys.stderr)
        return 2

    elapsed = time.perf_counter() - started
    print(f"source:    {meta['source']}")
    vocab = f"vocab_size {meta['vocab_size']}, {meta['dtype']} token files"
    print(f"tokenizer: {meta['tokenizer']} ({vocab})")
    print(f"files:     {sum(meta['num_files'].values())} ({meta['num_source_bytes']:,} bytes)")
    for split, info in meta["splits"].items():
        print(f"{split + ':':<10} {meta['num_files'][split]} files, {info['num_tokens']:,} tokens")
    print(f"output:    {Path(corpus_dir).resolve()} ({elapsed:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
