"""moejax's CPU kernels (moejax/model/cpu_kernels.py): the SwiGLU of grouped experts and dense
layers (cpu_swiglu.py) against per-group references, values and gradients, across its row and
column chunks; the dense matmul (cpu_matmul.py) against XLA's dot; the dropless layer's default
on CPU; the clear refusals where a kernel cannot run;
and the library's build (no compiler, concurrent cold builds, a compiler without -march=native).
The attention kernel's tests are in test_attention_blockwise.py."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import max_relative_error, tiny_config

from moejax import params as P
from moejax.config import ConfigError
from moejax.model import cpu_combine, cpu_kernels, cpu_matmul, cpu_route, cpu_swiglu, layers
from moejax.model.dispatch import grouped
from moejax.model.dispatch.dropless import grouped_kernel, kernel_description
from moejax.model.layers import FFN, Matmul
from moejax.model.moe import moe_ffn, moe_specs
from moejax.sharding import BATCH_AXES

# an empty group, a group of 700 rows (two row chunks: 200 hidden units give chunks of at most
# 655 rows), 2 padding rows past the groups; 200 hidden units (two column chunks of at most
# 128: 4 groups are too few to share whole among the threads)
SIZES = np.array([5, 0, 700, 4], np.int32)
# 12 groups (one empty): each group's hidden units whole in one piece of the weight gradients'
# work where the threads are at most 3 (WeightGradientColumns in csrc/grouped_swiglu.cc)
MANY_SIZES = np.array([20, 31, 0, 25, 18, 30, 22, 27, 19, 33, 26, 40], np.int32)
ROWS, D, F, N = 711, 8, 200, 6


def _weights(groups, key=0):
    keys = jax.random.split(jax.random.key(key), 3)
    return FFN(0.3 * jax.random.normal(keys[0], (groups, D, F)),
               0.3 * jax.random.normal(keys[1], (groups, D, F)),
               0.1 * jax.random.normal(keys[2], (groups, F, N)))


def _matrices(w: FFN):
    return w.w_gate, w.w_up, w.w_down


def _per_group_reference(x, w, sizes=SIZES):
    """Each group's SwiGLU by jnp (autodiff for its gradients); padding rows zero."""
    stops = np.cumsum(sizes)
    outputs = [layers._swiglu(FFN(w.w_gate[g], w.w_up[g], w.w_down[g]), x[stop - size:stop])
               for g, (size, stop) in enumerate(zip(sizes, stops))]
    return jnp.concatenate([*outputs, jnp.zeros((x.shape[0] - stops[-1], N))])


def _loss_and_grads(swiglu, x, w, cotangent):
    return jax.jit(jax.value_and_grad(lambda x_, w_: jnp.sum(swiglu(x_, w_) * cotangent),
                                      argnums=(0, 1)))(x, w)


@pytest.mark.parametrize("sizes", [SIZES, MANY_SIZES], ids=["4 groups", "12 groups"])
def test_grouped_swiglu_and_its_gradients_per_group(sizes):
    rows = int(sizes.sum()) + 2
    keys = jax.random.split(jax.random.key(1), 2)
    x = jax.random.normal(keys[0], (rows, D))
    cotangent = jax.random.normal(keys[1], (rows, N))
    w = _weights(len(sizes))
    out = jax.jit(cpu_swiglu.grouped_swiglu)(x, *_matrices(w), sizes)
    assert not np.asarray(out[sizes.sum():]).any()  # padding rows are written, as zeros
    (loss, grads) = _loss_and_grads(
        lambda x_, w_: cpu_swiglu.grouped_swiglu(x_, *_matrices(w_), jnp.asarray(sizes)),
        x, w, cotangent)
    (expected_loss, expected) = _loss_and_grads(
        lambda x_, w_: _per_group_reference(x_, w_, sizes), x, w, cotangent)
    assert abs(float(loss - expected_loss)) <= 1e-5 * abs(float(expected_loss))
    assert max_relative_error(grads, expected) <= 1e-5
    empty = int(np.flatnonzero(sizes == 0)[0])
    assert not np.asarray(grads[1].w_gate[empty]).any()  # an empty group's weight gradients: 0
    assert not np.asarray(grads[0][sizes.sum():]).any()


