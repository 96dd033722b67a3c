"""A checkpoint save that fails for the storage (full disk, quota, I/O error): the run stops with
one line (exit 1), the newest complete checkpoint stays and restores, and the partial save is
never listed as a step.

The fault is real: the run's checkpoints/ is a small tmpfs (mounted for the test, so root is
needed; the test is skipped where mounting is not allowed) holding the run's first checkpoint
with room for half of another, so the kernel answers the next save's writes, made by
tensorstore in orbax's background thread, with ENOSPC. Nothing in orbax or tensorstore is
patched. After the fault the filesystem is grown (as a user frees space) and `--resume` finishes
the run with the straight run's losses. EDQUOT and EIO, which cannot be produced without a
quota setup or a failing device, are checked on the message and its classification."""

import errno
import json
import logging
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import load_script
from test_train import corpus_dir, train_config, train_config_overrides  # noqa: F401

from moejax.training.checkpoint import (
    Checkpoints,
    _QuietStorageFaults,
    save_failure_message,
    storage_errno,
)
from moejax.training.loop import train

RUN = ("train.steps=6", "train.checkpoint_every=2")


def pages(directory: Path) -> int:
    """4 KiB pages that `directory`'s files take on a tmpfs."""
    return sum(math.ceil(p.stat().st_size / 4096) for p in directory.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def straight(corpus_dir, tmp_path_factory):  # noqa: F811
    """{step: loss} of the run trained straight through (6 steps, a checkpoint every 2)."""
    summary = train(train_config(corpus_dir, *RUN), tmp_path_factory.mktemp("straight") / "run",
                    progress=False)
    return dict(summary["train_losses"])


@pytest.fixture(scope="module")
def started(corpus_dir, tmp_path_factory):  # noqa: F811
    """A run stopped after step 2 (as a preemption would), holding checkpoint 2."""
    run_dir = tmp_path_factory.mktemp("started") / "run"
    train(train_config(corpus_dir, *RUN), run_dir, progress=False, max_steps=2)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["2"]
    return run_dir


def mount_tmpfs(path: Path, size_bytes: int) -> None:
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
                          check=False, capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.strip()}")


def run_script(capfd, *argv) -> tuple[int, str]:
    """(exit code, everything written to the stderr file descriptor) of scripts/train.py."""
    code = load_script("train").main(["--no-progress", *argv])
    return code, capfd.readouterr().err


