"""Everything GPU-specific, checked in one run (under 8 minutes on one H200):

    OUT=dir python scripts/check_gpu.py      # $OUT/gpu_check.json and $OUT/gpu_check.md

fp8 (cuBLASLt fp8 GEMMs in the compiled fp8 train step; bf16 vs fp8 GEMM speed, tensor and
block recipes), MFU of configs/moe_1b.yaml's train step (bf16 and fp8 tensor, dropless and
capacity 1.0), the dropless layer (ragged_dot, tiles) vs capacity 1.0 at scripts/bench_moe.py's
coarse and fine-grained shapes plus ragged_all_to_all on a 1-device expert axis, and peak device
bytes vs the compiled memory analysis. A failing section records its error; the others run.
On CPU every section runs at tiny sizes and the GPU-only checks say "not run: needs a GPU".
The work is in moejax/tools/gpu_check.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

if importlib.util.find_spec("moejax") is None:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moejax.tools.gpu_check import GPU_XLA_FLAGS, REPORT_JSON, SUMMARY_MD

# before jax starts its backend (moejax.tools.gpu_check imports jax but does not start it)
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {GPU_XLA_FLAGS}".strip()
# jax takes 75% of GPU memory by default; the 1B preset's step needs more on an 80 GB card
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"),
                        help="directory for the JSON and markdown report (default: $OUT, else "
                             "gpu_check_out)")
    args = parser.parse_args(argv)
    from moejax.tools.gpu_check import run_checks

    out = Path(args.out)
    run_checks(out, log=lambda line: print(line, flush=True))
    print(f"wrote {out / REPORT_JSON} and {out / SUMMARY_MD}")
    print((out / SUMMARY_MD).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
