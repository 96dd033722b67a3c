"""Explicit (and compressed) data-parallel gradient reduction, error feedback, delayed expert
updates (moejax/training/grad_reduce.py) on data2 x expert4."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_bit_equal, max_relative_error, tiny_config
from jax.sharding import PartitionSpec

from moejax import sharding
from moejax.config import ConfigError
from moejax.tools.grad_compression import reduction_program
from moejax.training import grad_reduce
from moejax.training.checkpoint import Checkpoints
from moejax.training.optim import learning_rate_schedule
from moejax.training.run import build_run

MESH = ("mesh.data=2", "mesh.expert=4")
# no warmup: the first step already moves the parameters by the gradient; one dense and one
# MoE layer keep the three compiled steps of this file small
STEP = ("train.warmup_steps=0", "train.steps=10", "model.num_layers=2")


def config(*overrides):
    return tiny_config(*MESH, *STEP, *overrides)


def tokens(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (8, 17)).astype(np.int32)


def steps(run, state, count: int, first_seed: int = 0):
    """`count` steps from a copy of `state` (the step donates its input)."""
    state = jax.tree.map(jnp.copy, state)
    with jax.set_mesh(run.mesh):
        for i in range(count):
            state, metrics = run.step(state, run.global_batch(tokens(first_seed + i)))
    return state, metrics


@pytest.fixture(scope="module")
def implicit_and_f32():
    """One step of the implicit (GSPMD) step and of the explicit f32 reduction, same init."""
    out = {}
    for name in ("none", "f32"):
        run = build_run(config(f"train.grad_compression={name}"))
        out[name] = (run, *steps(run, run.state, 1))
    return out


def host(tree):
    """numpy copies of the leaves (comparisons on the host compile nothing)."""
    return jax.tree.map(np.asarray, tree)


def test_explicit_f32_equals_implicit(implicit_and_f32):
    _, implicit, im = implicit_and_f32["none"]
    _, explicit, em = implicit_and_f32["f32"]
    assert explicit.grad_sync is None  # f32 without a delay keeps no state
    assert abs(float(em["loss"]) - float(im["loss"])) <= 1e-6 * abs(float(im["loss"]))
    assert abs(float(em["grad_norm"]) / float(im["grad_norm"]) - 1) <= 1e-6
    np.testing.assert_array_equal(em["expert_counts"], im["expert_counts"])
    # Adam's moments after one step are (1 - b1) g and (1 - b2) g^2 of the clipped gradient g:
    # the gradients agree leaf by leaf to 1e-6
    assert max_relative_error(host(explicit.opt_state), host(implicit.opt_state)) <= 1e-6
    # Each run's parameters moved by its own moments' AdamW update: lr (u + wd p0) with
    # u = m^ / (sqrt(v^) + eps). Comparing the parameters directly is ill-conditioned where
    # |g| ~ eps (du/dg = eps / (|g| + eps)^2: a 1e-6 gradient difference can move u by 1e-3),
    # so the parameters' difference must be the moments' update difference, to float32 rounding.
    run, _, _ = implicit_and_f32["none"]
    lr = float(learning_rate_schedule(run.cfg)(0))
    pe, pi = host(explicit.params), host(implicit.params)
    ue, ui = adam_first_update(run.cfg, explicit.opt_state), adam_first_update(run.cfg, implicit.opt_state)
    for a, b, da, db in zip(jax.tree.leaves(pe), jax.tree.leaves(pi), jax.tree.leaves(ue), jax.tree.leaves(ui)):
        unexplained = np.abs((a - b) + lr * (da - db))
        np.testing.assert_array_less(unexplained, 4 * np.spacing(np.abs(b)) + 1e-6 * lr)


def adam_first_update(cfg, opt_state):
    """u = m^ / (sqrt(v^) + eps) after AdamW's first step, from the state's moments."""
    adam = next(s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu"))
    t = cfg.train
    return jax.tree.map(lambda m, v: (np.asarray(m, np.float64) / (1 - t.adam_b1))
                        / (np.sqrt(np.asarray(v, np.float64) / (1 - t.adam_b2)) + 1e-8), adam.mu, adam.nu)


def test_explicit_gradients_leave_in_moment_shardings(implicit_and_f32):
    """The reduced gradients land on the AdamW moments' ZeRO shards: the moments keep them."""
    run, state, _ = implicit_and_f32["f32"]
    wanted = jax.tree.leaves(run.state.opt_state)
    for leaf, like in zip(jax.tree.leaves(state.opt_state), wanted):
        assert leaf.sharding.is_equivalent_to(like.sharding, leaf.ndim)


