"""Compressed data-parallel gradients and delayed expert updates, measured
(scripts/bench_grad_compression.py, docs/grad_compression.md).

- `gradient_bytes`: per device and step, the bytes the gradient reduction sends, counted from
  compiled HLO (tools.hlo_stats): the explicit reduction compiled alone (one shard_map over the
  trainer's own gradient layout, training.grad_reduce) for every setting, on any mesh the
  planner builds (the 671B and Mixtral plans included); on meshes small enough to compile
  whole steps, also every collective of the whole train step per setting.
- `study`: final held-out loss after `steps` steps per setting and seed on the tiny preset, with
  the float32 spread between two meshes of the implicit step as the tolerance of "equal", and
  a verdict per setting only where its paired gap to `none` is beyond the seed spread.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from moejax.config import Config, load_config
from moejax.tools import hlo_stats
from moejax.training import grad_reduce

# setting name -> overrides on top of the study's base config
SETTINGS = {
    "none": (),
    "f32": ("train.grad_compression=f32",),
    "bf16": ("train.grad_compression=bf16",),
    "fp8": ("train.grad_compression=fp8",),
    "powersgd": ("train.grad_compression=powersgd",),
    "expert delay": ("train.expert_grad_delay=true",),
}
STUDY_MESH = ("mesh.data=2", "mesh.fsdp=1", "mesh.expert=4")
# the second mesh of the implicit step: its gap to STUDY_MESH is float32 reordering alone
TOLERANCE_MESH = ("mesh.data=1", "mesh.fsdp=2", "mesh.expert=4")


# ---------------------------------------------------------------------------------------------
# bytes


def reduction_program(cfg: Config, mesh):
    """The explicit reduction alone, jitted: (per-replica gradients, sync state) -> reduced.
    Gradients enter as [R, *local shape] per leaf (one per replica, as the train step's
    shard_map holds them)."""
    plans = grad_reduce.leaf_plans(cfg, mesh)
    no_delay = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                                  expert_grad_delay=False))
    sync = jax.eval_shape(lambda: grad_reduce.init_sync_state(no_delay, mesh))  # shapes only
    error = None if sync is None else sync.error
    qs = None if sync is None else sync.q

    def body(grads_, sync_):
        reduced, new_error, new_q = grad_reduce.reduce_gradients(
            [g[0] for g in grads_], sync_, plans, cfg, mesh)
        return reduced, grad_reduce.GradSyncState(error=new_error, q=new_q)

    spec_of = grad_reduce._error_spec
    in_sync = grad_reduce.GradSyncState(
        error=None if error is None else {p.name: spec_of(p) for p in plans},
        q=None if qs is None else {p.name: grad_reduce._q_spec(p) for p in plans
                                   if p.name in qs})
    run = jax.shard_map(body, mesh=mesh, in_specs=([spec_of(p) for p in plans], in_sync),
                        out_specs=([p.target for p in plans], in_sync))
    grads = [jax.ShapeDtypeStruct((p.replicas(mesh), *p.shape), jnp.float32,
                                  sharding=NamedSharding(mesh, spec_of(p))) for p in plans]
    sync_in = grad_reduce.GradSyncState(
        error=None if error is None else {n: jax.ShapeDtypeStruct(
            a.shape, a.dtype, sharding=NamedSharding(mesh, in_sync.error[n]))
            for n, a in error.items()},
        q=None if qs is None else {n: jax.ShapeDtypeStruct(
            a.shape, a.dtype, sharding=NamedSharding(mesh, in_sync.q[n]))
            for n, a in qs.items()})
    return jax.jit(run), (grads, sync_in)


_LOWERED_HEADER = re.compile(r"^(ENTRY\s+)?([\w.\-]+) (.*\{\s*)$")
_LOWERED_NAME = re.compile(r"^(\s*(?:ROOT\s+)?)([\w.\-]+) = ")
_LOWERED_CALLEE = re.compile(r"\b(body|calls|to_apply|condition)=([\w.\-]+)")


def _named_like_compiled(hlo_text: str) -> str:
    """Lowered HLO text names computations and values without the compiled text's `%`:
    add it, so that hlo_stats reads both."""
    lines = []
    for line in hlo_text.splitlines():
        line = _LOWERED_HEADER.sub(r"\1%\2 \3", line)
        line = _LOWERED_NAME.sub(r"\1%\2 = ", line)
        lines.append(_LOWERED_CALLEE.sub(r"\1=%\2", line))
    return "\n".join(lines)


def _traffic(hlo_text: str) -> dict:
    if "ENTRY %" not in hlo_text:
        hlo_text = _named_like_compiled(hlo_text)
    traffic = hlo_stats.collective_traffic(hlo_text)
    return {"total": sum(k["bytes_sent"] for k in traffic.values()),
            "by_kind": {k: v for k, v in traffic.items() if v["count"]}}


def reduction_bytes(cfg: Config, mesh, compiled: bool = True) -> dict:
    """Bytes one device sends per step in the explicit reduction: "payload", counted from the
    program as lowered (its collectives in their own dtypes: bf16, e4m3 + f32 scales), and
    "xla_cpu", from XLA:CPU's compiled program, which widens sub-32-bit collectives (bf16 to
    f32, fp8 to f16), so it shows what CPU sends, not what a GPU would."""
    program, args = reduction_program(cfg, mesh)
    with jax.set_mesh(mesh):
        lowered = program.lower(*args)
        out = {"payload": _traffic(lowered.as_text(dialect="hlo"))}
        if compiled:
            out["xla_cpu"] = _traffic(lowered.compile().as_text())
    out["total"] = out["payload"]["total"]
    return out


def step_bytes(cfg: Config, mesh) -> dict:
    """Every collective of the whole compiled train step (moejax.training.run.build_run), as
    XLA:CPU compiles it."""
    from moejax.training.run import build_run

    return _traffic(build_run(cfg, mesh, abstract=True).lower().compile().as_text())


def gradient_bytes(cfg: Config, mesh, settings=("f32", "bf16", "fp8", "powersgd"),
                   whole_step: bool = False, compile_reduction: bool = True,
                   log=print) -> dict:
    """Per setting: the reduction's bytes per device per step (HLO-counted), and with
    `whole_step` every collective of the train step, implicit `none` included (whose
    gradient share is its total minus the f32 step's non-reduction traffic)."""
    out = {}
    for name in settings:
        c = dataclasses.replace(cfg, train=dataclasses.replace(
            cfg.train, grad_compression=name))
        start = time.perf_counter()
        row = {"reduction": reduction_bytes(c, mesh, compiled=compile_reduction)}
        if whole_step:
            row["step"] = step_bytes(c, mesh)
        row["seconds"] = time.perf_counter() - start
        out[name] = row
        log(f"{name}: reduction {row['reduction']['total'] / 2**20:.2f} MiB/device/step "
            f"({row['seconds']:.0f} s)")
    if whole_step:
        c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_compression="none"))
        implicit = step_bytes(c, mesh)
        f32 = out["f32"]
        other = f32["step"]["total"] - f32["reduction"]["xla_cpu"]["total"]
        out["none"] = {"step": implicit, "reduction": {"total": implicit["total"] - other,
                                                       "source": "implicit step total minus "
                                                       "the f32 step's non-reduction traffic"}}
    return out


