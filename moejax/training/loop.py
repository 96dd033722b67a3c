"""The training loop: run directory, data, state (fresh or resumed), steps, evaluation,
metrics, checkpoints, and a clean stop on SIGTERM/SIGINT."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from moejax import data as data_lib
from moejax import sharding
from moejax.config import Config
from moejax.data import Corpus, load_corpus
from moejax.model import attention
from moejax.model.dispatch.dropless import kernel_description
from moejax.model.layers import layer_matmuls
from moejax.model.transformer import count_params
from moejax.training import distributed
from moejax.training.checkpoint import Checkpoints, set_aside
from moejax.training.init_from import check_init_from, load_initial_model
from moejax.training.metrics import (
    MetricsWriter,
    flops_per_token,
    measure_peak_flops,
    truncate_metrics,
)
from moejax.training.run import build_run, global_batch, use_compilation_cache
from moejax.training.rundir import check_run_dir, resolve_run_dir, write_run_config
from moejax.training.runlock import owning_run


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps (save, then exit)."""

    def __init__(self):
        self.received = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def evaluate(cfg: Config, mesh, state, eval_batches, eval_fn, corpus: Corpus) -> dict:
    losses = [float(eval_fn(state.params, global_batch(mesh, b["tokens"]), state.router))
              for b in eval_batches]
    result = {"loss": float(np.mean(losses))}
    if corpus.bytes_per_token:
        result["bits_per_byte"] = result["loss"] / math.log(2) / corpus.bytes_per_token
    return result


class TrainingDiverged(RuntimeError):
    """Too many steps in a row had a non-finite loss or gradients; the message says what to try."""


def train(cfg: Config, run_dir: str | Path | None = None, *, resume: bool | str = False,
          progress: bool = True, max_steps: int | None = None, announce=None) -> dict:
    """Train `cfg` and return a summary; `max_steps` stops early (as a preemption would).
    `resume`: continue the run in `run_dir`; "auto": continue it if it holds one, else start
    it there (a launch line safe to repeat). One process owns a run directory at a time.

    `announce` (e.g. print) receives a few start-up lines: run directory, model, data, mesh,
    and any unreadable checkpoint a resume skips. Everything that can be checked is checked
    before the run directory changes: a failed start leaves it as it was (or absent).
    """
    corpus = load_corpus(cfg)
    if cfg.train.init_from:
        check_init_from(cfg)  # before the slow start-up, not after it
    run_dir = resolve_run_dir(run_dir, resume)
    report = announce or (lambda line: None)
    with owning_run(run_dir, report):  # then what the directory holds cannot change under us
        run_dir, resume = check_run_dir(cfg, run_dir, resume)
        return _train_owned(cfg, corpus, run_dir, resume, progress, max_steps, announce)


def _train_owned(cfg: Config, corpus: Corpus, run_dir: Path, resume: bool, progress: bool,
                 max_steps: int | None, announce) -> dict:
    """`train` once this process (process 0) owns the run directory."""
    is_main = jax.process_index() == 0
    report = announce or (lambda line: None)
    use_compilation_cache(cfg.train.compilation_cache)  # before anything compiles
    mesh = sharding.make_mesh(cfg.mesh)
    peak_flops = cfg.train.peak_flops_per_device or measure_peak_flops()
    if announce:
        _announce(announce, cfg, run_dir, corpus, mesh)
    distributed.barrier("before initialising the train state")
    run = build_run(cfg, mesh)
    state = run.state
    train_iter = data_lib.make_train_iterator(
        corpus.train_tokens, seq_len=cfg.train.seq_len, global_batch_size=cfg.train.global_batch_size,
        process_index=jax.process_index(), process_count=jax.process_count(), seed=cfg.train.seed)
    restored = _restore(run_dir, state, train_iter, report) if resume else None
    # a resume that finds no checkpoint starts again from step 0 (and keeps no old metrics)
    resumed_step, state = restored if restored else (0 if resume else None, state)
    if not resumed_step and cfg.train.init_from:
        params, bias = load_initial_model(cfg, mesh)
        state = state.replace(params=params, router=state.router.replace(bias=bias))
    eval_batches = data_lib.make_eval_batches(
        corpus.val_tokens, seq_len=cfg.train.seq_len, batch_size=cfg.train.global_batch_size,
        num_batches=cfg.train.eval_batches, process_index=jax.process_index(),
        process_count=jax.process_count())
    with jax.set_mesh(mesh), StopSignal() as stop:
        step_fn, eval_fn = run.step, run.eval_step
        _compile(step_fn, eval_fn, state, global_batch(mesh, eval_batches[0]["tokens"]))
        distributed.barrier("compiled")  # no process enters a collective long before another
        write_run_config(cfg, run_dir)
        previous = (truncate_metrics(run_dir, resumed_step)
                    if resumed_step is not None and is_main else [])
        writer = MetricsWriter(run_dir, enabled=is_main, resumed_step=resumed_step)
        checkpoints = Checkpoints(run_dir / "checkpoints", cfg.train.keep_checkpoints)
        loop = _Loop(cfg, mesh, step_fn, eval_fn, train_iter, eval_batches, corpus, checkpoints,
                     writer, stop, progress and is_main, peak_flops)
        loop.losses = [(r["step"], r["loss"]) for r in previous if r["kind"] == "train"]
        try:
            summary = loop.run(state, max_steps)
        finally:
            try:
                checkpoints.close()  # raises CheckpointSaveError if the last save failed
            finally:
                writer.close()
    summary["run_dir"] = str(run_dir)
    if is_main:
        write_json_atomically(run_dir / "summary.json", summary)
    return summary


