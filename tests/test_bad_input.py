"""Bad input to `scripts/train.py`: each case answers with one sentence saying what is wrong and
how to fix it (exit code 2, no traceback) and loses nothing: no run directory made, none
changed, no checkpoint overwritten. (Corpus and prepare_data.py cases: tests/test_data.py.)"""

import json
import os
import shutil
import stat
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import assert_trees_bit_equal, load_script, max_relative_error
from test_train import corpus_dir, train_config, train_config_overrides  # noqa: F401

from moejax import make_mesh
from moejax.config import CONFIG_DIR
from moejax.training.checkpoint import Checkpoints
from moejax.training.loop import train
from moejax.training.state import init_train_state


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
    """{relative path: (bytes, mtime) of a file, None for a folder} of everything under
    `directory` (empty if absent): its listing and every file's contents."""
    if not directory.exists():
        return {}
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
            if p.is_file() else None for p in sorted(directory.rglob("*"))}


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


def test_diverging_run_keeps_its_good_checkpoints_and_saves_no_bad_state(corpus_dir, tmp_path,  # noqa: F811
                                                                          capsys):
    """A run that trains, checkpoints, then diverges: the learning rate warms up from 0 to
    2e6 over 199 steps (1e4 more each step), so steps 1-4 are finite and the weights then
    overflow. The checkpoints of steps 2 and 4 are kept, the one of step 6 (a skipped step)
    holds step 4's weights, and every saved value is finite."""
    run_dir = tmp_path / "run"
    code, stderr = run_script(capsys, "--run-dir", str(run_dir),
                              *train_config_overrides(corpus_dir), "train.learning_rate=2e6",
                              "train.warmup_steps=199", "train.max_skipped_steps_in_row=3",
                              "train.checkpoint_every=2", "train.keep_checkpoints=3")
    assert code == 1
    assert_one_sentence(stderr, "training diverged: the last 3 steps (to step 7)",
                        "lower train.learning_rate")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert [(r["step"], r["skipped_steps"]) for r in records] == [
        (1, 0), (2, 0), (3, 0), (4, 0), (5, 1), (6, 2), (7, 3)]
    assert records[-1]["grad_norm"] is None  # a non-finite value is logged as null, not NaN
    assert all(r["grad_norm"] is not None for r in records[:4])

    cfg = train_config(corpus_dir, "train.learning_rate=2e6", "train.warmup_steps=199")
    checkpoints = Checkpoints(run_dir / "checkpoints")
    try:
        assert checkpoints.manager.all_steps() == [2, 4, 6]
        like = init_train_state(cfg, jax.random.key(0), make_mesh(cfg.mesh))
        states = {step: checkpoints.restore(step, like)[0] for step in (2, 4, 6)}
    finally:
        checkpoints.close()
    for step, state in states.items():
        assert int(state.step) == step
        for path, leaf in jax.tree_util.tree_leaves_with_path(state):
            assert np.isfinite(np.asarray(leaf)).all(), (step, jax.tree_util.keystr(path))
    assert int(states[6].skipped.total) == 2  # steps 5 and 6 skipped: step 4's state kept
    assert_trees_bit_equal(states[6].params, states[4].params)
    assert_trees_bit_equal(states[6].opt_state, states[4].opt_state)
    assert max_relative_error(states[4].params, states[2].params) > 0  # it did train


def resume_args(corpus_dir, run_dir: Path) -> list[str]:  # noqa: F811
    return ["--run-dir", str(run_dir), "--resume", *train_config_overrides(corpus_dir)]


def unclosed_list(preset: str) -> bytes:
    """The tiny preset with `num_experts: 8` edited into an unclosed list (line 13)."""
    assert preset.splitlines()[12] == "  num_experts: 8"
    return preset.replace("  num_experts: 8\n", "  num_experts: [8\n").encode()


