"""DeepSeek-V3 checkpoint interop: tiny random DeepseekV3ForCausalLM models built in torch (MLA,
grouped sigmoid routing with a nonzero selection bias, shared experts, a leading dense layer;
one with a query latent, one without and with YaRN), saved with save_pretrained in float32, loaded
into moejax with the plain calls (the parameters carry the selection bias, the precision follows
the checkpoint) and compared (logits, router choices); exported back and reloaded (bit-equal, and
loadable by transformers); MTP layers, block-fp8 weights, and the conversion errors."""

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from helpers import assert_trees_bit_equal, load_script
from jax.sharding import NamedSharding, PartitionSpec
from safetensors.torch import load_file, save_file

import moejax
from moejax.config import MeshConfig
from moejax.convert import ConversionError, config_from_hf, load_hf, load_moejax, save_hf
from moejax.convert.architectures import ARCHITECTURES, LayoutOptions
from moejax.convert.hf import param_specs
from moejax.convert.layout import ROUTER_STATE, leaf_specs
from moejax.model.attention import softmax_scale
from moejax.model.layers import yarn_cos_sin_scale
from moejax.model.router import route
from moejax.params import ParamSpec

NAME = "DeepseekV3ForCausalLM"
SEQ_LEN, BATCH = 16, 2
COMMON = {"vocab_size": 64, "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 4,
          "n_routed_experts": 8, "moe_intermediate_size": 16, "kv_lora_rank": 16,
          "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8,
          "first_k_dense_replace": 1, "tie_word_embeddings": False}
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 8.0,
        "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 64}
HF_CONFIGS = {
    # query latent; 4 groups of 2 experts, 2 kept; the dense layer 200 wide (> one 128 fp8 block);
    # rms_norm_eps 1e-5, while the latent norms keep 1e-6 (as in transformers and DeepSeek's code)
    "q_latent_grouped": {
        "num_hidden_layers": 3, "rms_norm_eps": 1e-5, "q_lora_rank": 16, "intermediate_size": 200,
        "n_shared_experts": 2, "num_experts_per_tok": 3, "n_group": 4, "topk_group": 2,
        "routed_scaling_factor": 2.5, "norm_topk_prob": True},
    # queries straight from the model width, YaRN (ramp over the 4 RoPE frequencies, cos/sin
    # and softmax scales != 1), un-normalised weights
    "no_q_latent_yarn": {
        "num_hidden_layers": 3, "rms_norm_eps": 1e-6, "q_lora_rank": None, "intermediate_size": 48,
        "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
        "routed_scaling_factor": 1.5, "norm_topk_prob": False, "rope_parameters": YARN,
        "max_position_embeddings": 256},
}


def _hf_model(variant: str, seed: int) -> transformers.DeepseekV3ForCausalLM:
    """Random weights (norms around 1) and a random nonzero selection bias in every MoE layer,
    so that no mapping error hides behind a zero or a one."""
    config = transformers.DeepseekV3Config(**COMMON, **HF_CONFIGS[variant])
    model = transformers.DeepseekV3ForCausalLM(config).float().eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(0.5 + torch.rand(param.shape, generator=generator))
            else:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
        for layer in model.model.layers[config.first_k_dense_replace:]:
            bias = layer.mlp.gate.e_score_correction_bias
            bias.copy_(0.3 * torch.randn(bias.shape, generator=generator))
    return model


_jit_forward = jax.jit(moejax.forward, static_argnums=2)


def _logits(params, tokens, cfg, router_state=None) -> np.ndarray:
    return np.asarray(_jit_forward(params, jnp.asarray(tokens), cfg, router_state)[0])


def _gate_hooks(model):
    """Forward hooks on each MoE layer's router: its input [B, T, D] and chosen ids [B T, k]."""
    captured = {}
    for i, layer in enumerate(model.model.layers):
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.register_forward_hook(
                lambda module, args, out, i=i: captured.__setitem__(
                    i, (args[0].detach().numpy(), out[2].numpy(), out[1].detach().numpy())))
    return captured


