"""Compressed data-parallel gradients, measured (moejax/tools/grad_compression.py).

    # HLO-counted gradient bytes per device per step (fake XLA:CPU devices, nothing runs)
    python scripts/bench_grad_compression.py bytes --config tiny --devices 8 \\
        mesh.data=2 mesh.expert=4 --whole-step --json-out docs/grad_compression_bytes_tiny.json
    python scripts/bench_grad_compression.py bytes --config deepseek_v3_671b --devices 2048 \\
        mesh.pipe=16 mesh.expert=64 mesh.fsdp=2 --json-out docs/grad_compression_bytes_671b.json
    # the 3-seed x 300-step study on 8 fake CPU devices (hours on a busy 2-core machine;
    # rerunning with the same --out resumes: finished runs are kept)
    python scripts/bench_grad_compression.py study --out docs/grad_compression_study.json \\
        --run-root /tmp/grad_compression_runs
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bytes", help="gradient bytes per device per step from compiled HLO")
    b.add_argument("--config", required=True)
    b.add_argument("--devices", type=int, required=True)
    b.add_argument("--whole-step", action="store_true",
                   help="also compile whole train steps (small meshes only)")
    b.add_argument("--no-compile", action="store_true",
                   help="count the lowered program only (no XLA:CPU compile of the reduction)")
    b.add_argument("--json-out")
    b.add_argument("overrides", nargs="*")
    s = sub.add_parser("study", help="final held-out loss per setting and seed")
    s.add_argument("--out", required=True, help="JSON written after every run (resumable)")
    s.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    s.add_argument("--steps", type=int, default=300)
    s.add_argument("--settings", nargs="+")
    s.add_argument("--corpus-dir")
    s.add_argument("--run-root", help="where the runs' directories go (default: a temp dir); "
                   "keep it when resuming: the tolerance rows restore final parameters")
    t = sub.add_parser("table", help="the study's summary as a markdown table")
    t.add_argument("study_json")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == "table":  # no jax needed
        if importlib.util.find_spec("moejax") is None:
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from moejax.tools.grad_compression import study_table

        print(study_table(json.loads(Path(args.study_json).read_text())))
        return 0
    devices = args.devices if args.command == "bytes" else 8
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={devices}").strip()
    if args.command == "bytes":  # compiled, never run: LLVM need not optimise
        os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
    if importlib.util.find_spec("moejax") is None:  # a checkout without `pip install -e .`
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import jax

    from moejax import sharding
    from moejax.config import load_config
    from moejax.tools import grad_compression as gc

    if args.command == "bytes":
        cfg = load_config(args.config, args.overrides, num_devices=args.devices)
        mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:args.devices])
        result = {"config": args.config, "devices": args.devices, "overrides": args.overrides,
                  "mesh": dict(mesh.shape), "parameter_bytes": gc.parameter_bytes(cfg),
                  "settings": gc.gradient_bytes(
                      cfg, mesh, whole_step=args.whole_step,
                      compile_reduction=not args.no_compile)}
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))
        return 0
    settings = tuple(args.settings) if args.settings else tuple(gc.SETTINGS)
    gc.study(Path(args.out), seeds=tuple(args.seeds), steps=args.steps, settings=settings,
             corpus_dir=args.corpus_dir, run_root=args.run_root, log=lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
