"""The one run builder (moejax/training/run.py): the planner's abstract state is the trainer's
real state, leaf by leaf, and every device holds only its shard of the AdamW moments (ZeRO-1
over the data-parallel devices, as DeepSeek-V3 trains)."""

import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import tiny_config

from moejax.config import config_to_dict
from moejax.tools import plan
from moejax.training.run import build_run
from moejax.training.rundir import config_differences

MESHES = {"fsdp2_expert4": ("mesh.fsdp=2", "mesh.expert=4"),
          "data2_expert4": ("mesh.data=2", "mesh.expert=4")}


def leaves_with_paths(tree):
    return jax.tree_util.tree_flatten_with_path(tree)[0]


@pytest.mark.parametrize("mesh", MESHES)
def test_planned_state_is_the_trainers_state_leaf_by_leaf(mesh):
    cfg = tiny_config(*MESHES[mesh])
    real = build_run(cfg).state
    planned = build_run(cfg, abstract=True).state
    assert jax.tree.structure(real) == jax.tree.structure(planned)
    for (path, r), (_, p) in zip(leaves_with_paths(real), leaves_with_paths(planned)):
        name = jax.tree_util.keystr(path)
        assert isinstance(r, jax.Array) and isinstance(p, jax.ShapeDtypeStruct), name
        assert (r.shape, r.dtype) == (p.shape, p.dtype), name
        assert r.sharding.is_equivalent_to(p.sharding, r.ndim), (name, r.sharding, p.sharding)
        # what each device really holds is the planned shard
        shard_shapes = {s.data.shape for s in r.addressable_shards}
        assert shard_shapes == {p.sharding.shard_shape(p.shape)}, name


def moment_trees(opt_state):
    """The AdamW first and second moments (pytrees shaped like the parameters)."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "mu"))
             if hasattr(s, "mu")]
    assert len(found) == 1
    return found[0].mu, found[0].nu


def mesh_axes(named_sharding) -> set[str]:
    return {a for e in named_sharding.spec if e is not None
            for a in ((e,) if isinstance(e, str) else e)}


def per_device_bytes(x) -> int:
    return max(s.data.nbytes for s in x.addressable_shards)


def assert_moments_sharded_zero(state, data_parallel_axes: set[str]):
    """Each AdamW moment leaf holds at most its parameter's bytes per device and is split over
    every mesh axis its parameter uses; a parameter repeated over a data-parallel axis of
    `data_parallel_axes` (ZeRO-1) has its moments split over it too: strictly fewer bytes."""
    params = leaves_with_paths(state.params)
    for moments in moment_trees(state.opt_state):
        moments = leaves_with_paths(moments)
        assert [p for p, _ in moments] == [p for p, _ in params]
        for (path, m), (_, w) in zip(moments, params):
            name = jax.tree_util.keystr(path)
            assert mesh_axes(w.sharding) <= mesh_axes(m.sharding), name
            assert per_device_bytes(m) <= per_device_bytes(w), name
            repeated = {a for a in data_parallel_axes - mesh_axes(w.sharding)
                        if w.sharding.mesh.shape[a] > 1}
            if repeated and any(d % 2 == 0 for d in w.shape):
                assert mesh_axes(m.sharding) & repeated, (name, m.sharding.spec)
                assert per_device_bytes(m) < per_device_bytes(w), name
    mu, nu = moment_trees(state.opt_state)
    total = lambda tree: sum(per_device_bytes(x) for x in jax.tree.leaves(tree))
    assert total(mu) == total(nu) < total(state.params)


@pytest.fixture(scope="module")
def zero_runs():
    return {mesh: build_run(tiny_config(*MESHES[mesh], "model.mtp_depth=1")) for mesh in MESHES}


@pytest.mark.parametrize("mesh", MESHES)
def test_adamw_moments_are_split_over_the_devices_repeating_their_parameter(mesh, zero_runs):
    run = zero_runs[mesh]
    # data2 x expert4: dense weights repeat over data and expert, experts over data;
    # fsdp2 x expert4: dense weights repeat over expert
    assert_moments_sharded_zero(run.state, {"data", "expert"})
    tokens = np.random.default_rng(0).integers(0, 256, (8, 17), dtype=np.int32)
    stepped, _ = run.step(run.state, run.global_batch(tokens))
    assert_moments_sharded_zero(stepped, {"data", "expert"})
    run.state = stepped


def test_a_checkpoint_with_replicated_moments_restores_into_the_sharded_layout(tmp_path,
                                                                               zero_runs):
    """Checkpoints written before ZeRO (every moment whole on every device) still restore:
    the same values, placed in today's layout."""
    from jax.sharding import NamedSharding, PartitionSpec

    from moejax.training.checkpoint import Checkpoints

    run = build_run(tiny_config(*MESHES["data2_expert4"], "model.mtp_depth=1"))
    whole = NamedSharding(run.mesh, PartitionSpec())
    old_layout = run.state.replace(opt_state=jax.device_put(run.state.opt_state, whole))
    writer = Checkpoints(tmp_path, keep=1)
    writer.save(3, old_layout, {"position": 0})
    writer.close()
    restored, _ = Checkpoints(tmp_path).restore(3, run.state)
    assert_moments_sharded_zero(restored, {"data", "expert"})
    for old, new in zip(jax.tree.leaves(old_layout.opt_state), jax.tree.leaves(restored.opt_state)):
        np.testing.assert_array_equal(np.asarray(old), np.asarray(new))


