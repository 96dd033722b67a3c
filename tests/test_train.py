"""Training: exact resume (in-process and after SIGTERM/SIGINT), router-bias balancing, clear
errors."""

import functools
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import max_relative_error, subprocess_env, tiny_config

from moejax import data as data_lib
from moejax import make_mesh
from moejax.config import ConfigError, load_config
from moejax.data.corpus_write import discover_stdlib_sources, write_token_files
from moejax.training.checkpoint import Checkpoints
from moejax.training.loop import train
from moejax.training.rundir import RunDirError, check_run_dir
from moejax.training.state import init_train_state
from moejax.training.step import update_router_bias

REPO = Path(__file__).resolve().parent.parent
# a short run, logged every step, saved only at the end
SHORT_RUN = ("train.steps=200", "train.log_every=1", "train.eval_every=0", "train.eval_batches=1",
             "train.checkpoint_every=0", "train.warmup_steps=2")
# most tests also fix the peak FLOP/s (no start-up measurement) and use data parallelism only;
# `user_settings=True` keeps what users run: the preset's expert-parallel mesh over all 8
# devices and the peak measured at start-up
TRAIN_OVERRIDES = (*SHORT_RUN, "train.peak_flops_per_device=1e9", "mesh.expert=1", "mesh.data=-1")


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    """A small byte-level corpus from 24 stdlib files (4 of them held out)."""
    files = discover_stdlib_sources()[:24]
    out = tmp_path_factory.mktemp("corpus")
    return str(data_lib.prepare_corpus([str(f) for f in files], out, holdout_every=6))


def train_config(corpus_dir, *overrides, user_settings=False):
    return tiny_config(*(SHORT_RUN if user_settings else TRAIN_OVERRIDES),
                       f"data.corpus_dir={corpus_dir}", *overrides)


@functools.cache
def straight_losses(corpus_dir, steps, user_settings=False):
    name = f"straight{steps}{'_user' if user_settings else ''}"
    summary = train(train_config(corpus_dir, user_settings=user_settings),
                    Path(corpus_dir).parent / name, progress=False, max_steps=steps)
    return dict(summary["train_losses"]), summary["run_dir"]


def assert_user_settings(cfg):
    """The preset's own mesh (expert parallelism over all 8 devices) and peak measurement."""
    preset = load_config("tiny", num_devices=8)
    assert cfg.mesh == preset.mesh and dict(make_mesh(cfg.mesh).shape)["expert"] == 8
    assert cfg.train.peak_flops_per_device == preset.train.peak_flops_per_device == 0


def final_params(cfg, run_dir):
    mesh = make_mesh(cfg.mesh)
    like = init_train_state(cfg, jax.random.key(0), mesh)
    checkpoints = Checkpoints(Path(run_dir) / "checkpoints", 2)
    state, _ = checkpoints.restore(checkpoints.latest_step(), like)
    checkpoints.close()
    return state


def test_resume_continues_exactly(corpus_dir, tmp_path):
    """On the settings users run: the expert-parallel mesh, the peak measured at start-up."""
    expected, straight_dir = straight_losses(corpus_dir, 6, user_settings=True)
    cfg = train_config(corpus_dir, user_settings=True)
    assert_user_settings(cfg)
    first = train(cfg, tmp_path / "run", progress=False, max_steps=3)
    assert [s for s, _ in first["train_losses"]] == [1, 2, 3]
    second = train(cfg, tmp_path / "run", resume=True, progress=False, max_steps=6)
    resumed = dict(second["train_losses"])
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]  # the summary covers the whole run
    for step in (1, 2, 3, 4, 5, 6):
        assert abs(resumed[step] - expected[step]) <= 1e-6 * abs(expected[step])
    assert expected[6] < expected[1]
    a, b = final_params(cfg, straight_dir), final_params(cfg, tmp_path / "run")
    assert int(a.step) == int(b.step) == 6
    assert max_relative_error(b.params, a.params) == 0.0
    assert jnp.array_equal(a.router.bias, b.router.bias)


