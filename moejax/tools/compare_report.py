"""The comparison's markdown tables and PNG plots, from the results record of moejax.tools.compare."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _fmt(stat: dict | None, digits: int = 3, scale: float = 1.0, comma: bool = False) -> str:
    """'mean ± spread/2' style cell: mean [min-max] over seeds, or '-' when missing."""
    if not stat or stat.get("mean") is None:
        return "not reached" if stat and stat.get("values") else "-"
    values = [v * scale for v in stat["values"]]
    form = f",.{digits}f" if comma else f".{digits}f"
    return f"{stat['mean'] * scale:{form}} [{min(values):{form}}-{max(values):{form}}]"


def _sci(stat: dict | None) -> str:
    if not stat or stat.get("mean") is None:
        return "not reached" if stat and stat.get("values") else "-"
    return f"{stat['mean']:.2e} [{min(stat['values']):.2e}-{max(stat['values']):.2e}]"


def _verdict(v: dict, digits: int = 3, comma: bool = False) -> str:
    if v["difference"] is None:
        return v["verdict"]
    if v["spread"] is None:
        return f"{v['verdict']} ({v['difference']:+,.{digits}f})"
    form = f"+,.{digits}f" if comma else f"+.{digits}f"
    return f"{v['verdict']} ({v['difference']:{form}}, spread {v['spread']:,.{digits}f})"


def main_table(result: dict) -> list[str]:
    target = f"{result['target_loss']:.2f}"
    lines = [(f"| row | total / active params | FLOPs/token | final held-out loss (nats/token) "
             f"| steps to {target} | tokens to {target} | tokens/s (this CPU) | load CV (mean) "
             f"| dropped fraction | this row against DeepSeek: loss; tokens to {target}; tokens/s |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in result["rows"].items():
        s = row["summary"]
        to = s["to_loss"][target]
        versus = result["versus_reference"].get(name)
        versus = ("reference" if name == "deepseek" else "-") if versus is None else "; ".join(
            [_verdict(versus["final_held_out"]), _verdict(versus["tokens_to_target"], 0, True),
             _verdict(versus["tokens_per_second"], 0, True)])
        lines.append(
            f"| {name}: {row['label']} | {row['total_params']:,} / {row['active_params']:,} "
            f"| {row['flops_per_token']:.3g} | {_fmt(s['final_held_out'])} | {_fmt(to['step'], 0)} "
            f"| {_fmt(to['tokens'], 0, comma=True)} | {_fmt(s['tokens_per_second'], 0, comma=True)} "
            f"| {_fmt(s.get('load_cv_mean'), 2)} | {_fmt(s.get('dropped_fraction'), 4)} "
            f"| {versus} |")
    return lines


def ladder_table(result: dict) -> list[str]:
    levels = [f"{level:.2f}" for level in result["ladder"]]
    lines = ["| row | " + " | ".join(f"steps to {lv}" for lv in levels) + " |",
             "|---|" + "---|" * len(levels)]
    for name, row in result["rows"].items():
        cells = [_fmt(row["summary"]["to_loss"][lv]["step"], 0) for lv in levels]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def ablation_table(result: dict) -> list[str]:
    target = f"{result['target_loss']:.2f}"
    lines = [f"| advice | baseline -> variant | held-out loss | tokens to {target} | tokens/s |",
             "|---|---|---|---|---|"]
    for a in result["ablations"]:
        lines.append(f"| {a['advice']} | {a['baseline']} -> {a['variant']} "
                     f"| {_verdict(a['final_held_out'])} "
                     f"| {_verdict(a['tokens_to_target'], 0, True)} "
                     f"| {_verdict(a['tokens_per_second'], 0, True)} |")
    return lines


def cost_table(result: dict) -> list[str]:
    cost = result["cost"]
    target = f"{result['target_loss']:.2f}"
    lines = [(f"| row | training seconds to {target} (this CPU) | FLOPs to {target} "
             f"| GPU-hours to {target} (estimate) | tokens/day per GPU (estimate) |"),
             "|---|---|---|---|---|"]
    for name, c in cost["rows"].items():
        seconds = result["rows"][name]["summary"]["to_loss"][target]["train_seconds"]
        lines.append(f"| {name} | {_fmt(seconds, 1)} | {_sci(c['flops_to_target'])} "
                     f"| {_sci(c['gpu_hours'])} | {c['tokens_per_day_at_mfu']:.3e} |")
    return lines


def markdown(result: dict, plot_names: list[str]) -> str:
    study = result["study"]
    cost = result["cost"]
    parts = [
        f"# Architecture comparison ({result['mode']} mode, `scripts/compare_architectures.py`)",
        "",
        f"    {result['command']}",
        "",
        (f"Started {result['started_utc']}, wall time {result['wall_s'] / 60:.1f} minutes; "
        f"{result['host']}. Seeds {study['seeds']}; {study['steps']} steps per run (rows with a "
        "smaller batch run proportionally more, for equal tokens); held-out loss every "
        f"{study['eval_every']} steps on {study['eval_batches']} validation batches. Every number "
        "below is in the JSON next to this file. Cells: mean [min-max] over seeds."),
        "",
        ("A difference is called better/worse only when the gap between seed means exceeds the "
        "larger seed-to-seed spread (max - min) of the two rows; otherwise 'within spread'. "
        f"The target loss {result['target_loss']:.2f} is the worst final held-out loss of any "
        "main-row run rounded up to 0.05 nats: every main-row run reaches it."),
        "",
        "## Rows", "", *main_table(result), "",
        "## Steps to each held-out loss of the ladder", "", *ladder_table(result), "",
    ]
    if result["ablations"]:
        parts += ["## Ablations (the tuning advice)", "", *ablation_table(result), ""]
    parts += [
        "## Cost to the target loss", "",
        (f"Estimate, not a measurement: {cost['formula']}, with MFU {cost['mfu']:.0%} and the "
        f"{cost['gpu']} peak of {cost['gpu_peak_flops'] / 1e12:.1f} TFLOP/s. FLOPs per token "
        "count the active parameters (6 N_active plus attention), so at equal active "
        "parameters the estimated tokens/day is equal by construction; only the tokens needed "
        "to reach the loss, and a real implementation's MFU, can separate the rows."), "",
        *cost_table(result), "",
        "## Plots", "", *[f"![{name}]({name})" for name in plot_names], "",
    ]
    return "\n".join(parts)


def pyplot():
    """matplotlib.pyplot drawing to files (Agg); matplotlib is the `plots` extra."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("error: plots need matplotlib: pip install 'moejax[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plots(result: dict, prefix: Path) -> list[Path]:
    """Held-out loss vs steps and vs training seconds, load CV over time, and expert-load
    heatmaps; returns the PNG paths."""
    plt = pyplot()
    paths = []
    for key, xlabel, suffix in (("step", "training step", "loss_steps"),
                                ("train_seconds", ("training wall time (s, this CPU; compilation "
                                 "and evaluation excluded)"), "loss_time")):
        fig, ax = plt.subplots(figsize=(8, 5))
        for name, row in result["rows"].items():
            _mean_band(ax, [r["held_out"][key] for r in row["runs"]],
                       [r["held_out"]["loss"] for r in row["runs"]], name)
        ax.axhline(result["target_loss"], color="grey", linestyle=":", label="target loss")
        ax.set(xlabel=xlabel, ylabel="held-out loss (nats/token)",
               title=f"Held-out loss, mean over seeds (band: min-max), {result['mode']} mode")
        ax.legend(fontsize=8)
        paths.append(_save(fig, prefix, suffix))
    paths.append(_load_cv_plot(plt, result, prefix))
    paths.append(_heatmaps(plt, result, prefix))
    return paths


