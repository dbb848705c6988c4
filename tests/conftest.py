"""Test configuration: persistent compilation cache, and strict numerics for quantization code."""

import contextlib
import os
import pathlib

import jax
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# Eight simulated CPU devices for the sharding tests (a mesh of 8, 2 or 1 device in one process). Set before any
# backend starts; tests that do not build a mesh run on device 0 as before. JAXQUANT_TEST_CPU_DEVICES overrides.
jax.config.update("jax_num_cpu_devices", int(os.environ.get("JAXQUANT_TEST_CPU_DEVICES", "8")))

jax.config.update("jax_compilation_cache_dir", os.environ.get("JAX_COMPILATION_CACHE_DIR", str(REPO / ".jax_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


@pytest.fixture
def strict_numerics():
  """Like equinox's test setup: silent dtype upcasts and rank promotion raise inside the test."""
  with contextlib.ExitStack() as stack:
    stack.enter_context(jax.numpy_dtype_promotion("strict"))
    stack.enter_context(jax.numpy_rank_promotion("raise"))
    yield


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: long runs on the full real model; excluded from the default run")
  config.addinivalue_line("markers", "gpu: compiled kernels on a real GPU; run by experiments/gpu_check.py (pytest -m gpu)")
