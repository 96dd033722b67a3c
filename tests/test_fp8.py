"""Tests for moejax.fp8: exact emulation on CPU, derived error bounds, HLO dtypes.

Error bounds (derivation in the moejax.fp8 docstring):
  u4 = 2^-4 (e4m3), u5 = 2^-3 (e5m2); RMS per-element relative error 0.425*u.
  GEMM on N(0,1) data: expected sqrt(2)*0.425*u4 = 0.0376, bound sqrt(2)*u4 = 0.088.
  Gradients of 0.5*sum(y^2): tensor sqrt(3*u4^2 + u5^2) = 0.165, block 2*u4 = 0.125.
"""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

from moejax import fp8
from moejax.fp8 import fp8_matmul

U_E4M3 = 2.0**-4
U_E5M2 = 2.0**-3
RMS_TO_MAX_ROUNDOFF = 0.425  # RMS(d) / u for round-to-nearest, log-uniform mantissa
EXPECTED_GEMM_ERROR = math.sqrt(2) * RMS_TO_MAX_ROUNDOFF * U_E4M3
GEMM_ERROR_BOUND = math.sqrt(2) * U_E4M3
GRAD_ERROR_BOUND = {
    "tensor": math.sqrt(3 * U_E4M3**2 + U_E5M2**2),
    "block": 2 * U_E4M3,
}
BLOCK = 128

# (x shape, w shape): 2-D and grouped w, K a multiple of 128 and not (padding).
SHAPE_CASES = {
    "2d": ((6, 8, 256), (256, 128)),
    "2d_padded": ((16, 200), (200, 72)),
    "3d": ((3, 16, 256), (3, 256, 128)),
    "3d_padded": ((2, 4, 5, 200), (2, 200, 72)),
}


def relative_error(approx, exact):
    approx, exact = np.asarray(approx, np.float64), np.asarray(exact, np.float64)
    return float(np.linalg.norm(approx - exact) / np.linalg.norm(exact))


def gaussian_operands(x_shape, w_shape, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal(x_shape), jnp.float32),
            jnp.asarray(rng.standard_normal(w_shape), jnp.float32))


def exact_sum_operand(rng, shape, spread_rows=False):
    """Random signs, |value| uniform in [1/16, 1], times 10^U(-2, 2) per row if spread.

    Every value is within 16x of its tile's (or tensor's) amax, so each e4m3 code is
    an even number in [28, 448] and each e5m2 code a multiple of 512 in [3584, 57344].
    Code products of one dot then sum exactly in f32 in any order, which makes the
    comparison independent of XLA:CPU's dot kernel: its f32 rounding changes with the
    operand layout and N, so equal inputs alone do not give equal bits.
    """
    values = rng.uniform(1 / 16, 1, shape) * rng.choice([-1.0, 1.0], shape)
    if spread_rows:
        values = values * 10.0 ** rng.uniform(-2, 2, shape[:-1] + (1,))
    return jnp.asarray(values, jnp.float32)


def exact_sum_operands(x_shape, w_shape, recipe, seed=0):
    rng = np.random.default_rng(seed)
    # Per-tensor scaling would push small rows' codes out of [28, 448]: no spread there.
    return exact_sum_operand(rng, x_shape, recipe == "block"), exact_sum_operand(rng, w_shape)


# ------------------------------------------------------ independent references


@functools.partial(jax.jit, static_argnames="dtype")
def ref_quantize(x, amax, dtype):
    """(codes as f32, scale = amax / fp8_max). Jitted like the code under test: XLA
    turns these divisions into reciprocal multiplies, eager jnp does not."""
    fp8_max = float(jnp.finfo(dtype).max)
    scale = amax / fp8_max
    return jnp.clip(x / scale, -fp8_max, fp8_max).astype(dtype).astype(jnp.float32), scale


def exact_code_product(a_codes, b_codes):
    """f32 a @ b of fp8 codes, summed exactly (asserted) in float64."""
    product = np.asarray(a_codes, np.float64) @ np.asarray(b_codes, np.float64)
    assert np.array_equal(product.astype(np.float32), product), "test data breaks exact sums"
    return product.astype(np.float32)


