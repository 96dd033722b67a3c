"""Metrics: FLOP accounting for MFU, and writers (JSONL file and TensorBoard) for process 0."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from moejax.config import Config
from moejax.model.transformer import count_params

METRICS_FILE = "metrics.jsonl"


def flops_per_token(cfg: Config) -> float:
    """Training FLOPs per token of the ACTIVE parameters: 6 N_active (matmul weights, without
    the embedding lookup) + 6 L H T (Qk + Qv) for attention scores and values (forward +
    backward), with the MTP modules counted as extra layers."""
    m = cfg.model
    counts = count_params(cfg)
    matmul_params = counts["active"] - counts["embedding"] + counts["mtp_active"]
    if m.attention == "mla":
        qk_dim, v_dim = m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim
    else:
        qk_dim = v_dim = m.head_dim
    layers = m.num_layers + m.mtp_depth
    attention = 6 * layers * m.num_heads * (qk_dim + v_dim) * cfg.train.seq_len
    return 6.0 * matmul_params + attention + 6.0 * m.mtp_depth * counts["lm_head"]


def measure_peak_flops(size: int | None = None, repeats: int = 5) -> float:
    """FLOP/s of one local device on a large plain matmul (f32 on CPU, bf16 on accelerators).

    Call it outside any mesh context: the operand lives on this process's first device only."""
    device = jax.local_devices()[0]
    on_cpu = device.platform == "cpu"
    size = size or (1024 if on_cpu else 8192)
    dtype = np.float32 if on_cpu else jnp.bfloat16
    a = jax.device_put(np.ones((size, size), dtype), device)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2.0 * size**3 / float(np.median(times))


def to_python(value):
    """A JSON-safe value: arrays become lists, and NaN/inf become None (JSON has no NaN)."""
    value = np.asarray(value)
    if value.ndim == 0:
        item = value.item()
        return None if isinstance(item, float) and not np.isfinite(item) else item
    return [to_python(v) for v in value]


def read_metrics(run_dir: Path) -> list[dict]:
    """The complete records of metrics.jsonl: a last line without its newline is a record cut
    short by a kill during the write, and is left out."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    complete = path.read_text().split("\n")[:-1]
    return [json.loads(line) for line in complete if line]


def truncate_metrics(run_dir: Path, last_step: int) -> list[dict]:
    """Keep the records up to `last_step` (the checkpoint a resumed run continues from), so the
    steps a stopped run logged after its checkpoint are not repeated; returns the kept ones."""
    path = Path(run_dir) / METRICS_FILE
    kept = [r for r in read_metrics(run_dir) if r["step"] <= last_step]
    if path.exists():
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)
    return kept


class MetricsWriter:
    """Appends one JSON object per record to metrics.jsonl and mirrors scalars to TensorBoard;
    per-layer vectors are written as one TensorBoard scalar per layer."""

    def __init__(self, run_dir: Path, enabled: bool = True, resumed_step: int | None = None):
        """`resumed_step`: the checkpoint step a resumed run continues from; TensorBoard then
        drops the events the stopped run wrote after it (metrics.jsonl is truncated by
        `truncate_metrics` before)."""
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        self.jsonl = open(Path(run_dir) / METRICS_FILE, "a")  # noqa: SIM115 (open for the run)
        purge_step = None if resumed_step is None else resumed_step + 1
        self.tensorboard = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=purge_step)

    def write(self, step: int, kind: str, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, "kind": kind, **{k: to_python(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for name, value in record.items():
            if name in ("step", "kind"):
                continue
            values = value if isinstance(value, list) else [value]
            for layer, item in enumerate(values):
                if isinstance(item, (int, float)):
                    tag = f"{kind}/{name}" if len(values) == 1 else f"{kind}/{name}/layer{layer}"
                    self.tensorboard.add_scalar(tag, item, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tensorboard.close()
