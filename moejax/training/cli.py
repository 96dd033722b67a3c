"""The training command line (`python scripts/train.py`, `python -m moejax.training.cli`,
or the `moejax-train` command of an installed package).

    python scripts/train.py                                 # tiny MoE on the stdlib corpus (CPU)
    python scripts/train.py --config configs/small.yaml train.steps=2000 moe.num_experts=32
    python scripts/train.py --run-dir runs/exp1 --resume    # continue a stopped run
    python scripts/train.py --run-dir runs/exp1 --auto-resume   # resume if there, else start

Several hosts: run one process per host with --coordinator HOST:PORT --num-processes N
--process-id I (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, or under
SLURM / Open MPI, where they are detected).
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a moejax model.")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. moe.num_experts=16")
    parser.add_argument("--config", default="tiny", help="YAML path or preset name in configs/")
    parser.add_argument("--run-dir", help="run directory (default: a new runs/<time>)")
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    resume.add_argument("--auto-resume", action="store_true",
                        help="continue the run in --run-dir if it holds one, else start it "
                             "there: a launch line that is safe to repeat (requeues, restarts)")
    parser.add_argument("--stopped-exit-code", type=int, default=0,
                        help="exit code after SIGTERM/SIGINT stopped the run before its last "
                             "step (checkpoint saved); default 0. A scheduler that restarts only "
                             "failed jobs (Kubernetes) needs a non-zero one, e.g. 143")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--coordinator", help="HOST:PORT of process 0, for multi-host runs")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    parser.add_argument("--startup-timeout", type=float,
                        help="seconds a process waits for the others at start-up and at each "
                             "barrier (default: MOEJAX_STARTUP_TIMEOUT or 1800)")
    parser.add_argument("--host-memory", choices=("auto", "keep", "release"), default="auto",
                        help="keep: malloc keeps the buffers XLA frees after each step for the "
                             "next one (no page faults per step; resident memory stays at its "
                             "peak); release: malloc as it is; auto (default): keep where jax "
                             "runs on CPU (moejax/training/host_memory.py)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from moejax.training import distributed, host_memory

    # before any thread of jax's allocates: the settings hold for threads that allocate later
    host_memory_line = host_memory.apply(args.host_memory)

    try:
        distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                               args.startup_timeout)
    except (ValueError, distributed.StartupError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    import jax

    from moejax.config import ConfigError, load_config
    from moejax.convert.layout import ConversionError
    from moejax.data import DataError
    from moejax.training.checkpoint import (
        STORAGE_FAULTS,
        CheckpointError,
        CheckpointSaveError,
        storage_errno,
    )
    from moejax.training.loop import TrainingDiverged, train
    from moejax.training.rundir import AUTO, RunDirError
    from moejax.training.runlock import RunLockedError

    main_process = jax.process_index() == 0
    if main_process:
        print(host_memory_line, flush=True)
    try:
        cfg = load_config(args.config, args.overrides)
        summary = train(cfg, args.run_dir, resume=AUTO if args.auto_resume else args.resume,
                        progress=not args.no_progress,
                        announce=print if main_process else None)
    except distributed.StartupError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        # a normal exit would wait at jax's shutdown barrier for the very process that is missing
        os._exit(2)
    except (ConfigError, ConversionError, DataError, RunDirError, RunLockedError,
            CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (TrainingDiverged, CheckpointSaveError) as err:  # the run stopped: exit 1
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        code = storage_errno(err)
        if code is None:
            raise
        # e.g. metrics.jsonl on a full disk: checkpoints keep their own one-line error above
        print(f"error: writing {err.filename or 'the run directory'} failed: "
              f"{os.strerror(code)}; the run stopped; {STORAGE_FAULTS[code]}, then resume "
              f"with --run-dir {args.run_dir or 'RUN_DIR'} --resume.", file=sys.stderr)
        return 1
    if main_process:
        held_out = summary["held_out"]
        line = f"final held-out loss {held_out['loss']:.4f} nats/token"
        if "bits_per_byte" in held_out:
            line += f", {held_out['bits_per_byte']:.4f} bits/byte"
        print(f"{line} after {summary['step']} steps; results in {summary['run_dir']}")
        if "mfu" in summary:
            print(f"throughput {summary['tokens_per_second']:,.0f} tokens/s, MFU "
                  f"{summary['mfu']:.2%} (active-parameter FLOPs over the peak)")
        if summary["skipped_steps"]:
            print(f"{summary['skipped_steps']} step(s) skipped for a non-finite loss or gradients")
        if summary["stopped_by"]:
            print(f"stopped by {summary['stopped_by']}; checkpoint saved, continue with "
                  f"--run-dir {summary['run_dir']} --resume")
    unfinished = summary["stopped_by"] and summary["step"] < cfg.train.steps
    return args.stopped_exit_code if unfinished else 0


if __name__ == "__main__":
    sys.exit(main())
