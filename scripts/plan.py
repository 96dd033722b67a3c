"""Per-device memory and per-step collective bytes of a preset's train step on a mesh, planned
on this machine: the real sharded step is compiled for fake XLA:CPU devices (moejax/tools/plan.py).

    python scripts/plan.py --config deepseek_v3_671b --devices 2048 \\
        mesh.pipe=2 mesh.expert=64 mesh.fsdp=16 train.microbatches=15 \\
        [--json] [--json-out plan.json] [--no-compile] [--hlo-out step.hlo] [--peak]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="a preset name or YAML path")
    parser.add_argument("--devices", type=int, required=True, help="devices of the planned mesh")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--no-compile", action="store_true",
                        help="arithmetic only (abstract mesh, no fake devices, no HLO counts)")
    parser.add_argument("--hlo-out", help="write the compiled HLO text to this path")
    parser.add_argument("--json-out", help="also write the plan as JSON to this path")
    parser.add_argument("--peak", action="store_true",
                        help="also report what XLA's buffer assignment holds at the memory "
                             "peak (dumps the compiled program to a temporary directory)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    dump = tempfile.TemporaryDirectory(prefix="moejax-plan-") if args.peak else None
    if not args.no_compile:  # before jax starts: one fake host device per planned device;
        # the program never runs, so LLVM need not optimise it; and XLA:CPU orders it with its
        # memory-minimising (DFS) scheduler, not the default BFS one, which trades memory for
        # CPU-thread concurrency by starting independent work early (it kept the dense layers'
        # and the embedding's buffers alive through the 671B pipeline loop: 89.5 GB of
        # temporaries against 61.0, docs/plan.md)
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
            " --xla_cpu_enable_concurrency_optimized_scheduler=false"
            f" --xla_force_host_platform_device_count={args.devices}"
            + (f" --xla_dump_to={dump.name} --xla_dump_hlo_as_text" if dump else "")).strip()
    if importlib.util.find_spec("moejax") is None:  # a checkout without `pip install -e .`
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from moejax.config import ConfigError, load_config
    from moejax.tools import plan

    try:
        cfg = load_config(args.config, args.overrides, num_devices=args.devices)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = plan.plan(cfg, args.devices, compile=not args.no_compile, hlo_out=args.hlo_out)
    if dump is not None and not args.no_compile:
        result["peak"] = {"source": "XLA:CPU buffer assignment (live ranges at the peak)",
                          **plan.peak_breakdown(dump.name)}
        dump.cleanup()
    print(json.dumps(result, indent=1) if args.json else plan.format_plan(result))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
