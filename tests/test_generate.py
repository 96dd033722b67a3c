"""Generation: cached prefill + decode equals the uncached forward at every position (GQA, MLA,
MLA with YaRN), greedy decoding, top-p and temperature sampling, the compressed MLA cache,
loading every checkpoint kind, and scripts/generate.py end to end."""

import dataclasses
import functools
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import load_script, subprocess_env, tiny_config
from tokenizers import Tokenizer, models, pre_tokenizers

import moejax
from moejax import params as P
from moejax.convert import save_hf, save_moejax
from moejax.convert.hf import param_specs
from moejax.generate import (
    GenerationError,
    _prefill,
    decode_bytes,
    find_tokenizer,
    generate,
    generation_config,
    load_model,
    sample_token,
    top_p_filter,
)
from moejax.training.checkpoint import Checkpoints
from moejax.training.optim import make_optimizer
from moejax.training.rundir import write_run_config
from moejax.training.state import TrainState

REPO = Path(__file__).resolve().parent.parent
# A training-time capacity factor: generation must run dropless anyway (the reference is).
MOE = ("moe.dispatch=capacity", "moe.capacity_factor=1.0")
MLA = ("model.attention=mla", "model.q_lora_rank=16", "model.kv_lora_rank=16",
       "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=4", "model.v_head_dim=8")
YARN = ("model.rope_scaling=yarn", "model.yarn_factor=4", "model.yarn_original_max_len=8")
CASES = {"gqa": MOE, "mla": MOE + MLA, "mla_yarn": MOE + MLA + YARN}
PROMPT_LEN, NEW_TOKENS, BATCH = 4, 8, 2  # 12 positions: past YaRN's original 8
SCRIPT_PROMPT = "def "  # PROMPT_LEN bytes, so the script reuses the tests' compiled functions


def on_device(tree):
    """Committed to the default device, as load_model places models, so that the tests and
    the script share compiled functions."""
    return jax.device_put(tree, jax.devices()[0])


def random_params(cfg, seed: int):
    """Parameters drawn in numpy (no compile): N(0, 0.02^2) weights, norm weights near 1."""
    rng = np.random.default_rng(seed)

    def leaf(path, spec):
        is_norm = str(path[-1]).endswith("norm")
        values = rng.normal(1.0 if is_norm else 0.0, 0.1 if is_norm else 0.02, spec.shape)
        return values.astype(spec.dtype)

    return on_device(jax.tree_util.tree_map_with_path(leaf, P.abstract(param_specs(cfg))))


def random_router_state(cfg, seed: int):
    """A non-zero selection bias, so that ignoring the router state changes the routing."""
    state = moejax.init_router_state(cfg)
    bias = np.random.default_rng(seed).normal(0.0, 0.05, state.bias.shape).astype(np.float32)
    return on_device(state.replace(bias=bias))


def assert_trees_equal(actual, expected):
    jax.tree.map(np.testing.assert_array_equal, actual, expected)


def dropless(cfg):
    moe = dataclasses.replace(cfg.moe, dispatch="dropless", capacity_factor=None)
    return dataclasses.replace(cfg, moe=moe)


@dataclasses.dataclass(frozen=True)
class Case:
    cfg: moejax.Config
    params: object
    router_state: object
    prompt: np.ndarray  # [B, P]
    tokens: jax.Array  # [B, P + N], greedy
    logits: jax.Array  # [B, P + N - 1, V]


@functools.cache
def case(name: str) -> Case:
    cfg = tiny_config(*CASES[name])
    params, router_state = random_params(cfg, 1), random_router_state(cfg, 2)
    prompt = np.random.default_rng(3).integers(0, cfg.model.vocab_size, (BATCH, PROMPT_LEN))
    tokens, logits = generate(params, cfg, prompt, NEW_TOKENS, router_state=router_state,
                                  return_logits=True)
    return Case(cfg, params, router_state, prompt, tokens, logits)


@functools.cache
def uncached_forward(cfg):
    """The uncached forward (logits only) of the dropless config, jitted."""
    return jax.jit(lambda params, tokens, state: moejax.forward(params, tokens, dropless(cfg),
                                                                state)[0])


