"""Test setup: 8 fake CPU devices, configured before jax is imported anywhere."""

import atexit
import importlib.metadata
import os
import shutil
import tempfile

# Tests run tiny shapes, so compile time dominates: XLA's backend optimisation level 0 halves it.
# jaxlib 0.10's XLA:CPU also compiles ~1.5x faster without its fusion emitters (the suite's
# pipeline tests: 86 s against 134 s, both at load ~6, provisional); newer XLA:CPU has no such
# flag and refuses unknown ones.
_NO_FUSION_EMITTERS = importlib.metadata.version("jaxlib").startswith("0.10.")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    + (" --xla_cpu_use_fusion_emitters=false" if _NO_FUSION_EMITTERS else "")
).strip()

# Many tests start scripts/train.py in a child process with the same tiny model: a compilation
# cache shared by this session (children inherit the variables) compiles each program once.
_COMPILATION_CACHE = tempfile.mkdtemp(prefix="moejax-tests-xla-cache-")
atexit.register(shutil.rmtree, _COMPILATION_CACHE, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _COMPILATION_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax
import pytest

# Mesh-equivalence tests compare float32 results at 1e-5; keep matmuls at full precision.
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    if any(d.platform == "gpu" for d in jax.devices()):
        return
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
