"""Kill -9: SIGKILL training during steps and during a checkpoint save, resume it each time, and
check every resume and the final losses (scripts/kill_resume.py runs the same with more kills)."""

import pytest

from moejax.data.corpus_write import discover_stdlib_sources, prepare_corpus
from moejax.tools.kill_trials import markdown_report, run_kill_trials

# Seed 59's kill schedule (40 steps, a checkpoint every 10): a kill after step 4 (before any checkpoint,
# so the resume starts from scratch), then one once the save of step 20 has started (the resume
# then starts from step 10). Where each kill lands depends on timing; the verdicts do not. Two
# kills keep the test near a minute: every launch pays jax's start-up (~10 s, the first one
# compiling ~25 s) on 2 cores.
SEED = 59


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    files = discover_stdlib_sources()[:24]
    out = tmp_path_factory.mktemp("kill_corpus")
    return str(prepare_corpus([str(f) for f in files], out, holdout_every=6))


@pytest.mark.slow
def test_sigkill_resumes_from_the_newest_complete_checkpoint(corpus_dir, tmp_path):
    result = run_kill_trials([f"data.corpus_dir={corpus_dir}"], trials=2, seed=SEED,
                             work_dir=tmp_path, kills_per_run=2, report=print)
    assert [(t.kind, t.target) for t in result.trials] == [("step", 4), ("save", 20)]
    problems = [f"trial {t.trial}: {p}" for t in result.trials for p in t.problems]
    assert all(t.passed for t in result.trials), "\n".join(problems)
    (run,) = result.runs
    assert run.passed, run.problems
    assert run.steps_logged == 40 and run.max_relative_loss_error <= 1e-6
    assert result.passed
    report = markdown_report(result, command="pytest", machine="test", date="today")
    assert "**2 of 2 trials resumed correctly**" in report
