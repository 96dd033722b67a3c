"""Hugging Face checkpoint interop: tiny random float32 Mixtral and Qwen3-MoE models built in
torch, saved with save_pretrained, loaded into moejax with the plain calls (no overrides: the
precision follows the checkpoint) and compared (logits, router choices), exported back and
reloaded (bit-equal, and loadable by transformers), YaRN, plus the conversion errors (DeepSeek-V3
has its own file, test_convert_deepseek.py)."""

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from helpers import assert_trees_bit_equal, load_script
from jax.sharding import NamedSharding, PartitionSpec

import moejax
import moejax.convert
from moejax.config import MeshConfig, PrecisionConfig
from moejax.convert import ConversionError, config_from_hf, load_hf, save_hf
from moejax.convert.architectures import ARCHITECTURES, LayoutOptions
from moejax.convert.hf import param_specs
from moejax.convert.layout import leaf_specs
from moejax.model.router import route

SEQ_LEN, BATCH = 16, 2
COMMON = {"vocab_size": 64, "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
          "num_experts_per_tok": 2, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
HF_MODELS = {
    # head_dim left to default (hidden / heads); a non-default RoPE base
    "MixtralForCausalLM": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        num_hidden_layers=2, num_local_experts=8, intermediate_size=16,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0}, **COMMON)),
    # head_dim != hidden / heads, a leading dense layer, un-normalised top-k weights
    "Qwen3MoeForCausalLM": lambda: transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        num_hidden_layers=3, num_experts=8, moe_intermediate_size=16, intermediate_size=48,
        head_dim=16, mlp_only_layers=[0], norm_topk_prob=False, **COMMON)),
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every weight random and nonzero (norm weights around 1), so no mapping error hides
    behind a zero or a one."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(0.5 + torch.rand(param.shape, generator=generator))
            else:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))


def _router_inputs(model, layers):
    """Forward hooks capturing each listed layer's router input (the output of its
    post_attention_layernorm)."""
    captured = {}
    for i, layer in enumerate(model.model.layers):
        if i in layers:
            layer.post_attention_layernorm.register_forward_hook(
                lambda module, args, out, i=i: captured.__setitem__(i, out.detach().numpy()))
    return captured


@dataclasses.dataclass
class Case:
    architecture: str
    hf_dir: Path
    tokens: np.ndarray  # [B, T]
    hf_logits: np.ndarray  # [B, T, V]
    hf_router_logits: list  # per MoE layer [B T, E] (probabilities in transformers 5.0)
    router_inputs: list  # per MoE layer [B, T, D]
    cfg: moejax.Config
    params: moejax.Transformer
    logits: np.ndarray


@pytest.fixture(scope="module", params=sorted(HF_MODELS))
def case(request, tmp_path_factory) -> Case:
    architecture = request.param
    model = HF_MODELS[architecture]().float().eval()
    _randomize(model, seed=len(architecture))
    hf_dir = tmp_path_factory.mktemp(architecture)
    model.save_pretrained(hf_dir)
    cfg, params = load_hf(hf_dir)[:2]  # the plain calls, as a user makes them
    moe_layers = range(cfg.num_dense_layers, cfg.model.num_layers)
    captured = _router_inputs(model, set(moe_layers))
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (BATCH, SEQ_LEN))
    with torch.no_grad():
        out = model(torch.as_tensor(tokens), output_router_logits=True)
    logits, _ = moejax.forward(params, jnp.asarray(tokens), cfg)
    return Case(architecture, hf_dir, tokens, out.logits.numpy(),
                [r.numpy() for r in out.router_logits], [captured[i] for i in moe_layers],
                cfg, params, np.asarray(logits))