def _mean_band(ax, xs_per_seed, ys_per_seed, label) -> None:
    """Mean curve with a min-max band over seeds, on the first seed's x grid (x of the same
    step differ between seeds only when x is wall time: there the seeds' mean x is used)."""
    length = min(len(y) for y in ys_per_seed)
    xs = np.mean([x[:length] for x in xs_per_seed], axis=0)
    ys = np.array([y[:length] for y in ys_per_seed], dtype=float)
    line, = ax.plot(xs, ys.mean(axis=0), marker=".", label=label)
    ax.fill_between(xs, ys.min(axis=0), ys.max(axis=0), color=line.get_color(), alpha=0.2)


def _load_cv_plot(plt, result: dict, prefix: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, row in result["rows"].items():
        loads = [r["load"] for r in row["runs"]]
        if loads[0] is not None:
            _mean_band(ax, [ld["step"] for ld in loads], [ld["cv"] for ld in loads], name)
    ax.set(xlabel="training step", ylabel="expert-load CV (std / mean, dimensionless)",
           title="Expert-load CV (tokens per expert, mean over MoE layers), mean over seeds")
    ax.legend(fontsize=8)
    return _save(fig, prefix, "load_cv")


def _heatmaps(plt, result: dict, prefix: Path) -> Path:
    moe = [(name, row) for name, row in result["rows"].items() if row["runs"][0]["load"]]
    fig, axes = plt.subplots(len(moe), 1, figsize=(8, 2.2 * len(moe) + 0.5), squeeze=False)
    for ax, (name, row) in zip(axes[:, 0], moe):
        load = row["runs"][0]["load"]
        share = np.array(load["share"]).T  # [E, records]
        steps = load["step"]
        image = ax.imshow(share, aspect="auto", origin="lower", cmap="viridis",
                          extent=(steps[0], steps[-1], -0.5, share.shape[0] - 0.5))
        ax.set(ylabel="expert id", title=f"{name} (seed {row['runs'][0]['seed']}): share of "
               f"routed assignments (even = {1 / share.shape[0]:.3f})")
        fig.colorbar(image, ax=ax, label="share (fraction)")
    axes[-1, 0].set_xlabel("training step")
    return _save(fig, prefix, "load_heatmap")


def _save(fig, prefix: Path, suffix: str) -> Path:
    path = prefix.with_name(f"{prefix.name}_{suffix}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    fig.clf()
    plt = pyplot()
    plt.close(fig)
    return path
