"""One-shot check of everything GPU-specific, for a lent GPU machine (scripts/check_gpu.py).

Four sections, each timed and each recording its error instead of stopping the run, so one run
on a borrowed GPU brings back everything it could measure:

1. `fp8`: the MFU model's train step with `precision.fp8=tensor` (capacity 1.0, every layer
   group in fp8) compiled, its cuBLASLt fp8 GEMMs
   (`__cublas$lt$matmul$f8` custom calls in the compiled HLO) counted against the dots with fp8
   operands in the lowered program; GEMM speed bf16 vs fp8 (tensor recipe with its
   quantisation, the bare fp8 dot, and the DeepSeek block recipe) at 8192^3 and expert shapes;
   the dropless fp8 step's expert GEMMs by role (fprop, dgrad, wgrad of gate, up, down) and
   what XLA:GPU compiled them to (cuBLASLt fp8 calls, ragged dots).
2. `mfu`: train steps of configs/moe_1b.yaml (about 1.1B active parameters) on one device:
   tokens/s and model FLOPs utilisation against the measured bf16 matmul peak and the spec
   peak of the device, bf16 and fp8 tensor, dropless and capacity 1.0.
3. `dropless`: one MoE layer (forward + backward) at scripts/bench_moe.py's coarse and
   fine-grained shapes: the dropless dispatch with `ragged_dot` and with the tiled GEMM against
   capacity 1.0; and `jax.lax.ragged_all_to_all` (moejax's `Exchange`) on a 1-device expert axis.
4. `memory`: peak device bytes of the MFU model's bf16 train step against XLA's memory analysis
   of the compiled step.

On CPU every section runs at tiny sizes (`CPU_SIZES`) so the code is exercised, and the checks
only a GPU can make are recorded as `NOT_RUN`. The GPU sizes (`GPU_SIZES`) were chosen to
finish within 8 minutes on one H200, compilation included (an estimate until a GPU runs it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from moejax.tools import bench, hlo_stats
from moejax.tools.bench import LayerShape
from moejax.training.run import Run, build_run

NOT_RUN = "not run: needs a GPU"
CUBLAS_FP8 = "__cublas$lt$matmul$f8"
# Set before jax starts its backend (scripts/check_gpu.py does): with Triton GEMMs enabled,
# XLA:GPU may give an fp8 dot to Triton instead of rewriting it into a cuBLASLt fp8 GEMM.
GPU_XLA_FLAGS = "--xla_gpu_enable_triton_gemm=false"
REPORT_JSON, SUMMARY_MD = "gpu_check.json", "gpu_check.md"
GOALS = {"mfu_bf16": 0.50, "fp8_step_speedup": 1.3, "dropless_over_capacity": 0.9}

# Dense (no sparsity) peak FLOP/s by device_kind substring, first match wins, from NVIDIA's
# data sheets: (bf16, fp8). H200 SXM has H100 SXM's compute; the NVL and PCIe cards run lower.
SPEC_PEAK_FLOPS = (
    ("H200 NVL", 835e12, 1671e12),
    ("H100 NVL", 835e12, 1671e12),
    ("H100 PCIe", 756e12, 1513e12),
    ("H200", 989e12, 1979e12),
    ("H100", 989e12, 1979e12),
    ("A100", 312e12, None),
)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Every size the check runs at; GPU_SIZES and CPU_SIZES below."""

    gemm_shapes: tuple  # (name, x shape, w shape): [M, K] x [K, N] or [G, M, K] x [G, K, N]
    mfu_preset: str
    mfu_overrides: tuple  # on top of the preset (CPU: shrink it)
    mfu_rows: tuple  # labels of MFU_ROWS to time; the others are recorded as NOT_RUN
    layer_shapes: tuple  # LayerShape of scripts/bench_moe.py's coarse and fine-grained layers
    layer_systems: tuple  # labels of DROPLESS_SYSTEMS to time
    peak_size: int  # edge of the square matmul that measures the peak
    steps: int  # timed train steps per MFU row (after one warm-up step)
    rounds: int  # interleaved rounds of the dropless timing
    repeats: int  # timed calls per GEMM
    # (name, batch, seq, kv heads, query heads per kv head, qk dims, v dims, block) of one
    # attention layer timed fwd + bwd with each kernel (check_attention)
    attention_shapes: tuple = ()


