"""Whole-model train steps: moejax's own (the step `moejax.train` runs) against Hugging Face
transformers' `DeepseekV3ForCausalLM` (torch, at its defaults: grouped_mm experts, sdpa
attention, torch's own thread count), on the same tiny DeepSeek-shaped model
(configs/tiny_deepseek_v3.yaml with model.mtp_depth=0: MLA, group-limited sigmoid routing,
a shared expert, a dense first layer, dropless MoE), from the same initial weights (moejax's,
written by moejax.convert.save_hf and read by from_pretrained), with AdamW of the same
hyperparameters, on the same batches. scripts/bench_hf_model.py is its command line.

- `deepseek_config`, `hf_model`, `HFTrainer`: the two systems.
- `initial_losses`: both models' cross-entropy of one batch before any step (the same model).
- `first_step`, `hf_first_step`: seconds to the first step of a config not compiled before in
  the process (trace + lower, compile, run) and of a fresh HF model; `relaunch_first_steps`:
  the default preset's in a launch and a relaunch (two new processes sharing the trainer's
  persistent compilation cache, train.compilation_cache).
- `interleaved_blocks`: the timing protocol; both systems get the same batches each round.
- `category_of_ops`, `moejax_breakdown`: where moejax's step spends its time, by category
  (CATEGORIES): the ops of a jax.profiler trace, each mapped through the compiled HLO's stack
  frames to the moejax function it was traced from; `host_overhead_ms` = wall - op-busy time.
- `HFClock`, `hf_breakdown`: the same categories for HF's step, from module hooks and
  identity autograd functions that note when the backward reaches each module.
- `run_benchmark` -> the record (a dict) that `report` prints and --json writes.

What differs between the two steps, by design of each: moejax's loss adds the sequence-wise
balance loss (moe.seq_balance_loss_coef, 1e-4 of it) and its step updates the router's
selection bias (aux-loss-free balancing) and checks finiteness; transformers' DeepseekV3
computes the cross-entropy only (it has no auxiliary loss) and leaves e_score_correction_bias,
a buffer, alone in training.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import datetime
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import jax
import numpy as np

from moejax.config import Config, load_config
from moejax.tools import bench
from moejax.tools import profile_ops as ops_lib

PRESET = "tiny_deepseek_v3"
DEFAULT_PRESET = "tiny"  # what `python scripts/train.py` runs
MODEL_OVERRIDES = ("model.mtp_depth=0",)  # HF's DeepseekV3ForCausalLM has no MTP module
HF_ARCHITECTURE = "DeepseekV3ForCausalLM"
MOEJAX, HF = "moejax", "HF DeepseekV3ForCausalLM"
TARGET_SPEEDUP = 1.25  # moejax tokens/s over HF's
TARGET_FIRST_STEP_S = 5.0  # the default preset's first step (compile included)
LOSS_TOLERANCE = 1e-4  # |moejax - HF| initial cross-entropy, nats/token
ADAM_EPS = 1e-8  # optax.adamw's default eps (moejax sets none), and torch's

CATEGORIES = ("attention", "MoE", "dense FFN", "embedding/head/loss", "optimizer", "layer scan",
              "other")
CATEGORY_NOTES = {
    "attention": "MLA: projections, latent norms, RoPE, scores, softmax, output",
    "MoE": "router, dispatch, experts, combine, shared expert, balance loss, bias update",
    "dense FFN": "the dense first layer's SwiGLU",
    "embedding/head/loss": "embedding lookup, final norm, output head, cross-entropy",
    "optimizer": "AdamW update, global-norm clipping (and the grad-norm metric)",
    "layer scan": "moejax's lax.scan over layers: zero-filled stacked buffers, slicing, copies",
    "other": "block pre-norms, residual adds, finiteness checks, metrics (HF: also RoPE, "
             "autograd and Python between modules)",
}


# ---------------------------------------------------------------------------------------------
# The two systems


def deepseek_config(steps: int, extra=(), num_devices: int | None = None) -> Config:
    """configs/tiny_deepseek_v3.yaml without its MTP module, train.steps=`steps` (the learning
    rate schedule's length, the same on both sides), then the `extra` overrides."""
    return load_config(PRESET, [*MODEL_OVERRIDES, f"train.steps={max(steps, 2)}", *extra],
                       num_devices=num_devices)


def hf_model(cfg: Config, params, router_state):
    """transformers' DeepseekV3ForCausalLM of `cfg` carrying `params` and the router state's
    selection bias: written as a checkpoint by moejax's converter (config.json from
    moejax.convert.deepseek: MLA ranks and head dims, first_k_dense_replace, n_group and
    topk_group, shared experts, routed_scaling_factor, RoPE, rms_norm_eps, untied head) and
    read back with from_pretrained, float32, in training mode, at transformers' defaults
    (experts_implementation grouped_mm, attention sdpa)."""
    import torch
    import transformers

    from moejax.convert import save_hf

    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # its "Loading weights" bar
    try:
        with tempfile.TemporaryDirectory(prefix="moejax-hf-model-") as directory:
            save_hf(cfg, jax.device_get(params), directory, HF_ARCHITECTURE,
                    router_state=jax.device_get(router_state), dtype="float32")
            model = transformers.DeepseekV3ForCausalLM.from_pretrained(
                directory, dtype=torch.float32)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    return model.train()


def hf_implementations(model) -> dict:
    config = model.config
    return {"experts": getattr(config, "_experts_implementation", None),
            "attention": getattr(config, "_attn_implementation", None)}


class HFTrainer:
    """A train step of `model` as moejax's (training/optim.py): AdamW with moejax's betas, eps
    and weight decay on matrices only (parameters of 2+ dims; not norms), the same warmup +
    cosine learning rate per step (moejax's own schedule function, tabulated), global-norm
    clipping at train.grad_clip; loss = mean next-token cross-entropy."""

    def __init__(self, model, cfg: Config):
        import torch

        from moejax.training.optim import learning_rate_schedule

        t = cfg.train
        self.model, self.grad_clip = model, t.grad_clip
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": t.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=t.learning_rate,
                                           betas=(t.adam_b1, t.adam_b2), eps=ADAM_EPS)
        # the multiplier of the peak rate at steps 0 .. train.steps (then held)
        table = np.asarray(learning_rate_schedule(cfg)(np.arange(t.steps + 1))) / t.learning_rate
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: float(table[min(step, len(table) - 1)]))

    def loss(self, inputs, targets):
        return hf_cross_entropy(self.model, inputs, targets)

    def step(self, batch):
        """One update on batch (inputs [B, T], targets [B, T], int64) -> the loss (a tensor)."""
        loss = self.loss(*batch)
        loss.backward()
        self.update()
        return loss.detach()

    def update(self) -> None:
        """Clip the gradients, take the AdamW step, advance the schedule, drop the grads."""
        import torch

        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


