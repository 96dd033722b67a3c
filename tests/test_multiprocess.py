"""Multi-host training, emulated: 2 processes x 4 CPU devices (gloo collectives) give the same
losses as one process with 8 devices, with the start-up peak measured as by default, even when
one process starts its work 45 s after the other (a slow host)."""

import json
import socket
import subprocess
import sys
from pathlib import Path

from helpers import subprocess_env
from test_train import REPO, corpus_dir, train_config, train_config_overrides  # noqa: F401

from moejax.training.loop import train

MESH = ("mesh.data=1", "mesh.expert=8", "train.steps=3")
LATE_START_S = 45


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def default_peak_overrides(corpus_dir):  # noqa: F811
    """The test overrides without the fixed peak FLOP/s: processes measure it at start-up."""
    return [o for o in train_config_overrides(corpus_dir)
            if not o.startswith("train.peak_flops_per_device")]


def test_two_processes_match_one_with_a_late_process(corpus_dir, tmp_path):  # noqa: F811
    run_dir, port = tmp_path / "multi", free_port()
    env = subprocess_env(4)
    train_args = [str(REPO / "scripts" / "train.py"), "--run-dir", str(run_dir), "--no-progress",
                  "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                  *default_peak_overrides(corpus_dir), *MESH]
    # both processes start through the same launcher (process 0 without delay): every host of
    # a real run starts the same way, and on jax 0.12.1 processes started through different
    # entry points (scripts/train.py directly vs this launcher) deadlock in their first step's
    # gloo collectives, with or without any delay (found this round; cause not yet known)
    late_start = str(REPO / "tests" / "late_start.py")
    launchers = [[late_start, "0"], [late_start, str(LATE_START_S)]]
    procs = [
        subprocess.Popen([sys.executable, *launchers[i], *train_args, "--process-id", str(i)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    # the one-device reference trains while process 1 sleeps and process 0 waits for it
    expected = train(train_config(corpus_dir, *MESH), tmp_path / "single", progress=False)
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output
    assert "waiting 45 s" in outputs[1]
    assert "2 process(es)" in outputs[0] and "{'pipe': 1, 'data': 1, 'fsdp': 1, 'expert': 8}" in outputs[0]
    assert "MFU" in outputs[0]

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    losses = {r["step"]: r["loss"] for r in records if r["kind"] == "train"}
    assert sorted(losses) == [1, 2, 3]
    for step, loss in expected["train_losses"]:
        assert abs(losses[step] - loss) <= 1e-5 * abs(loss), (step, losses[step], loss)
    assert all(0 < r["mfu"] < 10 for r in records if r["kind"] == "train" and r["step"] > 1)
    assert Path(run_dir / "summary.json").exists()


def test_missing_process_is_named_in_one_line(tmp_path):
    """Process 1 of 2 never starts: process 0 gives up after the start-up timeout with one
    line naming it."""
    port = free_port()
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"), "--coordinator", f"127.0.0.1:{port}",
         "--num-processes", "2", "--process-id", "0", "--startup-timeout", "5",
         "--run-dir", str(tmp_path / "run")],
        env=subprocess_env(4), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "within 5 s" in errors[0], proc.stderr
    assert not (tmp_path / "run").exists()


def test_process_late_beyond_the_timeout_is_named(tmp_path):
    """Process 1 joins, then stalls past the 10 s start-up timeout: process 0 stops at its next
    barrier with one line naming process 1."""
    port = free_port()
    common = [str(REPO / "scripts" / "train.py"), "--coordinator", f"127.0.0.1:{port}",
              "--num-processes", "2", "--startup-timeout", "10", "--run-dir", str(tmp_path / "run"),
              "--no-progress", "train.peak_flops_per_device=1e9"]
    stalled = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "late_start.py"), "120", *common, "--process-id", "1"],
        env=subprocess_env(4), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        first = subprocess.run([sys.executable, *common, "--process-id", "0"],
                               env=subprocess_env(4), capture_output=True, text=True, timeout=300, check=False)
    finally:
        stalled.kill()
        stalled.wait()
    assert first.returncode == 2, first.stderr
    errors = [line for line in first.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, first.stderr
    assert "process(es) 1 of 2 did not reach" in errors[0] and "within 10 s" in errors[0]
    assert not (tmp_path / "run").exists()
