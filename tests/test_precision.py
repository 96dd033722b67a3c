"""fp8 in the model (both recipes, fp8 dispatch) and float16 with dynamic loss scaling."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import max_relative_error, tiny_config
from jax.sharding import NamedSharding, PartitionSpec

import moejax
from moejax import params as P
from moejax.config import MeshConfig
from moejax.model.moe import moe_ffn, moe_specs
from moejax.sharding import batch_sharding
from moejax.training.optim import make_optimizer
from moejax.training.run import build_run
from moejax.training.state import init_train_state
from moejax.training.step import train_step

E4M3_UNIT_ROUNDOFF = 2.0**-4

# The model tests run the default dropless dispatch (fp8 grouped GEMMs: tests/test_dropless_fp8.py);
# the capacity dispatch's fp8 experts and fp8 payload keep their own tests here (with
# capacity_factor null nothing is dropped, so its math is the dropless model's)
CAPACITY = "moe.dispatch=capacity"


def frobenius_relative(actual, expected) -> float:
    """On host copies: eager jnp would compile each op for every shape and sharding."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


@functools.cache
def model_and_batch():
    cfg = tiny_config("moe.num_shared_experts=1")
    params = moejax.init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (8, 17), 0, 256)
    return cfg, params, {"tokens": tokens}


# jitted: run eagerly, each primitive of the model (and of its backward) compiles on its own
forward = jax.jit(moejax.forward, static_argnums=2)
loss_grads = jax.jit(jax.grad(lambda p, b, c: moejax.loss_fn(p, b, c)[0]), static_argnums=2)


@functools.cache
def float32_logits_and_grads():
    """The float32 model's logits and gradients, which both recipes are compared against."""
    cfg, params, batch = model_and_batch()
    return forward(params, batch["tokens"], cfg)[0], loss_grads(params, batch, cfg)


@pytest.mark.parametrize("recipe", ["tensor", "block"])
def test_fp8_model_stays_close_to_float32(recipe):
    _, params, batch = model_and_batch()
    fp8_cfg = tiny_config("moe.num_shared_experts=1", f"precision.fp8={recipe}",
                          "precision.fp8_block_size=16")
    reference, f32_grads = float32_logits_and_grads()
    logits, _ = forward(params, batch["tokens"], fp8_cfg)
    # Each fp8 GEMM has relative error <= sqrt(2) u (moejax/fp8.py); with four GEMM layers in
    # sequence and normalisation between them the logits stay within 4 sqrt(2) u.
    error = frobenius_relative(logits, reference)
    print(f"{recipe}: logits relative error {error:.4f}")
    assert 0 < error <= 4 * np.sqrt(2) * E4M3_UNIT_ROUNDOFF
    fp8_grads = loss_grads(params, batch, fp8_cfg)
    assert all(np.isfinite(g).all() for g in jax.device_get(jax.tree.leaves(fp8_grads)))
    assert frobenius_relative(fp8_grads.moe_blocks.ffn.w_down, f32_grads.moe_blocks.ffn.w_down) < 0.25


def test_tensor_fp8_train_step_lowers_to_e4m3_and_e5m2_dots():
    cfg = tiny_config("precision.fp8=tensor", CAPACITY, "mesh.expert=1", "mesh.data=-1")
    hlo = build_run(cfg, abstract=True).lower().as_text()
    dots = [line for line in hlo.splitlines() if "dot_general" in line]
    e4m3_by_e4m3 = [d for d in dots if d.count("f8E4M3FN") >= 2]
    with_e5m2 = [d for d in dots if "f8E5M2" in d and "f8E4M3FN" in d]
    # forward: 4 attention + 3 dense-FFN + 3 shared + 3 expert GEMMs per layer kind; backward
    # has two e5m2 x e4m3 GEMMs per forward GEMM.
    assert len(e4m3_by_e4m3) >= 10 and len(with_e5m2) >= 2 * len(e4m3_by_e4m3) - 1
    assert not [d for d in dots if d.count("f8E5M2") >= 2]


