"""rules: Rule validation, recipe names with a -g<N> group-size suffix, and quantize_tree on mixed trees."""

import re

import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant import formats, recipes, rules
from jaxquant.methods.bcq import BCQQuant
from jaxquant.quantizers import WeightQuant


def test_rule_validation():
  for mode in (None, "token", "token_group", "tensor"):
    assert rules.Rule("x", WeightQuant(), activation=mode).activation == mode
  with pytest.raises(ValueError, match=r"activation must be None, 'token', 'token_group' or 'tensor', got 'channel'"):
    rules.Rule("x", WeightQuant(), activation="channel")
  with pytest.raises(re.error):
    rules.Rule("layers.(", WeightQuant())


@pytest.mark.parametrize("name,size", [("zeroquant-w8a8-g64", 64), ("zeroquant-w8a8-kgroup-g32", 32),
                                       ("zeroquant-w48a16-lkd-g16", 16), ("lutgemm-bcq3-g128-g64", 64),
                                       ("rtn-w4-g64", 64)])
def test_group_size_suffix_sets_every_group_wise_rule(name, size):
  recipe = recipes.get_recipe(name)
  assert recipe.name == name and recipe.rules
  assert all(rule.weight.group_size == size for rule in recipe.rules)
  base = recipes.RECIPES[name.rsplit("-g", 1)[0]] if name not in recipes.RECIPES else recipe
  # Nothing else changes: the same rules, procedure and calibration needs, up to the group size.
  assert [type(r.weight) for r in recipe.rules] == [type(r.weight) for r in base.rules]
  assert [(r.pattern, r.activation, r.activation_bits) for r in recipe.rules] == [
      (r.pattern, r.activation, r.activation_bits) for r in base.rules]
  assert (recipe.procedure, recipe.uses_calibration) == (base.procedure, base.uses_calibration)


def test_registered_names_ending_in_g_are_not_parsed():
  recipe = recipes.get_recipe("lutgemm-bcq3-g128")
  assert recipe is recipes.RECIPES["lutgemm-bcq3-g128"] and recipe.rules[0].weight.group_size == 128


@pytest.mark.parametrize("name", ["w8a8-per-tensor-g64", "fp-g64", "repquant-w4a4-g64", "naive-w8a8-g32"])
def test_group_size_suffix_is_refused_where_it_would_change_nothing(name):
  """A recipe without group-wise rules (per tensor, float, or a procedure with its own settings) refuses a group
  size instead of ignoring it under a new name."""
  with pytest.raises(ValueError, match=r"has no group-wise rule"):
    recipes.get_recipe(name)


def test_bad_group_sizes_and_names():
  with pytest.raises(ValueError, match="group_size must be a positive integer"):
    recipes.get_recipe("zeroquant-w8a8-g0")
  with pytest.raises(ValueError, match=r"unknown recipe 'nonsense-g64': choose one of \[.*'zeroquant-w8a8'"):
    recipes.get_recipe("nonsense-g64")
  with pytest.raises(ValueError, match=r"unknown recipe 'zeroquant-w8a8-gx'"):
    recipes.get_recipe("zeroquant-w8a8-gx")


def test_quantize_tree_skips_quantized_leaves_and_unmatched_ones():
  """Already quantized leaves are kept as they are (not quantized again, not counted); floats that match are
  quantized by the first matching rule; others are left alone."""
  rng = np.random.default_rng(0)
  done = WeightQuant(4, True, "group", 8).quantize(jnp.asarray(rng.standard_normal((16, 4)), jnp.float32))
  tree = {"layers": {"0": {"mlp": {"up_proj": {"kernel": done}},
                           "attn": {"q_proj": {"kernel": jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)}}}},
          "norm": {"weight": jnp.ones(16)}}
  recipe = (rules.Rule(rules.MLP_LINEARS, BCQQuant(3, 8)),
            rules.Rule(rules.BLOCK_LINEARS, WeightQuant(8, True, "channel")))
  out = rules.quantize_tree(tree, recipe, progress=False)
  assert out["layers"]["0"]["mlp"]["up_proj"]["kernel"] is done  # not re-fit as BCQ
  q = out["layers"]["0"]["attn"]["q_proj"]["kernel"]
  assert isinstance(q, formats.QArray) and (q.bits, q.k_group, q.n_group) == (8, 16, 1)
  assert out["norm"]["weight"] is tree["norm"]["weight"]
  # A static-scale rule without calibration names the parameter.
  with pytest.raises(ValueError, match=r"layers\.0\.attn\.q_proj\.kernel: static activation quantization needs "
                                       r"calibration"):
    rules.quantize_tree(tree, (rules.Rule(rules.BLOCK_LINEARS, WeightQuant(), activation="tensor"),), progress=False)
  # With calibration: the scale is absmax / 127 of the recorded input.
  out = rules.quantize_tree(tree, (rules.Rule(rules.BLOCK_LINEARS, WeightQuant(), activation="tensor"),),
                            act_absmax={"layers.0.attn.q_proj.kernel": 6.35}, progress=False)
  assert float(out["layers"]["0"]["attn"]["q_proj"]["kernel"].activation.scale) == pytest.approx(0.05, rel=1e-6)
