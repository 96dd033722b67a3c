"""fp8 on the dropless dispatch: the grouped fp8 GEMM (moejax/model/dispatch/grouped_fp8.py)
against a per-expert reference built from fp8_matmul, under expert parallelism on 8 devices;
the default config's lowered train step with e4m3 (and e5m2) dots in every expert GEMM role;
the kernel chosen by backend (the GPU form lowered for CUDA); and the fp8 dispatch payload on
the dropless exchange (e4m3 out, compute dtype back, one device = the expert mesh)."""

import collections
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import max_relative_error, tiny_config
from jax.extend.core import jaxprs_in_params
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import moejax
from moejax import fp8
from moejax import params as params_lib
from moejax.config import MeshConfig
from moejax.model.dispatch import grouped, grouped_fp8
from moejax.model.moe import moe_ffn, moe_specs
from moejax.sharding import batch_sharding
from moejax.tools.hlo_stats import dots_with_scopes
from moejax.training.run import build_run

E4M3, E5M2 = "f8E4M3FN", "f8E5M2"
U_E4M3 = 2.0**-4

# ----------------------------------------------- grouped GEMM vs per-expert fp8_matmul, EP 8

SHARDS, EXPERTS = 8, 16  # two local experts per shard
K, N, BLOCK = 32, 40, 16  # N is not a multiple of the block: a partial weight block
# rows per expert: empty experts (a whole shard of them too), one row, exactly one 8-row tile,
# groups of several tiles and of several 16-row wgrad chunks, with partial tiles and chunks
COUNTS = (0, 5, 23, 0, 1, 16, 37, 2, 9, 0, 8, 17, 3, 30, 0, 0)
LOCAL = EXPERTS // SHARDS
ASSIGNMENTS = max(sum(COUNTS[s * LOCAL:(s + 1) * LOCAL]) for s in range(SHARDS))
GARBAGE = 3e4  # in the padding rows: were it to reach an amax, every scale would change


def exact_sum_values(rng, shape, magnitude):
    """Random signs, |value| in [1/16, 1] x magnitude: every fp8 code is then a large even
    integer and a dot of codes sums exactly in f32 in any order (tests/test_fp8.py), so the
    grouped kernels and the reference may accumulate in different orders and still agree."""
    return rng.uniform(1 / 16, 1, shape) * rng.choice([-1.0, 1.0], shape) * magnitude


def sorted_buffers(rng, tile, width):
    """Per shard: the local expert ids of its assignments ([A] sorted, E_ = no expert) and a
    [R, width] buffer with each expert's rows where grouped.tile_layout puts them, GARBAGE in
    the padding rows; plus each expert's rows [count, width] (one magnitude per expert)."""
    rows = grouped.padded_rows(ASSIGNMENTS, LOCAL, tile)
    ids, buffers, per_expert, positions = [], [], [], []
    for shard in range(SHARDS):
        counts = COUNTS[shard * LOCAL:(shard + 1) * LOCAL]
        shard_ids = np.full(ASSIGNMENTS, LOCAL, np.int32)
        shard_ids[:sum(counts)] = np.repeat(np.arange(LOCAL), counts)
        layout = grouped.tile_layout(jnp.asarray(shard_ids), LOCAL, tile, rows)
        placed = np.asarray(layout.row_of_assignment)
        buffer = np.full((rows, width), GARBAGE)
        start = 0
        for count in counts:
            values = exact_sum_values(rng, (count, width), 10.0 ** rng.uniform(-2, 2))
            buffer[placed[start:start + count]] = values
            per_expert.append(values)
            positions.append(shard * rows + placed[start:start + count])
            start += count
        ids.append(shard_ids)
        buffers.append(buffer)
    return (np.concatenate(ids), np.concatenate(buffers).astype(np.float32),
            per_expert, positions)


def front_aligned(per_expert, width):
    """[E, max count, width]: each expert's rows first, zero rows after (zeros change no amax,
    no 1 x B tile and no sum: fp8_matmul on them equals fp8_matmul on the rows alone)."""
    out = np.zeros((EXPERTS, max(COUNTS), width), np.float32)
    for e, values in enumerate(per_expert):
        out[e, :len(values)] = values
    return jnp.asarray(out)