@dataclasses.dataclass
class Case:
    variant: str
    hf_model: transformers.DeepseekV3ForCausalLM
    hf_dir: Path
    tokens: np.ndarray  # [B, T]
    hf_logits: np.ndarray  # [B, T, V]
    gates: dict  # HF MoE layer -> (router input [B, T, D], ids [B T, k], weights [B T, k])
    cfg: moejax.Config
    params: moejax.Transformer
    router_state: moejax.RouterState  # the one params carry
    logits: np.ndarray  # of the plain moejax.forward(params, tokens, cfg)


def _build_case(variant: str, directory: Path) -> Case:
    model = _hf_model(variant, seed=len(variant))
    model.save_pretrained(directory)
    cfg, params = load_hf(directory)[:2]  # the plain calls, as a user makes them
    gates = _gate_hooks(model)
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (BATCH, SEQ_LEN))
    with torch.no_grad():
        hf_logits = model(torch.as_tensor(tokens)).logits.numpy()
    logits, _ = moejax.forward(params, jnp.asarray(tokens), cfg)
    return Case(variant, model, directory, tokens, hf_logits, dict(gates), cfg, params,
                params.router_state, np.asarray(logits))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """variant -> Case, each built once on first use (by `case` or `grouped`)."""
    cases = {}

    def get(variant: str) -> Case:
        if variant not in cases:
            cases[variant] = _build_case(variant, tmp_path_factory.mktemp(variant))
        return cases[variant]

    return get


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def case(request, built) -> Case:
    return built(request.param)


@pytest.fixture(scope="module")
def grouped(built) -> Case:
    return built("q_latent_grouped")


def test_config_mapping(case):
    m, e = case.cfg.model, case.cfg.moe
    assert (m.attention, m.num_layers, m.num_dense_layers, m.mtp_depth) == ("mla", 3, 1, 0)
    assert (m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim) == (16, 8, 8, 8)
    assert (e.router, e.num_experts, e.expert_ffn_dim, e.capacity_factor) == ("deepseek", 8, 16,
                                                                              None)
    if case.variant == "q_latent_grouped":
        assert (m.q_lora_rank, m.ffn_dim, m.rope_scaling) == (16, 200, "none")
        assert (e.num_groups, e.topk_groups, e.top_k, e.num_shared_experts) == (4, 2, 3, 2)
        assert (e.routed_scaling_factor, e.normalize_weights) == (2.5, True)
    else:
        assert (m.q_lora_rank, m.ffn_dim, m.rope_scaling) == (0, 48, "yarn")
        assert (m.yarn_factor, m.yarn_beta_fast, m.yarn_beta_slow) == (4.0, 8.0, 1.0)
        assert (m.yarn_original_max_len, m.yarn_mscale, m.yarn_mscale_all_dim) == (64, 0.707, 1.0)
        assert (e.num_groups, e.topk_groups, e.top_k, e.num_shared_experts) == (2, 1, 2, 1)
        assert (e.routed_scaling_factor, e.normalize_weights) == (1.5, False)


def test_router_state_holds_the_correction_bias(case):
    """Carried by the parameters, and returned as well on request (with_router_state)."""
    hf_bias = [layer.mlp.gate.e_score_correction_bias.numpy()
               for layer in case.hf_model.model.layers[1:]]
    assert case.router_state.bias.dtype == jnp.float32
    np.testing.assert_array_equal(case.router_state.bias, np.stack(hf_bias))
    assert float(case.router_state.temperature) == 1.0
    assert len(load_hf(case.hf_dir)) == 2  # (config, params) by default
    _, params, state = load_hf(case.hf_dir, with_router_state=True)
    assert_trees_bit_equal(state, case.router_state)
    assert_trees_bit_equal(params, case.params)