def parameter_bytes(cfg: Config) -> dict:
    """f32 bytes of the dense and the expert parameters (the gradients' sizes)."""
    from moejax import params as P
    from moejax.model.transformer import param_specs

    dense = expert = 0
    for spec in jax.tree.leaves(param_specs(cfg), is_leaf=P.is_spec):
        if "experts" in spec.logical_axes:
            expert += spec.size * 4
        else:
            dense += spec.size * 4
    return {"dense": dense, "expert": expert}


# ---------------------------------------------------------------------------------------------
# study


def study_config(name: str, seed: int, steps: int, mesh=STUDY_MESH, corpus_dir=None,
                 extra=()) -> Config:
    overrides = [*mesh, *SETTINGS[name], f"train.seed={seed}", f"train.steps={steps}",
                 "train.log_every=10", f"train.eval_every={steps}", "train.checkpoint_every=0",
                 "train.peak_flops_per_device=1e9", *extra]
    if corpus_dir:
        overrides.append(f"data.corpus_dir={corpus_dir}")
    return load_config("tiny", overrides)


def one_run(cfg: Config, run_dir: Path, log=print) -> dict:
    from moejax.training.loop import train

    start = time.perf_counter()
    # "auto": a run cut short (the study killed and restarted) continues from its checkpoint
    summary = train(cfg, run_dir, resume="auto", progress=False)
    curve = summary["train_losses"]
    return {"held_out": summary["held_out"]["loss"], "final_train": curve[-1][1],
            "curve": curve, "seconds": time.perf_counter() - start, "run_dir": str(run_dir)}


