"""Generation with a KV cache: one prefill over the prompt, then one token per decode step.

The cache is the model's own (`init_cache` / `forward_cached`): rotated keys and values for GQA,
the compressed latent and the shared RoPE key for MLA, which decodes in the absorbed form and
never expands the cache. Prefill and the decode loop are each one jitted function; the decode
loop is a `lax.scan` carrying the cache. Temperature and top-p are traced values, so changing
them never recompiles. Generation reads only the model, MoE and precision sections of a config
and is always dropless (a capacity factor would drop tokens of a one-token decode step).

Speculative decoding (`generate(..., speculative="mtp")`, `speculative_generate`) drafts with
the model's multi-token-prediction modules and verifies the drafts with one forward of the main
model per step; its decode loop is one jitted `lax.while_loop` (see the section below and
docs/generate.md).

Checkpoints load from a training run directory (its latest orbax checkpoint, or one step
directory under checkpoints/), a native moejax checkpoint (moejax.convert.save_moejax) or a
Hugging Face checkpoint directory (config.json).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from moejax import params as P
from moejax.config import Config, load_config
from moejax.model.attention import cache_entry_shapes
from moejax.model.transformer import (
    KVCache,
    effective_router_state,
    forward_cached,
    init_cache,
    init_router_state,
    mtp_cached,
)

BYTE_VOCAB = 256  # the default byte-level tokenizer: token id = byte value


class GenerationError(ValueError):
    """A generation request or checkpoint that cannot work; the message says what to change."""


def generation_config(cfg: Config) -> Config:
    """`cfg` as generation uses it: the dropless dispatch (the dense oracle stays dense), and
    the mesh, train and data sections at their defaults (generation does not read them), so
    that configs that differ only there share compiled functions."""
    dispatch = "dense" if cfg.moe.dispatch == "dense" else "dropless"
    moe = dataclasses.replace(cfg.moe, dispatch=dispatch, capacity_factor=None)
    precision = cfg.precision
    if "experts" in precision.fp8_layer_groups or precision.fp8_dispatch:
        # the dropless dispatch runs its experts in the compute dtype
        groups = ",".join(g for g in precision.fp8_layer_groups if g != "experts")
        precision = dataclasses.replace(precision, fp8_layers=groups, fp8_dispatch=False)
    return Config(model=cfg.model, moe=moe, precision=precision)


def top_p_filter(logits: jax.Array, top_p) -> jax.Array:
    """logits [..., V] with every token outside the nucleus set to -inf.

    The nucleus is the smallest set of most likely tokens whose probability reaches top_p (the
    most likely token is always in it; tokens tied with its least likely member join it).
    top_p >= 1 keeps every token exactly, whatever the rounding of the running sum, and skips
    the sort."""
    return jax.lax.cond(jnp.asarray(top_p) >= 1.0, lambda: logits,
                        lambda: _nucleus(logits, top_p))


def _nucleus(logits: jax.Array, top_p) -> jax.Array:
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    descending = -jnp.sort(-probs, axis=-1)
    mass_before = jnp.cumsum(descending, axis=-1) - descending  # of the more likely tokens
    in_nucleus = (mass_before < top_p) | (top_p >= 1.0)
    threshold = jnp.min(jnp.where(in_nucleus, descending, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(probs >= threshold, logits, -jnp.inf)


def sample_token(logits: jax.Array, key: jax.Array, temperature, top_p) -> jax.Array:
    """Next tokens [B] int32 from logits [B, V]: argmax when temperature is 0, else a draw
    from softmax(logits / temperature) restricted to the top-p nucleus."""
    sampling = jnp.asarray(temperature) > 0

    def drawn():
        scaled = logits / jnp.where(sampling, temperature, 1.0)
        return jax.random.categorical(key, top_p_filter(scaled, top_p), axis=-1).astype(jnp.int32)

    return jax.lax.cond(sampling, drawn, lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32))


def _step_key(key: jax.Array, index) -> jax.Array:
    """The sampling key of new token `index` (0 for the one the prefill samples)."""
    return jax.random.fold_in(key, index)


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len", "keep_logits"))
def _prefill(params, prompt, key, sampling, router_state, *, cfg: Config, cache_len: int,
             keep_logits: bool):
    """prompt [B, P] at positions 0 .. P-1 into an empty cache of `cache_len` slots ->
    (first new token [B], logits [B, P, V] or None, cache)."""
    cache = init_cache(cfg, prompt.shape[0], cache_len, jnp.dtype(cfg.precision.compute_dtype))
    logits, cache = forward_cached(params, prompt, 0, cache, cfg, router_state)
    first = sample_token(logits[:, -1], _step_key(key, 0), *sampling)
    return first, logits if keep_logits else None, cache


@functools.partial(jax.jit, static_argnames=("cfg", "num_steps"))
def _decode(params, prompt, first, prompt_logits, cache, key, sampling, router_state, *,
            cfg: Config, num_steps: int):
    """`num_steps` times: feed the newest token (step i at position P + i), sample the next.
    -> (tokens [B, P + 1 + num_steps], logits [B, P + num_steps, V] or None when
    prompt_logits is None, the cache holding positions 0 .. P + num_steps - 1)."""
    keep_logits = prompt_logits is not None
    prompt_len = prompt.shape[1]

    def step(carry, index):
        token, cache = carry
        logits, cache = forward_cached(params, token[:, None], prompt_len + index, cache, cfg,
                                       router_state)
        next_token = sample_token(logits[:, 0], _step_key(key, index + 1), *sampling)
        return (next_token, cache), (next_token, logits[:, 0] if keep_logits else None)

    (_, cache), (new_tokens, logits) = jax.lax.scan(step, (first, cache), jnp.arange(num_steps))
    tokens = jnp.concatenate([prompt, first[:, None], new_tokens.T], axis=1)
    if keep_logits:
        logits = jnp.concatenate([prompt_logits, jnp.swapaxes(logits, 0, 1)], axis=1)
    return tokens, logits, cache


def generate(params, cfg: Config, prompt_tokens, max_new_tokens: int, *, key=None,
             temperature: float = 0.0, top_p: float = 1.0, router_state=None,
             cache_len: int | None = None, return_logits: bool = False,
             speculative: str | None = None):
    """Continue each prompt row by `max_new_tokens` tokens.

    prompt_tokens [B, P] int -> tokens [B, P + N] int32 (prompt, then the new tokens); with
    `return_logits` also logits [B, P + N - 1, V] float32, where logits[:, t] is the
    distribution that token t + 1 follows (the uncached forward's logits of tokens[:, :-1]).
    temperature 0 is greedy; otherwise `key` is required, and new token i is drawn with
    jax.random.fold_in(key, i). `cache_len` (default P + N) is the number of positions the
    cache holds. `router_state` defaults to the one `params` carry, else the initial one (as in
    moejax.forward). Runs on the default device, or under a mesh the caller set with
    `jax.set_mesh` (B must then divide over the batch shards).

    speculative="mtp" drafts with the model's multi-token-prediction modules and verifies the
    drafts with one forward of the main model per step (see `speculative_generate`, which also
    reports the acceptance): greedy output is the same token for token, sampled output has the
    same distribution (not the same draws). It needs cache_len >= P + N + mtp_depth - 1 (the
    default) and no `return_logits`.
    """
    if speculative is not None:
        if return_logits:
            raise GenerationError("return_logits is not available with speculative decoding: "
                                  "leave out speculative= to get the logits.")
        tokens, _ = speculative_generate(params, cfg, prompt_tokens, max_new_tokens, key=key,
                                         temperature=temperature, top_p=top_p,
                                         router_state=router_state, cache_len=cache_len,
                                         method=speculative)
        return tokens
    prompt = _checked_prompt(prompt_tokens, cfg.model.vocab_size)
    prompt_len = prompt.shape[1]
    cache_len = prompt_len + max_new_tokens if cache_len is None else cache_len
    _check_request(prompt_len, max_new_tokens, cache_len, temperature, top_p, key)
    cfg = generation_config(cfg)
    key = jax.random.key(0) if key is None else key  # greedy decoding draws nothing
    sampling = (jnp.float32(temperature), jnp.float32(top_p))
    # passed apart from the parameters, so that either way of giving it compiles once
    router_state = effective_router_state(params, cfg, router_state)
    params = params.replace(router_state=None)
    first, prompt_logits, cache = _prefill(params, prompt, key, sampling, router_state, cfg=cfg,
                                           cache_len=cache_len, keep_logits=return_logits)
    tokens, logits, _ = _decode(params, prompt, first, prompt_logits, cache, key, sampling,
                                router_state, cfg=cfg, num_steps=max_new_tokens - 1)
    return (tokens, logits) if return_logits else tokens


def _checked_prompt(prompt_tokens, vocab_size: int) -> jax.Array:
    prompt = np.asarray(prompt_tokens)
    if prompt.ndim != 2 or prompt.shape[0] < 1 or prompt.shape[1] < 1:
        raise GenerationError(f"prompt_tokens has shape {prompt.shape}: give a non-empty "
                              "[batch, length] array of token ids.")
    if not np.issubdtype(prompt.dtype, np.integer):
        raise GenerationError(f"prompt_tokens has dtype {prompt.dtype}: give integer token ids.")
    low, high = int(prompt.min()), int(prompt.max())
    if low < 0 or high >= vocab_size:
        raise GenerationError(f"prompt token ids span {low}..{high} but the vocabulary has "
                              f"{vocab_size} tokens: give ids in 0..{vocab_size - 1}.")
    return jnp.asarray(prompt, jnp.int32)


def _check_request(prompt_len: int, max_new_tokens: int, cache_len: int, temperature, top_p,
                   key) -> None:
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens={max_new_tokens} must be at least 1.")
    if prompt_len + max_new_tokens > cache_len:
        raise GenerationError(f"the prompt ({prompt_len} tokens) plus max_new_tokens="
                              f"{max_new_tokens} do not fit the cache of cache_len={cache_len} "
                              "positions: raise cache_len or shorten the request.")
    if not temperature >= 0:
        raise GenerationError(f"temperature={temperature} must be 0 (greedy) or positive.")
    if not 0 < top_p <= 1:
        raise GenerationError(f"top_p={top_p} must be in (0, 1]; 1 keeps every token.")
    if temperature > 0 and key is None:
        raise GenerationError("sampling (temperature > 0) needs a key: pass "
                              "key=jax.random.key(seed).")


# Speculative decoding with the MTP modules as the draft model.
#
# Each step the main model verifies D = mtp_depth drafted tokens with one forward over
# [newest committed token, D drafts]; the drafts every row accepts are kept, plus one token of
# the main model's own (the correction at the first rejection, or a bonus token when all D were
# accepted), and the cache slots of the rejected drafts are zeroed (rolled back). Then the MTP
# modules draft the next D tokens: depth k at position i joins the previous depth's hidden state
# at i with the embedding of token i + k and predicts token i + k + 1, so from the position
# before the newest token n' depth k drafts token n' + k. Each depth has its own attention cache;
# a depth-k entry at position i depends on token i + k, which may have been a rejected draft, so
# every step recomputes the window of positions n - D + 1 .. n + D (n: the newest token before
# the step) at every depth, with fixed shapes (2D positions).
#
# Rows advance together: a step keeps the drafts that every row accepted (the fewest), and a
# row that accepted more commits its accepted draft at the cut. Each committed token is then
# still distributed as plain sampling draws it, so batching changes the speed, never the output.

SPECULATIVE_METHODS = ("mtp",)
_OWN, _ACCEPT, _RESIDUAL, _DRAFT = range(4)  # what a step's random key is folded with


@dataclasses.dataclass(frozen=True)
class SpeculativeStats:
    """What one speculative generation did."""

    steps: int  # verification forwards of the main model after the prefill
    drafted: int  # draft tokens verified: steps * mtp_depth
    accepted: int  # draft tokens kept (per step the fewest that any row accepted)
    committed: int  # new tokens decided (>= max_new_tokens: the last step may decide more)

    @property
    def acceptance_rate(self) -> float:
        """Fraction of the verified drafts that were kept."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        """New tokens per main-model forward after the prefill (plain decoding: 1)."""
        return (self.committed - 1) / self.steps if self.steps else 0.0


@struct.dataclass
class _Speculation:
    """The decode loop's carry. Positions 0 .. last hold committed tokens, last + 1 .. last + D
    the drafts the next step verifies."""

    tokens: jax.Array  # [B, S + 3D] int32 (S = cache_len; room for the windows past the end)
    last: jax.Array  # [] int32: position n of the newest committed token
    cache: KVCache  # the main model's: positions 0 .. n - 1 written, the later slots zero
    mtp_cache: tuple  # the MTP attention caches: two arrays [D_mtp, B, S + 2D, ...]
    hidden: jax.Array  # [B, 2D, D] main model's hidden states at window_start + 0 .. 2D - 1
    window_start: jax.Array  # [] int32
    draft_probs: jax.Array  # [B, D_mtp, V] float32: the distribution each draft was drawn from
    steps: jax.Array  # [] int32: verification steps taken
    accepted: jax.Array  # [] int32: drafts kept over all steps


def _distribution(logits: jax.Array, temperature, top_p) -> jax.Array:
    """The distribution `sample_token` draws from, [..., V] float32 (temperature 0: as 1)."""
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
    return jax.nn.softmax(top_p_filter(scaled, top_p), axis=-1)


def _draw(logits: jax.Array, key, sampling) -> tuple[jax.Array, jax.Array]:
    """(token [B] as sample_token draws it from logits [B, V], the distribution it was drawn
    from [B, V] float32; zeros when greedy, where speculative sampling does not read it)."""
    temperature, top_p = sampling

    def drawn():
        probs = _distribution(logits, temperature, top_p)
        return jax.random.categorical(key, jnp.log(probs), axis=-1).astype(jnp.int32), probs

    def greedy():
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), jnp.zeros(logits.shape, jnp.float32)

    return jax.lax.cond(jnp.asarray(temperature) > 0, drawn, greedy)


def _draft(params, tokens, hidden, window_start, last, mtp_cache, key, sampling, router_state,
           cfg: Config):
    """The MTP depths over the window of positions window_start + 0 .. W - 1 (hidden [B, W, D]:
    the main model's hidden states there), depth k drafting token last + k from position
    last - 1 (inside the window). -> (tokens with the drafts written at last + 1 .. last + D,
    the distributions they were drawn from [B, D_mtp, V], the MTP caches with the window
    written). The depths run as one scan: one compiled block whatever D."""
    width = hidden.shape[1]
    index = last - 1 - window_start  # the drafting position within the window

    def depth_step(carry, inputs):
        tokens, hidden = carry
        depth, cache = inputs
        ahead = jax.lax.dynamic_slice_in_dim(tokens, window_start + depth, width, axis=1)
        logits, hidden, cache = mtp_cached(params, depth, hidden, ahead, window_start, cache,
                                           cfg, router_state)
        logits = jax.lax.dynamic_index_in_dim(logits, index, axis=1, keepdims=False)  # [B, V]
        draft, probs = _draw(logits, jax.random.fold_in(key, depth), sampling)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, draft[:, None], last + depth, axis=1)
        return (tokens, hidden), (probs, cache)

    depths = jnp.arange(1, cfg.model.mtp_depth + 1)
    (tokens, _), (probs, mtp_cache) = jax.lax.scan(depth_step, (tokens, hidden),
                                                   (depths, mtp_cache))
    return tokens, jnp.swapaxes(probs, 0, 1), mtp_cache


def _accept(logits, drafts, draft_probs, key, sampling):
    """Speculative sampling (Leviathan et al. 2023, Chen et al. 2023) of D drafts [B, D], drawn
    from draft_probs [B, D, V], under the main model's logits [B, D + 1, V] at the newest
    committed token and the drafts: draft j is kept with probability min(1, p(x)/q(x)), else
    replaced by a draw from the residual max(0, p - q) normalised; greedy keeps a draft when it
    is the argmax. -> (drafts every row kept [] int32, tokens [B, D + 1]: at each offset the
    token to commit when everything before it was kept; the last is the main model's own)."""
    temperature, top_p = sampling
    depth = drafts.shape[1]

    def greedy():
        target = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, D + 1]
        return drafts == target[:, :depth], target

    def speculative_sampling():
        p = _distribution(logits, temperature, top_p)  # [B, D + 1, V]
        p_draft = jnp.take_along_axis(p[:, :depth], drafts[..., None], axis=-1)[..., 0]
        q_draft = jnp.take_along_axis(draft_probs, drafts[..., None], axis=-1)[..., 0]
        uniform = jax.random.uniform(jax.random.fold_in(key, _ACCEPT), drafts.shape)
        kept = uniform * q_draft < p_draft  # probability min(1, p/q); never when p = 0
        residual = jnp.maximum(p[:, :depth] - draft_probs, 0.0)
        # an all-zero residual means p <= q everywhere, i.e. p = q: the draft is kept anyway
        residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual,
                             p[:, :depth])
        resampled = jax.random.categorical(jax.random.fold_in(key, _RESIDUAL),
                                           jnp.log(residual), axis=-1)
        bonus = jax.random.categorical(jax.random.fold_in(key, _OWN), jnp.log(p[:, depth]))
        tokens = jnp.concatenate([jnp.where(kept, drafts, resampled), bonus[:, None]], axis=1)
        return kept, tokens.astype(jnp.int32)

    kept, tokens = jax.lax.cond(jnp.asarray(temperature) > 0, speculative_sampling, greedy)
    kept_per_row = jnp.sum(jnp.cumprod(kept.astype(jnp.int32), axis=1), axis=1)
    return jnp.min(kept_per_row), tokens


def _rolled_back(cache: KVCache, start, keep, width: int) -> KVCache:
    """The cache (entries [L, B, S, ...]) with slots start + keep .. start + width - 1 zeroed:
    the rejected drafts' entries, so that it equals plain decoding's cache."""
    def leaf(entries):
        written = jax.lax.dynamic_slice_in_dim(entries, start, width, axis=2)
        kept = (jnp.arange(width) < keep).reshape((1, 1, width) + (1,) * (entries.ndim - 3))
        return jax.lax.dynamic_update_slice_in_dim(entries, jnp.where(kept, written, 0), start,
                                                   axis=2)

    return jax.tree.map(leaf, cache)


def _window_hidden(stored, stored_start, verified, verified_start, window_start):
    """The main model's hidden states at positions window_start + 0 .. 2D - 1 [B, 2D, D]: from
    `verified` [B, D + 1, D] (positions verified_start ..) from verified_start on, before it from
    `stored` [B, 2D, D] (positions stored_start ..); past both (an unused tail) clipped."""
    width = stored.shape[1]
    positions = window_start + jnp.arange(width)
    source = jnp.concatenate([stored, verified.astype(stored.dtype)], axis=1)
    index = jnp.where(positions < verified_start, positions - stored_start,
                      width + positions - verified_start)
    return jnp.take(source, jnp.clip(index, 0, source.shape[1] - 1), axis=1)


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len"))
def _speculative_prefill(params, prompt, key, sampling, router_state, *, cfg: Config,
                         cache_len: int) -> _Speculation:
    """prompt [B, P] into empty caches of `cache_len` positions, the first new token at
    position P, the first drafts after it."""
    batch, prompt_len = prompt.shape
    depth = cfg.model.mtp_depth
    dtype = jnp.dtype(cfg.precision.compute_dtype)
    cache = init_cache(cfg, batch, cache_len, dtype)
    logits, cache, hidden = forward_cached(params, prompt, 0, cache, cfg, router_state,
                                           return_hidden=True)
    key = jax.random.fold_in(key, 0)
    first = sample_token(logits[:, -1], jax.random.fold_in(key, _OWN), *sampling)
    tokens = jnp.zeros((batch, cache_len + 3 * depth), jnp.int32)
    tokens = tokens.at[:, :prompt_len].set(prompt).at[:, prompt_len].set(first)
    mtp_cache = tuple(jnp.zeros((depth, batch, cache_len + 2 * depth, *shape), dtype)
                      for shape in cache_entry_shapes(cfg.model))
    last = jnp.int32(prompt_len)
    tokens, probs, mtp_cache = _draft(params, tokens, hidden, 0, last, mtp_cache,
                                      jax.random.fold_in(key, _DRAFT), sampling, router_state,
                                      cfg)
    window_start = max(prompt_len - depth + 1, 0)  # the first step's window
    hidden = jnp.pad(hidden, ((0, 0), (0, 2 * depth), (0, 0)))
    zero = jnp.int32(0)
    return _Speculation(tokens=tokens, last=last, cache=cache, mtp_cache=mtp_cache,
                        hidden=hidden[:, window_start:window_start + 2 * depth],
                        window_start=jnp.int32(window_start), draft_probs=probs, steps=zero,
                        accepted=zero)


def _speculative_step(params, state: _Speculation, key, sampling, router_state,
                      cfg: Config) -> _Speculation:
    """Verify the drafts, commit what is accepted plus one token, roll the cache back, draft."""
    depth = cfg.model.mtp_depth
    last = state.last
    verified = jax.lax.dynamic_slice_in_dim(state.tokens, last, depth + 1, axis=1)
    logits, cache, hidden = forward_cached(params, verified, last, state.cache, cfg,
                                           router_state, return_hidden=True)
    key = jax.random.fold_in(key, state.steps + 1)
    kept, new_tokens = _accept(logits, verified[:, 1:], state.draft_probs, key, sampling)
    tokens = jax.lax.dynamic_update_slice_in_dim(state.tokens, new_tokens, last + 1, axis=1)
    cache = _rolled_back(cache, last, kept + 1, depth + 1)
    window_start = jnp.maximum(last - depth + 1, 0)
    window = _window_hidden(state.hidden, state.window_start, hidden, last, window_start)
    new_last = last + kept + 1
    tokens, probs, mtp_cache = _draft(params, tokens, window, window_start, new_last,
                                      state.mtp_cache, jax.random.fold_in(key, _DRAFT),
                                      sampling, router_state, cfg)
    return _Speculation(tokens=tokens, last=new_last, cache=cache, mtp_cache=mtp_cache,
                        hidden=window, window_start=window_start, draft_probs=probs,
                        steps=state.steps + 1, accepted=state.accepted + kept)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _speculative_decode(params, state: _Speculation, total_len, key, sampling, router_state, *,
                        cfg: Config) -> _Speculation:
    """Steps until position total_len - 1 holds a committed token (total_len is traced, so
    every length compiles once per cache shape)."""
    return jax.lax.while_loop(
        lambda s: s.last + 1 < total_len,
        lambda s: _speculative_step(params, s, key, sampling, router_state, cfg), state)


def speculative_generate(params, cfg: Config, prompt_tokens, max_new_tokens: int, *, key=None,
                         temperature: float = 0.0, top_p: float = 1.0, router_state=None,
                         cache_len: int | None = None, method: str = "mtp"):
    """`generate(..., speculative=method)` -> (tokens [B, P + N] int32, SpeculativeStats).

    The drafts come from the model's MTP modules (`model.mtp_depth` = D >= 1, moejax-trained or
    imported with a DeepSeek-V3 checkpoint's MTP layers): D drafts per step, verified by one
    forward of the main model over D + 1 tokens with the KV cache (the MLA latent cache
    included). Greedy output equals plain greedy decoding token for token; sampled tokens follow
    the plain sampling distribution (speculative sampling), drawn with other random numbers.
    `cache_len` defaults to P + N + D - 1, the least it may be (the last verification reaches
    D - 1 positions past the output). The other arguments are as in `generate`.
    """
    _check_speculative(params, cfg, method)
    prompt = _checked_prompt(prompt_tokens, cfg.model.vocab_size)
    prompt_len, depth = prompt.shape[1], cfg.model.mtp_depth
    needed = prompt_len + max_new_tokens + depth - 1
    cache_len = needed if cache_len is None else cache_len
    _check_request(prompt_len, max_new_tokens, cache_len, temperature, top_p, key)
    if cache_len < needed:
        raise GenerationError(f"speculative decoding verifies {depth} draft(s) past the newest "
                              f"token: the prompt ({prompt_len} tokens) plus max_new_tokens="
                              f"{max_new_tokens} plus mtp_depth - 1 = {depth - 1} need "
                              f"cache_len >= {needed}, not {cache_len}.")
    state = _run_speculative(params, cfg, prompt, prompt_len + max_new_tokens, key, temperature,
                             top_p, router_state, cache_len)
    steps, accepted = int(state.steps), int(state.accepted)
    stats = SpeculativeStats(steps=steps, drafted=steps * depth, accepted=accepted,
                             committed=int(state.last) + 1 - prompt_len)
    return state.tokens[:, :prompt_len + max_new_tokens], stats


def _run_speculative(params, cfg: Config, prompt: jax.Array, total_len: int, key, temperature,
                     top_p, router_state, cache_len: int) -> _Speculation:
    """The prefill and decode loop of a checked request -> the final loop state."""
    cfg = generation_config(cfg)
    key = jax.random.key(0) if key is None else key  # greedy decoding draws nothing
    sampling = (jnp.float32(temperature), jnp.float32(top_p))
    router_state = effective_router_state(params, cfg, router_state)
    params = params.replace(router_state=None)
    state = _speculative_prefill(params, prompt, key, sampling, router_state, cfg=cfg,
                                 cache_len=cache_len)
    return _speculative_decode(params, state, jnp.int32(total_len), key, sampling, router_state,
                               cfg=cfg)


def _check_speculative(params, cfg: Config, method) -> None:
    if method not in SPECULATIVE_METHODS:
        raise GenerationError(f"speculative={method!r} is not a drafting method: use one of "
                              f"{list(SPECULATIVE_METHODS)} (or None for plain decoding).")
    if cfg.model.mtp_depth < 1 or params.mtp is None:
        raise GenerationError(f"speculative={method!r} drafts with the model's multi-token-"
                              f"prediction modules, but this model has none (model.mtp_depth="
                              f"{cfg.model.mtp_depth}): train with model.mtp_depth >= 1, load a "
                              "checkpoint that has its MTP layers, or decode without it.")


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    cfg: Config
    params: object  # Transformer on the default device, carrying its router state
    directory: Path  # where a tokenizer.json may sit
    description: str  # e.g. "training run runs/x, step 300"

    @property
    def router_state(self):
        """The RouterState the parameters carry."""
        return self.params.router_state


def load_model(path) -> LoadedModel:
    """A model to generate from: a training run directory (its latest checkpoint), one of its
    step directories (RUN/checkpoints/STEP), a native moejax checkpoint or a Hugging Face
    checkpoint directory."""
    path = Path(path)
    if not path.exists():
        raise GenerationError(f"{path} does not exist: give a training run directory, a moejax "
                              "checkpoint or a Hugging Face checkpoint directory.")
    run_dir, step = _run_location(path)
    if run_dir is not None:
        return _load_run(run_dir, step)
    from moejax.convert import load_hf, load_moejax

    if (path / "config.yaml").is_file():
        return _loaded(*load_moejax(path), path, f"moejax checkpoint {path}")
    if (path / "config.json").is_file():
        return _loaded(*load_hf(path), path, f"Hugging Face checkpoint {path}")
    raise GenerationError(f"{path} is not a checkpoint: expected a training run directory "
                          "(config.yaml and checkpoints/), a moejax checkpoint (config.yaml and "
                          "safetensors) or a Hugging Face checkpoint (config.json).")


def _loaded(cfg: Config, params, directory: Path, description: str) -> LoadedModel:
    """Parameters (carrying their router state) committed to the default device (as a restored
    training checkpoint is), so that models loaded either way share compiled generation
    functions."""
    return LoadedModel(cfg, jax.device_put(params, jax.devices()[0]), directory, description)


def _run_location(path: Path) -> tuple[Path | None, int | None]:
    """(run directory, step or None for the latest) when `path` is a run or one of its steps:
    a directory with config.yaml and no safetensors (those make a native moejax checkpoint)."""
    from moejax.convert.shards import INDEX_FILE, SINGLE_FILE

    safetensors = (path / SINGLE_FILE).is_file() or (path / INDEX_FILE).is_file()
    if (path / "config.yaml").is_file() and not safetensors:
        return path, None
    run_dir = path.parent.parent
    if (path.name.isdigit() and path.parent.name == "checkpoints"
            and (run_dir / "config.yaml").is_file()):
        return run_dir, int(path.name)
    return None, None


def _on_default_device(abstract_tree):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        abstract_tree)


