"""The transformer: embedding, a stack of dense-FFN blocks, a stack of MoE blocks, output head.

Each stack's blocks share one set of stacked parameters (leading `layers` axis) and run under
`jax.lax.scan`, optionally rematerialised. `forward` is a pure function of the parameters, the
tokens and the router state (passed, or carried by imported parameters); auxiliary outputs are
returned, never hidden in collections.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import PartitionSpec

from moejax import params as P
from moejax.config import Config, unevenly_staged
from moejax.model import cpu_kernels, cpu_matmul, pipeline
from moejax.model.attention import (
    Attention,
    LatentAttention,
    attention_specs,
    cache_entry_shapes,
    causal_attention,
)
from moejax.model.layers import FFN, ffn_specs, layer_matmuls, rms_norm, swiglu
from moejax.model.moe import MoE, moe_ffn, moe_specs
from moejax.model.router import merge_microbatches
from moejax.sharding import constrain, gathered_over_pipe, stage_spec

ACTIVATION_AXES = ("act_batch", "act_seq", "act_embed")
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@struct.dataclass
class RouterState:
    """Router state that is not trained by gradients."""

    bias: jax.Array  # [L_moe + D_mtp, E] float32 selection bias (aux-loss-free balancing)
    temperature: jax.Array  # [] float32, softmax_topk temperature


@struct.dataclass
class Block:
    attn_norm: jax.Array  # [D]
    attn: Attention | LatentAttention
    ffn_norm: jax.Array  # [D]
    ffn: FFN | MoE


@struct.dataclass
class MTPModule:
    """One multi-token-prediction depth (leaves stacked [D_mtp, ...]): the next token's embedding
    and the previous depth's hidden state, each RMSNorm-ed, concatenated (embedding first, as
    in the released DeepSeek-V3 weights), projected [2D, D], then one block and a final norm
    before the shared output head."""

    embed_norm: jax.Array  # [D]
    hidden_norm: jax.Array  # [D]
    proj: jax.Array  # [2D, D]
    block: Block
    final_norm: jax.Array  # [D]


@struct.dataclass
class Transformer:
    embed: jax.Array  # [V, D]
    dense_blocks: Block | None  # leaves stacked [L_dense, ...]
    moe_blocks: Block | None  # leaves stacked [L_moe, ...]
    final_norm: jax.Array  # [D]
    lm_head: jax.Array  # [D, V]
    mtp: MTPModule | None = None  # leaves stacked [D_mtp, ...]; after the others, so that
    # adding it keeps their initial values (init keys are split per leaf in tree order)

    # The router state of an imported checkpoint (moejax.convert), so that its correction bias
    # reaches every forward pass without the caller passing it; None for initialised parameters,
    # where it has no leaves (training keeps its state in TrainState.router instead).
    router_state: RouterState | None = None


@struct.dataclass
class KVCache:
    """Generation cache: per stack the two arrays of `attention.cache_entry_shapes`, stacked
    [L, B, S, ...] (S = the longest sequence the cache can hold)."""

    dense: tuple[jax.Array, jax.Array] | None
    moe: tuple[jax.Array, jax.Array] | None


def model_specs(cfg: Config) -> Transformer:
    m = cfg.model
    norm = P.ParamSpec((m.d_model,), ("embed",), P.ones_init)
    init = P.normal_init(m.init_std)

    def block(ffn):
        return Block(attn_norm=norm, attn=attention_specs(m), ffn_norm=norm, ffn=ffn)

    def stack(tree, num_layers, axis="layers"):
        if num_layers == 0:
            return None
        return jax.tree.map(lambda s: P.stacked(s, num_layers, axis), tree, is_leaf=P.is_spec)

    dense_ffn = ffn_specs(m.d_model, m.ffn_dim, m.init_std)
    moe_ffn_spec = moe_specs(cfg) if cfg.num_moe_layers else None
    # the pipelined stack's layer axis: split over `pipe` only when every stage has as many layers
    staged = "uneven_layers" if unevenly_staged(cfg) else "layers"
    mtp = MTPModule(embed_norm=norm, hidden_norm=norm,
                    proj=P.ParamSpec((2 * m.d_model, m.d_model), (None, "embed"), init),
                    block=block(moe_ffn_spec or dense_ffn), final_norm=norm)
    return Transformer(
        embed=P.ParamSpec((m.vocab_size, m.d_model), ("vocab", "embed"), init),
        dense_blocks=stack(block(dense_ffn), cfg.num_dense_layers,
                           "dense_layers" if cfg.num_moe_layers else staged),
        moe_blocks=stack(block(moe_ffn_spec), cfg.num_moe_layers, staged),
        final_norm=norm,
        lm_head=P.ParamSpec((m.d_model, m.vocab_size), ("embed", "vocab"), init),
        mtp=stack(mtp, m.mtp_depth, "mtp_layers"),
    )


def param_specs(cfg: Config) -> Transformer:
    """The model's declarations in `precision.param_dtype` (the master weights' dtype)."""
    return jax.tree.map(
        lambda s: P.ParamSpec(s.shape, s.logical_axes, s.init, cfg.precision.param_dtype),
        model_specs(cfg), is_leaf=P.is_spec,
    )


def init_params(cfg: Config, key: jax.Array, mesh=None) -> Transformer:
    """Parameters in `precision.param_dtype`, created sharded when a mesh is given."""
    return P.init(param_specs(cfg), key, mesh)


def initial_params(cfg: Config, key: jax.Array) -> Transformer:
    """The values `init_params` creates, as a traceable function (for a larger jitted init)."""
    return P.initial_values(param_specs(cfg), key)


def num_router_layers(cfg: Config) -> int:
    """MoE layers with a router: the MoE stack, then one per MTP depth (when the model has MoE)."""
    return cfg.num_moe_layers + (cfg.model.mtp_depth if cfg.num_moe_layers else 0)


def init_router_state(cfg: Config) -> RouterState:
    # a dense model keeps one unused bias row: checkpoints (orbax) cannot store zero-size arrays
    rows = max(num_router_layers(cfg), 1)
    return RouterState(
        bias=jnp.zeros((rows, max(cfg.moe.num_experts, 1)), jnp.float32),
        temperature=jnp.asarray(cfg.moe.temperature, jnp.float32),
    )


def effective_router_state(params: Transformer, cfg: Config, router_state=None) -> RouterState:
    """The router state a pass uses: `router_state` when given, else the one `params` carry
    (gradient-stopped: state, never trained), else init_router_state(cfg)."""
    if router_state is not None:
        return router_state
    if params.router_state is not None:
        return jax.lax.stop_gradient(params.router_state)
    return init_router_state(cfg)


def init_cache(cfg: Config, batch_size: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """An empty generation cache for `batch_size` sequences of up to `max_len` tokens."""
    shapes = cache_entry_shapes(cfg.model)

    def stack(num_layers):
        if num_layers == 0:
            return None
        return tuple(jnp.zeros((num_layers, batch_size, max_len, *s), dtype) for s in shapes)

    return KVCache(dense=stack(cfg.num_dense_layers), moe=stack(cfg.num_moe_layers))


def _run_stack(blocks: Block, x, per_layer, layer_fn, cfg: Config, in_pipeline: bool = False):
    """Scan `layer_fn(block, x, per_layer_input) -> (x, outputs)` over the stacked blocks,
    unrolled (straight-line code) when the stack has at most model.unroll_layers layers and is
    not a pipeline stage's block (whose program the planner's figures describe)."""
    body = lambda carry, inputs: layer_fn(inputs[0], carry, inputs[1])
    if cfg.model.remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[cfg.model.remat])
    layers = jax.tree.leaves(blocks)[0].shape[0]
    unroll = not in_pipeline and layers <= cfg.model.unroll_layers
    return jax.lax.scan(body, x, (blocks, per_layer), unroll=unroll)


def _run_staged_stack(blocks: Block, x, per_layer, layer_fn, cfg: Config, cached: bool,
                      schedule: pipeline.Schedule | None = None,
                      tail: pipeline.Tail | None = None):
    """The pipelined stack: over the pipeline stages when the mesh has more than one (outputs
    then come per microbatch, [L, m, ...]), else `_run_stack`. Generation (with a cache) always
    runs the plain scan. `schedule` defaults to the config's on the current mesh."""
    schedule = schedule or pipeline.schedule_for(cfg)
    if cached or schedule.stages == 1:
        return _run_stack(blocks, x, per_layer, layer_fn, cfg)

    def layer_or_padding(block, x_, inputs):
        active, layer_inputs = inputs  # active [] bool: False in a shorter stage's padding slot
        y, outputs = layer_fn(block, x_, layer_inputs)
        return jnp.where(active, y, x_), outputs

    run_block = lambda block, x_, inputs: _run_stack(block, x_, inputs, layer_or_padding, cfg,
                                                     in_pipeline=True)
    specs = model_specs(cfg)
    stack_specs = specs.moe_blocks if cfg.num_moe_layers else specs.dense_blocks
    stack_specs = jax.tree.map(lambda s: stage_spec(s.logical_axes, s.shape), stack_specs,
                               is_leaf=P.is_spec)
    if tail is not None and tail.loss is not None:  # 1f1b: returns the loss in place of x
        return pipeline.one_f_one_b(blocks, stack_specs, x, per_layer, run_block,
                                    layer_or_padding,
                                    functools.partial(_block_router_loss, cfg=cfg), schedule,
                                    tail)
    return pipeline.pipelined_stack(blocks, stack_specs, x, per_layer, run_block, schedule, tail)


