"""Forward+backward speed and memory of one MoE layer on CPU: moejax's dispatch modes against
each other and against Hugging Face transformers' DeepseekV3MoE, in one process.

    python scripts/bench_moe.py [--rounds 9] [--quick] [--json PATH] [--devices 8]

One step is a jitted `jax.value_and_grad` of sum(y^2) w.r.t. the layer's params and its input
x [8, T / 8, D], float32, router included, no shared experts; the torch rows run the same loss
through `DeepseekV3MoE` (same weights, so the same routing) and `loss.backward()`.

Systems, at each shape: moejax dropless (moe.tile_rows = the config default, plus the other
tiles of the sweep), capacity 1.0 (drops), capacity null (worst-case buffers, E x N rows: the
old dropless; slow, so timed in --slow-rounds rounds of its own, with dropless again as the
reference), HF grouped_mm and eager (eager is slow too: timed with capacity null), each at 2
threads (this machine's cores) and at 1 thread (under load from other work, torch's OpenMP
threads lose far more to a shared CPU than XLA's thread pool, so the targets compare with HF's
faster thread count per round), and a plain torch matmul (torch's own peak).

Protocol (the machine is shared and noisy): each round times every system once, in an order
rotated per round, each call just after a float32 XLA matmul (the peak) measured seconds
earlier; a ratio between two systems is taken per round, then its median and range over rounds
are reported. useful/peak = median over rounds of (useful FLOP/s) / (that call's peak FLOP/s).

Also: the tile sweep, sparse scaling (one dropless layer at E = 8 vs E = 128 at equal active
compute: same k and F, and fine-grained k x 4, F / 4), XLA's memory analysis of every compiled
moejax step, the 671B preset's dropless buffers per device (arithmetic from the bounds in
moejax/model/dispatch/dropless.py), and rows on a (data 1, fsdp 1, expert N) mesh of fake CPU
devices in a child process (information only: the N devices share the same cores).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import jax

import moejax
from moejax.config import MeshConfig
from moejax.model.dispatch import row_tile
from moejax.tools import bench
from moejax.tools.bench import LayerShape

SHAPES = bench.LAYER_SHAPES
# equal active compute: same T and D, k x F = 1024
SCALING = (LayerShape("E=8 k=2", 256, 512, 8, 2, 8192),
           LayerShape("E=128 k=2", 256, 512, 128, 2, 8192),
           LayerShape("E=128 k=8", 256, 128, 128, 8, 8192))
TILE_SWEEP = (64, 128, 256)
QUICK_TOKENS = 1024
PEAK_SIZE, QUICK_PEAK_SIZE = 3072, 1024
BUFFERS_EXPERT, BUFFERS_DEVICES = 64, (1024, 15360)  # DeepSeek-V3's EP64; see buffers_671b

TARGETS = {
    "capacity": 0.9,  # dropless tokens/s over capacity 1.0's, fine-grained and E=128
    "hf": {"coarse": 1.0, "fine-grained": 1.25, "E=128": 1.25},  # over HF grouped_mm
    "useful_peak": ("fine-grained", 0.60),
    "scaling": 1.15,  # E=128 step time over E=8's, equal active compute
    "memory": 1.2,  # dropless compiled bytes over capacity 1.0's
}
DROPLESS, CAPACITY, NULL = "moejax dropless", "moejax capacity 1.0", "moejax capacity null"


def quick_shape(shape: LayerShape, quick: bool) -> LayerShape:
    return LayerShape(shape.name, shape.d_model, shape.ffn_dim, shape.num_experts, shape.top_k,
                      QUICK_TOKENS) if quick else shape


def default_tile() -> int:
    return moejax.load_config(None, [], num_devices=1).moe.tile_rows


def moejax_systems(shape: LayerShape, sweep: bool) -> dict[str, tuple]:
    """label -> layer_config arguments (dispatch, capacity_factor, tile_rows)."""
    tile = default_tile()
    systems = {DROPLESS: ("dropless", None, None), CAPACITY: ("capacity", 1.0, None),
               NULL: ("capacity", None, None)}
    if sweep:
        for t in TILE_SWEEP:
            if t != tile:
                systems[f"{DROPLESS} tile {t}"] = ("dropless", None, t)
    return systems


def prepare_group(shape: LayerShape, args, sweep: bool, with_torch: bool):
    """Compile and warm up every system of one shape: (runs, slow labels, info per label)."""
    runs, slow, info = {}, [], {}
    tile = default_tile()
    for label, (dispatch, factor, tiles) in moejax_systems(shape, sweep).items():
        if label == NULL and args.slow_rounds == 0:
            continue
        print(f"  compiling + warm-up: {label}", flush=True)
        cfg = bench.layer_config(shape, dispatch, factor, tiles)
        layer = bench.moe_layer_step(cfg)
        runs[label] = layer.run
        info[label] = {"memory": layer.memory, **layer.stats}
        if dispatch == "dropless":
            info[label]["tile"] = row_tile(shape.tokens * shape.top_k, cfg.moe)
            info[label]["tile_rows"] = tiles or tile
        if label == NULL:
            slow.append(label)
        if label == DROPLESS:
            reference = layer
    if with_torch:
        threads = bench.cpu_threads()
        for impl in ("grouped_mm", "eager") if args.slow_rounds else ("grouped_mm",):
            for n in sorted({threads, 1}, reverse=True):
                label = f"HF {impl} ({n} thread{'s' if n > 1 else ''})"
                print(f"  warm-up: {label}", flush=True)
                runs[label] = bench.hf_moe_step(shape, impl, reference, threads=n)
                info[label] = {}
                if impl == "eager":
                    slow.append(label)
        label = f"torch matmul {args.peak_size}^3 ({threads} threads)"
        runs[label], torch_flops = bench.torch_matmul(args.peak_size, threads)
        info[label] = {"flops": torch_flops}
    return runs, slow, info


def rows_of_group(shape: LayerShape, times, peaks, info, peak_flops) -> list[dict]:
    """One dict per system: medians over rounds, and dropless's speed over it, per round."""
    flops = bench.useful_flops(shape)
    rows = []
    for label, ts in times.items():
        done = bench.timed(ts)
        if not done:
            continue
        own = info[label].get("flops", flops)
        row = {"shape": shape.name, "D": shape.d_model, "F": shape.ffn_dim,
               "E": shape.num_experts, "k": shape.top_k, "tokens": shape.tokens,
               "system": label, "rounds": len(done), "ms_per_step": 1e3 * statistics.median(done),
               "ms_all": [None if t is None else 1e3 * t for t in ts],
               "peak_ms_all": [None if p is None else 1e3 * p for p in peaks[label]],
               "tokens_per_s": shape.tokens / statistics.median(done),
               "useful_gflops": own / statistics.median(done) / 1e9,
               "useful_over_peak": bench.per_round_summary(
                   [own / peak_flops / u for u in bench.in_peak_units(ts, peaks[label])]),
               "dropless_speedup": bench.per_round_summary(bench.round_ratios(ts, times[DROPLESS])),
               **{k: v for k, v in info[label].items() if k != "flops"}}
        rows.append(row)
    return rows


