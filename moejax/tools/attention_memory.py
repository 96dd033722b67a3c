"""Compiled memory (and CPU speed) of one attention layer, forward + backward: the materialised
scores (model.attention_block=0) against the blockwise kernel (moejax/model/blockwise.py).

    python scripts/bench_attention.py [--seq-lens 1024 2048 4096 8192] [--json PATH]
    python scripts/bench_attention.py --time [--time-seq-lens 256 512 1024 2048] [--rounds 5]

One step is a jitted `jax.value_and_grad` of sum(out^2) w.r.t. the layer's parameters and its
input x [B, T, D] (`moejax.model.attention.causal_attention` at positions 0 .. T-1, the
config's compute dtype). Memory: XLA's `memory_analysis()` of the step compiled for this
machine's backend from ShapeDtypeStructs (nothing is allocated, so the 671B layer at T = 8192
compiles on a laptop); `temp` is the step's own workspace (scores, probabilities, residuals,
intermediate gradients), the number that a [T, T] score matrix makes quadratic. Speed (--time):
the same step on concrete arrays, timed in interleaved rounds (moejax.tools.bench), per-round
ratios to the plain step.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics

import jax
import jax.numpy as jnp

from moejax import params as P
from moejax.config import Config, ModelConfig, load_config
from moejax.model.attention import attention_kernel, attention_specs, causal_attention
from moejax.model.layers import layer_matmuls
from moejax.tools import bench

# name -> (preset, overrides): a mid-size GQA layer and DeepSeek-V3's own MLA layer (128 heads,
# 192 query/key and 128 value dims, YaRN factor 40 in the softmax scale)
LAYERS = {
    "GQA small (H 8, K 4, Q 64, D 512)": ("small", ()),
    "MLA DeepSeek-V3 (H 128, Qk 192, V 128, D 7168)": ("deepseek_v3_671b", ()),
}
SEQ_LENS = (1024, 2048, 4096, 8192)
TIME_SEQ_LENS = (256, 512, 1024, 2048)
TIME_BLOCKS = (128, 256, 512, 1024)
ONE_DEVICE = ("mesh.data=1", "mesh.fsdp=1", "mesh.expert=1", "mesh.pipe=1")


def layer_config(preset: str, overrides=(), block: int | None = 0) -> Config:
    """The preset on one device with model.attention_block = `block` (0: materialised)."""
    return load_config(preset, (*ONE_DEVICE, *overrides, f"model.attention_block={block}"),
                       num_devices=1)


def layer_step(cfg: Config):
    """The jitted fwd+bwd of one attention layer: (params, x [B, T, D]) -> (loss, grads)."""
    m = cfg.model
    matmul = layer_matmuls(cfg.precision)["attention"]

    def loss(params, x):
        out, _ = causal_attention(params, x, jnp.arange(x.shape[1]), m, matmul)
        return jnp.sum(jnp.square(out.astype(jnp.float32)))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def abstract_inputs(cfg: Config, seq_len: int, batch: int = 1):
    x = jax.ShapeDtypeStruct((batch, seq_len, cfg.model.d_model),
                             jnp.dtype(cfg.precision.compute_dtype))
    return P.abstract(attention_specs(cfg.model)), x


def compiled_memory(cfg: Config, seq_len: int, batch: int = 1) -> dict:
    """bench.memory_stats of the layer step compiled at `seq_len` (bytes)."""
    compiled = layer_step(cfg).lower(*abstract_inputs(cfg, seq_len, batch)).compile()
    return bench.memory_stats(compiled)


def scores_bytes(cfg: Config, seq_len: int, batch: int = 1) -> int:
    """One float32 [B, H, T, T] score matrix: what the materialised path holds at least once."""
    return batch * cfg.model.num_heads * seq_len * seq_len * 4


def memory_rows(seq_lens=SEQ_LENS, block: int | None = None, log=print) -> list[dict]:
    """For every layer of LAYERS and T in seq_lens: temp bytes, plain and blockwise."""
    rows = []
    for name, (preset, overrides) in LAYERS.items():
        blockwise = layer_config(preset, overrides, block or _default_block())
        plain = layer_config(preset, overrides, 0)
        for seq_len in seq_lens:
            kernel = attention_kernel(blockwise.model, seq_len, blockwise.precision.compute_dtype)
            row = {"layer": name, "T": seq_len, "block": blockwise.model.attention_block,
                   "kernel": kernel,
                   "plain": compiled_memory(plain, seq_len),
                   "blockwise": compiled_memory(blockwise, seq_len),
                   "scores_bytes": scores_bytes(plain, seq_len)}
            rows.append(row)
            log(f"  {name} T={seq_len}: temp plain {bench.mib(row['plain']['temp']):.0f} MiB, "
                f"{kernel} {bench.mib(row['blockwise']['temp']):.0f} MiB")
    return rows


def _default_block() -> int:
    return ModelConfig().attention_block


def memory_table(rows: list[dict]) -> str:
    """Markdown: temp MiB per layer and T, and its growth from the layer's previous T."""
    header = ("| layer | T | plain temp MiB | x prev | blockwise temp MiB | x prev | "
              "one f32 [B,H,T,T] MiB |")
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|"]
    previous = {}
    for row in rows:
        temps = (row["plain"]["temp"], row["blockwise"]["temp"])
        last = previous.get(row["layer"])
        growth = [f"{now / then:.2f}" if last else "" for now, then in zip(temps, last or temps)]
        lines.append(f"| {row['layer']} | {row['T']} | {bench.mib(temps[0]):,.1f} | {growth[0]} | "
                     f"{bench.mib(temps[1]):,.1f} | {growth[1]} | "
                     f"{bench.mib(row['scores_bytes']):,.0f} |")
        previous[row["layer"]] = temps
    return "\n".join(lines)