def _block_router_loss(outputs, cfg: Config) -> jax.Array:
    """A stack block's per-layer router losses [c], weighted (1f1b: see _router_loss)."""
    if outputs is None:  # a dense stack: no router
        return jnp.zeros((), jnp.float32)
    return _router_loss(outputs[0], cfg)


def _router_loss(stats, cfg: Config) -> jax.Array:
    """The weighted router losses of each layer [L] from its statistics (leaves [L, ...])
    without the switch loss, whose batch value is not a mean of per-microbatch ones."""
    e = cfg.moe
    return _weighted_sum([(e.seq_balance_loss_coef, stats["seq_balance_loss"]),
                          (e.z_loss_coef, stats["z_loss"])])


def _weighted_sum(terms) -> jax.Array:
    """sum of coefficient x value over (coefficient, value) pairs, a term with coefficient 0
    left out: nothing is then differentiated through it (its [tokens, E] router statistics'
    backward, and on CPU the router's dense product's, cost as much as its forward); zeros of
    the values' shape when every coefficient is 0."""
    total = sum(coef * value for coef, value in terms if coef)
    return jnp.zeros_like(terms[0][1]) if isinstance(total, int) else total


def _whole_over_pipe(weights, specs, layer_of_stack: bool = False):
    """Weights (declared by `specs`) gathered over `pipe` where they are used outside the
    pipeline (sharding.gathered_over_pipe); unchanged without a pipeline."""
    return jax.tree.map(
        lambda spec, w: gathered_over_pipe(w, spec.logical_axes, spec.shape, layer_of_stack),
        specs, weights, is_leaf=P.is_spec)