@pytest.mark.parametrize("batched", [False, True])
def test_dense_swiglu_equals_xla(batched):
    """layers.swiglu's CPU path (one group of every row; or E groups of the batched experts'
    [E, S, D]) against XLA's GEMMs with the hand-written backward."""
    keys = jax.random.split(jax.random.key(2), 2)
    w = _weights(3) if batched else FFN(*(a[0] for a in _matrices(_weights(1))))
    shape = (3, 40, D) if batched else (2, 150, D)
    x = jax.random.normal(keys[0], shape)
    cotangent = jax.random.normal(keys[1], (*shape[:-1], N))
    assert cpu_kernels.runs(jnp.float32) and not cpu_kernels.runs(jnp.bfloat16)
    assert not cpu_kernels.runs(jnp.float32, backend="gpu")
    (loss, grads) = _loss_and_grads(lambda x_, w_: cpu_swiglu.dense_swiglu(x_, *_matrices(w_)),
                                    x, w, cotangent)
    (expected_loss, expected) = _loss_and_grads(lambda x_, w_: layers._swiglu(w_, x_), x, w,
                                                cotangent)
    assert abs(float(loss - expected_loss)) <= 1e-5 * abs(float(expected_loss))
    assert max_relative_error(grads, expected) <= 1e-5


def test_matmul_and_its_gradients_equal_xlas_dot():
    """x [2, 300, 70] (600 rows: row chunks of 256 with a partial last one) @ w [70, 150]
    (d_w tiles of 64 x 128 with partial ones at both edges), values and both gradients."""
    keys = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(keys[0], (2, 300, 70))
    w = 0.2 * jax.random.normal(keys[1], (70, 150))
    cotangent = jax.random.normal(keys[2], (2, 300, 150))

    def loss_and_grads(matmul):
        return jax.jit(jax.value_and_grad(
            lambda x_, w_: jnp.sum(matmul(x_, w_) * cotangent), argnums=(0, 1)))(x, w)

    loss, grads = loss_and_grads(cpu_matmul.matmul)
    expected_loss, expected = loss_and_grads(jnp.matmul)
    assert abs(float(loss - expected_loss)) <= 1e-5 * abs(float(expected_loss))
    assert max_relative_error(grads, expected) <= 1e-5
    # an empty contraction (K = 0) is all zeros, every row written
    empty = jax.jit(cpu_matmul.matmul)(jnp.ones((3, 0)), jnp.ones((0, 5)))
    assert empty.shape == (3, 5) and not np.asarray(empty).any()


def test_attention_projections_take_the_matmul_kernel_on_cpu_in_float32():
    """layers.Matmul's 2-D products are the kernel's on CPU in float32 (one forward call, one
    backward call each), XLA's dot in bfloat16."""
    x, w = jnp.ones((4, 16, 32)), jnp.ones((32, 24))

    def text(dtype):
        matmul = Matmul(jnp.dtype(dtype))
        return jax.jit(jax.value_and_grad(lambda x_, w_: jnp.sum(matmul(x_, w_)),
                                          argnums=(0, 1))).lower(
            x, w).as_text()

    f32 = text(jnp.float32)
    assert f32.count(cpu_matmul.FORWARD_TARGET + "(") == 1
    assert f32.count(cpu_matmul.BACKWARD_TARGET + "(") == 1
    assert cpu_matmul.FORWARD_TARGET not in text(jnp.bfloat16)


def test_router_logits_take_the_matmul_kernel_in_float32():
    """The router's [tokens, D] x [D, E] product (float32 whatever the compute dtype; its cost
    grows with E) is the kernel's on CPU: one forward and one backward call, and the logits and
    both gradients equal XLA's einsum."""
    from moejax.config import MoEConfig
    from moejax.model import router

    keys = jax.random.split(jax.random.key(5), 2)
    x = jax.random.normal(keys[0], (2, 40, 24), jnp.bfloat16)
    w = 0.3 * jax.random.normal(keys[1], (24, 128))
    cfg = MoEConfig(num_experts=128, top_k=8)

    def logits_and_grads(x_, w_):
        def loss(xx, ww):
            return jnp.sum(jnp.sin(router.route(xx, ww, jnp.zeros(128), 1.0, cfg).logits))
        return jax.value_and_grad(loss, argnums=(0, 1))(x_, w_)

    step = jax.jit(logits_and_grads)
    text = step.lower(x, w).as_text()
    assert text.count(cpu_matmul.FORWARD_TARGET + "(") == 1
    assert text.count(cpu_matmul.BACKWARD_TARGET + "(") == 1
    loss, grads = step(x, w)
    with cpu_kernels.off("XLA's einsum, for reference"):
        reference = jax.jit(lambda x_, w_: logits_and_grads(x_, w_))  # traced afresh
        assert cpu_matmul.FORWARD_TARGET not in reference.lower(x, w).as_text()
        expected_loss, expected = reference(x, w)
    assert abs(float(loss - expected_loss)) <= 1e-5 * abs(float(expected_loss))
    assert max_relative_error(grads[1], expected[1]) <= 1e-5
    assert max_relative_error(grads[0].astype(jnp.float32),
                              expected[0].astype(jnp.float32)) <= 1e-2  # bfloat16 x


