"""Routers against hand-worked examples; the DeepSeek gate's gradient through its chosen logits
against plain autodiff; zero router-loss coefficients left out of the differentiated loss."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import max_relative_error, tiny_config

from moejax import params as P
from moejax.config import MoEConfig
from moejax.model import cpu_kernels, cpu_matmul, cpu_route, router, transformer
from moejax.model.router import balance_losses, deepseek_route, softmax_topk


def logit(p):
    """Inverse sigmoid, so tests can state the scores they want."""
    p = jnp.asarray(p, jnp.float32)
    return jnp.log(p) - jnp.log1p(-p)


def deepseek(**kw):
    base = {"num_experts": 8, "top_k": 2, "router": "deepseek", "num_groups": 1,
            "topk_groups": 1, "routed_scaling_factor": 2.5, "normalize_weights": True}
    return MoEConfig(**{**base, **kw})


SCORES = [0.9, 0.8, 0.3, 0.2, 0.6, 0.5, 0.7, 0.1]  # sigmoid scores of experts 0..7


def test_deepseek_picks_top_scores_and_scales_weights():
    routing = deepseek_route(logit(SCORES), jnp.zeros(8), deepseek())
    assert set(np.asarray(routing.expert_ids)) == {0, 1}
    np.testing.assert_allclose(routing.weights, np.array([0.9, 0.8]) / 1.7 * 2.5, rtol=1e-6)
    np.testing.assert_allclose(jnp.sum(routing.weights), 2.5, rtol=1e-6)


def test_bias_changes_choice_but_not_weights():
    bias = jnp.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.0])  # lifts expert 6 (0.7 -> 1.2)
    routing = deepseek_route(logit(SCORES), bias, deepseek())
    chosen = dict(zip(np.asarray(routing.expert_ids).tolist(), np.asarray(routing.weights)))
    assert set(chosen) == {6, 0}
    # weights come from the unbiased scores 0.7 and 0.9
    np.testing.assert_allclose(chosen[6], 0.7 / 1.6 * 2.5, rtol=1e-6)
    np.testing.assert_allclose(chosen[0], 0.9 / 1.6 * 2.5, rtol=1e-6)


def test_masked_groups_never_contribute():
    # 4 groups of 2: group scores (top-2 sums) = [1.7, 0.5, 1.1, 0.8]; keep the best 2 groups.
    cfg = deepseek(num_groups=4, topk_groups=2, top_k=3)
    routing = deepseek_route(logit(SCORES), jnp.zeros(8), cfg)
    assert set(np.asarray(routing.expert_ids)) == {0, 1, 4}
    # A large negative bias on the kept groups must not pull in an expert from a dropped group
    # (dropped experts are -inf, not 0): expert 6 scores 0.7 but its group [0.7, 0.1] is out.
    bias = jnp.array([0.0, 0.0, 0.0, 0.0, -5.0, -5.0, 0.0, 0.0])
    routing = deepseek_route(logit(SCORES), bias, deepseek(num_groups=4, topk_groups=2, top_k=3))
    # biased group scores: [1.7, 0.5, -8.9, 0.8] -> groups 0 and 3 kept -> experts {0, 1, 6}
    assert set(np.asarray(routing.expert_ids)) == {0, 1, 6}
    bias = jnp.array([-5.0, -5.0, 0.0, 0.0, -5.0, -5.0, 0.0, 0.0])  # groups 1 and 3 kept
    routing = deepseek_route(logit(SCORES), bias, deepseek(num_groups=4, topk_groups=2, top_k=4))
    assert set(np.asarray(routing.expert_ids)) == {2, 3, 6, 7}
    # Every biased score negative: masking dropped experts to 0 would select them; -inf cannot.
    routing = deepseek_route(logit(SCORES), jnp.full(8, -5.0), deepseek(num_groups=4,
                             topk_groups=2, top_k=4))
    assert set(np.asarray(routing.expert_ids)) == {0, 1, 4, 5}


def test_weights_sum_to_scaling_factor_for_a_batch():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(5, 7, 8)), jnp.float32)
    routing = deepseek_route(logits, jnp.zeros(8), deepseek(num_groups=2, topk_groups=1))
    np.testing.assert_allclose(jnp.sum(routing.weights, -1), 2.5, rtol=1e-6)
    groups = np.asarray(routing.expert_ids) // 4
    assert (groups == groups[..., :1]).all()  # one kept group: both experts from it


@pytest.mark.parametrize("normalize", [True, False])
def test_softmax_topk_with_temperature(normalize):
    logits = jnp.array([2.0, 1.0, 0.5, -1.0])
    cfg = MoEConfig(num_experts=4, top_k=2, router="softmax_topk", normalize_weights=normalize)
    routing = softmax_topk(logits, cfg, temperature=0.5)
    probs = np.exp(np.array([4.0, 2.0, 1.0, -2.0]))
    probs /= probs.sum()
    assert np.asarray(routing.expert_ids).tolist() == [0, 1]
    expected = probs[:2] / probs[:2].sum() if normalize else probs[:2]
    np.testing.assert_allclose(routing.weights, expected, rtol=1e-6)


def test_balance_losses_are_one_when_balanced_and_larger_when_not():
    num_experts, top_k = 4, 1
    ids = jnp.arange(8).reshape(2, 4, 1) % num_experts  # every expert twice, once per sequence
    routing = softmax_topk(jnp.zeros((2, 4, num_experts)), MoEConfig(num_experts=4, top_k=1,
                           router="softmax_topk"), 1.0).replace(expert_ids=ids)
    losses = balance_losses(routing, num_experts, top_k)
    np.testing.assert_allclose(losses["switch_loss"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(losses["seq_balance_loss"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(losses["z_loss"], np.log(4.0) ** 2, rtol=1e-6)
    hot = jnp.zeros((2, 4, num_experts)).at[..., 0].set(5.0)
    routing = softmax_topk(hot, MoEConfig(num_experts=4, top_k=1, router="softmax_topk"), 1.0)
    losses = balance_losses(routing, num_experts, top_k)
    assert losses["switch_loss"] > 3.0 and losses["seq_balance_loss"] > 3.0


def _route_grads(with_router_statistics: bool):
    """value_and_grad w.r.t. (x, router_w) of a loss of router.route's weights (and, with
    `with_router_statistics`, of its probs and logits too), jitted afresh."""
    cfg = deepseek(num_experts=64, top_k=6, num_groups=8, topk_groups=4)
    keys = jax.random.split(jax.random.key(7), 4)
    bias = 0.1 * jax.random.normal(keys[0], (64,))  # steers the choice away from the scores
    weight_cotangent = jax.random.normal(keys[1], (2, 40, 6))
    probs_cotangent = jax.random.normal(keys[2], (2, 40, 64))

    def loss(x, w):
        routing = router.route(x, w, bias, 1.0, cfg)
        value = jnp.sum(routing.weights * weight_cotangent)
        if with_router_statistics:
            value += jnp.sum(routing.probs * probs_cotangent) + jnp.sum(routing.logits ** 2)
        return value

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


@pytest.mark.parametrize("with_router_statistics", [False, True], ids=["weights", "all"])
def test_deepseek_weights_gradient_through_the_chosen_logits_equals_the_dense_one(
        with_router_statistics):
    """On CPU the combine weights' gradient reaches x and router_w through the k chosen logits
    a token (cpu_route.chosen_logits_backward), without the dense d_logits products; with the
    router statistics differentiated too, their dense backward adds to it. Both equal plain
    autodiff of XLA's ops."""
    keys = jax.random.split(jax.random.key(8), 2)
    x = jax.random.normal(keys[0], (2, 40, 24))
    w = 0.3 * jax.random.normal(keys[1], (24, 64))
    step = _route_grads(with_router_statistics)
    text = step.lower(x, w).as_text()
    assert text.count(cpu_route.CHOSEN_BACKWARD_TARGET + "(") == 1
    assert (cpu_matmul.BACKWARD_TARGET in text) == with_router_statistics
    loss, grads = step(x, w)
    with cpu_kernels.off("XLA's ops, for reference"):
        reference = _route_grads(with_router_statistics)
        assert cpu_route.CHOSEN_BACKWARD_TARGET not in reference.lower(x, w).as_text()
        expected_loss, expected = reference(x, w)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    assert max_relative_error(grads[0], expected[0]) <= 1e-5
    assert max_relative_error(grads[1], expected[1]) <= 1e-5