def _gathered(attn: Attention | LatentAttention) -> Attention | LatentAttention:
    """MLA's head-split up-projections (logical axis `mla_heads`) gathered whole before use,
    as fsdp weights are: the activations are split by rows over the same mesh axes."""
    if not isinstance(attn, LatentAttention):
        return attn
    whole = lambda w: None if w is None else constrain(w, (None,) * w.ndim)
    return attn.replace(wq_b=whole(attn.wq_b), wkv_b=whole(attn.wkv_b))


class _Layers:
    """The layer functions of one forward pass (positions, precision and router state fixed)."""

    def __init__(self, cfg: Config, positions: jax.Array, router_state: RouterState):
        self.cfg, self.positions, self.router_state = cfg, positions, router_state
        self.matmuls = layer_matmuls(cfg.precision)

    def attention(self, block: Block, x, cache=None):
        """Pre-norm attention with residual -> (x, normed x for the FFN, cache entries)."""
        m = self.cfg.model
        h = rms_norm(x, block.attn_norm, m.norm_eps)
        out, entries = causal_attention(_gathered(block.attn), h, self.positions, m,
                                        self.matmuls["attention"], cache)
        x = constrain(x + out.astype(x.dtype), ACTIVATION_AXES)
        return x, rms_norm(x, block.ffn_norm, m.norm_eps), entries

    def dense(self, block: Block, x, cache=None):
        x, h, entries = self.attention(block, x, cache)
        y = swiglu(block.ffn, h, self.matmuls["dense_ffn"]).astype(x.dtype)
        return constrain(x + y, ACTIVATION_AXES), None, entries

    def moe(self, block: Block, x, bias, cache=None):
        x, h, entries = self.attention(block, x, cache)
        y, stats = moe_ffn(block.ffn, h, bias, self.router_state.temperature, self.cfg,
                           self.matmuls)
        return constrain(x + y, ACTIVATION_AXES), stats, entries


