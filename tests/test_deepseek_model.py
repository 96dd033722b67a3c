"""DeepSeek-V3 model pieces: YaRN frequencies, multi-token prediction, the 671B preset's counts.

(MLA's numerics against transformers are in test_convert_deepseek.py, its mesh equivalence in
test_mesh_equivalence.py, its cached form in test_generate.py.)
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import max_relative_error, tiny_config

import moejax
from moejax.model.attention import softmax_scale
from moejax.model.layers import rms_norm, rope_frequencies
from moejax.model.transformer import _decoder, _Layers, output_logits
from moejax.training.run import build_run
from moejax.training.step import mtp_loss_weight

MLA = ("model.attention=mla", "model.q_lora_rank=16", "model.kv_lora_rank=16",
       "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=4", "model.v_head_dim=8")
YARN = ("model.rope_scaling=yarn", "model.yarn_factor=40", "model.yarn_original_max_len=4096",
        "model.yarn_beta_fast=32", "model.yarn_beta_slow=1", "model.yarn_mscale=1.0",
        "model.yarn_mscale_all_dim=1.0")


def _hf_yarn(dim, **rope):
    """Inverse frequencies and cos/sin scale from transformers' own YaRN implementation."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.DeepseekV3Config(
        qk_rope_head_dim=dim, max_position_embeddings=rope["original_max_position_embeddings"] * 4,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, **rope})
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](config)
    return inv_freq.numpy(), attention_factor


@pytest.mark.parametrize("rope", [
    {"factor": 40.0, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
     "original_max_position_embeddings": 4096},  # DeepSeek-V3's released setting
    {"factor": 4.0, "beta_fast": 8, "beta_slow": 2, "mscale": 0.707, "mscale_all_dim": 1.0,
     "original_max_position_embeddings": 64},  # other betas and a cos/sin scale != 1
])
def test_yarn_frequencies_match_transformers(rope):
    cfg = tiny_config(*MLA, "model.rope_scaling=yarn", f"model.yarn_factor={rope['factor']}",
                      f"model.yarn_beta_fast={rope['beta_fast']}",
                      f"model.yarn_beta_slow={rope['beta_slow']}",
                      f"model.yarn_mscale={rope['mscale']}",
                      f"model.yarn_mscale_all_dim={rope['mscale_all_dim']}",
                      f"model.yarn_original_max_len={rope['original_max_position_embeddings']}",
                      "model.qk_rope_head_dim=64")
    expected_freq, expected_scale = _hf_yarn(64, **rope)
    inv_freq, scale = rope_frequencies(64, cfg.model)
    np.testing.assert_allclose(inv_freq, expected_freq, rtol=1e-6)
    assert scale == pytest.approx(expected_scale, rel=1e-6)
    plain, _ = rope_frequencies(64, cfg.model.__class__(rope_theta=cfg.model.rope_theta))
    assert inv_freq[0] == pytest.approx(plain[0])  # the fastest frequency is kept
    assert inv_freq[-1] == pytest.approx(plain[-1] / rope["factor"])  # the slowest is divided


def test_mla_softmax_scale_has_the_yarn_mscale():
    cfg = tiny_config(*MLA, *YARN)
    mscale = 0.1 * math.log(40) + 1  # 1.3689
    assert softmax_scale(cfg.model) == pytest.approx((8 + 4) ** -0.5 * mscale**2)
    assert softmax_scale(tiny_config(*MLA).model) == pytest.approx(12**-0.5)


# Multi-token prediction.

MTP_MOE = (*MLA, "model.mtp_depth=2", "moe.seq_balance_loss_coef=0.01")


def _tokens(cfg, seed=3):
    shape = (cfg.train.global_batch_size, cfg.train.seq_len + 1)
    return jax.random.randint(jax.random.key(seed), shape, 0, cfg.model.vocab_size)


def _reference_mtp_cross_entropies(params, tokens, cfg):
    """MTP written out position by position: depth k joins the previous depth's hidden state at
    i with the embedding of token i + k and predicts token i + k + 1."""
    m = cfg.model
    seq = tokens.shape[1] - 1
    hidden, _, _, _ = _decoder(params, tokens[:, :-1], jnp.arange(seq), cfg, None)
    router = moejax.init_router_state(cfg)
    losses = []
    for depth in range(1, m.mtp_depth + 1):
        module = jax.tree.map(lambda leaf, d=depth: leaf[d - 1], params.mtp)
        inputs, targets = [], []
        for i in range(seq - depth):
            inputs.append(jnp.concatenate([
                rms_norm(params.embed[tokens[:, i + depth]], module.embed_norm, m.norm_eps),
                rms_norm(hidden[:, i], module.hidden_norm, m.norm_eps)], axis=-1))
            targets.append(tokens[:, i + depth + 1])
        x = jnp.stack(inputs, axis=1) @ module.proj
        layers = _Layers(cfg, jnp.arange(seq - depth), router)
        hidden, _, _ = layers.moe(module.block, x, router.bias[cfg.num_moe_layers + depth - 1])
        logits = output_logits(params, hidden, module.final_norm, cfg)
        losses.append(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
            logits, jnp.stack(targets, axis=1))))
    return losses