@functools.cache
def grouped_case(recipe, kernel, tile):
    rng = np.random.default_rng(0)
    ids, x, x_rows, positions = sorted_buffers(rng, tile, K)
    _, g, g_rows, _ = sorted_buffers(rng, tile, N)
    w = np.stack([exact_sum_values(rng, (K, N), 10.0 ** rng.uniform(-1, 1))
                  for _ in range(EXPERTS)]).astype(np.float32)
    rows = x.shape[0] // SHARDS

    def local(x_, ids_, w_, g_):
        layout = grouped.tile_layout(ids_, LOCAL, tile, rows)
        groups = grouped_fp8.group_rows(layout, LOCAL)
        out, vjp = jax.vjp(lambda a, b: grouped_fp8.grouped_fp8_matmul(
            a, b, groups, recipe=recipe, kernel=kernel, block_size=BLOCK), x_, w_)
        return (out, *vjp(g_))

    mesh = jax.make_mesh((SHARDS,), ("expert",), axis_types=(jax.sharding.AxisType.Explicit,))
    with jax.set_mesh(mesh):
        args = [jax.device_put(jnp.asarray(a), P("expert")) for a in (x, ids, w, g)]
        sharded = jax.shard_map(local, mesh=mesh, in_specs=(P("expert"),) * 4,
                                out_specs=(P("expert"),) * 3)
        actual = [np.asarray(a) for a in jax.jit(sharded)(*args)]

    def reference(x_e, w_e, g_e):
        out, vjp = jax.vjp(lambda a, b: fp8.fp8_matmul(a, b, recipe=recipe, block_size=BLOCK),
                           x_e, w_e)
        return (out, *vjp(g_e))

    expected = jax.jit(jax.vmap(reference))(front_aligned(x_rows, K), jnp.asarray(w),
                                            front_aligned(g_rows, N))
    return actual, [np.asarray(a) for a in expected], positions


# XLA may fold the two per-tensor scales of fp8_matmul's reference into one constant
# (tests/test_fp8.py: assert_codes_product_times_one_scale): a few f32 ulps, far below the
# smallest change one fp8 code makes (2^-4 of a term).
SCALE_ULPS = 2.0**-21


@pytest.mark.parametrize("recipe,kernel,tile", [
    ("tensor", "tiles", 8), ("tensor", "ragged", 8), ("block", "tiles", 8),
    ("block", "ragged", 32)])  # tile 32 > block 16: a tile holds two wgrad row chunks
def test_grouped_fp8_gemm_equals_per_expert_fp8_matmul_on_8_shards(recipe, kernel, tile):
    (out, d_rows, d_w), (ref_out, ref_d_rows, ref_d_w), positions = grouped_case(
        recipe, kernel, tile)
    for e, rows in enumerate(positions):
        count = len(rows)
        np.testing.assert_allclose(out[rows], ref_out[e, :count], rtol=SCALE_ULPS, atol=0)
        np.testing.assert_allclose(d_rows[rows], ref_d_rows[e, :count], rtol=SCALE_ULPS, atol=0)
        np.testing.assert_allclose(d_w[e], ref_d_w[e], rtol=SCALE_ULPS, atol=0)
        if count == 0:  # an empty expert's weights get no gradient at all
            assert not np.any(d_w[e])
        else:
            assert np.any(d_w[e])
    padding = np.setdiff1d(np.arange(out.shape[0]), np.concatenate(positions))
    assert len(padding) > 0 and not np.any(out[padding]) and not np.any(d_rows[padding])


# --------------------------------------------- the train step's expert GEMMs, role by role

ROLES = [f"fp8_{gemm}_{role}" for gemm in ("gate", "up", "down")
         for role in ("fprop", "dgrad", "wgrad")]
EXPECTED_OPERANDS = {
    "tensor": {"fprop": (E4M3, E4M3), "dgrad": (E5M2, E4M3), "wgrad": (E4M3, E5M2)},
    "block": {"fprop": (E4M3, E4M3), "dgrad": (E4M3, E4M3), "wgrad": (E4M3, E4M3)},
}


def expert_dots_by_role(cfg):
    """{role: Counter of (lhs, rhs) element types} over the lowered train step's dots."""
    text = build_run(cfg, abstract=True).lower().as_text(debug_info=True)
    by_role = collections.defaultdict(collections.Counter)
    for dot in dots_with_scopes(text):
        roles = {r for r in ROLES for scope in dot["scopes"] if r in scope}
        assert len(roles) <= 1, roles
        for role in roles:
            by_role[role][(dot["lhs"], dot["rhs"])] += 1
    return by_role


@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_default_config_train_step_runs_every_expert_gemm_in_fp8(recipe):
    """The tiny preset as shipped (dropless, 8 experts on expert=8) with precision.fp8: each of
    the 9 expert GEMM roles (gate, up, down x fprop, dgrad, wgrad) has its dots, and all of
    them take the recipe's fp8 operands (e4m3 forward; tensor: e5m2 gradients)."""
    cfg = moejax.load_config("tiny", [f"precision.fp8={recipe}"], num_devices=8)
    assert cfg.moe.dispatch == "dropless"
    by_role = expert_dots_by_role(cfg)
    assert sorted(by_role) == sorted(ROLES)
    for role, operands in by_role.items():
        expected = EXPECTED_OPERANDS[recipe][role.rsplit("_", 1)[1]]
        assert set(operands) == {expected}, (role, operands)