def moe_stack(blocks: Block, x, cfg: Config, router_state: RouterState,
              schedule: pipeline.Schedule | None = None, tail: pipeline.Tail | None = None):
    """The MoE block stack alone, as the forward pass runs it (pipelined over the mesh's stages
    by `schedule`, default the config's): x [B, T, D] -> (y, per-layer MoE statistics; with a
    pipeline [L, m, ...] per microbatch), and the tail's outputs with a `tail`; with a tail
    that has a loss (1f1b), the loss in place of y. For measuring a schedule without the rest
    of the model."""
    layers = _Layers(cfg, jnp.arange(x.shape[1]), router_state)

    def moe_layer(block, x_, inputs):
        x_, stats, _ = layers.moe(block, x_, inputs[0])
        return x_, (stats, None)

    bias = router_state.bias[:cfg.num_moe_layers]
    schedule = schedule or pipeline.schedule_for(cfg)
    if tail is not None and tail.loss is not None and schedule.stages > 1:
        x = pipeline.over_stages(x, schedule.microbatches, schedule.stages)  # 1f1b's layout
    y, (stats, _), *tail_outputs = _run_staged_stack(
        blocks, x, (bias, None), moe_layer, cfg, cached=False, schedule=schedule, tail=tail)
    return (y, stats, *tail_outputs)


def _decoder(params: Transformer, tokens, positions, cfg: Config, router_state, cache=None,
             tail: pipeline.Tail | None = None):
    """tokens [B, T] at positions [T] -> (hidden [B, T, D] before the final norm, per-layer MoE
    statistics or None, updated cache or None, the pipeline `tail`'s outputs or None). With a
    tail that has a loss (the 1f1b schedule), the first is the loss (pipeline.one_f_one_b)."""
    layers = _Layers(cfg, positions, effective_router_state(params, cfg, router_state))
    cached = cache is not None

    specs = model_specs(cfg)

    def dense_layer(block, x, layer_cache):
        if params.moe_blocks is not None:  # the first-k dense layers, outside the pipeline
            block = _whole_over_pipe(block, specs.dense_blocks, layer_of_stack=True)
        x, _, entries = layers.dense(block, x, layer_cache)
        return x, entries if cached else None

    def moe_layer(block, x, inputs):
        bias, layer_cache = inputs
        x, stats, entries = layers.moe(block, x, bias, layer_cache)
        return x, (stats, entries if cached else None)

    embed = _whole_over_pipe(params.embed, specs.embed)
    staged = not cached and pipeline.pipe_stages() > 1
    dense_then_moe = params.dense_blocks is not None and params.moe_blocks is not None
    one_f_one_b = staged and tail is not None and tail.loss is not None
    if staged and (dense_then_moe or one_f_one_b):
        # the stream split over the stages by microbatch (pipeline.over_stages): no stage
        # embeds, runs the dense layers on, or holds the whole batch shard's stream
        m = cfg.train.microbatches
        x = embed[pipeline.over_stages(tokens, m, pipeline.pipe_stages())].astype(
            cfg.precision.residual_dtype)
    else:
        x = constrain(embed[tokens].astype(cfg.precision.residual_dtype), ACTIVATION_AXES)
    new_cache = {"dense": None, "moe": None}
    if staged and dense_then_moe:
        # one microbatch at a time rather than on the device's whole batch shard: their
        # backward's working set was 713 of the 785 GB of temporaries of the 671B PP16 plan
        x = pipeline.microbatched(
            lambda blocks, x_: _run_stack(blocks, x_, None, dense_layer, cfg, True)[0], x,
            params.dense_blocks)
        if not one_f_one_b:  # GPipe takes the whole stream
            x = pipeline.from_stages(x, m)
    elif params.dense_blocks is not None:
        run = _run_stack if params.moe_blocks is not None else functools.partial(
            _run_staged_stack, cached=cached)
        dense_tail = tail if params.moe_blocks is None else None
        x, new_cache["dense"], *tail_outputs = run(
            params.dense_blocks, x, cache.dense if cached else None, dense_layer, cfg,
            **({"tail": dense_tail} if dense_tail else {}))
    layer_stats = None
    if params.moe_blocks is not None:
        bias = layers.router_state.bias[:cfg.num_moe_layers]
        x, (layer_stats, new_cache["moe"]), *tail_outputs = _run_staged_stack(
            params.moe_blocks, x, (bias, cache.moe if cached else None), moe_layer, cfg, cached,
            tail=tail)
        if not cached and pipeline.pipe_stages() > 1:
            layer_stats = merge_microbatches(layer_stats)
    return (x, layer_stats, KVCache(**new_cache) if cached else None,
            tail_outputs[0] if tail is not None else None)