def _load_run(run_dir: Path, step: int | None) -> LoadedModel:
    """Parameters and router state of a training checkpoint (written by
    moejax.training.checkpoint); the optimizer state is not read."""
    from moejax.convert.hf import mesh_section, param_specs
    from moejax.training.checkpoint import Checkpoints

    mesh_overrides, num_devices = mesh_section(None)  # generation runs on one device
    cfg = load_config(run_dir / "config.yaml", mesh_overrides, num_devices=num_devices)
    if not (run_dir / "checkpoints").is_dir():
        raise _no_checkpoint_yet(run_dir)
    checkpoints = Checkpoints(run_dir / "checkpoints")
    try:
        step = checkpoints.latest_step() if step is None else step
        if step is None:
            raise _no_checkpoint_yet(run_dir)
        like = {"params": _on_default_device(P.abstract(param_specs(cfg))),
                "router": _on_default_device(jax.eval_shape(lambda: init_router_state(cfg)))}
        state = checkpoints.restore_model(step, like)
    finally:
        checkpoints.close()
    return _loaded(cfg, state["params"].replace(router_state=state["router"]), run_dir,
                   f"training run {run_dir}, step {step}")


def _no_checkpoint_yet(run_dir: Path) -> GenerationError:
    return GenerationError(f"{run_dir} holds no checkpoint yet: let its training run save one "
                           "(at the end, or every train.checkpoint_every steps).")


class ByteText:
    """The byte-level tokenizer: token ids are the UTF-8 bytes of the text."""

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, tokens) -> str:
        return decode_bytes(tokens)


def decode_bytes(tokens) -> str:
    """Byte token ids -> text; invalid UTF-8 (e.g. a character cut off) becomes U+FFFD."""
    return np.asarray(tokens).astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def find_tokenizer(cfg: Config, directory: Path):
    """ByteText for a 256-token vocabulary; else the tokenizer.json in `directory` when the
    `tokenizers` package is installed (moejax.data.HFTokenizer); else None."""
    if cfg.model.vocab_size == BYTE_VOCAB:
        return ByteText()
    tokenizer_json = Path(directory) / "tokenizer.json"
    if tokenizer_json.is_file() and importlib.util.find_spec("tokenizers") is not None:
        from moejax.data import HFTokenizer

        return HFTokenizer(tokenizer_json)
    return None