def best_of(times: dict, prefix: str) -> list:
    """Per round, the faster of the systems whose label starts with `prefix` (None if none)."""
    series = [ts for label, ts in times.items() if label.startswith(prefix)]
    out = []
    for values in zip(*series):
        done = [v for v in values if v is not None]
        out.append(min(done) if done else None)
    return out


def run_group(shape: LayerShape, args, sweep: bool, with_torch: bool):
    """The fast systems interleaved for --rounds rounds; the slow ones (capacity null, HF eager)
    interleaved with dropless again for --slow-rounds rounds, their ratios against that
    dropless (a slow system in the fast rounds would space the fast ones a minute apart)."""
    print(f"{shape.label()}:", flush=True)
    runs, slow, info = prepare_group(shape, args, sweep, with_torch)
    peak, peak_flops = bench.matmul_peak(args.peak_size)
    fast = {label: run for label, run in runs.items() if label not in slow}
    times, peaks = bench.interleaved_rounds(fast, args.rounds, peak, log=print)
    rows = rows_of_group(shape, times, peaks, info, peak_flops)
    comparisons = {}
    for prefix in ("HF grouped_mm",):
        if any(label.startswith(prefix) for label in times):
            comparisons[f"{prefix} (faster thread count per round)"] = bench.per_round_summary(
                bench.round_ratios(best_of(times, prefix), times[DROPLESS]))
    if slow and args.slow_rounds:
        print("  slow systems, against dropless:", flush=True)
        slow_runs = {DROPLESS: runs[DROPLESS], **{label: runs[label] for label in slow}}
        slow_times, slow_peaks = bench.interleaved_rounds(slow_runs, args.slow_rounds, peak,
                                                          log=print)
        rows += [r for r in rows_of_group(shape, slow_times, slow_peaks, info, peak_flops)
                 if r["system"] != DROPLESS]
        if any(label.startswith("HF eager") for label in slow):
            comparisons["HF eager (faster thread count per round)"] = bench.per_round_summary(
                bench.round_ratios(best_of(slow_times, "HF eager"), slow_times[DROPLESS]))
    return {"shape": shape.name, "label": shape.label(), "rows": rows,
            "comparisons": comparisons}


