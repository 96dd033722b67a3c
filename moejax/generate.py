"""Generation with a KV cache: one prefill over the prompt, then one token per decode step.

The cache is the model's own (`init_cache` / `forward_cached`): rotated keys and values for GQA,
the compressed latent and the shared RoPE key for MLA, which decodes in the absorbed form and
never expands the cache. Prefill and the decode loop are each one jitted function; the decode
loop is a `lax.scan` carrying the cache. Temperature and top-p are traced values, so changing
them never recompiles. Generation reads only the model, MoE and precision sections of a config
and is always dropless (a capacity factor would drop tokens of a one-token decode step).

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

from moejax import params as P
from moejax.config import Config, load_config
from moejax.model.transformer import (
    effective_router_state,
    forward_cached,
    init_cache,
    init_router_state,
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
    top_p >= 1 keeps every token exactly, whatever the rounding of the running sum."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    descending = -jnp.sort(-probs, axis=-1)
    mass_before = jnp.cumsum(descending, axis=-1) - descending  # of the more likely tokens
    in_nucleus = (mass_before < top_p) | (top_p >= 1.0)
    threshold = jnp.min(jnp.where(in_nucleus, descending, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(probs >= threshold, logits, -jnp.inf)


def sample_token(logits: jax.Array, key: jax.Array, temperature, top_p) -> jax.Array:
    """Next tokens [B] int32 from logits [B, V]: argmax when temperature is 0, else a draw
    from softmax(logits / temperature) restricted to the top-p nucleus."""
    greedy = jnp.argmax(logits, axis=-1)
    sampling = temperature > 0
    scaled = logits / jnp.where(sampling, temperature, 1.0)
    drawn = jax.random.categorical(key, top_p_filter(scaled, top_p), axis=-1)
    return jnp.where(sampling, drawn, greedy).astype(jnp.int32)


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
    prompt_logits is None)."""
    keep_logits = prompt_logits is not None
    prompt_len = prompt.shape[1]

    def step(carry, index):
        token, cache = carry
        logits, cache = forward_cached(params, token[:, None], prompt_len + index, cache, cfg,
                                       router_state)
        next_token = sample_token(logits[:, 0], _step_key(key, index + 1), *sampling)
        return (next_token, cache), (next_token, logits[:, 0] if keep_logits else None)

    _, (new_tokens, logits) = jax.lax.scan(step, (first, cache), jnp.arange(num_steps))
    tokens = jnp.concatenate([prompt, first[:, None], new_tokens.T], axis=1)
    if not keep_logits:
        return tokens, None
    return tokens, jnp.concatenate([prompt_logits, jnp.swapaxes(logits, 0, 1)], axis=1)


def generate(params, cfg: Config, prompt_tokens, max_new_tokens: int, *, key=None,
             temperature: float = 0.0, top_p: float = 1.0, router_state=None,
             cache_len: int | None = None, return_logits: bool = False):
    """Continue each prompt row by `max_new_tokens` tokens.

    prompt_tokens [B, P] int -> tokens [B, P + N] int32 (prompt, then the new tokens); with
    `return_logits` also logits [B, P + N - 1, V] float32, where logits[:, t] is the
    distribution that token t + 1 follows (the uncached forward's logits of tokens[:, :-1]).
    temperature 0 is greedy; otherwise `key` is required, and new token i is drawn with
    jax.random.fold_in(key, i). `cache_len` (default P + N) is the number of positions the
    cache holds. `router_state` defaults to the one `params` carry, else the initial one (as in
    moejax.forward). Runs on the default device, or under a mesh the caller set with
    `jax.set_mesh` (B must then divide over the batch shards).
    """
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
    tokens, logits = _decode(params, prompt, first, prompt_logits, cache, key, sampling,
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