def hf_cross_entropy(model, inputs, targets):
    """Mean next-token cross-entropy of inputs [B, T] against targets [B, T] (a tensor)."""
    import torch.nn.functional as F

    logits = model(input_ids=inputs, use_cache=False).logits  # [B, T, V] float32
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def torch_batch(tokens: np.ndarray):
    """tokens [B, T + 1] -> (inputs [B, T], targets [B, T]) as int64 torch tensors."""
    import torch

    tokens = torch.from_numpy(np.asarray(tokens, np.int64))
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def initial_losses(eval_step: Callable, params, router, model, tokens: np.ndarray) -> dict:
    """Mean next-token cross-entropy (nats/token) of batch `tokens` [B, T + 1] by moejax's eval
    step (the trainer's held-out loss) and by the HF model, before any step."""
    import torch

    ours = float(eval_step(params, {"tokens": jax.numpy.asarray(tokens)}, router))
    with torch.no_grad():
        theirs = float(hf_cross_entropy(model, *torch_batch(tokens)))
    return {MOEJAX: ours, HF: theirs, "abs_diff": abs(ours - theirs),
            "tolerance": LOSS_TOLERANCE, "same": abs(ours - theirs) <= LOSS_TOLERANCE}


# ---------------------------------------------------------------------------------------------
# First step: tracing, lowering, compiling and running the train step of a fresh config


def first_step(cfg: Config, seed: int = 0) -> dict:
    """Seconds to the first train step of `cfg` as `moejax.train` takes it (the trainer's
    build_run, then jit's lower and compile, then the run), in a process that has not compiled
    this config's step yet (the jit caches then hold it: later runs of it do not recompile).
    Also the eval step's compile, which moejax.train does before the first step too. Returns
    the seconds and the compiled step's HLO text (for the breakdown)."""
    from moejax.training.run import build_run

    started = time.perf_counter()
    run = build_run(cfg, key=jax.random.key(seed))
    jax.block_until_ready(run.state)
    state_ready = time.perf_counter()
    t = cfg.train
    tokens = np.random.default_rng(seed).integers(
        0, cfg.model.vocab_size, (t.global_batch_size, t.seq_len + 1), dtype=np.int32)
    batch = run.global_batch(tokens)
    with jax.set_mesh(run.mesh):
        lowered = run.step.lower(run.state, batch)
        traced = time.perf_counter()
        compiled = lowered.compile()
        compiled_at = time.perf_counter()
        state, metrics = compiled(run.state, batch)  # donates the state: run is spent
        jax.block_until_ready(metrics["loss"])
        ran = time.perf_counter()
        run.eval_step.lower(state.params, batch, state.router).compile()
        eval_compiled = time.perf_counter()
    return {"init_state_s": state_ready - started, "trace_lower_s": traced - state_ready,
            "compile_s": compiled_at - traced, "first_run_s": ran - compiled_at,
            "first_step_s": ran - state_ready, "eval_compile_s": eval_compiled - ran,
            "total_s": eval_compiled - started,
            "hlo_text": compiled.as_text()}