@pytest.mark.parametrize("name", sorted(CASES))
def test_cached_logits_equal_uncached_forward_at_every_position(name):
    c = case(name)
    tokens, logits = np.asarray(c.tokens), np.asarray(c.logits)
    assert tokens.shape == (BATCH, PROMPT_LEN + NEW_TOKENS)
    np.testing.assert_array_equal(tokens[:, :PROMPT_LEN], c.prompt)
    expected = np.asarray(uncached_forward(c.cfg)(c.params, tokens[:, :-1], c.router_state))
    assert logits.shape == expected.shape
    error = np.max(np.abs(logits - expected), axis=(0, 2))  # per position
    scale = np.max(np.abs(expected), axis=(0, 2))
    print(f"{name}: max relative cached-vs-uncached difference {np.max(error / scale):.2e}")
    assert np.all(error <= 1e-5 * scale), error / scale


def test_generate_uses_the_router_state_the_parameters_carry():
    """As imported parameters carry it (moejax.convert.load_hf); the same compiled functions."""
    c = case("gqa")
    carrying = c.params.replace(router_state=c.router_state)
    tokens, logits = generate(carrying, c.cfg, c.prompt, NEW_TOKENS, return_logits=True)
    np.testing.assert_array_equal(tokens, c.tokens)
    np.testing.assert_array_equal(logits, c.logits)


@pytest.mark.parametrize("name", sorted(CASES))
def test_greedy_equals_step_by_step_argmax_of_the_uncached_forward(name):
    c = case(name)
    forward = uncached_forward(c.cfg)
    # One buffer shape for every step (one compile); causality makes the padding irrelevant.
    buffer = np.zeros((BATCH, PROMPT_LEN + NEW_TOKENS - 1), np.int32)
    buffer[:, :PROMPT_LEN] = c.prompt
    expected = []
    for position in range(PROMPT_LEN - 1, PROMPT_LEN + NEW_TOKENS - 1):
        logits = np.asarray(forward(c.params, buffer, c.router_state))
        next_token = np.argmax(logits[:, position], axis=-1)
        expected.append(next_token)
        if position + 1 < buffer.shape[1]:
            buffer[:, position + 1] = next_token
    np.testing.assert_array_equal(c.tokens[:, PROMPT_LEN:], np.stack(expected, axis=1))


def test_mla_caches_the_compressed_latent():
    c = case("mla")
    m = c.cfg.model
    cache_len = PROMPT_LEN + NEW_TOKENS
    sampling = (jnp.float32(0.0), jnp.float32(1.0))  # as generate() passes them
    _, _, cache = _prefill(c.params, jnp.asarray(c.prompt, jnp.int32), jax.random.key(0),
                               sampling, c.router_state, cfg=generation_config(c.cfg),
                               cache_len=cache_len, keep_logits=True)
    for stack, layers in ((cache.dense, c.cfg.num_dense_layers), (cache.moe, c.cfg.num_moe_layers)):
        latent, key_rope = stack
        assert latent.shape == (layers, BATCH, cache_len, m.kv_lora_rank)
        assert key_rope.shape == (layers, BATCH, cache_len, m.qk_rope_head_dim)
        assert latent.dtype == jnp.dtype(c.cfg.precision.compute_dtype)
        # the prompt's entries are written, the slots after it are still empty
        latent = np.asarray(latent)
        assert np.all(np.any(latent[:, :, :PROMPT_LEN] != 0, axis=-1))
        assert np.all(latent[:, :, PROMPT_LEN:] == 0)


def test_top_p_keeps_the_smallest_nucleus():
    probs = jnp.array([0.1, 0.5, 0.05, 0.3, 0.05])
    logits = jnp.log(probs)
    expected = {0.4: [1], 0.7: [1, 3], 0.85: [0, 1, 3], 0.97: [0, 1, 2, 3, 4], 1.0: range(5)}
    nucleus = jax.jit(top_p_filter)
    for top_p, kept in expected.items():
        filtered = np.asarray(nucleus(logits, top_p))
        assert np.flatnonzero(np.isfinite(filtered)).tolist() == list(kept), top_p
        np.testing.assert_array_equal(filtered[np.array(kept)], logits[np.array(kept)])


