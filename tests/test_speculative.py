"""Speculative decoding with the MTP modules as the draft (generate(..., speculative="mtp")).

Greedy output equals plain greedy decoding, for several prompts and lengths up to the cache's
end, on three models: the tiny_deepseek_v3 architecture (MLA latent cache, MoE, one MTP depth)
trained for a few dozen steps and imported as a Hugging Face DeepSeek-V3 checkpoint, a random
model of that config, and a dense model with two MTP depths (drafts chained through the second
depth). Also: the cache after rollback equals plain decoding's; the sampled distribution equals
plain sampling's (chi-square); the drafting pass is the training-time MTP pass; the refusals;
scripts/generate.py --speculative mtp."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import load_script, tiny_config
from scipy import stats as scipy_stats

import moejax
from moejax import params as P
from moejax.convert import save_hf
from moejax.convert.hf import param_specs
from moejax.generate import (
    ByteText,
    GenerationError,
    _decode,
    _distribution,
    _prefill,
    _run_speculative,
    generate,
    generation_config,
    load_model,
    speculative_generate,
)
from moejax.model.transformer import effective_router_state, mtp_cached
from moejax.training.optim import make_optimizer

TEXT = "the quick brown fox jumps over the lazy dog. "
TRAIN_STEPS = 30  # enough for the MTP module to predict most next-but-one bytes of TEXT
# The tiny_deepseek_v3 preset (MLA, MoE, first layer dense, one MTP depth) shrunk.
SHRUNK = ("mesh.expert=1", "model.d_model=32", "model.ffn_dim=64", "moe.expert_ffn_dim=16",
          "model.q_lora_rank=16", "model.kv_lora_rank=16", "model.qk_nope_head_dim=8",
          "model.qk_rope_head_dim=4", "model.v_head_dim=8", "model.num_layers=2",
          "train.seq_len=32", "train.global_batch_size=8", f"train.steps={TRAIN_STEPS}",
          "train.warmup_steps=3", "train.learning_rate=1e-2")
# The dense model: an 8-token vocabulary, so that the distribution test can enumerate
# continuations.
VOCAB, TWO_DEPTHS = 8, 2
DENSE = ("moe.num_experts=0", "model.num_layers=1", f"model.vocab_size={VOCAB}",
         f"model.mtp_depth={TWO_DEPTHS}")


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity (plain_greedy's cache)
class Case:
    cfg: moejax.Config
    params: object  # carrying their router state
    prompts: np.ndarray  # [B, P]
    cache_len: int  # every greedy request of a case uses it: one compilation per case


def random_params(cfg, seed: int, adjust=lambda name, values: values):
    """Parameters drawn in numpy (no compile): N(0, 0.02^2) weights, norm weights near 1, then
    `adjust(leaf name, values)`."""
    rng = np.random.default_rng(seed)

    def leaf(path, spec):
        name = jax.tree_util.keystr(path)
        is_norm = name.endswith("norm")
        values = rng.normal(1.0 if is_norm else 0.0, 0.1 if is_norm else 0.02, spec.shape)
        return adjust(name, values).astype(spec.dtype)

    params = jax.tree_util.tree_map_with_path(leaf, P.abstract(param_specs(cfg)))
    return jax.device_put(params, jax.devices()[0])


def trained_model(directory):
    """The shrunk tiny_deepseek_v3 trained for a few dozen steps on TEXT (moejax.loss_fn and the
    trainer's optimizer), written as a Hugging Face DeepSeek-V3 checkpoint with its MTP layer
    into `directory` and loaded back as scripts/generate.py loads it -> LoadedModel."""
    cfg = moejax.load_config("tiny_deepseek_v3", SHRUNK)
    optimizer = make_optimizer(cfg)

    @jax.jit
    def step(params, opt_state, tokens):
        grads, _ = jax.grad(moejax.loss_fn, has_aux=True)(params, {"tokens": tokens}, cfg)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params = random_params(cfg, 0)
    # committed to the device, as the step returns it: the step's second call then reuses its
    # first compilation (an uncommitted step count would compile the step again)
    opt_state = jax.device_put(optimizer.init(params), jax.devices()[0])
    data = ByteText().encode(TEXT * 40)
    rng = np.random.default_rng(0)
    for _ in range(TRAIN_STEPS):
        starts = rng.integers(0, len(data) - cfg.train.seq_len - 1, cfg.train.global_batch_size)
        batch = np.stack([data[s:s + cfg.train.seq_len + 1] for s in starts])
        params, opt_state = step(params, opt_state, batch)
    save_hf(cfg, params, directory, "DeepseekV3ForCausalLM")
    return load_model(directory)


def agreeing_mla_params(cfg, router_state):
    """A random model whose MTP drafts agree with the main model often but not always:
    embedding and head large against the blocks' contributions, so that both predict mostly
    from the newest token, and the MTP projection passing the embedding through (its
    hidden-state half zero)."""
    width = cfg.model.d_model

    def adjust(name, values):
        if name in (".embed", ".lm_head"):
            return values * 10.0  # std 0.2: drafts kept about half the time
        if name == ".mtp.proj":  # [D_mtp, 2D, D]: the embedding's rows first
            values[:, :width] = np.eye(width)
            values[:, width:] = 0.0
        return values

    return random_params(cfg, 7, adjust).replace(router_state=router_state)


def dense_params(cfg):
    """Peaked next-token distributions (large embedding and head); MTP projections that lean on
    the newest token's embedding, so drafts agree with the main model about three times in
    four."""
    width = cfg.model.d_model

    def adjust(name, values):
        if name in (".embed", ".lm_head"):
            return values * 20.0
        if name == ".mtp.proj":
            values[:, :width] += np.eye(width)
            return values * 3.0
        return values

    return random_params(cfg, 13, adjust)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    hf_dir = tmp_path_factory.mktemp("speculative") / "hf"
    model = trained_model(hf_dir)
    assert model.cfg.model.mtp_depth == 1 and model.params.mtp is not None
    prompts = np.stack([ByteText().encode(t) for t in ("the quick", "jumps ove", "lazy dog.")])
    dense_cfg = tiny_config(*DENSE)
    return {
        "trained": Case(model.cfg, model.params, prompts, 20),
        "random": Case(model.cfg, agreeing_mla_params(model.cfg, model.router_state), prompts,
                       20),
        "two_depths": Case(dense_cfg, dense_params(dense_cfg),
                           np.array([[3, 1, 4], [1, 5, 2], [6, 5, 3]]), 16),
        "hf_dir": hf_dir,
    }


@functools.cache
def plain_greedy(case: Case):
    """Plain greedy tokens [B, cache_len] of the case's prompts and the cache: the functions
    generate() runs (the same compilations), called directly for the cache."""
    prompt = jnp.asarray(case.prompts, jnp.int32)
    cfg = generation_config(case.cfg)
    sampling = (jnp.float32(0.0), jnp.float32(1.0))
    router_state = effective_router_state(case.params, cfg)
    bare = case.params.replace(router_state=None)
    first, _, cache = _prefill(bare, prompt, jax.random.key(0), sampling, router_state, cfg=cfg,
                               cache_len=case.cache_len, keep_logits=False)
    tokens, _, cache = _decode(bare, prompt, first, None, cache, jax.random.key(0), sampling,
                               router_state, cfg=cfg,
                               num_steps=case.cache_len - prompt.shape[1] - 1)
    return np.asarray(tokens), cache


@pytest.mark.parametrize("name", ["trained", "random", "two_depths"])
def test_greedy_speculative_equals_plain_greedy(cases, name):
    """Three prompts, lengths from one new token (no verification step) to the most the cache
    holds (the last verification writes the cache's last slot)."""
    case = cases[name]
    depth, prompt_len = case.cfg.model.mtp_depth, case.prompts.shape[1]
    expected, _ = plain_greedy(case)
    longest = case.cache_len - prompt_len - depth + 1
    drafted = accepted = steps = 0
    for new_tokens in (1, 2, 5, longest - 1, longest):
        tokens, stats = speculative_generate(case.params, case.cfg, case.prompts, new_tokens,
                                             cache_len=case.cache_len)
        np.testing.assert_array_equal(tokens, expected[:, :prompt_len + new_tokens],
                                      err_msg=f"{new_tokens} new tokens")
        assert stats.committed >= new_tokens and stats.drafted == depth * stats.steps
        drafted, accepted, steps = (drafted + stats.drafted, accepted + stats.accepted,
                                    steps + stats.steps)
    print(f"{name}: {accepted} of {drafted} drafts accepted in {steps} steps")
    if name == "trained":  # each accepted draft is a step that also took the bonus token
        assert accepted >= 0.5 * drafted  # an untrained MTP module: ~never
    else:  # rejections, with their rollback; two depths: also steps that kept both drafts
        assert 0 < accepted < drafted and (depth == 1 or accepted > steps)


def test_generate_speculative_mtp_is_speculative_generate(cases):
    case = cases["random"]
    expected, _ = speculative_generate(case.params, case.cfg, case.prompts, 6,
                                       cache_len=case.cache_len)
    tokens = generate(case.params, case.cfg, case.prompts, 6, cache_len=case.cache_len,
                      speculative="mtp")
    np.testing.assert_array_equal(tokens, expected)


@pytest.mark.parametrize("name", ["random", "two_depths"])
def test_rollback_leaves_the_cache_of_plain_decoding(cases, name):
    """Rejected drafts' cache slots are zeroed: the cache after speculative decoding (the MLA
    latent cache; GQA keys and values) equals plain decoding's cache of the same committed
    tokens, empty slots included."""
    case = cases[name]
    expected_tokens, plain_cache = plain_greedy(case)
    prompt = jnp.asarray(case.prompts, jnp.int32)
    # a long request whose overshoot (up to D tokens past it) plain decoding has decided too
    total_len = case.cache_len - case.cfg.model.mtp_depth
    state = _run_speculative(case.params, case.cfg, prompt, total_len, None, 0.0, 1.0, None,
                             case.cache_len)
    assert int(state.accepted) < case.cfg.model.mtp_depth * int(state.steps)  # rolled back
    written = int(state.last)  # positions 0 .. last - 1 are in the cache
    np.testing.assert_array_equal(state.tokens[:, :written + 1], expected_tokens[:, :written + 1])
    if case.cfg.model.attention == "mla":  # the compressed latent [L, B, S, Rkv]
        assert state.cache.dense[0].shape[2:] == (case.cache_len, case.cfg.model.kv_lora_rank)
    for got, want in zip(jax.tree.leaves(state.cache), jax.tree.leaves(plain_cache)):
        got, want = np.asarray(got), np.asarray(want)
        np.testing.assert_allclose(got[:, :, :written], want[:, :, :written], rtol=1e-5,
                                   atol=1e-6)
        assert np.all(got[:, :, written:] == 0), "a rejected draft's entry stayed"


# The distribution test: the joint distribution of the first three new tokens (8^3 sequences)
# is computed exactly from the uncached forward of every continuation.
SAMPLES, NEW = 4000, 3
CHI2_QUANTILE = 0.999  # the test fails when the statistic exceeds this quantile of chi-square


def exact_distribution(cfg, params, prompt, temperature, top_p) -> np.ndarray:
    """Probability [V ** 3] of each continuation (t1, t2, t3) of prompt [1, P] under plain
    sampling."""
    grid = np.stack(np.meshgrid(*[np.arange(VOCAB)] * NEW, indexing="ij"), -1).reshape(-1, NEW)
    tokens = np.concatenate([np.repeat(prompt, len(grid), axis=0), grid], axis=1)
    logits, _ = jax.jit(moejax.forward, static_argnums=2)(params, tokens[:, :-1], cfg)
    probs = np.asarray(_distribution(logits[:, -NEW:], temperature, top_p))  # [V^3, 3, V]
    return np.prod(np.take_along_axis(probs, grid[..., None], axis=-1)[..., 0], axis=1)


def chi_square(samples: np.ndarray, expected_probs: np.ndarray) -> tuple[float, float]:
    """(statistic, threshold) of the goodness of fit of samples [N, 3] to the V^3 cells, cells
    with an expected count under 5 pooled into one (none at all may fall in impossible ones)."""
    cells = np.ravel_multi_index(samples.T, (VOCAB,) * NEW)
    observed = np.bincount(cells, minlength=VOCAB ** NEW)
    expected = expected_probs * len(samples)
    assert not np.any(observed[expected_probs == 0]), "a continuation top-p excludes"
    small = (expected < 5) & (expected_probs > 0)
    large = expected >= 5
    if np.any(small):
        observed = np.append(observed[large], observed[small].sum())
        expected = np.append(expected[large], expected[small].sum())
    else:
        observed, expected = observed[large], expected[large]
    statistic = float(np.sum((observed - expected) ** 2 / expected))
    return statistic, float(scipy_stats.chi2.ppf(CHI2_QUANTILE, len(expected) - 1))


@functools.partial(jax.jit, static_argnums=1)
def speculative_samples(params, cfg, prompt, keys, temperature, top_p):
    """The final speculative loop state of one prompt row [1, P] per key (vmapped, so that
    each sample's acceptance is its own, not the fewest of a batch)."""
    prompt_len, depth = prompt.shape[1], cfg.model.mtp_depth
    return jax.vmap(lambda key: _run_speculative(params, cfg, prompt, prompt_len + NEW, key,
                                                 temperature, top_p, None,
                                                 prompt_len + NEW + depth - 1))(keys)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_speculative_sampling_follows_the_plain_distribution(cases, temperature, top_p):
    case = cases["two_depths"]
    prompt = case.prompts[:1]
    prompt_len = prompt.shape[1]
    exact = exact_distribution(case.cfg, case.params, prompt, temperature, top_p)
    key = jax.random.key(2024)
    plain = generate(case.params, case.cfg, np.repeat(prompt, SAMPLES, axis=0), NEW, key=key,
                     temperature=temperature, top_p=top_p)
    states = speculative_samples(case.params, case.cfg, jnp.asarray(prompt, jnp.int32),
                                 jax.random.split(key, SAMPLES), jnp.float32(temperature),
                                 jnp.float32(top_p))
    speculative = np.asarray(states.tokens[:, 0, prompt_len:prompt_len + NEW])
    acceptance = float(jnp.sum(states.accepted) / (TWO_DEPTHS * jnp.sum(states.steps)))
    # acceptance is 1 - TV(p, q): drafts kept without correction would be visibly off
    assert 0.2 < acceptance < 0.9, acceptance
    for name, samples in (("plain", np.asarray(plain)[:, prompt_len:]),
                          ("speculative", speculative)):
        statistic, threshold = chi_square(samples, exact)
        print(f"T={temperature} top-p={top_p} {name}: chi-square {statistic:.1f} "
              f"(threshold {threshold:.1f}), acceptance {acceptance:.2f}")
        assert statistic < threshold, name


@functools.partial(jax.jit, static_argnums=2)
def drafting_cross_entropies(params, tokens, cfg):
    """Each MTP depth's cross-entropy [D_mtp] over tokens [B, T + 1], as loss_fn defines it,
    from forward_cached and mtp_cached with empty caches."""
    batch, seq = tokens.shape[0], tokens.shape[1] - 1
    cache = moejax.init_cache(cfg, batch, seq)
    _, _, hidden = moejax.forward_cached(params, tokens[:, :-1], 0, cache, cfg,
                                         return_hidden=True)
    cross_entropies = []
    for depth in range(1, cfg.model.mtp_depth + 1):
        length = seq - depth
        depth_cache = tuple(c[0] for c in moejax.init_cache(cfg, batch, length).dense)
        logits, hidden, _ = mtp_cached(params, depth, hidden[:, :length],
                                       tokens[:, depth:depth + length], 0, depth_cache, cfg)
        targets = tokens[:, depth + 1:depth + 1 + length]
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        cross_entropies.append(-jnp.mean(jnp.take_along_axis(log_probs, targets[..., None], -1)))
    return jnp.stack(cross_entropies)


def test_drafting_pass_is_the_training_time_mtp_pass(cases):
    """mtp_cached over a whole sequence gives the logits whose cross-entropy loss_fn reports."""
    case = cases["two_depths"]
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, VOCAB, (2, 12)), jnp.int32)
    _, metrics = jax.jit(moejax.loss_fn, static_argnums=2)(case.params, {"tokens": tokens},
                                                           case.cfg)
    drafted = drafting_cross_entropies(case.params, tokens, case.cfg)
    for depth in range(1, TWO_DEPTHS + 1):
        np.testing.assert_allclose(drafted[depth - 1], metrics[f"mtp_cross_entropy_{depth}"],
                                   rtol=1e-5)


