"""scripts/compare_architectures.py's library (moejax.tools.compare): a tiny study through the real
training loop, checked for the shape and content of its outputs (not for which row wins); the
presets; and the temperature schedule's config."""

import dataclasses
import json
import math
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import load_script

from moejax import load_config
from moejax.config import ConfigError
from moejax.model.router import softmax_topk
from moejax.tools import compare
from moejax.training.step import router_temperature

PRESETS = ("dense", "switch", "gshard", "deepseek", "temperature")
TINY = compare.Study(
    "test", rows=("dense", "deepseek"),
    ablations=(compare.Ablation("test pair", "dense", "deepseek"),),
    seeds=(0, 1), steps=6, eval_every=2, eval_batches=1, log_every=2,
    overrides=("train.seq_len=32", "train.global_batch_size=4", "mesh.expert=1"))


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    lines = []
    result = compare.compare(TINY, root / "runs", log=lines.append, partial=root / "partial.json")
    paths = compare.write_outputs(result, root / "docs" / "cmp", "test command")
    return result, paths, lines, root


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_every_run_reports_finite_curves(outputs):
    result, _, lines, _ = outputs
    assert len(lines) == len(TINY.rows) * len(TINY.seeds)  # one progress line per run
    assert list(result["rows"]) == list(TINY.rows)
    for name, row in result["rows"].items():
        assert [r["seed"] for r in row["runs"]] == list(TINY.seeds)
        assert _finite(row["flops_per_token"]) and row["flops_per_token"] > 0
        for run in row["runs"]:
            held = run["held_out"]
            assert held["step"] == [2, 4, 6]
            assert all(_finite(v) for key in ("loss", "train_seconds", "tokens")
                       for v in held[key])
            assert held["train_seconds"] == sorted(held["train_seconds"])
            assert _finite(run["tokens_per_second"]) and run["tokens_per_second"] > 0
            if name == "dense":
                assert run["load"] is None
            else:
                share = np.array(run["load"]["share"])
                assert share.shape == (len(run["load"]["step"]), 16)
                np.testing.assert_allclose(share.sum(axis=1), 1.0, rtol=1e-6)
                assert run["load"]["dropped_fraction"] == [0.0] * len(run["load"]["step"])


def test_summary_ladder_and_verdicts(outputs):
    result, _, _, _ = outputs
    ladder, target = result["ladder"], result["target_loss"]
    assert ladder == sorted(ladder, reverse=True) and ladder[-1] == target
    for row in result["rows"].values():
        final = row["summary"]["final_held_out"]
        assert min(final["values"]) <= final["mean"] <= max(final["values"])
        assert final["spread"] == pytest.approx(max(final["values"]) - min(final["values"]))
        assert set(row["summary"]["to_loss"]) == {f"{level:.2f}" for level in ladder}
    verdicts = [result["versus_reference"]["dense"], result["ablations"][0]]
    for v in verdicts:
        assert v["final_held_out"]["verdict"] in ("better", "worse", "within spread")
    assert set(result["cost"]["rows"]) == set(TINY.rows)
    for cost in result["cost"]["rows"].values():
        assert _finite(cost["tokens_per_day_at_mfu"])


def test_verdict_needs_a_gap_beyond_the_spread():
    a = compare.seed_spread([1.0, 1.2])
    assert compare.verdict(a, compare.seed_spread([1.25, 1.3]))["verdict"] == "within spread"
    assert compare.verdict(a, compare.seed_spread([1.5, 1.55]))["verdict"] == "worse"
    assert compare.verdict(a, compare.seed_spread([0.5, 0.6]))["verdict"] == "better"
    assert compare.verdict(a, compare.seed_spread([0.5, None]))["difference"] is None


def test_crossing_interpolates_between_evaluations():
    curve = {"step": [10, 20, 30], "loss": [3.0, 2.0, 1.5]}
    assert compare.crossing(curve, 2.5, "step") == pytest.approx(15.0)
    assert compare.crossing(curve, 3.5, "step") == 10.0
    assert compare.crossing(curve, 1.0, "step") is None