def test_logits_match_transformers(case):
    """load_hf then moejax.forward, nothing else: float32 like the checkpoint, the selection
    bias carried by the parameters."""
    assert np.abs(case.hf_logits).max() > 0.5  # a comparison of near-zero logits proves little
    assert case.cfg.precision.compute_dtype == case.cfg.precision.param_dtype == "float32"
    np.testing.assert_allclose(case.logits, case.hf_logits, rtol=0, atol=1e-4)
    # the selection bias matters here: without it the routing, hence the logits, differ
    dropped = _logits(case.params.replace(router_state=None), case.tokens, case.cfg)
    assert np.abs(dropped - case.hf_logits).max() > 1e-2
    # an explicitly passed router state wins over the carried one: the same routing as no
    # state. Not bit-equal: there the zero bias is a constant, here an argument, and XLA:CPU
    # fuses the sigmoid around the expert choice differently (last-bit differences); another
    # routing would move the logits by > 1e-2, as above
    no_bias = case.router_state.replace(bias=jnp.zeros_like(case.router_state.bias))
    np.testing.assert_allclose(_logits(case.params, case.tokens, case.cfg, no_bias), dropped,
                               rtol=0, atol=1e-5)


def test_loss_uses_the_carried_state_and_never_trains_it(grouped):
    """loss_fn too reads the carried bias (its cross-entropy is that of the logits matching
    transformers); the bias gets no gradient (state, not a parameter)."""
    tokens = np.concatenate([grouped.tokens, grouped.tokens[:, :1]], axis=1)  # [B, T + 1]
    loss = jax.jit(jax.grad(lambda p: moejax.loss_fn(p, {"tokens": jnp.asarray(tokens)},
                                                     grouped.cfg), has_aux=True))
    grads, metrics = loss(grouped.params)
    log_probs = np.asarray(jax.nn.log_softmax(grouped.logits, axis=-1))
    cross_entropy = -np.take_along_axis(log_probs, tokens[:, 1:, None], -1).mean()
    np.testing.assert_allclose(metrics["cross_entropy"], cross_entropy, rtol=1e-5)
    assert not np.asarray(grads.router_state.bias).any()
    assert not np.asarray(grads.router_state.temperature).any()


def test_router_choices_match_transformers(case):
    """Same chosen experts as sets (HF's top-k is unsorted) and the same weights."""
    moe = case.params.moe_blocks.ffn
    assert sorted(case.gates) == [1, 2]  # both MoE layers were seen
    for hf_layer, (x, hf_ids, hf_weights) in sorted(case.gates.items()):
        layer = hf_layer - case.cfg.num_dense_layers
        routing = route(jnp.asarray(x), moe.router[layer], case.router_state.bias[layer], 1.0,
                        case.cfg.moe)
        ids = np.asarray(routing.expert_ids).reshape(hf_ids.shape)
        assert [set(row) for row in ids] == [set(row) for row in hf_ids]
        weights = np.asarray(routing.weights).reshape(hf_weights.shape)
        np.testing.assert_allclose(np.take_along_axis(weights, np.argsort(ids), -1),
                                   np.take_along_axis(hf_weights, np.argsort(hf_ids), -1),
                                   rtol=0, atol=1e-6)


def test_layout_covers_every_parameter_exactly_once(case):
    """Each element of each parameter (and of the router bias) is placed by one tensor, for
    both expert layouts and both RoPE layouts."""
    cfg = dataclasses.replace(case.cfg, model=dataclasses.replace(case.cfg.model, mtp_depth=1))
    leaves = leaf_specs(param_specs(cfg))[0]
    counts = {path: np.zeros(spec.shape) for path, spec in leaves.items()}
    counts[(ROUTER_STATE, "bias")] = np.zeros((cfg.num_moe_layers + 1, cfg.moe.num_experts))
    for fused in (False, True):
        for interleave in (False, True):
            for values in counts.values():
                values[...] = 0
            for tensor in ARCHITECTURES[NAME].layout(cfg, LayoutOptions(fused, 1.0, interleave)):
                if tensor.duplicate_of is not None:  # checked against its original, not placed
                    continue
                for placement in tensor.placements:
                    counts[placement.leaf][placement.index] += placement.to_moejax(
                        np.ones(tensor.shape))
            assert all((c == 1).all() for c in counts.values()), (fused, interleave)


