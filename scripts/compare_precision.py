"""Train the default model in bf16 and with DeepSeek-style fp8 and compare the losses.

    python scripts/compare_precision.py --out docs/precision        # 3 seeds x 300 steps
    python scripts/compare_precision.py --steps 200 --seeds 0 --runs bf16 "fp8 block" float32

Runs (`--runs`, default the first four): bf16; fp8 `tensor`; fp8 `block` (DeepSeek-V3's 1 x 128
/ 128 x 128 recipe); fp8 `block` with the fp8 dispatch payload (token rows sent as e4m3,
results back in bf16); and float32 (no fp8), which shows how far any change of numerics alone
moves a run of this length. Every run is the tiny preset as shipped (its default dropless
dispatch: fp8 grouped GEMMs forward and backward on the routed experts) with bf16 compute
outside the fp8 GEMMs. For each seed, every run has the same init and data order
(`train.seed` drives both) and the same config apart from the precision keys. With several
seeds, bf16's own seed-to-seed spread shows how small a gap the comparison can resolve, and the
paired gaps (run vs bf16 with the same seed) cancel the part of that spread that init and data
order cause. Prints per run the seed-mean, spread and gaps to bf16 of the final train loss
(mean of the last 5 logs) and held-out loss, writes `<out>.json` (with the machine's load
average at the start and the end, and the wall time) and `<out>.png`. Extra arguments are
config overrides applied to every run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

try:
    import moejax
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import moejax

# run name -> (compute dtype, fp8 recipe, fp8 dispatch payload)
RUNS = {"bf16": ("bfloat16", "none", False), "fp8 tensor": ("bfloat16", "tensor", False),
        "fp8 block": ("bfloat16", "block", False),
        "fp8 block + fp8 dispatch": ("bfloat16", "block", True),
        "float32": ("float32", "none", False)}
DEFAULT_RUNS = ("bf16", "fp8 tensor", "fp8 block", "fp8 block + fp8 dispatch")
METRICS = {"final_train_loss_smoothed": "final train loss (mean of last 5 logs)",
           "held_out_loss": "held-out loss"}


def run(name: str, seed: int, steps: int, overrides: list[str], run_root: Path) -> dict:
    dtype, recipe, fp8_dispatch = RUNS[name]
    cfg = moejax.load_config("tiny", [
        f"precision.compute_dtype={dtype}", f"precision.fp8={recipe}", f"train.steps={steps}",
        f"precision.fp8_dispatch={str(fp8_dispatch).lower()}",
        f"train.seed={seed}", "train.log_every=5", f"train.eval_every={steps}",
        "train.checkpoint_every=0", "train.peak_flops_per_device=1e9", *overrides])
    run_dir = run_root / f"{name.replace(' ', '_').replace('+', 'and')}_seed{seed}"
    summary = moejax.train(cfg, run_dir, progress=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    curve = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    return {"curve": curve, "final_train_loss": summary["final_train_loss"],
            "final_train_loss_smoothed": smoothed_final(curve),
            "held_out_loss": summary["held_out"]["loss"]}


def smoothed_final(curve, last: int = 5) -> float:
    """Mean of the last few logged losses (one logged batch is noisy)."""
    return sum(loss for _, loss in curve[-last:]) / min(last, len(curve))


def seed_statistics(values: list[float]) -> dict:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "min": min(values), "max": max(values)}


def summarize(runs: dict, seeds: list[int]) -> dict:
    """Per run and metric: spread over seeds, gap of the seed-mean to bf16's seed-mean, and the
    paired per-seed gaps to bf16 (same init and data order, so only the numerics differ)."""
    summary = {}
    for name, by_seed in runs.items():
        summary[name] = {}
        for metric in METRICS:
            values = [by_seed[s][metric] for s in seeds]
            base = [runs["bf16"][s][metric] for s in seeds]
            stats = seed_statistics(values)
            paired = [v / b - 1 for v, b in zip(values, base)]
            summary[name][metric] = {
                **stats, "relative_std": stats["std"] / stats["mean"],
                "relative_range": (stats["max"] - stats["min"]) / stats["mean"],
                "gap_of_means": stats["mean"] / statistics.fmean(base) - 1,
                "paired_gaps": dict(zip(map(str, seeds), paired)),
                "paired_gap": seed_statistics(paired)}
    return summary


def print_summary(summary: dict, seeds: list[int]) -> None:
    for metric, title in METRICS.items():
        print(f"\n{title}, over seeds {seeds}")
        print(f"{'run':<24} {'mean':>7} {'std':>7} {'min..max':>15} {'mean vs bf16':>13} "
              f"{'paired gaps per seed':>{max(20, 8 * len(seeds))}} {'paired mean±std':>16}")
        for name, metrics in summary.items():
            m = metrics[metric]
            paired = " ".join(f"{g:+7.2%}" for g in m["paired_gaps"].values())
            print(f"{name:<24} {m['mean']:>7.4f} {m['std']:>7.4f} "
                  f"{m['min']:>7.4f}..{m['max']:<7.4f} {m['gap_of_means']:>+13.2%} "
                  f"{paired:>{max(20, 8 * len(seeds))}} "
                  f"{m['paired_gap']['mean']:>+9.2%}±{m['paired_gap']['std']:.2%}")
        b = summary["bf16"][metric]
        print(f"bf16 seed-to-seed spread: std {b['relative_std']:.2%} of the mean, "
              f"range {b['relative_range']:.2%} of the mean")


def markdown_table(summary: dict, seeds: list[int]) -> str:
    """The summary as the markdown table of docs/precision.md: per run the seed mean (and
    seed-to-seed std) of each metric and the paired gap to bf16, mean +- std over seeds."""
    header = (f"| run | held-out loss, mean over seeds {seeds} (std) | paired gap vs bf16 "
              "(mean +- std) | final train loss (std) | paired gap vs bf16 |")
    lines = [header, "|---|---|---|---|---|"]
    for name, metrics in summary.items():
        cells = []
        for metric in ("held_out_loss", "final_train_loss_smoothed"):
            m = metrics[metric]
            gap = m["paired_gap"]
            cells += [f"{m['mean']:.4f} ({m['relative_std']:.2%})",
                      "" if name == "bf16" else f"{gap['mean']:+.2%} +- {gap['std']:.2%}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: dict, seeds: list[int], path: Path) -> None:
    """Seed-mean curve per run with a min..max band; the right panel zooms on the second half,
    where gaps of a few percent are invisible at the full scale."""
    import numpy as np

    from moejax.tools.compare_report import pyplot

    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    zoom_lo, zoom_hi = [], []
    for name, by_seed in runs.items():
        steps = np.array([s for s, _ in by_seed[seeds[0]]["curve"]])
        losses = np.array([[loss for _, loss in by_seed[s]["curve"]] for s in seeds])
        second_half = steps >= steps[-1] / 2
        zoom_lo.append(losses[:, second_half].min())
        zoom_hi.append(losses[:, second_half].max())
        for ax in axes:
            line, = ax.plot(steps, losses.mean(0), label=name, lw=1.5)
            ax.fill_between(steps, losses.min(0), losses.max(0), color=line.get_color(), alpha=0.2)
    axes[1].set_xlim(steps[-1] / 2, steps[-1])
    margin = 0.05 * (max(zoom_hi) - min(zoom_lo))
    axes[1].set_ylim(min(zoom_lo) - margin, max(zoom_hi) + margin)
    band = f"mean and min..max over seeds {seeds}" if len(seeds) > 1 else f"seed {seeds[0]}"
    axes[0].set_title(f"train loss, {band}", fontsize=10)
    axes[1].set_title("second half, zoomed", fontsize=10)
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_ylabel("train loss (nats/token)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="train.seed values; every run is trained once per seed")
    parser.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS), choices=list(RUNS),
                        help="which runs (bf16 is always included: the gaps are to it)")
    parser.add_argument("--out", default="docs/precision", help="path prefix for .json and .png")
    parser.add_argument("--from-json", metavar="PATH", nargs="+",
                        help="train nothing: merge the runs of saved .json files (or of the "
                             "<out>_partial.json a cut-short study keeps; seeds trained in "
                             "separate processes), print their summary and table and write "
                             "<out>.json and <out>.png")
    args = parser.parse_args(argv)
    if args.from_json:
        return from_json([Path(p) for p in args.from_json], Path(args.out), args.runs)
    if any(o.startswith("train.seed=") for o in args.overrides):
        parser.error("set seeds with --seeds, not a train.seed override")
    names = ["bf16"] + [name for name in args.runs if name != "bf16"]
    load_at_start, started = os.getloadavg(), time.time()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + "_partial.json")
    runs = {name: {} for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:  # seed by seed: a run cut short keeps whole paired seeds
            for name in names:
                runs[name][seed] = run(name, seed, args.steps, args.overrides, Path(tmp))
                partial.write_text(json.dumps({"steps": args.steps, "runs": runs,
                                               "load_average_at_start": load_at_start}) + "\n")
    machine = {"load_average_1_5_15_min_at_start": load_at_start,
               "load_average_1_5_15_min_at_end": os.getloadavg(),
               "wall_seconds": time.time() - started, "cpus": os.cpu_count()}
    summary = summarize(runs, args.seeds)
    print_summary(summary, args.seeds)
    print(markdown_table(summary, args.seeds))
    print(f"load average at start {load_at_start}, at end "
          f"{machine['load_average_1_5_15_min_at_end']}, {machine['wall_seconds'] / 60:.1f} min")
    out.with_suffix(".json").write_text(json.dumps(
        {"steps": args.steps, "seeds": args.seeds, "overrides": args.overrides,
         "runs_config": {name: dict(zip(("compute_dtype", "fp8", "fp8_dispatch"), RUNS[name]))
                         for name in names},
         "machine": machine, "metrics": METRICS, "runs": runs, "summary": summary},
        indent=1) + "\n")
    plot(runs, args.seeds, out.with_suffix(".png"))
    partial.unlink()
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


def from_json(paths: list[Path], out: Path, names: list[str]) -> int:
    saved = [json.loads(path.read_text()) for path in paths]
    merged: dict = {}
    for one in saved:
        for name, by_seed in one["runs"].items():
            if name == "bf16" or name in names:
                merged.setdefault(name, {}).update(by_seed)
    # seeds that every run finished (json keys are strings)
    seeds = sorted(set.intersection(*(set(map(int, r)) for r in merged.values())))
    if not seeds:
        print(f"{paths}: no seed finished by every run")
        return 1
    runs = {name: {seed: by_seed[str(seed)] for seed in seeds} for name, by_seed in merged.items()}
    summary = summarize(runs, seeds)
    print_summary(summary, seeds)
    print(markdown_table(summary, seeds))
    out.with_suffix(".json").write_text(json.dumps(
        {"steps": saved[0]["steps"], "seeds": seeds, "merged_from": [str(p) for p in paths],
         "machine": [one.get("machine") for one in saved], "metrics": METRICS, "runs": runs,
         "summary": summary}, indent=1) + "\n")
    plot(runs, seeds, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