@pytest.mark.parametrize("request_args, message", [
    ({"speculative": "medusa"}, "speculative='medusa' is not a drafting method"),
    ({"cache_len": 14}, "need cache_len >= 15, not 14"),
    ({"return_logits": True}, "return_logits is not available with speculative decoding"),
])
def test_bad_speculative_requests_are_refused_in_one_line(cases, request_args, message):
    case = cases["two_depths"]  # 3-token prompts, two MTP depths: 11 new tokens need 15
    args = {"speculative": "mtp", **request_args}
    with pytest.raises(GenerationError) as error:
        generate(case.params, case.cfg, case.prompts, 11, **args)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_model_without_mtp_is_refused_in_one_line():
    cfg = tiny_config()
    params = P.abstract(param_specs(cfg))  # never run: the check comes first
    with pytest.raises(GenerationError) as error:
        generate(params, cfg, [[1, 2]], 4, speculative="mtp")
    message = str(error.value)
    assert "has none (model.mtp_depth=0)" in message and "\n" not in message


def test_script_speculative_greedy_prints_the_plain_text(cases, capsys):
    case = cases["trained"]
    new_tokens = case.cache_len - case.prompts.shape[1]  # the default cache is then cache_len
    argv = [str(cases["hf_dir"]), "--prompt", "the quick", "--max-new-tokens", str(new_tokens),
            "--num-samples", "3", "--speculative", "mtp"]
    assert load_script("generate").main(argv) == 0
    captured = capsys.readouterr()
    expected, _ = plain_greedy(case)
    text = ByteText().decode(expected[0])
    assert captured.out == "".join(f"--- sample {i} ---\n{text}\n" for i in (1, 2, 3))
    assert "drafts accepted" in captured.err
