"""Bad input to `scripts/train.py`: each case answers with one sentence saying what is wrong and
how to fix it (exit code 2, no traceback) and loses nothing: no run directory made, none
changed, no checkpoint overwritten. (Corpus and prepare_data.py cases: tests/test_data.py.)"""

import os
import shutil
import stat
from pathlib import Path

import pytest
from helpers import load_script
from test_train import corpus_dir, train_config, train_config_overrides  # noqa: F401

from moejax.training.loop import train


def run_script(capsys, *argv) -> tuple[int, str]:
    """(exit code, stderr) of scripts/train.py main(argv), run in this process."""
    code = load_script("train").main(["--no-progress", *argv])
    return code, capsys.readouterr().err


def assert_one_sentence(stderr: str, *fragments: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].endswith("."), stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def snapshot(directory: Path) -> dict:
    """{relative path: (size, mtime)} of every file under `directory` (empty if absent)."""
    if not directory.exists():
        return {}
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


CONFIG_CASES = {
    "unknown key": (["moe.num_expertz=4"], "unknown config key 'moe.num_expertz'"),
    "wrong type": (["train.steps=many"], "bad value for config key 'train.steps'"),
    "top_k > experts": (["moe.top_k=9"], "moe.top_k=9 must be between 1 and moe.num_experts=8"),
    "experts vs expert axis": (["mesh.data=1", "mesh.expert=8", "moe.num_experts=12"],
                               "not divisible by the expert mesh axis"),
    "mesh larger than devices": (["mesh.data=4", "mesh.expert=4"],
                                 "needs 16 devices but only 8 are available"),
    "d_model of 0": (["model.d_model=0"], "model.d_model=0 must be a positive size"),
    "experts ffn of 0": (["moe.expert_ffn_dim=0"], "moe.expert_ffn_dim=0 must be a positive"),
    "negative learning rate": (["train.learning_rate=-0.001"],
                               "train.learning_rate=-0.001 must be a positive number"),
    "huge init_std": (["model.init_std=1e6"], "model.init_std=1000000.0 must be in (0, 1]"),
    "batch vs data parallel": (["train.global_batch_size=12"],
                               "global_batch_size=12 is not divisible by the 8 data-parallel"),
    "batch of 0": (["train.global_batch_size=0"], "train.global_batch_size=0"),
    "no eval batches": (["train.eval_batches=0"], "train.eval_batches=0 must be positive"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_config_stops_before_the_run_directory(case, corpus_dir, tmp_path, capsys):  # noqa: F811
    overrides, message = CONFIG_CASES[case]
    run_dir = tmp_path / "run"
    code, stderr = run_script(capsys, "--run-dir", str(run_dir),
                              *train_config_overrides(corpus_dir), *overrides)
    assert code == 2
    assert_one_sentence(stderr, message)
    assert not run_dir.exists()


def test_unknown_preset(tmp_path, capsys):
    code, stderr = run_script(capsys, "--config", "nope", "--run-dir", str(tmp_path / "run"))
    assert code == 2
    assert_one_sentence(stderr, "config 'nope' not found", "tiny")
    assert not (tmp_path / "run").exists()


def test_run_dir_that_is_a_file(corpus_dir, tmp_path, capsys):  # noqa: F811
    path = tmp_path / "run"
    path.write_text("my notes\n")
    code, stderr = run_script(capsys, "--run-dir", str(path), *train_config_overrides(corpus_dir))
    assert code == 2
    assert_one_sentence(stderr, "is a file, not a directory", "choose another --run-dir")
    assert path.read_text() == "my notes\n"


def test_read_only_run_dir(corpus_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    parent = tmp_path / "read_only"
    parent.mkdir()
    parent.chmod(stat.S_IRUSR | stat.S_IXUSR)
    if os.geteuid() == 0:  # root writes through permission bits; judge by the bits alone
        monkeypatch.setattr("moejax.training.rundir.os.access",
                            lambda path, mode: not (mode & os.W_OK) or bool(
                                os.stat(path).st_mode & stat.S_IWUSR))
    try:
        code, stderr = run_script(capsys, "--run-dir", str(parent / "run"),
                                  *train_config_overrides(corpus_dir))
    finally:
        parent.chmod(stat.S_IRWXU)
    assert code == 2
    assert_one_sentence(stderr, "is not writable", "choose a writable --run-dir")
    assert list(parent.iterdir()) == []


@pytest.fixture(scope="module")
def finished_run(corpus_dir, tmp_path_factory):  # noqa: F811
    """A 4-step run with checkpoints at steps 2 and 4 (copied per test before any change)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    train(train_config(corpus_dir, "train.checkpoint_every=2"), run_dir, progress=False,
          max_steps=4)
    return run_dir


def test_resume_with_a_different_model(finished_run, corpus_dir, tmp_path, capsys):  # noqa: F811
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    before = snapshot(run_dir)
    code, stderr = run_script(capsys, "--run-dir", str(run_dir), "--resume",
                              *train_config_overrides(corpus_dir), "model.d_model=64")
    assert code == 2
    assert_one_sentence(stderr, "cannot resume", "model.d_model (32 -> 64)")
    assert snapshot(run_dir) == before


def test_resume_with_every_checkpoint_damaged(finished_run, corpus_dir, tmp_path, capsys):  # noqa: F811
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    for path in (run_dir / "checkpoints").rglob("*"):
        if path.is_file() and path.stat().st_size > 1000:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    before = snapshot(run_dir)
    code, stderr = run_script(capsys, "--run-dir", str(run_dir), "--resume",
                              *train_config_overrides(corpus_dir), "train.steps=300")
    assert code == 2
    assert_one_sentence(stderr, "no readable checkpoint", "steps [2, 4] are all damaged")
    assert snapshot(run_dir) == before  # config.yaml not rewritten, nothing set aside


def test_diverging_run_stops_and_never_checkpoints_a_bad_state(corpus_dir, tmp_path, capsys):  # noqa: F811
    run_dir = tmp_path / "run"
    code, stderr = run_script(capsys, "--run-dir", str(run_dir),
                              *train_config_overrides(corpus_dir), "train.learning_rate=1e10",
                              "train.warmup_steps=0", "train.max_skipped_steps_in_row=3",
                              "train.checkpoint_every=4")
    assert code == 1
    assert_one_sentence(stderr, "training diverged: the last 3 steps", "lower train.learning_rate")
    import json

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    skipped = [r["skipped_steps"] for r in records]
    assert skipped[-1] == 3 and records[-1]["step"] <= 4
    assert records[-1]["loss"] is None  # a non-finite loss is logged as null, never bare NaN
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())
