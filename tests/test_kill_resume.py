"""Kill -9: SIGKILL training during start-up, during steps and during a checkpoint save, launch it
again each time with the same line (`--auto-resume`), and check every resume and the final losses
(scripts/kill_resume.py runs the same with more kills). The training runs on the tiny preset's
own mesh (8 devices, expert=8) with the start-up peak measurement, as users run it."""

import pytest

from moejax.data.corpus_write import discover_stdlib_sources, prepare_corpus
from moejax.tools.kill_trials import DEFAULT_OVERRIDES, markdown_report, run_kill_trials

# Seed 143's kill schedule (40 steps, a checkpoint every 10): a kill 0.19 s after the first
# launch (start-up: before the run directory exists), then one after step 6 (before any
# checkpoint, so the next launch starts from scratch), then one once the save of step 20 has
# started (the next launch then resumes from step 10). Where each kill lands depends on timing;
# the verdicts do not. Every launch pays jax's start-up (~10 s, the first one compiling ~25 s).
SEED = 143


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    files = discover_stdlib_sources()[:24]
    out = tmp_path_factory.mktemp("kill_corpus")
    return str(prepare_corpus([str(f) for f in files], out, holdout_every=6))


@pytest.mark.slow
def test_sigkill_resumes_from_the_newest_complete_checkpoint(corpus_dir, tmp_path):
    assert not any(o.startswith(("mesh.", "train.peak_flops")) for o in DEFAULT_OVERRIDES)
    result = run_kill_trials([f"data.corpus_dir={corpus_dir}"], trials=3, seed=SEED,
                             work_dir=tmp_path, kills_per_run=3, report=print)
    assert [(t.kind, t.target) for t in result.trials] == [("startup", 0), ("step", 6),
                                                           ("save", 20)]
    problems = [f"trial {t.trial}: {p}" for t in result.trials for p in t.problems]
    assert all(t.passed for t in result.trials), "\n".join(problems)
    (run,) = result.runs
    assert run.passed, run.problems
    assert run.steps_logged == 40 and run.max_relative_loss_error <= 1e-6
    assert result.passed
    report = markdown_report(result, command="pytest", machine="test", date="today")
    assert "**3 of 3 trials resumed correctly**" in report