def _reduce(compression: str, seed: int = 0):
    """Random per-replica gradients of the tiny model reduced with `compression` ->
    (gradients [R, *shape] per leaf, reduced means, residuals [R, *shape], plans)."""
    cfg = config(f"train.grad_compression={compression}")
    mesh = sharding.make_mesh(cfg.mesh)
    program, (grad_specs, sync) = reduction_program(cfg, mesh)
    rng = np.random.default_rng(seed)
    # a wide dynamic range per leaf (what per-block scales are for)
    grads = [jax.device_put(
        (rng.standard_normal(s.shape) * 10.0 ** rng.uniform(-6, 0, s.shape[:1] + (1,) *
                                                              (len(s.shape) - 1))
         ).astype(np.float32), s.sharding) for s in grad_specs]
    sync_values = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype, device=s.sharding), sync)
    with jax.set_mesh(mesh):
        reduced, new_sync = program(grads, sync_values)
    plans = grad_reduce.leaf_plans(cfg, mesh)
    errors = None if new_sync.error is None else [new_sync.error[p.name] for p in plans]
    return [np.asarray(g) for g in grads], [np.asarray(r) for r in reduced], errors, plans


SHARDS = 8  # data x fsdp x expert: every leaf's mean divides by the batch shards


@pytest.mark.parametrize("compression, relative", [("bf16", 2.0 ** -8), ("fp8", 2.0 ** -3)])
def test_compressed_reduction_error_bounds(compression, relative):
    """bf16: each replica's value rounded to 8 mantissa bits; fp8 e4m3: 3 bits, one scale per
    128 values (plus the subnormal step of the block's scale). The residual kept for error
    feedback is exactly what was lost: reduced + sum(residuals) / shards = the exact mean."""
    grads, reduced, errors, plans = _reduce(compression)
    for g, r, e, plan in zip(grads, reduced, errors, plans):
        exact = g.astype(np.float64).sum(0) / SHARDS
        scale = np.abs(g).max() / 448.0  # the largest e4m3 block scale in the leaf
        bound = relative * np.abs(g).sum(0) / SHARDS + (compression == "fp8") * scale * 2.0 ** -9
        assert np.all(np.abs(r - exact) <= bound * 1.01 + 1e-12), plan.name
        assert np.abs(r - exact).max() > 0  # it did compress
        e = np.asarray(e)
        np.testing.assert_allclose(r + e.sum(0) / SHARDS, exact, rtol=1e-5,
                                   atol=1e-6 * np.abs(exact).max())


def test_powersgd_with_error_feedback_converges_on_a_quadratic():
    """Replica i minimises 0.5 |W - T_i|^2 (T_i full rank, W [24, 16]); gradient descent with
    rank-1 PowerSGD and step 0.1 reaches the mean of the T_i thanks to error feedback (without
    it, 300 steps leave ~10% of the distance; at step 0.5 error feedback diverges, as its
    theory allows only steps below the compressor's contraction, 1/16 here)."""
    cfg = config("train.grad_compression=powersgd", "train.powersgd_rank=1")
    mesh = sharding.make_mesh(cfg.mesh)
    plan = grad_reduce.LeafPlan("w", (24, 16), False, PartitionSpec(), PartitionSpec(),
                                sharding.BATCH_AXES, True)
    targets = jax.random.normal(jax.random.key(0), (SHARDS, 24, 16))
    q0 = jax.random.normal(jax.random.key(1), (16, 1))

    def descend(feedback: bool):
        def body(t_, q_):
            def one(_, carry):
                w, error, q = carry
                sync = grad_reduce.GradSyncState(error={"w": error}, q={"w": q})
                (g,), new_error, new_q = grad_reduce.reduce_gradients(
                    [w - t_[0]], sync, [plan], cfg, mesh)
                error = new_error["w"] if feedback else error
                return w - 0.1 * g, error, new_q["w"]

            w0 = jax.lax.pcast(jnp.zeros((24, 16)), sharding.BATCH_AXES, to="varying")
            e0 = jnp.zeros((1, 24, 16)) + 0 * w0
            w, _, _ = jax.lax.fori_loop(0, 300, one, (w0, e0, q_))
            return w[None]

        run = jax.shard_map(body, mesh=mesh, in_specs=(PartitionSpec(sharding.BATCH_AXES),
                                                       PartitionSpec()),
                            out_specs=PartitionSpec(sharding.BATCH_AXES))
        return np.asarray(jax.jit(run)(targets, q0))

    optimum = np.asarray(targets.mean(0))
    with_feedback = descend(True)
    without = descend(False)
    gap = np.abs(with_feedback - optimum).max() / np.abs(optimum).max()
    assert gap < 1e-3
    assert np.abs(without - optimum).max() / np.abs(optimum).max() > 10 * gap
    np.testing.assert_allclose(with_feedback, with_feedback[:1].repeat(SHARDS, 0), atol=1e-6)