@functools.partial(jax.jit, static_argnames=("x_dtype", "w_dtype"))
def ref_tensor_codes(x, w, x_dtype, w_dtype):
    x_codes, x_scale = ref_quantize(x, jnp.maximum(jnp.max(jnp.abs(x)), 1e-12), x_dtype)
    w_codes, w_scale = ref_quantize(w, jnp.maximum(jnp.max(jnp.abs(w)), 1e-12), w_dtype)
    return x_codes, x_scale, w_codes, w_scale


def ref_tensor_matmul(x, w, x_dtype=fp8.E4M3, w_dtype=fp8.E4M3):
    """x [M, K] @ w [K, N] or [G, M, K] @ [G, K, N]: (exact codes product, sx * sw)."""
    x_codes, x_scale, w_codes, w_scale = ref_tensor_codes(x, w, x_dtype, w_dtype)
    return exact_code_product(x_codes, w_codes), np.float32(x_scale) * np.float32(w_scale)


def assert_codes_product_times_one_scale(out, codes_product, nominal_scale, max_ulps=2):
    """out == fl(codes_product * s) bit for bit, for ONE f32 s within max_ulps of sx * sw.

    The slack is XLA's: it rewrites (ax / 448) * (aw / 448) as (ax * aw) * (1/448^2)
    when both constants are visible, which moves the rounding of the scalar scale.
    """
    candidates = [np.float32(nominal_scale)]
    for direction in (np.inf, -np.inf):
        scale = np.float32(nominal_scale)
        for _ in range(max_ulps):
            scale = np.nextafter(scale, np.float32(direction))
            candidates.append(scale)
    out = np.asarray(out)
    assert any(np.array_equal(out, codes_product * scale) for scale in candidates)


@functools.partial(jax.jit, static_argnames="w_tiled_per_column")
def ref_block_codes(x, w, w_tiled_per_column):
    """Zero-pad, cut K into chunks of 128 and quantise each chunk.

    x [M, K] -> codes [C, M, 128], scales [C, M, 1] (one per row per chunk).
    w [K, N] -> codes [C, 128, Np], scales [C, 1, Np]: the scale of the column's
    128x128 block, or with w_tiled_per_column (wgrad) one per column per chunk.
    """
    (m, k), n = x.shape, w.shape[1]
    x = jnp.pad(x, ((0, 0), (0, -k % BLOCK)))
    w = jnp.pad(w, ((0, -k % BLOCK), (0, -n % BLOCK)))
    chunks = x.shape[1] // BLOCK
    x_chunks = x.reshape(m, chunks, BLOCK).transpose(1, 0, 2)
    w_chunks = w.reshape(chunks, BLOCK, w.shape[1])
    x_amax = jnp.max(jnp.abs(x_chunks), axis=2, keepdims=True)
    if w_tiled_per_column:
        w_amax = jnp.max(jnp.abs(w_chunks), axis=1, keepdims=True)
    else:
        blocks = jnp.abs(w_chunks).reshape(chunks, BLOCK, -1, BLOCK)
        w_amax = jnp.repeat(jnp.max(blocks, axis=(1, 3)), BLOCK, axis=1)[:, None, :]
    x_codes, x_scales = ref_quantize(x_chunks, jnp.maximum(x_amax, 1e-4), fp8.E4M3)
    w_codes, w_scales = ref_quantize(w_chunks, jnp.maximum(w_amax, 1e-4), fp8.E4M3)
    return x_codes, x_scales, w_codes, w_scales


def ref_block_matmul_2d(x, w, w_tiled_per_column=False, dequantize_first=False):
    """DeepSeek block fp8 x [M, K] @ w [K, N], one K chunk of 128 at a time:
    acc = acc + codes_product * (sx * sw), each operation rounded to f32."""
    x_codes, x_scales, w_codes, w_scales = map(
        np.asarray, ref_block_codes(x, w, w_tiled_per_column))
    accumulator = np.zeros((x.shape[0], w_codes.shape[2]), np.float32)
    for chunk in range(x_codes.shape[0]):
        if dequantize_first:
            x_tile = (x_codes[chunk] * x_scales[chunk]).astype(np.float64)
            w_tile = (w_codes[chunk] * w_scales[chunk]).astype(np.float64)
            partial = (x_tile @ w_tile).astype(np.float32)
        else:
            partial = exact_code_product(x_codes[chunk], w_codes[chunk]) * (
                x_scales[chunk] * w_scales[chunk])
        accumulator = accumulator + partial
    return accumulator[:, :w.shape[1]]


