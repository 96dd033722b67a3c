"""Run directories: a fresh one per run by default, never overwriting an earlier run; an existing
one is only reused to resume, and only with a compatible config."""

from __future__ import annotations

import os
import time
from pathlib import Path

import jax
import numpy as np
from omegaconf import OmegaConf

from moejax.config import Config, config_to_dict, config_to_yaml

CONFIG_FILE = "config.yaml"
# Settings a resumed run may change: how long and how often, and the mesh (checkpoints reshard).
RESUMABLE_CHANGES = {"train.steps", "train.log_every", "train.eval_every", "train.eval_batches",
                     "train.checkpoint_every", "train.keep_checkpoints",
                     "train.peak_flops_per_device", "mesh.data", "mesh.fsdp", "mesh.expert"}


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
    now = np.array(time.time(), np.float64)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        now = multihost_utils.broadcast_one_to_all(now)
    return float(now)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def prepare_run_dir(cfg: Config, run_dir: str | Path | None, resume: bool) -> Path:
    """Create or check the run directory and record the config in it (process 0 writes)."""
    if run_dir is None:
        if resume:
            raise RunDirError("--resume needs --run-dir naming the run to continue.")
        run_dir = _default_run_dir()
    run_dir = Path(run_dir)
    saved_config = run_dir / CONFIG_FILE
    if saved_config.exists():
        if not resume:
            raise RunDirError(f"run directory {run_dir} already holds a run: pass --resume to "
                              "continue it, or choose a new --run-dir.")
        differences = config_differences(OmegaConf.to_container(OmegaConf.load(saved_config)), cfg)
        if differences:
            raise RunDirError(f"cannot resume {run_dir} with a different config: "
                              f"{', '.join(differences)}; resume with its config or use a new "
                              "--run-dir.")
    elif resume:
        raise RunDirError(f"nothing to resume in {run_dir}: it holds no run (no {CONFIG_FILE}); "
                          "drop --resume to start a new run there.")
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise RunDirError(f"run directory {run_dir} is not empty and holds no moejax run: "
                          "choose a new or empty --run-dir.")
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_atomically(saved_config, config_to_yaml(cfg))
    return run_dir