@pytest.mark.parametrize("experts,k,groups,topk_groups", [
    (8, 2, 1, 1), (128, 8, 1, 1), (256, 8, 8, 4), (16, 3, 4, 2)])
def test_expert_choice_is_top_ks_exactly(experts, k, groups, topk_groups):
    """The CPU expert choice against XLA's top_k (and, with groups, router.group_mask first) on
    scores full of ties (small integers), signed zeros, infinities and a NaN, and on normal
    scores: the same ids in the same order for every token."""
    from moejax.config import MoEConfig
    from moejax.model import router

    rng = np.random.default_rng(experts + k)
    scores = rng.integers(-4, 5, size=(3, 200, experts)).astype(np.float32)
    scores[0, :5], scores[0, 5:10] = -0.0, 0.0
    scores[0, 10, :3], scores[0, 11, 4:9], scores[2, 7, 2] = np.inf, -np.inf, np.nan
    scores[1] = rng.normal(size=(200, experts))
    cfg = MoEConfig(num_experts=experts, top_k=k, num_groups=groups, topk_groups=topk_groups)

    def choose(s):
        return router.top_expert_ids(s, cfg, group_limited=True)

    got = jax.jit(choose).lower(scores).as_text()
    assert got.count(cpu_route.TARGET) == 1
    with cpu_kernels.off("XLA's top_k, for reference"):
        reference = jax.jit(lambda s: choose(s))  # a function of its own: traced afresh
        assert cpu_route.TARGET not in reference.lower(scores).as_text()
        expected = np.asarray(reference(scores))
    np.testing.assert_array_equal(np.asarray(jax.jit(choose)(scores)), expected)


def test_combine_backward_kernel_equals_xlas_ops():
    """The dropless combine's gradients (w.r.t. the sorted buffer's results and the routing
    weights) through the CPU kernel against XLA's gather, multiply and row sum: padding rows
    (no token) get zero gradients, every assignment its own weight's."""
    tokens, k, width = 37, 3, 20
    keys = jax.random.split(jax.random.key(5), 4)
    experts = jax.random.randint(keys[0], (tokens * k,), 0, 4)
    layout = grouped.tile_layout(experts, 4, tile=8, num_rows=grouped.padded_rows(
        tokens * k, 4, 8))
    rows = layout.assignment_of_row.shape[0]
    assert int(jnp.sum(layout.assignment_of_row == tokens * k)) > 0  # padding rows present
    computed = jax.random.normal(keys[1], (rows, width))
    weights = jax.random.uniform(keys[2], (tokens, k))
    cotangent = jax.random.normal(keys[3], (tokens, width))

    def loss(c, w):
        y = grouped.combine_rows(c, layout.row_of_assignment.reshape(tokens, k),
                                 layout.assignment_of_row, w)
        return jnp.sum(y * cotangent)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))
    assert cpu_combine.BACKWARD_TARGET in grads.lower(computed, weights).as_text()
    with cpu_kernels.off("XLA's ops, for reference"):
        reference = jax.jit(jax.grad(lambda c, w: loss(c, w), argnums=(0, 1)))
        assert cpu_combine.BACKWARD_TARGET not in reference.lower(computed, weights).as_text()
        expected = reference(computed, weights)
    got = grads(computed, weights)
    np.testing.assert_array_equal(got[0], expected[0])  # the same product per element
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-5, atol=1e-6)  # sums reordered
    padding = np.asarray(layout.assignment_of_row) == tokens * k
    assert not np.any(np.asarray(got[0])[padding])