def _restore(run_dir: Path, state, train_iter, report):
    """(step, state) of the newest readable checkpoint, with the data iterator moved to it; None
    when the run has no checkpoint yet. Unreadable newer ones are reported and set aside."""
    directory = run_dir / "checkpoints"
    if not directory.exists():
        return None
    reader = Checkpoints(directory)
    try:
        found = reader.restore_newest_intact(state, report)
    finally:
        reader.close()
    if found is None:
        return None
    step, state, data_state, unreadable = found
    train_iter.set_state(data_state)
    distributed.barrier("restored")
    if jax.process_index() == 0:
        for bad in unreadable:
            report(f"resuming from step {step}; unreadable checkpoint {bad} kept as "
                   f"{set_aside(directory, bad)}")
    distributed.barrier("set aside unreadable checkpoints")
    return step, state


def _compile(step_fn, eval_fn, state, example_batch) -> None:
    """Compile the train and eval steps ahead of time (the jit caches keep the results), so the
    processes can meet at a barrier before the first step's collectives."""
    step_fn.lower(state, example_batch).compile()
    eval_fn.lower(state.params, example_batch, state.router).compile()


def write_json_atomically(path: Path, value) -> None:
    """Strict JSON (no bare NaN: non-finite numbers are written as null), replaced atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_json_safe(value), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _json_safe(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _announce(announce, cfg: Config, run_dir: Path, corpus: Corpus, mesh) -> None:
    counts = count_params(cfg)
    announce(f"run directory: {run_dir}")
    announce(f"model: {counts['total']:,} parameters, {counts['active']:,} active per token; "
             f"{cfg.num_dense_layers} dense + {cfg.num_moe_layers} MoE layers, "
             f"{cfg.moe.num_experts} experts (top-{cfg.moe.top_k}, {cfg.moe.router} router), "
             f"{cfg.model.attention.upper()} attention"
             + (f"; {cfg.model.mtp_depth} MTP module(s), {counts['mtp']:,} parameters"
                if cfg.model.mtp_depth else ""))
    if cfg.moe.num_experts and cfg.moe.dispatch == "dropless":
        experts = layer_matmuls(cfg.precision)["experts"]
        announce(f"experts: dropless, {kernel_description(cfg.moe, experts)}")
    attention_dtype = layer_matmuls(cfg.precision)["attention"].dtype
    with jax.set_mesh(mesh):  # the kernel depends on whether the mesh shards attention's arrays
        announce("attention: " + attention.kernel_description(cfg.model, cfg.train.seq_len,
                                                              attention_dtype))
    announce(f"data: {len(corpus.train_tokens):,} train / {len(corpus.val_tokens):,} held-out "
             f"tokens; {cfg.train.global_batch_size} x {cfg.train.seq_len} tokens per step")
    announce(f"mesh: {dict(mesh.shape)} over {mesh.devices.size} of {jax.device_count()} "
             f"{jax.devices()[0].platform} device(s), {jax.process_count()} process(es)")


@dataclasses.dataclass
class _Loop:
    cfg: Config
    mesh: object
    step_fn: object
    eval_fn: object
    train_iter: object
    eval_batches: list
    corpus: Corpus
    checkpoints: Checkpoints
    writer: MetricsWriter
    stop: StopSignal
    progress: bool
    peak_flops: float  # FLOP/s of one device, for MFU
    window: tuple[int, float] | None = None  # (step, time) of the last train record
    losses: list = dataclasses.field(default_factory=list)  # (step, loss) of each record
    saved_step: int | None = None
    throughput: dict = dataclasses.field(default_factory=dict)  # latest tokens_per_second, mfu

    def run(self, state, max_steps: int | None) -> dict:
        t = self.cfg.train
        start_step = int(state.step)
        last_step = min(t.steps, max_steps) if max_steps else t.steps
        bar = tqdm(total=t.steps, initial=start_step, disable=not self.progress, unit="step",
                   dynamic_ncols=True)
        step, held_out = start_step, None
        while step < last_step and self.stop.received is None:
            batch = global_batch(self.mesh, next(self.train_iter)["tokens"])
            state, metrics = self.step_fn(state, batch)
            step += 1
            if step == start_step + 1 or step % t.log_every == 0 or step == last_step:
                self._log(step, metrics, bar)
            bar.update(1)
            self.checkpoints.raise_if_save_failed()  # a run that cannot checkpoint stops
            if t.eval_every and step % t.eval_every == 0 and step < last_step:
                held_out = self._evaluate(state, step)
            if t.checkpoint_every and step % t.checkpoint_every == 0 and step < last_step:
                self._save(step, state)
        bar.close()
        if step != self.saved_step and (step > start_step or self.checkpoints.latest_step() is None):
            self._save(step, state)
        if step == t.steps or held_out is None:
            held_out = self._evaluate(state, step)
        return {"step": step, "stopped_by": self.stop.received, "train_losses": self.losses,
                "final_train_loss": self.losses[-1][1] if self.losses else None,
                "skipped_steps": int(state.skipped.total), **self.throughput,
                "held_out": held_out}

    def _save(self, step: int, state) -> None:
        """Checkpoint `step` once (a stop signal on a checkpoint step must not save it twice)."""
        self._check_diverged(int(state.skipped.in_row), step)
        self.checkpoints.save(step, state, self.train_iter.get_state())
        self.saved_step = step

    def _check_diverged(self, skipped_in_row: int, step: int) -> None:
        limit = self.cfg.train.max_skipped_steps_in_row
        if skipped_in_row >= limit:
            raise TrainingDiverged(
                f"training diverged: the last {skipped_in_row} steps (to step {step}) had a "
                f"non-finite loss or gradients and were skipped (limit "
                f"train.max_skipped_steps_in_row={limit}); checkpoints hold only finite states, "
                f"so lower train.learning_rate (now {self.cfg.train.learning_rate:g}) or check "
                "the data, then resume or start again.")

    def _log(self, step: int, metrics: dict, bar) -> None:
        """Write one train record: the step's metrics plus throughput since the last record.
        The first step of a run compiles the step function, so it carries no throughput."""
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        if self.window is not None:
            since_step, since_time = self.window
            tokens = (step - since_step) * self.cfg.train.global_batch_size * self.cfg.train.seq_len
            metrics["tokens_per_second"] = tokens / (now - since_time)
            metrics["mfu"] = (metrics["tokens_per_second"] * flops_per_token(self.cfg)
                              / (self.peak_flops * self.mesh.devices.size))
            self.throughput = {k: float(metrics[k]) for k in ("tokens_per_second", "mfu")}
            bar.set_postfix(loss=f"{metrics['loss']:.3f}",
                            tok_s=f"{metrics['tokens_per_second']:,.0f}")
        self.window = (step, now)
        self.writer.write(step, "train", metrics)
        loss = float(metrics["loss"])
        self.losses.append((step, loss if math.isfinite(loss) else None))
        self._check_diverged(int(metrics["skipped_in_row"]), step)

    def _evaluate(self, state, step: int) -> dict:
        result = evaluate(self.cfg, self.mesh, state, self.eval_batches, self.eval_fn, self.corpus)
        self.writer.write(step, "eval", result)
        return result