# a --config file that cannot be used: (its bytes from the tiny preset's text, the message)
BAD_CONFIG_FILES = {
    "syntax error": (unclosed_list, ("is not valid YAML at line 14, column 8: expected ',' or "
                                     "']', but got ':' (while parsing a flow sequence from line "
                                     "13, column 16)")),
    "not a mapping": (lambda preset: b"- train.steps=20\n- moe.top_k=1\n",
                      "holds a list at line 1, column 1, not a mapping of settings"),
    "not UTF-8": (lambda preset: preset.encode("utf-16"),  # saved by a Windows editor
                  "is not UTF-8 text (byte 0xff at line 1, column 1)"),
}


@pytest.mark.parametrize("case", BAD_CONFIG_FILES)
def test_config_file_that_cannot_be_read(case, finished_run, corpus_dir, tmp_path, capsys):  # noqa: F811
    """A --config file that does not parse, holds no mapping or is not text: one sentence
    naming the file and the line, for a new run (nothing made) and a resume (nothing changed)."""
    damage, message = BAD_CONFIG_FILES[case]
    config = tmp_path / "my.yaml"
    config.write_bytes(damage((CONFIG_DIR / "tiny.yaml").read_text()))
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    before = snapshot(run_dir)
    for args in (["--run-dir", str(tmp_path / "new")], resume_args(corpus_dir, run_dir)):
        code, stderr = run_script(capsys, "--config", str(config), *args)
        assert code == 2
        assert_one_sentence(stderr, f"error: config file {config} {message}",
                            "correct the file, or give another YAML file or a preset name")
    assert not (tmp_path / "new").exists()
    assert snapshot(run_dir) == before


def run_config_damage(case: str, text: bytes) -> tuple[bytes, str]:
    """The run's config.yaml damaged as `case` says, and where the message must point."""
    lines = text.splitlines(keepends=True)
    at = lines.index(b"  d_model: 32\n")  # 0-based line of the model width
    if case == "syntax error":  # a hand edit gone wrong
        lines[at] = b"  d_model: 32: 64\n"
        return b"".join(lines), f"is not valid YAML at line {at + 1}, column 14: mapping values"
    if case == "not UTF-8":  # a disk fault in the middle of the file
        lines[at] = b"  d_mo\xff\xfe\x00\x00\n"
        return b"".join(lines), f"is not UTF-8 text (byte 0xff at line {at + 1}, column 7)"
    if case == "not a mapping":  # overwritten by a script
        return b"configs/tiny.yaml\n", "holds a single value at line 1, column 1, not a mapping"
    assert case == "empty"
    return b"", "is empty"


@pytest.mark.parametrize("case", ["syntax error", "not UTF-8", "not a mapping", "empty"])
def test_resume_with_a_damaged_run_config(case, finished_run, corpus_dir, tmp_path, capsys):  # noqa: F811
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    saved = run_dir / "config.yaml"
    damaged, message = run_config_damage(case, saved.read_bytes())
    saved.write_bytes(damaged)
    before = snapshot(run_dir)
    code, stderr = run_script(capsys, *resume_args(corpus_dir, run_dir))
    assert code == 2
    assert_one_sentence(stderr, f"error: the run's config file {saved} {message}",
                        "restore it (it records the run's full resolved config",
                        "or start again in a new --run-dir")
    assert snapshot(run_dir) == before


def test_init_from_a_missing_directory(corpus_dir, tmp_path, capsys):  # noqa: F811
    missing = tmp_path / "hf" / "DeepSeek-V3"
    code, stderr = run_script(capsys, "--run-dir", str(tmp_path / "run"),
                              *train_config_overrides(corpus_dir), f"train.init_from={missing}")
    assert code == 2
    assert_one_sentence(stderr, f"train.init_from={str(missing)!r} does not exist",
                        "give a Hugging Face checkpoint directory")
    assert list(tmp_path.iterdir()) == []  # no run directory, nothing else