def test_dense_swiglu_and_attention_kernels_only_on_whole_arrays_or_one_shard():
    """Under GSPMD on a mesh XLA would gather a custom call's operands and run it whole on every
    device: there the dense SwiGLU and auto attention take XLA's own ops; with no mesh, on a
    one-device mesh and inside a shard_map, the kernels."""
    import moejax
    from moejax.config import MeshConfig
    from moejax.model import attention

    model = tiny_config().model
    x = jax.random.normal(jax.random.key(0), (8, 16, D))
    w = FFN(*(0.3 * jax.random.normal(jax.random.key(i), shape)
              for i, shape in enumerate(((D, F), (D, F), (F, D)))))

    def lowered_swiglu():  # a function of its own each time: traced afresh
        return jax.jit(lambda x_, w_: layers.swiglu(w_, x_, Matmul(jnp.float32))).lower(
            x, w).as_text()

    def kernels_chosen():
        return (cpu_swiglu.FORWARD_TARGET in lowered_swiglu(),
                attention.attention_kernel(model, 128, jnp.float32) == "blas")

    assert kernels_chosen() == (True, True)  # no mesh
    with jax.set_mesh(moejax.make_mesh(MeshConfig(1, 1, 1))):
        assert kernels_chosen() == (True, True)
    mesh = moejax.make_mesh(MeshConfig(1, 1, 8))
    with jax.set_mesh(mesh):
        assert kernels_chosen() == (False, False)
        spec = jax.sharding.PartitionSpec(BATCH_AXES)
        inside = jax.shard_map(lambda x_: layers.swiglu(w, x_, Matmul(jnp.float32)), mesh=mesh,
                               in_specs=spec, out_specs=spec)
        assert cpu_swiglu.FORWARD_TARGET in jax.jit(inside).lower(x).as_text()


def test_the_backwards_scratch_is_xla_memory():
    """The backward's three [R, F] buffers (the activation's gradients and the hidden) are
    results XLA allocates, so its memory analysis (what bench_moe and the planner report)
    counts them; the kernel keeps no scratch of its own that grows with the rows."""
    x = jnp.ones((ROWS, D))
    w = _weights(len(SIZES))
    step = jax.jit(jax.grad(lambda x_, w_: jnp.sum(
        cpu_swiglu.grouped_swiglu(x_, *_matrices(w_), jnp.asarray(SIZES))), argnums=(0, 1)))
    memory = step.lower(x, w).compile().memory_analysis()
    scratch = 3 * ROWS * F * 4
    assert memory.temp_size_in_bytes + memory.output_size_in_bytes >= scratch


def test_grouped_swiglu_refuses_other_dtypes_in_one_line():
    x = jnp.ones((ROWS, D), jnp.bfloat16)
    with pytest.raises(TypeError, match="float32, not bfloat16.*moe.kernels=tiles"):
        cpu_swiglu.grouped_swiglu(x, *_matrices(_weights(len(SIZES))), jnp.asarray(SIZES))


def test_blas_swiglu_and_its_gradients_equal_the_tiles_kernel():
    """The same assignments through the unpadded BLAS groups and through tiles of 4 rows."""
    experts_count, width, hidden, assignments = 5, 16, 8, 60
    keys = jax.random.split(jax.random.key(0), 5)
    ids = jax.random.randint(keys[0], (assignments,), 0, experts_count + 1)  # 5: not local
    rows = jax.random.normal(keys[1], (assignments, width))
    experts = FFN(*(0.3 * jax.random.normal(k, s) for k, s in zip(
        keys[2:], [(experts_count, width, hidden)] * 2 + [(experts_count, hidden, width)])))

    def through(tile):
        layout = grouped.tile_layout(ids, experts_count, tile,
                                     grouped.padded_rows(assignments, experts_count, tile))
        sorted_rows = jnp.concatenate([rows, jnp.zeros((1, width))])[
            jnp.minimum(layout.assignment_of_row, assignments)]

        def loss(sorted_rows_, experts_):
            if tile == 1:
                y = grouped.blas_swiglu(sorted_rows_, experts_, layout.group_rows)
            else:
                y = grouped.tiled_swiglu(sorted_rows_, experts_, layout.tile_expert,
                                         layout.used_tiles, tile)
            per_assignment = jnp.concatenate([y, jnp.zeros((1, width))])[
                layout.row_of_assignment]
            return jnp.sum(jnp.sin(per_assignment)), per_assignment

        (value, per_assignment), grads = jax.value_and_grad(loss, has_aux=True)(
            sorted_rows, experts)
        return value, per_assignment, grads[1]

    blas, tiles = through(1), through(4)
    np.testing.assert_allclose(blas[1], tiles[1], rtol=1e-5, atol=1e-5)
    assert abs(float(blas[0]) - float(tiles[0])) <= 1e-5 * abs(float(tiles[0]))
    assert max_relative_error(blas[2], tiles[2]) <= 1e-5


