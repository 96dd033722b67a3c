"""Tests for moejax.training.loss_scale: skip-and-back-off on overflow, growth, jit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moejax.training.loss_scale import (
    LossScaleState,
    global_norm,
    init_loss_scale,
    scale_loss,
    select_update,
    unscale_grads,
    update_loss_scale,
)

OPTIMIZER = optax.adam(1e-2)


def fp16_loss(params, inputs):
    """A linear layer computed in fp16 from f32 master weights, f32 loss."""
    prediction = inputs.astype(jnp.float16) @ params["w"].astype(jnp.float16) + params["b"]
    return jnp.mean(prediction.astype(jnp.float32) ** 2)


@functools.partial(jax.jit, static_argnames="growth_interval")
def train_step(params, opt_state, loss_scale, inputs, growth_interval=2000):
    scaled_grads = jax.grad(lambda p: scale_loss(fp16_loss(p, inputs), loss_scale))(params)
    grads = unscale_grads(scaled_grads, loss_scale)
    finite = jnp.isfinite(global_norm(grads))
    updates, new_opt_state = OPTIMIZER.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    params, opt_state = select_update(finite, (new_params, new_opt_state), (params, opt_state))
    return params, opt_state, update_loss_scale(loss_scale, finite, growth_interval), finite


def initial_state():
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((8, 4)), jnp.float32),
              "b": jnp.zeros((4,), jnp.float32)}
    return params, OPTIMIZER.init(params), init_loss_scale()


def small_inputs():
    return jnp.asarray(np.random.default_rng(1).standard_normal((16, 8)) * 0.1, jnp.float32)


def assert_trees_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_fp16_overflow_skips_update_and_halves_scale():
    params, opt_state, loss_scale = initial_state()
    params, opt_state, loss_scale, finite = train_step(
        params, opt_state, loss_scale, small_inputs())
    assert bool(finite) and int(loss_scale.good_steps) == 1

    # Forward fits fp16, but the scaled cotangent of the prediction, about
    # 2 * 2e3 / 64 * 2^15 = 2e6, overflows fp16 (max 65504) in the backward pass.
    overflowing = small_inputs().at[0, 0].set(2e3)
    new_params, new_opt_state, new_scale, finite = train_step(
        params, opt_state, loss_scale, overflowing)
    assert not bool(finite)
    assert_trees_equal(new_params, params)
    assert_trees_equal(new_opt_state, opt_state)
    assert float(new_scale.scale) == float(loss_scale.scale) / 2
    assert int(new_scale.skipped_steps) == 1 and int(new_scale.good_steps) == 0


def test_injected_inf_gradient_is_skipped():
    params, opt_state, _ = initial_state()
    loss_scale = init_loss_scale(1024.0)
    inf_inputs = small_inputs().at[3, 2].set(jnp.inf)
    new_params, new_opt_state, new_scale, finite = train_step(
        params, opt_state, loss_scale, inf_inputs)
    assert not bool(finite)
    assert_trees_equal(new_params, params)
    assert_trees_equal(new_opt_state, opt_state)
    assert float(new_scale.scale) == 512.0 and int(new_scale.skipped_steps) == 1


def test_scale_grows_after_growth_interval_finite_steps():
    params, opt_state, loss_scale = initial_state()
    start_scale = float(loss_scale.scale)
    for step in range(1, 4):
        before = params
        params, opt_state, loss_scale, finite = train_step(
            params, opt_state, loss_scale, small_inputs(), growth_interval=3)
        assert bool(finite)
        assert not np.array_equal(np.asarray(params["w"]), np.asarray(before["w"]))
        if step < 3:
            assert float(loss_scale.scale) == start_scale and int(loss_scale.good_steps) == step
    assert float(loss_scale.scale) == 2 * start_scale
    assert int(loss_scale.good_steps) == 0 and int(loss_scale.skipped_steps) == 0


def test_update_loss_scale_limits():
    update = jax.jit(update_loss_scale, static_argnames="growth_interval")
    at_floor = update(init_loss_scale(1.0), False)
    assert float(at_floor.scale) == 1.0  # min_scale
    near_max = LossScaleState(jnp.float32(2.0**127), jnp.int32(0), jnp.int32(0))
    assert float(update(near_max, True, growth_interval=1).scale) == 2.0**127  # no overflow to inf
    assert float(update(init_loss_scale(8.0), True, growth_interval=1).scale) == 16.0


def test_unscaled_grads_equal_unscaled_loss_grads():
    params, _, loss_scale = initial_state()
    inputs = small_inputs()
    scaled = jax.jit(jax.grad(lambda p: scale_loss(fp16_loss(p, inputs), loss_scale)))(params)
    plain = jax.jit(jax.grad(lambda p: fp16_loss(p, inputs)))(params)
    unscaled = jax.jit(unscale_grads)(scaled, loss_scale)
    for got, expected in zip(jax.tree.leaves(unscaled), jax.tree.leaves(plain)):
        assert got.dtype == expected.dtype
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=2e-3, atol=1e-6)
    assert scale_loss(jnp.float16(3.0), loss_scale).dtype == jnp.float32


@pytest.mark.parametrize("bad_value", [np.inf, -np.inf, np.nan])
def test_global_norm_over_nested_mixed_dtype_trees(bad_value):
    """The step's finiteness test: the norm of a tree with any inf or NaN is not finite, and a
    float16 leaf is squared in float32 (300^2 would overflow float16: a false skip)."""
    tree = {"a": jnp.full((3,), 300, jnp.float16), "b": [jnp.ones((2, 2)), jnp.arange(4)]}
    norm = jax.jit(global_norm)
    expected = np.sqrt(3 * 300.0**2 + 4 + (0 + 1 + 4 + 9))
    np.testing.assert_allclose(float(norm(tree)), expected, rtol=1e-6)
    assert norm(tree).dtype == jnp.float32 and float(norm({})) == 0.0
    bad_tree = {**tree, "a": tree["a"].at[1].set(bad_value)}
    assert not np.isfinite(float(norm(bad_tree)))


def test_state_is_a_pytree():
    state = init_loss_scale()
    leaves = jax.tree.leaves(state)
    assert len(leaves) == 3
    assert [leaf.dtype for leaf in leaves] == [jnp.float32, jnp.int32, jnp.int32]
    assert isinstance(jax.jit(lambda s: s)(state), LossScaleState)