@pytest.mark.parametrize("mesh", MESHES)
def test_plan_bytes_are_what_a_device_of_the_real_state_holds(mesh):
    cfg = tiny_config(*MESHES[mesh])
    state = build_run(cfg).state
    planned = plan.state_bytes(cfg, 8)

    def largest_shard(tree):
        return sum(max(math.prod(s.data.shape) * s.data.dtype.itemsize
                       for s in x.addressable_shards) for x in jax.tree.leaves(tree))

    assert planned["parameters"] == largest_shard(state.params)
    assert planned["optimizer"] == largest_shard(state.opt_state)


def test_a_run_differing_only_in_seed_shares_the_compiled_step_and_not_the_weights():
    first, second = build_run(tiny_config()), build_run(tiny_config("train.seed=1"))
    assert first.step is second.step
    w1, w2 = first.state.params.embed, second.state.params.embed
    assert not np.array_equal(np.asarray(w1), np.asarray(w2))


def test_the_trainer_caches_compilations_where_the_config_says(tmp_path):
    """train.compilation_cache points jax's persistent cache at a directory (compiled programs
    land there), unless the process already chose one; null leaves it off. In a child process:
    the setting is process-wide."""
    program = """
import sys, jax, jax.numpy as jnp
from moejax.training.run import use_compilation_cache
directory = None if sys.argv[1] == "null" else sys.argv[1]
print(use_compilation_cache(directory))
jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).block_until_ready()
"""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # cache even this tiny program

    def child(setting, **extra):
        done = subprocess.run([sys.executable, "-c", program, setting], check=True, text=True,
                              capture_output=True, env={**env, **extra}, timeout=120)
        return done.stdout.strip().splitlines()[-1]

    chosen = tmp_path / "xla"
    assert child(str(chosen)) == str(chosen) and any(chosen.iterdir())
    assert child("null") == "None"
    theirs = tmp_path / "theirs"
    assert child(str(tmp_path / "ignored"), JAX_COMPILATION_CACHE_DIR=str(theirs)) == str(theirs)
    assert not (tmp_path / "ignored").exists()


def test_a_run_recorded_before_the_cache_setting_existed_still_resumes():
    cfg = tiny_config()
    saved = config_to_dict(cfg)
    del saved["train"]["compilation_cache"]
    assert config_differences(saved, cfg) == []