SINGLE_DEVICE = ("mesh.data=1", "mesh.fsdp=1", "mesh.expert=1", "mesh.pipe=1")
BF16_DROPLESS, FP8_DROPLESS = "bf16 dropless", "fp8 tensor dropless"
BF16_CAPACITY, FP8_CAPACITY = "bf16 capacity 1.0", "fp8 tensor capacity 1.0"
# label -> overrides of the MFU preset; fp8 rows have every layer group in fp8, the routed
# experts' grouped GEMMs included (moejax/model/dispatch/grouped_fp8.py). In the order run: the goals' figures first (the first two rows come compiled from the
# memory and fp8 sections), so a run cut short by its time limit keeps them.
MFU_ROWS = {
    BF16_DROPLESS: (),
    FP8_CAPACITY: ("moe.dispatch=capacity", "moe.capacity_factor=1.0", "precision.fp8=tensor"),
    BF16_CAPACITY: ("moe.dispatch=capacity", "moe.capacity_factor=1.0"),
    FP8_DROPLESS: ("precision.fp8=tensor",),
}
DROPLESS_SYSTEMS = {  # label -> (dispatch, capacity factor, moe.kernels)
    "dropless ragged_dot": ("dropless", None, "ragged"),
    "dropless tiles": ("dropless", None, "tiles"),
    "capacity 1.0": ("capacity", 1.0, "auto"),
}
GPU_SIZES = Sizes(
    gemm_shapes=(("square 8192^3", (8192, 8192), (8192, 8192)),
                 ("experts 16 x [4096, 2048] x [2048, 1536]", (16, 4096, 2048), (16, 2048, 1536)),
                 ("experts 64 x [1024, 512] x [512, 256]", (64, 1024, 512), (64, 512, 256))),
    mfu_preset="moe_1b", mfu_overrides=(), mfu_rows=tuple(MFU_ROWS),
    layer_shapes=tuple(s for s in bench.LAYER_SHAPES if s.name in ("coarse", "fine-grained")),
    layer_systems=tuple(DROPLESS_SYSTEMS),
    peak_size=8192, steps=10, rounds=5, repeats=10,
    attention_shapes=(("GQA 32 x 64, T 4096", 2, 4096, 8, 4, 64, 64, 256),
                      ("MLA DeepSeek-V3 (128 heads, 192 / 128), T 4096", 1, 4096, 128, 1, 192,
                       128, 256)))
# The CPU run is nearly all compilation, so it compiles each kind of program once: one MoE
# layer without remat, the two MFU rows that the memory and fp8 sections compile anyway, the
# GPU path of the dropless layer and capacity 1.0, one batched GEMM shape.
CPU_SIZES = Sizes(
    gemm_shapes=(("experts 4 x [64, 128] x [128, 128]", (4, 64, 128), (4, 128, 128)),),
    mfu_preset="moe_1b", mfu_rows=(BF16_DROPLESS, FP8_CAPACITY),
    layer_systems=("dropless ragged_dot", "capacity 1.0"),
    mfu_overrides=("model.vocab_size=256", "model.d_model=64", "model.num_layers=1",
                   "model.num_dense_layers=0", "model.remat=none",
                   "model.num_heads=2", "model.num_kv_heads=1", "model.head_dim=32",
                   "model.ffn_dim=128", "moe.expert_ffn_dim=64", "train.seq_len=16",
                   "train.global_batch_size=2"),
    layer_shapes=tuple(dataclasses.replace(s, d_model=64, ffn_dim=s.ffn_dim // 8, tokens=256)
                       for s in bench.LAYER_SHAPES if s.name in ("coarse", "fine-grained")),
    peak_size=256, steps=1, rounds=1, repeats=1,
    attention_shapes=(("GQA 4 x 16, T 64", 1, 64, 2, 2, 16, 16, 16),))


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def spec_peak_flops(device_kind: str) -> tuple[float | None, float | None]:
    """(bf16, fp8) dense peak FLOP/s of a device from SPEC_PEAK_FLOPS, None when unknown."""
    for name, bf16, fp8 in SPEC_PEAK_FLOPS:
        if name in device_kind:
            return bf16, fp8
    return None, None


# ---------------------------------------------------------------------------------------------
# Train steps


@dataclasses.dataclass
class CompiledRun:
    """A config's run on one device (`training.run.build_run`), its step compiled for one batch
    of random tokens. A run handed from one section to another drops its state (`release`) and
    is built afresh (the same init, the same shardings) when next stepped, so that one model's
    train state at a time lives on the device (two states of the 1B preset would not fit an
    80 GB H100)."""

    run: Run | None  # None: released
    cfg: object
    compiled: object
    batch: dict

    def release(self) -> CompiledRun:
        self.run = None
        return self

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train.global_batch_size * self.cfg.train.seq_len

    def step(self):
        """One step (the state is donated, so the new one replaces it); returns its metrics."""
        if self.run is None:
            self.run = build_run(self.cfg, key=jax.random.key(0))
        with jax.set_mesh(self.run.mesh):
            self.run.state, metrics = self.compiled(self.run.state, self.batch)
        return metrics

    def seconds_per_step(self, steps: int) -> float:
        jax.block_until_ready(self.step()["loss"])  # warm-up: first-call costs
        started = time.perf_counter()
        for _ in range(steps):
            metrics = self.step()
        jax.block_until_ready(metrics["loss"])
        return (time.perf_counter() - started) / steps


def load_check_config(preset: str | None, overrides):
    from moejax.config import load_config

    return load_config(preset, [*overrides, *SINGLE_DEVICE])


def lowered_train_step(cfg):
    """(lowered step, run, batch) of `cfg` on the first device, random tokens."""
    run = build_run(cfg, key=jax.random.key(0))
    shape = (cfg.train.global_batch_size, cfg.train.seq_len + 1)
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, shape, dtype=np.int32)
    batch = run.global_batch(tokens)
    return run.lower(batch), run, batch