@pytest.mark.parametrize("noticed", ["next save", "close"])
def test_full_disk_during_a_save_stops_in_one_line_and_resumes(
        noticed, straight, started, corpus_dir, tmp_path, capfd):  # noqa: F811
    """At the next save: the save of step 4 fails in the background and is noticed between
    steps or at the save of step 6. At close: the only save after the fault is the final one
    (step 6), noticed when the run closes its checkpoints."""
    run_dir = tmp_path / "run"
    shutil.copytree(started, run_dir)
    checkpoints = run_dir / "checkpoints"
    kept = tmp_path / "kept"
    checkpoints.rename(kept)
    checkpoints.mkdir()
    size = pages(kept / "2")
    mount_tmpfs(checkpoints, (size + size // 2) * 4096)  # checkpoint 2 and half of another
    try:
        shutil.copytree(kept / "2", checkpoints / "2")
        overrides = [*train_config_overrides(corpus_dir), *RUN]
        if noticed == "close":
            overrides.append("train.checkpoint_every=0")
        code, stderr = run_script(capfd, "--run-dir", str(run_dir), "--resume", *overrides)

        failed_step = 4 if noticed == "next save" else 6
        lines = stderr.strip().splitlines()
        assert code == 1
        assert len(lines) == 1 and lines[0].startswith("error: "), stderr
        assert lines[0] == "error: " + save_failure_message(failed_step, checkpoints,
                                                            errno.ENOSPC, 2)
        assert "No space left on device (ENOSPC)" in lines[0]
        assert f"then resume with --run-dir {run_dir} --resume." in lines[0]
        # the partial save is gone (it only held space) and orbax lists only the complete one
        assert sorted(p.name for p in checkpoints.iterdir()) == ["2"]
        reader = Checkpoints(checkpoints)
        assert reader.manager.all_steps() == [2]
        reader.close()
        assert json.loads((run_dir / "summary.json").read_text())["step"] == 2  # not rewritten

        # space freed: the same launch line resumes from checkpoint 2 and finishes the run
        subprocess.run(["mount", "-o", "remount,size=64m", str(checkpoints)], check=True)
        code, stderr = run_script(capfd, "--run-dir", str(run_dir), "--resume", *overrides)
        assert code == 0, stderr
    finally:
        subprocess.run(["umount", "-l", str(checkpoints)], check=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    resumed = dict(summary["train_losses"])
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step, loss in straight.items():
        assert abs(resumed[step] - loss) <= 1e-6 * abs(loss), (step, resumed[step], loss)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]


FAULTS = {
    errno.ENOSPC: ("No space left on device (ENOSPC)", "free space"),
    errno.EDQUOT: ("Disk quota exceeded (EDQUOT)", "raise the quota"),
    errno.EIO: ("Input/output error (EIO)", "check the storage"),
}


def tensorstore_error(code: int) -> ValueError:
    """What orbax re-raises for a failed tensorstore write (the form seen with a full tmpfs)."""
    return ValueError(f'RESOURCE_EXHAUSTED: Error writing "params.w/0" in OCDBT database at '
                      f'local file "/ck/4.orbax-checkpoint-tmp/state/": Failed to write 4096 '
                      f"bytes to file 20: {os.strerror(code)} [os_error_code='{code}']")


@pytest.mark.parametrize("code", FAULTS, ids=[errno.errorcode[c] for c in FAULTS])
def test_each_storage_fault_reads_as_one_line(code):
    named, advice = FAULTS[code]
    assert storage_errno(tensorstore_error(code)) == code
    assert storage_errno(OSError(code, os.strerror(code))) == code
    try:  # as orbax re-raises it from its finalize thread, with the write's error as the cause
        try:
            raise tensorstore_error(code)
        except ValueError as err:
            raise RuntimeError("Save Finalize thread failed") from err
    except RuntimeError as wrapped:
        assert storage_errno(wrapped) == code
    message = save_failure_message(4, Path("/runs/r/checkpoints"), code, 2)
    assert "\n" not in message and message.endswith(".")
    assert message.startswith(f"checkpoint save of step 4 in /runs/r/checkpoints failed: {named};")
    assert "the run stopped, keeping checkpoint 2 (the newest complete one)" in message
    assert advice in message and message.endswith("then resume with --run-dir /runs/r --resume.")
    # orbax's own records of the fault are dropped; the same record of another error is kept
    quiet = _QuietStorageFaults()
    record = logging.LogRecord("absl", logging.ERROR, "/x/orbax/checkpoint/a.py", 1, "failed",
                               None, (ValueError, tensorstore_error(code), None))
    assert not quiet.filter(record)
    record.exc_info = (KeyError, KeyError("params"), None)
    assert quiet.filter(record)
    abandoned = "Task was destroyed but it is pending!\ntask: <Task coro=<write() at /x/orbax/s.py>>"
    assert not quiet.filter(logging.LogRecord("asyncio", logging.ERROR, "", 1, abandoned, None,
                                              None))
    assert quiet.filter(logging.LogRecord("asyncio", logging.ERROR, "", 1, "Task was destroyed "
                                          "but it is pending! coro=<mine()>", None, None))


def test_other_errors_are_not_storage_faults():
    """A bug in a save keeps its traceback: only the storage faults become one line."""
    assert storage_errno(KeyError("params")) is None
    assert storage_errno(ValueError("Expected args of type `Composite`")) is None
    assert storage_errno(OSError(errno.ENOENT, "No such file or directory")) is None
    assert "before any checkpoint was complete" in save_failure_message(
        2, Path("/r/checkpoints"), errno.ENOSPC, None)


def test_a_full_disk_under_the_metrics_is_one_line_too(corpus_dir, tmp_path, capfd,  # noqa: F811
                                                       monkeypatch):
    """Not a checkpoint: metrics.jsonl's write fails (injected at the writer, since the run
    directory's other writers would fill a real small disk in no fixed order)."""
    from moejax.training import metrics

    def full_disk(self, step, kind, values):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.jsonl.name)

    monkeypatch.setattr(metrics.MetricsWriter, "write", full_disk)
    run_dir = tmp_path / "run"
    code, err = run_script(capfd, "--run-dir", str(run_dir), *train_config_overrides(corpus_dir),
                           *RUN)
    assert code == 1
    assert err.strip() == (
        f"error: writing {run_dir / 'metrics.jsonl'} failed: No space left on device; the run "
        "stopped; free space on that filesystem (or raise the quota), then resume with "
        f"--run-dir {run_dir} --resume.")