# ----------------------------------------------------------------- kernel choice, GPU form


def layer_config(*overrides):
    return tiny_config("moe.router=deepseek", "moe.num_groups=4", "moe.topk_groups=2",
                       "moe.num_shared_experts=1", *overrides)


@functools.cache
def layer_inputs():
    cfg = layer_config()
    params = params_lib.init(moe_specs(cfg), jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (8, 16, cfg.model.d_model))
    return params, x, 0.1 * jax.random.normal(jax.random.key(2), (cfg.moe.num_experts,))


def primitives_with_fp8_operands(jaxpr) -> collections.Counter:
    """Counter of the primitive names whose operands are all fp8, in a jaxpr and its
    sub-jaxprs."""
    found, stack = collections.Counter(), [jaxpr]
    while stack:
        current = stack.pop()
        for eqn in current.eqns:
            dtypes = [getattr(v.aval, "dtype", None) for v in eqn.invars[:2]]
            if len(dtypes) == 2 and all(d is not None and jnp.issubdtype(d, jnp.floating)
                                        and jnp.finfo(d).bits == 8 for d in dtypes):
                found[eqn.primitive.name] += 1
            stack += list(jaxprs_in_params(eqn.params))
    return found


@pytest.mark.parametrize("backend,expected", [("cpu", "dot_general"),
                                              ("gpu", "ragged_dot_general")])
def test_auto_kernel_is_the_tiles_on_cpu_and_ragged_dot_elsewhere(monkeypatch, backend,
                                                                  expected):
    """moe.kernels=auto picks the tiled fp8 GEMM on CPU and ragged_dot on fp8 codes on
    another backend (GPU), forward and backward."""
    params, x, bias = layer_inputs()
    cfg = layer_config("precision.fp8=tensor", "precision.fp8_layers=experts")
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    grad = jax.grad(lambda p, x: jnp.sum(moe_ffn(p, x, bias, 1.0, cfg)[0] ** 2), argnums=(0, 1))
    found = primitives_with_fp8_operands(jax.make_jaxpr(grad)(params, x).jaxpr)
    other = {"dot_general", "ragged_dot_general"} - {expected}
    assert found[expected] >= 9 and not any(found[name] for name in other), found


@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_ragged_form_lowers_for_cuda_to_fp8_ragged_dots(recipe):
    """The GPU form, lowered for CUDA on this CPU (jax.export): XLA:GPU receives
    `chlo.ragged_dot` grouped GEMMs on the fp8 codes, forward and dgrad, and for `tensor` the
    wgrad too (ragged contracting dimension); block's wgrad is its row-chunk loop of dots."""
    rows, local, tile = 64, 2, 8
    ids = jnp.repeat(jnp.arange(local, dtype=jnp.int32), jnp.array([20, 30]),
                     total_repeat_length=50)

    def forward_and_backward(x, w, g):
        layout = grouped.tile_layout(ids, local, tile, rows)
        groups = grouped_fp8.group_rows(layout, local)
        out, vjp = jax.vjp(lambda a, b: grouped_fp8.grouped_fp8_matmul(
            a, b, groups, recipe=recipe, kernel="ragged", name="gate"), x, w)
        return (out, *vjp(g))

    shapes = (jax.ShapeDtypeStruct((rows, 256), jnp.bfloat16),
              jax.ShapeDtypeStruct((local, 256, 128), jnp.bfloat16),
              jax.ShapeDtypeStruct((rows, 128), jnp.bfloat16))
    exported = jax.export.export(jax.jit(forward_and_backward), platforms=("cuda",))(*shapes)
    text = exported.mlir_module()
    ragged = re.findall(r'"chlo\.ragged_dot".*?: \(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>',
                        text)
    expected = ({(E4M3, E4M3), (E5M2, E4M3), (E4M3, E5M2)} if recipe == "tensor"
                else {(E4M3, E4M3)})
    assert set(ragged) == expected
    if recipe == "block":  # one ragged_dot per 128-wide K chunk (a scan): fprop and dgrad
        assert len(ragged) == 2


# ------------------------------------------------------------ fp8 dispatch on the exchange


def layer_loss_and_grads(cfg, params, x, bias, mesh=None):
    def loss(p, x):
        return jnp.sum(jnp.square(moe_ffn(p, x, bias, 1.0, cfg)[0]))

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    if mesh is None:
        return fn(params, x), None
    with jax.set_mesh(mesh):
        params = jax.device_put(params, params_lib.shardings(moe_specs(cfg), mesh))
        x = jax.device_put(x, batch_sharding(mesh))
        bias = jax.device_put(bias, NamedSharding(mesh, P()))
        return fn(params, x), fn.lower(params, x).as_text()