def output_logits(params: Transformer, hidden: jax.Array, final_norm: jax.Array,
                  cfg: Config) -> jax.Array:
    """hidden [B, T, D] -> logits [B, T, V] float32 through the (shared) output head."""
    dtype = jnp.dtype(cfg.precision.compute_dtype)
    x = rms_norm(hidden, final_norm, cfg.model.norm_eps).astype(dtype)
    if cpu_kernels.runs_here(dtype):  # CPU, float32: BLAS (cpu_matmul.py says why)
        return cpu_matmul.matmul(x, params.lm_head.astype(dtype))
    return jnp.einsum("btd,dv->btv", x, params.lm_head.astype(dtype),
                      preferred_element_type=jnp.float32)


def _embedded(table, tokens, vocab_axis: str | None):
    """table[tokens] for tokens [...]; with `vocab_axis` (inside a shard_map) table is this
    device's rows of a table split over that axis by vocabulary: each device looks up the
    tokens in its rows and one psum joins them."""
    if vocab_axis is None:
        return table[tokens]
    rows = table.shape[0]
    local = tokens - jax.lax.axis_index(vocab_axis) * rows
    inside = (local >= 0) & (local < rows)
    found = jnp.where(inside[..., None], table[jnp.clip(local, 0, rows - 1)], 0)
    return jax.lax.psum(found, vocab_axis)


def _cross_entropy(logits, targets, vocab_axis: str | None):
    """Mean next-token cross-entropy of logits [..., V] float32 and targets [...]; with
    `vocab_axis` the logits are this device's slice [..., V / n] of a vocabulary split over
    that axis (the log-sum-exp and the target's logit are joined by psum, the max by pmax)."""
    if vocab_axis is None:
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))
    width = logits.shape[-1]
    local = targets - jax.lax.axis_index(vocab_axis) * width
    inside = (local >= 0) & (local < width)
    top = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(logits, axis=-1)), vocab_axis)
    total = jax.lax.psum(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1), vocab_axis)
    picked = jnp.take_along_axis(logits, jnp.clip(local, 0, width - 1)[..., None], -1)[..., 0]
    target_logit = jax.lax.psum(jnp.where(inside, picked, 0.0), vocab_axis)
    return jnp.mean(jnp.log(total) + top - target_logit)


def forward(params: Transformer, tokens: jax.Array, cfg: Config, router_state=None):
    """tokens [B, T] int -> (logits [B, T, V] float32, aux dict of MoE statistics).
    `router_state` defaults to the one `params` carry, else the initial one
    (effective_router_state)."""
    positions = jnp.arange(tokens.shape[1])
    hidden, layer_stats, _, _ = _decoder(params, tokens, positions, cfg, router_state)
    return output_logits(params, hidden, params.final_norm, cfg), _aux_outputs(layer_stats, cfg)


def forward_cached(params: Transformer, tokens: jax.Array, start: jax.Array, cache: KVCache,
                   cfg: Config, router_state=None, return_hidden: bool = False):
    """Generation: tokens [B, T] at positions start .. start + T - 1, attending to everything
    in `cache` before them -> (logits [B, T, V] float32, the cache with these tokens added),
    and with `return_hidden` also the last layer's hidden states [B, T, D] before the final
    norm (what MTP depth 1 reads, see `mtp_cached`).
    start + T must not exceed the cache length: a traced `start` cannot be checked here, and a
    write past the end would be clamped onto the last slots (moejax.generate checks it).
    `router_state` defaults as in `forward`."""
    positions = start + jnp.arange(tokens.shape[1])
    hidden, _, cache, _ = _decoder(params, tokens, positions, cfg, router_state, cache)
    logits = output_logits(params, hidden, params.final_norm, cfg)
    return (logits, cache, hidden) if return_hidden else (logits, cache)


