"""Architecture comparison: dense vs Switch vs GShard/Mixtral vs DeepSeek-style MoE, at equal
active parameters per token and equal tokens per step, over several seeds, plus the tuning
advice (experts 8/16/32, the temperature schedule, tokens per expert) as ablation rows.

Every run is `moejax.train` on a `configs/compare_*.yaml` preset (the real training loop, its
metrics.jsonl read back afterwards), so any row can be trained alone with
`python scripts/train.py --config compare_X`. `scripts/compare_architectures.py` is the shell.

A difference between two rows is called a difference only when the gap between their seed means
exceeds the larger of their seed-to-seed spreads (max - min over seeds).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from moejax.config import load_config
from moejax.model.transformer import count_params
from moejax.training.loop import train, write_json_atomically
from moejax.training.metrics import flops_per_token, measure_peak_flops, read_metrics

REFERENCE = "deepseek"  # the main rows are compared with the DeepSeek-style row
# The stated hardware of the GPU-hours estimate: H100 SXM dense BF16 tensor-core peak
# (989.4 TFLOP/s, NVIDIA's datasheet without sparsity) at 40% model FLOPs utilisation.
GPU_NAME = "H100 SXM (dense BF16)"
GPU_PEAK_FLOPS = 989.4e12
GPU_MFU = 0.40


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the comparison: a preset plus overrides, trained once per seed."""

    name: str
    label: str
    preset: str
    overrides: tuple[str, ...] = ()
    steps_multiplier: int = 1  # a row with a smaller batch runs more steps for equal tokens


@dataclasses.dataclass(frozen=True)
class Ablation:
    """A piece of tuning advice as a pair of rows: `baseline` against `variant`."""

    advice: str
    baseline: str
    variant: str


@dataclasses.dataclass(frozen=True)
class Study:
    """What to run: rows, seeds, steps, and how often to measure."""

    mode: str
    rows: tuple[str, ...]
    ablations: tuple[Ablation, ...]
    seeds: tuple[int, ...]
    steps: int
    eval_every: int  # steps between held-out evaluations (a multiple of log_every)
    eval_batches: int
    log_every: int  # steps between train records (throughput, expert loads)
    overrides: tuple[str, ...] = ()  # applied to every row (e.g. a smaller batch for --quick)