def test_chosen_logits_backward_off_cpu_kernels_is_the_dense_one():
    """router.chosen_logits' own backward where the CPU kernels are off (XLA's ops): the
    gradient of (x w)[..., ids]."""
    keys = jax.random.split(jax.random.key(9), 4)
    x = jax.random.normal(keys[0], (3, 10, 8))
    w = jax.random.normal(keys[1], (8, 16))
    ids = jax.random.randint(keys[2], (3, 10, 4), 0, 16)
    cotangent = jax.random.normal(keys[3], (3, 10, 4))

    def chosen(x_, w_):
        return jnp.sum(router.chosen_logits(x_, w_, ids, x_ @ w_) * cotangent)

    def plain(x_, w_):
        return jnp.sum(jnp.take_along_axis(x_ @ w_, ids, axis=-1) * cotangent)

    with cpu_kernels.off("the fallback under test"):
        got = jax.jit(jax.grad(chosen, argnums=(0, 1)))(x, w)
    expected = jax.grad(plain, argnums=(0, 1))(x, w)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def test_zero_router_loss_coefficients_are_not_differentiated():
    """A router loss whose coefficient is 0 stays out of the training loss's graph: the
    router's dense logits backward (the CPU matmul kernel's) is traced only when one of them
    is on (the tiny preset's seq_balance_loss_coef is); the aux_loss metric is then 0, not
    0 x a loss."""
    def dense_router_backwards(overrides):
        cfg = tiny_config(*overrides)
        params = P.init(transformer.model_specs(cfg), jax.random.key(0))
        batch = {"tokens": jnp.zeros((2, cfg.train.seq_len + 1), jnp.int32)}
        grad = jax.jit(jax.grad(lambda p: transformer.loss_fn(p, batch, cfg)[0]))
        hlo = grad.lower(params).as_text()
        metrics = jax.jit(lambda p: transformer.loss_fn(p, batch, cfg)[1])(params)
        return len(re.findall(rf"custom_call @{cpu_matmul.BACKWARD_TARGET}\(", hlo)), metrics

    off, metrics_off = dense_router_backwards(["moe.seq_balance_loss_coef=0"])
    on, metrics_on = dense_router_backwards([])
    assert on > off
    assert float(metrics_off["aux_loss"]) == 0.0 and float(metrics_on["aux_loss"]) > 0.0
