"""Train a moejax model.

    python scripts/train.py                                 # tiny MoE on the stdlib corpus (CPU)
    python scripts/train.py --config configs/small.yaml train.steps=2000 moe.num_experts=32
    python scripts/train.py --run-dir runs/exp1 --resume    # continue a stopped run

Several hosts: run one process per host with --coordinator HOST:PORT --num-processes N
--process-id I (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, or under
SLURM / Open MPI, where they are detected).
"""

import sys
from pathlib import Path

try:
    import moejax  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moejax.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