def test_fp8_dispatch_sends_one_byte_per_element():
    cfg = tiny_config(CAPACITY).replace(mesh=MeshConfig(2, 1, 4))
    fp8_cfg = cfg.replace(precision=dataclasses.replace(cfg.precision, fp8_dispatch=True))
    mesh = moejax.make_mesh(cfg.mesh)
    params = P.init(moe_specs(cfg), jax.random.key(0), mesh)
    x = jax.device_put(jax.random.normal(jax.random.key(1), (8, 16, cfg.model.d_model)),
                       batch_sharding(mesh))
    bias = jax.device_put(jnp.zeros(cfg.moe.num_experts), NamedSharding(mesh, PartitionSpec()))

    def layer(c):
        return jax.jit(lambda p, x, b: moe_ffn(p, x, b, 1.0, c)[0])

    with jax.set_mesh(mesh):
        reference = layer(cfg)(params, x, bias)
        quantized = layer(fp8_cfg)(params, x, bias)
        lowered = layer(fp8_cfg).lower(params, x, bias).as_text()
    error = frobenius_relative(quantized, reference)
    print(f"fp8 dispatch: layer output relative error {error:.4f}")
    assert 0 < error <= E4M3_UNIT_ROUNDOFF  # one e4m3 rounding of the expert inputs
    # The program's all-to-alls (StableHLO): token payloads [.., D] go out as e4m3 (1 byte per
    # element) and come back in float32; the [.., 1] per-token scales travel beside them.
    # (XLA:CPU then widens fp8 collectives to f16 when compiling; GPUs send fp8 as is.)
    payloads = re.findall(r"all_to_all.*?\(tensor<([\dx]+)x(\w+)>\)", lowered)
    wide = [dtype for shape, dtype in payloads if shape.endswith(f"x{cfg.model.d_model}")]
    assert wide == ["f8E4M3FN", "f32"]


def test_float16_loss_scaling_skips_overflowing_steps_and_recovers():
    cfg = tiny_config("precision.compute_dtype=float16", "precision.loss_scale_init=1e12",
                      "mesh.expert=1", "mesh.data=-1", "train.warmup_steps=0")
    mesh = moejax.make_mesh(cfg.mesh)
    optimizer = make_optimizer(cfg)
    state = init_train_state(cfg, jax.random.key(0), mesh)
    batch = {"tokens": jax.random.randint(jax.random.key(1), (8, 17), 0, 256)}
    # the state's shardings out as in: every step then runs the one compilation
    step = jax.jit(lambda s, b: train_step(s, b, cfg, optimizer),
                   out_shardings=(jax.tree.map(lambda x: x.sharding, state), None))
    with jax.set_mesh(mesh):
        first, metrics = step(state, batch)
        # 1e12 x the loss overflows float16 (max 65504): nothing but the scale may change
        assert int(metrics["skipped_steps"]) == 1 and float(metrics["loss_scale"]) == float(np.float32(5e11))
        assert max_relative_error(first.params, state.params) == 0.0
        assert int(first.step) == 1
        history, current = [], first
        for _ in range(40):
            current, metrics = step(current, batch)
            history.append((int(metrics["skipped_steps"]), float(metrics["loss"])))
    skipped = history[-1][0]
    print(f"float16: {skipped} steps skipped before the scale fit, final scale "
          f"{float(current.loss_scale.scale):.3g}")
    assert 10 < skipped < 40  # ~log2(1e12 / 65504 x ...) back-offs, then training resumes
    assert float(current.loss_scale.scale) == float(np.float32(1e12) * 0.5**skipped)
    assert np.isfinite(history[-1][1]) and history[-1][1] < history[skipped][1]


