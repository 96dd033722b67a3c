"""Kill -9 trials: train in a subprocess (`scripts/train.py`), SIGKILL it at random moments (during
start-up, after a random step, inside an asynchronous orbax checkpoint save), launch it again
with the same line (`--auto-resume`: what a scheduler's requeue or restart does), and check
every resume and the finished run against a straight (never killed) run.

What is checked, after the fact and from files only, so the verdicts hold wherever a kill lands
(timing only decides where the kills land):
- each resumed run starts from the newest checkpoint that orbax had finalized (renamed from
  `<step>.orbax-checkpoint-tmp` to `<step>`) when the process died, or from scratch when there was
  none; a save cut short never counts (its step is never resumed from, nothing is set aside as
  unreadable);
- metrics.jsonl logs each step once, and the finished run's per-step losses equal the straight
  run's (relative 1e-6: the train step draws no random numbers);
- summary.json covers the whole run.

A resumed run's first train record is the one without `tokens_per_second` (the first step of a
process carries no throughput), so the step it resumed from is that record's step - 1.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from moejax.config import load_config

# the training command users run (scripts/train.py is a shell over the same main)
TRAIN_COMMAND = [sys.executable, "-m", "moejax.training.cli"]
SAVE_IN_PROGRESS = ".orbax-checkpoint-tmp"  # orbax writes step S into S.orbax-checkpoint-tmp
# A small float32 MoE that trains 40 steps in a few seconds on a 2-core CPU. A save there lasts
# about 4 steps, so checkpointing every 10 steps leaves room for kills outside any save. The
# mesh and the start-up peak measurement are the preset's own (8 devices: expert=8).
DEFAULT_OVERRIDES = (
    "precision.compute_dtype=float32", "model.d_model=32", "model.num_heads=4",
    "model.num_kv_heads=2", "model.head_dim=8", "model.ffn_dim=64", "moe.expert_ffn_dim=16",
    "train.seq_len=16", "train.global_batch_size=8", "train.steps=40", "train.checkpoint_every=10",
    "train.log_every=1", "train.eval_every=0", "train.eval_batches=1", "train.warmup_steps=2",
)
# the one launch line of every launch, first or not: resume if the run exists, else start it
LAUNCH_FLAGS = ("--auto-resume", "--no-progress")
LOSS_TOLERANCE = 1e-6  # relative, per step
POLL_S = 0.01  # seconds between looks at metrics.jsonl and checkpoints/


@dataclasses.dataclass
class Trial:
    """One SIGKILL and the resume after it."""

    trial: int  # 1-based over all runs
    run: int  # 1-based: which run directory
    # "startup": a delay after the launch; "step": after a logged step plus a delay; "save":
    # once a save has started
    kind: str
    target: int  # the step waited for ("step") or whose save was waited for ("save"); 0: none
    delay_s: float  # from seeing the target (the launch, for "startup") to the kill
    killed_after_step: int | None = None  # the last step logged before the kill
    save_in_progress: int | None = None  # the step whose save the kill cut short, if any
    complete_checkpoints: list = dataclasses.field(default_factory=list)  # after the kill
    resumed_from: int | None = None  # None: the resumed run started from scratch
    passed: bool = False
    problems: list = dataclasses.field(default_factory=list)

    @property
    def newest_complete(self) -> int | None:
        return max(self.complete_checkpoints, default=None)


@dataclasses.dataclass
class Run:
    """One run directory, killed a few times and then resumed to the end."""

    run: int
    run_dir: str
    launches: int = 0
    steps_logged: int = 0
    max_relative_loss_error: float | None = None
    passed: bool = False
    problems: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class KillTrialsResult:
    seed: int
    overrides: list
    trials_requested: int
    trials: list  # [Trial]
    runs: list  # [Run]
    straight_run_dir: str
    wall_seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return (len(self.trials) == self.trials_requested and all(t.passed for t in self.trials)
                and all(r.passed for r in self.runs))

    def to_json(self) -> dict:
        trials = [{**dataclasses.asdict(t), "newest_complete": t.newest_complete}
                  for t in self.trials]
        return {"passed": self.passed, "seed": self.seed, "overrides": self.overrides,
                "trials_requested": self.trials_requested,
                "wall_seconds": self.wall_seconds, "straight_run_dir": self.straight_run_dir,
                "trials_passed": sum(t.passed for t in self.trials),
                "kills_during_save": sum(t.save_in_progress is not None for t in self.trials),
                "trials": trials, "runs": [dataclasses.asdict(r) for r in self.runs]}


def child_environment(cpu_devices: int, compilation_cache: Path | None) -> dict:
    """The training processes' environment: `cpu_devices` fake CPU devices, fast compilation
    (tiny shapes), and optionally a persistent compilation cache shared by every launch (start-up
    drops from ~25 s to ~10 s on 2 cores; the cached executables are the same programs)."""
    flags = (f"--xla_force_host_platform_device_count={cpu_devices} "
             "--xla_backend_optimization_level=0")
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    if compilation_cache is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=str(compilation_cache),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def run_kill_trials(overrides=(), *, trials: int = 20, seed: int = 0, work_dir: str | Path,
                    kills_per_run: int = 5, config: str = "tiny", cpu_devices: int = 8,
                    save_fraction: float = 0.4, startup_fraction: float = 0.25,
                    max_step_delay_s: float = 0.3, max_save_delay_s: float = 0.2,
                    max_startup_delay_s: float = 12.0, compilation_cache: bool = True,
                    launch_timeout_s: float = 600.0, report=None) -> KillTrialsResult:
    """SIGKILL training `trials` times, `kills_per_run` kills per run directory (each run is then
    resumed to its end and compared with one straight run); `overrides` come after
    DEFAULT_OVERRIDES. In an order drawn from `seed`, round(trials * startup_fraction) kills
    land a random time up to `max_startup_delay_s` after their launch (start-up: before the run
    directory exists, while compiling, ...), round(trials * save_fraction) wait for a checkpoint
    save to start, and the rest wait for a step. `report` gets one line per trial and per run."""
    started = time.time()
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    overrides = [*DEFAULT_OVERRIDES, *overrides]
    train_cfg = load_config(config, overrides, num_devices=cpu_devices).train
    env = child_environment(cpu_devices, work_dir / "jax_cache" if compilation_cache else None)
    launcher = _Launcher(config, overrides, env, launch_timeout_s)
    straight_dir = work_dir / "straight"
    straight = launcher.straight_losses(straight_dir)
    rng = random.Random(seed)
    saves, startups = round(trials * save_fraction), round(trials * startup_fraction)
    kinds = ["save"] * saves + ["startup"] * startups + ["step"] * (trials - saves - startups)
    rng.shuffle(kinds)
    delays = {"step": max_step_delay_s, "save": max_save_delay_s, "startup": max_startup_delay_s}
    schedule = _KillSchedule(rng, kinds, train_cfg, delays)
    result = KillTrialsResult(seed, overrides, trials, [], [], str(straight_dir))
    say = report or (lambda line: None)
    max_runs = 3 * math.ceil(trials / max(kills_per_run, 1)) + 1  # runs end early only by chance
    while len(result.trials) < trials and len(result.runs) < max_runs:
        run = Run(len(result.runs) + 1, str(work_dir / f"run-{len(result.runs) + 1}"))
        result.runs.append(run)
        kills = min(kills_per_run, trials - len(result.trials))
        _kill_and_resume(run, kills, schedule, launcher, result.trials, say)
        _check_finished_run(run, straight, train_cfg.steps)
        say(f"run {run.run}: {run.launches} launches, {run.steps_logged} steps logged; "
            + ("each step logged once, losses equal to the straight run's" if run.passed
               else "FAILED: " + "; ".join(run.problems)))
    result.wall_seconds = round(time.time() - started, 1)
    return result


class _KillSchedule:
    """Where each kill lands: a step or a save drawn from what the resumed run has left."""

    def __init__(self, rng, kinds, train_cfg, delays: dict):
        self.rng, self.kinds, self.cfg, self.delays = rng, kinds, train_cfg, delays
        self.used = 0

    def next(self, run: int, start: int | None) -> Trial | None:
        """The next kill for a run that resumes from `start` (None: from scratch); None when
        the run has no step left. A kill that does not land (the run finished first) is drawn
        again in the next run, with the same kind."""
        kind = self.kinds[self.used]
        first, steps = (start or 0) + 1, self.cfg.steps
        if first > steps:
            return None
        if kind == "startup":
            target = 0
        elif kind == "step":
            target = first + int(self.rng.random() * max(steps - first, 1))  # first..steps-1
        else:
            every = self.cfg.checkpoint_every
            saved = [s for s in range(first, steps) if every and s % every == 0] + [steps]
            target = saved[int(self.rng.random() * len(saved))]
        delay = round(self.rng.random() * self.delays[kind], 3)
        return Trial(self.used + 1, run, kind, target, delay)

    def landed(self) -> None:
        self.used += 1


def _kill_and_resume(run: Run, kills: int, schedule: _KillSchedule, launcher, trials: list,
                     say) -> None:
    """Launch, kill `kills` times (each time resuming from where the kill left it), then let the
    last launch finish. Each trial's verdict comes from the next launch that logs a step or
    ends: one killed during its start-up shows nothing of where it resumed from."""
    run_dir = Path(run.run_dir)
    waiting, start, landed = [], None, 0  # trials awaiting their verdict; where launches start
    while True:
        before = _Snapshot.take(run_dir)
        trial = schedule.next(run.run, start) if landed < kills else None
        proc, log = launcher.launch(run_dir, name=run.launches + 1)
        run.launches += 1
        outcome = _wait_and_kill(proc, run_dir, trial, before, launcher.timeout_s)
        failure = None if outcome == "killed" else _failure(proc, log, outcome)
        if waiting and (outcome != "killed" or _new_steps(run_dir, before)):
            for pending in waiting:
                _judge(pending, run_dir, before, log, failure)
                trials.append(pending)
                say(_trial_line(pending))
            waiting = []
        if outcome != "killed":
            if failure:
                run.problems.append(f"launch {run.launches} {failure}")
            return
        _record_kill(trial, run_dir, before)
        schedule.landed()
        waiting.append(trial)
        start, landed = trial.newest_complete, landed + 1


def _failure(proc, log: Path, outcome: str) -> str | None:
    """None for a launch that finished cleanly, else what went wrong (with its last lines)."""
    if outcome == "timeout":
        return "timed out and was killed"
    if proc.returncode == 0:
        return None
    tail = log.read_text().strip().splitlines()[-3:] if log.exists() else []
    return f"exited with code {proc.returncode}: " + " | ".join(tail)


class _Launcher:
    def __init__(self, config: str, overrides: list, env: dict, timeout_s: float):
        self.config, self.overrides, self.env, self.timeout_s = config, overrides, env, timeout_s

    def launch(self, run_dir: Path, *, name) -> tuple[subprocess.Popen, Path]:
        """Start training in its own process group (so SIGKILL reaches every process of it),
        with the same line every time; stdout and stderr go to
        `<run_dir>.logs/launch-<name>.log`."""
        log = run_dir.with_name(run_dir.name + ".logs") / f"launch-{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [*TRAIN_COMMAND, "--run-dir", str(run_dir), *LAUNCH_FLAGS,
               "--config", self.config, *self.overrides]
        with log.open("w") as out:
            proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        return proc, log

    def straight_losses(self, run_dir: Path) -> dict[int, float]:
        """{step: loss} of one run that nobody interrupts."""
        proc, log = self.launch(run_dir, name="straight")
        try:
            proc.wait(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            _kill(proc)
        if proc.returncode != 0:
            raise RuntimeError(f"the straight run failed ({_failure(proc, log, 'exited')}); "
                               f"see {log}")
        return {r["step"]: r["loss"] for r in train_records(run_dir)}


def train_records(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "train"]


@dataclasses.dataclass
class _Snapshot:
    """What a run directory holds when a launch starts, to tell the launch's own work apart."""

    records: list  # metrics.jsonl's records
    metrics_lines: frozenset  # its raw lines (all but a launch's first carry a throughput)
    saves_in_progress: dict  # tmp directory name -> inode (orbax deletes and remakes stale ones)
    complete: list  # finalized checkpoint steps

    @staticmethod
    def take(run_dir: Path) -> _Snapshot:
        lines = _metrics_lines(run_dir)
        return _Snapshot([r for _, r in lines], frozenset(raw for raw, _ in lines),
                         *_checkpoint_listing(run_dir))