def ref_block_matmul(x, w, **kwargs):
    """x [..., K] @ w [K, N], or per group: x [G, ..., K] @ w [G, K, N]."""
    if w.ndim == 3:
        return np.stack([ref_block_matmul(x[g], w[g], **kwargs) for g in range(w.shape[0])])
    out = ref_block_matmul_2d(x.reshape(-1, x.shape[-1]), w, **kwargs)
    return out.reshape(*x.shape[:-1], w.shape[-1])


def compile_optimised(function, *args):
    """jit-compile at XLA:CPU's default LLVM optimisation level (tests/conftest.py
    lowers it for compile speed), where XLA may contract a multiply-add into an FMA."""
    return jax.jit(function).lower(*args).compile(
        compiler_options={"xla_backend_optimization_level": 3})


# --------------------------------------------------------------------- tests


@pytest.mark.parametrize("case", SHAPE_CASES)
@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_matches_reference_bit_exactly(recipe, case):
    x, w = exact_sum_operands(*SHAPE_CASES[case], recipe)
    out = compile_optimised(lambda x, w: fp8_matmul(x, w, recipe=recipe), x, w)(x, w)
    assert out.shape == x.shape[:-1] + w.shape[-1:]
    if recipe == "tensor":
        flat_shape = (x.shape[0], -1, x.shape[-1]) if w.ndim == 3 else (-1, x.shape[-1])
        flat_x = x.reshape(flat_shape)
        codes_product, scale = ref_tensor_matmul(flat_x, w)
        assert_codes_product_times_one_scale(out.reshape(codes_product.shape), codes_product, scale)
    else:
        np.testing.assert_array_equal(np.asarray(out), ref_block_matmul(x, w))
        # Dequantised tiles, same chunk order: equal up to f32 rounding.
        assert relative_error(out, ref_block_matmul(x, w, dequantize_first=True)) < 1e-6


def test_block_padding_does_not_change_result():
    x, w = exact_sum_operands((16, 200), (200, 72), "block")
    x_padded = jnp.pad(x, ((0, 0), (0, 56)))
    w_padded = jnp.pad(w, ((0, 56), (0, 56)))

    def matmul(x, w):
        return compile_optimised(lambda x, w: fp8_matmul(x, w, recipe="block"), x, w)(x, w)

    out, out_padded = matmul(x, w), matmul(x_padded, w_padded)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out_padded[:, :72]))


@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_backward_gemms_match_reference_bit_exactly(recipe):
    # M, K, N = 160: every GEMM contracts over two chunks, one zero-padded.
    x, w = exact_sum_operands((160, 160), (160, 160), "tensor")  # wgrad tiles x^T: no row spread
    cotangent = exact_sum_operand(np.random.default_rng(7), (160, 160))

    def input_and_weight_grads(x, w, cotangent):
        return jax.vjp(lambda x, w: fp8_matmul(x, w, recipe=recipe), x, w)[1](cotangent)

    grad_x, grad_w = compile_optimised(input_and_weight_grads, x, w, cotangent)(x, w, cotangent)
    if recipe == "tensor":  # dgrad e5m2 x e4m3, wgrad e4m3 x e5m2
        assert_codes_product_times_one_scale(
            grad_x, *ref_tensor_matmul(cotangent, w.T, x_dtype=fp8.E5M2))
        assert_codes_product_times_one_scale(
            grad_w, *ref_tensor_matmul(x.T, cotangent, w_dtype=fp8.E5M2))
    else:  # dgrad: g tiled along N, w blocks; wgrad: x^T and g tiled along M
        np.testing.assert_array_equal(np.asarray(grad_x), ref_block_matmul(cotangent, w.T))
        np.testing.assert_array_equal(
            np.asarray(grad_w), ref_block_matmul(x.T, cotangent, w_tiled_per_column=True))