RELAUNCH_CHILD = """
import json, sys
from moejax.training.run import use_compilation_cache
use_compilation_cache(sys.argv[1])
from moejax import load_config
from moejax.tools.bench_hf_model import DEFAULT_PRESET, first_step
record = first_step(load_config(DEFAULT_PRESET, []))
record.pop("hlo_text")
print(json.dumps(record))
"""


def relaunch_first_steps() -> dict:
    """The default preset's first step as a launch and then a relaunch of `moejax.train` take
    it: two fresh processes one after the other, each pointing the trainer's persistent
    compilation cache (`use_compilation_cache`, train.compilation_cache) at one new, empty
    directory: {"cold": the first's `first_step` seconds, "warm": the second's}."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    with tempfile.TemporaryDirectory(prefix="moejax-relaunch-cache-") as cache:
        runs = [subprocess.run([sys.executable, "-c", RELAUNCH_CHILD, cache], check=True,
                               capture_output=True, text=True, env=env)
                for _ in range(2)]
    cold, warm = (json.loads(r.stdout.strip().splitlines()[-1]) for r in runs)
    return {"cold": cold, "warm": warm}


def backend_warmup() -> float:
    """Seconds of the process's first jit call (XLA client start-up), so that it falls on no
    measured first step."""
    started = time.perf_counter()
    jax.block_until_ready(jax.jit(lambda x: x + 1)(np.float32(0)))
    return time.perf_counter() - started


def hf_first_step(model, cfg: Config, tokens: np.ndarray) -> dict:
    """Seconds of the first train step of a fresh copy of `model` (torch compiles nothing;
    its first call pays lazy initialisation, the optimizer's moments included)."""
    trainer = HFTrainer(copy.deepcopy(model), cfg)
    batch = torch_batch(tokens)
    started = time.perf_counter()
    trainer.step(batch)
    return {"first_step_s": time.perf_counter() - started}


# ---------------------------------------------------------------------------------------------
# Timing protocol: interleaved blocks on the same batches


class MoejaxSystem:
    """The trainer's own step on the bench run's state (bench.prepare_train_run)."""

    def __init__(self, bench_run: bench.BenchRun):
        self.bench_run, self.metrics = bench_run, None

    def prepare(self, tokens: list[np.ndarray]) -> list:
        batches = [self.bench_run.run.global_batch(t) for t in tokens]
        return jax.block_until_ready(batches)

    def run(self, batches: list) -> float:
        run = self.bench_run.run
        started = time.perf_counter()
        with jax.set_mesh(run.mesh):
            for batch in batches:
                run.state, self.metrics = run.step(run.state, batch)
            jax.block_until_ready((run.state, self.metrics))
        return time.perf_counter() - started

    def last_loss(self) -> float:
        """The last step's cross-entropy (without the balance loss, as HF's)."""
        return float(self.metrics["cross_entropy"])


class HFSystem:
    def __init__(self, trainer: HFTrainer):
        self.trainer, self.loss = trainer, None

    def prepare(self, tokens: list[np.ndarray]) -> list:
        return [torch_batch(t) for t in tokens]

    def run(self, batches: list) -> float:
        started = time.perf_counter()
        for batch in batches:
            self.loss = self.trainer.step(batch)  # torch on CPU: done when it returns
        return time.perf_counter() - started

    def last_loss(self) -> float:
        return float(self.loss)


def interleaved_blocks(systems: dict, train_iter, rounds: int, block: int,
                       log: Callable | None = None) -> dict:
    """Each round fetches `block` batches once, gives them to every system (placed before the
    clock starts), and runs `block` steps of each, in an order rotated by one per round.
    Returns {"seconds": {name: [per round]}, "loss": {name: [last cross-entropy per round]},
    "order": [[names] per round]}."""
    names = list(systems)
    out = {"seconds": {n: [] for n in names}, "loss": {n: [] for n in names}, "order": []}
    for round_ in range(rounds):
        tokens = [next(train_iter)["tokens"] for _ in range(block)]
        prepared = {name: systems[name].prepare(tokens) for name in names}
        shift = round_ % len(names)
        order = names[shift:] + names[:shift]
        for name in order:
            out["seconds"][name].append(systems[name].run(prepared[name]))
        for name in names:
            out["loss"][name].append(systems[name].last_loss())
        out["order"].append(order)
        if log:
            tokens_per_block = block * tokens[0].shape[0] * (tokens[0].shape[1] - 1)
            log(f"  round {round_ + 1}/{rounds}: " + ", ".join(
                f"{name} {tokens_per_block / out['seconds'][name][-1]:,.0f} tok/s"
                for name in order))
    return out


# ---------------------------------------------------------------------------------------------
# Where moejax's step spends its time: the profiler's ops, by the code they came from

_MOE_FILES = ("moejax/model/moe.py", "moejax/model/router.py")
_MOE_FUNCTIONS = {"update_router_bias", "_router_loss", "_block_router_loss"}
_HEAD_FUNCTIONS = {"output_logits", "_cross_entropy", "_head_losses", "_embedded", "_decoder"}
_LOOP_FUNCTIONS = {"_run_stack", "_run_staged_stack", "_run_stack.<locals>.<lambda>"}

# The optimizer's own frames: the step's optimizer call (optax's chain or the CPU kernel) and
# the gradients' global norm (clipping, the skip test, the metric). jax leaves optax's frames
# out of an instruction's stack (it filters library frames), so its ops show as these.
_OPTIMIZER_FRAMES = {("moejax/training/step.py", "_optimizer_step"),
                     ("moejax/training/loss_scale.py", "global_norm"),
                     ("moejax/training/cpu_adamw.py", "update")}


def frame_category(stack: tuple[ops_lib.Frame, ...]) -> str | None:
    """The category of an instruction traced from `stack` (innermost frame first): the first
    frame, going outwards, that names one; None when none does (-> "other")."""
    for depth, frame in enumerate(stack):
        caller = stack[depth + 1].function if depth + 1 < len(stack) else ""
        path = frame.file.replace(os.sep, "/")
        if "/optax/" in path or any(path.endswith(file) and frame.function == function
                                    for file, function in _OPTIMIZER_FRAMES):
            return "optimizer"
        if (path.endswith(_MOE_FILES) or "moejax/model/dispatch/" in path
                or frame.function in _MOE_FUNCTIONS):
            return "MoE"
        if frame.function == "rms_norm" and caller == "_Layers.attention":
            return "other"  # the block's pre-norms (HF's input/post_attention_layernorm)
        if path.endswith("moejax/model/attention.py") or frame.function == "_Layers.attention":
            return "attention"
        if frame.function == "_Layers.dense":
            return "dense FFN"
        if frame.function in _LOOP_FUNCTIONS:
            return "layer scan"  # the scan itself: per-layer slices, stacked buffers
        if frame.function in _HEAD_FUNCTIONS:
            return "embedding/head/loss"
    return None


def category_of_ops(module: ops_lib.HloModuleText) -> dict[str, str]:
    """Instruction name -> category. An instruction with a stack frame is categorised by it;
    one without (XLA's own: a broadcast of zeros, a layout copy, a tuple) by the majority of
    the instructions of the computation it calls (a fusion's), else of its users, else
    "other"."""
    users = module.users()
    categories: dict[str, str | None] = {}

    def own(name: str) -> str | None:
        op = module.ops[name]
        if op.frame:
            return frame_category(module.stack(op)) or "other"
        return None

    def resolve(name: str, depth: int = 0) -> str | None:
        if name in categories:
            return categories[name]
        op = module.ops.get(name)
        if op is None:
            return None
        found = own(name)
        if found is None and op.opcode == "fusion":
            found = _majority(own(n) for c in op.calls for n in module.computations.get(c, ()))
        if found is None and depth < 6:
            found = _majority(resolve(user, depth + 1) for user in users.get(name, ()))
        if found is not None or depth == 0:
            categories[name] = found
        return found

    return {name: resolve(name) or "other" for name in module.ops}


def _majority(values) -> str | None:
    counts = collections.Counter(v for v in values if v is not None)
    return counts.most_common(1)[0][0] if counts else None


def moejax_breakdown(bench_run: bench.BenchRun, hlo_text: str, batches: list) -> dict:
    """Run one step per batch of `batches` (placed) under jax.profiler; the time the step's ops
    kept the CPU busy (profile_ops.attribute_busy_time: overlapping ops share, a while loop
    counts once) by category, per step; host overhead = wall - busy (Python dispatch, the
    runtime between thunks, the profiler's own cost)."""
    module = ops_lib.parse_hlo(hlo_text)
    categories = category_of_ops(module)
    containers = {n for n, op in module.ops.items() if op.opcode in ops_lib.CONTAINER_OPCODES}
    run, walls, queue = bench_run.run, [], list(batches)

    def one_step():
        started = time.perf_counter()
        with jax.set_mesh(run.mesh):
            run.state, metrics = run.step(run.state, queue.pop(0))
            jax.block_until_ready((run.state, metrics))
        walls.append(time.perf_counter() - started)

    events = ops_lib.trace_events(one_step, len(batches))
    busy = ops_lib.attribute_busy_time(ops_lib.op_intervals(events, module.name), containers)
    steps = len(batches)
    by_category = collections.Counter()
    for name, micros in busy.items():
        by_category[categories.get(name, "other")] += micros / steps / 1e3
    wall_ms = sum(walls) / steps * 1e3
    busy_ms = sum(busy.values()) / steps / 1e3
    top = sorted(busy.items(), key=lambda kv: -kv[1])[:12]
    return {"steps": steps, "wall_ms": wall_ms, "busy_ms": busy_ms,
            "host_overhead_ms": wall_ms - busy_ms,
            "ms": {c: by_category.get(c, 0.0) for c in CATEGORIES},
            "top_ops": [{"name": n, "category": categories.get(n, "other"),
                         "ms": micros / steps / 1e3, "opcode": _opcode(module, n)}
                        for n, micros in top]}


def _opcode(module: ops_lib.HloModuleText, name: str) -> str:
    op = module.ops.get(name)
    return op.opcode if op else "?"


# ---------------------------------------------------------------------------------------------
# Where HF's step spends its time: module hooks (forward) and marks in the autograd graph


class HFClock:
    """Wall time of HF train steps by category. Forward: pre- and post-hooks on each layer's
    self_attn and mlp, the embedding, the final norm and the output head. Backward: an
    identity autograd function on each watched module's input and output notes when the
    gradient reaches it (torch's CPU autograd runs a module's backward between the two). The
    cross-entropy's backward up to the head's output and the embedding's (from its output to
    the end) count as embedding/head/loss. The hooks cost a little time themselves."""

    def __init__(self, model, dense_layers: int):
        self.seconds = collections.Counter()  # category -> seconds
        self.reached = {}  # id(module) -> when the gradient reached its output (this step)
        self._forward_started, self._handles = {}, []
        for index, layer in enumerate(model.model.layers):
            self._watch(layer.self_attn, "attention")
            self._watch(layer.mlp, "dense FFN" if index < dense_layers else "MoE")
        self.head, self.embed = model.lm_head, model.model.embed_tokens
        self._watch(model.model.norm, "embedding/head/loss")  # the final norm, as moejax's
        self._watch(self.head, "embedding/head/loss")
        self._watch(self.embed, "embedding/head/loss", input_mark=False)  # ids need no grad

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    def loss_side_seconds(self, backward_started: float, backward_ended: float) -> float:
        """The backward outside every watched module that belongs to the head and loss: from
        its start to the gradient reaching the head's output, and from the gradient reaching
        the embedding's output to its end (the embedding's gradient)."""
        head = self.reached.get(id(self.head), backward_started)
        embed = self.reached.get(id(self.embed), backward_ended)
        return (head - backward_started) + (backward_ended - embed)

    def _watch(self, module, category: str, input_mark: bool = True) -> None:
        key = id(module)

        def reached():
            self.reached[key] = time.perf_counter()

        def left():
            self.seconds[category] += time.perf_counter() - self.reached[key]

        def before(mod, args, kwargs):
            self._forward_started[key] = time.perf_counter()
            return _mark_input(args, kwargs, left) if input_mark else None

        def after(mod, args, kwargs, output):
            self.seconds[category] += time.perf_counter() - self._forward_started[key]
            return _mark_output(output, reached)

        self._handles += [module.register_forward_pre_hook(before, with_kwargs=True),
                          module.register_forward_hook(after, with_kwargs=True)]


@functools.cache
def _mark_function():
    import torch

    class Mark(torch.autograd.Function):
        """Identity; its backward calls `note()`: the gradient has reached this point."""

        @staticmethod
        def forward(ctx, x, note):
            ctx.note = note
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            ctx.note()
            return grad, None

    return Mark


def _mark_input(args, kwargs, note):
    """The module's input hidden states (first positional argument, or the keyword
    hidden_states, as HF's decoder layer passes it) through a Mark."""
    import torch

    mark = _mark_function()
    if args and isinstance(args[0], torch.Tensor) and args[0].requires_grad:
        return (mark.apply(args[0], note), *args[1:]), kwargs
    x = kwargs.get("hidden_states")
    if isinstance(x, torch.Tensor) and x.requires_grad:
        return args, {**kwargs, "hidden_states": mark.apply(x, note)}
    return None


def _mark_output(output, note):
    import torch

    mark = _mark_function()
    if isinstance(output, torch.Tensor):
        return mark.apply(output, note)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (mark.apply(output[0], note), *output[1:])
    return None


def hf_breakdown(trainer: HFTrainer, dense_layers: int, batches: list) -> dict:
    """HF steps on `batches` (torch) with an HFClock attached -> ms per step by category;
    the optimizer phase (clipping, AdamW, schedule, zeroing) timed whole, `other` the rest
    of the wall time (block norms, residual adds, RoPE, autograd and Python between
    modules)."""
    clock = HFClock(trainer.model, dense_layers)
    walls, optimizer, loss_side = [], 0.0, 0.0
    try:
        for batch in batches:
            clock.reached.clear()
            started = time.perf_counter()
            loss = trainer.loss(*batch)
            backward_started = time.perf_counter()
            loss.backward()
            backward_ended = time.perf_counter()
            trainer.update()
            walls.append(time.perf_counter() - started)
            optimizer += walls[-1] - (backward_ended - started)
            loss_side += clock.loss_side_seconds(backward_started, backward_ended)
    finally:
        clock.close()
    steps = len(batches)
    ms = {c: clock.seconds.get(c, 0.0) / steps * 1e3 for c in CATEGORIES}
    ms["layer scan"] = None  # an eager Python loop over the layers: in `other`
    ms["embedding/head/loss"] += loss_side / steps * 1e3
    ms["optimizer"] = optimizer / steps * 1e3
    wall_ms = sum(walls) / steps * 1e3
    ms["other"] = wall_ms - sum(ms[c] or 0.0 for c in CATEGORIES if c != "other")
    return {"steps": steps, "wall_ms": wall_ms, "ms": ms}


# ---------------------------------------------------------------------------------------------
# The whole benchmark


@dataclasses.dataclass
class Options:
    rounds: int = 6
    block: int = 10
    profile_steps: int = 5
    seed: int = 0
    quick: bool = False


def environment() -> dict:
    import torch
    import transformers

    return {"date": datetime.date.today().isoformat(), "host": platform.node() or "host",
            "cores": bench.cpu_threads(), "device": jax.devices()[0].device_kind,
            "jax": jax.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__,
            # read, never set: torch runs at its own default
            "torch_threads": torch.get_num_threads(),
            "jax_compilation_cache": jax.config.jax_compilation_cache_dir,
            # glibc's malloc settings, which both systems' buffers share (e.g. hugetlb=1: huge
            # pages for fresh allocations, docs/bench_hf_model.md)
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES")}


def shapes(cfg: Config, model) -> dict:
    from moejax.model.transformer import count_params

    m, e, t = cfg.model, cfg.moe, cfg.train
    return {"layers": m.num_layers, "dense_layers": cfg.num_dense_layers, "d_model": m.d_model,
            "heads": m.num_heads, "q_lora_rank": m.q_lora_rank, "kv_lora_rank": m.kv_lora_rank,
            "qk_nope_head_dim": m.qk_nope_head_dim, "qk_rope_head_dim": m.qk_rope_head_dim,
            "v_head_dim": m.v_head_dim, "ffn_dim": m.ffn_dim, "experts": e.num_experts,
            "top_k": e.top_k, "groups": e.num_groups, "topk_groups": e.topk_groups,
            "shared_experts": e.num_shared_experts, "expert_ffn_dim": e.expert_ffn_dim,
            "dispatch": e.dispatch, "vocab": m.vocab_size, "batch": t.global_batch_size,
            "seq_len": t.seq_len, "compute_dtype": cfg.precision.compute_dtype,
            "moejax_params": count_params(cfg)["total"],
            "hf_params": sum(p.numel() for p in model.parameters())}


def run_benchmark(options: Options, log: Callable = print) -> dict:
    """Everything, in this order: first steps (default preset, then the DeepSeek-shaped
    config, each compiled fresh), the HF model from moejax's initial weights, the initial-loss
    check and one untimed step of each on the same batch, the interleaved rounds, then the
    breakdowns. Returns the record."""
    record = {"load_start": bench.load_average(), "environment": environment(),
              "options": dataclasses.asdict(options)}
    record["backend_warmup_s"] = backend_warmup()
    log(f"first step of configs/{DEFAULT_PRESET}.yaml (fresh compile) ...")
    record["first_step_default"] = _without_hlo(first_step(load_config(DEFAULT_PRESET, [])))
    log(f"first step of configs/{DEFAULT_PRESET}.yaml, launched then relaunched (fresh "
        "processes, the trainer's persistent compilation cache) ...")
    record["first_step_default_relaunch"] = relaunch_first_steps()
    steps = 1 + options.rounds * options.block + options.profile_steps
    cfg = deepseek_config(steps, [f"train.seed={options.seed}"])
    log(f"first step of configs/{PRESET}.yaml {' '.join(MODEL_OVERRIDES)} (fresh compile) ...")
    deepseek_first = first_step(cfg, options.seed)
    hlo_text = deepseek_first.pop("hlo_text")
    record["first_step_moejax"] = deepseek_first
    bench_run = bench.prepare_train_run(cfg, options.seed)  # the step compiled above: cached
    run = bench_run.run
    started = time.perf_counter()
    model = hf_model(cfg, run.state.params, run.state.router)
    record["hf_model_build_s"] = time.perf_counter() - started
    record["hf_implementations"] = hf_implementations(model)
    record["shapes"] = shapes(cfg, model)
    tokens = next(bench_run.train_iter)["tokens"]
    record["initial_loss"] = initial_losses(run.eval_step, run.state.params, run.state.router,
                                            model, tokens)
    log(f"initial cross-entropy: moejax {record['initial_loss'][MOEJAX]:.6f}, HF "
        f"{record['initial_loss'][HF]:.6f}")
    record["first_step_hf"] = hf_first_step(model, cfg, tokens)
    trainer = HFTrainer(model, cfg)
    systems = {MOEJAX: MoejaxSystem(bench_run), HF: HFSystem(trainer)}
    for system in systems.values():  # one untimed step each, on the same batch
        system.run(system.prepare([tokens]))
    log(f"{options.rounds} rounds of {options.block} steps each, order rotated per round:")
    timing = interleaved_blocks(systems, bench_run.train_iter, options.rounds, options.block,
                                log)
    record["timing"] = _summarise_timing(timing, options.block * run.tokens_per_step)
    log(f"profiling {options.profile_steps} steps of each ...")
    tokens = [next(bench_run.train_iter)["tokens"] for _ in range(options.profile_steps)]
    record["breakdown_moejax"] = moejax_breakdown(
        bench_run, hlo_text, systems[MOEJAX].prepare(tokens))
    record["breakdown_hf"] = hf_breakdown(trainer, cfg.num_dense_layers,
                                          systems[HF].prepare(tokens))
    record["load_end"] = bench.load_average()
    return record


def _without_hlo(first: dict) -> dict:
    first.pop("hlo_text", None)
    return first


def _summarise_timing(timing: dict, tokens_per_block: int) -> dict:
    seconds = timing["seconds"]
    tokens_per_s = {name: [tokens_per_block / s for s in values]
                    for name, values in seconds.items()}
    ratios = bench.round_ratios(seconds[HF], seconds[MOEJAX])  # HF time / moejax time
    return {"tokens_per_block": tokens_per_block, "seconds": seconds,
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_median": {n: statistics.median(v) for n, v in tokens_per_s.items()},
            "speedup": bench.per_round_summary(ratios), "order": timing["order"],
            "loss": timing["loss"]}


# ---------------------------------------------------------------------------------------------
# The report


def report(record: dict) -> str:
    """The record as markdown: environment, shapes, the same-model check, tokens/s per round,
    first steps, where the time goes, targets."""
    sections = [_header(record), _shapes_line(record), _loss_line(record),
                _timing_table(record), _first_step_table(record), _breakdown_table(record),
                _top_ops_table(record), "Targets:\n" + "\n".join(
                    f"- {line}" for line in targets(record))]
    return "\n\n".join(sections)


def _fmt_load(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _header(record: dict) -> str:
    env, opts = record["environment"], record["options"]
    impl = record["hf_implementations"]
    status = "PROVISIONAL (" + ", ".join(record.get("provisional", [])) + ")" \
        if record.get("provisional") else "final"
    return (f"# moejax vs HF DeepseekV3ForCausalLM, whole train step ({status})\n\n"
            f"{env['date']}, {env['host']}: {env['cores']} cores ({env['device']}), jax "
            f"{env['jax']}, torch {env['torch']} ({env['torch_threads']} threads, its default), "
            f"transformers {env['transformers']} (experts {impl['experts']}, attention "
            f"{impl['attention']}); load average {_fmt_load(record['load_start'])} at start, "
            f"{_fmt_load(record['load_end'])} at end; {opts['rounds']} rounds of "
            f"{opts['block']} steps per system, seed {opts['seed']}"
            + (", --quick" if opts["quick"] else "")
            + (f"; both systems under GLIBC_TUNABLES={env['glibc_tunables']}"
               if env.get("glibc_tunables") else "")
            + (f"; persistent compilation cache {env['jax_compilation_cache']}: first steps "
               "may be cache hits" if env["jax_compilation_cache"] else ""))


def _shapes_line(record: dict) -> str:
    s = record["shapes"]
    return (f"Model (configs/{PRESET}.yaml, {' '.join(MODEL_OVERRIDES)}): {s['layers']} layers "
            f"({s['dense_layers']} dense), d_model {s['d_model']}, {s['heads']} heads, MLA "
            f"(q rank {s['q_lora_rank']}, kv rank {s['kv_lora_rank']}, qk {s['qk_nope_head_dim']}"
            f"+{s['qk_rope_head_dim']}, v {s['v_head_dim']}), E {s['experts']} top-{s['top_k']} "
            f"(top-{s['topk_groups']} of {s['groups']} groups), {s['shared_experts']} shared, "
            f"expert F {s['expert_ffn_dim']}, dense F {s['ffn_dim']}, {s['dispatch']}, vocab "
            f"{s['vocab']}; batch {s['batch']} x {s['seq_len']} tokens, {s['compute_dtype']}; "
            f"{s['moejax_params']:,} parameters (moejax) / {s['hf_params']:,} (HF).")


def _loss_line(record: dict) -> str:
    loss = record["initial_loss"]
    verdict = "same model" if loss["same"] else "MISMATCH"
    return (f"Initial cross-entropy of one batch (before any step): moejax {loss[MOEJAX]:.6f}, "
            f"HF {loss[HF]:.6f}, |diff| {loss['abs_diff']:.2e} (tolerance "
            f"{loss['tolerance']:.0e}): {verdict}.")


def _timing_table(record: dict) -> str:
    t = record["timing"]
    lines = ["| round | order | moejax tok/s | HF tok/s | moejax / HF | CE after (moejax, HF) |",
             "|---|---|---|---|---|---|"]
    for r, order in enumerate(t["order"]):
        ratio = t["seconds"][HF][r] / t["seconds"][MOEJAX][r]
        lines.append(
            f"| {r + 1} | {' then '.join('moejax' if n == MOEJAX else 'HF' for n in order)} "
            f"| {t['tokens_per_s'][MOEJAX][r]:,.0f} | {t['tokens_per_s'][HF][r]:,.0f} "
            f"| {ratio:.2f}x | {t['loss'][MOEJAX][r]:.4f}, {t['loss'][HF][r]:.4f} |")
    s = t["speedup"]
    med = t["tokens_per_s_median"]
    lines.append(f"\nmoejax / HF tokens/s per round: {s['median']:.2f}x [{s['min']:.2f}-"
                 f"{s['max']:.2f}], n={s['n']}; median tokens/s moejax {med[MOEJAX]:,.0f}, "
                 f"HF {med[HF]:,.0f} ({t['tokens_per_block']:,} tokens per block)")
    return "\n".join(lines)


def _first_step_table(record: dict) -> str:
    lines = [("| first step | state init | trace + lower | compile | first run | first step "
              "(lower + compile + run) | eval-step compile | all of them |"),
             "|---|---|---|---|---|---|---|---|"]
    default = f"moejax configs/{DEFAULT_PRESET}.yaml (default preset)"
    rows = [(default, record["first_step_default"])]
    relaunch = record.get("first_step_default_relaunch")
    if relaunch:
        rows += [(f"{default}, new process, empty compilation cache", relaunch["cold"]),
                 (f"{default}, relaunched: compilation cache warm", relaunch["warm"])]
    rows.append((f"moejax configs/{PRESET}.yaml, MTP off", record["first_step_moejax"]))
    for label, f in rows:
        lines.append(f"| {label} | {f['init_state_s']:.2f} s | {f['trace_lower_s']:.2f} s | "
                     f"{f['compile_s']:.2f} s | {f['first_run_s']:.2f} s | "
                     f"**{f['first_step_s']:.2f} s** | {f['eval_compile_s']:.2f} s | "
                     f"{f['total_s']:.2f} s |")
    hf_first = record["first_step_hf"]["first_step_s"]
    lines.append(f"| HF DeepseekV3ForCausalLM | {record['hf_model_build_s']:.2f} s "
                 f"(from_pretrained) | - | - | - | **{hf_first:.2f} s** | - | "
                 f"{record['hf_model_build_s'] + hf_first:.2f} s |")
    lines.append(f"\n(The process's first jit call, XLA start-up, {record['backend_warmup_s']:.2f}"
                 " s, ran before and is in none of these.)")
    return "\n".join(lines)


def _breakdown_table(record: dict) -> str:
    ours, theirs = record["breakdown_moejax"], record["breakdown_hf"]
    lines = ["| where the time goes (ms per step) | moejax | share | HF | share | what |",
             "|---|---|---|---|---|---|"]

    def row(label, a, b, note=""):
        share = lambda x, wall: "-" if x is None else f"{100 * x / wall:.0f}%"
        cell = lambda x: "-" if x is None else f"{x:.1f}"
        lines.append(f"| {label} | {cell(a)} | {share(a, ours['wall_ms'])} | {cell(b)} | "
                     f"{share(b, theirs['wall_ms'])} | {note} |")

    for category in CATEGORIES:
        row(category, ours["ms"][category], theirs["ms"][category], CATEGORY_NOTES[category])
    row("host / runtime overhead", ours["host_overhead_ms"], None,
        "moejax: wall - time its ops kept the CPU busy (HF's is in its rows)")
    row("**wall**", ours["wall_ms"], theirs["wall_ms"],
        f"{ours['steps']} profiled steps each (jax.profiler; HF with module hooks)")
    timing = record["timing"]
    unprofiled = {name: statistics.median(seconds) / record["options"]["block"] * 1e3
                  for name, seconds in timing["seconds"].items()}
    row("wall, unprofiled", unprofiled[MOEJAX], unprofiled[HF],
        "median timed block / its steps: what the profiler and hooks add is the difference")
    return "\n".join(lines)


def _top_ops_table(record: dict) -> str:
    lines = ["| moejax op (XLA:CPU thunk) | opcode | category | ms per step |", "|---|---|---|---|"]
    for op in record["breakdown_moejax"]["top_ops"]:
        lines.append(f"| {op['name']} | {op['opcode']} | {op['category']} | {op['ms']:.1f} |")
    return "\n".join(lines)


def targets(record: dict) -> list[str]:
    s = record["timing"]["speedup"]
    first = record["first_step_default"]["first_step_s"]
    met = lambda ok: "met" if ok else "MISSED"
    speed = (f"moejax tokens/s over HF {s['median']:.2f}x [{s['min']:.2f}-{s['max']:.2f}] "
             f"(target >= {TARGET_SPEEDUP}x): {met(s['median'] >= TARGET_SPEEDUP)}")
    compile_ = (f"default preset's first step {first:.2f} s (target < "
                f"{TARGET_FIRST_STEP_S:.0f} s): {met(first < TARGET_FIRST_STEP_S)}")
    relaunch = record.get("first_step_default_relaunch")
    if relaunch:
        warm = relaunch["warm"]["first_step_s"]
        compile_ += (f"; relaunched with the trainer's compilation cache warm {warm:.2f} s "
                     f"(information: the target is the cold compile)")
    same = (f"same initial loss (|diff| <= {LOSS_TOLERANCE:.0e}): "
            f"{met(record['initial_loss']['same'])}")
    return [speed, compile_, same]
