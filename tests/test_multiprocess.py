"""Multi-host training, emulated: 2 processes x 4 CPU devices (gloo collectives) give the same
losses as one process with 8 devices."""

import json
import socket
import subprocess
import sys
from pathlib import Path

from helpers import subprocess_env
from test_train import REPO, corpus_dir, train_config, train_config_overrides  # noqa: F401

from moejax.training.loop import train

MESH = ("mesh.data=1", "mesh.expert=8", "train.steps=3")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_match_one(corpus_dir, tmp_path):  # noqa: F811
    expected = train(train_config(corpus_dir, *MESH), tmp_path / "single", progress=False)

    run_dir, port = tmp_path / "multi", free_port()
    env = subprocess_env(4)
    procs = [
        subprocess.Popen(
            [sys.executable, str(REPO / "scripts" / "train.py"), "--run-dir", str(run_dir),
             "--no-progress", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
             "--process-id", str(i), *train_config_overrides(corpus_dir), *MESH],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output
    assert "2 process(es)" in outputs[0] and "{'data': 1, 'fsdp': 1, 'expert': 8}" in outputs[0]

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    losses = {r["step"]: r["loss"] for r in records if r["kind"] == "train"}
    assert sorted(losses) == [1, 2, 3]
    for step, loss in expected["train_losses"]:
        assert abs(losses[step] - loss) <= 1e-5 * abs(loss), (step, losses[step], loss)
    assert Path(run_dir / "summary.json").exists()