def _mtp_losses(params: Transformer, hidden, tokens, cfg: Config, router_state,
                vocab_axis: str | None = None):
    """Cross-entropy of each MTP depth k = 1..D and its MoE statistics.

    Depth k sees positions i < T - k: the previous depth's hidden state at i and the embedding
    of token i + k, and predicts token i + k + 1 (tokens [B, T + 1] holds inputs and targets).
    `vocab_axis`: embedding and head split by vocabulary over it (`_head_losses`)."""
    seq = tokens.shape[1] - 1
    losses, stats = [], []
    for depth in range(1, cfg.model.mtp_depth + 1):
        length = seq - depth
        layers = _Layers(cfg, jnp.arange(length), router_state)
        hidden, layer_stats, _ = _mtp_block(params, depth, hidden[:, :length],
                                            tokens[:, depth:depth + length], layers,
                                            vocab_axis=vocab_axis)
        if layer_stats is not None:
            stats.append(layer_stats)
        logits = output_logits(params, hidden, params.mtp.final_norm[depth - 1], cfg)
        targets = tokens[:, depth + 1:depth + 1 + length]
        losses.append(_cross_entropy(logits, targets, vocab_axis))
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *stats) if stats else None
    return losses, stacked


def _mtp_block(params: Transformer, depth, hidden, next_tokens, layers: _Layers,
               cache=None, vocab_axis: str | None = None):
    """MTP depth `depth` (1-based, an int or traced) at the positions of `layers`: the
    previous depth's hidden [B, T, D] and the tokens `depth` places ahead [B, T] -> (hidden
    [B, T, D] before the depth's final norm, MoE statistics or None, cache entries)."""
    cfg = layers.cfg
    m = cfg.model
    module = jax.tree.map(lambda leaf: leaf[depth - 1], params.mtp)
    # constrained like the decoder's embedding: left to itself GSPMD keeps the lookup's
    # model-width sharding and all-gathers the whole global batch onto every device
    residual = cfg.precision.residual_dtype
    next_embed = constrain(_embedded(params.embed, next_tokens, vocab_axis).astype(residual),
                           ACTIVATION_AXES)
    joined = jnp.concatenate([rms_norm(next_embed, module.embed_norm, m.norm_eps),
                              rms_norm(hidden.astype(residual), module.hidden_norm, m.norm_eps)],
                             axis=-1)
    dtype = jnp.dtype(cfg.precision.compute_dtype)  # a small GEMM: no fp8, like the head
    x = constrain(jnp.matmul(joined.astype(dtype), module.proj.astype(dtype),
                             preferred_element_type=jnp.float32).astype(residual),
                  ACTIVATION_AXES)
    if cfg.num_moe_layers:
        bias = layers.router_state.bias[cfg.num_moe_layers + depth - 1]
        return layers.moe(module.block, x, bias, cache)
    return layers.dense(module.block, x, cache)


def mtp_cached(params: Transformer, depth, hidden: jax.Array, next_tokens: jax.Array,
               start: jax.Array, cache: tuple[jax.Array, jax.Array], cfg: Config,
               router_state=None):
    """Speculative drafting: MTP depth `depth` (1-based, may be traced) at positions start ..
    start + T - 1 with its own generation cache (two arrays [B, S, ...] as
    `attention.cache_entry_shapes`). hidden [B, T, D]: the previous depth's hidden states at
    those positions (depth 1: the main model's, forward_cached(return_hidden=True));
    next_tokens [B, T]: the tokens `depth` places ahead of each position. -> (logits [B, T, V]
    float32 for the tokens depth + 1 places ahead, hidden [B, T, D] for the next depth, the
    cache with these positions written). The same function as the training-time MTP pass."""
    positions = start + jnp.arange(hidden.shape[1])
    layers = _Layers(cfg, positions, effective_router_state(params, cfg, router_state))
    hidden, _, cache = _mtp_block(params, depth, hidden, next_tokens, layers, cache)
    return output_logits(params, hidden, params.mtp.final_norm[depth - 1], cfg), hidden, cache


def _aux_outputs(layer_stats, cfg: Config) -> dict:
    """Per-layer statistics -> the aux dict: losses summed over MoE layers, loads per layer."""
    e = cfg.moe
    if layer_stats is None:
        zero = jnp.zeros((), jnp.float32)
        return {"switch_loss": zero, "seq_balance_loss": zero, "z_loss": zero,
                "aux_loss": zero, "dropped_fraction": zero,
                "expert_counts": jnp.zeros((0, max(e.num_experts, 1)), jnp.float32)}
    aux = {name: jnp.sum(layer_stats[name]) for name in ("switch_loss", "seq_balance_loss", "z_loss")}
    aux["aux_loss"] = _weighted_sum([(e.switch_loss_coef, aux["switch_loss"]),
                                     (1.0, jnp.sum(_router_loss(layer_stats, cfg)))])
    aux["dropped_fraction"] = jnp.mean(layer_stats["dropped_fraction"])
    aux["expert_counts"] = layer_stats["expert_counts"]  # [L_moe, E]
    # dropless dispatch, per layer [L_moe]
    for name in ("padding_overhead", "exchange_fill", "overflow_rounds",
                 "overflow_passes"):
        if name in layer_stats:
            aux[name] = layer_stats[name]
    return aux


