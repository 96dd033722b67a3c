"""SIGKILL training at random moments, resume it each time, and check every resume.

Kills land during start-up, during steps and during asynchronous checkpoint saves; every launch
is the same line (`--auto-resume`); the final per-step losses are compared with a straight run's.

    python scripts/kill_resume.py --trials 20 --seed 0 --out docs/kill_resume.json \
        --markdown docs/kill_resume.md
    python scripts/kill_resume.py --trials 5 train.steps=60 train.checkpoint_every=10

Each trial: launch the training command with `--auto-resume`, SIGKILL it a random time into its
start-up, after a random step, or once a checkpoint save has started, then check that the next
launch (the same line) resumes from the newest complete checkpoint. Every few kills the run is resumed to its end and its
per-step losses compared with a straight run's. Extra arguments are config overrides, applied
after a small fast default (moejax.tools.kill_trials.DEFAULT_OVERRIDES). Exit code 1 if any
trial or run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

try:
    import moejax  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.steps=60")
    parser.add_argument("--trials", type=int, default=20, help="how many kills (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    parser.add_argument("--kills-per-run", type=int, default=5,
                        help="kills before a run is resumed to its end (default 5)")
    parser.add_argument("--config", default="tiny", help="YAML path or preset name")
    parser.add_argument("--cpu-devices", type=int, default=8,
                        help="fake CPU devices per training process (default 8)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--markdown", help="write a report (outcome and per-trial table) here")
    parser.add_argument("--work-dir",
                        help="where the runs go (default: a temporary directory, deleted "
                             "afterwards unless something failed)")
    return parser.parse_args(argv)


def describe_machine(cpu_devices: int) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return (f"a {os.cpu_count()}-core {platform.machine()} CPU"
            + (f" (load average {load:.1f} at the end, other work included)" if load else "")
            + f", {cpu_devices} fake CPU devices per training process")


def main(argv=None) -> int:
    args = parse_args(argv)
    from moejax.tools.kill_trials import markdown_report, run_kill_trials

    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="kill_resume-"))
    if args.work_dir and work_dir.exists() and any(work_dir.iterdir()):
        print(f"error: --work-dir {work_dir} is not empty; choose a new one", file=sys.stderr)
        return 2
    print(f"runs in {work_dir}", flush=True)
    result = run_kill_trials(args.overrides, trials=args.trials, seed=args.seed,
                             work_dir=work_dir, kills_per_run=args.kills_per_run,
                             config=args.config, cpu_devices=args.cpu_devices,
                             report=lambda line: print(line, flush=True))
    summary = result.to_json()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    if args.markdown:
        command = shlex.join(["python", "scripts/kill_resume.py", *(argv or sys.argv[1:])])
        Path(args.markdown).write_text(markdown_report(
            result, command=command, machine=describe_machine(args.cpu_devices),
            date=time.strftime("%Y-%m-%d")))
    runs_ok = sum(r.passed for r in result.runs)
    print(f"{summary['trials_passed']} of {len(result.trials)} trials resumed correctly "
          f"({summary['kills_during_save']} kills during a checkpoint save); {runs_ok} of "
          f"{len(result.runs)} runs finished with each step logged once and losses equal to the "
          f"straight run's; {result.wall_seconds:.0f} s")
    if result.passed and not args.work_dir:
        shutil.rmtree(work_dir, ignore_errors=True)
    elif not result.passed:
        print(f"FAILED; launch logs and run directories kept in {work_dir}")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
