"""The key property: loss and every parameter gradient are the same on one device and on every
supported mesh (to float32 tolerance), for both routers and both attentions (GQA, MLA with YaRN),
with shared experts, first-k dense layers and multi-token prediction, when nothing is dropped:
with the dropless dispatch (the default) on every mesh, and the capacity dispatch (worst-case
buffers) on one."""

import functools

import jax
import jax.numpy as jnp
import pytest
from helpers import max_relative_error, tiny_config

import moejax
from moejax.config import MeshConfig
from moejax.model.transformer import model_specs
from moejax.params import shardings as param_shardings
from moejax.sharding import batch_sharding

MESHES = {"data2_expert4": (2, 1, 4), "fsdp2_expert4": (1, 2, 4), "expert8": (1, 1, 8)}
CONFIGS = {
    # DeepSeek-V3 in small: MLA with a query latent and YaRN, one MTP module, the sigmoid gate
    # with group-limited routing, a shared expert, one first dense layer and a nonzero selection
    # bias; every router loss switched on so their gradients are compared too.
    "deepseek_v3": (
        "moe.router=deepseek", "moe.num_groups=4", "moe.topk_groups=2",
        "moe.num_shared_experts=1", "model.num_dense_layers=1", "moe.routed_scaling_factor=2.5",
        "moe.switch_loss_coef=0.01", "moe.seq_balance_loss_coef=0.01", "moe.z_loss_coef=0.001",
        "model.attention=mla", "model.q_lora_rank=16", "model.kv_lora_rank=16",
        "model.qk_nope_head_dim=8", "model.qk_rope_head_dim=4", "model.v_head_dim=8",
        "model.rope_scaling=yarn", "model.yarn_factor=4", "model.yarn_original_max_len=8",
        "model.mtp_depth=1",
    ),
    "softmax_topk": (
        "moe.router=softmax_topk", "moe.temperature=0.7", "moe.num_shared_experts=0",
        "model.num_dense_layers=0", "moe.switch_loss_coef=0.01", "moe.z_loss_coef=0.001",
    ),
}


def shardings(cfg, mesh):
    return param_shardings(model_specs(cfg), mesh)


def on_mesh(tree, sharding):
    """`tree` placed in `sharding` from a host copy: numpy slices out the shards, where a
    device array's shards would each compile a slicing program (seconds for a model)."""
    return jax.device_put(jax.device_get(tree), sharding)


def _router_state(cfg):
    state = moejax.init_router_state(cfg)
    bias = 0.05 * jax.random.normal(jax.random.key(7), state.bias.shape)
    return state.replace(bias=bias)


def _batch(cfg):
    shape = (cfg.train.global_batch_size, cfg.train.seq_len + 1)
    return {"tokens": jax.random.randint(jax.random.key(3), shape, 0, cfg.model.vocab_size)}


def _loss_and_grads(cfg, params, batch, router_state):
    fn = jax.value_and_grad(lambda p: moejax.loss_fn(p, batch, cfg, router_state), has_aux=True)
    (loss, metrics), grads = jax.jit(fn)(params)
    return loss, metrics, grads


@functools.cache
def single_device_params(config_name):
    return moejax.init_params(tiny_config(*CONFIGS[config_name]), jax.random.key(0))


@functools.cache
def single_device_result(config_name):
    cfg = tiny_config(*CONFIGS[config_name])
    return _loss_and_grads(cfg, single_device_params(config_name), _batch(cfg), _router_state(cfg))


CONFIGS["deepseek_v3_capacity"] = (*CONFIGS["deepseek_v3"], "moe.dispatch=capacity")
CASES = [(config, mesh) for config in ("deepseek_v3", "softmax_topk") for mesh in MESHES]
CASES.append(("deepseek_v3_capacity", "data2_expert4"))
# Blockwise attention in 4-position blocks (4 blocks at T = 16; the MTP module's T = 15 pads its
# last) against the plain attention's single-device result, which the cases above compiled.
CONFIGS["deepseek_v3_blockwise"] = (*CONFIGS["deepseek_v3"], "model.attention_block=4")
REFERENCE = {"deepseek_v3_blockwise": "deepseek_v3"}
CASES.append(("deepseek_v3_blockwise", "fsdp2_expert4"))


@pytest.mark.parametrize("config_name,mesh_name", CASES)
def test_loss_and_grads_match_single_device(config_name, mesh_name):
    reference = REFERENCE.get(config_name, config_name)
    expected_loss, expected_metrics, expected_grads = single_device_result(reference)
    cfg = tiny_config(*CONFIGS[config_name]).replace(mesh=MeshConfig(*MESHES[mesh_name]))
    mesh = moejax.make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        params = on_mesh(single_device_params(reference), shardings(cfg, mesh))
        batch = on_mesh(_batch(cfg), batch_sharding(mesh))
        loss, metrics, grads = _loss_and_grads(cfg, params, batch, _router_state(cfg))

    assert float(metrics["dropped_fraction"]) == 0.0
    assert float(expected_metrics["aux_loss"]) > 0.0
    assert abs(float(loss) - float(expected_loss)) <= 1e-5 * abs(float(expected_loss))
    for name in ("switch_loss", "seq_balance_loss", "z_loss"):
        assert max_relative_error(metrics[name], expected_metrics[name]) <= 1e-5, name
    assert jnp.array_equal(metrics["expert_counts"], expected_metrics["expert_counts"])
    assert max_relative_error(grads, expected_grads) <= 1e-5
    for name in (k for k in expected_metrics if k.startswith("mtp_cross_entropy")):
        assert max_relative_error(metrics[name], expected_metrics[name]) <= 1e-5, name


def test_weights_are_born_sharded():
    cfg = tiny_config(*CONFIGS["deepseek_v3"]).replace(mesh=MeshConfig(1, 2, 4))
    mesh = moejax.make_mesh(cfg.mesh)
    params = moejax.init_params(cfg, jax.random.key(0), mesh)
    w_gate = params.moe_blocks.ffn.w_gate  # [L, E, D, F]: experts over `expert`, D over `fsdp`
    shard_shape = w_gate.addressable_shards[0].data.shape
    assert shard_shape == (w_gate.shape[0], w_gate.shape[1] // 4, w_gate.shape[2] // 2, w_gate.shape[3])
    assert params.embed.addressable_shards[0].data.shape == (cfg.model.vocab_size, cfg.model.d_model // 2)
    # MLA's per-head up-projections have no model-width axis: split by head over fsdp and
    # expert where the head count divides (4 heads: over fsdp2 here, over data2 x expert4's
    # expert axis below), never whole on every device
    for w in (params.moe_blocks.attn.wq_b, params.moe_blocks.attn.wkv_b):  # [L, R, H, Q]
        assert w.addressable_shards[0].data.shape == (*w.shape[:2], w.shape[2] // 2, w.shape[3])
    on_data2_expert4 = moejax.init_params(cfg.replace(mesh=MeshConfig(2, 1, 4)),
                                          jax.random.key(0),
                                          moejax.make_mesh(MeshConfig(2, 1, 4)))
    wkv_b = on_data2_expert4.dense_blocks.attn.wkv_b
    assert wkv_b.addressable_shards[0].data.shape[2] == wkv_b.shape[2] // 4
