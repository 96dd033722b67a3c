"""GPU checks for fp8 (run on an NVIDIA Hopper or newer GPU; finishes in a few minutes).

    OUT=/tmp/out python scripts/check_fp8_gpu.py          # results in $OUT/fp8_gpu.json

1. Compiles the train step with `precision.fp8=tensor` and counts the cuBLASLt fp8 GEMMs
   (`__cublas$lt$matmul$f8` custom calls) in the compiled HLO, next to the number of dots with
   fp8 operands in the lowered program (the GEMMs that should have become fp8).
2. Times bf16 vs fp8 GEMMs (forward `fp8_matmul`, tensor recipe, and the bare fp8 dot) at
   8192^3 and at expert shapes.
3. Times the train step of a tiny and a small model in bf16 vs fp8.
Each section records an error message instead of stopping the script.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] += " --xla_gpu_enable_triton_gemm=false"

import json
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

try:
    import moejax
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import moejax
from moejax.fp8 import fp8_matmul
from moejax.training.optim import make_optimizer
from moejax.training.state import init_train_state
from moejax.training.step import train_step

CUBLAS_FP8 = "__cublas$lt$matmul$f8"
MODEL_OVERRIDES = {
    "tiny": ["model.d_model=512", "model.ffn_dim=2048", "moe.expert_ffn_dim=512",
             "train.global_batch_size=16", "train.seq_len=512", "moe.dispatch=capacity"],
    "small": ["train.global_batch_size=16", "train.seq_len=1024", "moe.capacity_factor=1.25"],
}


def median_seconds(fn, *args, repeats: int = 10) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def median_step_seconds(step, state, batch, repeats: int = 5) -> float:
    """Median time of one train step; the step donates its state, so each output feeds the next."""
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics["loss"])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def train_step_setup(preset: str, fp8: str):
    overrides = [*MODEL_OVERRIDES[preset], "precision.compute_dtype=bfloat16",
                 f"precision.fp8={fp8}", "mesh.expert=1", "mesh.data=-1"]
    cfg = moejax.load_config(preset, overrides)
    mesh = moejax.make_mesh(cfg.mesh)
    optimizer = make_optimizer(cfg)
    state = init_train_state(cfg, jax.random.key(0), mesh, optimizer)
    shape = (cfg.train.global_batch_size, cfg.train.seq_len + 1)
    batch = {"tokens": jax.random.randint(jax.random.key(1), shape, 0, cfg.model.vocab_size)}
    step = jax.jit(lambda s, b: train_step(s, b, cfg, optimizer))
    return cfg, mesh, state, batch, step


def check_cublas_fp8() -> dict:
    _, mesh, state, batch, step = train_step_setup("tiny", "tensor")
    with jax.set_mesh(mesh):
        lowered = step.lower(state, batch)
        compiled_hlo = lowered.compile().as_text()
    dots = [line for line in lowered.as_text().splitlines() if "dot_general" in line]
    intended = [d for d in dots if "f8E4M3FN" in d or "f8E5M2" in d]
    return {"intended_fp8_gemms": len(intended), "all_dots": len(dots),
            "cublas_fp8_calls": compiled_hlo.count(CUBLAS_FP8),
            "all_intended_are_cublas_fp8": compiled_hlo.count(CUBLAS_FP8) >= len(intended)}


def time_gemms() -> list[dict]:
    shapes = {"square 8192^3": ((8192, 8192), (8192, 8192)),
              "experts 8x[4096,2048]x[2048,1024]": ((8, 4096, 2048), (8, 2048, 1024)),
              "experts 32x[2048,2048]x[2048,512]": ((32, 2048, 2048), (32, 2048, 512))}
    rows = []
    for name, (x_shape, w_shape) in shapes.items():
        x = jax.random.normal(jax.random.key(0), x_shape, jnp.bfloat16)
        w = jax.random.normal(jax.random.key(1), w_shape, jnp.bfloat16)
        flops = 2 * np.prod(x_shape) * w_shape[-1]
        bf16 = median_seconds(jax.jit(jnp.matmul), x, w)
        fp8 = median_seconds(jax.jit(lambda a, b: fp8_matmul(a, b, recipe="tensor",
                                                            out_dtype=jnp.bfloat16)), x, w)
        x8, w8 = x.astype(jnp.float8_e4m3fn), w.astype(jnp.float8_e4m3fn)
        bare = median_seconds(jax.jit(lambda a, b: jnp.matmul(
            a, b, preferred_element_type=jnp.bfloat16)), x8, w8)
        rows.append({"shape": name, "bf16_tflops": flops / bf16 / 1e12,
                     "fp8_matmul_tflops": flops / fp8 / 1e12, "bare_fp8_tflops": flops / bare / 1e12,
                     "speedup_fp8_matmul": bf16 / fp8, "speedup_bare_fp8": bf16 / bare})
    return rows


def time_train_steps() -> list[dict]:
    rows = []
    for preset in MODEL_OVERRIDES:
        row = {"preset": preset}
        for fp8 in ("none", "tensor"):
            cfg, mesh, state, batch, step = train_step_setup(preset, fp8)
            with jax.set_mesh(mesh):
                seconds = median_step_seconds(step, state, batch)
            tokens = cfg.train.global_batch_size * cfg.train.seq_len
            row[f"{fp8}_tokens_per_second"] = tokens / seconds
        row["speedup"] = row["tensor_tokens_per_second"] / row["none_tokens_per_second"]
        rows.append(row)
    return rows


def main() -> int:
    out = Path(os.environ.get("OUT", "."))
    out.mkdir(parents=True, exist_ok=True)
    report = {"jax": jax.__version__, "device": str(jax.devices()[0].device_kind),
              "xla_flags": os.environ["XLA_FLAGS"]}
    for name, section in (("cublas_fp8", check_cublas_fp8), ("gemms", time_gemms),
                          ("train_steps", time_train_steps)):
        start = time.perf_counter()
        try:
            report[name] = section()
        except Exception:  # noqa: BLE001 (record and go on: one run on a lent GPU must bring back everything)
            report[name] = {"error": traceback.format_exc(limit=5)}
        print(f"{name} ({time.perf_counter() - start:.0f} s): {json.dumps(report[name])}",
              flush=True)
    (out / "fp8_gpu.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out / 'fp8_gpu.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