def run_scaling(args, quick: bool):
    """One dropless layer at E=8 and at E=128 with equal active compute (same T, D, k x F),
    interleaved: E=128 with the same k and F (E alone changes), and E=128 fine-grained (k x 4,
    F / 4: 4x the token copies of width D, each GEMM a quarter as wide)."""
    shapes = [quick_shape(s, quick) for s in SCALING]
    print("sparse scaling: " + " vs ".join(s.label() for s in shapes), flush=True)
    runs, info = {}, {}
    for s in shapes:
        layer = bench.moe_layer_step(bench.layer_config(s, "dropless"))
        runs[s.name], info[s.name] = layer.run, {"memory": layer.memory, **layer.stats,
                                                 "label": s.label()}
    peak, _ = bench.matmul_peak(args.peak_size)
    times, _peaks = bench.interleaved_rounds(runs, args.rounds, peak, log=print)
    base = shapes[0].name
    return {"base": base, "info": info,
            "ms_all": {k: [1e3 * t for t in v] for k, v in times.items()},
            "ms_per_step": {k: 1e3 * statistics.median(v) for k, v in times.items()},
            "time_ratio": {s.name: bench.per_round_summary(bench.round_ratios(times[s.name], times[base]))
                           for s in shapes[1:]}}


def buffers_671b() -> dict:
    """Per-device dropless buffers of the deepseek_v3_671b preset's MoE layer, by arithmetic,
    on an expert axis of 64 (DeepSeek-V3's EP64) with the batch over every device (the preset
    names no mesh; without a pipeline's microbatches a step's tokens are all on the devices
    at once). Two device counts whose data axis divides the 15360-sequence batch:
    1024 devices (15 sequences each) and 15360 (one 4096-token sequence each)."""
    out = {"preset": "deepseek_v3_671b", "expert_shards": BUFFERS_EXPERT, "cases": []}
    for devices in BUFFERS_DEVICES:
        cfg = moejax.load_config("deepseek_v3_671b",
                                 [f"mesh.expert={BUFFERS_EXPERT}", "mesh.data=-1"],
                                 num_devices=devices)
        m, e, t = cfg.model, cfg.moe, cfg.train
        dtype_bytes = {"bfloat16": 2, "float16": 2, "float32": 4}[cfg.precision.compute_dtype]
        per_device = t.global_batch_size * t.seq_len // devices
        tile = row_tile(per_device * BUFFERS_EXPERT * e.top_k, e)
        case = bench.dropless_buffer_bytes(per_device, m.d_model, e.expert_ffn_dim,
                                           e.num_experts, e.top_k, BUFFERS_EXPERT, tile,
                                           dtype_bytes)
        out.update(D=m.d_model, F=e.expert_ffn_dim, E=e.num_experts, k=e.top_k,
                   compute_dtype=cfg.precision.compute_dtype,
                   global_tokens=t.global_batch_size * t.seq_len)
        out["cases"].append({"devices": devices, "tokens_per_device": per_device, "tile": tile,
                             **case})
    return out


def refresh_buffers(record: dict) -> None:
    """Recompute the arithmetic of a saved record (it measures nothing)."""
    record["buffers_671b"] = buffers_671b()


