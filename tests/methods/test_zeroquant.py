"""ZeroQuant W4/8 recipes: registered, the right schemes on the right linears (short last group included),
LKD recipes run through pipeline.quantize_model, data-free ones need no calibration."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

import numpy_ref
from jaxquant import formats, pipeline, recipes, rules
from jaxquant.methods import lkd, zeroquant
from jaxquant.models import llama

# dim 160: groups of 128 along the input dim leave a short last group of 32
CONFIG = llama.LlamaConfig(vocab_size=64, dim=160, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=40, ffn_dim=256)
FAST = dict(steps=4, batch_size=2, seq_len=16, n_samples=4)


@pytest.fixture(scope="module")
def tiny():
  return llama.random_llama(CONFIG, seed=0)


def _kernels(model):
  return {rules.path_str(p): leaf for p, leaf in
          jax.tree_util.tree_leaves_with_path(nnx.state(model), is_leaf=formats.is_qarray)
          if rules.path_str(p).endswith("kernel")}


def test_recipes_are_registered_with_their_procedures():
  names = ["zeroquant-w48a16", "zeroquant-w48a8", "zeroquant-w4a16", "zeroquant-w48a16-lkd", "zeroquant-w48a8-lkd",
           "zeroquant-w4a16-lkd", "zeroquant-w48a16-lkd-datafree", "zeroquant-w48a16-lkd-random"]
  for name in names:
    recipe = recipes.get_recipe(name)
    assert recipe.description
    if "lkd" not in name:
      assert recipe.procedure is None and not recipe.needs_calibration
    else:
      assert isinstance(recipe.procedure, lkd.LKDProcedure)
      assert recipe.uses_calibration == (recipe.procedure.config.data == "calibration")
  assert recipes.get_recipe("zeroquant-w48a16-lkd-datafree").procedure.config.data == "generated"
  assert "zeroquant-w48a8-lkd" in recipes.listing()


def test_w48a16_mlp_int4_attention_int8_group_128(tiny):
  model = pipeline.quantize_model(tiny, recipes.get_recipe("zeroquant-w48a16"), progress=False)
  kernels = _kernels(model)
  for path, kernel in kernels.items():
    if path == "lm_head.kernel":
      assert not formats.is_qarray(kernel)
      continue
    assert isinstance(kernel, formats.QArray) and kernel.symmetric and kernel.activation is None
    assert kernel.bits == (4 if ".mlp." in path else 8), path
    assert kernel.k_group == min(128, kernel.shape[0]) and kernel.n_group == 1
  q = kernels["layers.0.mlp.gate_proj.kernel"]
  assert q.scale.shape == (2, 256)  # 160 = 128 + a short group of 32
  assert q.packed.shape == (256, 80)  # (N, K/2): two 4-bit codes a byte along K
  w = tiny.layers[0].mlp.gate_proj.kernel.get_value()
  tail = np.asarray(w)[128:]
  np.testing.assert_allclose(np.asarray(q.scale[1]), np.abs(tail).max(0) / 7, rtol=1e-6)


def test_round_to_nearest_w48a8_and_w4a16_are_the_lkd_recipes_without_training(tiny):
  for name, bits, act in (("zeroquant-w48a8", {"mlp": 4, "attn": 8}, "token"),
                          ("zeroquant-w4a16", {"mlp": 4, "attn": 4}, None)):
    assert recipes.get_recipe(name).rules == recipes.get_recipe(name + "-lkd").rules
    model = pipeline.quantize_model(tiny, recipes.get_recipe(name), progress=False)
    for path, kernel in _kernels(model).items():
      if path.startswith("layers."):
        assert kernel.bits == bits[path.split(".")[2]], path
        assert (kernel.activation.mode if kernel.activation else None) == act


def test_lkd_recipes_through_the_pipeline(tiny):
  calibration = [np.random.default_rng(0).integers(0, 64, (4, 16)).astype(np.int32)]
  for name, bits, act in (("zeroquant-w48a16-lkd", {"mlp": 4, "attn": 8}, None),
                          ("zeroquant-w48a8-lkd", {"mlp": 4, "attn": 8}, "token"),
                          ("zeroquant-w4a16-lkd", {"mlp": 4, "attn": 4}, None)):
    recipe = lkd.with_lkd_options(recipes.get_recipe(name), **FAST)
    with pytest.raises(ValueError, match="learns from data"):
      pipeline.quantize_model(tiny, recipe)
    model = pipeline.quantize_model(tiny, recipe, calibration, progress=False)
    for path, kernel in _kernels(model).items():
      if path.startswith("layers."):
        part = path.split(".")[2]
        assert kernel.bits == bits[part], path
        assert (kernel.activation.mode if kernel.activation else None) == act
    _check_values(tiny, model, calibration[0], rtn_bits=bits)


HF_CONFIG = {"hidden_size": 160, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 40,
             "num_hidden_layers": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True}


def _check_values(float_model, model, tokens, rtn_bits):
  """The quantized model computes what it stores: its logits equal numpy_ref's forward of the weights decoded
  from the stored bytes (token-wise int8 activations where a kernel has them). And they stay near the float
  model: KL to it at most 1.5x that of round-to-nearest with the same bits (numpy_ref from the float weights;
  LKD keeps round-to-nearest for any block it does not improve)."""
  weights = {"embed.embedding": model.embed.embedding.get_value(), "norm.weight": model.norm.weight.get_value()}
  act = {}
  for i, block in enumerate(model.layers):
    weights |= {f"layers.{i}.attn_norm.weight": block.attn_norm.weight.get_value(),
                f"layers.{i}.mlp_norm.weight": block.mlp_norm.weight.get_value()}
    for part, names in (("attn", "qkvo"), ("mlp", ("gate", "up", "down"))):
      for name in names:
        q = getattr(getattr(block, part), f"{name}_proj").kernel.get_value()
        weights[f"layers.{i}.{part}.{name}_proj.kernel"] = numpy_ref.stored_dequantize(q)
        act[f"layers.{i}.{name}_proj"] = q.activation is not None
  hf = numpy_ref.hf_from_weights({k: np.asarray(v, np.float64) for k, v in weights.items()}, 2, tie=True)
  linear = lambda name, x, w: (numpy_ref.quantize_rows(x) if act[name] else x) @ w.T
  got = np.asarray(model(tokens))
  expected = np.stack([numpy_ref.llama_forward(hf, HF_CONFIG, row, linear) for row in tokens])
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)

  float_hf = numpy_ref.hf_from_weights(llama.random_weights(CONFIG, seed=0), 2, tie=True)
  mlp = lambda name: name.rsplit(".", 1)[1] in ("gate_proj", "up_proj", "down_proj")
  rtn = lambda name, x, w: ((numpy_ref.quantize_rows(x) if act[name] else x)
                            @ numpy_ref.fake_quant(w.T, rtn_bits["mlp" if mlp(name) else "attn"], True, "group", 128))
  float_logits = np.asarray(float_model(tokens), np.float64)
  rtn_logits = np.stack([numpy_ref.llama_forward(float_hf, HF_CONFIG, row, rtn) for row in tokens])
  kl, _ = numpy_ref.kl_top1(float_logits, got)
  kl_rtn, _ = numpy_ref.kl_top1(float_logits, rtn_logits)
  assert 0 < kl <= 1.5 * kl_rtn, (kl, kl_rtn)


def test_data_free_recipe_and_group_size_override(tiny):
  recipe = lkd.with_lkd_options(recipes.get_recipe("zeroquant-w48a16-lkd-random"), **FAST)
  assert not recipe.needs_calibration
  model = pipeline.quantize_model(tiny, rules.with_group_size(recipe, 64), progress=False)
  q = model.layers[1].mlp.down_proj.kernel.get_value()
  assert q.k_group == 64 and q.scale.shape == (4, 160)
  assert formats.tree_nbytes(nnx.state(model.layers)) < 0.3 * formats.tree_nbytes(nnx.state(tiny.layers))
  with pytest.raises(lkd.LKDError, match="not an LKD recipe"):
    lkd.with_lkd_options(recipes.get_recipe("zeroquant-w48a16"), steps=3)
  assert lkd.with_lkd_options(recipe, data="calibration").uses_calibration