def test_auto_is_blas_on_cpu_for_float32_and_tiles_otherwise():
    """What users get by default on CPU: the BLAS kernel for float32 compute, which the
    compiled layer calls (and whose sorted buffer has no padding rows); tiles for bfloat16."""
    assert cpu_kernels.unavailable_reason() is None
    cfg = tiny_config()
    assert cfg.moe.kernels == "auto" and cfg.precision.compute_dtype == "float32"
    assert grouped_kernel(cfg.moe, fp8=False, dtype=jnp.float32) == "blas"
    assert grouped_kernel(cfg.moe, fp8=False, dtype=jnp.bfloat16) == "tiles"
    assert grouped_kernel(cfg.moe, fp8=True, dtype=jnp.float32) == "tiles"
    assert kernel_description(cfg.moe, Matmul(jnp.float32)) == "moe.kernels=auto -> blas"
    params = P.init(moe_specs(cfg), jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (2, 16, cfg.model.d_model))
    bias = jnp.zeros(cfg.moe.num_experts)

    def loss(p, x_):
        y, stats = moe_ffn(p, x_, bias, 1.0, cfg)
        return jnp.sum(jnp.square(y)), stats

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True)).lower(params, x).as_text()
    calls = re.findall(r'custom_call @(moejax_[a-z_]+)\(', hlo)
    # the routed experts and the shared expert: one SwiGLU call each way; the router: the
    # logits' matmul, the expert choice and the chosen logits' backward (no dense backward:
    # the loss has no router loss); the combine's backward
    assert sorted(calls) == sorted([cpu_swiglu.FORWARD_TARGET, cpu_swiglu.BACKWARD_TARGET] * 2
                                   + [cpu_matmul.FORWARD_TARGET, cpu_route.TARGET,
                                      cpu_route.CHOSEN_BACKWARD_TARGET,
                                      cpu_combine.BACKWARD_TARGET])
    _, stats = jax.jit(loss)(params, x)
    assert float(stats["padding_overhead"]) == 0.0


def test_explicit_blas_off_cpu_is_refused_in_one_line():
    cfg = tiny_config("moe.kernels=blas")
    assert grouped_kernel(cfg.moe, fp8=False, backend="cpu") == "blas"
    assert grouped_kernel(tiny_config().moe, fp8=False, backend="gpu") == "ragged"
    with pytest.raises(ValueError, match="moe.kernels=blas runs on CPU only .this is gpu.: use"):
        grouped_kernel(cfg.moe, fp8=False, backend="gpu")


def test_explicit_blas_with_bfloat16_compute_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="moe.kernels=blas runs float32 GEMMs only"):
        tiny_config("moe.kernels=blas", "precision.compute_dtype=bfloat16")