@pytest.mark.parametrize(("stop", "exit_flags", "exit_code"),
                         [("SIGTERM", ["--stopped-exit-code", "143"], 143), ("SIGINT", [], 0)])
def test_stop_signal_saves_and_resume_matches(stop, exit_flags, exit_code, corpus_dir, tmp_path):
    """`python scripts/train.py` as users run it (the preset's expert-parallel mesh, the peak
    measured at start-up), stopped by SIGTERM (a scheduler: exit code as asked, so that a
    restart-on-failure scheduler restarts it) or SIGINT (Ctrl-C: exit 0): it finishes the step,
    saves it once, and a resume continues as if never stopped."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "scripts" / "train.py"), "--run-dir", str(run_dir),
           "--no-progress", "--config", "tiny", *exit_flags,
           *train_config_overrides(corpus_dir, user_settings=True)]
    env = subprocess_env(8)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(getattr(signal, stop))
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == exit_code, output
    assert f"stopped by {stop}; checkpoint saved" in output and "Traceback" not in output
    assert "'expert': 8} over 8 of 8 cpu device(s)" in output and "MFU" in output
    stopped_at = json.loads((run_dir / "summary.json").read_text())["step"]
    assert 2 <= stopped_at < 200
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert records[-1]["step"] == stopped_at  # the step under way was finished and logged
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [str(stopped_at)]

    target = stopped_at + 2
    # a straight run's losses up to `target` do not depend on where it stops: the 6-step run of
    # test_resume_continues_exactly (cached) holds them unless the stop came late
    expected, _ = straight_losses(corpus_dir, max(target, 6), user_settings=True)
    cfg = train_config(corpus_dir, user_settings=True)
    assert_user_settings(cfg)
    resumed = train(cfg, run_dir, resume=True, progress=False, max_steps=target)
    assert sorted(dict(resumed["train_losses"])) == list(range(1, target + 1))
    for step, loss in resumed["train_losses"]:
        assert abs(loss - expected[step]) <= 1e-6 * abs(expected[step])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == target  # each step logged once


def train_config_overrides(corpus_dir, user_settings=False):
    base = ("precision.compute_dtype=float32", "model.d_model=32", "model.num_heads=4",
            "model.num_kv_heads=2", "model.head_dim=8", "model.ffn_dim=64",
            "moe.expert_ffn_dim=16", "train.seq_len=16", "train.global_batch_size=8")
    return [*base, *(SHORT_RUN if user_settings else TRAIN_OVERRIDES),
            f"data.corpus_dir={corpus_dir}"]


@pytest.mark.parametrize("user_settings", [False, True])
def test_subprocess_config_equals_test_config(user_settings, corpus_dir):
    from_cli = load_config("tiny", train_config_overrides(corpus_dir, user_settings),
                           num_devices=8)
    assert from_cli == train_config(corpus_dir, user_settings=user_settings)


def test_bias_moves_against_an_overloaded_expert():
    counts = jnp.array([[40.0, 10.0, 10.0, 20.0]])  # mean 20: expert 0 overloaded, 3 balanced
    bias = update_router_bias(jnp.zeros((1, 4)), counts, rate=0.01)
    np.testing.assert_allclose(bias, [[-0.01, 0.01, 0.01, 0.0]])


def test_bias_balancing_shrinks_load_spread(corpus_dir, tmp_path):
    def mean_load_cv(rate, name):
        cfg = train_config(corpus_dir, f"moe.bias_update_rate={rate}", "moe.seq_balance_loss_coef=0")
        train(cfg, tmp_path / name, progress=False, max_steps=40)
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").open()]
        late = [np.mean(r["load_cv"]) for r in records if r["kind"] == "train" and r["step"] > 30]
        return float(np.mean(late))

    with_bias, without_bias = mean_load_cv(0.02, "bias_on"), mean_load_cv(0.0, "bias_off")
    print(f"load coefficient of variation, steps 31-40: bias on {with_bias:.3f}, "
          f"off {without_bias:.3f}")
    assert with_bias < 0.8 * without_bias


def test_refuses_to_overwrite_or_resume_incompatibly(corpus_dir, tmp_path):
    cfg = train_config(corpus_dir)
    run_dir = tmp_path / "run"
    train(cfg, run_dir, progress=False, max_steps=1)
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    with pytest.raises(RunDirError, match="already holds a run: pass --resume"):
        train(cfg, run_dir, progress=False, max_steps=2)
    other = train_config(corpus_dir, "model.d_model=64")
    with pytest.raises(RunDirError, match=r"different config: model.d_model \(32 -> 64\)"):
        train(other, run_dir, resume=True, progress=False, max_steps=2)
    with pytest.raises(RunDirError, match="nothing to resume"):
        train(cfg, tmp_path / "empty", resume=True, progress=False)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before
    # what a diverged run is told to do: resume with a lower learning rate
    lower = train_config(corpus_dir, f"train.learning_rate={cfg.train.learning_rate / 10}")
    assert check_run_dir(lower, run_dir, resume=True) == (run_dir, True)


def test_bad_data_gives_one_sentence(corpus_dir, tmp_path):
    with pytest.raises(data_lib.DataError, match="does not exist|not found|missing"):
        train(train_config(tmp_path / "nowhere"), tmp_path / "a", progress=False)
    assert not (tmp_path / "a").exists()  # bad data leaves no run directory behind
    empty = tmp_path / "empty_corpus"
    write_token_files({"train": [], "val": []}, empty)
    with pytest.raises(data_lib.DataError, match="empty"):
        train(train_config(empty), tmp_path / "b", progress=False)
    with pytest.raises(data_lib.DataError, match=r"vocab"):
        train(train_config(corpus_dir, "model.vocab_size=100"), tmp_path / "c", progress=False)
    with pytest.raises(ConfigError, match="unknown config key 'train.stepz'"):
        train_config(corpus_dir, "train.stepz=3")


def test_stop_signal_on_a_checkpoint_step_saves_once(corpus_dir, tmp_path, monkeypatch):
    """SIGTERM arriving while step 4 (a checkpoint step) is saved: the run saves step 4 once
    (orbax refuses a second save of a step), exits cleanly, and says where it stopped."""
    original_save = Checkpoints.save
    saved = []

    def save_then_signal(self, step, state, data_state):
        original_save(self, step, state, data_state)
        saved.append(step)
        if step == 4:
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(Checkpoints, "save", save_then_signal)
    summary = train(train_config(corpus_dir, "train.checkpoint_every=2"), tmp_path / "run",
                    progress=False, max_steps=8)
    assert summary["stopped_by"] == "SIGTERM" and summary["step"] == 4
    assert saved == [2, 4]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["step"] == 4


def truncate_checkpoint(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file() and path.stat().st_size > 1000:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_truncated_newest_checkpoint_resumes_from_the_older_one(corpus_dir, tmp_path):
    expected, _ = straight_losses(corpus_dir, 6)
    cfg = train_config(corpus_dir, "train.checkpoint_every=2")
    run_dir = tmp_path / "run"
    train(cfg, run_dir, progress=False, max_steps=5)  # checkpoints 2, 4 and 5 (kept: 4, 5)
    truncate_checkpoint(run_dir / "checkpoints" / "5")
    lines = []
    summary = train(cfg, run_dir, resume=True, progress=False, max_steps=6, announce=lines.append)
    reports = [line for line in lines if "checkpoint 5" in line]
    assert len(reports) == 2 and "cannot be read" in reports[0]
    assert "resuming from step 4; unreadable checkpoint 5 kept as" in reports[1]
    assert (run_dir / "checkpoints" / "unreadable-5").is_dir()  # set aside, never deleted
    losses = dict(summary["train_losses"])
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    for step in (5, 6):  # recomputed from step 4 exactly
        assert abs(losses[step] - expected[step]) <= 1e-6 * abs(expected[step])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_default_job_on_eight_devices_reports_mfu(corpus_dir, tmp_path, capsys):
    """`python scripts/train.py` as a user runs it on an 8-device host: the tiny preset's own
    settings (mesh, precision, peak FLOP/s measured at start-up), only shorter."""
    from helpers import load_script

    assert jax.device_count() == 8
    code = load_script("train").main([
        "--run-dir", str(tmp_path / "run"), "--no-progress", f"data.corpus_dir={corpus_dir}",
        "train.steps=3", "train.log_every=1", "train.eval_batches=1"])
    output = capsys.readouterr().out
    assert code == 0, output
    assert "over 8 of 8 cpu device(s)" in output
    assert "MFU" in output and "final held-out loss" in output
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    mfu = [r["mfu"] for r in records if r["kind"] == "train" and r["step"] > 1]
    assert len(mfu) == 2 and all(0 < m <= 1 for m in mfu), mfu  # a fraction of the peak
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0 < summary["mfu"] <= 1


def test_init_from_carries_weights_and_router_bias(corpus_dir, tmp_path):
    """A fresh run with train.init_from starts from the checkpoint's weights and router bias:
    its first loss is the checkpoint's loss on the first batch, which the bias changes."""
    from moejax import RouterState, init_params, loss_fn
    from moejax.convert import save_moejax

    cfg = train_config(corpus_dir)
    mesh = make_mesh(cfg.mesh)
    params = init_params(cfg, jax.random.key(7), mesh)
    bias = jax.random.normal(jax.random.key(8), (cfg.num_moe_layers, cfg.moe.num_experts))
    router = RouterState(bias=bias, temperature=jnp.float32(1.0))
    save_moejax(cfg, params, tmp_path / "imported", router_state=router)

    summary = train(train_config(corpus_dir, f"train.init_from={tmp_path / 'imported'}"),
                    tmp_path / "run", progress=False, max_steps=1)
    corpus = data_lib.load_split(corpus_dir, "train")
    t = cfg.train
    tokens = next(data_lib.make_train_iterator(corpus, seq_len=t.seq_len,
                                               global_batch_size=t.global_batch_size,
                                               seed=t.seed))["tokens"]
    loss = jax.jit(loss_fn, static_argnums=2)  # eager, each op would compile on its own
    with jax.set_mesh(mesh):
        expected = float(loss(params, {"tokens": tokens}, cfg, router)[0])
        without_bias = float(loss(params, {"tokens": tokens}, cfg)[0])
    first = dict(summary["train_losses"])[1]
    assert abs(first - expected) <= 1e-5 * abs(expected)
    assert abs(without_bias - expected) > 1e-5 * abs(expected)  # so the check above sees it

    with pytest.raises(ConfigError, match=r"holds a different model: model.d_model \(32 -> 64\)"):
        train(train_config(corpus_dir, "model.d_model=64",
                           f"train.init_from={tmp_path / 'imported'}"),
              tmp_path / "other", progress=False, max_steps=1)
    assert not (tmp_path / "other").exists()


def test_metrics_cut_short_by_a_kill_are_dropped_on_resume(corpus_dir, tmp_path):
    """A kill while a metrics line is written leaves it without its newline: the resume drops
    it and the file holds each step once, as complete JSON lines."""
    cfg = train_config(corpus_dir, "train.checkpoint_every=2")
    run_dir = tmp_path / "run"
    train(cfg, run_dir, progress=False, max_steps=3)
    with (run_dir / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"step": 4, "kind": "tr')
    train(cfg, run_dir, resume=True, progress=False, max_steps=5)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5]
