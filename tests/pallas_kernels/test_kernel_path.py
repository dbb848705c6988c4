"""A quantized llama run through the Pallas kernel code (interpret mode on CPU) gives the same logits as the portable
XLA path: ops.qdot really dispatches to the kernels.

The model is a small random llama whose input dims (192 and 320) are not multiples of the group (128), so the
K-grouped kernels see a shorter last group as SmolLM2's 576 does (SmolLM2's shapes themselves run compiled in
tests/pallas_kernels/test_gpu_compiled.py). Interpret mode costs seconds a kernel call: a one-block SmolLM2 took
~100 s a recipe here."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant import ops, pipeline, recipes, rules
from jaxquant.formats import ActQuant
from jaxquant.methods import blockwise
from jaxquant.models import surgery
from jaxquant.models.llama import LlamaConfig, random_llama
from jaxquant.quantizers import WeightQuant


CONFIG = LlamaConfig(vocab_size=256, dim=192, n_layers=1, n_heads=3, n_kv_heads=1, head_dim=64, ffn_dim=320)


@pytest.fixture(scope="module")
def model():
  return random_llama(CONFIG)


def _tokens():
  return jnp.asarray(np.random.default_rng(0).integers(0, CONFIG.vocab_size, (1, 24)), jnp.int32)


# Each linear on the same input: W8A8's integer sums are exact on both paths and only the float epilogues differ
# (a few float32 roundings); weight-only kernels multiply in bf16 (x and the decoded weight rounded to 8 bits of
# mantissa, float32 accumulation) where the XLA path is float32 throughout.
# The whole model: a 1e-7 difference upstream can move a token's int8 activation code by one in a later linear
# (dynamic rounding), which moves that output by up to one activation step, ~1% of the token's largest value; so
# logits are compared to 1% of the largest logit (a wrong kernel is off by far more) and top-1 must agree.
CASES = [
    (recipes.get_recipe("zeroquant-w8a8"), 2e-6, 1e-2),
    (recipes.get_recipe("zeroquant-w8a8-kgroup"), 2e-6, 1e-2),
    (rules.Recipe("w4-g128", "weight-only 4-bit", (rules.Rule(rules.BLOCK_LINEARS, WeightQuant(4, False, "group", 128)),)),
     6e-3, 6e-3),
    (recipes.get_recipe("lutgemm-bcq3-offset-g128"), 6e-3, 6e-3),
]


@pytest.mark.parametrize("recipe,linear_tolerance,model_tolerance", CASES, ids=lambda r: getattr(r, "name", ""))
def test_interpret_kernels_match_xla_path(model, recipe, linear_tolerance, model_tolerance):
  quantized = pipeline.quantize_model(model, recipe, [np.asarray(_tokens())], progress=False)
  tokens = _tokens()
  # One linear per distinct (K, N): interpret mode costs seconds a call, and the model run below calls them all.
  by_shape = {m.kernel.get_value().shape: (path, m) for path, m in surgery.modules(quantized).items()
              if path.startswith("layers.")}
  linears = dict(by_shape.values())
  inputs = blockwise.linear_input_stats(pipeline.set_backend(quantized, "xla"), [np.asarray(tokens)], linears,
                                        surgery.identity, progress=False)
  for path, linear in linears.items():
    x, w = inputs[path][0], linear.kernel.get_value()
    xla_y, kernel_y = ops.qdot(x, w, backend="xla"), ops.qdot(x, w, backend="interpret")
    np.testing.assert_allclose(np.asarray(kernel_y), np.asarray(xla_y), rtol=0,
                               atol=linear_tolerance * float(jnp.max(jnp.abs(xla_y))), err_msg=path)
  xla = pipeline.set_backend(quantized, "xla")(tokens)
  kernels = pipeline.set_backend(quantized, "interpret")(tokens)
  scale = float(jnp.max(jnp.abs(xla)))
  np.testing.assert_allclose(np.asarray(kernels), np.asarray(xla), atol=model_tolerance * scale, rtol=0)
  assert np.mean(np.argmax(kernels, -1) == np.argmax(xla, -1)) >= 0.95


def test_unknown_backend_is_refused(model):
  with pytest.raises(ValueError, match="unknown backend 'cuda'"):
    pipeline.set_backend(model, "cuda")


def test_a_weight_the_kernel_cannot_take_runs_xla_and_says_why(caplog):
  w = WeightQuant(8, True, "channel").quantize(jnp.ones((40, 24), jnp.float32), activation=ActQuant(8, "token"))
  with caplog.at_level("WARNING", logger="jaxquant.ops"):
    y = ops.qdot(jnp.ones((3, 40), jnp.float32), w, backend="interpret")  # K = 40: not a multiple of 32
  np.testing.assert_allclose(np.asarray(y), np.asarray(ops.qdot(jnp.ones((3, 40), jnp.float32), w, backend="xla")))
  assert "K=40 not a multiple of 32" in caplog.text and "XLA int8 path runs instead" in caplog.text