def _checkpoint_listing(run_dir: Path) -> tuple[dict, list]:
    """({tmp directory name: inode}, [finalized steps]) in run_dir/checkpoints."""
    directory = run_dir / "checkpoints"
    tmp, complete = {}, []
    entries = list(os.scandir(directory)) if directory.is_dir() else []
    for entry in entries:
        if SAVE_IN_PROGRESS in entry.name:
            try:
                tmp[entry.name] = entry.inode()
            except FileNotFoundError:  # finalized or removed while we looked
                continue
        elif entry.name.isdigit():
            complete.append(int(entry.name))
    return tmp, sorted(complete)


def _new_steps(run_dir: Path, before: _Snapshot) -> list[int]:
    """Steps this launch has logged so far (its first record may repeat an old line exactly;
    the wait then sees the launch one step later, which only moves the kill)."""
    path = run_dir / "metrics.jsonl"
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    steps = []
    for line in lines:
        if line not in before.metrics_lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line being written
                continue
            if record["kind"] == "train":
                steps.append(record["step"])
    return steps


def _new_saves(run_dir: Path, before: _Snapshot) -> list[int]:
    """Steps whose save this launch has started: tmp directories that were not there at launch
    (a stale tmp directory of the same step is deleted and made anew, so its inode changes)."""
    tmp, _ = _checkpoint_listing(run_dir)
    return sorted(int(name.split(".")[0]) for name, inode in tmp.items()
                  if before.saves_in_progress.get(name) != inode)


