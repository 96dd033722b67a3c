"""Run directories: a fresh one per run by default, never overwriting an earlier run; an existing
one is only reused to resume, and only with a compatible config."""

from __future__ import annotations

import os
import time
from pathlib import Path

import jax
from omegaconf import OmegaConf

from moejax.config import Config, config_to_dict, config_to_yaml, load_yaml_mapping
from moejax.training import distributed
from moejax.training.runlock import is_lock_file

CONFIG_FILE = "config.yaml"
AUTO = "auto"  # resume="auto": resume a run that exists, else start it
# Settings a resumed run may change: how long and how often, the mesh (checkpoints reshard),
# and the learning rate (lowered after a divergence, as TrainingDiverged advises).
RESUMABLE_CHANGES = {"train.steps", "train.log_every", "train.learning_rate",
                     "train.eval_every", "train.eval_batches", "train.checkpoint_every",
                     "train.keep_checkpoints",
                     "train.peak_flops_per_device", "train.max_skipped_steps_in_row",
                     "mesh.data", "mesh.fsdp", "mesh.expert", "mesh.pipe",
                     # how the pipeline runs, not what it computes
                     "train.microbatches", "train.pipeline_schedule", "train.virtual_stages",
                     "train.pipeline_layers_per_stage",
                     # how attention runs (blockwise or whole, which kernel), not what it
                     # computes
                     "model.attention_block", "model.attention_kernel",
                     # where compiled steps are cached (runs saved before it existed lack it)
                     "train.compilation_cache"}


class RunDirError(ValueError):
    """A run directory that cannot be used as asked; the message says what to do instead."""


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(saved: dict, new: Config) -> list[str]:
    """'key (saved -> new)' for every setting that a resumed run may not change."""
    old, cur = _flatten(saved), _flatten(config_to_dict(new))
    return [f"{k} ({old.get(k)!r} -> {cur.get(k)!r})" for k in sorted(set(old) | set(cur))
            if k not in RESUMABLE_CHANGES and old.get(k) != cur.get(k)]


def _default_run_dir() -> Path:
    """runs/YYYYmmdd-HHMMSS (with a suffix if taken), the same name on every process."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(_shared_time()))
    candidate, suffix = Path("runs") / stamp, 1
    while candidate.exists():
        candidate, suffix = Path("runs") / f"{stamp}-{suffix}", suffix + 1
    return candidate


def _shared_time() -> float:
    """Process 0's clock, through the coordinator (no device collective before the barriers)."""
    return float(distributed.broadcast_text("run start time", repr(time.time())))


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def resolve_run_dir(run_dir: str | Path | None, resume: bool | str) -> Path:
    """The run directory asked for (a new runs/<time> by default), if it can be written."""
    if run_dir is None:
        if resume:
            raise RunDirError(f"{'--auto-resume' if resume == AUTO else '--resume'} needs "
                              "--run-dir naming the run to continue.")
        run_dir = _default_run_dir()
    run_dir = Path(run_dir)
    _check_writable(run_dir)
    return run_dir


def check_run_dir(cfg: Config, run_dir: str | Path | None,
                  resume: bool | str) -> tuple[Path, bool]:
    """(the run directory to use, whether to resume it), checked without writing anything: a
    fresh run needs a new or empty writable directory, a resume one that holds a run of a
    compatible config. `resume="auto"` resumes a directory that holds a run and starts one in
    a directory that holds none, so the same launch line is safe to repeat."""
    run_dir = resolve_run_dir(run_dir, resume)
    saved_config = run_dir / CONFIG_FILE
    if resume == AUTO:
        resume = saved_config.exists()
    if saved_config.exists():
        if not resume:
            raise RunDirError(f"run directory {run_dir} already holds a run: pass --resume to "
                              "continue it, or choose a new --run-dir.")
        differences = config_differences(_saved_config(saved_config), cfg)
        if differences:
            raise RunDirError(f"cannot resume {run_dir} with a different config: "
                              f"{', '.join(differences)}; resume with its config or use a new "
                              "--run-dir.")
    elif resume:
        raise RunDirError(f"nothing to resume in {run_dir}: it holds no run (no {CONFIG_FILE}); "
                          "drop --resume to start a new run there.")
    elif run_dir.exists() and any(not is_lock_file(p) for p in run_dir.iterdir()):
        raise RunDirError(f"run directory {run_dir} is not empty and holds no moejax run: "
                          "choose a new or empty --run-dir.")
    return run_dir, bool(resume)


def _saved_config(path: Path) -> dict:
    """The config a run recorded; a damaged file (not text, not YAML, not a mapping, empty) is
    named in one sentence with its line and column, and nothing is changed."""
    advice = ("restore it (it records the run's full resolved config, which a resume must "
              "match) or start again in a new --run-dir")
    saved = OmegaConf.to_container(
        load_yaml_mapping(path, "the run's config file", advice, error=RunDirError))
    if not saved:
        raise RunDirError(f"the run's config file {path} is empty; {advice}.")
    return saved


def _check_writable(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} is a file, not a directory: choose another "
                          "--run-dir.")
    existing = next(p for p in (run_dir, *run_dir.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise RunDirError(f"run directory {run_dir} cannot be made because {existing} is a file: "
                          "choose another --run-dir.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirError(f"run directory {run_dir} is not writable ({existing} is read-only "
                          "for this user): choose a writable --run-dir or fix its permissions.")


def write_run_config(cfg: Config, run_dir: Path) -> None:
    """Create the run directory and record the config in it (process 0 writes); called only
    once the run has started (fresh) or its checkpoint has restored (resume), so a failed
    start changes nothing."""
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_atomically(run_dir / CONFIG_FILE, config_to_yaml(cfg))