def test_config_mapping(case):
    m, e = case.cfg.model, case.cfg.moe
    assert (m.d_model, m.num_heads, m.num_kv_heads, m.vocab_size) == (32, 4, 2, 64)
    assert (e.num_experts, e.top_k, e.expert_ffn_dim, e.router) == (8, 2, 16, "softmax_topk")
    assert e.capacity_factor is None and e.num_shared_experts == 0
    if case.architecture == "MixtralForCausalLM":
        assert (m.head_dim, m.rope_theta, m.qk_norm, m.num_dense_layers) == (8, 500.0, False, 0)
        assert e.normalize_weights
    else:
        assert (m.head_dim, m.qk_norm, m.num_dense_layers, m.ffn_dim) == (16, True, 1, 48)
        assert not e.normalize_weights


def test_logits_match_transformers(case):
    """load_hf then moejax.forward, nothing else: float32 like the checkpoint, as transformers."""
    assert np.abs(case.hf_logits).max() > 0.5  # a comparison of near-zero logits proves little
    assert case.cfg.precision.compute_dtype == case.cfg.precision.param_dtype == "float32"
    np.testing.assert_allclose(case.logits, case.hf_logits, rtol=0, atol=1e-4)


def test_parameters_carry_the_router_state(case):
    """Softmax routers: a zero bias and temperature 1 (HF routers have none), also returned
    on request."""
    state = case.params.router_state
    np.testing.assert_array_equal(state.bias, np.zeros((case.cfg.num_moe_layers, 8)))
    assert state.bias.dtype == jnp.float32 and float(state.temperature) == 1.0
    _, params, returned = load_hf(case.hf_dir, with_router_state=True)
    assert_trees_bit_equal(returned, state)
    assert_trees_bit_equal(params, case.params)


@pytest.mark.parametrize("key", ["dtype", "torch_dtype"])
def test_precision_follows_the_checkpoint_dtype_unless_overridden(key):
    """transformers >= 5 writes "dtype", older versions "torch_dtype"."""
    hf_config = {k: v for k, v in _hf_config("MixtralForCausalLM").items()
                 if k not in ("dtype", "torch_dtype")}
    for dtype in ("float32", "bfloat16", "float16"):
        precision = config_from_hf({**hf_config, key: dtype}).precision
        assert (precision.param_dtype, precision.compute_dtype) == (dtype, dtype)
    overridden = config_from_hf({**hf_config, key: "float32"},
                                ["precision.compute_dtype=bfloat16"]).precision
    assert (overridden.param_dtype, overridden.compute_dtype) == ("float32", "bfloat16")
    defaults = PrecisionConfig()
    for unnamed in ({}, {key: None}, {key: "auto"}):
        precision = config_from_hf({**hf_config, **unnamed}).precision
        assert (precision.param_dtype, precision.compute_dtype) == (defaults.param_dtype,
                                                                    defaults.compute_dtype)


def _hf_router_probs(router_output: np.ndarray) -> np.ndarray:
    """transformers 5.0 returns the router's softmax probabilities as `router_logits`, later
    versions the logits themselves; random logits are never a probability distribution."""
    is_distribution = (router_output >= 0).all() and np.allclose(router_output.sum(-1), 1)
    return router_output if is_distribution else np.asarray(jax.nn.softmax(router_output, -1))


def test_router_choices_match_transformers(case):
    """Same router probabilities, and the same top-k experts as sets (HF's top-k order may
    differ)."""
    moe = case.params.moe_blocks.ffn
    bias = jnp.zeros(case.cfg.moe.num_experts)
    for layer, (x, hf_logits) in enumerate(zip(case.router_inputs, case.hf_router_logits)):
        routing = route(jnp.asarray(x), moe.router[layer], bias, 1.0, case.cfg.moe)
        ours = np.asarray(routing.probs).reshape(hf_logits.shape)
        np.testing.assert_allclose(ours, _hf_router_probs(hf_logits), rtol=0, atol=1e-6)
        hf_ids = torch.topk(torch.as_tensor(hf_logits), case.cfg.moe.top_k).indices.numpy()
        our_ids = np.asarray(routing.expert_ids).reshape(hf_ids.shape)
        assert [set(row) for row in our_ids] == [set(row) for row in hf_ids]


