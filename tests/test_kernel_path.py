"""A quantized slice of the real SmolLM2 run through the Pallas kernel code (interpret mode on CPU) gives the same
logits as the portable XLA path: ops.qdot really dispatches to the kernels."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant import ops, pipeline, rules
from jaxquant.formats import ActQuant
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


def test_a_weight_the_kernel_cannot_take_runs_xla_and_says_why(caplog):
  w = WeightQuant(8, True, "channel").quantize(jnp.ones((40, 24), jnp.float32), activation=ActQuant(8, "token"))
  with caplog.at_level("WARNING", logger="jaxquant.ops"):
    y = ops.qdot(jnp.ones((3, 40), jnp.float32), w, backend="interpret")  # K = 40: not a multiple of 32
  np.testing.assert_allclose(np.asarray(y), np.asarray(ops.qdot(jnp.ones((3, 40), jnp.float32), w, backend="xla")))
  assert "K=40 not a multiple of 32" in caplog.text and "XLA int8 path runs instead" in caplog.text
