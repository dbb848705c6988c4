"""Rules on parameter paths, calibration, and model-level quantization on a tiny random llama."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import numpy_ref
from jaxquant import formats, pipeline, recipes, rules
from jaxquant.methods import blockwise
from jaxquant.models.llama import LlamaConfig, random_llama, random_weights
from jaxquant.quantizers import WeightQuant

CONFIG = LlamaConfig(vocab_size=64, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=12, ffn_dim=96)


@pytest.fixture(scope="module")
def model():
  return random_llama(CONFIG, seed=0)


def _tokens(seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 64, (2, 16)), jnp.int32)


def test_paths_and_patterns(model):
  paths = {rules.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(nnx.state(model))}
  assert "layers.1.mlp.down_proj.kernel" in paths and "lm_head.kernel" in paths
  block = {p for p in paths if rules.match((rules.Rule(rules.BLOCK_LINEARS, WeightQuant()),), p)}
  assert len(block) == 2 * 7 and not any(p.startswith(("lm_head", "embed")) for p in block)


def test_mixed_rules_first_match_wins(model):
  recipe = rules.Recipe("mix", "d", (rules.Rule(rules.MLP_LINEARS, WeightQuant(4, True, "group", 32)),
                                     rules.Rule(rules.BLOCK_LINEARS, WeightQuant(8, True, "channel"))))
  quantized = pipeline.quantize_model(model, recipe, progress=False)
  assert quantized.layers[0].mlp.up_proj.kernel.get_value().bits == 4
  assert quantized.layers[0].attn.q_proj.kernel.get_value().bits == 8
  assert not formats.is_qarray(quantized.lm_head.kernel.get_value())
  # The source model is untouched.
  assert not formats.is_qarray(model.layers[0].mlp.up_proj.kernel.get_value())


def test_calibration_records_each_linear_input_absmax(model):
  tokens = _tokens()
  absmax = blockwise.input_absmax(model, [tokens], progress=False)
  h = model.embed_tokens(tokens)
  block = model.layers[0]
  expected = float(jnp.max(jnp.abs(block.attn_norm(h))))
  assert absmax["layers.0.attn.q_proj.kernel"] == pytest.approx(expected, rel=1e-6)
  assert absmax["layers.0.attn.q_proj.kernel"] == absmax["layers.0.attn.k_proj.kernel"]
  assert len([k for k in absmax if k.startswith("layers.")]) == 14


def test_static_recipe_needs_calibration(model):
  with pytest.raises(ValueError, match="calibration"):
    pipeline.quantize_model(model, recipes.get_recipe("w8a8-per-tensor"), progress=False)


HF_CONFIG = {"hidden_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 12,
             "num_hidden_layers": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True}
# recipe -> (weight granularity, group size, activation mode) as the recipe's description states them; with
# groups of 32, K = 48 leaves a short last group of 16 (K = 96: three whole groups).
W8A8_RECIPES = {"zeroquant-w8a8-g32": ("group", 32, "token"), "zeroquant-w8a8-kgroup-g32": ("group", 32, "token_group"),
                "w8a8-per-tensor": ("tensor", 0, "tensor")}


def _reference_logits(tokens, scheme=None, calibration=None):
  """numpy_ref.llama_forward of the tiny model, each block linear simulating `scheme`'s int8 weights and
  activations from the float weights (the calibration absmax for static scales recorded by the same forward)."""
  hf = numpy_ref.hf_from_weights(random_weights(CONFIG, seed=0), CONFIG.n_layers, tie=True)
  absmax = {}
  if scheme is not None and scheme[2] == "tensor":
    def record(name, x, w):
      absmax[name] = max(absmax.get(name, 0.0), float(np.abs(x).max()))
      return x @ w.T
    for row in calibration:
      numpy_ref.llama_forward(hf, HF_CONFIG, row, record)

  def linear(name, x, w):
    if scheme is None:
      return x @ w.T
    granularity, group_size, act = scheme
    w_q = numpy_ref.fake_quant(w.T, 8, True, granularity, group_size)  # Flax layout (K, N)
    x_q = (numpy_ref.quantize_static(x, absmax[name]) if act == "tensor"
           else numpy_ref.quantize_rows(x, group=group_size if act == "token_group" else None))
    return x_q @ w_q

  return np.stack([numpy_ref.llama_forward(hf, HF_CONFIG, row, linear) for row in tokens])


def test_float_model_matches_numpy_reference(model):
  tokens = np.asarray(_tokens(1))
  np.testing.assert_allclose(np.asarray(model(tokens)), _reference_logits(tokens), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(W8A8_RECIPES))
def test_w8a8_recipes_match_a_numpy_quantized_forward(model, name):
  """Every block linear is stored int8 as the recipe says, and the logits follow numpy_ref's simulation of the
  recipe (weights and activations quantized from float64): far closer to it than to the float model, so a model
  left unquantized, or quantized by another scheme, fails."""
  tokens, calibration = np.asarray(_tokens(1)), np.asarray(_tokens(2))
  granularity, group_size, act = W8A8_RECIPES[name]
  quantized = pipeline.quantize_model(model, recipes.get_recipe(name), calibration=[calibration], progress=False)
  kernels = {rules.path_str(p): leaf for p, leaf in
             jax.tree_util.tree_leaves_with_path(nnx.state(quantized), is_leaf=formats.is_qarray)
             if rules.path_str(p).endswith("kernel")}
  for path, kernel in kernels.items():
    if path == "lm_head.kernel":
      assert not formats.is_qarray(kernel)
      continue
    assert isinstance(kernel, formats.QArray) and kernel.bits == 8 and kernel.symmetric, path
    assert (kernel.k_group, kernel.n_group) == numpy_ref.groups(kernel.shape, granularity, group_size), path
    assert kernel.activation.mode == act and (kernel.activation.scale is not None) == (act == "tensor"), path
  got = np.asarray(quantized(tokens))
  expected = _reference_logits(tokens, (granularity, group_size, act), calibration)
  effect = np.abs(expected - _reference_logits(tokens)).max()  # what quantizing changes
  error = np.abs(got - expected).max()
  print(f"{name}: max |jaxquant - numpy quantized| {error:.3g}, max |numpy quantized - float| {effect:.3g}")
  assert error < 0.02 * effect, (name, error, effect)


def test_group_size_override():
  recipe = rules.with_group_size(recipes.get_recipe("zeroquant-w8a8"), 64)
  assert recipe.name == "zeroquant-w8a8-g64" and recipe.rules[0].weight.group_size == 64


def test_group_size_suffix_in_the_recipe_name():
  recipe = recipes.get_recipe("zeroquant-w8a8-kgroup-g64")
  assert recipe.name == "zeroquant-w8a8-kgroup-g64" and recipe.rules[0].weight.group_size == 64
  with pytest.raises(ValueError, match="unknown recipe"):
    recipes.get_recipe("nonsense-g64")