def _wait_and_kill(proc, run_dir: Path, trial: Trial | None, before: _Snapshot,
                   timeout_s: float) -> str:
    """Wait for the trial's moment and SIGKILL the launch: "killed", or "exited" when it ended
    by itself first, or "timeout" when it ran past `timeout_s` (and was killed)."""
    deadline = time.time() + timeout_s
    while proc.poll() is None:
        if time.time() > deadline:
            _kill(proc)
            return "timeout"
        if trial is not None and _moment_reached(trial, run_dir, before):
            time.sleep(trial.delay_s)
            return "killed" if _kill(proc) else "exited"
        time.sleep(POLL_S)
    return "exited"


def _moment_reached(trial: Trial, run_dir: Path, before: _Snapshot) -> bool:
    if trial.kind == "startup":  # the launch itself: the kill comes delay_s after it
        return True
    if trial.kind == "step":
        return any(step >= trial.target for step in _new_steps(run_dir, before))
    _, complete = _checkpoint_listing(run_dir)
    finished = trial.target in complete and trial.target not in before.complete
    # A save finished between two looks still ends the wait (the kill then lands after it).
    return finished or trial.target in _new_saves(run_dir, before)


def _kill(proc) -> bool:
    """SIGKILL the launch's process group; True unless it had already exited by itself."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    return proc.returncode == -signal.SIGKILL


def _record_kill(trial: Trial, run_dir: Path, before: _Snapshot) -> None:
    """What the dead launch left: the last step it logged, a save it was writing, and the
    checkpoints orbax had finalized (the next launch must resume from the newest)."""
    steps = _new_steps(run_dir, before)
    trial.killed_after_step = max(steps, default=None)
    interrupted = _new_saves(run_dir, before)
    trial.save_in_progress = max(interrupted, default=None)
    trial.complete_checkpoints = _checkpoint_listing(run_dir)[1]


def _judge(trial: Trial, run_dir: Path, before: _Snapshot, log: Path,
           failure: str | None) -> None:
    """Did the launch after `trial` resume from the newest finalized checkpoint (`failure`: how
    that launch failed, if it did), and keep metrics.jsonl at one record per step?"""
    lines = _metrics_lines(run_dir)
    records = [r for _, r in lines if r["kind"] == "train"]
    logged_new = any(raw not in before.metrics_lines for raw, r in lines if r["kind"] == "train")
    expected = trial.newest_complete
    first = next((r for r in reversed(records) if "tokens_per_second" not in r), None)
    if not logged_new and failure is None and expected == _last_step(records):
        trial.resumed_from = expected  # the kill came after the last step: nothing left to run
    else:
        trial.resumed_from = (first["step"] - 1 or None) if first else None
    problems = trial.problems
    if failure:
        problems.append(f"the resumed launch {failure}")
    if trial.resumed_from != expected:
        problems.append(f"resumed from {_step_name(trial.resumed_from)}, but the newest "
                        f"complete checkpoint was {_step_name(expected)}")
    if trial.save_in_progress is not None and trial.resumed_from == trial.save_in_progress:
        problems.append(f"resumed from step {trial.save_in_progress}, whose save was cut short")
    repeated = sorted(_repeated([r["step"] for r in records])
                      - _repeated([r["step"] for r in before.records if r["kind"] == "train"]))
    if repeated:
        problems.append(f"metrics.jsonl now logs steps {_span(repeated)} more than once")
    problems.extend(_unreadable_problems(run_dir, log))
    trial.passed = not problems


def _metrics_lines(run_dir: Path) -> list[tuple[str, dict]]:
    """Complete lines only: a kill during a write may leave a last line without its newline,
    which the resumed run drops (moejax.training.metrics.read_metrics)."""
    path = Path(run_dir) / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return [(line, json.loads(line)) for line in lines if line]


def _repeated(steps: list[int]) -> set[int]:
    return {s for s in steps if steps.count(s) > 1}


def _unreadable_problems(run_dir: Path, log: Path) -> list[str]:
    """A checkpoint set aside as unreadable means a partly written one looked complete."""
    lines = log.read_text().splitlines() if log.exists() else []
    problems = [f"the resumed run said: {line.strip()[:200]}" for line in lines
                if "cannot be read" in line]
    directory = run_dir / "checkpoints"
    aside = sorted(p.name for p in directory.glob("unreadable-*")) if directory.is_dir() else []
    if aside:
        problems.append(f"checkpoints set aside as unreadable: {', '.join(aside)}")
    return problems


def _check_finished_run(run: Run, straight: dict, steps: int) -> None:
    """The finished run: each step logged once up to the end, losses equal to the straight
    run's, and summary.json covering the whole run."""
    run_dir = Path(run.run_dir)
    records = train_records(run_dir)
    logged = [r["step"] for r in records]
    run.steps_logged = len(logged)
    problems = run.problems
    if _last_step(records) != steps:
        problems.append(f"the run did not reach step {steps} (last logged: {_last_step(records)})")
    if logged != sorted(set(logged)):
        problems.append(f"metrics.jsonl logs steps {_span(sorted(_repeated(logged)))} more "
                        "than once"
                        if _repeated(logged) else "metrics.jsonl logs steps out of order")
    errors = {r["step"]: _relative_error(r["loss"], straight[r["step"]])
              for r in records if r["step"] in straight}
    run.max_relative_loss_error = max(errors.values(), default=None)
    bad = [step for step, error in errors.items() if not error <= LOSS_TOLERANCE]
    if bad:
        problems.append(f"losses differ from the straight run's at steps {_span(bad)} "
                        f"(largest relative error {run.max_relative_loss_error:.2e})")
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    if summary is None or summary["step"] != steps or [
            s for s, _ in summary["train_losses"]] != logged:
        problems.append("summary.json is missing or does not cover the whole run")
    run.passed = not problems


