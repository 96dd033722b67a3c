"""Train the same model in bf16, fp8 `tensor` and fp8 `block` and compare the loss curves.

    python scripts/compare_precision.py --steps 200 --out docs/precision

Same seed, same data order, same config apart from `precision.fp8`. A fourth run in float32
(no fp8) shows how far any change of numerics alone moves a run of this length. Prints each
run's final train and held-out loss and the relative gap to bf16, writes `<out>.json` and
`<out>.png`. Extra arguments are config overrides applied to every run.
"""

from __future__ import annotations

import argparse
import json
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


def run(name: str, steps: int, overrides: list[str], run_root: Path) -> dict:
    dtype, recipe = RUNS[name]
    cfg = moejax.load_config("tiny", [
        f"precision.compute_dtype={dtype}", f"precision.fp8={recipe}", f"train.steps={steps}",
        "train.log_every=5", f"train.eval_every={steps}", "train.checkpoint_every=0",
        "train.peak_flops_per_device=1e9", *overrides])
    run_dir = run_root / name.replace(" ", "_")
    summary = moejax.train(cfg, run_dir, progress=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    curve = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    return {"curve": curve, "final_train_loss": summary["final_train_loss"],
            "held_out_loss": summary["held_out"]["loss"]}


def smoothed_final(curve, last: int = 5) -> float:
    """Mean of the last few logged losses (one logged batch is noisy)."""
    return sum(loss for _, loss in curve[-last:]) / min(last, len(curve))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, result in results.items():
        steps, losses = zip(*result["curve"])
        ax.plot(steps, losses, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats/token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default="docs/precision", help="path prefix for .json and .png")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: run(name, args.steps, args.overrides, Path(tmp)) for name in RUNS}
    base = smoothed_final(results["bf16"]["curve"])
    print(f"{'run':<10} {'final train loss (mean of last 5 logs)':>40} {'vs bf16':>9} "
          f"{'held-out loss':>14} {'vs bf16':>9}")
    for name, result in results.items():
        final = smoothed_final(result["curve"])
        result["final_train_loss_smoothed"] = final
        result["relative_gap"] = final / base - 1
        held = result["held_out_loss"]
        held_gap = held / results["bf16"]["held_out_loss"] - 1
        print(f"{name:<10} {final:>40.4f} {result['relative_gap']:>+9.2%} {held:>14.4f} "
              f"{held_gap:>+9.2%}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(
        {"steps": args.steps, "overrides": args.overrides, "results": results}, indent=1) + "\n")
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
