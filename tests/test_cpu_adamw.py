"""training/cpu_adamw.py: the trainer's AdamW step as one XLA:CPU kernel over every leaf, against
optax's chain (make_optimizer) on the same parameters, gradients and state."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import max_relative_error, tiny_config

from moejax import sharding
from moejax.model import cpu_kernels
from moejax.model.transformer import initial_params
from moejax.training import cpu_adamw, step
from moejax.training.loss_scale import global_norm
from moejax.training.optim import make_optimizer
from moejax.training.run import build_run

CFG = tiny_config("train.steps=20", "train.warmup_steps=4", "train.weight_decay=0.1",
                  "mesh.expert=1")  # one of the 8 test devices


# without clipping (train.grad_clip 0), make_optimizer is AdamW alone, with no clip in its chain
UNCLIPPED = CFG.replace(train=dataclasses.replace(CFG.train, grad_clip=0.0))


def _state(cfg, count: int, seed: int = 0):
    """(params, grads, optimizer state at `count` with random moments)."""
    keys = iter(jax.random.split(jax.random.key(seed), 256))
    params = initial_params(cfg, next(keys))

    def normal(x, scale=1.0):
        return scale * jax.random.normal(next(keys), x.shape, x.dtype)

    grads = jax.tree.map(lambda x: normal(x, 1e-3), params)  # global norm ~0.3
    opt_state = make_optimizer(cfg).init(params)
    opt_state = optax.tree_utils.tree_set(
        opt_state, mu=jax.tree.map(lambda x: normal(x, 0.01), params),
        nu=jax.tree.map(lambda x: jnp.abs(normal(x, 1e-4)), params),
        count=jnp.asarray(count, jnp.int32))
    return params, grads, opt_state


@functools.partial(jax.jit, static_argnums=0)
def _optax_step(cfg, grads, opt_state, params):
    updates, opt_state = make_optimizer(cfg).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


@functools.partial(jax.jit, static_argnums=0)
def _kernel_step(cfg, grads, opt_state, params, apply):
    return cpu_adamw.update(cfg, grads, opt_state, params, global_norm(grads), apply)


@pytest.mark.parametrize("cfg, count, grad_scale", [
    (CFG, 0, 1.0), (CFG, 2, 1.0), (CFG, 7, 1.0), (CFG, 7, 100.0), (UNCLIPPED, 7, 100.0)],
    ids=["warm-up start", "warm-up", "decay", "clipped", "no clip in the chain"])
def test_the_kernel_takes_optaxs_step(cfg, count, grad_scale):
    """Warm-up (count 0: learning rate 0) and decay, with and without clipping (grad_scale 100
    puts the global norm over train.grad_clip); decayed matrices and undecayed norms."""
    params, grads, opt_state = _state(cfg, count)
    grads = jax.tree.map(lambda g: g * grad_scale, grads)
    assert (float(global_norm(grads)) > CFG.train.grad_clip) == (grad_scale > 1)
    expected = _optax_step(cfg, grads, opt_state, params)
    actual = _kernel_step(cfg, grads, opt_state, params, jnp.asarray(True))
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    assert max_relative_error(actual, expected) < 1e-6
    moved = max_relative_error(actual[0], params)
    assert (moved > 0) == (count > 0)  # learning rate 0 at step 0 of warm-up


def test_a_skipped_step_changes_nothing():
    params, grads, opt_state = _state(CFG, 3)
    actual = _kernel_step(CFG, grads, opt_state, params, jnp.asarray(False))
    assert max_relative_error(actual, (params, opt_state)) == 0


def test_the_one_device_step_runs_one_kernel_and_a_mesh_runs_optax():
    """The compiled train step on one device holds one AdamW call (and no per-leaf select); on
    8 devices, sharded leaves, none."""
    one = build_run(CFG, abstract=True).lower().as_text()
    assert one.count(cpu_adamw.TARGET) == 1
    eight = build_run(tiny_config(), abstract=True).lower().as_text()
    assert cpu_adamw.TARGET not in eight


def test_train_steps_match_optaxs_chain():
    """Three steps of the trainer's own step with the kernel and with optax's chain (the CPU
    kernels off), from the same state on the same batches."""
    cfg = CFG
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (3, 8, 17), np.int32)

    def three_steps():
        step.compiled_train_step.cache_clear()
        run = build_run(cfg)
        state = run.state
        with jax.set_mesh(run.mesh):
            for batch in tokens:
                state, metrics = run.step(state, run.global_batch(batch))
        return state, float(metrics["loss"])

    assert cpu_adamw.applies(build_run(cfg, abstract=True).state.params,
                             sharding.make_mesh(cfg.mesh))
    with_kernel, loss = three_steps()
    with cpu_kernels.off("testing optax's chain"):
        with_optax, expected_loss = three_steps()
    step.compiled_train_step.cache_clear()
    assert max_relative_error(with_kernel.params, with_optax.params) < 1e-5
    assert max_relative_error(with_kernel.opt_state, with_optax.opt_state) < 1e-5
    assert loss == pytest.approx(expected_loss, rel=1e-5)
