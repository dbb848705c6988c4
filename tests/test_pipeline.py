"""Rules on parameter paths, calibration, and model-level quantization on a tiny random llama."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxquant import formats, pipeline, rules
from jaxquant.models.llama import LlamaConfig, random_llama
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
  absmax = pipeline.calibrate_input_absmax(model, [tokens], progress=False)
  h = model.embed_tokens(tokens)
  block = model.layers[0]
  expected = float(jnp.max(jnp.abs(block.attn_norm(h))))
  assert absmax["layers.0.attn.q_proj.kernel"] == pytest.approx(expected, rel=1e-6)
  assert absmax["layers.0.attn.q_proj.kernel"] == absmax["layers.0.attn.k_proj.kernel"]
  assert len([k for k in absmax if k.startswith("layers.")]) == 14


def test_static_recipe_needs_calibration(model):
  with pytest.raises(ValueError, match="calibration"):
    pipeline.quantize_model(model, rules.get_recipe("w8a8-per-tensor"), progress=False)


def test_w8a8_recipes_stay_close_to_float(model):
  tokens = _tokens(1)
  reference = model(tokens)
  for name in ("zeroquant-w8a8", "zeroquant-w8a8-kgroup", "w8a8-per-tensor"):
    quantized = pipeline.quantize_model(model, rules.get_recipe(name), calibration=[_tokens(2)], progress=False)
    error = float(jnp.max(jnp.abs(quantized(tokens) - reference)) / jnp.max(jnp.abs(reference)))
    assert error < 0.05, (name, error)


def test_group_size_override():
  recipe = rules.with_group_size(rules.get_recipe("zeroquant-w8a8"), 64)
  assert recipe.name == "zeroquant-w8a8-g64" and recipe.rules[0].weight.group_size == 64


def test_group_size_suffix_in_the_recipe_name():
  recipe = rules.get_recipe("zeroquant-w8a8-kgroup-g64")
  assert recipe.name == "zeroquant-w8a8-kgroup-g64" and recipe.rules[0].weight.group_size == 64
  with pytest.raises(ValueError, match="unknown recipe"):
    rules.get_recipe("nonsense-g64")
