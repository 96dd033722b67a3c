"""Capacity dispatch: drops exactly as the formula predicts, dropped copies contribute nothing,
the capacity path equals the dense oracle when nothing drops, and the compiled layer holds
exactly two all-to-alls (dropless: three) and no gather of expert weights; the SwiGLU the
capacity path, the shared experts and the dense layers run has autodiff's gradients."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import max_relative_error, tiny_config
from jax.sharding import NamedSharding, PartitionSpec

import moejax
from moejax import params as P
from moejax.config import MeshConfig
from moejax.model import dispatch
from moejax.model.layers import FFN, Matmul, swiglu
from moejax.model.moe import moe_ffn, moe_specs
from moejax.sharding import batch_sharding

NUM_TOKENS, NUM_EXPERTS, WIDTH = 64, 8, 16
F32 = Matmul(jnp.float32)


def moe_config(*overrides):
    return tiny_config("model.d_model=16", "moe.expert_ffn_dim=8", "moe.dispatch=capacity",
                       *overrides).moe


@functools.cache
def expert_weights():
    keys = jax.random.split(jax.random.key(0), 3)
    shapes = [(NUM_EXPERTS, WIDTH, 8), (NUM_EXPERTS, WIDTH, 8), (NUM_EXPERTS, 8, WIDTH)]
    return FFN(*(0.3 * jax.random.normal(k, s) for k, s in zip(keys, shapes)))


def crafted_routing():
    """Every token's first choice is expert 0; second choices spread over experts 1..7."""
    rng = np.random.default_rng(0)
    second = 1 + np.arange(NUM_TOKENS) % (NUM_EXPERTS - 1)
    ids = jnp.asarray(np.stack([np.zeros(NUM_TOKENS, int), second], axis=1), jnp.int32)
    weights = jnp.asarray(rng.uniform(0.1, 1.0, size=(NUM_TOKENS, 2)), jnp.float32)
    x = jax.random.normal(jax.random.key(1), (1, NUM_TOKENS, WIDTH))
    return x, ids[None], weights[None]


@pytest.mark.parametrize("policy", ["position", "probs"])
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.5])
def test_drops_match_capacity_formula(policy, capacity_factor):
    cfg = moe_config(f"moe.capacity_factor={capacity_factor}", f"moe.drop_policy={policy}")
    x, ids, weights = crafted_routing()
    y, stats = dispatch.capacity_moe(x, ids, weights, expert_weights(), cfg, F32)

    slots = int(np.ceil(capacity_factor * NUM_TOKENS * 2 / NUM_EXPERTS))
    per_expert = np.bincount(np.asarray(ids).ravel(), minlength=NUM_EXPERTS)
    expected_dropped = np.maximum(per_expert - slots, 0).sum()
    assert expected_dropped > 0
    assert float(stats.dropped) == expected_dropped
    assert bool(jnp.all(jnp.isfinite(y)))

    kept = kept_assignments(np.asarray(ids[0]), np.asarray(weights[0]), slots, policy)
    expected, _ = dispatch.dense_moe(x, ids, weights * kept[None], expert_weights(), cfg, F32)
    assert max_relative_error(y, expected) < 1e-5


def kept_assignments(ids, weights, slots, policy):
    """Reference drop rule [N, k] -> 1.0 kept / 0.0 dropped: per expert, the first `slots`
    copies in (token, choice) order, or the `slots` copies with the largest weights."""
    kept = np.zeros(ids.shape, np.float32)
    for expert in range(NUM_EXPERTS):
        copies = np.argwhere(ids == expert)  # (token, choice) pairs in position order
        if policy == "probs":
            copies = copies[np.argsort(-weights[tuple(copies.T)], kind="stable")]
        for token, choice in copies[:slots]:
            kept[token, choice] = 1.0
    return jnp.asarray(kept)


def test_dropped_token_keeps_its_shared_expert_path():
    cfg = tiny_config("moe.top_k=1", "moe.num_shared_experts=1", "moe.dispatch=capacity",
                      "moe.capacity_factor=1.0",
                      "moe.router=softmax_topk")
    specs = moe_specs(cfg)
    params = P.init(specs, jax.random.key(0))
    # A rigged router: expert 0 has by far the highest logit for every (positive) token.
    params = params.replace(router=jnp.zeros_like(params.router).at[:, 0].set(10.0))
    x = jnp.abs(jax.random.normal(jax.random.key(1), (2, 32, cfg.model.d_model)))
    y, stats = moe_ffn(params, x, jnp.zeros(cfg.moe.num_experts), 1.0, cfg)

    tokens = 64
    slots = int(np.ceil(1.0 * tokens / cfg.moe.num_experts))
    assert float(stats["dropped_fraction"]) == pytest.approx((tokens - slots) / tokens)
    shared_only = swiglu(params.shared, x, F32)
    flat_y, flat_shared = y.reshape(tokens, -1), shared_only.reshape(tokens, -1)
    np.testing.assert_allclose(flat_y[slots:], flat_shared[slots:], rtol=1e-6, atol=1e-6)
    assert not np.allclose(flat_y[:slots], flat_shared[:slots])


