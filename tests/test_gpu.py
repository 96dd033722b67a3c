"""Checks that need an NVIDIA GPU (Hopper or newer for fp8); skipped elsewhere by conftest.py."""

import jax
import jax.numpy as jnp
import pytest

from moejax.fp8 import fp8_matmul

CUBLAS_FP8 = "__cublas$lt$matmul$f8"


@pytest.mark.gpu
@pytest.mark.parametrize("w_shape", [(256, 512), (4, 256, 512)])
def test_tensor_fp8_gemms_become_cublaslt_fp8_calls(w_shape):
    x = jnp.ones((*w_shape[:-2], 128, w_shape[-2]), jnp.bfloat16)
    w = jnp.ones(w_shape, jnp.bfloat16)

    def loss(x, w):
        return jnp.sum(fp8_matmul(x, w, recipe="tensor", out_dtype=jnp.bfloat16)
                       .astype(jnp.float32) ** 2)

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile().as_text()
    assert hlo.count(CUBLAS_FP8) == 3  # forward, input gradient, weight gradient