def test_without_a_compiler_auto_falls_back_to_tiles_and_blas_says_why(tmp_path):
    """A fresh process with no C++ compiler and an empty cache: auto keeps the tiles kernel
    and XLA's attention; the BLAS GEMM and attention themselves stop with one line naming the
    reason and the fix."""
    program = """
import jax.numpy as jnp
from moejax.config import ModelConfig, MoEConfig
from moejax.model import attention, cpu_attention
from moejax.model import cpu_swiglu
from moejax.model.dispatch.dropless import grouped_kernel, kernel_description
from moejax.model.layers import Matmul
print(grouped_kernel(MoEConfig(num_experts=4), fp8=False))
print(kernel_description(MoEConfig(num_experts=4), Matmul(jnp.float32)))
print(attention.kernel_description(ModelConfig(), 128, jnp.float32))
for explicit in (lambda: cpu_swiglu.grouped_swiglu(jnp.ones((2, 3)), jnp.ones((1, 3, 2)),
                                                  jnp.ones((1, 3, 2)), jnp.ones((1, 2, 3)),
                                                  jnp.array([2])),
                 lambda: cpu_attention.causal_attention(jnp.ones((1, 2, 1, 1, 4)),
                                                        jnp.ones((1, 2, 1, 4)),
                                                        jnp.ones((1, 2, 1, 4)), 0.5)):
    try:
        explicit()
    except RuntimeError as error:
        print(error)
"""
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"),
           "MOEJAX_CACHE_DIR": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", program], check=False, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    kernel, announced, attention_line, message, attention_message = (
        done.stdout.strip().splitlines())
    assert kernel == "tiles"
    # what moejax.train's start-up lines say: attention at T = 128 keeps the materialised path
    assert announced.startswith("moe.kernels=auto -> tiles (blas unavailable: no C++ compiler")
    assert attention_line.startswith(
        "model.attention_kernel=auto -> plain (blas unavailable: no C++ compiler")
    assert message.startswith("moe.kernels=blas cannot run: no C++ compiler found")
    assert message.endswith("or set moe.kernels=tiles")
    assert attention_message.startswith("model.attention_kernel=blas cannot run: no C++ compiler")
    assert attention_message.endswith("or set model.attention_kernel=blockwise or plain")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_a_fresh_cache_builds_the_library_once_and_reuses_it(tmp_path):
    """Two processes at once on an empty cache (as xdist workers or a pod's hosts start) both
    get a working library; a third process loads the one built, without compiling."""
    program = """
import jax.numpy as jnp
import numpy as np
from moejax.model import cpu_kernels, cpu_swiglu
ones = np.ones
out = cpu_swiglu.grouped_swiglu(ones((4, 3), np.float32), ones((2, 3, 2), np.float32),
                                ones((2, 3, 2), np.float32), ones((2, 2, 3), np.float32),
                                jnp.array([1, 3]))
hidden = 3 / (1 + np.exp(-3)) * 3  # silu(1 + 1 + 1) * (1 + 1 + 1)
print(cpu_kernels.unavailable_reason(), np.allclose(out, 2 * hidden, rtol=1e-5))
"""
    env = {**os.environ, "MOEJAX_CACHE_DIR": str(tmp_path), "JAX_PLATFORMS": "cpu"}

    def start():
        return subprocess.Popen([sys.executable, "-c", program], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    for process in [start(), start()]:
        stdout, stderr = process.communicate(timeout=180)
        assert process.returncode == 0, stderr
        assert stdout.split() == ["None", "True"]
    (library,) = tmp_path.glob("moejax_cpu_kernels-*.so")  # one file, no leftover partials
    assert not [p for p in tmp_path.iterdir() if p != library]
    built = library.stat().st_mtime_ns
    stdout, _ = start().communicate(timeout=180)
    assert stdout.split() == ["None", "True"] and library.stat().st_mtime_ns == built


def test_a_compiler_without_march_native_builds_the_baseline(tmp_path):
    """The library is built for this CPU (-march=native, its key holding the CPU's flags);
    a compiler that refuses the flag gets the baseline build instead of no kernels."""
    compiler = tmp_path / "picky-c++"
    compiler.write_text('#!/bin/sh\ncase " $* " in *" -march=native "*) echo "unknown option '
                        '-march=native" >&2; exit 1;; esac\nexec c++ "$@"\n')
    compiler.chmod(0o755)
    program = """
from moejax.model import cpu_kernels
print(cpu_kernels.unavailable_reason())
print(cpu_kernels._build_inputs(native=False)[1])
"""
    env = {**os.environ, "CXX": str(compiler), "MOEJAX_CACHE_DIR": str(tmp_path / "cache"),
           "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", program], check=False, env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    reason, baseline_key = done.stdout.split()
    assert reason == "None"
    built = [p.name for p in (tmp_path / "cache").iterdir()]
    assert built == [f"{cpu_kernels.LIBRARY_PREFIX}-{baseline_key}.so"]
    assert cpu_kernels._build_inputs(native=True)[1] != baseline_key
