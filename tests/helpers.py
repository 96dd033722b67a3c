"""Shared test helpers (conftest.py has already set up 8 fake CPU devices)."""

import functools
import importlib.util
import os
from pathlib import Path

import jax
import numpy as np

import moejax


def tiny_config(*overrides, num_devices: int = 8) -> moejax.Config:
    """The tiny preset shrunk further for tests: float32 compute, dropless, small batch."""
    base = (
        "precision.compute_dtype=float32",
        "model.d_model=32",
        "model.num_heads=4",
        "model.num_kv_heads=2",
        "model.head_dim=8",
        "model.ffn_dim=64",
        "moe.expert_ffn_dim=16",
        "train.seq_len=16",
        "train.global_batch_size=8",
    )
    return moejax.load_config("tiny", base + tuple(overrides), num_devices=num_devices)


def max_relative_error(actual, expected) -> float:
    """Largest over leaves of max|a - e| / max|e| (relative to each leaf's scale).

    Computed on the host in numpy, in each leaf's own dtype as jnp would (the same IEEE
    operations): eager jnp ops would compile a small program for every leaf's shape and
    sharding, seconds per comparison of a model's gradients."""
    def leaf(a, e):
        a, e = np.asarray(a), np.asarray(e)
        return float(np.max(np.abs(a - e)) / (np.max(np.abs(e)) + 1e-30))

    return max(jax.tree.leaves(jax.tree.map(leaf, actual, expected)))


def subprocess_env(num_devices: int) -> dict:
    """Environment for a child Python process with `num_devices` fake CPU devices (and the
    same fast-compile setting as this test process)."""
    flags = f"--xla_force_host_platform_device_count={num_devices} --xla_backend_optimization_level=0"
    return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}


def assert_trees_bit_equal(actual, expected) -> None:
    """Same tree structure, and every leaf the same dtype, shape and bits."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert a.dtype == e.dtype and a.shape == e.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


@functools.cache
def load_script(name: str):
    """scripts/<name>.py as a module, so tests call its main(argv) in-process (a subprocess
    would pay jax's import again)."""
    path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