def test_export_then_import_is_identity(case, tmp_path):
    """The router state the parameters carry is exported with them."""
    files = save_hf(case.cfg, case.params, tmp_path, NAME, max_shard_bytes=20_000)
    assert len(files) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    cfg, params = load_hf(tmp_path)
    assert cfg == case.cfg
    assert_trees_bit_equal(params, case.params)


def test_exported_checkpoint_loads_in_transformers(case, tmp_path):
    save_hf(case.cfg, case.params, tmp_path, NAME, router_state=case.router_state)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(model).__name__ == NAME
    ours, theirs = model.state_dict(), case.hf_model.state_dict()
    assert ours.keys() == theirs.keys()  # the correction biases (buffers) included
    for name, value in ours.items():
        torch.testing.assert_close(value, theirs[name], rtol=0, atol=0)
    with torch.no_grad():
        logits = model(torch.as_tensor(case.tokens)).logits.numpy()
    np.testing.assert_allclose(logits, case.hf_logits, rtol=0, atol=1e-6)


def test_bfloat16_export_keeps_the_bias_float32(case, tmp_path):
    """Released checkpoints are bfloat16 with a float32 e_score_correction_bias."""
    save_hf(case.cfg, case.params, tmp_path, NAME, router_state=case.router_state,
            dtype="bfloat16")
    tensors = load_file(tmp_path / "model.safetensors")
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert tensors["model.layers.1.self_attn.kv_b_proj.weight"].dtype == torch.bfloat16
    cfg, params = load_hf(tmp_path)
    assert (cfg.precision.param_dtype, cfg.precision.compute_dtype) == ("bfloat16", "bfloat16")
    assert_trees_bit_equal(params.router_state, case.router_state)
    rounded = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16),
                           case.params.replace(router_state=None))
    assert_trees_bit_equal(params, rounded.replace(router_state=case.router_state))


def test_load_onto_a_mesh(grouped):
    """Parameters sharded as the model declares them (MLA latents included), the router state
    replicated."""
    mesh = moejax.make_mesh(MeshConfig(data=1, fsdp=2, expert=4))
    cfg, params, state = load_hf(grouped.hf_dir, mesh, with_router_state=True)
    expected = moejax.params.shardings(moejax.model_specs(cfg), mesh)
    weights = params.replace(router_state=None)
    for leaf, sharding in zip(jax.tree.leaves(weights), jax.tree.leaves(expected), strict=True):
        assert leaf.sharding == sharding
    assert state.bias.sharding == NamedSharding(mesh, PartitionSpec())
    assert params.router_state is state
    assert_trees_bit_equal(params, grouped.params)
    assert_trees_bit_equal(state, grouped.router_state)


# Multi-token prediction: transformers drops the MTP layers, so they are tested by round trip.


@pytest.fixture(scope="module")
def mtp_model(grouped):
    """The grouped case plus one MTP module (every leaf random, norms included) and a random
    selection bias for every router, its own included."""
    cfg = dataclasses.replace(grouped.cfg,
                              model=dataclasses.replace(grouped.cfg.model, mtp_depth=1))
    rng = np.random.default_rng(1)
    mtp = jax.tree.map(lambda spec: jnp.asarray(rng.normal(size=spec.shape), jnp.float32),
                       param_specs(cfg).mtp, is_leaf=lambda x: isinstance(x, ParamSpec))
    bias = rng.normal(size=(cfg.num_moe_layers + 1, cfg.moe.num_experts))
    state = moejax.RouterState(bias=jnp.asarray(bias, jnp.float32),
                               temperature=jnp.ones((), jnp.float32))
    return cfg, grouped.params.replace(mtp=mtp, router_state=state), state