@pytest.fixture(scope="module")
def compressed_run():
    """bf16 with error feedback and the delayed expert update: two steps."""
    run = build_run(config("train.grad_compression=bf16", "train.expert_grad_delay=true"))
    first, _ = steps(run, run.state, 1)
    second, _ = steps(run, first, 1, first_seed=1)
    return run, first, second


def test_delayed_expert_update_uses_the_previous_gradient(compressed_run):
    run, first, _ = compressed_run
    cfg = run.cfg
    lr, wd = cfg.train.learning_rate, cfg.train.weight_decay
    start = run.state.params.moe_blocks.ffn.w_gate
    # step 0 applies a zero expert gradient: AdamW moves the experts by weight decay alone
    np.testing.assert_allclose(first.params.moe_blocks.ffn.w_gate, start * (1 - lr * wd),
                               rtol=1e-6)
    delayed = first.grad_sync.delayed["moe_blocks__ffn__w_gate"]
    assert float(jnp.abs(delayed).max()) > 0  # step 0's gradient, kept for step 1
    assert max_relative_error(first.params.embed, run.state.params.embed) > 10 * lr * wd


def test_error_feedback_state_survives_a_resume_bit_exactly(compressed_run, tmp_path):
    run, first, second = compressed_run
    assert float(jnp.abs(first.grad_sync.error["embed"]).max()) > 0  # bf16 lost something
    checkpoints = Checkpoints(tmp_path / "checkpoints", 2)
    checkpoints.save(1, first, {})
    checkpoints.close()
    checkpoints = Checkpoints(tmp_path / "checkpoints", 2)
    restored, _ = checkpoints.restore(1, build_run(run.cfg).state)
    checkpoints.close()
    assert_trees_bit_equal(restored, first)
    for leaf, like in zip(jax.tree.leaves(restored.grad_sync), jax.tree.leaves(first.grad_sync)):
        assert leaf.sharding.is_equivalent_to(like.sharding, leaf.ndim)
    resumed, _ = steps(run, restored, 1, first_seed=1)
    assert_trees_bit_equal(resumed, second)


def test_implicit_state_has_no_gradient_state_and_restores_as_before(implicit_and_f32, tmp_path):
    """grad_compression=none keeps the state's tree as it was (older checkpoints restore)."""
    run, state, _ = implicit_and_f32["none"]
    assert state.grad_sync is None
    checkpoints = Checkpoints(tmp_path / "checkpoints", 2)
    checkpoints.save(1, state, {})
    checkpoints.close()
    checkpoints = Checkpoints(tmp_path / "checkpoints", 2)
    restored, _ = checkpoints.restore(1, run.state)
    checkpoints.close()
    assert_trees_bit_equal(restored, state)


def test_pipelined_mesh_is_refused_in_one_sentence():
    with pytest.raises(ConfigError, match="mesh.pipe"):
        tiny_config("mesh.pipe=2", "mesh.expert=4", "train.grad_compression=bf16")


def test_study_table_reports_each_seed_and_the_verdict():
    """The study's markdown table: one row per setting with every seed's held-out loss, and a
    verdict only where every paired gap has one sign beyond the spread (summarise)."""
    from moejax.tools.grad_compression import study_table, summarise

    runs = {"none": {0: {"held_out": 2.0}, 1: {"held_out": 2.1}},
            "worse one": {0: {"held_out": 2.5}, 1: {"held_out": 2.6}},
            "mixed": {0: {"held_out": 1.9}, 1: {"held_out": 2.2}}}
    tolerance = {"held_out_gap": 0.01}
    table = study_table({"seeds": [0, 1], "summary": summarise(runs, [0, 1], tolerance)})
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()[2:5]}
    assert "2.5000 | 2.6000" in rows["worse one"] and rows["worse one"].endswith("| worse |")
    assert rows["mixed"].endswith("| no resolved difference |")
    assert "+0.5000" in rows["worse one"]