def compiled_run(cfg) -> CompiledRun:
    lowered, run, batch = lowered_train_step(cfg)
    return CompiledRun(run, cfg, lowered.compile(), batch)


# ---------------------------------------------------------------------------------------------
# 1. fp8


def count_fp8_gemms(sizes: Sizes, context: dict) -> dict:
    """The fp8 GEMMs that the MFU model's fp8 train step (every layer group in fp8, capacity
    1.0) asks for in the lowered program, and (GPU) how many became cuBLASLt fp8 custom calls
    once compiled. The compiled step is handed to the MFU section through `context`."""
    cfg = load_check_config(sizes.mfu_preset, [*sizes.mfu_overrides, *MFU_ROWS[FP8_CAPACITY]])
    lowered, run, batch = lowered_train_step(cfg)
    dots = [line for line in lowered.as_text().splitlines() if "dot_general" in line]
    intended = sum("f8E4M3FN" in d or "f8E5M2" in d for d in dots)
    result = {"config": f"{sizes.mfu_preset} {FP8_CAPACITY}", "fp8_dots_lowered": intended,
              "dots_lowered": len(dots)}
    compiled = lowered.compile()
    context[FP8_CAPACITY] = CompiledRun(run, cfg, compiled, batch).release()
    del run
    if not on_gpu():
        result["cublas_fp8_calls"] = result["all_fp8_dots_are_cublas_fp8"] = NOT_RUN
        return result
    calls = compiled.as_text().count(CUBLAS_FP8)
    result.update(cublas_fp8_calls=calls, all_fp8_dots_are_cublas_fp8=calls >= intended)
    return result


def count_dropless_fp8_gemms(sizes: Sizes, context: dict) -> dict:
    """The MFU model's dropless fp8 train step (precision.fp8=tensor, experts included): its
    lowered fp8 dots by expert GEMM role (`fp8_<gate|up|down>_<fprop|dgrad|wgrad>` scopes;
    `chlo.ragged_dot` composites on the fp8 codes on GPU), and (GPU) what XLA made of them once
    compiled: cuBLASLt fp8 calls and ragged-dot instructions left. The compiled step is
    handed to the MFU section through `context`."""
    cfg = load_check_config(sizes.mfu_preset, [*sizes.mfu_overrides, *MFU_ROWS[FP8_DROPLESS]])
    lowered, run, batch = lowered_train_step(cfg)
    dots = hlo_stats.dots_with_scopes(lowered.as_text(debug_info=True))
    fp8_dots = [d for d in dots if d["lhs"].startswith("f8") and d["rhs"].startswith("f8")]
    roles: dict[str, int] = {}
    for dot in fp8_dots:
        for role in {m.group(0) for scope in dot["scopes"]
                     for m in [re.search(r"fp8_(gate|up|down)_(fprop|dgrad|wgrad)", scope)] if m}:
            roles[role] = roles.get(role, 0) + 1
    result = {"config": f"{sizes.mfu_preset} {FP8_DROPLESS}", "fp8_dots_lowered": len(fp8_dots),
              "expert_fp8_dots_by_role": dict(sorted(roles.items()))}
    if not on_gpu():
        result["cublas_fp8_calls"] = result["ragged_dots_compiled"] = NOT_RUN
        return result
    compiled = lowered.compile()
    context[FP8_DROPLESS] = CompiledRun(run, cfg, compiled, batch).release()
    text = compiled.as_text()
    result.update(cublas_fp8_calls=text.count(CUBLAS_FP8),
                  ragged_dots_compiled=len(re.findall(r" ragged-dot\(", text)))
    return result