def test_layout_covers_every_parameter_exactly_once(case):
    arch = ARCHITECTURES[case.architecture]
    specs = param_specs(case.cfg)
    for fused in (False, True):
        counts = {path: np.zeros(spec.shape) for path, spec in leaf_specs(specs)[0].items()}
        for tensor in arch.layout(case.cfg, LayoutOptions(fused_experts=fused)):
            for placement in tensor.placements:
                ones = np.ones(tensor.shape)
                counts[placement.leaf][placement.index] += placement.to_moejax(ones)
        assert all((c == 1).all() for c in counts.values()), f"fused={fused}"


def test_export_then_import_is_identity(case, tmp_path):
    files = save_hf(case.cfg, case.params, tmp_path, case.architecture, max_shard_bytes=20_000)
    assert len(files) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    cfg, params = load_hf(tmp_path)
    assert cfg == case.cfg
    assert_trees_bit_equal(params, case.params)


def _cast(params, dtype):
    """The parameters in `dtype`, the router state they carry (always float32) unchanged."""
    weights = jax.tree.map(lambda x: x.astype(dtype), params.replace(router_state=None))
    return weights.replace(router_state=params.router_state)


def test_bfloat16_checkpoints_round_trip(case, tmp_path):
    """Released checkpoints are bfloat16: read back as bfloat16 parameters computing in
    bfloat16, or (overridden) as float32 parameters (exact)."""
    save_hf(case.cfg, case.params, tmp_path, case.architecture, dtype="bfloat16")
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    rounded = _cast(case.params, jnp.bfloat16)
    cfg, params = load_hf(tmp_path)
    assert (cfg.precision.param_dtype, cfg.precision.compute_dtype) == ("bfloat16", "bfloat16")
    assert_trees_bit_equal(params, rounded)
    cfg, params = load_hf(tmp_path, overrides=("precision.param_dtype=float32",))
    assert (cfg.precision.param_dtype, cfg.precision.compute_dtype) == ("float32", "bfloat16")
    assert_trees_bit_equal(params, _cast(rounded, jnp.float32))


def test_exported_checkpoint_loads_in_transformers(case, tmp_path):
    save_hf(case.cfg, case.params, tmp_path, case.architecture)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(model).__name__ == case.architecture
    with torch.no_grad():
        logits = model(torch.as_tensor(case.tokens)).logits.numpy()
    np.testing.assert_allclose(logits, case.hf_logits, rtol=0, atol=1e-6)


def test_fused_expert_layout_loads_the_same(case, tmp_path):
    """transformers >= 5 can save experts fused (gate_up_proj [E, 2F, D], down_proj [E, D, F])."""
    model = transformers.AutoModelForCausalLM.from_pretrained(case.hf_dir)
    model.save_pretrained(tmp_path, save_original_format=False)
    _, params = load_hf(tmp_path)
    assert_trees_bit_equal(params, case.params)


def test_router_temperature_is_folded_into_exported_router(case, tmp_path):
    state = moejax.RouterState(bias=jnp.zeros((case.cfg.num_moe_layers, 8)),
                               temperature=jnp.asarray(0.5))
    save_hf(case.cfg, case.params, tmp_path, case.architecture, router_state=state)
    _, params = load_hf(tmp_path)
    np.testing.assert_array_equal(params.moe_blocks.ffn.router,
                                  2 * np.asarray(case.params.moe_blocks.ffn.router))


