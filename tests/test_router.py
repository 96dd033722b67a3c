"""Routers against hand-worked examples."""

import jax.numpy as jnp
import numpy as np
import pytest

from moejax.config import MoEConfig
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