def median_seconds(fn: Callable, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def gemm_speeds(sizes: Sizes) -> list[dict]:
    """TFLOP/s of bf16 and of the fp8 GEMMs at each shape, and fp8's speed-up over bf16."""
    from moejax.fp8 import fp8_matmul

    def recipe(name):
        return jax.jit(lambda a, b: fp8_matmul(a, b, recipe=name, out_dtype=jnp.bfloat16))

    bare_fp8 = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.bfloat16))
    rows = []
    for name, x_shape, w_shape in sizes.gemm_shapes:
        x = jax.random.normal(jax.random.key(0), x_shape, jnp.bfloat16)
        w = jax.random.normal(jax.random.key(1), w_shape, jnp.bfloat16)
        x8, w8 = x.astype(jnp.float8_e4m3fn), w.astype(jnp.float8_e4m3fn)
        flops = 2.0 * np.prod(x_shape) * w_shape[-1]
        runs = {"bf16": (jax.jit(jnp.matmul), x, w), "fp8 tensor": (recipe("tensor"), x, w),
                "fp8 bare dot": (bare_fp8, x8, w8), "fp8 block": (recipe("block"), x, w)}
        seconds = {k: median_seconds(f, a, b, repeats=sizes.repeats) for k, (f, a, b) in runs.items()}
        rows.append({"shape": name,
                     "tflops": {k: flops / s / 1e12 for k, s in seconds.items()},
                     "speedup_over_bf16": {k: seconds["bf16"] / s for k, s in seconds.items()
                                           if k != "bf16"}})
        del x, w, x8, w8
    return rows


def check_fp8(sizes: Sizes, context: dict) -> dict:
    result = {}
    for name, part in (("cublas_fp8", lambda: count_fp8_gemms(sizes, context)),
                       ("dropless_fp8", lambda: count_dropless_fp8_gemms(sizes, context)),
                       ("gemms", lambda: gemm_speeds(sizes))):
        try:
            result[name] = part()
        except Exception:  # noqa: BLE001 (the other part still reports)
            result[name] = {"error": traceback.format_exc(limit=4)}
    return result


# ---------------------------------------------------------------------------------------------
# 2. MFU


def mfu_row(run: CompiledRun, steps: int, peak: float, spec: float | None) -> dict:
    from moejax.training.metrics import flops_per_token

    seconds = run.seconds_per_step(steps)
    tokens_per_second = run.tokens_per_step / seconds
    achieved = tokens_per_second * flops_per_token(run.cfg)
    return {"seconds_per_step": seconds, "tokens_per_second": tokens_per_second,
            "model_tflops": achieved / 1e12, "mfu_vs_measured_peak": achieved / peak,
            "mfu_vs_spec_peak": achieved / spec if spec else NOT_RUN}


def check_mfu(sizes: Sizes, context: dict) -> dict:
    """Train-step throughput of each MFU_ROWS config; each row's error is its own."""
    from moejax.model.transformer import count_params
    from moejax.training.metrics import flops_per_token, measure_peak_flops

    peak = measure_peak_flops(sizes.peak_size)
    spec_bf16, spec_fp8 = (spec_peak_flops(jax.devices()[0].device_kind) if on_gpu()
                           else (None, None))
    base = load_check_config(sizes.mfu_preset, sizes.mfu_overrides)
    counts = count_params(base)
    result = {"preset": sizes.mfu_preset, "overrides": list(sizes.mfu_overrides),
              "active_params": counts["active"], "total_params": counts["total"],
              "tokens_per_step": base.train.global_batch_size * base.train.seq_len,
              "flops_per_token": flops_per_token(base), "remat": base.model.remat,
              "measured_bf16_peak_tflops": peak / 1e12,
              "spec_bf16_peak_tflops": spec_bf16 / 1e12 if spec_bf16 else NOT_RUN,
              "spec_fp8_peak_tflops": spec_fp8 / 1e12 if spec_fp8 else NOT_RUN,
              "mfu_note": "MFU of every row, fp8 ones too, is against the bf16 peak", "rows": {}}
    for label, overrides in MFU_ROWS.items():
        if label not in sizes.mfu_rows:
            result["rows"][label] = NOT_RUN
            continue
        try:
            run = context.pop(label, None) or compiled_run(
                load_check_config(sizes.mfu_preset, [*sizes.mfu_overrides, *overrides]))
            result["rows"][label] = {"overrides": list(overrides),
                                     **mfu_row(run, sizes.steps, peak, spec_bf16)}
            run.release()
        except Exception:  # noqa: BLE001 (one failed row must not lose the others)
            result["rows"][label] = {"error": traceback.format_exc(limit=4)}
    rows = result["rows"]
    result["fp8_step_speedup"] = {
        "dropless": _ratio(rows, FP8_DROPLESS, BF16_DROPLESS),
        "capacity 1.0": _ratio(rows, FP8_CAPACITY, BF16_CAPACITY)}
    result["dropless_over_capacity_tokens_per_second"] = _ratio(rows, BF16_DROPLESS,
                                                                BF16_CAPACITY)
    return result


def _ratio(rows: dict, numerator: str, denominator: str):
    a, b = rows.get(numerator), rows.get(denominator)
    if not isinstance(a, dict) or not isinstance(b, dict):
        return None
    if "tokens_per_second" not in a or "tokens_per_second" not in b:
        return None
    return a["tokens_per_second"] / b["tokens_per_second"]