def test_load_onto_a_mesh_shards_the_parameters(case, tmp_path):
    mesh = moejax.make_mesh(MeshConfig(data=1, fsdp=2, expert=4))
    cfg, params = load_hf(case.hf_dir, mesh)
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.expert) == (1, 2, 4)
    expected = moejax.params.shardings(moejax.model_specs(cfg), mesh)
    weights = params.replace(router_state=None)
    for leaf, sharding in zip(jax.tree.leaves(weights), jax.tree.leaves(expected), strict=True):
        assert leaf.sharding == sharding
    assert params.router_state.bias.sharding == NamedSharding(mesh, PartitionSpec())
    assert_trees_bit_equal(params, case.params)
    # saved from 8 devices, the native checkpoint still loads without a mesh (on one device)
    moejax.convert.save_moejax(cfg, params, tmp_path)
    native_cfg, native_params = moejax.convert.load_moejax(tmp_path)
    assert native_cfg.mesh == MeshConfig() and native_cfg.model == cfg.model
    assert_trees_bit_equal(native_params, case.params)


# Errors and config mapping details.


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory) -> Path:
    """A sharded tiny Mixtral checkpoint (no forward pass needed for the error tests)."""
    model = HF_MODELS["MixtralForCausalLM"]()
    directory = tmp_path_factory.mktemp("mixtral_sharded")
    model.save_pretrained(directory, max_shard_size="20KB")
    return directory


def _copy_with_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, **changes}))
    return dst


def test_unsupported_architectures_are_named(mixtral_dir, tmp_path):
    qwen2 = _copy_with_config(mixtral_dir, tmp_path / "qwen2",
                              architectures=["Qwen2MoeForCausalLM"])
    with pytest.raises(ConversionError, match=r"'Qwen2MoeForCausalLM'.*shared expert is gated.*"
                       r"\['DeepseekV3ForCausalLM', 'MixtralForCausalLM', "
                       r"'Qwen3MoeForCausalLM'\]"):
        load_hf(qwen2)
    llama = _copy_with_config(mixtral_dir, tmp_path / "llama", architectures=["LlamaForCausalLM"])
    with pytest.raises(ConversionError, match=r"'LlamaForCausalLM'.*supported architectures"):
        load_hf(llama)


def test_missing_shard_is_named(mixtral_dir, tmp_path):
    broken = _copy_with_config(mixtral_dir, tmp_path / "broken")
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ConversionError, match=rf"lacks the shard files \['{shard.name}'\] named in "
                       "model.safetensors.index.json"):
        load_hf(broken)


def test_shape_mismatch_names_the_tensor_and_both_shapes(mixtral_dir, tmp_path):
    wrong = _copy_with_config(mixtral_dir, tmp_path / "wrong", vocab_size=65)
    with pytest.raises(ConversionError, match=r"tensor 'model.embed_tokens.weight' has shape "
                       r"\(64, 32\) in .* but the config implies \(65, 32\)"):
        load_hf(wrong)


def test_missing_config_and_tensors(mixtral_dir, tmp_path):
    with pytest.raises(ConversionError, match="has no config.json"):
        load_hf(tmp_path)
    fewer = _copy_with_config(mixtral_dir, tmp_path / "fewer")
    index_path = fewer / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.layers.1.block_sparse_moe.gate.weight"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(ConversionError, match=r"lacks 1 tensors .*"
                       r"'model.layers.1.block_sparse_moe.gate.weight'"):
        load_hf(fewer)


def _hf_config(architecture: str) -> dict:
    return HF_MODELS[architecture]().config.to_dict()


def test_unsupported_features_are_refused(tmp_path):
    mixtral = _hf_config("MixtralForCausalLM")
    with pytest.raises(ConversionError, match="tie_word_embeddings=true is not supported"):
        config_from_hf({**mixtral, "tie_word_embeddings": True})
    with pytest.raises(ConversionError, match="sliding_window=4096 is not supported"):
        config_from_hf({**mixtral, "sliding_window": 4096})
    qwen = _hf_config("Qwen3MoeForCausalLM")
    with pytest.raises(ConversionError, match=r"dense layers \[1\] .* must be the first ones"):
        config_from_hf({**qwen, "mlp_only_layers": [1]})
    mixtral_cfg = config_from_hf(mixtral)
    with pytest.raises(ConversionError, match="cannot be written as Qwen3MoeForCausalLM: "
                       "model.qk_norm=false"):
        save_hf(mixtral_cfg, None, tmp_path / "out", "Qwen3MoeForCausalLM")
    assert not (tmp_path / "out").exists()


