"""The one run builder: the train state, its shardings and the compiled steps of a config on a
mesh. The training loop, the planner, the benchmarks and the GPU check all build their run here,
so the planner or a benchmark measures the trainer's own state and step, never a copy of them.

    run = build_run(cfg)                         # arrays, created sharded on cfg's mesh
    state, metrics = run.step(run.state, run.global_batch(local_tokens))
    shapes = build_run(cfg, mesh, abstract=True)   # ShapeDtypeStructs: nothing allocated
    compiled = shapes.lower().compile()
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from moejax import sharding
from moejax.config import Config
from moejax.training.state import TrainState, abstract_train_state, init_train_state
from moejax.training.step import compiled_eval_step, compiled_train_step


@dataclasses.dataclass
class Run:
    """A config's train state on a mesh with its jitted train and eval steps."""

    cfg: Config
    mesh: jax.sharding.Mesh
    # arrays, or ShapeDtypeStructs when built abstract; either way each leaf carries its sharding
    state: TrainState
    step: object  # jitted (state, batch) -> (state, metrics); donates the state
    eval_step: object  # jitted (params, batch, router) -> mean cross-entropy

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train.global_batch_size * self.cfg.train.seq_len

    def batch_spec(self) -> dict:
        """The global batch {"tokens": [B, T + 1] int32} as a sharded ShapeDtypeStruct."""
        t = self.cfg.train
        return {"tokens": jax.ShapeDtypeStruct((t.global_batch_size, t.seq_len + 1), jnp.int32,
                                               sharding=sharding.batch_sharding(self.mesh))}

    def global_batch(self, local_tokens: np.ndarray) -> dict:
        return global_batch(self.mesh, local_tokens)

    def lower(self, batch: dict | None = None):
        """The train step lowered for this state and `batch` (default: its abstract spec)."""
        with jax.set_mesh(self.mesh):
            return self.step.lower(self.state, batch or self.batch_spec())


def build_run(cfg: Config, mesh=None, *, key: jax.Array | None = None,
              abstract: bool = False) -> Run:
    """The run of `cfg` on `mesh` (default: the config's mesh over this host's devices): the
    fresh state from `key` (default: train.seed), created in its shardings, or with
    `abstract=True` its ShapeDtypeStructs (same shapes, dtypes and shardings; nothing
    allocated, for planning at full size)."""
    mesh = sharding.make_mesh(cfg.mesh) if mesh is None else mesh
    if abstract:
        state = abstract_train_state(cfg, mesh)
    else:
        state = init_train_state(cfg, jax.random.key(cfg.train.seed) if key is None else key, mesh)
    # the step reads no random numbers: runs that differ only in their seed share a compilation
    step_cfg = cfg.replace(train=dataclasses.replace(cfg.train, seed=0))
    return Run(cfg, mesh, state, compiled_train_step(step_cfg, mesh),
               compiled_eval_step(step_cfg))


def use_compilation_cache(directory: str | None) -> Path | None:
    """Point XLA's persistent compilation cache at `directory` (train.compilation_cache; ~
    expands) unless the process already set one; returns the directory in use, or None. Jax
    caches compilations of at least jax_persistent_cache_min_compile_time_secs (1 s by
    default): the train, eval and state-initialisation steps."""
    current = jax.config.jax_compilation_cache_dir
    if current:
        return Path(current)
    if directory is None:
        return None
    path = Path(directory).expanduser()
    jax.config.update("jax_compilation_cache_dir", str(path))
    return path


def global_batch(mesh, local_tokens: np.ndarray) -> dict:
    """This process's rows [B / processes, T + 1] -> one global array sharded over the batch."""
    tokens = jax.make_array_from_process_local_data(sharding.batch_sharding(mesh), local_tokens)
    return {"tokens": tokens}