def _head_losses(params: Transformer, hidden, tokens, cfg: Config, router_state,
                 vocab_axis: str | None = None) -> dict:
    """hidden [B, T, D] (before the final norm), tokens [B, T + 1] -> {"cross_entropy": mean
    next-token cross-entropy, and with MTP "mtp_cross_entropy" [D] and (MoE models)
    "mtp_stats", the MTP layers' statistics with leaves [D, ...]}. `vocab_axis` (inside a
    shard_map): params.lm_head [D, V / n] and params.embed [V / n, D] are this device's
    vocabulary slices of tables split over that axis; the losses are joined over it."""
    logits = output_logits(params, hidden, params.final_norm, cfg)
    out = {"cross_entropy": _cross_entropy(logits, tokens[:, 1:], vocab_axis)}
    if cfg.model.mtp_depth:
        losses, stats = _mtp_losses(params, hidden, tokens, cfg, router_state, vocab_axis)
        out["mtp_cross_entropy"] = jnp.stack(losses)
        if stats is not None:
            out["mtp_stats"] = stats
    return out


def _loss_tail(params: Transformer, tokens, cfg: Config, router_state,
               mtp_weight=None) -> pipeline.Tail:
    """_head_losses as the pipeline's tail: run per microbatch and batch shard on the stages
    (inside its shard_map: the routed experts of the MTP layer stay split over `expert`), so
    no stage computes the whole batch's logits. With `mtp_weight` (the 1f1b schedule) it also
    gives the tail's loss of one microbatch shard, and when the stages divide the vocabulary
    the embedding and output head stay split over `pipe` by vocabulary: every stage runs the
    tail on its slice (pipeline.Tail.vocab_axis), so none holds, or accumulates the gradient
    of, a whole [V, D] table. Every other weight enters whole."""
    head = params.replace(dense_blocks=None, moe_blocks=None, router_state=None)
    one_f_one_b = mtp_weight is not None
    vocab_axis = "pipe" if one_f_one_b and cfg.model.vocab_size % pipeline.pipe_stages() == 0 \
        else None
    axis_of = {"experts": "expert", "vocab": vocab_axis}
    manual = lambda s: PartitionSpec(*(axis_of.get(n) for n in s.logical_axes))
    head_specs = jax.tree.map(manual, model_specs(cfg).replace(dense_blocks=None, moe_blocks=None),
                              is_leaf=P.is_spec)

    def per_microbatch(weights, hidden, tokens_):
        head_, router_state_ = weights
        return _head_losses(head_, hidden, tokens_, cfg, router_state_, vocab_axis)

    def tail_loss(outputs, weight):
        mtp_stats = outputs.get("mtp_stats")
        mtp_router = jnp.sum(_router_loss(mtp_stats, cfg)) if mtp_stats is not None else 0.0
        return _total_loss(outputs["cross_entropy"], 0.0, outputs.get("mtp_cross_entropy"),
                           mtp_router, weight, cfg)

    return pipeline.Tail(fn=per_microbatch, weights=(head, router_state),
                         weight_specs=(head_specs, PartitionSpec()), rows=tokens,
                         loss=tail_loss if one_f_one_b else None,
                         loss_inputs=jnp.asarray(mtp_weight, jnp.float32) if one_f_one_b else None,
                         vocab_axis=vocab_axis)


def _total_loss(cross_entropy, router_loss, mtp_cross_entropy, mtp_router_loss, mtp_weight,
                cfg: Config):
    """cross-entropy + router losses + (lambda / D) sum_k (CE_k + the MTP router losses)."""
    loss = cross_entropy + router_loss
    if cfg.model.mtp_depth:
        mtp_total = jnp.sum(mtp_cross_entropy) + mtp_router_loss
        loss = loss + mtp_weight / cfg.model.mtp_depth * mtp_total
    return loss