# ---------------------------------------------------------------------------------------------
# 3. Dropless



def layer_runs(shape: LayerShape, systems) -> tuple[dict, dict]:
    """Compiled fwd+bwd steps of one layer per DROPLESS_SYSTEMS label (bf16 on GPU)."""
    runs, info = {}, {}
    dtype = "bfloat16" if on_gpu() else "float32"
    for label in systems:
        dispatch, factor, kernels = DROPLESS_SYSTEMS[label]
        cfg = bench.layer_config(shape, dispatch, factor)
        cfg = cfg.replace(moe=dataclasses.replace(cfg.moe, kernels=kernels),
                          precision=dataclasses.replace(cfg.precision, compute_dtype=dtype))
        layer = bench.moe_layer_step(cfg)
        runs[label] = layer.run
        info[label] = {"memory_bytes": layer.memory["total"], **layer.stats}
    return runs, info


def dropless_layers(sizes: Sizes) -> list[dict]:
    rows = []
    for shape in sizes.layer_shapes:
        runs, info = layer_runs(shape, sizes.layer_systems)
        times, _ = bench.interleaved_rounds(runs, sizes.rounds)
        row = {"shape": shape.label(), "useful_tflops": {}, "systems": info,
               "over_capacity_1.0": {}}
        for label in runs:
            median = float(np.median(times[label]))
            row["useful_tflops"][label] = bench.useful_flops(shape) / median / 1e12
            if label != "capacity 1.0":  # tokens/s ratio = inverse time ratio, per round
                row["over_capacity_1.0"][label] = bench.per_round_summary(
                    bench.round_ratios(times["capacity 1.0"], times[label]))["median"]
        rows.append(row)
    return rows


def ragged_exchange_check() -> dict:
    """moejax's ragged Exchange (jax.lax.ragged_all_to_all) on a 1-device expert axis: out
    then back must return the used rows and zeros elsewhere. Lowered everywhere; executed on
    a GPU only (XLA:CPU has no ragged-all-to-all)."""
    from jax.sharding import PartitionSpec

    from moejax.model.dispatch import Exchange

    mesh = jax.make_mesh((1,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:1])
    rows, used = 16, 11

    def round_trip(a):
        exchange = Exchange("expert", send_sizes=jnp.array([used], jnp.int32))  # ragged
        return exchange.back(exchange.out(a))

    # the buffer is the expert shard's own (varying over `expert`, as in the layer)
    step = jax.jit(jax.shard_map(round_trip, mesh=mesh, in_specs=PartitionSpec("expert"),
                                 out_specs=PartitionSpec("expert")))
    a = jnp.arange(rows * 4, dtype=jnp.float32).reshape(rows, 4) + 1
    lowered = step.lower(a)
    result = {"lowers": "ragged_all_to_all" in lowered.as_text()
              or "ragged-all-to-all" in lowered.as_text()}
    if not on_gpu():
        result["executes_and_matches"] = NOT_RUN
        return result
    expected = jnp.where(jnp.arange(rows)[:, None] < used, a, 0)
    result["executes_and_matches"] = bool(jnp.array_equal(lowered.compile()(a), expected))
    return result


def check_dropless(sizes: Sizes, context: dict) -> dict:
    result = {"formula": bench.FLOP_FORMULA}
    for name, part in (("layers", lambda: dropless_layers(sizes)),
                       ("ragged_all_to_all", ragged_exchange_check)):
        try:
            result[name] = part()
        except Exception:  # noqa: BLE001 (the other part still reports)
            result[name] = {"error": traceback.format_exc(limit=4)}
    return result


# ---------------------------------------------------------------------------------------------
# 4. Attention kernels


def _materialised_attention(q, k, v, scale):
    """The [T, T]-score causal attention the kernels replace (model.attention_block 0)."""
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    seq = q.shape[1]
    scores = jnp.where(jnp.tril(jnp.ones((seq, seq), bool)), scores, -jnp.inf)
    return jnp.einsum("bkgts,bskd->btkgd", jax.nn.softmax(scores, axis=-1).astype(v.dtype), v)


def _attention_kernels(scale: float, block: int) -> dict:
    """kernel name -> fn(q, k, v) -> out, the shapes of attention.fused_attention."""
    from moejax.model.attention import fused_attention

    return {"materialised": lambda q, k, v: _materialised_attention(q, k, v, scale),
            "blockwise": lambda q, k, v: fused_attention(q, k, v, scale, "blockwise", block),
            "cudnn": lambda q, k, v: fused_attention(q, k, v, scale, "cudnn", block)}


