"""One writer per run (moejax/training/runlock.py): a second start or resume of a run directory
refuses in one line naming the owner and changes nothing; a stale lock (owner gone on this host,
or no heartbeat from another host) is taken over with one line; `--auto-resume` is a launch
line that is safe to repeat."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import subprocess_env
from test_bad_input import assert_one_sentence, run_script, snapshot
from test_train import corpus_dir, train_config_overrides  # noqa: F401

from moejax.training.runlock import LOCK_FILE, RunLock, RunLockedError

REPO = Path(__file__).resolve().parent.parent


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def write_lock(run_dir: Path, host: str, pid: int, age_s: float = 0.0) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    path.write_text(json.dumps({"host": host, "pid": pid, "token": "old", "since": "then"}))
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


def test_a_held_lock_refuses_a_second_owner_and_is_removed_on_release(tmp_path):
    first = RunLock(tmp_path / "run")
    first.acquire()
    owner = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    with pytest.raises(RunLockedError, match=f"in use by process {os.getpid()} on "):
        RunLock(tmp_path / "run").acquire()
    first.release()
    assert not (tmp_path / "run").exists()  # acquiring made it, nothing was written: gone
    second = RunLock(tmp_path / "run")
    second.acquire()
    second.release()


def test_stale_locks_are_taken_over_with_one_line_and_live_ones_are_not(tmp_path):
    lines = []
    write_lock(tmp_path / "a", socket.gethostname(), dead_pid())
    lock = RunLock(tmp_path / "a")
    lock.acquire(lines.append)
    assert len(lines) == 1 and "is no longer running" in lines[0]
    assert json.loads((tmp_path / "a" / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()

    write_lock(tmp_path / "b", "another-host", 1, age_s=120)
    lock = RunLock(tmp_path / "b", stale_after_s=60)
    lock.acquire(lines.append)
    assert "has not renewed it for 120 s" in lines[1]
    lock.release()

    path = write_lock(tmp_path / "c", "another-host", 1, age_s=30)
    before = path.read_bytes()
    with pytest.raises(RunLockedError, match="in use by process 1 on another-host"):
        RunLock(tmp_path / "c", stale_after_s=60).acquire(lines.append)
    assert path.read_bytes() == before and len(lines) == 2


def test_a_requeued_job_takes_over_its_earlier_attempts_lock(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    path = write_lock(run_dir, "another-host", 1)
    path.write_text(json.dumps({**json.loads(path.read_text()), "job": "42", "attempt": 0}))
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")  # the same attempt: may be alive
    with pytest.raises(RunLockedError, match="in use by process 1 on another-host"):
        RunLock(run_dir).acquire()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # requeued: the old attempt has ended
    lines = []
    lock = RunLock(run_dir)
    lock.acquire(lines.append)
    assert "was attempt 0 of job 42, which the scheduler has restarted" in lines[0]
    assert json.loads(path.read_text())["attempt"] == 1
    lock.release()


def test_the_owner_renews_its_lock(tmp_path):
    lock = RunLock(tmp_path / "run", stale_after_s=1.0)
    lock.acquire()
    path = tmp_path / "run" / LOCK_FILE
    stamp = time.time() - 100
    os.utime(path, (stamp, stamp))
    time.sleep(0.5)  # five heartbeats of 0.1 s
    assert time.time() - path.stat().st_mtime < 1.0
    lock.release()


@pytest.fixture(scope="module")
def auto_resumed_run(corpus_dir, tmp_path_factory):  # noqa: F811
    """A run started by `--auto-resume` over a dead start's lock, then the same line again."""
    run_dir = tmp_path_factory.mktemp("auto") / "run"
    # a launch killed during start-up, before the run directory held anything but its lock
    write_lock(run_dir, socket.gethostname(), dead_pid())
    line = ["--no-progress", "--run-dir", str(run_dir), "--auto-resume",
            *train_config_overrides(corpus_dir), "train.checkpoint_every=2"]
    outputs = []
    for steps in (2, 4):  # the same line twice: starts, then resumes
        out = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), *line,
                              f"train.steps={steps}"], env=subprocess_env(8),
                             capture_output=True, text=True, check=False)
        assert out.returncode == 0, out.stderr
        outputs.append(out.stdout)
    return run_dir, line, outputs


def train_steps(run_dir: Path) -> list[int]:
    records = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if r["kind"] == "train"]


def test_auto_resume_starts_then_resumes_over_a_dead_starts_lock(auto_resumed_run):
    run_dir, _, (first, second) = auto_resumed_run
    assert f"took over the stale lock of {run_dir}" in first and "no longer running" in first
    assert "took over" not in second  # the first run released its lock
    assert train_steps(run_dir) == [1, 2, 3, 4]
    assert not (run_dir / LOCK_FILE).exists()


def test_a_live_run_refuses_a_second_start_and_resume(auto_resumed_run, capsys):
    run_dir, line, _ = auto_resumed_run
    owner = RunLock(run_dir)  # the owner of a live run: this process
    owner.acquire()
    before = snapshot(run_dir)
    overrides = line[line.index("--auto-resume") + 1:]
    try:
        for flag in ([], ["--resume"], ["--auto-resume"]):
            code, err = run_script(capsys, "--run-dir", str(run_dir), *flag, *overrides)
            assert code == 2
            assert_one_sentence(err, f"run directory {run_dir} is in use by process "
                                     f"{os.getpid()} on {socket.gethostname()}")
            assert snapshot(run_dir) == before
    finally:
        owner.release()


def test_two_concurrent_starts_one_trains_the_other_names_it(corpus_dir, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "scripts" / "train.py"), "--no-progress", "--run-dir",
           str(run_dir), *train_config_overrides(corpus_dir), "train.steps=6"]
    env = subprocess_env(8)
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    started = time.monotonic()
    finished = {}
    while len(finished) < 2:
        for i, proc in enumerate(procs):
            if i not in finished and proc.poll() is not None:
                finished[i] = (time.monotonic() - started, proc.returncode,
                               proc.stdout.read(), proc.stderr.read())
        time.sleep(0.1)
    codes = sorted(code for _, code, _, _ in finished.values())
    assert codes == [0, 2], finished
    refused = next(f for f in finished.values() if f[1] == 2)
    owner = next(p for i, p in enumerate(procs) if finished[i][1] == 0)
    assert refused[0] < 30, refused
    assert_one_sentence(refused[3], f"is in use by process {owner.pid} on")
    assert train_steps(run_dir) == [1, 2, 3, 4, 5, 6]