@functools.cache
def dispatch_case(fp8_dispatch: bool):
    # block 16 cuts each D = 32 row into two 1 x 16 slices, each with its own scale
    overrides = ("precision.fp8=tensor", "precision.fp8_block_size=16",
                 f"precision.fp8_dispatch={str(fp8_dispatch).lower()}")
    params, x, bias = layer_inputs()
    cfg = layer_config(*overrides)
    one_device, _ = layer_loss_and_grads(cfg, params, x, bias)
    if not fp8_dispatch:
        return one_device, None, None
    mesh_cfg = cfg.replace(mesh=MeshConfig(1, 1, 8))
    on_mesh, text = layer_loss_and_grads(mesh_cfg, params, x, bias,
                                         moejax.make_mesh(mesh_cfg.mesh))
    return one_device, on_mesh, text


def test_fp8_dispatch_on_expert_mesh_equals_one_device():
    """fp8 experts (tensor: one scale per expert) with the fp8 dispatch payload: on the
    (expert=8) mesh the layer's loss and gradients are one device's (the token rows get the
    same per-slice rounding there, and each expert sees the same rows), while the payload's
    rounding does move the result."""
    (loss, grads), (mesh_loss, mesh_grads), _ = dispatch_case(True)
    (plain_loss, _), _, _ = dispatch_case(False)
    assert abs(float(mesh_loss) - float(loss)) <= 1e-6 * abs(float(loss))
    assert max_relative_error(mesh_grads, grads) <= 1e-5
    assert 0 < abs(float(loss) / float(plain_loss) - 1) <= 2 * U_E4M3


def test_fp8_dispatch_sends_e4m3_slices_out_and_the_compute_dtype_back():
    """The layer's all_to_alls (StableHLO): token rows go out as e4m3 codes [.., D / B, B] with
    float32 scales [.., D / B, 1] beside them; the results come back in the compute dtype
    (float32 here); the (id, weight) metadata stays float32."""
    _, _, text = dispatch_case(True)
    cfg = layer_config()
    width, block = cfg.model.d_model, 16
    payloads = re.findall(r"all_to_all.*?\(tensor<([\dx]+)x(\w+)>\)", text)
    # Exchange sends [P, P N_ / P, ...]: keep the per-row dimensions
    shapes = collections.Counter(("x".join(shape.split("x")[2:]), dtype)
                                 for shape, dtype in payloads)
    out_codes = (f"{width // block}x{block}", E4M3)
    out_scales = (f"{width // block}x1", "f32")
    # full rows in float32: the results back, and the transposes of both ways (the backward)
    full_rows = (f"{width}", "f32")
    assert shapes[out_codes] == 1 and shapes[out_scales] == 1 and shapes[full_rows] == 3
    assert sum(count for (_, dtype), count in shapes.items() if dtype == E4M3) == 1


def test_fp8_dispatch_on_the_ragged_exchange():
    """The GPU exchange (moe.kernels=ragged: ragged_all_to_all, which XLA:CPU cannot run, so the
    program is only lowered) carries the fp8 payload the same way, and its backward transposes
    the ragged exchange in float32: codes out once, everything else float32."""
    cfg = layer_config("moe.kernels=ragged", "precision.fp8=tensor", "precision.fp8_dispatch=true",
                       "precision.fp8_block_size=16").replace(mesh=MeshConfig(2, 1, 4))
    mesh = moejax.make_mesh(cfg.mesh)
    params, x, bias = layer_inputs()
    with jax.set_mesh(mesh):
        params = jax.device_put(params, params_lib.shardings(moe_specs(cfg), mesh))
        x = jax.device_put(x, batch_sharding(mesh))
        grad = jax.grad(lambda p, x: jnp.sum(moe_ffn(p, x, bias, 1.0, cfg)[0] ** 2),
                        argnums=(0, 1))
        text = jax.jit(grad).lower(params, x).as_text()
    payloads = collections.Counter(re.findall(r"ragged_all_to_all.*?\(tensor<\d+x([\dx]+)x(\w+)>",
                                              text))
    width = cfg.model.d_model
    assert payloads[(f"{width // 16}x16", E4M3)] == 1 and payloads[(f"{width // 16}x1", "f32")] == 1
    assert payloads[(f"{width}", "f32")] == 3  # back, and the transposes of out and back
    assert sum(n for (_, dtype), n in payloads.items() if dtype == E4M3) == 1