def test_mtp_loss_decomposes_as_documented():
    cfg = tiny_config(*MTP_MOE)
    params = moejax.init_params(cfg, jax.random.key(0))
    tokens = _tokens(cfg)
    loss, metrics = jax.jit(lambda p: moejax.loss_fn(p, {"tokens": tokens}, cfg, None, 0.3))(params)
    expected = jax.jit(_reference_mtp_cross_entropies, static_argnums=2)(params, tokens, cfg)
    for depth, reference in enumerate(expected, start=1):
        assert float(metrics[f"mtp_cross_entropy_{depth}"]) == pytest.approx(float(reference),
                                                                             rel=1e-5)
    main_only = tiny_config(*MLA, "moe.seq_balance_loss_coef=0.01")
    main_loss, main_metrics = jax.jit(moejax.loss_fn, static_argnums=2)(
        params.replace(mtp=None), {"tokens": tokens}, main_only)
    assert float(metrics["cross_entropy"]) == pytest.approx(float(main_metrics["cross_entropy"]),
                                                            rel=1e-6)
    # loss = main CE + main router losses + (lambda / D) sum_k (CE_k + router losses_k)
    mtp_part = float(loss) - float(main_loss)
    mtp_ce = sum(float(ce) for ce in expected)
    assert float(metrics["mtp_aux_loss"]) > 0  # the MTP blocks' balance losses
    assert mtp_part == pytest.approx(0.3 / 2 * (mtp_ce + float(metrics["mtp_aux_loss"])),
                                     rel=1e-5)
    assert metrics["expert_counts"].shape == (cfg.num_moe_layers + 2, cfg.moe.num_experts)


def test_mtp_weight_schedule():
    cfg = tiny_config("train.steps=100", "train.mtp_weight_switch_fraction=0.7")
    weights = [float(mtp_loss_weight(cfg, jnp.int32(step))) for step in (0, 69, 70, 99)]
    assert weights == pytest.approx([0.3, 0.3, 0.1, 0.1])


def _train(cfg, steps=3):
    """Main-model params, router bias and per-step cross-entropy after `steps` on one device."""
    mesh = moejax.make_mesh(cfg.mesh, devices=jax.devices()[:1])
    run = build_run(cfg, mesh, key=jax.random.key(0))
    state = run.state
    with jax.set_mesh(mesh):
        losses = []
        for _ in range(steps):
            state, metrics = run.step(state, {"tokens": _tokens(cfg)})
            losses.append(float(metrics["cross_entropy"]))
    return state.params.replace(mtp=None), state.router.bias[:cfg.num_moe_layers], losses


def test_mtp_with_zero_weight_trains_like_no_mtp():
    one_device = ("mesh.expert=1", "train.global_batch_size=4", "train.warmup_steps=1",
                  "model.num_layers=2")
    base = (*MLA, *one_device, "moe.seq_balance_loss_coef=0.01")
    plain = tiny_config(*base, num_devices=1)
    with_mtp = tiny_config(*base, "model.mtp_depth=1", "train.mtp_loss_weight=0",
                           "train.mtp_loss_weight_final=0", num_devices=1)
    params, bias, losses = _train(plain)
    mtp_params, mtp_bias, mtp_losses = _train(with_mtp)
    assert mtp_losses == pytest.approx(losses, rel=1e-6)
    assert losses[-1] < losses[0]  # the parameters did move
    assert max_relative_error(mtp_params, params) <= 1e-5
    np.testing.assert_allclose(mtp_bias, bias)


# The full-size preset, without allocating it.


def _published_v3_counts():
    """Parameter counts of DeepSeek-V3 from its published shapes, written out by hand."""
    d, vocab, heads = 7168, 129280, 128
    attention = (d * 1536 + 1536 + 1536 * heads * (128 + 64)  # query latent, norm, expansion
                 + d * (512 + 64) + 512 + 512 * heads * (128 + 128)  # kv latent + rope key
                 + heads * 128 * d)  # output
    expert = 3 * d * 2048
    dense_layer = attention + 3 * d * 18432 + 2 * d
    moe_layer = attention + d * 256 + 257 * expert + 2 * d
    moe_layer_active = attention + d * 256 + (8 + 1) * expert + 2 * d
    mtp = 2 * d + 2 * d * d + moe_layer + d
    main = 3 * dense_layer + 58 * moe_layer + 2 * vocab * d + d
    active = 3 * dense_layer + 58 * moe_layer_active + 2 * vocab * d + d
    return {"total": main, "active": active, "embedding": vocab * d, "mtp": mtp}


def test_deepseek_v3_671b_counts():
    cfg = moejax.load_config("deepseek_v3_671b", num_devices=8)
    counts = moejax.count_params(cfg)
    published = _published_v3_counts()
    for name in published:
        assert counts[name] == published[name], name
    assert counts["total"] == pytest.approx(671e9, rel=0.01)
    # 37B activated per token (report); 37.55B counting the whole embedding table, of which a
    # token reads one row: 36.63B without it.
    assert counts["active"] == pytest.approx(37e9, rel=0.015)
    assert counts["active"] - counts["embedding"] == pytest.approx(36.7e9, rel=0.01)
    assert counts["mtp"] == pytest.approx(11.5e9, rel=0.01)  # the MTP module's unique weights


def test_deepseek_v3_671b_shapes_without_allocating():
    cfg = moejax.load_config("deepseek_v3_671b", num_devices=8)
    abstract = jax.eval_shape(lambda key: moejax.init_params(cfg, key), jax.random.key(0))
    leaves = jax.tree.leaves(abstract)
    assert sum(leaf.size for leaf in leaves) == moejax.count_params(cfg)["total"] + \
        moejax.count_params(cfg)["mtp"]
    assert abstract.moe_blocks.attn.wkv_b.shape == (58, 512, 128, 256)
    assert abstract.mtp.block.ffn.w_gate.shape == (1, 256, 7168, 2048)