def exact_matmul_and_grads(x, w):
    """float64 y = x @ w and the gradients of 0.5 * sum(y^2) (w [K, N] or [G, K, N])."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    if w.ndim == 3:  # per group
        results = [exact_matmul_and_grads(x[g], w[g]) for g in range(w.shape[0])]
        return tuple(np.stack(parts) for parts in zip(*results))
    y = x @ w
    flat_x, flat_y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    return y, y @ w.T, flat_x.T @ flat_y


@pytest.mark.parametrize("case", ["2d", "3d"])
@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_gaussian_errors_within_bounds(recipe, case):
    x_shape, w_shape = SHAPE_CASES[case]
    x, w = gaussian_operands(x_shape, w_shape, seed=1)

    def loss_and_output(x, w):
        y = fp8_matmul(x, w, recipe=recipe)
        return 0.5 * jnp.sum(y**2), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss_and_output, (0, 1), has_aux=True))(x, w)
    exact_y, *exact_grads = exact_matmul_and_grads(x, w)
    error = relative_error(y, exact_y)
    print(f"{recipe} {case} forward: relative error {error:.4f}, "
          f"expected {EXPECTED_GEMM_ERROR:.4f}, bound {GEMM_ERROR_BOUND:.4f}")
    assert error <= GEMM_ERROR_BOUND
    assert 0.75 * EXPECTED_GEMM_ERROR <= error <= 1.25 * EXPECTED_GEMM_ERROR
    for name, grad, exact in zip(("dx", "dw"), grads, exact_grads):
        error = relative_error(grad, exact)
        print(f"{recipe} {case} {name}: relative error {error:.4f}, "
              f"bound {GRAD_ERROR_BOUND[recipe]:.4f}")
        assert grad.dtype == jnp.float32 and grad.shape == exact.shape
        assert np.all(np.isfinite(np.asarray(grad)))
        assert error <= GRAD_ERROR_BOUND[recipe]


def predicted_tensor_error_with_outlier(outlier):
    """Relative error of per-tensor e4m3 for N(0,1) rows when amax = `outlier`.

    Values below t = 2^-6 * s (s = outlier / 448) are subnormal with a uniform
    error of half-width h = 2^-10 * s; values above keep RMS 0.425*u4; w adds the same.
    """
    scale = outlier / 448.0
    threshold, half_step = 2.0**-6 * scale, 2.0**-10 * scale
    density = math.exp(-threshold**2 / 2) / math.sqrt(2 * math.pi)
    subnormal_fraction = math.erf(threshold / math.sqrt(2))
    normal_second_moment = 1 - subnormal_fraction + 2 * threshold * density
    rms = RMS_TO_MAX_ROUNDOFF * U_E4M3
    return math.sqrt(rms**2 * (normal_second_moment + 1) + subnormal_fraction * half_step**2 / 3)


@pytest.mark.parametrize("outlier", [1e4, 3e5])
def test_outliers_hurt_tensor_not_block(outlier):
    x, w = gaussian_operands((64, 512), (512, 128), seed=2)
    outlier_rows = np.array([3, 17, 40, 41])
    x = np.array(x)
    x[outlier_rows, outlier_rows * 5] = outlier
    x = jnp.asarray(x)
    clean = np.setdiff1d(np.arange(64), outlier_rows)
    exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    block_out, tensor_out = jax.jit(lambda x, w: [fp8_matmul(x, w, recipe=recipe)
                                                  for recipe in ("block", "tensor")])(x, w)
    block_error = relative_error(block_out[clean], exact[clean])
    tensor_error = relative_error(tensor_out[clean], exact[clean])
    predicted = predicted_tensor_error_with_outlier(outlier)
    print(f"outlier {outlier:g}: clean rows block {block_error:.4f}, tensor {tensor_error:.4f} "
          f"(predicted {predicted:.4f})")
    assert block_error <= GEMM_ERROR_BOUND
    assert relative_error(block_out, exact) <= GEMM_ERROR_BOUND
    assert 0.8 * predicted <= tensor_error <= 1.25 * predicted
    if outlier >= 1e5:  # the N(0,1) bulk is deep in e4m3's subnormals
        assert tensor_error > 5 * block_error
    else:  # e4m3 spans 2^-9..448: a 1e4 outlier only costs a few percent
        assert tensor_error <= GEMM_ERROR_BOUND


def test_dtypes_follow_inputs():
    x, w = gaussian_operands((2, 8, 200), (2, 200, 72))
    x = x.astype(jnp.bfloat16)
    for recipe in fp8.RECIPES:
        def forward(x, w, recipe=recipe):
            return fp8_matmul(x, w, recipe=recipe, out_dtype=jnp.bfloat16)

        out, grad_x, grad_w = jax.eval_shape(
            lambda x, w: (forward(x, w), *jax.grad(lambda *a: jnp.sum(forward(*a)), (0, 1))(x, w)),
            x, w)
        assert (out.dtype, grad_x.dtype, grad_w.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)


@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_non_finite_inputs_propagate(recipe):
    """An fp16 overflow upstream must stay visible to the loss scaler."""
    x, w = gaussian_operands((16, 256), (256, 128))
    bad_x, bad_cotangent = np.array(x), np.zeros((16, 128), np.float32)
    bad_x[2, 5] = bad_cotangent[0, 0] = np.inf

    @jax.jit
    def forward_and_grads(x, bad_x, w, cotangent):
        _, vjp = jax.vjp(lambda x, w: fp8_matmul(x, w, recipe=recipe), x, w)
        return (fp8_matmul(bad_x, w, recipe=recipe), *vjp(cotangent))

    for result in forward_and_grads(x, bad_x, w, bad_cotangent):
        assert not np.all(np.isfinite(np.asarray(result)))


# ------------------------------------------------------------------ lowered HLO

DOT_OPERAND_TYPES = re.compile(
    r"stablehlo\.dot_general.*:\s*\(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\)")


def dot_operand_dtypes(function, *args):
    """Set of (lhs, rhs) element types of the dots in the lowered module."""
    text = jax.jit(function).lower(*args).as_text()
    dot_lines = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    assert dot_lines, "no dot_general found in the lowered module"
    # tests/conftest.py sets jax_default_matmul_precision="highest"; fp8 dots stay DEFAULT.
    assert all("precision = [DEFAULT, DEFAULT]" in line for line in dot_lines)
    return set(DOT_OPERAND_TYPES.findall(text)), text


@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_lowered_dots_take_fp8_operands(recipe):
    x, w = gaussian_operands((3, 16, 256), (3, 256, 128))
    forward_pairs, _ = dot_operand_dtypes(lambda x, w: fp8_matmul(x, w, recipe=recipe), x, w)
    assert forward_pairs == {("f8E4M3FN", "f8E4M3FN")}

    def loss(x, w):
        return jnp.sum(fp8_matmul(x, w, recipe=recipe) ** 2)

    grad_pairs, grad_text = dot_operand_dtypes(jax.grad(loss, argnums=(0, 1)), x, w)
    if recipe == "tensor":
        assert grad_pairs == {("f8E4M3FN", "f8E4M3FN"), ("f8E5M2", "f8E4M3FN"),
                              ("f8E4M3FN", "f8E5M2")}
    else:  # DeepSeek: e4m3 everywhere
        assert grad_pairs == {("f8E4M3FN", "f8E4M3FN")}
        assert "f8E5M2" not in grad_text


def test_bad_arguments_raise():
    x, w = gaussian_operands((4, 256), (256, 128))
    with pytest.raises(ValueError, match="recipe"):
        fp8_matmul(x, w, recipe="delayed")
    with pytest.raises(ValueError, match="contract"):
        fp8_matmul(x[:, :100], w, recipe="tensor")


# --------------------------------------------------------------- quantisers


def test_quantizers_scales_and_shapes():
    x, w = gaussian_operands((5, 200), (200, 72))
    quantized = jax.jit(lambda x, w: (fp8.quantize_tensor(x, fp8.E5M2),
                                      fp8.quantize_tiles(x, BLOCK),
                                      fp8.quantize_blocks(w, BLOCK)))(x, w)
    (tensor_q, tensor_scale), (tile_q, tile_scales), (block_q, block_scales) = quantized
    x, w = np.asarray(x), np.asarray(w)
    assert tensor_q.dtype == fp8.E5M2 and tensor_scale.shape == ()
    assert float(tensor_scale) == pytest.approx(np.abs(x).max() / 57344.0, rel=1e-6)
    assert tile_q.shape == x.shape and tile_q.dtype == fp8.E4M3 and tile_scales.shape == (5, 2)
    np.testing.assert_allclose(tile_scales[:, 1], np.abs(x[:, 128:]).max(axis=1) / 448.0, rtol=1e-6)
    assert block_q.shape == w.shape and block_scales.shape == (2, 1)
    np.testing.assert_allclose(block_scales[1, 0], np.abs(w[128:]).max() / 448.0, rtol=1e-6)
    scale_per_element = np.repeat(np.repeat(block_scales, BLOCK, 0), BLOCK, 1)[:200, :72]
    dequantized = np.asarray(block_q.astype(jnp.float32)) * scale_per_element
    assert np.all(np.abs(dequantized - w) <= U_E4M3 * np.abs(w) + 2.0**-10 * scale_per_element)


def test_quantize_per_token_power_of_two_round_trip():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 6, 96)) * 10.0 ** rng.uniform(-3, 3, (4, 6, 1))
    x[1, 2] = 0.0  # an all-zero row
    x[0, 0] = 448.0 * 2.0**-3  # amax / 448 exactly a power of two
    x = jnp.asarray(x, jnp.float32)
    q, scale, restored = jax.jit(
        lambda x: (*fp8.quantize_per_token(x), fp8.dequantize_per_token(
            *fp8.quantize_per_token(x), jnp.float32)))(x)
    assert q.dtype == fp8.E4M3 and q.shape == x.shape and scale.shape == (4, 6, 1)
    x, scale, restored = np.asarray(x), np.asarray(scale), np.asarray(restored)
    exponents = np.log2(scale)
    np.testing.assert_array_equal(exponents, np.round(exponents))
    ratio = np.abs(x).max(axis=-1, keepdims=True) / scale
    nonzero = ratio > 0
    assert np.all((ratio[nonzero] > 224) & (ratio[nonzero] <= 448))
    assert scale[0, 0, 0] == 2.0**-3
    np.testing.assert_array_equal(restored, np.asarray(q.astype(jnp.float32)) * scale)
    assert np.all(np.abs(restored - x) <= U_E4M3 * np.abs(x) + 2.0**-10 * scale)
    assert np.all(restored[1, 2] == 0)
    error = relative_error(restored, x)
    print(f"per-token round trip: relative error {error:.4f} <= {U_E4M3}")
    assert error <= U_E4M3


def test_send_in_fp8_under_shard_map():
    """Forward sends e4m3 codes; backward sends the cotangent unquantised."""
    devices = len(jax.devices())
    mesh = jax.make_mesh((devices,), ("expert",), axis_types=(jax.sharding.AxisType.Explicit,))
    all_to_all = lambda t: lax.all_to_all(t, "expert", 0, 0, tiled=True)

    def dispatch(x, fp8_send):
        local = (lambda t: fp8.send_in_fp8(t, all_to_all)) if fp8_send else all_to_all
        return jax.shard_map(local, mesh=mesh, in_specs=P("expert"), out_specs=P("expert"))(x)

    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((devices * 8, 64)), jnp.float32)
    cotangent = jnp.asarray(1e-6 * rng.standard_normal(x.shape), jnp.float32)  # e4m3 flushes these
    with jax.set_mesh(mesh):
        x = jax.device_put(x, P("expert"))
        sent = jax.jit(lambda x: dispatch(x, True))(x)
        expected = jax.jit(lambda x: dispatch(
            fp8.dequantize_per_token(*fp8.quantize_per_token(x), jnp.float32), False))(x)
        np.testing.assert_array_equal(np.asarray(sent), np.asarray(expected))
        grad_fp8 = jax.jit(jax.grad(lambda x: jnp.sum(dispatch(x, True) * cotangent)))(x)
        grad_exact = jax.jit(jax.grad(lambda x: jnp.sum(dispatch(x, False) * cotangent)))(x)
    np.testing.assert_array_equal(np.asarray(grad_fp8), np.asarray(grad_exact))
