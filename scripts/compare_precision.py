"""Train the same model in bf16, fp8 `tensor` and fp8 `block` and compare the loss curves.

    python scripts/compare_precision.py --steps 200 --out docs/precision
    python scripts/compare_precision.py --steps 200 --seeds 0 1 2 --out docs/precision

For each seed, every run has the same init and data order (`train.seed` drives both) and the
same config apart from `precision.fp8`. A fourth run in float32 (no fp8) shows how far any
change of numerics alone moves a run of this length. With several seeds, bf16's own
seed-to-seed spread shows how small a gap the comparison can resolve, and the paired gaps
(recipe vs bf16 with the same seed) cancel the part of that spread that init and data order
cause. Prints per run the seed-mean, spread and gaps to bf16 of the final train loss (mean of
the last 5 logs) and held-out loss, writes `<out>.json` and `<out>.png`. Extra arguments are
config overrides applied to every run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

try:
    import moejax
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import moejax

# run name -> (compute dtype, fp8 recipe)
RUNS = {"bf16": ("bfloat16", "none"), "fp8 tensor": ("bfloat16", "tensor"),
        "fp8 block": ("bfloat16", "block"), "float32": ("float32", "none")}
METRICS = {"final_train_loss_smoothed": "final train loss (mean of last 5 logs)",
           "held_out_loss": "held-out loss"}


def run(name: str, seed: int, steps: int, overrides: list[str], run_root: Path) -> dict:
    dtype, recipe = RUNS[name]
    cfg = moejax.load_config("tiny", [
        f"precision.compute_dtype={dtype}", f"precision.fp8={recipe}", f"train.steps={steps}",
        "moe.dispatch=capacity",  # fp8 experts need it; capacity_factor null drops nothing
        f"train.seed={seed}", "train.log_every=5", f"train.eval_every={steps}",
        "train.checkpoint_every=0", "train.peak_flops_per_device=1e9", *overrides])
    run_dir = run_root / f"{name.replace(' ', '_')}_seed{seed}"
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
        print(f"{'run':<10} {'mean':>7} {'std':>7} {'min..max':>15} {'mean vs bf16':>13} "
              f"{'paired gaps per seed':>{max(20, 8 * len(seeds))}} {'paired mean±std':>16}")
        for name, metrics in summary.items():
            m = metrics[metric]
            paired = " ".join(f"{g:+7.2%}" for g in m["paired_gaps"].values())
            print(f"{name:<10} {m['mean']:>7.4f} {m['std']:>7.4f} "
                  f"{m['min']:>7.4f}..{m['max']:<7.4f} {m['gap_of_means']:>+13.2%} "
                  f"{paired:>{max(20, 8 * len(seeds))}} "
                  f"{m['paired_gap']['mean']:>+9.2%}±{m['paired_gap']['std']:.2%}")
        b = summary["bf16"][metric]
        print(f"bf16 seed-to-seed spread: std {b['relative_std']:.2%} of the mean, "
              f"range {b['relative_range']:.2%} of the mean")


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
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="train.seed values; every run is trained once per seed")
    parser.add_argument("--out", default="docs/precision", help="path prefix for .json and .png")
    args = parser.parse_args(argv)
    if any(o.startswith("train.seed=") for o in args.overrides):
        parser.error("set seeds with --seeds, not a train.seed override")
    with tempfile.TemporaryDirectory() as tmp:
        runs = {name: {seed: run(name, seed, args.steps, args.overrides, Path(tmp))
                       for seed in args.seeds} for name in RUNS}
    summary = summarize(runs, args.seeds)
    print_summary(summary, args.seeds)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(
        {"steps": args.steps, "seeds": args.seeds, "overrides": args.overrides,
         "metrics": METRICS, "runs": runs, "summary": summary}, indent=1) + "\n")
    plot(runs, args.seeds, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