def run_mesh_child(args, num_devices: int, script: Path) -> list[dict]:
    """Re-run `script` (scripts/bench_moe.py) with `num_devices` fake CPU devices and
    --child-rows (`child_rows`); returns what it measured."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                        + f" --xla_force_host_platform_device_count={num_devices}").strip()
    # the child imports the same moejax as this process (not another installed copy)
    package_root = str(Path(moejax.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.json"
        command = [sys.executable, str(script), "--devices", str(num_devices),
                   "--mesh-rounds", str(args.mesh_rounds), "--child-rows", str(path)]
        if args.quick:
            command.append("--quick")
        subprocess.run(command, env=env, check=True)
        return json.loads(path.read_text())


def mesh_rows(args) -> list[dict]:
    """Dropless and capacity 1.0 on a (1, 1, N) mesh, interleaved: times and per-device bytes."""
    mesh = moejax.make_mesh(MeshConfig(data=1, fsdp=1, expert=args.devices))
    rows = []
    for shape in (quick_shape(s, args.quick) for s in SHAPES[:2]):
        print(f"{shape.label()} on {args.devices} devices:", flush=True)
        runs, info = {}, {}
        for label, (dispatch, factor, _) in list(moejax_systems(shape, False).items())[:2]:
            cfg = bench.layer_config(shape, dispatch, factor, devices=args.devices)
            layer = bench.moe_layer_step(cfg, mesh=mesh)
            runs[label], info[label] = layer.run, {"memory": layer.memory, **layer.stats}
        peak, peak_flops = bench.matmul_peak(args.peak_size)
        times, peaks = bench.interleaved_rounds(runs, args.mesh_rounds, peak, log=print)
        per_device = shape.tokens // args.devices
        tile = row_tile(shape.tokens * shape.top_k, cfg.moe)
        bound = bench.dropless_buffer_bytes(per_device, shape.d_model, shape.ffn_dim,
                                            shape.num_experts, shape.top_k, args.devices, tile, 4)
        for row in rows_of_group(shape, times, peaks, info, peak_flops):
            if row["system"] == DROPLESS:
                row["bound_bytes"] = bound["total_bytes"]
            rows.append({**row, "devices": args.devices})
    return rows


# ---------------------------------------------------------------------------------------------
# printing


def fmt_spread(s: dict, digits: int = 2) -> str:
    if not s or s["median"] is None:
        return "-"
    return f"{s['median']:.{digits}f}x [{s['min']:.{digits}f}-{s['max']:.{digits}f}], n={s['n']}"


def mib(x) -> str:
    return f"{bench.mib(x):,.0f}"


def group_table(group: dict) -> str:
    lines = [f"**{group['label']}**", "",
             ("| system | ms/step | tokens/s | useful GFLOP/s | useful/peak "
             "| dropless speed over it (per round) | dropped | padding | compiled MiB (temp) |"),
             "|" + "---|" * 9]
    for r in group["rows"]:
        memory = r.get("memory")
        mem = f"{mib(memory['total'])} ({mib(memory['temp'])})" if memory else "-"
        padding = f"{r['padding_overhead']:.1%}" if "padding_overhead" in r else "-"
        dropped = f"{r['dropped_fraction']:.1%}" if "dropped_fraction" in r else "-"
        system = r["system"] + (f" (tile {r['tile']})" if r["system"] == DROPLESS else "")
        upk = r["useful_over_peak"]["median"]
        plain = r["system"] == DROPLESS or "matmul" in r["system"]
        lines.append(
            f"| {system} | {r['ms_per_step']:,.0f} | {r['tokens_per_s']:,.0f} "
            f"| {r['useful_gflops']:.1f} | {upk:.0%} "
            f"| {'-' if plain else fmt_spread(r['dropless_speedup'])} "
            f"| {dropped} | {padding} | {mem} |")
    for label, s in group["comparisons"].items():
        lines.append(f"| {label} | | | | | {fmt_spread(s)} | | | |")
    return "\n".join(lines)


def tile_table(groups: list[dict]) -> str:
    """Each tile of the sweep against tile 128, capacity 1.0 and HF grouped_mm (its faster
    thread count), per round of the same run."""
    lines = [("| shape | moe.tile_rows (row tile used) | ms/step | padding "
              "| speed over tile 128 | over capacity 1.0 | over HF grouped_mm (faster threads) "
              "| useful/peak |"), "|" + "---|" * 8]
    for g in groups:
        by_tile = {r["tile_rows"]: r for r in g["rows"] if "tile_rows" in r}
        if 128 not in by_tile:
            continue
        rows = {r["system"]: r for r in g["rows"]}
        capacity = rows[CAPACITY]["ms_all"]
        hf = best_of({label: r["ms_all"] for label, r in rows.items()}, "HF grouped_mm")
        for t in sorted(by_tile):
            r = by_tile[t]
            ratios = [fmt_spread(bench.per_round_summary(bench.round_ratios(other, r["ms_all"])))
                      if any(v is not None for v in other) else "-"
                      for other in (by_tile[128]["ms_all"], capacity, hf)]
            if t == 128:
                ratios[0] = "-"
            lines.append(f"| {g['shape']} | {t} ({r['tile']}) | {r['ms_per_step']:,.0f} "
                         f"| {r['padding_overhead']:.1%} | {' | '.join(ratios)} "
                         f"| {r['useful_over_peak']['median']:.0%} |")
    return "\n".join(lines)


def memory_table(groups: list[dict], scaling: dict | None) -> str:
    lines = ["| shape | system | argument | output | temp | total | total over capacity 1.0 |",
             "|---|---|---|---|---|---|---|"]
    for g in groups:
        moe_rows = [r for r in g["rows"] if "memory" in r]
        capacity = next((r for r in moe_rows if r["system"] == CAPACITY), None)
        for r in moe_rows:
            m = r["memory"]
            ratio = f"{m['total'] / capacity['memory']['total']:.2f}x" if capacity else "-"
            lines.append(f"| {g['shape']} | {r['system']} | {mib(m['argument'])} "
                         f"| {mib(m['output'])} | {mib(m['temp'])} | {mib(m['total'])} | {ratio} |")
    if scaling:
        for name, info in scaling["info"].items():
            m = info["memory"]
            lines.append(f"| scaling {name} | {DROPLESS} | {mib(m['argument'])} "
                         f"| {mib(m['output'])} | {mib(m['temp'])} | {mib(m['total'])} | |")
    return "\n".join(lines)


def buffers_table(buffers: dict) -> str:
    gib = 2.0**30
    lines = [(f"deepseek_v3_671b MoE layer (D {buffers['D']}, F {buffers['F']}, "
             f"E {buffers['E']}, k {buffers['k']}, {buffers['compute_dtype']}), dropless, per "
             "device, ARITHMETIC from the bounds in moejax/model/dispatch/dropless.py (not "
             f"measured); assumed mesh: expert {buffers['expert_shards']} (DeepSeek-V3's "
             "EP64) x data, batch over every device:"),
             "", ("| devices | tokens per device N_ | row tile | exchange rows P N_ "
             "| sorted rows R | exchange GiB | sorted + pre-activations GiB "
             "| combine [M, D] GiB | total GiB "
             "| mean case (N_ k rows) GiB | total over mean case |"),
             "|" + "---|" * 11]
    for c in buffers["cases"]:
        b = c["bytes"]
        exchange = b["exchange (send + receive, out and back)"]
        grouped = b["sorted buffer in + out [R, D] x 2"] + b["pre-activations [R, F] x 2"]
        lines.append(f"| {c['devices']:,} | {c['tokens_per_device']:,} | {c['tile']} "
                     f"| {c['exchange_rows']:,} | {c['sorted_rows']:,} | {exchange / gib:,.1f} "
                     f"| {grouped / gib:,.1f} | {b['combine [M, D]'] / gib:,.1f} "
                     f"| {c['total_bytes'] / gib:,.1f} | {c['useful_bytes'] / gib:,.1f} "
                     f"| {c['total_bytes'] / c['useful_bytes']:.1f}x |")
    return "\n".join(lines)


def mesh_table(rows: list[dict]) -> str:
    lines = [("| shape | system | devices | ms/step | dropless speed over it | exchange fill "
             "| compiled MiB per device (temp) | dropless buffer bound MiB (arithmetic) |"),
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["memory"]
        fill = f"{r['exchange_fill']:.0%}" if "exchange_fill" in r else "-"
        speed = "-" if r["system"] == DROPLESS else fmt_spread(r["dropless_speedup"])
        lines.append(f"| {r['shape']} | {r['system']} | {r['devices']} | {r['ms_per_step']:,.0f} "
                     f"| {speed} | {fill} | {mib(m['total'])} ({mib(m['temp'])}) "
                     f"| {mib(r['bound_bytes']) if 'bound_bytes' in r else '-'} |")
    return "\n".join(lines)


def scaling_table(scaling: dict) -> str:
    base = scaling["base"]
    lines = ["Sparse scaling, dropless, equal active compute (same T, D and k x F):", "",
             (f"| layer | ms/step | step time over {base} (per round) | padding | temp MiB "
             "| total MiB |"), "|---|---|---|---|---|---|"]
    for name, info in scaling["info"].items():
        ratio = "-" if name == base else fmt_spread(scaling["time_ratio"][name])
        m = info["memory"]
        lines.append(f"| {info['label']} | {scaling['ms_per_step'][name]:,.0f} | {ratio} "
                     f"| {info['padding_overhead']:.1%} | {mib(m['temp'])} | {mib(m['total'])} |")
    return "\n".join(lines)


def check_targets(groups: list[dict], scaling: dict | None) -> list[str]:
    """One line per target: the figure, the target, met or MISSED."""
    def verdict(ok):
        return "met" if ok else "MISSED"

    lines = []
    for g in groups:
        rows = {r["system"]: r for r in g["rows"]}
        capacity = rows.get(CAPACITY)
        if capacity:
            s = capacity["dropless_speedup"]
            scope = "" if g["shape"] != "coarse" else " (the issue sets it for fine-grained and E=128)"
            lines.append(f"{g['shape']}: dropless tokens/s over capacity 1.0 {fmt_spread(s)} "
                         f"(target >= {TARGETS['capacity']}x{scope}): "
                         f"{verdict(s['median'] >= TARGETS['capacity'])}")
        hf = g["comparisons"].get("HF grouped_mm (faster thread count per round)")
        if hf and hf["median"] is not None:
            target = TARGETS["hf"][g["shape"]]
            lines.append(f"{g['shape']}: dropless over HF grouped_mm (its faster thread count "
                         f"per round) {fmt_spread(hf)} (target >= {target}x): "
                         f"{verdict(hf['median'] >= target)}")
        shape, target = TARGETS["useful_peak"]
        if g["shape"] == shape and DROPLESS in rows:
            u = rows[DROPLESS]["useful_over_peak"]["median"]
            lines.append(f"{shape}: dropless useful/peak {u:.0%} (target >= {target:.0%}): "
                         f"{verdict(u >= target)}")
        if capacity and DROPLESS in rows:
            ratio = rows[DROPLESS]["memory"]["total"] / capacity["memory"]["total"]
            lines.append(f"{g['shape']}: dropless compiled bytes over capacity 1.0 {ratio:.2f}x "
                         f"(target <= {TARGETS['memory']}x): {verdict(ratio <= TARGETS['memory'])}")
    if scaling:
        base = scaling["base"]
        base_memory = scaling["info"][base]["memory"]
        for name, ratio in scaling["time_ratio"].items():
            lines.append(f"sparse scaling: {name} step time over {base} {fmt_spread(ratio)} "
                         f"(target <= {TARGETS['scaling']}x): "
                         f"{verdict(ratio['median'] <= TARGETS['scaling'])}")
            m = scaling["info"][name]["memory"]
            lines.append(f"sparse scaling memory: {name} over {base}: temp "
                         f"{m['temp'] / base_memory['temp']:.2f}x, total "
                         f"{m['total'] / base_memory['total']:.2f}x (arguments, the weights and "
                         f"x, {bench.mib(base_memory['argument']):.0f} -> "
                         f"{bench.mib(m['argument']):.0f} MiB: E F grows)")
    return lines


def notes(peak_size: int) -> list[str]:
    return [
        f"- {bench.FLOP_FORMULA}",
        "- ms/step, tokens/s, useful GFLOP/s: medians over the rounds that timed the system",
        (f"- useful/peak: median over rounds of useful FLOP/s over the FLOP/s of a {peak_size}^3 "
        "float32 XLA matmul run just before that call"),
        ("- dropless speed over it: per round, this system's step time over dropless's (tile = "
        "config default) in the same round; median [min-max] over rounds, n rounds"),
        ("- compiled MiB: XLA memory analysis of the compiled fwd+bwd step, argument + output + "
        "temp (temp: activations, residuals, workspace); XLA:CPU reports no separate peak"),
        ("- dropped: token copies over capacity (untrained router); padding: padded rows / useful "
        "rows of the dropless buffer"),
    ]


def report(record: dict) -> list[str]:
    """Print every table of a run (from its JSON record); returns the target lines."""
    groups, scaling, mesh = record["groups"], record["scaling"], record["mesh_rows"]
    print()
    for g in groups:
        print(group_table(g))
        print()
    if any("tile_rows" in r and r["tile_rows"] != 128 for g in groups for r in g["rows"]):
        print("Tile sweep (dropless, moe.tile_rows; speeds per round, same run):\n")
        print(tile_table(groups))
        print()
    print(scaling_table(scaling))
    print()
    print("Compiled memory (MiB, XLA memory analysis of the fwd+bwd step):\n")
    print(memory_table(groups, scaling))
    print()
    print(buffers_table(record["buffers_671b"]))
    print()
    if mesh:
        print(f"Expert-parallel rows ({mesh[0]['devices']} fake CPU devices on the same cores; "
              "information only):\n")
        print(mesh_table(mesh))
        print()
    for line in notes(record["peak_size"]):
        print(line)
    print("\nTargets:")
    targets = check_targets(groups, scaling)
    for line in targets:
        print("  " + line)
    return targets


# ---------------------------------------------------------------------------------------------
# the three things scripts/bench_moe.py does; `args` is its parsed command line


def print_saved(path: Path) -> None:
    """Print the tables of a run saved with --json, its 671B arithmetic recomputed with the
    code as it is now (`refresh_buffers`); measures nothing."""
    record = json.loads(path.read_text())
    refresh_buffers(record)
    print(record["header"])
    print(f"command: {record['command']}")
    report(record)


def child_rows(args, path: Path) -> None:
    """The child of `run_mesh_child`: the mesh rows only, on its fake devices, as JSON."""
    if jax.device_count() != args.devices:
        sys.exit(f"expected {args.devices} devices, found {jax.device_count()}: set XLA_FLAGS="
                 f"--xla_force_host_platform_device_count={args.devices} before jax starts.")
    path.write_text(json.dumps(mesh_rows(args)))


def run(args, command: str, script: Path) -> dict:
    """Measure everything `args` asks for and print every table; returns the JSON record.
    `command`: the command line the record names; `script`: what the child process re-runs
    for the expert-parallel rows."""
    with_torch = not args.no_torch and bench.torch_available()
    header = (f"{datetime.date.today()}, {platform.node() or 'host'}: {bench.cpu_threads()} cores "
              f"({jax.devices()[0].device_kind}), jax {jax.__version__}")
    if with_torch:
        import torch
        import transformers
        header += f", torch {torch.__version__}, transformers {transformers.__version__}"
    else:
        header += ", no torch/transformers: Hugging Face rows skipped"
    print(header, flush=True)
    print(f"float32, fwd+bwd, {args.rounds} interleaved rounds "
          f"(slow systems: {args.slow_rounds})", flush=True)
    shapes = [quick_shape(SHAPES[1], True)] if args.quick else list(SHAPES)
    groups = [run_group(s, args, sweep=not args.quick, with_torch=with_torch) for s in shapes]
    scaling = run_scaling(args, args.quick)
    buffers = buffers_671b()
    mesh = []
    if args.devices > 1 and not args.quick:
        print(f"expert-parallel rows: child process on {args.devices} fake devices", flush=True)
        try:
            mesh = run_mesh_child(args, args.devices, script)
        except subprocess.CalledProcessError as err:  # keep the single-device results
            print(f"expert-parallel rows failed (exit {err.returncode}); skipped", flush=True)
    record = {"header": header, "command": command,
              "rounds": args.rounds, "slow_rounds": args.slow_rounds,
              "peak_size": args.peak_size, "groups": groups, "scaling": scaling,
              "buffers_671b": buffers, "mesh_rows": mesh}
    record["targets"] = report(record)
    return record