def test_block_fp8_on_a_mesh_matches_one_device():
    """Block scales are per token tile and per weight block, so sharding the batch or the
    experts changes no forward scale: the loss matches one device to float32 tolerance. The
    backward quantizes gradients too, and the sharded program sums in another order, so a
    gradient element within float32 noise of an fp8 rounding boundary may round the other way
    (seen on jax 0.12.1, not on 0.10.2): the other gradients agree to a few such flips, far
    below one e4m3 step. The routed experts' weight gradients tile the rows of each expert's
    group (128-row chunks from its first row), whose rows follow the shard layout (each data
    shard's expert replica sees half the batch): they agree to fp8 accuracy."""
    overrides = ("precision.fp8=block", "precision.fp8_block_size=16")
    cfg = tiny_config(*overrides)
    _, params, batch = model_and_batch()
    loss_and_grads = jax.value_and_grad(lambda p, c: moejax.loss_fn(p, batch, c)[0])
    expected_loss, expected_grads = jax.jit(loss_and_grads, static_argnums=1)(params, cfg)
    mesh_cfg = tiny_config(*overrides).replace(mesh=MeshConfig(2, 1, 4))
    mesh = moejax.make_mesh(mesh_cfg.mesh)
    with jax.set_mesh(mesh):
        # from a host copy: numpy slices out the shards (a device array's shards would each
        # compile a slicing program)
        sharded = jax.device_put(jax.device_get(params),
                                 P.shardings(moejax.model_specs(mesh_cfg), mesh))
        loss, grads = jax.jit(loss_and_grads, static_argnums=1)(sharded, mesh_cfg)
    assert abs(float(loss) - float(expected_loss)) <= 1e-5 * abs(float(expected_loss))
    experts = ("w_gate", "w_up", "w_down")

    def without_experts(g):
        return g.replace(moe_blocks=g.moe_blocks.replace(
            ffn=g.moe_blocks.ffn.replace(**dict.fromkeys(experts, jnp.zeros(())))))

    host_grads, host_expected = jax.device_get((without_experts(grads),
                                                without_experts(expected_grads)))
    flips = jax.tree.map(lambda a, e: float(np.linalg.norm(a - e)
                                            / np.maximum(np.linalg.norm(e), 1e-30)),
                         host_grads, host_expected)
    assert max(jax.tree.leaves(flips)) <= E4M3_UNIT_ROUNDOFF / 8, flips
    for name in experts:
        error = frobenius_relative(getattr(grads.moe_blocks.ffn, name),
                                   getattr(expected_grads.moe_blocks.ffn, name))
        assert error <= 2 * E4M3_UNIT_ROUNDOFF, name


def _hidden_and_loss(residual: str):
    """The decoder's hidden stream (abstract) and the loss of tiny with MTP, at one residual
    dtype, on fixed parameters and tokens."""
    from moejax.model import transformer

    cfg = tiny_config("model.mtp_depth=1", f"precision.residual_dtype={residual}")
    params = moejax.init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (4, cfg.train.seq_len + 1), 0,
                                cfg.model.vocab_size)
    hidden = jax.eval_shape(lambda p: transformer._decoder(
        p, tokens[:, :-1], jnp.arange(cfg.train.seq_len), cfg, None)[0], params)
    loss = jax.jit(lambda p: moejax.loss_fn(p, {"tokens": tokens}, cfg)[0])(params)
    return hidden, float(loss)


def test_bfloat16_residual_stream_halves_the_activations_and_stays_close_to_float32():
    """precision.residual_dtype=bfloat16: the hidden stream between layers (what remat and a
    pipeline keep) is bfloat16, and the loss moves by bf16 rounding only."""
    hidden32, loss32 = _hidden_and_loss("float32")
    hidden16, loss16 = _hidden_and_loss("bfloat16")
    assert hidden32.dtype == jnp.float32 and hidden16.dtype == jnp.bfloat16
    assert loss16 != loss32 and abs(loss16 - loss32) <= 1e-2 * loss32