def _relative_error(loss: float | None, expected: float | None) -> float:
    if loss is None or expected is None:  # a non-finite loss is logged as null
        return math.inf
    return abs(loss - expected) / abs(expected)


def _last_step(records: list[dict]) -> int | None:
    return records[-1]["step"] if records else None


def _step_name(step: int | None) -> str:
    return "scratch (no checkpoint)" if step is None else f"step {step}"


def _span(steps: list[int]) -> str:
    return ", ".join(map(str, steps[:8])) + (", ..." if len(steps) > 8 else "")


def _kill_moment(trial: Trial) -> str:
    if trial.kind == "startup":
        return f"{trial.delay_s:.3f} s after the launch"
    if trial.kind == "step":
        return f"after step {trial.target} + {trial.delay_s:.3f} s"
    return f"once the save of step {trial.target} started + {trial.delay_s:.3f} s"


def _trial_line(trial: Trial) -> str:
    moment = _kill_moment(trial)
    cut = (f", save of step {trial.save_in_progress} cut short"
           if trial.save_in_progress is not None else "")
    verdict = "ok" if trial.passed else "FAILED: " + "; ".join(trial.problems)
    return (f"trial {trial.trial} (run {trial.run}): killed {moment}: last step logged "
            f"{trial.killed_after_step}{cut}; newest complete checkpoint "
            f"{_step_name(trial.newest_complete)}, resumed from "
            f"{_step_name(trial.resumed_from)}: {verdict}")