def test_mtp_export_then_import_is_identity(mtp_model, tmp_path):
    cfg, params, state = mtp_model
    save_hf(cfg, params, tmp_path, NAME, router_state=state)
    hf_config = json.loads((tmp_path / "config.json").read_text())
    assert hf_config["num_nextn_predict_layers"] == 1
    tensors = load_file(tmp_path / "model.safetensors")
    mtp = "model.layers.3"  # num_hidden_layers + 0
    assert tensors[f"{mtp}.eh_proj.weight"].shape == (32, 64)
    torch.testing.assert_close(tensors[f"{mtp}.eh_proj.weight"],
                               torch.tensor(np.asarray(params.mtp.proj[0]).T))
    torch.testing.assert_close(tensors[f"{mtp}.embed_tokens.weight"],
                               tensors["model.embed_tokens.weight"])
    torch.testing.assert_close(tensors[f"{mtp}.mlp.gate.e_score_correction_bias"],
                               torch.tensor(np.asarray(state.bias[-1])))
    for hf_norm, norm in (("enorm", "embed_norm"), ("hnorm", "hidden_norm"),
                          ("shared_head.norm", "final_norm")):
        torch.testing.assert_close(tensors[f"{mtp}.{hf_norm}.weight"],
                                   torch.tensor(np.asarray(getattr(params.mtp, norm)[0])))
    loaded_cfg, loaded, loaded_state = load_hf(tmp_path, with_router_state=True)
    assert loaded_cfg == cfg
    assert_trees_bit_equal(loaded, params)
    assert_trees_bit_equal(loaded_state, state)


def test_mtp_layers_can_be_left_out(mtp_model, tmp_path):
    cfg, params, state = mtp_model
    save_hf(cfg, params, tmp_path, NAME, router_state=state)
    main_cfg, main, main_state = load_hf(tmp_path, overrides=("model.mtp_depth=0",),
                                         with_router_state=True)
    assert main_cfg.model.mtp_depth == 0 and main.mtp is None
    assert_trees_bit_equal(main, params.replace(mtp=None, router_state=main_state))
    np.testing.assert_array_equal(main_state.bias, state.bias[:-1])


def test_mtp_copies_of_embedding_and_head_must_match(mtp_model, tmp_path):
    cfg, params, state = mtp_model
    save_hf(cfg, params, tmp_path, NAME, router_state=state)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.3.shared_head.head.weight"][5, 7] += 1.0
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"'model.layers.3.shared_head.head.weight' "
                       r"differs from 'lm_head.weight'"):
        load_hf(tmp_path)


# Block-fp8 checkpoints (DeepSeek's release format).


def _quantize_blocks(weight: torch.Tensor, block: int = 128):
    """(fp8 weight, scale_inv [ceil(out/block), ceil(in/block)], dequantised float32 weight)."""
    rows, cols = weight.shape
    grid = (-(-rows // block), -(-cols // block))
    padded = torch.zeros(grid[0] * block, grid[1] * block)
    padded[:rows, :cols] = weight
    blocks = padded.reshape(grid[0], block, grid[1], block)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-4) / 448.0
    expanded = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:rows, :cols]
    quantized = (weight / expanded).to(torch.float8_e4m3fn)
    return quantized, scale, quantized.float() * expanded


def test_block_fp8_checkpoint_is_dequantised(grouped, tmp_path):
    """Every projection stored as fp8 with 128x128 scales, the dense layer's 200 rows (and
    columns of down_proj) spanning a cropped second block whose values are 4x larger (so it gets
    a different scale); moejax must match transformers on the dequantised weights."""
    tensors = load_file(grouped.hf_dir / "model.safetensors")
    quantized, dequantized = {}, {}
    for name, weight in tensors.items():
        if name.endswith("_proj.weight") or "_proj_" in name:
            if name.startswith("model.layers.0.mlp."):  # the dense FFN, 200 wide
                weight = weight.clone()
                if weight.shape[0] == 200:
                    weight[128:] *= 4
                else:
                    weight[:, 128:] *= 4
            quantized[name], quantized[f"{name}_scale_inv"], dequantized[name] = (
                _quantize_blocks(weight))
        else:
            quantized[name] = dequantized[name] = weight
    assert quantized["model.layers.0.mlp.down_proj.weight_scale_inv"].shape == (1, 2)
    config = json.loads((grouped.hf_dir / "config.json").read_text())
    for directory, weights, extra in (
            (tmp_path / "fp8", quantized, {"quantization_config": {
                "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": [128, 128]}}),
            (tmp_path / "dequantized", dequantized, {})):
        directory.mkdir()
        save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
        (directory / "config.json").write_text(json.dumps({**config, **extra}))
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dequantized").eval()
    tokens = np.random.default_rng(1).integers(0, 64, (BATCH, SEQ_LEN))
    with torch.no_grad():
        hf_logits = model(torch.as_tensor(tokens)).logits.numpy()
    cfg, params = load_hf(tmp_path / "fp8")
    assert cfg == grouped.cfg
    np.testing.assert_allclose(_logits(params, tokens, cfg), hf_logits, rtol=0, atol=1e-4)
    _, reference = load_hf(tmp_path / "dequantized")
    assert_trees_bit_equal(params, reference)
    # the fp8 rounding is visible: these are not the original weights
    assert not np.array_equal(params.dense_blocks.ffn.w_down,
                              grouped.params.dense_blocks.ffn.w_down)


