"""moe.overlap_halves (moejax/model/moe.py `in_halves`): the same loss and gradients as the
whole-batch layer, and, in the compiled program, GEMMs that do not depend on each dispatch
all-to-all."""

import dataclasses

import jax
import jax.numpy as jnp
from helpers import max_relative_error, tiny_config
from jax.sharding import NamedSharding, PartitionSpec

import moejax
from moejax import params as P
from moejax.model.moe import moe_ffn, moe_specs
from moejax.sharding import batch_sharding
from moejax.tools import hlo_stats

MESH = ("mesh.data=2", "mesh.expert=4")


def _with_overlap(cfg, on: bool):
    return cfg.replace(moe=dataclasses.replace(cfg.moe, overlap_halves=on))


def test_overlapped_model_equals_whole_batch_layer():
    """Loss and every gradient of the whole model with the dropless dispatch (the MTP module's
    odd T - 1 tokens split unequally)."""
    cfg = tiny_config(*MESH, "model.mtp_depth=1")
    mesh = moejax.make_mesh(cfg.mesh)
    params = moejax.init_params(cfg, jax.random.key(0), mesh)
    tokens = jax.random.randint(jax.random.key(1), (cfg.train.global_batch_size,
                                                    cfg.train.seq_len + 1), 0, cfg.model.vocab_size)
    batch = {"tokens": jax.device_put(tokens, batch_sharding(mesh))}
    results = {}
    with jax.set_mesh(mesh):
        for on in (False, True):
            variant = _with_overlap(cfg, on)
            grad_fn = jax.jit(jax.value_and_grad(
                lambda p, b, c=variant: moejax.loss_fn(p, b, c)[0]))
            results[on] = grad_fn(params, batch)
    (loss, grads), (loss_o, grads_o) = results[False], results[True]
    assert abs(float(loss_o) - float(loss)) <= 1e-6 * abs(float(loss))
    assert max(jax.tree.leaves(jax.tree.map(max_relative_error, grads_o, grads))) < 1e-6


def test_overlapped_capacity_layer_equals_whole_batch_layer_without_drops():
    cfg = tiny_config(*MESH, "moe.dispatch=capacity")
    mesh = moejax.make_mesh(cfg.mesh)
    params = P.init(moe_specs(cfg), jax.random.key(0), mesh)
    x = jax.device_put(jax.random.normal(jax.random.key(1), (8, 16, cfg.model.d_model)),
                       batch_sharding(mesh))
    bias = jax.device_put(jnp.zeros(cfg.moe.num_experts), NamedSharding(mesh, PartitionSpec()))
    outputs = {}
    with jax.set_mesh(mesh):
        for on in (False, True):
            variant = _with_overlap(cfg, on)
            layer = jax.jit(jax.value_and_grad(
                lambda p, x, c=variant: jnp.sum(moe_ffn(p, x, bias, 1.0, c)[0] ** 2),
                argnums=(0, 1)))
            outputs[on] = layer(params, x)
    errors = jax.tree.leaves(jax.tree.map(max_relative_error, outputs[True], outputs[False]))
    assert max(errors) < 1e-6


def _compiled_layer_text(cfg):
    mesh = moejax.make_mesh(cfg.mesh)
    params = P.init(moe_specs(cfg), jax.random.key(0), mesh)
    x = jax.device_put(jnp.ones((8, 16, cfg.model.d_model)), batch_sharding(mesh))
    bias = jax.device_put(jnp.zeros(cfg.moe.num_experts), NamedSharding(mesh, PartitionSpec()))
    layer = jax.jit(lambda p, x, b: moe_ffn(p, x, b, 1.0, cfg)[0])
    with jax.set_mesh(mesh):
        return layer.lower(params, x, bias).compile().as_text()


def test_each_half_exchanges_while_the_other_half_can_compute():
    """Whole batch: the shared expert is the only GEMM work free of the exchanges (3: rows and
    metadata out, results back). Halves: 6 exchanges, and each also leaves the other half's
    expert GEMMs free to run while it is in flight."""
    cfg = tiny_config(*MESH)
    whole = hlo_stats.collective_overlap(_compiled_layer_text(_with_overlap(cfg, False)))
    halves = hlo_stats.collective_overlap(_compiled_layer_text(_with_overlap(cfg, True)))
    assert len(whole) == 3 and len(halves) == 6
    assert min(h["independent"] for h in halves) > max(w["independent"] for w in whole)