REPORT_INTRO = (
    "Training (`scripts/train.py`) killed with SIGKILL at random moments: during start-up (a "
    "random time after the launch), after a random step, or once an asynchronous orbax "
    "checkpoint save has started; every launch, first or not, is the same line "
    "(`--auto-resume`, as a scheduler's requeue repeats it). Every few kills the run is "
    "resumed to its end and its per-step losses compared with a straight run's (relative "
    "tolerance 1e-6). `moejax/tools/kill_trials.py` says what is checked; verdicts come from "
    "files only, so they hold wherever a kill lands.")


def markdown_report(result: KillTrialsResult, *, command: str, machine: str, date: str) -> str:
    """docs/kill_resume.md: how it was run, the outcome, and one table row per trial."""
    lines = ["# Kill -9 trials (`scripts/kill_resume.py`)", "", REPORT_INTRO, "",
             f"    {command}", "",
             f"Run on {date}, {machine}; {result.wall_seconds / 60:.1f} min in all.", "",
             "## Outcome", "", *_outcome_lines(result), "",
             "Config overrides: `" + " ".join(result.overrides) + "`.", "", "## Trials", "",
             ("| trial | run | kill moment | last step logged | save cut short "
              "| newest complete checkpoint | resumed from | verdict |"),
             "|---|---|---|---|---|---|---|---|"]
    for t in result.trials:
        moment = _kill_moment(t)
        verdict = "ok" if t.passed else "FAILED: " + "; ".join(t.problems)
        lines.append(f"| {t.trial} | {t.run} | {moment} | {t.killed_after_step} | "
                     f"{_or_dash(t.save_in_progress)} | {_or_dash(t.newest_complete)} | "
                     f"{_or_dash(t.resumed_from)} | {verdict} |")
    lines += ["", ("A dash under *newest complete checkpoint* or *resumed from*: none (the run "
                   "starts from scratch).")]
    failed_runs = [f"- run {r.run}: " + "; ".join(r.problems) for r in result.runs
                   if not r.passed]
    if failed_runs:
        lines += ["", "## Runs that failed", "", *failed_runs]
    return "\n".join(lines) + "\n"