@pytest.mark.parametrize("router", ["deepseek", "softmax_topk"])
def test_capacity_equals_dense_oracle_without_drops(router):
    cfg = tiny_config(f"moe.router={router}", "moe.num_shared_experts=1", "moe.dispatch=capacity")
    params = P.init(moe_specs(cfg), jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, 16, cfg.model.d_model))
    bias = 0.1 * jax.random.normal(jax.random.key(2), (cfg.moe.num_experts,))
    y, stats = moe_ffn(params, x, bias, 1.0, cfg)
    dense_cfg = cfg.replace(moe=dataclasses.replace(cfg.moe, dispatch="dense"))
    expected, _ = moe_ffn(params, x, bias, 1.0, dense_cfg)
    assert float(stats["dropped_fraction"]) == 0.0
    assert max_relative_error(y, expected) < 1e-5


@pytest.mark.parametrize("dispatch_name,exchanges", [("capacity", 2), ("dropless", 3)])
def test_compiled_layer_exchanges_and_gathers_no_expert_weights(dispatch_name, exchanges):
    """Capacity: one all-to-all out, one back. Dropless: token rows and their (local expert id,
    weight) pairs out, one summed row per token and destination back."""
    cfg = tiny_config(f"moe.dispatch={dispatch_name}").replace(mesh=MeshConfig(2, 1, 4))
    mesh = moejax.make_mesh(cfg.mesh)
    specs = moe_specs(cfg)
    params = P.init(specs, jax.random.key(0), mesh)
    x = jax.device_put(jnp.ones((8, 16, cfg.model.d_model)), batch_sharding(mesh))
    bias = jax.device_put(jnp.zeros(cfg.moe.num_experts), NamedSharding(mesh, PartitionSpec()))
    layer = jax.jit(lambda p, x, b: moe_ffn(p, x, b, 1.0, cfg)[0])
    with jax.set_mesh(mesh):
        hlo = layer.lower(params, x, bias).compile().as_text()
    instructions = [line.split("=", 1)[1] for line in hlo.splitlines() if " = " in line]
    all_to_alls = [op for op in instructions if " all-to-all(" in op]
    assert len(all_to_alls) == exchanges
    local_expert_shape = f"[{cfg.moe.num_experts // 4},{cfg.model.d_model}"
    gathers = [op for op in instructions if " all-gather(" in op or "all-gather-start(" in op]
    assert not [op for op in gathers if local_expert_shape in op or f"[{cfg.moe.num_experts}," in op]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("experts", [None, 3])  # plain [D, F] weights, or batched [E, D, F]
def test_swiglu_backward_equals_autodiff(experts, dtype):
    """layers.swiglu's written-out backward (weight gradients as GEMMs over the flattened rows,
    per expert when batched) gives autodiff's gradients of the same formula, for the input and
    all three weights, in float32 and in bfloat16 compute with float32 weights."""
    lead = () if experts is None else (experts,)
    keys = jax.random.split(jax.random.key(0), 5)
    params = FFN(jax.random.normal(keys[0], (*lead, WIDTH, 24)),
                 jax.random.normal(keys[1], (*lead, WIDTH, 24)),
                 jax.random.normal(keys[2], (*lead, 24, WIDTH)))
    x = jax.random.normal(keys[3], (*(lead or (2,)), 5, WIDTH))
    cotangent = jax.random.normal(keys[4], x.shape)

    def autodiff(p, x_):
        p = jax.tree.map(lambda w: w.astype(dtype), p)
        hidden = jax.nn.silu(x_.astype(dtype) @ p.w_gate) * (x_.astype(dtype) @ p.w_up)
        return hidden @ p.w_down

    def grads(fn):
        y, pullback = jax.vjp(fn, params, x)
        return y, pullback(cotangent.astype(y.dtype))

    y, (d_params, d_x) = grads(lambda p, x_: swiglu(p, x_, Matmul(dtype)))
    y_ref, (d_params_ref, d_x_ref) = grads(autodiff)
    tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
    assert y.dtype == y_ref.dtype == dtype
    assert max_relative_error(y, y_ref) <= tolerance
    assert max_relative_error((d_params, d_x), (d_params_ref, d_x_ref)) <= tolerance
    assert jax.tree.map(lambda a: a.dtype, d_params) == jax.tree.map(lambda a: a.dtype, params)