def final_params(cfg: Config, run_dir: str):
    """The run's last checkpointed parameters, on the run's mesh."""
    from moejax.training.checkpoint import Checkpoints
    from moejax.training.run import build_run

    run = build_run(cfg)
    checkpoints = Checkpoints(Path(run_dir) / "checkpoints", 2)
    try:
        state, _ = checkpoints.restore(checkpoints.latest_step(), run.state)
    finally:
        checkpoints.close()
    return state.params


def params_gap(a, b) -> float:
    """Largest over leaves of max|a - b| / max|b|."""
    gaps = jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-30)),
                        a, b)
    return max(jax.tree.leaves(gaps))


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def summarise(runs: dict, seeds: list[int], tolerance: dict | None) -> dict:
    """Per setting: held-out loss over seeds, the paired gap to `none` per seed, and a verdict:
    'worse'/'better' only where every paired gap has one sign and the mean gap exceeds both
    none's seed-to-seed std and the two-mesh float32 tolerance; else 'no resolved difference'."""
    base = runs.get("none", {})
    base_std = _spread([base[s]["held_out"] for s in seeds if s in base])["std"] if base else 0
    tol = abs(tolerance["held_out_gap"]) if tolerance else 0.0
    out = {}
    for name, by_seed in runs.items():
        done = [s for s in seeds if s in by_seed]
        row = {"held_out": _spread([by_seed[s]["held_out"] for s in done]), "seeds": done}
        paired = [by_seed[s]["held_out"] - base[s]["held_out"] for s in done if s in base]
        if name != "none" and paired:
            mean = statistics.fmean(paired)
            row["paired_gap"] = {"values": paired, "mean": mean,
                                 "relative": mean / statistics.fmean(
                                     [base[s]["held_out"] for s in done if s in base])}
            same_sign = all(g > 0 for g in paired) or all(g < 0 for g in paired)
            resolved = len(paired) > 1 and same_sign and abs(mean) > max(base_std, tol)
            row["verdict"] = (("worse" if mean > 0 else "better") if resolved
                              else "no resolved difference")
        out[name] = row
    return {"by_setting": out, "none_seed_std": base_std, "tolerance": tolerance}


def study_table(result: dict) -> str:
    """The study's summary (`study`'s JSON) as a markdown table: per setting, the held-out
    loss of each seed, their mean and std, the mean paired gap to none, and the verdict."""
    summary = result["summary"]
    seeds = result["seeds"]
    lines = [(f"| setting | {' | '.join(f'seed {s}' for s in seeds)} | mean +- std | "
              "paired gap to none (relative) | verdict |"),
             "|---|" + "---|" * len(seeds) + "---|---|---|"]
    for name, row in summary["by_setting"].items():
        by_seed = dict(zip(row["seeds"], row["held_out"]["values"]))
        cells = [f"{by_seed[s]:.4f}" if s in by_seed else "" for s in seeds]
        gap = row.get("paired_gap")
        gap_text = (f"{gap['mean']:+.4f} ({gap['relative']:+.2%})" if gap else "")
        lines.append(f"| {name} | {' | '.join(cells)} | {row['held_out']['mean']:.4f} +- "
                     f"{row['held_out']['std']:.4f} | {gap_text} | {row.get('verdict', '')} |")
    lines.append(f"\nnone's seed-to-seed std {summary['none_seed_std']:.4f}; two-mesh float32 "
                 f"tolerance {abs(summary['tolerance']['held_out_gap']):.4f} (seed 0).")
    return "\n".join(lines)