def test_yarn_is_read_and_written(tmp_path):
    """Mixtral with YaRN: transformers rescales the frequencies and scales cos/sin by
    mscale(f, mscale) / mscale(f, mscale_all_dim), as moejax's grouped-query attention does."""
    yarn = {"rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0, "beta_fast": 8.0,
            "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 8}

    def mixtral(rope):  # head_dim given: transformers' YaRN needs it
        return transformers.MixtralForCausalLM(transformers.MixtralConfig(
            num_hidden_layers=1, num_local_experts=4, intermediate_size=16, head_dim=8,
            rope_parameters=rope, max_position_embeddings=32, **COMMON)).float().eval()

    model = mixtral(yarn)
    _randomize(model, seed=7)
    model.save_pretrained(tmp_path / "hf")
    cfg, params = load_hf(tmp_path / "hf")
    m = cfg.model
    assert (m.rope_scaling, m.yarn_factor, m.yarn_original_max_len) == ("yarn", 4.0, 8)
    assert (m.yarn_mscale, m.yarn_mscale_all_dim, m.yarn_beta_fast) == (0.707, 1.0, 8.0)
    tokens = np.random.default_rng(0).integers(0, m.vocab_size, (BATCH, SEQ_LEN))
    with torch.no_grad():
        hf_logits = model(torch.as_tensor(tokens)).logits.numpy()
    logits, _ = moejax.forward(params, jnp.asarray(tokens), cfg)
    np.testing.assert_allclose(logits, hf_logits, rtol=0, atol=1e-4)
    plain = mixtral({"rope_type": "default", "rope_theta": 500.0})
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():  # YaRN changes these logits, so matching them needs YaRN
        assert np.abs(plain(torch.as_tensor(tokens)).logits.numpy() - hf_logits).max() > 1e-3
    save_hf(cfg, params, tmp_path / "out", "MixtralForCausalLM")
    assert load_hf(tmp_path / "out")[0] == cfg
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        np.testing.assert_allclose(exported(torch.as_tensor(tokens)).logits.numpy(), hf_logits,
                                   rtol=0, atol=1e-6)


def test_pre_v5_config_keys_are_read():
    """Older transformers write rope_theta at the top level and Qwen3's num_experts."""
    qwen = _hf_config("Qwen3MoeForCausalLM")
    qwen.pop("rope_parameters")
    qwen["num_experts"] = qwen.pop("num_local_experts", 8)
    cfg = config_from_hf({**qwen, "rope_theta": 123.0, "decoder_sparse_step": 1})
    assert (cfg.model.rope_theta, cfg.moe.num_experts, cfg.num_dense_layers) == (123.0, 8, 1)


def test_script_round_trip(case, tmp_path):
    script = load_script("convert_hf")
    native, hf = tmp_path / "native", tmp_path / "hf"
    assert script.main(["to-moejax", str(case.hf_dir), str(native)]) == 0
    cfg, params = moejax.convert.load_moejax(native)
    assert cfg.model == case.cfg.model and cfg.moe == case.cfg.moe
    assert_trees_bit_equal(params, case.params)
    assert script.main(["to-hf", str(native), str(hf), "--architecture", case.architecture]) == 0
    _, params = load_hf(hf)
    assert_trees_bit_equal(params, case.params)


def test_script_bad_input_is_one_line_and_exit_code_2(mixtral_dir, tmp_path, capsys):
    script = load_script("convert_hf")
    assert script.main(["to-moejax", str(tmp_path / "absent"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "has no config.json" in err and err.count("\n") == 1
    assert script.main(["to-moejax", str(mixtral_dir), str(mixtral_dir)]) == 2
    assert "is not empty" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        script.main(["to-hf", str(tmp_path), str(tmp_path / "out"), "--architecture", "Llama"])
    assert exit_info.value.code == 2