def all_rows(steps: int) -> dict[str, Row]:
    """Every row the comparison knows; the temperature schedule is compressed to `steps`.

    The advertised schedule (x0.95 every 1000 steps) never fires in a run under 1000 steps, so
    the row decays every steps / 10 steps: the ten decays a 10,000-step run (the claimed
    8K-20K steps to converge) would see, ending at temperature 0.95^10 = 0.60.
    """
    decay_every = max(1, steps // 10)
    return {row.name: row for row in (
        Row("dense", "dense (FFN 768 in every layer)", "compare_dense"),
        Row("switch", "Switch (softmax top-1 of 8 x F768, capacity 1.25, Switch loss)",
            "compare_switch"),
        Row("gshard", "GShard/Mixtral (softmax top-2 of 8 x F384, Switch loss, dropless)",
            "compare_gshard"),
        Row(REFERENCE, "DeepSeek (sigmoid top-2 of 16 x F256 + shared F256, bias balancing, "
            "4 groups keep 2, dropless)", "compare_deepseek"),
        Row("temperature", f"GShard/Mixtral + temperature 1.0 x0.95 every {decay_every} steps",
            "compare_temperature", (f"train.temperature_decay_every={decay_every}",)),
        Row("deepseek_e8", "DeepSeek, 8 routed experts", "compare_deepseek",
            ("moe.num_experts=8",)),
        Row("deepseek_e32", "DeepSeek, 32 routed experts", "compare_deepseek",
            ("moe.num_experts=32",)),
        Row("deepseek_batch2", "DeepSeek, batch 2 (32 tokens per expert per step), 8x the steps",
            "compare_deepseek", ("train.global_batch_size=2",), steps_multiplier=8),
    )}


ABLATIONS = (
    Ablation("experts 8 -> 16 (equal active compute)", "deepseek_e8", REFERENCE),
    Ablation("experts 8 -> 32 (equal active compute)", "deepseek_e8", "deepseek_e32"),
    Ablation("temperature schedule off -> on", "gshard", "temperature"),
    Ablation("tokens per expert 256 -> 32 per step (equal tokens)", REFERENCE, "deepseek_batch2"),
)
MAIN_ROWS = ("dense", "switch", "gshard", REFERENCE, "temperature")

DEFAULT = Study("default", (*MAIN_ROWS, "deepseek_e8", "deepseek_e32", "deepseek_batch2"),
                ABLATIONS, seeds=(0, 1, 2), steps=200, eval_every=20, eval_batches=4,
                log_every=10)
# --quick: four main rows, 2 seeds, 512 tokens per step (compilation dominates its time)
QUICK = Study("quick", MAIN_ROWS[:4], (), seeds=(0, 1), steps=40, eval_every=10,
              eval_batches=2, log_every=5,
              overrides=("train.seq_len=64", "train.global_batch_size=8"))


def run_config(row: Row, study: Study, seed: int, peak_flops: float):
    """The validated config of one run: the row's preset, the study's and the row's overrides."""
    return load_config(row.preset, [
        *study.overrides, *row.overrides,
        f"train.steps={study.steps * row.steps_multiplier}", f"train.seed={seed}",
        f"train.eval_every={study.eval_every * row.steps_multiplier}",
        f"train.eval_batches={study.eval_batches}",
        f"train.log_every={study.log_every * row.steps_multiplier}",
        "train.checkpoint_every=0", f"train.peak_flops_per_device={peak_flops}"])


def train_run(row: Row, study: Study, seed: int, run_dir: Path, peak_flops: float) -> dict:
    """Train one (row, seed) with moejax.train and return its measured curves."""
    cfg = run_config(row, study, seed, peak_flops)
    started = time.perf_counter()
    summary = train(cfg, run_dir, progress=False)
    wall_s = time.perf_counter() - started
    record = run_curves(read_metrics(run_dir), cfg.train.global_batch_size * cfg.train.seq_len)
    record.update(seed=seed, run_dir=str(run_dir), wall_s_including_compile=wall_s,
                  final_held_out=summary["held_out"]["loss"],
                  skipped_steps=summary["skipped_steps"])
    return record


def run_curves(records: list[dict], tokens_per_step: int) -> dict:
    """Held-out curve (step, tokens, training seconds, loss), throughput and expert loads from a
    run's metrics.jsonl records.

    Training seconds exclude compilation and evaluation: each train record carries the tokens/s
    since the previous record, so the time of a window is its tokens over that rate; the first
    record (step 1, no rate) takes the rate of the next window.
    """
    train_records = [r for r in records if r["kind"] == "train"]
    rates = [r.get("tokens_per_second") for r in train_records]
    first_rate = next((rate for rate in rates if rate), None) or 1.0
    steps, seconds, elapsed, previous = [], [], 0.0, 0
    for record, rate in zip(train_records, rates):
        elapsed += (record["step"] - previous) * tokens_per_step / (rate or first_rate)
        steps.append(record["step"])
        seconds.append(elapsed)
        previous = record["step"]
    evals = [r for r in records if r["kind"] == "eval"]
    eval_steps = [r["step"] for r in evals]
    moe = bool(train_records and train_records[0].get("expert_counts"))
    return {
        "held_out": {"step": eval_steps, "tokens": [s * tokens_per_step for s in eval_steps],
                     "train_seconds": [float(np.interp(s, steps, seconds)) for s in eval_steps],
                     "loss": [r["loss"] for r in evals]},
        "tokens_per_step": tokens_per_step,
        "tokens_per_second": statistics.median(r for r in rates if r) if any(rates) else None,
        "train_seconds": elapsed,
        "load": load_curves(train_records) if moe else None,
    }


def load_curves(train_records: list[dict]) -> dict:
    """Expert-load summaries over time: CV and dropped fraction per record (mean over MoE
    layers), and each expert's share of the routed assignments (mean over MoE layers) [R, E]."""
    counts = np.array([r["expert_counts"] for r in train_records], dtype=np.float64)  # [R, L, E]
    share = counts / np.maximum(counts.sum(axis=-1, keepdims=True), 1e-9)
    return {"step": [r["step"] for r in train_records],
            "cv": [float(np.mean(r["load_cv"])) for r in train_records],
            "dropped_fraction": [float(r["dropped_fraction"]) for r in train_records],
            "share": share.mean(axis=1).tolist()}


def seed_spread(values: list) -> dict:
    """Mean, seed-to-seed spread (max - min) and the values; None when any value is missing."""
    if not values or any(v is None for v in values):
        return {"mean": None, "spread": None, "values": values}
    return {"mean": statistics.mean(values), "spread": max(values) - min(values),
            "values": values}


def loss_ladder(rows: dict[str, dict], names) -> tuple[list[float], float]:
    """(ladder of held-out losses, target): the target is the highest final held-out loss of
    any run (row and seed) among `names` rounded up to 0.05 nats, a loss every one of those runs
    reaches; the ladder descends to it in five equal steps from the best first-evaluation loss."""
    finals = [v for n in names for v in rows[n]["summary"]["final_held_out"]["values"]]
    target = math.ceil(max(finals) / 0.05) * 0.05
    first = min(statistics.mean(run["held_out"]["loss"][0] for run in rows[n]["runs"])
                for n in names)
    gap = max(0.05, round((first - target) / 5 / 0.05) * 0.05)
    return [round(target + gap * i, 2) for i in range(4, -1, -1)], round(target, 2)


def crossing(curve: dict, level: float, key: str) -> float | None:
    """The value of curve[key] where the held-out loss first reaches `level`, linearly
    interpolated between evaluations; None if it never does."""
    losses, xs = curve["loss"], curve[key]
    for i, loss in enumerate(losses):
        if loss <= level:
            if i == 0:
                return float(xs[0])
            fraction = (losses[i - 1] - level) / (losses[i - 1] - loss)
            return float(xs[i - 1] + fraction * (xs[i] - xs[i - 1]))
    return None


def summarise_row(runs: list[dict]) -> dict:
    """Per-row seed statistics of the scalar results."""
    summary = {
        "final_held_out": seed_spread([r["final_held_out"] for r in runs]),
        "tokens_per_second": seed_spread([r["tokens_per_second"] for r in runs]),
        "train_seconds": seed_spread([r["train_seconds"] for r in runs]),
    }
    if runs[0]["load"] is not None:
        summary["load_cv_final"] = seed_spread([r["load"]["cv"][-1] for r in runs])
        summary["load_cv_mean"] = seed_spread([statistics.mean(r["load"]["cv"]) for r in runs])
        summary["dropped_fraction"] = seed_spread(
            [statistics.mean(r["load"]["dropped_fraction"]) for r in runs])
    return summary


def add_ladder(row: dict, ladder: list[float], target: float) -> None:
    """Steps, tokens and training seconds to reach each ladder loss (None where a seed never
    did); the target's FLOPs follow from the active-parameter FLOPs per token."""
    to = {}
    for level in ladder:
        to[f"{level:.2f}"] = {key: seed_spread([crossing(r["held_out"], level, key)
                                           for r in row["runs"]])
                              for key in ("step", "tokens", "train_seconds")}
    row["summary"]["to_loss"] = to
    tokens = to[f"{target:.2f}"]["tokens"]["values"]
    row["summary"]["flops_to_target"] = seed_spread(
        [None if t is None else t * row["flops_per_token"] for t in tokens])


def verdict(a: dict, b: dict, lower_is_better: bool = True) -> dict:
    """b against a: the gap of the means, the larger spread, and 'better' / 'worse' only when
    the gap exceeds that spread (else 'within spread')."""
    if a["mean"] is None or b["mean"] is None:
        return {"difference": None, "spread": None, "verdict": "not reached by every seed"}
    gap = b["mean"] - a["mean"]
    if min(len(a["values"]), len(b["values"])) < 2:
        return {"difference": gap, "spread": None, "verdict": "one seed: no spread"}
    limit = max(a["spread"], b["spread"])
    if abs(gap) <= limit:
        word = "within spread"
    else:
        word = "better" if (gap < 0) == lower_is_better else "worse"
    return {"difference": gap, "spread": limit, "verdict": word}


def comparisons(rows: dict, baseline: str, variant: str, target: float) -> dict:
    """The verdicts of `variant` against `baseline` on loss, steps to target and tokens/s."""
    a, b = rows[baseline]["summary"], rows[variant]["summary"]
    key = f"{target:.2f}"
    return {"final_held_out": verdict(a["final_held_out"], b["final_held_out"]),
            "tokens_to_target": verdict(a["to_loss"][key]["tokens"], b["to_loss"][key]["tokens"]),
            "tokens_per_second": verdict(a["tokens_per_second"], b["tokens_per_second"],
                                         lower_is_better=False)}


def cost_estimate(row: dict, target: float, mfu: float, peak: float) -> dict:
    """GPU-hours to the target loss, an estimate: FLOPs to target / (MFU x peak) / 3600 s."""
    flops = row["summary"]["flops_to_target"]
    hours = [None if f is None else f / (mfu * peak) / 3600 for f in flops["values"]]
    return {"target_loss": target, "flops_to_target": flops, "gpu_hours": seed_spread(hours),
            "tokens_per_day_at_mfu": mfu * peak * 86400 / row["flops_per_token"]}


def compare(study: Study, run_root: Path, log=print, mfu: float = GPU_MFU,
            gpu_peak: float = GPU_PEAK_FLOPS, partial: Path | None = None) -> dict:
    """Train every (row, seed) of `study` under `run_root` and return the results record.
    Seeds run in the outer loop, so a row's seeds are spread over the whole run (the machine's
    load drifts; tokens/s spread then shows it). After each run the runs so far are written to
    `partial` (if given), from which `finish_partial` makes a record of a run cut short."""
    started = time.time()
    rows_known = all_rows(study.steps)
    peak_flops = measure_peak_flops()  # CPU FLOP/s for the loop's MFU figure, measured once
    rows = {name: row_record(rows_known[name], study, peak_flops) for name in study.rows}
    total, done = len(study.rows) * len(study.seeds), 0
    for seed in study.seeds:
        for name in study.rows:
            run = train_run(rows_known[name], study, seed, run_root / name / f"seed{seed}",
                            peak_flops)
            rows[name]["runs"].append(run)
            done += 1
            log(f"[{done}/{total}] {name} seed {seed}: held-out {run['final_held_out']:.4f} "
                f"nats/token, {run['tokens_per_second'] or 0:,.0f} tokens/s, "
                f"{run['wall_s_including_compile']:.0f} s (elapsed {time.time() - started:.0f} s)")
            if partial is not None:
                write_json_atomically(partial, {"study": dataclasses.asdict(study),
                                                "started": started, "rows": rows})
    return finish(study, rows, started, mfu, gpu_peak)


def finish_partial(path: Path, mfu: float = GPU_MFU, gpu_peak: float = GPU_PEAK_FLOPS) -> dict:
    """The results record of the runs a cut-short comparison wrote to its partial file: rows
    without a run are left out, and the mode says how many runs of the study there are."""
    saved = json.loads(Path(path).read_text())
    if "study" not in saved:
        raise ValueError(f"{path} is not a comparison's partial record (no 'study'; records "
                         "written before the study was so named call it 'plan': rename the key)")
    fields = saved["study"]
    study = Study(**{**fields, "rows": tuple(fields["rows"]), "seeds": tuple(fields["seeds"]),
                     "overrides": tuple(fields["overrides"]),
                     "ablations": tuple(Ablation(**a) for a in fields["ablations"])})
    rows = {name: row for name, row in saved["rows"].items() if row["runs"]}
    done = sum(len(row["runs"]) for row in rows.values())
    study = dataclasses.replace(study, mode=f"{study.mode}, cut short: {done} of "
                                f"{len(study.rows) * len(study.seeds)} runs")
    result = finish(study, rows, saved["started"], mfu, gpu_peak)
    result["wall_s"] = os.path.getmtime(path) - saved["started"]  # to the last finished run
    return result


def row_record(row: Row, study: Study, peak_flops: float) -> dict:
    cfg = run_config(row, study, study.seeds[0], peak_flops)
    params = count_params(cfg)
    return {"label": row.label, "preset": f"configs/{row.preset}.yaml",
            "overrides": [*study.overrides, *row.overrides],
            "steps": cfg.train.steps, "tokens_per_step": cfg.train.global_batch_size
            * cfg.train.seq_len, "total_params": params["total"],
            "active_params": params["active"], "flops_per_token": flops_per_token(cfg),
            "num_experts": cfg.moe.num_experts, "top_k": cfg.moe.top_k, "runs": []}


def finish(study: Study, rows: dict, started: float, mfu: float, gpu_peak: float) -> dict:
    """Seed statistics, the loss ladder, verdicts and the cost estimate."""
    for row in rows.values():
        row["summary"] = summarise_row(row["runs"])
    main = [n for n in MAIN_ROWS if n in rows]
    ladder, target = loss_ladder(rows, main)
    for row in rows.values():
        add_ladder(row, ladder, target)
    ablations = [{**dataclasses.asdict(a), **comparisons(rows, a.baseline, a.variant, target)}
                 for a in study.ablations if a.baseline in rows and a.variant in rows]
    return {
        "mode": study.mode, "study": dataclasses.asdict(study),
        "started_utc": datetime.datetime.fromtimestamp(started, datetime.UTC).isoformat(
            timespec="seconds"),
        "wall_s": time.time() - started, "host": host_line(),
        "ladder": ladder, "target_loss": target, "rows": rows,
        "versus_reference": {n: comparisons(rows, REFERENCE, n, target)
                             for n in main if n != REFERENCE and REFERENCE in rows},
        "ablations": ablations,
        "cost": {"gpu": GPU_NAME, "gpu_peak_flops": gpu_peak, "mfu": mfu,
                 "formula": "GPU-hours = FLOPs per token x tokens to target / (MFU x peak "
                            "FLOP/s) / 3600; tokens/day = MFU x peak x 86400 / FLOPs per token",
                 "rows": {n: cost_estimate(rows[n], target, mfu, gpu_peak) for n in main}},
    }


def host_line() -> str:
    import jax

    return (f"{platform.node() or 'host'}: {os.cpu_count()} CPU cores, "
            f"{jax.devices()[0].device_kind}, jax {jax.__version__}, load average "
            f"{os.getloadavg()[0]:.1f} at the end, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")


def write_outputs(result: dict, prefix: Path, command: str) -> list[Path]:
    """JSON, markdown and PNG plots named `{prefix}.json`, `{prefix}.md`, `{prefix}_*.png`."""
    from moejax.tools import compare_report

    result = {**result, "command": command}
    prefix.parent.mkdir(parents=True, exist_ok=True)
    json_path = prefix.with_name(prefix.name + ".json")
    write_json_atomically(json_path, result)
    plots = compare_report.plots(result, prefix)
    md_path = prefix.with_name(prefix.name + ".md")
    md_path.write_text(compare_report.markdown(result, [p.name for p in plots]))
    return [json_path, md_path, *plots]