def test_rope_interleave_false_is_read_unpermuted(grouped, tmp_path):
    hf_dir = shutil.copytree(grouped.hf_dir, tmp_path / "halves")
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "rope_interleave": False}))
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tokens = np.random.default_rng(2).integers(0, 64, (BATCH, SEQ_LEN))
    with torch.no_grad():
        hf_logits = model(torch.as_tensor(tokens)).logits.numpy()
    cfg, params = load_hf(hf_dir)
    np.testing.assert_allclose(_logits(params, tokens, cfg), hf_logits, rtol=0, atol=1e-4)
    wkv_a = np.asarray(params.moe_blocks.attn.wkv_a[0])
    interleaved = np.asarray(grouped.params.moe_blocks.attn.wkv_a[0])
    np.testing.assert_array_equal(wkv_a[:, :16], interleaved[:, :16])  # the latent: unchanged
    assert not np.array_equal(wkv_a[:, 16:], interleaved[:, 16:])  # the RoPE key: not permuted


# Errors.


def _deepseek_config(**changes) -> dict:
    config = transformers.DeepseekV3Config(**COMMON, **HF_CONFIGS["q_latent_grouped"]).to_dict()
    return {**config, "architectures": [NAME], **changes}


@pytest.mark.parametrize("changes, message", [
    ({"attention_bias": True}, "attention_bias=true is not supported"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings=true is not supported"),
    ({"num_key_value_heads": 2}, "num_key_value_heads=2 != num_attention_heads=4"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}},
     "RoPE scaling 'linear' is not supported"),
    ({"rope_parameters": {**YARN, "attention_factor": 0.5}}, "attention_factor=0.5"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quant_method='gptq' is not supported"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": None}},
     "weight_block_size=None is not supported"),
    ({"n_routed_experts": 6, "n_group": 4}, "not divisible by moe.num_groups=4"),
    ({"scoring_func": "softmax"}, "scoring_func='softmax' is not supported"),
])
def test_unsupported_configs_are_refused(changes, message):
    with pytest.raises(ConversionError, match=message):
        config_from_hf(_deepseek_config(**changes))


