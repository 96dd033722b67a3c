"""Dense vs Switch vs GShard/Mixtral vs DeepSeek-style MoE, measured: equal active parameters
per token and equal tokens per step, several seeds, plus the tuning advice as ablation rows.

    python scripts/compare_architectures.py            # default: 8 rows x 3 seeds (under 60 min
                                                       # on an idle 2-core CPU)
    python scripts/compare_architectures.py --quick    # 4 rows x 2 seeds, a smaller batch

Writes {prefix}.json, {prefix}.md and {prefix}_*.png (default prefix docs/compare_architectures,
with --quick docs/compare_architectures_quick); run directories go under --run-root, with partial.json there after each run (`--from-partial` turns it into the outputs of
a run cut short). Every row
trains alone with `python scripts/train.py --config compare_X` (configs/compare_*.yaml).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import sys
import time
from pathlib import Path

if importlib.util.find_spec("moejax") is None:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="four main rows, 2 seeds, 40 steps of 8 x 64 tokens (under 5 minutes)")
    parser.add_argument("--prefix", type=Path,
                        help="output path prefix (default docs/compare_architectures[_quick])")
    parser.add_argument("--run-root", type=Path,
                        help="where run directories go (default runs/compare_architectures/<time>)")
    parser.add_argument("--from-partial", type=Path, metavar="PARTIAL_JSON",
                        help="train nothing: write the outputs from the runs that a cut-short "
                             "comparison saved in its run root's partial.json")
    parser.add_argument("--mfu", type=float, default=0.40,
                        help="MFU of the GPU-hours estimate (default %(default)s)")
    parser.add_argument("--gpu-peak", type=float, default=989.4e12,
                        help="GPU peak FLOP/s of the estimate (default %(default)s: H100 SXM "
                             "dense BF16)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax

    from moejax.tools import compare

    study = compare.QUICK if args.quick else compare.DEFAULT
    command = " ".join(["python", "scripts/compare_architectures.py", *(argv or sys.argv[1:])])
    if args.from_partial:
        if not Path(args.from_partial).is_file():
            print(f"error: --from-partial {args.from_partial} is not a file: pass the partial.json "
                  "in the run root of a cut-short comparison.", file=sys.stderr)
            return 2
        prefix = args.prefix or REPO / "docs" / "compare_architectures_partial"
        try:
            result = compare.finish_partial(args.from_partial, args.mfu, args.gpu_peak)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        for path in compare.write_outputs(result, prefix, command):
            print(f"wrote {path}")
        return 0
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    run_root = args.run_root or REPO / "runs" / "compare_architectures" / stamp
    prefix = args.prefix or REPO / "docs" / f"compare_architectures{'_quick' if args.quick else ''}"
    # a row's seeds share one program: the persistent cache compiles it once
    jax.config.update("jax_compilation_cache_dir", str(run_root / "xla-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    print(f"{study.mode} mode: rows {', '.join(study.rows)}; seeds {list(study.seeds)}; "
          f"{study.steps} steps; runs under {run_root}", flush=True)
    started = time.perf_counter()
    result = compare.compare(study, run_root, log=lambda line: print(line, flush=True),
                             mfu=args.mfu, gpu_peak=args.gpu_peak,
                             partial=run_root / "partial.json")
    for path in compare.write_outputs(result, prefix, command):
        print(f"wrote {path}")
    print(f"done in {(time.perf_counter() - started) / 60:.1f} minutes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
