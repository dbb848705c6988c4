"""A quantized slice of the real SmolLM2 run through the Pallas kernel code (interpret mode on CPU) gives the same
logits as the portable XLA path: ops.qdot really dispatches to the kernels."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant import pipeline, rules
from jaxquant.quantizers import WeightQuant


@pytest.fixture(scope="module")
def loaded():
  return pipeline.load("smollm2-135m", n_layers=1)


def _tokens(loaded):
  return jnp.asarray(np.random.default_rng(0).integers(0, 49152, (1, 24)), jnp.int32)


@pytest.mark.parametrize("recipe", [
    rules.get_recipe("zeroquant-w8a8"),
    rules.get_recipe("zeroquant-w8a8-kgroup"),
    rules.Recipe("w4-g128", "weight-only 4-bit", (rules.Rule(rules.BLOCK_LINEARS, WeightQuant(4, False, "group", 128)),)),
], ids=lambda r: r.name)
def test_interpret_kernels_match_xla_path(loaded, recipe):
  quantized = pipeline.quantize_model(loaded.model, recipe, progress=False)
  tokens = _tokens(loaded)
  xla = pipeline.set_backend(quantized, "xla")(tokens)
  kernels = pipeline.set_backend(quantized, "interpret")(tokens)
  scale = float(jnp.max(jnp.abs(xla)))
  np.testing.assert_allclose(np.asarray(kernels), np.asarray(xla), atol=2e-4 * scale, rtol=0)


def test_unknown_backend_is_refused(loaded):
  with pytest.raises(ValueError, match="unknown backend 'cuda'"):
    pipeline.set_backend(loaded.model, "cuda")