def test_sampling_frequencies_follow_temperature_then_top_p():
    probs = np.array([0.1, 0.5, 0.05, 0.3, 0.05])
    draws = 20_000
    logits = jnp.tile(jnp.log(jnp.asarray(probs, jnp.float32)), (draws, 1))
    sample = jax.jit(sample_token)
    # temperature 2 flattens to sqrt(p); top-p 0.7 then keeps tokens 1, 3 and 0
    tempered = np.sqrt(probs) / np.sum(np.sqrt(probs))
    expected = np.where(np.isin(np.arange(5), [0, 1, 3]), tempered, 0.0)
    expected /= expected.sum()
    tokens = sample(logits, jax.random.key(0), jnp.float32(2.0), jnp.float32(0.7))
    frequencies = np.bincount(np.asarray(tokens), minlength=5) / draws
    np.testing.assert_allclose(frequencies, expected, atol=0.02)  # ~6 standard deviations
    greedy = sample(logits, jax.random.key(0), jnp.float32(0.0), jnp.float32(0.7))
    assert np.all(np.asarray(greedy) == 1)


def sampled(key_seed: int, temperature: float, top_p: float = 1.0):
    c = case("gqa")
    return generate(c.params, c.cfg, c.prompt, NEW_TOKENS, key=jax.random.key(key_seed),
                        temperature=temperature, top_p=top_p, router_state=c.router_state)


def test_sampling_is_reproducible_and_tiny_top_p_is_greedy():
    c = case("gqa")
    first = sampled(5, temperature=1.0)
    np.testing.assert_array_equal(first, sampled(5, temperature=1.0))
    assert not np.array_equal(first, sampled(6, temperature=1.0))
    assert not np.array_equal(first, c.tokens)  # a near-uniform model: sampling is not greedy
    np.testing.assert_array_equal(sampled(6, temperature=1.0, top_p=1e-6), c.tokens)
    np.testing.assert_array_equal(sampled(6, temperature=0.0), c.tokens)


@pytest.mark.parametrize("request_args, message", [
    ({"max_new_tokens": 0}, "max_new_tokens=0"),
    ({"cache_len": PROMPT_LEN + NEW_TOKENS - 1}, "do not fit the cache"),
    ({"top_p": 0.0}, "top_p=0.0"),
    ({"top_p": 1.5}, "top_p=1.5"),
    ({"temperature": -1.0, "key": jax.random.key(0)}, "temperature=-1.0"),
    ({"temperature": 0.5}, "needs a key"),
    ({"prompt": [[1, 2, 256]]}, "ids span 1..256"),
    ({"prompt": [1, 2, 3]}, "shape (3,)"),
    ({"prompt": [[0.5, 1.0]]}, "dtype float64"),
])
def test_bad_requests_are_refused_with_one_sentence(request_args, message):
    c = case("gqa")
    args = {"prompt": c.prompt, "max_new_tokens": NEW_TOKENS, **request_args}
    with pytest.raises(GenerationError) as error:
        generate(c.params, c.cfg, args.pop("prompt"), args.pop("max_new_tokens"), **args)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.fixture(scope="module")
def training_run(tmp_path_factory) -> Path:
    """A run directory as moejax.train leaves it (config.yaml, orbax TrainStates) with the gqa
    case's state at step 7 and, at step 3, the same parameters with a zero router bias."""
    c = case("gqa")
    run_dir = tmp_path_factory.mktemp("generate") / "run"
    write_run_config(c.cfg, run_dir)
    opt_state = jax.jit(make_optimizer(c.cfg).init)(c.params)
    checkpoints = Checkpoints(run_dir / "checkpoints", keep=2)
    for step, router in ((3, moejax.init_router_state(c.cfg)), (7, c.router_state)):
        state = TrainState(step=jnp.int32(step), params=c.params, opt_state=opt_state,
                           router=router)
        checkpoints.save(step, state, {"position": 0})
    checkpoints.close()
    return run_dir


def script_prompt():
    return np.tile(np.frombuffer(SCRIPT_PROMPT.encode(), np.uint8), (BATCH, 1))