def speed_rows(seq_lens=TIME_SEQ_LENS, blocks=TIME_BLOCKS, rounds: int = 5,
               preset: str = "small", overrides=(), log=print) -> list[dict]:
    """CPU time of the layer step, plain and blockwise at each block size (blocks >= T skipped:
    they run the plain path), per-round ratio to plain. For the default of
    model.attention_block."""
    rows = []
    for seq_len in seq_lens:
        runs = {}
        for block in (0, *blocks):
            if block and block >= seq_len:
                continue
            cfg = layer_config(preset, overrides, block)
            step = layer_step(cfg)
            params = P.init(attention_specs(cfg.model), jax.random.key(0))
            x = jax.random.normal(jax.random.key(1), (1, seq_len, cfg.model.d_model),
                                  jnp.dtype(cfg.precision.compute_dtype))
            jax.block_until_ready(step(params, x))  # compile and warm up
            runs[f"block {block}" if block else "plain"] = (
                lambda step=step, params=params, x=x: step(params, x))
        times, _ = bench.interleaved_rounds(runs, rounds)
        for name, values in times.items():
            ratios = bench.round_ratios(values, times["plain"])
            rows.append({"T": seq_len, "system": name, "seconds": values,
                         "median_s": statistics.median(values),
                         "ratio_to_plain": bench.per_round_summary(ratios)})
            log(f"  T={seq_len} {name}: {statistics.median(values) * 1e3:.1f} ms, "
                f"x{statistics.median(ratios):.2f} of plain")
    return rows


def speed_table(rows: list[dict]) -> str:
    lines = ["| T | system | median ms | time / plain, median [min-max] |",
             "|---:|---|---:|---|"]
    for row in rows:
        r = row["ratio_to_plain"]
        lines.append(f"| {row['T']} | {row['system']} | {row['median_s'] * 1e3:.1f} | "
                     f"{r['median']:.2f} [{r['min']:.2f}-{r['max']:.2f}] |")
    return "\n".join(lines)


def environment() -> dict:
    return {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "jax": jax.__version__, "backend": jax.default_backend(),
            "device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
            "python": platform.python_version()}