def study(out: Path, seeds=(0, 1, 2), steps: int = 300, settings=tuple(SETTINGS),
          corpus_dir=None, run_root: Path | None = None, log=print) -> dict:
    """Runs the study, writing `out` (JSON) after every run so a partial study keeps its
    figures; runs already in `out` are not repeated. Seed 0 of every setting first, then the
    tolerance run, then the other seeds."""
    import tempfile

    run_root = Path(run_root or tempfile.mkdtemp(prefix="grad_compression_"))
    result = json.loads(out.read_text()) if out.exists() else {}
    result.setdefault("runs", {})
    result.setdefault("load_average_start", os.getloadavg())
    result.update(steps=steps, seeds=list(seeds), study_mesh=list(STUDY_MESH),
                  tolerance_mesh=list(TOLERANCE_MESH), host_cpus=os.cpu_count())

    def save():
        result["load_average_latest"] = os.getloadavg()
        result["summary"] = summarise({n: {int(s): r for s, r in v.items()}
                                       for n, v in result["runs"].items()},
                                      list(seeds), result.get("tolerance"))
        out.write_text(json.dumps(result, indent=1))

    def run(name, seed, mesh=STUDY_MESH, key=None):
        key = key or name
        done = result["runs"].setdefault(key, {})
        if str(seed) in done:
            return done[str(seed)]
        cfg = study_config(name, seed, steps, mesh, corpus_dir)
        record = one_run(cfg, run_root / f"{key.replace(' ', '_')}_seed{seed}")
        record.pop("curve")
        done[str(seed)] = record
        log(f"{key} seed {seed}: held-out {record['held_out']:.4f} ({record['seconds']:.0f} s)")
        save()
        return record

    def gap(seed, record, name, mesh, base, base_mesh):
        """held-out and final-parameter gaps of `record` (setting `name` on `mesh`) to `base`
        (none on `base_mesh`), both of `seed`."""
        return {"held_out_gap": record["held_out"] - base["held_out"],
                "params_gap": params_gap(
                    final_params(study_config(name, seed, steps, mesh, corpus_dir),
                                 record["run_dir"]),
                    final_params(study_config("none", seed, steps, base_mesh, corpus_dir),
                                 base["run_dir"]))}

    def tolerance(seed):
        """none on a second mesh: its gap to none on STUDY_MESH is float32 reordering alone."""
        other = run("none", seed, TOLERANCE_MESH, key="none on fsdp2 x expert4")
        result["tolerance"] = gap(seed, other, "none", TOLERANCE_MESH,
                                  result["runs"]["none"][str(seed)], STUDY_MESH)
        log(f"tolerance: {result['tolerance']}")
        save()

    def explicit_gap(seed):
        """f32 (the explicit reduction) against none after `steps` steps."""
        result["f32_vs_none"] = gap(seed, result["runs"]["f32"][str(seed)], "f32", STUDY_MESH,
                                    result["runs"]["none"][str(seed)], STUDY_MESH)
        log(f"f32 vs none: {result['f32_vs_none']}")
        save()

    first = seeds[0]
    ordered = ["none"] + [n for n in settings if n != "none"]
    for name in ordered:
        run(name, first)
        if name == "none" and "tolerance" not in result:
            tolerance(first)
        if name == "f32" and "f32_vs_none" not in result:
            explicit_gap(first)
    for seed in seeds[1:]:
        for name in ordered:
            run(name, seed)
    result["load_average_end"] = os.getloadavg()
    save()
    return result