def _outcome_lines(result: KillTrialsResult) -> list[str]:
    trials, runs = result.trials, result.runs
    passed = sum(t.passed for t in trials)
    cut_short = [t for t in trials if t.save_in_progress is not None]
    taken = [t for t in cut_short if t.resumed_from == t.save_in_progress]
    unreadable = [t for t in trials if any("unreadable" in p for p in t.problems)]
    scratch = sum(t.newest_complete is None for t in trials)
    waits = sum(t.kind == "save" for t in trials)
    startups = [t for t in trials if t.kind == "startup"]
    before_first_step = sum(t.killed_after_step is None for t in startups)
    largest = max((r.max_relative_loss_error or 0.0) for r in runs) if runs else 0.0
    return [
        (f"- **{passed} of {len(trials)} trials resumed correctly** from the newest complete "
         f"checkpoint, or from scratch where none was complete yet ({scratch} kills)."),
        (f"- {len(cut_short)} of {len(trials)} kills landed while a checkpoint save was being "
         f"written ({waits} kills waited for a save to start, {len(startups)} landed during "
         f"start-up ({before_first_step} before the launch's first step), "
         f"{len(trials) - waits - len(startups)} after a step); "
         f"{len(taken)} resumes took a cut-short save, {len(unreadable)} found a checkpoint "
         "unreadable."),
        (f"- {sum(r.passed for r in runs)} of {len(runs)} runs finished with each step logged "
         "once and per-step losses equal to the straight run's (largest relative error "
         + ("0: bit-identical" if largest == 0 else f"{largest:.1e}") + ")."),
    ]


def _or_dash(step: int | None) -> str:
    return "-" if step is None else str(step)