def test_files_are_written_and_readable(outputs):
    _, paths, _, _ = outputs
    names = {p.name for p in paths}
    assert {"cmp.json", "cmp.md", "cmp_loss_steps.png", "cmp_loss_time.png",
            "cmp_load_cv.png", "cmp_load_heatmap.png"} == names
    saved = json.loads(next(p for p in paths if p.suffix == ".json").read_text())
    assert saved["command"] == "test command" and list(saved["rows"]) == list(TINY.rows)
    for png in (p for p in paths if p.suffix == ".png"):
        header = png.read_bytes()[:24]
        assert header[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", header[16:24])
        assert width >= 400 and height >= 200
    markdown = next(p for p in paths if p.suffix == ".md").read_text()
    for row in TINY.rows:
        assert f"| {row}" in markdown
    assert "test command" in markdown and "estimate" in markdown.lower()


@pytest.mark.parametrize("name", PRESETS)
def test_presets_have_equal_active_size_and_tokens(name):
    from moejax import count_params

    reference = load_config("compare_deepseek", num_devices=1)
    cfg = load_config(f"compare_{name}", num_devices=1)
    assert cfg.train.global_batch_size * cfg.train.seq_len == (
        reference.train.global_batch_size * reference.train.seq_len)
    active, ref_active = count_params(cfg)["active"], count_params(reference)["active"]
    assert abs(active - ref_active) / ref_active < 0.01  # only the router widths differ


def test_every_row_loads():
    study = dataclasses.replace(compare.DEFAULT, overrides=("mesh.expert=1",))  # 8 fake devices
    for row in compare.all_rows(study.steps).values():
        compare.run_config(row, study, 0, 1e9)


def test_temperature_schedule():
    cfg = load_config("compare_temperature", num_devices=1)
    temps = [float(router_temperature(cfg, jnp.asarray(s))) for s in (0, 999, 1000, 2500)]
    assert temps == pytest.approx([1.0, 1.0, 0.95, 0.95**2])
    constant = load_config("compare_gshard", num_devices=1)
    assert float(router_temperature(constant, jnp.asarray(5000))) == 1.0


def test_temperature_one_is_the_plain_softmax():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(5, 8)), jnp.float32)
    moe = load_config("compare_gshard", num_devices=1).moe
    routing = softmax_topk(logits, moe, jnp.float32(1.0))
    # temperature 1.0 (a constant schedule) must route exactly as an unscaled softmax
    np.testing.assert_array_equal(routing.probs, jax.nn.softmax(logits))


@pytest.mark.parametrize("override, words", [
    ("train.temperature_decay=0", "train.temperature_decay=0.0 must be in (0, 1]"),
    ("train.temperature_decay=1.5", "must be in (0, 1]"),
    ("train.temperature_decay_every=0", "must be at least 1 step"),
])
def test_bad_temperature_schedule_is_one_sentence(override, words):
    with pytest.raises(ConfigError, match=r"^[^\n]*$") as err:
        load_config("compare_temperature", [override], num_devices=1)
    assert words in str(err.value)


def test_studies_are_consistent():
    for study in (compare.QUICK, compare.DEFAULT):
        rows = compare.all_rows(study.steps)
        assert set(study.rows) <= set(rows)
        assert study.eval_every % study.log_every == 0
        for ablation in study.ablations:
            assert {ablation.baseline, ablation.variant} <= set(study.rows)
        assert {"dense", "deepseek"} <= set(study.rows)
    assert len(compare.QUICK.seeds) >= 2 and len(compare.DEFAULT.seeds) >= 3


def test_a_run_cut_short_still_gives_outputs(outputs, tmp_path):
    """The partial file after the first seed: every row has one run, no spread to judge by."""
    *_, root = outputs
    saved = json.loads((root / "partial.json").read_text())
    assert all(len(row["runs"]) == len(TINY.seeds) for row in saved["rows"].values())
    for row in saved["rows"].values():
        row["runs"] = row["runs"][:1]
    cut = tmp_path / "partial.json"
    cut.write_text(json.dumps(saved))
    result = compare.finish_partial(cut)
    assert "cut short: 2 of 4 runs" in result["mode"]
    assert result["versus_reference"]["dense"]["final_held_out"]["verdict"] == (
        "one seed: no spread")
    paths = compare.write_outputs(result, tmp_path / "cut", "cut command")
    assert "one seed: no spread" in next(p for p in paths if p.suffix == ".md").read_text()


def test_a_missing_partial_file_is_one_sentence(tmp_path, capsys):
    script = load_script("compare_architectures")
    missing = tmp_path / "partial.json"
    assert script.main(["--from-partial", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --from-partial {missing} is not a file")
    assert not list(tmp_path.iterdir())  # nothing written
