"""One writer per run: a lock file in the run directory, owned by process 0 of the run.

The lock is created whole or not at all with a hard link (`os.link` of a written temporary file
fails if the lock exists, atomically, on local filesystems and on NFS, where flock may not
work). The owner refreshes the lock's modification time every `stale_after_s / 10` seconds
(a heartbeat), so another host can tell a live owner from a dead one. A lock is stale when its
owner's process is gone on this host, or its heartbeat is older than `stale_after_s`; a stale
lock is moved aside (`os.rename` to a unique name, which only one taker can do) and replaced.

A scheduler that requeues or restarts a job (SLURM `--requeue`, a JobSet restart) starts the
new attempt only once every process of the old one has ended, so a lock left by an earlier
attempt of the same job is stale at once: the owner record keeps the job and its attempt
(SLURM_JOB_ID / SLURM_RESTART_COUNT, or MOEJAX_JOB_ID / MOEJAX_JOB_ATTEMPT set by the launcher).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import jax

from moejax.training import distributed

LOCK_FILE = "lock.json"
STALE_AFTER_ENV = "MOEJAX_LOCK_STALE_AFTER"
# (job id, attempt) variables: SLURM's own, else the launcher's (docs/launch/jobset.yaml)
JOB_ENV = (("SLURM_JOB_ID", "SLURM_RESTART_COUNT"), ("MOEJAX_JOB_ID", "MOEJAX_JOB_ATTEMPT"))
DEFAULT_STALE_AFTER_S = 600.0


def is_lock_file(path: Path) -> bool:
    """The lock or one of its temporary names (a run directory holding only these is empty)."""
    return path.name == LOCK_FILE or path.name.startswith(f".{LOCK_FILE}.")


class RunLockedError(RuntimeError):
    """Another live process owns the run directory; the message names it."""


def stale_after_from_env() -> float:
    value = os.environ.get(STALE_AFTER_ENV)
    return float(value) if value else DEFAULT_STALE_AFTER_S


def _job_attempt() -> tuple[str, int] | None:
    """(job id, attempt) of the scheduler job this process belongs to, or None outside one."""
    for job_env, attempt_env in JOB_ENV:
        if os.environ.get(job_env):
            return os.environ[job_env], int(os.environ.get(attempt_env) or 0)
    return None


def _owner_record() -> dict:
    record = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
              "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    job = _job_attempt()
    if job is not None:
        record.update(job=job[0], attempt=job[1])
    return record


def _describe(owner: dict) -> str:
    return f"process {owner.get('pid')} on {owner.get('host')} since {owner.get('since')}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _read(path: Path) -> tuple[dict, float] | None:
    """(owner record, seconds since its last heartbeat), or None when there is no lock. A lock
    that cannot be parsed (its writer died mid-way cannot happen: it is linked whole; a lock
    edited by hand can) counts as an unknown owner."""
    try:
        text, mtime = path.read_text(), path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        owner = json.loads(text)
    except ValueError:
        owner = {}
    return (owner if isinstance(owner, dict) else {}), time.time() - mtime


def _stale_reason(owner: dict, age_s: float, stale_after_s: float) -> str | None:
    """Why the lock's owner is gone, or None when it may be alive."""
    job = _job_attempt()
    if (job is not None and owner.get("job") == job[0]
            and isinstance(owner.get("attempt"), int) and owner["attempt"] < job[1]):
        return (f"{_describe(owner)} was attempt {owner['attempt']} of job {job[0]}, which the "
                f"scheduler has restarted (this is attempt {job[1]})")
    if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
        if not _pid_alive(owner["pid"]):
            return f"{_describe(owner)} is no longer running"
        return None
    if age_s > stale_after_s:
        return (f"{_describe(owner)} has not renewed it for {age_s:.0f} s (over "
                f"{stale_after_s:.0f} s, {STALE_AFTER_ENV})")
    return None


class RunLock:
    """The lock of `run_dir`, held from `acquire` to `release` (or the process's death)."""

    def __init__(self, run_dir: Path, stale_after_s: float | None = None):
        self.path = Path(run_dir) / LOCK_FILE
        self.stale_after_s = stale_after_from_env() if stale_after_s is None else stale_after_s
        self.owner = _owner_record()
        self._stop = threading.Event()
        self._heartbeat = None
        self.created_dir = False

    def acquire(self, report=None) -> None:
        """Own the run or raise RunLockedError naming the live owner. A stale lock is taken
        over and `report` (e.g. print) gets one line saying whose and why."""
        self.created_dir = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a lost race with another taker: look again
            if self._create():
                break
            found = _read(self.path)
            if found is None:
                continue
            owner, age_s = found
            reason = _stale_reason(owner, age_s, self.stale_after_s)
            if reason is None:
                raise RunLockedError(
                    f"run directory {self.path.parent} is in use by {_describe(owner)} "
                    f"(lock {self.path}): wait for it to finish or stop it; if it is gone, "
                    f"the lock counts as stale after {self.stale_after_s:.0f} s without a "
                    f"heartbeat ({STALE_AFTER_ENV}).")
            if self._take_over(owner) and self._create():
                if report:
                    report(f"took over the stale lock of {self.path.parent}: {reason}")
                break
        else:
            raise RunLockedError(f"could not lock {self.path.parent}: other processes keep "
                                 "taking its lock; start one process per run.")
        self._heartbeat = threading.Thread(target=self._beat, daemon=True, name="run-lock")
        self._heartbeat.start()

    def _create(self) -> bool:
        tmp = self.path.with_name(f".{LOCK_FILE}.{self.owner['token']}")
        tmp.write_text(json.dumps(self.owner) + "\n")
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def _take_over(self, stale_owner: dict) -> bool:
        """Move the stale lock aside; False when another taker moved it first (or it changed)."""
        aside = self.path.with_name(f".{LOCK_FILE}.stale.{self.owner['token']}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        moved = _read(aside)
        if moved is not None and moved[0] != stale_owner:
            # a new owner's lock, created between our read and the rename: put it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink()
            return False
        aside.unlink(missing_ok=True)
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.stale_after_s / 10):
            try:
                os.utime(self.path)
            except OSError:  # the run directory went away; the run will fail on its own
                return

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours (and the run directory,
        if acquiring made it and nothing was written there since: a failed start leaves
        nothing behind)."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        found = _read(self.path)
        if found is not None and found[0].get("token") == self.owner["token"]:
            self.path.unlink(missing_ok=True)
        if self.created_dir:
            try:
                self.path.parent.rmdir()
            except OSError:  # the run wrote something: it stays
                pass


@contextlib.contextmanager
def owning_run(run_dir: Path, report=None):
    """Process 0 holds `run_dir`'s lock for the block; every process raises RunLockedError
    (process 0's sentence) when the run belongs to another live process."""
    lock = RunLock(run_dir) if jax.process_index() == 0 else None
    refusal = ""
    if lock is not None:
        try:
            lock.acquire(report)
        except RunLockedError as err:
            refusal = str(err)
    refusal = distributed.broadcast_text("run lock", refusal)
    if refusal:
        raise RunLockedError(refusal)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