def check_attention(sizes: Sizes, context: dict) -> dict:
    """One attention layer's forward + backward with each training kernel (materialised,
    blockwise, cuDNN flash attention: moejax/model/attention.attention_kernel picks between the
    last two on a GPU): median seconds, compiled temporaries, and on a GPU the cuDNN
    custom-calls in the compiled HLO (0 would mean XLA did not use cuDNN)."""
    dtype = jnp.bfloat16 if on_gpu() else jnp.float32
    rows = []
    for name, batch, seq, kv, groups, qk, vd, block in sizes.attention_shapes:
        keys = jax.random.split(jax.random.key(0), 3)
        q = jax.random.normal(keys[0], (batch, seq, kv, groups, qk), dtype)
        k = jax.random.normal(keys[1], (batch, seq, kv, qk), dtype)
        v = jax.random.normal(keys[2], (batch, seq, kv, vd), dtype)
        row = {"shape": name, "dtype": jnp.dtype(dtype).name}
        for kernel, fn in _attention_kernels(qk**-0.5, block).items():
            if kernel == "cudnn" and not on_gpu():
                row[kernel] = NOT_RUN
                continue
            grad = jax.jit(jax.grad(lambda *a, fn=fn: jnp.sum(fn(*a).astype(jnp.float32)),
                                    argnums=(0, 1, 2)))
            compiled = grad.lower(q, k, v).compile()
            row[kernel] = {"seconds": median_seconds(compiled, q, k, v, repeats=sizes.repeats),
                           "temp_bytes": compiled.memory_analysis().temp_size_in_bytes}
            if kernel == "cudnn":
                row[kernel]["cudnn_calls"] = len(re.findall(r"custom_call_target=\"__cudnn",
                                                            compiled.as_text()))
        rows.append(row)
    return {"rows": rows}


# ---------------------------------------------------------------------------------------------
# 5. Memory


def check_memory(sizes: Sizes, context: dict) -> dict:
    """Peak device bytes of the MFU model's bf16 train step vs the compiled memory analysis.
    Runs first, in a fresh process, so the device's peak is this step's; the compiled step is
    then handed to the MFU section."""
    label, overrides = BF16_DROPLESS, MFU_ROWS[BF16_DROPLESS]
    run = compiled_run(load_check_config(sizes.mfu_preset, [*sizes.mfu_overrides, *overrides]))
    analysis = bench.memory_stats(run.compiled)
    jax.block_until_ready(run.step()["loss"])
    stats = jax.devices()[0].memory_stats()
    context[label] = run.release()
    result = {"config": label, "compiled_memory_analysis_bytes": analysis,
              "planned_bytes": _planned_bytes(run.cfg)}
    if not on_gpu() or not stats:
        result["peak_bytes_in_use"] = result["peak_over_analysis_total"] = NOT_RUN
        return result
    result.update(peak_bytes_in_use=stats.get("peak_bytes_in_use"),
                  bytes_limit=stats.get("bytes_limit"),
                  peak_over_analysis_total=stats.get("peak_bytes_in_use", 0) / analysis["total"])
    return result


def _planned_bytes(cfg) -> dict:
    """What scripts/plan.py's arithmetic says the step needs on one device (state and the
    remat-saved activations), to set beside the device's measured peak: how far the plan's
    figures are from what XLA on this device allocates."""
    from moejax.tools import plan

    state = plan.state_bytes(cfg, 1)
    activations = plan.activation_bytes(cfg, plan.step_shape(cfg, 1))
    total = (state["parameters"] + state["optimizer"] + state["gradients"]
             + activations["layer_inputs"] + activations["logits"])
    return {**state, **activations, "total": total}


# ---------------------------------------------------------------------------------------------
# The run


SECTIONS = {"fp8": check_fp8, "mfu": check_mfu, "dropless": check_dropless,
            "attention": check_attention, "memory": check_memory}
# memory first: a clean device peak; then the cheap dropless and attention sections; mfu, the
# longest, last
RUN_ORDER = ("memory", "dropless", "attention", "fp8", "mfu")


