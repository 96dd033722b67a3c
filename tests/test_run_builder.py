"""The one run builder (moejax/training/run.py): the planner's abstract state is the trainer's
real state, leaf by leaf, and every device holds only its shard of the AdamW moments (ZeRO)."""

import math

import jax
import numpy as np
import pytest
from helpers import tiny_config

from moejax.tools import plan
from moejax.training.run import build_run

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


@pytest.mark.parametrize("mesh", MESHES)
def test_adamw_moments_are_sharded_exactly_like_the_parameters(mesh):
    cfg = tiny_config(*MESHES[mesh])
    state = build_run(cfg).state
    params = leaves_with_paths(state.params)
    for moments in moment_trees(state.opt_state):
        moments = leaves_with_paths(moments)
        assert [p for p, _ in moments] == [p for p, _ in params]
        for (path, m), (_, w) in zip(moments, params):
            assert m.sharding.is_equivalent_to(w.sharding, w.ndim), jax.tree_util.keystr(path)
    # so a device holds its parameters' share of each moment, not the whole: bytes on device 0
    device = jax.devices()[0]

    def on_device(tree):
        return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
                   if s.device == device)

    whole = sum(x.nbytes for x in jax.tree.leaves(state.params))
    mu, nu = moment_trees(state.opt_state)
    assert on_device(mu) == on_device(nu) == on_device(state.params) < whole


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