def test_released_config_maps_as_the_reference_says():
    """DeepSeek-V3's own config.json (transformers 4 keys: rope_scaling with "type", no
    rope_interleave): YaRN factor 40 on the 64 RoPE dims, cos/sin unscaled (mscale equal to
    mscale_all_dim) and the softmax scale 192^-0.5 * (0.1 ln 40 + 1)^2."""
    released = {
        "architectures": [NAME], "model_type": "deepseek_v3", "vocab_size": 129280,
        "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
        "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
        "n_shared_experts": 1, "n_routed_experts": 256, "num_experts_per_tok": 8,
        "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
        "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128, "n_group": 8,
        "topk_group": 4, "first_k_dense_replace": 3, "norm_topk_prob": True,
        "scoring_func": "sigmoid", "topk_method": "noaux_tc", "moe_layer_freq": 1,
        "num_nextn_predict_layers": 1, "hidden_act": "silu", "rms_norm_eps": 1e-6,
        "max_position_embeddings": 163840, "rope_theta": 10000, "tie_word_embeddings": False,
        "attention_bias": False,
        "rope_scaling": {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1,
                         "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096},
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
    }
    cfg = config_from_hf(released, tensor_names=["model.layers.61.enorm.weight"])
    m, e = cfg.model, cfg.moe
    assert (m.num_dense_layers, m.mtp_depth, m.q_lora_rank, m.rope_scaling) == (3, 1, 1536, "yarn")
    assert (e.num_groups, e.topk_groups, e.top_k, e.num_shared_experts) == (8, 4, 8, 1)
    assert (m.yarn_factor, m.yarn_original_max_len) == (40.0, 4096)
    assert yarn_cos_sin_scale(m) == 1.0
    assert softmax_scale(m) == pytest.approx(192**-0.5 * 1.3689**2, rel=1e-4)
    assert config_from_hf(released).model.mtp_depth == 0  # no MTP tensors given


def test_yarn_defaults_follow_transformers():
    """Missing factor: max_position_embeddings / original; missing betas: 32 and 1; missing
    mscales: 0 (then moejax scales cos/sin by mscale(factor) and not the softmax)."""
    rope = {"rope_type": "yarn", "rope_theta": 1e4, "original_max_position_embeddings": 64}
    cfg = config_from_hf(_deepseek_config(rope_parameters=rope, max_position_embeddings=512))
    m = cfg.model
    assert (m.yarn_factor, m.yarn_beta_fast, m.yarn_beta_slow) == (8.0, 32.0, 1.0)
    assert (m.yarn_mscale, m.yarn_mscale_all_dim) == (0.0, 0.0)


def test_shape_mismatch_and_fp8_scales_without_config(grouped, tmp_path):
    wrong = shutil.copytree(grouped.hf_dir, tmp_path / "wrong")
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "kv_lora_rank": 12}))
    with pytest.raises(ConversionError, match=r"'model.layers.0.self_attn.kv_a_proj_with_mqa."
                       r"weight' has shape \(24, 32\) .* implies \(20, 32\)"):
        load_hf(wrong)
    scaled = shutil.copytree(grouped.hf_dir, tmp_path / "scaled")
    tensors = load_file(scaled / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight_scale_inv"] = torch.ones(2, 1)
    save_file(tensors, scaled / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="fp8 scales .* no fp8 quantization_config"):
        load_hf(scaled)


def test_configs_deepseek_cannot_express_are_refused(grouped, tmp_path):
    gqa = dataclasses.replace(grouped.cfg, model=dataclasses.replace(
        grouped.cfg.model, attention="gqa"))
    with pytest.raises(ConversionError, match=f"cannot be written as {NAME}: "
                       "model.attention='gqa'"):
        save_hf(gqa, grouped.params, tmp_path / "out", NAME)
    with pytest.raises(ConversionError, match=r"router_state.bias has shape \(3, 8\)"):
        save_hf(grouped.cfg, grouped.params, tmp_path / "out", NAME,
                router_state=moejax.RouterState(jnp.zeros((3, 8)), jnp.ones(())))
    assert not (tmp_path / "out").exists()


# scripts/convert_hf.py, run in-process.


def test_script_round_trip_keeps_the_router_state(mtp_model, tmp_path):
    cfg, params, state = mtp_model
    save_hf(cfg, params, tmp_path / "source", NAME, router_state=state)
    script = load_script("convert_hf")
    native, hf = tmp_path / "native", tmp_path / "hf"
    assert script.main(["to-moejax", str(tmp_path / "source"), str(native)]) == 0
    native_cfg, native_params, native_state = load_moejax(native, with_router_state=True)
    assert native_cfg.model == cfg.model and native_cfg.moe == cfg.moe
    assert_trees_bit_equal(native_params, params)
    assert_trees_bit_equal(native_state, state)
    assert script.main(["to-hf", str(native), str(hf), "--architecture", NAME]) == 0
    _, hf_params, hf_state = load_hf(hf, with_router_state=True)
    assert_trees_bit_equal(hf_params, params)
    assert_trees_bit_equal(hf_state, state)
