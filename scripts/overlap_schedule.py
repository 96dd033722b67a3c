"""The MoE layer with and without moe.overlap_halves on 8 fake CPU devices: per dispatch
all-to-all of the compiled forward + backward, the GEMMs independent of it and where XLA:CPU's
schedule put them, and the step time (docs/overlap.md).

    python scripts/overlap_schedule.py [--rounds 5] [key=value ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
if importlib.util.find_spec("moejax") is None:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moejax import load_config, make_mesh
from moejax.tools import bench

DEFAULTS = ("mesh.data=2", "mesh.expert=4", "precision.compute_dtype=float32",
            "train.global_batch_size=8", "train.seq_len=256")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides of tiny")
    args = parser.parse_args(argv)
    cfg = load_config("tiny", DEFAULTS + tuple(args.overrides))
    result = bench.moe_layer_overlap(cfg, make_mesh(cfg.mesh), args.rounds)
    for name, layer in result.items():
        seconds = layer.pop("seconds")
        print(f"{name}: {json.dumps(layer)}")
        print(f"  step seconds: median {seconds['median']:.3f}, min {seconds['min']:.3f}, "
              f"max {seconds['max']:.3f} over {seconds['n']} rounds")


if __name__ == "__main__":
    main()
