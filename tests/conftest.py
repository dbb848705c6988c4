"""Test configuration: persistent compilation cache, and strict numerics for quantization code."""

import contextlib
import os
import pathlib

import jax
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

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
