"""Which scale granularity for the `tensor` recipe in the dropless grouped GEMM: one scale per
expert (what moejax does) or one per row tile. Prints the relative error (Frobenius, against
the exact f32 product) of the forward GEMM (on the rows without an outlier) and of the weight
gradient, per expert and per row tile, with the block recipe beside them, on token rows of
lognormal magnitudes with and without outlier tokens (one per expert).

    python scripts/fp8_scale_granularity.py

Per-tile scales are emulated with fp8_matmul(recipe="tensor") on each tile of an expert's rows
against the expert's weights (forward) and summed per expert (wgrad). A few seconds on a CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import moejax  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moejax.tools.fp8_scale_granularity import main

if __name__ == "__main__":
    sys.exit(main())