def loss_fn(params: Transformer, batch: dict, cfg: Config, router_state=None,
            mtp_weight=None):
    """Next-token cross-entropy plus the weighted router losses, plus (with model.mtp_depth = D)
    the multi-token-prediction loss (lambda / D) * sum_k (CE_k + router losses_k).

    batch["tokens"] is [B, T + 1]: inputs are tokens[:, :-1], targets tokens[:, 1:].
    `mtp_weight` is lambda (default train.mtp_loss_weight; the train step passes the scheduled
    value). Returns (loss, metrics) with every loss term reported separately; the MTP modules'
    expert counts follow the main model's in metrics["expert_counts"] [L_moe + D, E].
    `router_state` defaults as in `forward`.
    """
    tokens = batch["tokens"]
    router_state = effective_router_state(params, cfg, router_state)
    positions = jnp.arange(tokens.shape[1] - 1)
    mtp_weight = cfg.train.mtp_loss_weight if mtp_weight is None else mtp_weight
    pipelined = pipeline.pipe_stages() > 1
    one_f_one_b = pipelined and cfg.train.pipeline_schedule == "1f1b"
    # pipelined: the head and MTP run per microbatch, split over the stages (_loss_tail)
    tail = _loss_tail(params, tokens, cfg, router_state,
                      mtp_weight if one_f_one_b else None) if pipelined else None
    hidden, layer_stats, _, tail_outputs = _decoder(params, tokens[:, :-1], positions, cfg,
                                                    router_state, tail=tail)
    if tail_outputs is None:
        tail_outputs = _head_losses(params, hidden, tokens, cfg, router_state)
    else:  # per microbatch and shard (equal rows each): average them
        tail_outputs = {name: jnp.mean(value, axis=0) if name != "mtp_stats" else
                        merge_microbatches(jax.tree.map(lambda v: jnp.moveaxis(v, 0, 1), value))
                        for name, value in tail_outputs.items()}
    aux = _aux_outputs(layer_stats, cfg)
    cross_entropy = tail_outputs["cross_entropy"]
    metrics = {"cross_entropy": cross_entropy, **aux}
    mtp_aux_loss = 0.0
    if cfg.model.mtp_depth:
        mtp_stats = tail_outputs.get("mtp_stats")
        if mtp_stats is not None:
            mtp_aux = _aux_outputs(mtp_stats, cfg)
            mtp_aux_loss = metrics["mtp_aux_loss"] = mtp_aux["aux_loss"]
            metrics["expert_counts"] = jnp.concatenate(
                [aux["expert_counts"], mtp_aux["expert_counts"]])
        metrics.update({f"mtp_cross_entropy_{k}": ce for k, ce in
                        enumerate(tail_outputs["mtp_cross_entropy"], start=1)})
        metrics["mtp_loss_weight"] = jnp.asarray(mtp_weight, jnp.float32)
    if one_f_one_b:  # the pipeline computed the loss and its gradients (pipeline.one_f_one_b)
        return hidden, metrics
    return _total_loss(cross_entropy, aux["aux_loss"], tail_outputs.get("mtp_cross_entropy"),
                       mtp_aux_loss, mtp_weight, cfg), metrics


def count_params(cfg: Config) -> dict[str, int]:
    """Total and active (per token) parameter counts, from the declarations alone.

    Active counts k of the E routed experts of each MoE layer, and everything else in full.
    `total` and `active` are the main model's; the MTP modules (which share the embedding and
    the output head) are counted apart as `mtp` and `mtp_active`.
    """
    specs = model_specs(cfg)
    mtp = P.count(specs.mtp) if specs.mtp is not None else 0
    total = P.count(specs) - mtp
    inactive_fraction = 1 - cfg.moe.top_k / max(cfg.moe.num_experts, 1)

    def routed(moe) -> int:
        return moe.w_gate.size + moe.w_up.size + moe.w_down.size

    main_routed = routed(specs.moe_blocks.ffn) if specs.moe_blocks is not None else 0
    mtp_routed = routed(specs.mtp.block.ffn) if mtp and cfg.num_moe_layers else 0
    return {"total": total, "active": total - round(main_routed * inactive_fraction),
            "routed_experts": main_routed, "embedding": specs.embed.size,
            "lm_head": specs.lm_head.size, "mtp": mtp,
            "mtp_active": mtp - round(mtp_routed * inactive_fraction)}
