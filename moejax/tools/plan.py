"""What one training step costs per device at full size, without the devices.

`plan(cfg, num_devices)` builds the real sharded train step (the run `moejax.train` builds,
`training.run.build_run`) on the configured mesh and reports, per device:

- parameter, optimizer-state and gradient bytes: arithmetic from the shard shapes of the
  trainer's own state built abstract (`training.run.build_run(..., abstract=True)` on a
  `jax.sharding.AbstractMesh`, no devices needed);
- activation bytes: arithmetic (the layer inputs that `model.remat=full` keeps for the backward,
  plus the logits), and the compiled program's own figures (`compiled.memory_analysis()`) when
  it was compiled;
- per step, the bytes each device sends per collective kind, counted from the compiled HLO
  (moejax.tools.hlo_stats), and the all-to-all bytes the dispatch formula predicts
  (`dispatch_all_to_all_bytes`).

Compiling needs the mesh's devices to exist: scripts/plan.py asks XLA:CPU for that many fake
host devices before jax starts (2048 start in about a second; the compile is one SPMD program,
whatever the device count). The compiled program is XLA:CPU's: it widens bfloat16 collectives
to float32 (so its collective bytes are twice a GPU's for bf16 payloads) and uses the dense
dispatch exchange (`moe.kernels=tiles`, buffers of P N_ rows), not the GPU's ragged one. It is
traced with moejax's CPU kernels off (`cpu_kernels.off`): XLA's own GEMMs and attention, as on
a GPU, whose memory XLA's analysis sees.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, AxisType

from moejax import sharding
from moejax.config import MESH_AXES, Config, ConfigError, stage_layer_counts, staged_layers
from moejax.model import cpu_kernels
from moejax.model.dispatch import max_destinations, row_tile
from moejax.model.dispatch.dropless import pair_capacity, static_rows
from moejax.model.pipeline import Schedule
from moejax.tools import hlo_stats
from moejax.training.run import build_run

# The DeepSeek-V3 technical report's training figures (arXiv 2412.19437)
DEEPSEEK_V3_REPORT = {
    "gpus": 2048,
    "layout": "PP16 x EP64 x ZeRO-1 DP (no tensor parallelism)",
    "tokens_per_second_per_gpu": 1543,  # 180K H800-hours per trillion tokens
    "gpu_memory_bytes": 80e9,  # H800
    "max_nodes_per_token": 4,  # node-limited routing
}


def abstract_mesh(cfg: Config, num_devices: int) -> AbstractMesh:
    sizes = cfg.mesh.axis_sizes(num_devices)
    return AbstractMesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def bytes_per_device(tree) -> int:
    """Bytes one device holds of a pytree of sharded ShapeDtypeStructs (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
    return total


@dataclasses.dataclass(frozen=True)
class StepShape:
    """Sizes one device sees in a step: the mesh, tokens, the pipeline schedule."""

    mesh: dict[str, int]
    batch_rows: int  # B_ rows of the global batch on one data-parallel shard
    seq_len: int
    schedule: Schedule

    @property
    def batch_shards(self) -> int:
        return math.prod(size for axis, size in self.mesh.items() if axis != "pipe")

    @property
    def tokens_per_device(self) -> int:
        """Tokens whose loss one device's shard of the batch holds (every stage sees them)."""
        return self.batch_rows * self.seq_len


def step_shape(cfg: Config, num_devices: int) -> StepShape:
    mesh = dict(zip(MESH_AXES, cfg.mesh.axis_sizes(num_devices)))
    shards = math.prod(size for axis, size in mesh.items() if axis != "pipe")
    staged = mesh["pipe"] > 1
    schedule = Schedule(mesh["pipe"], cfg.train.virtual_stages,
                        cfg.train.microbatches if staged else 1,
                        stage_layer_counts(cfg, mesh["pipe"]) if staged else None,
                        staged and cfg.train.pipeline_schedule == "1f1b")
    return StepShape(mesh, cfg.train.global_batch_size // shards, cfg.train.seq_len, schedule)


def dispatch_all_to_all_bytes(cfg: Config, shape: StepShape, payload_bytes: int,
                              fp8_bytes: int = 1) -> dict:
    """Bytes one device sends per step through the dropless dispatch's dense all_to_all
    (moe.kernels=tiles, moejax/model/dispatch/dropless.py), by formula:

        per exchange of a [P N_, W] buffer: P N_ W b (P - 1) / P
        (P: expert shards; N_: tokens of one device's shard of one microbatch; P N_: the
        exchange rows of `dropless.static_rows`, used or not; W: the row width; b: bytes per
        element). With moe.receive_factor set, N_ reads C (`dropless.pair_capacity`) and the
        bytes are those of the first round, all that balanced routing needs; each overflow
        round (adversarial routing) sends as much again, and its exchanges sit in the HLO
        under a conditional.

    and per MoE layer run, the exchanges of the forward and of its transpose:
        token rows [P N_, D] in the payload dtype: out, back (forward), and their two transposes;
        metadata [P N_, 2 s] float32 (the s slots of `static_rows`: local expert ids as floats,
        and weights): out (forward) and its transpose;
        model.remat=full runs the forward "out" pair again in the backward ("back" is dead there);
        with precision.fp8_dispatch each forward "out" of the token rows is two exchanges: the
        e4m3 codes [P N_, D'] (D' = D rounded up to whole 1 x B slices, B =
        precision.fp8_block_size; `fp8_bytes` per element: 1, XLA:CPU widens them to 2) and
        their power-of-two scales [P N_, D' / B] float32; the transposes stay in the payload
        dtype (`dispatch_bytes_per_token`).
    A pipelined stack runs every layer slot of a stage on every tick, bubble ticks and the
    padding slots of shorter stages included: runs = the longest stage's layers x ticks; the
    first-k dense layers have no MoE. The MTP modules run their one MoE layer once on the whole
    shard (N_ = B_ (T - depth)) outside any remat scan; with a pipeline they run in its tail,
    ceil(m / p) times per device on one microbatch (N_ = B_ / m (T - depth)) under remat.
    1f1b: every tick runs its block's forward and then the forward and backward of the block
    it differentiates (one more "out" and "back" per layer run), and the tail (forward and
    backward, no remat) on every stage: m + 2p - 2 ticks.
    Other all-to-alls in the HLO are GSPMD's resharding, not the dispatch.

    Also `ragged_bound`: what the GPU's ragged_all_to_all sends at most: each token to at most
    min(P, k, topk_groups) shards, so at most N_ min(P - 1, k, topk_groups) rows leave a device
    per exchange, instead of the (P - 1) N_ buffer rows of the dense exchange."""
    e, p = cfg.moe, shape.mesh["expert"]
    if not cfg.num_moe_layers or p == 1:
        return {"dense": 0.0, "ragged_bound": 0.0, "exchanges": 0}
    width = cfg.model.d_model
    sched = shape.schedule
    stage_layers = (max(stage_layer_counts(cfg, sched.stages)) if sched.virtual_stages == 1
                    else staged_layers(cfg) // (sched.stages * sched.virtual_stages))
    remat = cfg.model.remat != "none"
    # (MoE layer runs, tokens N_ per run, rematerialised?, an extra forward?): 1f1b runs each
    # tick's block forward, then a forward and backward of the block it differentiates
    runs = [(cfg.num_moe_layers if sched.stages == 1
             else stage_layers * sched.virtual_stages * sched.ticks,
             shape.tokens_per_device // sched.microbatches, remat, sched.one_f_one_b)]
    for depth in range(1, cfg.model.mtp_depth + 1):
        tokens = shape.batch_rows // sched.microbatches * (shape.seq_len - depth)
        if sched.stages == 1:  # MTP: not in a remat scan
            runs.append((1, shape.batch_rows * (shape.seq_len - depth), False, False))
        elif sched.one_f_one_b:  # the tail at every tick on every stage, differentiated at once
            runs.append((sched.ticks, tokens, False, False))
        else:  # the pipeline's tail: per microbatch, under remat
            runs.append((-(-sched.microbatches // sched.stages), tokens, True, False))
    share = (p - 1) / p
    dense = ragged = 0.0
    exchanges = 0
    out_bytes, out_messages = _row_out_bytes(cfg, payload_bytes, fp8_bytes)
    for count, tokens, rematerialised, extra_forward in runs:
        outs, meta_exchanges = 1 + rematerialised, 2 + rematerialised
        backs = 3 + extra_forward  # the forward "back", the two transposes, another "back"
        outs, meta_exchanges = outs + extra_forward, meta_exchanges + extra_forward
        bound = static_rows(tokens, e.num_experts, e.top_k, p, row_tile(tokens * p * e.top_k, e),
                            pair_capacity(e, tokens, p))  # the passes do not change the exchange
        slots = bound.slots
        # per row: the forward "out" (again under remat), "back" and the two transposes
        row_bytes = outs * out_bytes + backs * width * payload_bytes
        meta_bytes = bound.exchange_rows * 2 * slots * 4 * share
        dense += count * (bound.exchange_rows * row_bytes * share + meta_exchanges * meta_bytes)
        remote_rows = tokens * min(max_destinations(e, p), p - 1)  # rows to other shards
        ragged += count * remote_rows * (row_bytes + meta_exchanges * 2 * slots * 4)
        exchanges += count * (outs * out_messages + backs + meta_exchanges)
    return {"dense": dense, "ragged_bound": ragged, "exchanges": exchanges}


def _row_out_bytes(cfg: Config, payload_bytes: int, fp8_bytes: int = 1) -> tuple[int, int]:
    """(bytes, messages) of one token row on the dispatch's way out: D elements of the payload
    dtype in one exchange, or with precision.fp8_dispatch the e4m3 codes of its 1 x B slices
    (fp8_bytes each) and one float32 power-of-two scale per slice, in two exchanges."""
    width = cfg.model.d_model
    if not cfg.precision.fp8_dispatch:
        return width * payload_bytes, 1
    slices = -(-width // cfg.precision.fp8_block_size)
    return slices * cfg.precision.fp8_block_size * fp8_bytes + slices * 4, 2


def dispatch_bytes_per_token(cfg: Config, expert_shards: int, payload_bytes: int) -> dict:
    """Forward bytes of one token's dispatch in one MoE layer, at most (what a ragged exchange
    sends; the report's figure is of this kind): the token goes to at most
    min(max_destinations, P - 1) other expert shards, each receiving its row (out: D x payload,
    or D + 4 D / B bytes in fp8) and its (id, weight) slots (2 s float32), and sending one
    result row back (D x payload)."""
    e = cfg.moe
    local_experts = e.num_experts // expert_shards
    slots = min(e.top_k, local_experts) if expert_shards > 1 else e.top_k
    destinations = min(max_destinations(e, expert_shards), expert_shards - 1)
    out_bytes, _ = _row_out_bytes(cfg, payload_bytes)
    per_destination = out_bytes + 2 * slots * 4 + cfg.model.d_model * payload_bytes
    return {"destinations": destinations, "out": out_bytes, "metadata": 2 * slots * 4,
            "back": cfg.model.d_model * payload_bytes,
            "per_destination": per_destination, "total": destinations * per_destination}


def activation_bytes(cfg: Config, shape: StepShape) -> dict:
    """Arithmetic, per device: the layer inputs [B_, T, D] (precision.residual_dtype) the
    backward needs (every
    layer's with model.remat=full or none; with a pipeline, the block inputs the longest stage
    keeps (Schedule.kept_block_inputs), the first dense layers' inputs for the ceil(m / p)
    microbatches a stage runs them on, and the MTP modules' per microbatch), and the logits
    float32: [B_, T, V] per head without a pipeline, one
    microbatch's with one (the pipeline's tail runs the head per microbatch under remat).
    Excludes one layer's working set (rematerialised, or kept whole with remat=none) and the
    dispatch buffers."""
    width, tokens = cfg.model.d_model, shape.tokens_per_device
    sched = shape.schedule
    layer_input = tokens * width * _residual_bytes(cfg)
    heads = 1 + cfg.model.mtp_depth
    dense_first = cfg.model.num_layers - staged_layers(cfg)
    if sched.stages > 1:
        per_microbatch = layer_input // sched.microbatches
        staged = sched.kept_block_inputs(max(stage_layer_counts(cfg, sched.stages))) * per_microbatch
        # the first dense layers: a stage runs ceil(m / p) microbatches (pipeline.microbatched)
        rounds = -(-sched.microbatches // sched.stages)
        unstaged = (dense_first * rounds + cfg.model.mtp_depth) * per_microbatch
        logits = tokens // sched.microbatches * cfg.model.vocab_size * 4 * heads
    else:
        staged = staged_layers(cfg) * layer_input
        unstaged = (dense_first + cfg.model.mtp_depth) * layer_input
        logits = tokens * cfg.model.vocab_size * 4 * heads
    return {"layer_inputs": unstaged + staged, "logits": logits}


def _residual_bytes(cfg: Config) -> int:
    return jnp.dtype(cfg.precision.residual_dtype).itemsize


def stage_breakdown(cfg: Config, shape: StepShape) -> list[dict]:
    """Per pipeline stage: its layers of the stack, the microbatches whose head and MTP it
    runs (the pipeline's tail; 1f1b: every tick's, on masked values except on the last stage),
    and the block inputs it keeps for the backward (arithmetic, precision.residual_dtype). Every
    stage holds the same state bytes: the stack is split over `pipe` whatever the layer counts,
    and the other weights are whole on every stage (their AdamW moments split over it)."""
    sched = shape.schedule
    per_microbatch = (shape.tokens_per_device * cfg.model.d_model * _residual_bytes(cfg)
                      // sched.microbatches)
    return [{"stage": s, "layers": layers,
             "tail_microbatches": (sched.ticks if sched.one_f_one_b
                                   else len(range(s, sched.microbatches, sched.stages))),
             "block_inputs": sched.kept_block_inputs(layers) * per_microbatch}
            for s, layers in enumerate(stage_layer_counts(cfg, sched.stages))]


def state_bytes(cfg: Config, num_devices: int) -> dict:
    """Per-device bytes of parameters, AdamW moments and gradients (sharded like the
    parameters, in param_dtype), by arithmetic on the abstract state; no devices needed."""
    state = build_run(cfg, abstract_mesh(cfg, num_devices), abstract=True).state
    params = bytes_per_device(state.params)
    return {"parameters": params, "optimizer": bytes_per_device(state.opt_state),
            "gradients": params, "router_state": bytes_per_device(state.router)}


def compile_step(cfg: Config, num_devices: int):
    """(compiled train step, seconds to lower, seconds to compile) on the first `num_devices`
    devices, with abstract inputs: nothing is allocated."""
    if jax.device_count() < num_devices:
        raise ConfigError(
            f"compiling for {num_devices} devices needs that many, and jax sees "
            f"{jax.device_count()}: run scripts/plan.py (it asks XLA:CPU for fake devices) or "
            f"set XLA_FLAGS=--xla_force_host_platform_device_count={num_devices} before jax "
            "starts, or pass compile=False.")
    run = build_run(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:num_devices]),
                    abstract=True)
    start = time.perf_counter()
    with cpu_kernels.off("the planner models a GPU's program"):
        lowered = run.lower()
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    return compiled, lowered_at - start, time.perf_counter() - lowered_at


def plan(cfg: Config, num_devices: int, compile: bool = True, hlo_out=None) -> dict:
    """The per-device plan of one train step of `cfg` on `num_devices` devices (a JSON-able
    dict; every figure says where it comes from). `hlo_out`: a path for the compiled HLO text."""
    shape = step_shape(cfg, num_devices)
    payload = jnp.dtype(cfg.precision.compute_dtype).itemsize
    result = {
        "devices": num_devices,
        "mesh": shape.mesh,
        "global_batch": {"rows": cfg.train.global_batch_size, "seq_len": cfg.train.seq_len},
        "tokens_per_device_per_step": shape.tokens_per_device / shape.mesh["pipe"],
        "pipeline": {"stages": shape.schedule.stages, "microbatches": shape.schedule.microbatches,
                     "virtual_stages": shape.schedule.virtual_stages,
                     "ticks": shape.schedule.ticks,
                     "bubble": shape.schedule.theoretical_bubble},
        "bytes_per_device": {"source": "arithmetic: shard shapes of the abstract train state",
                             **state_bytes(cfg, num_devices)},
        "activations": {"source": "arithmetic: remat-saved layer inputs (residual dtype) + "
                                  "logits (float32)",
                        **activation_bytes(cfg, shape)},
        "stages": stage_breakdown(cfg, shape) if shape.schedule.stages > 1 else [],
        "dispatch_formula": {
            "source": "formula (dispatch_all_to_all_bytes) at the compute dtype",
            **dispatch_all_to_all_bytes(cfg, shape, payload)},
        # what the XLA:CPU program sends: it widens sub-32-bit collective payloads to float32,
        # fp8 ones to float16
        "dispatch_formula_cpu_f32": dispatch_all_to_all_bytes(cfg, shape, max(payload, 4),
                                                              fp8_bytes=2),
    }
    if compile:
        compiled, lower_s, compile_s = compile_step(cfg, num_devices)
        memory = compiled.memory_analysis()
        hlo_text = compiled.as_text()
        if hlo_out is not None:
            Path(hlo_out).write_text(hlo_text)
        result["compiled"] = {
            "source": "XLA:CPU compiled program (fake host devices)",
            "lower_seconds": lower_s, "compile_seconds": compile_s,
            "memory": {"arguments": memory.argument_size_in_bytes,
                       "outputs": memory.output_size_in_bytes,
                       "aliased": memory.alias_size_in_bytes,
                       "temporaries": memory.temp_size_in_bytes},
            "collectives": hlo_stats.collective_traffic(hlo_text),
        }
    if _has_deepseek_v3_shape(cfg):
        result["deepseek_v3_report"] = deepseek_comparison(cfg)
        result["deepseek_v3_report"]["this_plan_dispatch_bytes_per_token_per_moe_layer_forward"] = (
            dispatch_bytes_per_token(cfg, shape.mesh["expert"], payload))
    return result


def peak_breakdown(dump_dir, top: int = 15) -> dict:
    """What XLA:CPU's buffer assignment holds at the program's memory peak, read from the
    `*-live-range.txt` files an `--xla_dump_to=dump_dir --xla_dump_hlo_as_text` compile wrote
    (the module with the largest peak): {"peak_bytes", "values": [{"name", "bytes"}, ...]},
    the `top` largest of the breakdown's first level first. Names are the HLO values' op names (jax's name stack, e.g.
    `.../shard_map/broadcast_in_dim`) or instruction names; one name can cover several values."""
    best = {"peak_bytes": 0, "values": []}
    for path in Path(dump_dir).glob("*-live-range.txt"):
        text = path.read_text()
        head = re.search(r"Stack trace breakdown for peak usage: ([\d ]+) bytes", text)
        if head is None or int(head.group(1).replace(" ", "")) <= best["peak_bytes"]:
            continue
        values = [{"name": name, "bytes": int(size.replace(" ", ""))} for name, size in
                  re.findall(r"^      [├└]── (.+?) \([\d.]+%, total: ([\d ]+) bytes", text,
                             flags=re.MULTILINE)]
        best = {"peak_bytes": int(head.group(1).replace(" ", "")),
                "values": sorted(values, key=lambda v: -v["bytes"])[:top]}
    return best


def _has_deepseek_v3_shape(cfg: Config) -> bool:
    """Width and experts of DeepSeek-V3 (the report's figures mean nothing for other models)."""
    return cfg.model.d_model == 7168 and cfg.moe.num_experts == 256 and cfg.moe.top_k == 8


def deepseek_comparison(cfg: Config) -> dict:
    """The report's figures next to this plan's, where both exist."""
    report = DEEPSEEK_V3_REPORT
    tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len
    step_seconds = tokens_per_step / (report["gpus"] * report["tokens_per_second_per_gpu"])
    # node-limited routing: a token's hidden state crosses to at most 4 nodes, dispatched in
    # fp8 (1 byte + a scale per 128) and combined in bf16 (2 bytes), per MoE layer, forward
    d = cfg.model.d_model
    per_token_layer = report["max_nodes_per_token"] * (d + d // 128 * 4 + 2 * d)
    return {
        "layout": report["layout"],
        "tokens_per_second_per_gpu": report["tokens_per_second_per_gpu"],
        "implied_step_seconds_at_this_batch": step_seconds,
        "gpu_memory_bytes": report["gpu_memory_bytes"],
        "report_cross_node_bytes_per_token_per_moe_layer_forward": per_token_layer,
    }


def _gb(value: float) -> str:
    return f"{value / 1e9:,.2f} GB"


def format_plan(result: dict) -> str:
    """The plan as a human-readable table."""
    lines = [(f"devices {result['devices']}  mesh {result['mesh']}  "
             f"batch {result['global_batch']['rows']} x {result['global_batch']['seq_len']}")]
    pipe = result["pipeline"]
    if pipe["stages"] > 1:
        lines.append(f"pipeline: {pipe['stages']} stages, {pipe['microbatches']} microbatches, "
                     f"{pipe['virtual_stages']} virtual, {pipe['ticks']} ticks, "
                     f"bubble {pipe['bubble']:.1%}")
    lines.append("")
    lines.append("per device                     bytes         source")
    state = result["bytes_per_device"]
    for name in ("parameters", "optimizer", "gradients"):
        lines.append(f"  {name:<28} {_gb(state[name]):>13}  arithmetic (shard shapes)")
    act = result["activations"]
    lines.append(f"  {'activations: layer inputs':<28} {_gb(act['layer_inputs']):>13}  "
                 "arithmetic (remat-saved, residual dtype)")
    lines.append(f"  {'activations: logits':<28} {_gb(act['logits']):>13}  arithmetic (f32)")
    if "compiled" in result:
        memory = result["compiled"]["memory"]
        lines.append(f"  {'compiled arguments':<28} {_gb(memory['arguments']):>13}  "
                     "XLA:CPU memory analysis (state + batch)")
        lines.append(f"  {'compiled temporaries':<28} {_gb(memory['temporaries']):>13}  "
                     "XLA:CPU memory analysis (activations, gradients, buffers)")
        lines.append("")
        lines.append("per device per step            count    bytes sent    source")
        for kind, traffic in result["compiled"]["collectives"].items():
            lines.append(f"  {kind:<28} {traffic['count']:>6} {_gb(traffic['bytes_sent']):>13}"
                         "  compiled HLO (XLA:CPU: bf16 widened to f32)")
        lines.append(f"  lower {result['compiled']['lower_seconds']:.1f} s, "
                     f"compile {result['compiled']['compile_seconds']:.1f} s")
    if result.get("peak"):
        lines.append("")
        lines.append(f"at the memory peak ({_gb(result['peak']['peak_bytes'])}, XLA:CPU buffer "
                     "assignment), largest values:")
        lines += [f"  {_gb(value['bytes']):>13}  {value['name']}"
                  for value in result["peak"]["values"]]
    if result.get("stages"):
        lines.append("")
        lines.append("stage  layers  head/MTP microbatches  block inputs")
        for row in result["stages"]:
            lines.append(f"  {row['stage']:>3} {row['layers']:>7} {row['tail_microbatches']:>22}"
                         f"  {_gb(row['block_inputs']):>13}")
        lines.append("  (every stage holds the same state bytes: the stack is split over pipe)")
    formula = result["dispatch_formula"]
    lines.append("")
    lines.append(f"dispatch all-to-all, formula at the compute dtype: dense exchange "
                 f"{_gb(formula['dense'])}, ragged (GPU) at most {_gb(formula['ragged_bound'])}"
                 f" per device per step ({formula['exchanges']} exchanges); dense at XLA:CPU's "
                 f"float32 {_gb(result['dispatch_formula_cpu_f32']['dense'])}")
    if "deepseek_v3_report" in result:
        report = result["deepseek_v3_report"]
        lines.append("")
        lines.append(f"DeepSeek-V3 report: {report['layout']}, "
                     f"{report['tokens_per_second_per_gpu']} tokens/s/GPU -> "
                     f"{report['implied_step_seconds_at_this_batch']:.1f} s per step at this "
                     f"batch; {_gb(report['gpu_memory_bytes'])} per GPU; at most "
                     f"{report['report_cross_node_bytes_per_token_per_moe_layer_forward']:,} "
                     "cross-node bytes per token per MoE layer (forward, fp8 out, bf16 back)")
        mine = report["this_plan_dispatch_bytes_per_token_per_moe_layer_forward"]
        lines.append(f"this plan: at most {mine['total']:,} B per token per MoE layer (forward: "
                     f"{mine['destinations']} shards x ({mine['out']:,} out + "
                     f"{mine['metadata']} metadata + {mine['back']:,} back))")
    return "\n".join(lines)