def test_load_model_restores_a_training_run(training_run, tmp_path):
    c = case("gqa")
    latest = load_model(training_run)
    assert latest.description == f"training run {training_run}, step 7"
    assert latest.cfg.model == c.cfg.model and latest.cfg.moe == c.cfg.moe
    assert_trees_equal(latest.params, c.params.replace(router_state=c.router_state))
    assert latest.router_state is latest.params.router_state
    earlier = load_model(training_run / "checkpoints" / "3")
    assert earlier.description == f"training run {training_run}, step 3"
    assert_trees_equal(earlier.params.replace(router_state=None), c.params)
    np.testing.assert_array_equal(earlier.router_state.bias, 0.0)
    write_run_config(c.cfg, tmp_path / "fresh")  # a run that saved nothing yet
    with pytest.raises(GenerationError, match="holds no checkpoint yet"):
        load_model(tmp_path / "fresh")


def test_script_samples_from_a_training_run(training_run, capsys):
    c = case("gqa")
    argv = [str(training_run), "--prompt", SCRIPT_PROMPT, "--max-new-tokens",
            str(NEW_TOKENS), "--num-samples", str(BATCH), "--temperature", "0.8",
            "--top-p", "0.95", "--seed", "4"]
    assert load_script("generate").main(argv) == 0
    out = capsys.readouterr().out
    expected = generate(c.params, c.cfg, script_prompt(), NEW_TOKENS,
                            key=jax.random.key(4), temperature=0.8, top_p=0.95,
                            router_state=c.router_state)
    texts = [decode_bytes(row) for row in np.asarray(expected)]
    assert out == "".join(f"--- sample {i + 1} ---\n{t}\n" for i, t in enumerate(texts))
    assert all(t.startswith(SCRIPT_PROMPT) for t in texts)


def test_script_greedy_from_a_moejax_checkpoint(tmp_path, capsys):
    c = case("gqa")
    save_moejax(c.cfg, c.params, tmp_path / "native", router_state=c.router_state)
    argv = [str(tmp_path / "native"), "--prompt-ids", "100, 101 102 32",
            "--max-new-tokens", str(NEW_TOKENS), "--num-samples", str(BATCH)]
    assert load_script("generate").main(argv) == 0
    expected = generate(c.params, c.cfg, script_prompt(), NEW_TOKENS, key=jax.random.key(0),
                            router_state=c.router_state)
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == decode_bytes(expected[0]) and lines[3] == decode_bytes(expected[1])
    model = load_model(tmp_path / "native")
    np.testing.assert_array_equal(model.router_state.bias, c.router_state.bias)


def test_load_model_reads_a_hugging_face_checkpoint(tmp_path):
    cfg = tiny_config("moe.router=softmax_topk", "moe.num_shared_experts=0",
                      "model.num_dense_layers=0")
    params = random_params(cfg, 5)
    save_hf(cfg, params, tmp_path / "hf", "MixtralForCausalLM")
    model = load_model(tmp_path / "hf")
    assert_trees_equal(model.params.replace(router_state=None), params)
    assert model.cfg.moe.num_experts == cfg.moe.num_experts
    assert model.cfg.precision.compute_dtype == "float32"  # as the checkpoint
    assert model.description == f"Hugging Face checkpoint {tmp_path / 'hf'}"


def test_tokenizer_choice(tmp_path):
    byte_level = find_tokenizer(tiny_config(), tmp_path)
    assert byte_level.decode(byte_level.encode("é\n")) == "é\n"
    assert decode_bytes([0xC3]) == "\ufffd"  # a cut-off character
    other_vocab = tiny_config("model.vocab_size=300")
    assert find_tokenizer(other_vocab, tmp_path) is None
    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    found = find_tokenizer(other_vocab, tmp_path)
    assert found.encode("hello world").tolist() == [1, 2]
    assert found.decode([1, 2]) == "hello world"


def test_script_errors_are_one_line_with_status_2(tmp_path, capsys):
    assert load_script("generate").main([str(tmp_path), "--prompt", "x"]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path} is not a checkpoint: expected a "
                                       "training run directory (config.yaml and checkpoints/), a "
                                       "moejax checkpoint (config.yaml and safetensors) or a "
                                       "Hugging Face checkpoint (config.json).\n")
    missing = tmp_path / "absent"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "generate.py"), str(missing),
                             "--prompt", "x"], env=subprocess_env(1), cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"error: {missing} does not exist")
    assert result.stderr.count("\n") == 1