def run_checks(out_dir: str | Path, sizes: Sizes | None = None,
               log: Callable[[str], None] = print) -> dict:
    """Run every section, writing $out_dir/gpu_check.json after each (a run cut short keeps
    what it measured) and gpu_check.md at the end; returns the report."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = sizes or (GPU_SIZES if on_gpu() else CPU_SIZES)
    device = jax.devices()[0]
    report = {"jax": jax.__version__, "platform": device.platform,
              "device_kind": device.device_kind, "device_count": jax.device_count(),
              "xla_flags": os.environ.get("XLA_FLAGS", ""), "sizes": _jsonable(sizes),
              "goals": GOALS, "sections": {name: None for name in SECTIONS}}
    context: dict = {}
    started = time.perf_counter()
    for name in RUN_ORDER:
        section_start = time.perf_counter()
        try:
            result = SECTIONS[name](sizes, context)
        except Exception:  # noqa: BLE001 (record and go on: one GPU run must bring back everything)
            result = {"error": traceback.format_exc(limit=6)}
        result["seconds"] = time.perf_counter() - section_start
        report["sections"][name] = result
        report["total_seconds"] = time.perf_counter() - started
        log(f"{name}: {result['seconds']:.1f} s" + (" (error)" if "error" in result else ""))
        _write_json(out_dir / REPORT_JSON, report)
    context.clear()
    report["goals_measured"] = goals_measured(report)
    _write_json(out_dir / REPORT_JSON, report)
    (out_dir / SUMMARY_MD).write_text(summary_markdown(report))
    return report


def goals_measured(report: dict) -> dict:
    """Each goal's figure and whether it is met (judged on a GPU only): MFU of the bf16
    dropless step against the measured peak; the fp8 tensor step over bf16 with every GEMM in
    fp8 (capacity 1.0); the dropless layer (ragged_dot, the GPU path) over capacity 1.0 at the
    worse of the two bench_moe shapes."""
    sections = report["sections"]
    mfu = sections.get("mfu") or {}
    bf16 = (mfu.get("rows") or {}).get(BF16_DROPLESS)
    bf16 = bf16 if isinstance(bf16, dict) else {}
    layers = (sections.get("dropless") or {}).get("layers")
    layer_ratios = [row["over_capacity_1.0"].get("dropless ragged_dot")
                    for row in layers] if isinstance(layers, list) else []
    figures = {"mfu_bf16": bf16.get("mfu_vs_measured_peak"),
               "fp8_step_speedup": (mfu.get("fp8_step_speedup") or {}).get("capacity 1.0"),
               "dropless_over_capacity": (min(layer_ratios) if layer_ratios
                                          and None not in layer_ratios else None)}
    judged = report["platform"] == "gpu"
    return {name: {"figure": value, "goal": GOALS[name],
                   "met": (value >= GOALS[name]) if judged and value is not None else NOT_RUN}
            for name, value in figures.items()}


def summary_markdown(report: dict) -> str:
    """A short human summary of the report (the JSON holds everything)."""
    s = report["sections"]
    lines = [f"# GPU check: {report['device_kind']} ({report['platform']}), jax {report['jax']}",
             "", f"Total {report.get('total_seconds', 0):.0f} s; per section: " + ", ".join(
                 f"{name} {(s[name] or {}).get('seconds', 0):.0f} s" for name in RUN_ORDER)]
    if report["platform"] != "gpu":
        lines.append(f"Not a GPU: tiny sizes exercise the code; GPU-only checks say '{NOT_RUN}'.")
    lines += ["", "| goal | figure | target | met |", "|---|---|---|---|"]
    for name, goal in report.get("goals_measured", {}).items():
        lines.append(f"| {name} | {_fmt(goal['figure'])} | {goal['goal']} | {goal['met']} |")
    for name, writer in (("fp8", _fp8_lines), ("mfu", _mfu_lines),
                         ("dropless", _dropless_lines), ("attention", _attention_lines),
                         ("memory", _memory_lines)):
        lines += ["", f"## {name}"]
        result = s[name] or {}
        if "error" in result:
            lines.append(_error_line(result))
            continue
        try:
            lines += writer(result)
        except (KeyError, TypeError, ValueError) as err:  # the JSON still holds the section
            lines.append(f"(no summary of this section: {type(err).__name__} {err}; see the JSON)")
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "-" if value is None else str(value)


def _error_line(result: dict) -> str:
    last = [line for line in result["error"].strip().splitlines() if line.strip()][-1:]
    return f"error: {last[0] if last else 'unknown'}"


def _fp8_lines(r: dict) -> list[str]:
    c, gemms = r["cublas_fp8"], r["gemms"]
    dropless = _dropless_fp8_lines(r.get("dropless_fp8"))
    if "error" in c:
        return ["cuBLASLt count: " + _error_line(c)] + dropless + (
            [] if "error" in gemms else _gemm_lines(gemms))
    return [(f"{c['config']}: fp8 dots lowered {c['fp8_dots_lowered']} (of {c['dots_lowered']} "
            f"dots); cuBLASLt fp8 calls compiled: {c['cublas_fp8_calls']}"), ""] + dropless + (
        ["GEMMs: " + _error_line(gemms)] if "error" in gemms else _gemm_lines(gemms))


def _dropless_fp8_lines(d: dict | None) -> list[str]:
    if d is None:
        return []
    if "error" in d:
        return ["dropless fp8: " + _error_line(d), ""]
    roles = ", ".join(f"{role} {n}" for role, n in d["expert_fp8_dots_by_role"].items())
    return [(f"{d['config']}: fp8 dots lowered {d['fp8_dots_lowered']}; expert GEMMs by role: "
             f"{roles}; compiled: cuBLASLt fp8 calls {d['cublas_fp8_calls']}, ragged dots "
             f"{d['ragged_dots_compiled']}"), ""]


def _gemm_lines(gemms: list) -> list[str]:
    lines = ["| GEMM | bf16 TFLOP/s | fp8 tensor | fp8 bare dot | fp8 block (speed-up over bf16) |",
             "|---|---|---|---|---|"]
    for row in gemms:
        up = row["speedup_over_bf16"]
        lines.append(f"| {row['shape']} | {row['tflops']['bf16']:.1f} | {up['fp8 tensor']:.2f}x "
                     f"| {up['fp8 bare dot']:.2f}x | {up['fp8 block']:.2f}x |")
    return lines


def _mfu_lines(r: dict) -> list[str]:
    lines = [(f"{r['preset']}: {r['active_params'] / 1e6:,.1f}M active of "
             f"{r['total_params'] / 1e6:,.1f}M parameters, {r['tokens_per_step']} tokens a "
             f"step, remat "
             f"{r['remat']}; peak bf16 measured {r['measured_bf16_peak_tflops']:.0f} TFLOP/s, "
             f"spec {_fmt(r['spec_bf16_peak_tflops'])}"), "",
             "| step | tokens/s | MFU (measured peak) | MFU (spec peak) |", "|---|---|---|---|"]
    for label, row in r["rows"].items():
        if not isinstance(row, dict):
            lines.append(f"| {label} | {row} | | |")
            continue
        if "error" in row:
            lines.append(f"| {label} | {_error_line(row)} | | |")
            continue
        lines.append(f"| {label} | {row['tokens_per_second']:,.0f} | "
                     f"{row['mfu_vs_measured_peak']:.1%} | {_fmt(row['mfu_vs_spec_peak'])} |")
    up = r["fp8_step_speedup"]
    lines.append(f"\nfp8 step over bf16: dropless {_fmt(up['dropless'])}, capacity 1.0 "
                 f"{_fmt(up['capacity 1.0'])}; dropless over capacity 1.0 (bf16): "
                 f"{_fmt(r['dropless_over_capacity_tokens_per_second'])}")
    return lines


def _dropless_lines(r: dict) -> list[str]:
    lines = []
    if "error" in r.get("layers", {}):
        lines.append("layers: " + _error_line(r["layers"]))
    else:
        lines += ["| layer | system | useful TFLOP/s | tokens/s over capacity 1.0 |",
                  "|---|---|---|---|"]
        for row in r["layers"]:
            for label, tflops in row["useful_tflops"].items():
                ratio = row["over_capacity_1.0"].get(label)
                lines.append(f"| {row['shape']} | {label} | {tflops:.2f} | {_fmt(ratio)} |")
    exchange = r.get("ragged_all_to_all", {})
    lines.append("\nragged_all_to_all on a 1-device expert axis: " + (
        _error_line(exchange) if "error" in exchange else
        f"lowers {exchange['lowers']}, executes and matches {exchange['executes_and_matches']}"))
    return lines


def _attention_lines(r: dict) -> list[str]:
    lines = ["| shape | kernel | ms fwd+bwd | temp MiB | cuDNN calls |", "|---|---|---|---|---|"]
    for row in r["rows"]:
        for kernel in ("materialised", "blockwise", "cudnn"):
            cell = row[kernel]
            if not isinstance(cell, dict):
                lines.append(f"| {row['shape']} | {kernel} | {cell} | | |")
                continue
            lines.append(f"| {row['shape']} | {kernel} | {cell['seconds'] * 1e3:.2f} | "
                         f"{cell['temp_bytes'] / 2**20:.1f} | {cell.get('cudnn_calls', '-')} |")
    return lines


def _memory_lines(r: dict) -> list[str]:
    analysis = r["compiled_memory_analysis_bytes"]
    peak = r["peak_bytes_in_use"]
    return [(f"{r['config']}: compiled analysis {analysis['total'] / 2**30:.2f} GiB "
            f"(arguments {analysis['argument'] / 2**30:.2f}, temp {analysis['temp'] / 2**30:.2f}); "
            f"device peak {f'{peak / 2**30:.2f} GiB' if isinstance(peak, int) else peak}, "
            f"peak over analysis {_fmt(r['peak_over_analysis_total'])}"),
            (f"planned by arithmetic (scripts/plan.py: state + remat-saved activations): "
             f"{r['planned_bytes']['total'] / 2**30:.2f} GiB")]


def _jsonable(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _write_json(path: Path, report: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=1, default=_number) + "\n")
    os.replace(tmp, path)


def _number(value):
    """numpy scalars (and anything else) as JSON."""
    return value.item() if hasattr(value, "item") else str(value)
