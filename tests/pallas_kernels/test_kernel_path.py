"""A quantized slice of the real SmolLM2 run through the Pallas kernel code (interpret mode on CPU) gives the same
logits as the portable XLA path: ops.qdot really dispatches to the kernels."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant import ops, pipeline, recipes, rules
from jaxquant.formats import ActQuant
from jaxquant.quantizers import WeightQuant


@pytest.fixture(scope="module")
def loaded():
  return pipeline.load("smollm2-135m", n_layers=1)


def _tokens(loaded):
  return jnp.asarray(np.random.default_rng(0).integers(0, 49152, (1, 24)), jnp.int32)


# W8A8: integer sums are exact on both paths, only float epilogues differ. Weight-only: the kernel multiplies in
# bf16 (x and the decoded weight rounded to 8 bits of mantissa, relative 2^-9 each, float32 accumulation) where the
# XLA path is float32 throughout, so logits agree to a few bf16 roundings of the largest logit.
@pytest.mark.parametrize("recipe,tolerance", [
    (recipes.get_recipe("zeroquant-w8a8"), 2e-4),
    (recipes.get_recipe("zeroquant-w8a8-kgroup"), 2e-4),
    (rules.Recipe("w4-g128", "weight-only 4-bit", (rules.Rule(rules.BLOCK_LINEARS, WeightQuant(4, False, "group", 128)),)),
     6e-3),
    (recipes.get_recipe("lutgemm-bcq3-offset-g128"), 6e-3),
], ids=lambda r: getattr(r, "name", ""))
def test_interpret_kernels_match_xla_path(loaded, recipe, tolerance):
  quantized = pipeline.quantize_model(loaded.model, recipe, [np.asarray(_tokens(loaded))], progress=False)
  tokens = _tokens(loaded)
  xla = pipeline.set_backend(quantized, "xla")(tokens)
  kernels = pipeline.set_backend(quantized, "interpret")(tokens)
  scale = float(jnp.max(jnp.abs(xla)))
  np.testing.assert_allclose(np.asarray(kernels), np.asarray(xla), atol=tolerance * scale, rtol=0)
  assert np.mean(np.argmax(kernels, -1) == np.argmax(xla, -1)) >= 0.95


def test_unknown_backend_is_refused(loaded):
  with pytest.raises(ValueError, match="unknown backend 'cuda'"):
    pipeline.set_backend(loaded.model, "cuda")


def test_a_weight_the_kernel_cannot_take_runs_xla_and_says_why(caplog):
  w = WeightQuant(8, True, "channel").quantize(jnp.ones((40, 24), jnp.float32), activation=ActQuant(8, "token"))
  with caplog.at_level("WARNING", logger="jaxquant.ops"):
    y = ops.qdot(jnp.ones((3, 40), jnp.float32), w, backend="interpret")  # K = 40: not a multiple of 32
  np.testing.assert_allclose(np.asarray(y), np.asarray(ops.qdot(jnp.ones((3, 40), jnp.float32), w, backend="xla")))
  assert "K=40 not a multiple of 32" in caplog.text and "XLA int8 path runs instead" in caplog.text
