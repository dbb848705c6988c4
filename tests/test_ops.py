import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_ref
from jaxquant import ops, quantizers
from jaxquant.formats import ActQuant
from jaxquant.quantizers import WeightQuant, quantize_weight


def _reference_w8a8(x, w, granularity, group_size):
  """numpy float64 from the float weights: int8 round-to-nearest weights (numpy_ref, not the implementation's
  codes or scales) times token-wise int8 activations."""
  x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
  return numpy_ref.quantize_rows(x) @ numpy_ref.fake_quant(np.asarray(w), 8, True, granularity, group_size)


@pytest.mark.parametrize("k,n,group_size", [(576, 64, 128), (64, 33, 64), (100, 7, 32), (13, 5, 13)])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group", "row_block"])
def test_w8a8_matches_float64_reference(k, n, group_size, granularity, strict_numerics):
  rng = np.random.default_rng(k + n)
  x = jnp.asarray(rng.standard_normal((3, 11, k)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
  q = quantize_weight(w, WeightQuant(8, True, granularity, group_size), activation=ActQuant(8, "token"))
  y = ops.qdot(x, q)
  assert y.shape == (3, 11, n) and y.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y).reshape(-1, n), _reference_w8a8(x, w, granularity, group_size),
                             rtol=1e-4, atol=1e-3)


def test_static_per_tensor_activations():
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((7, 48)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((48, 16)), jnp.float32)
  scale = quantizers.static_scale_from_absmax(float(jnp.max(jnp.abs(x))))
  q = quantize_weight(w, WeightQuant(8, True, "tensor"), activation=ActQuant(8, "tensor", scale))
  expected = (numpy_ref.quantize_static(x, float(np.abs(np.asarray(x)).max()))
              @ numpy_ref.fake_quant(np.asarray(w), 8, True, "tensor", 0))
  np.testing.assert_allclose(np.asarray(ops.qdot(x, q)), expected, rtol=1e-4, atol=1e-3)


def test_weight_only_path_is_dequantize_then_dot():
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.standard_normal((5, 70)), jnp.float32)
  w = rng.standard_normal((70, 9)).astype(np.float32)  # K = 70: groups of 32, 32 and 6
  q = quantize_weight(jnp.asarray(w), WeightQuant(4, False, "group", 32))
  np.testing.assert_allclose(np.asarray(ops.qdot(x, q)),
                             np.asarray(x, np.float64) @ numpy_ref.fake_quant(w, 4, False, "group", 32),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("granularity", ["channel", "group"])
def test_w8a8_lowers_to_an_s8_by_s8_to_s32_dot(granularity):
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.standard_normal((16, 576)), jnp.float32)
  q = quantize_weight(jnp.asarray(rng.standard_normal((576, 64)), jnp.float32),
                      WeightQuant(8, True, granularity, 128), activation=ActQuant(8, "token"))
  hlo = jax.jit(ops.qdot).lower(x, q).compile().as_text()
  shapes = dict(re.findall(r"%(\S+) = (\w+)\[", hlo))
  int_dots = []
  for line in hlo.splitlines():
    found = re.search(r"= (\w+)\[[^\]]*\][^=]* dot\(%(\S+), %(\S+)\)", line)
    if found:
      int_dots.append((found.group(1), shapes.get(found.group(2).rstrip(",)")),
                       shapes.get(found.group(3).rstrip(",)"))))
  assert ("s32", "s8", "s8") in int_dots, int_dots


def test_mismatched_features_are_refused():
  q = quantize_weight(jnp.ones((8, 4), jnp.float32), WeightQuant(8, True, "channel"), activation=ActQuant(8, "token"))
  with pytest.raises(ValueError, match="x has 9 features but the weight expects K=8"):
    ops.qdot(jnp.ones((2, 9), jnp.float32), q)


@pytest.mark.parametrize("k,group_size", [(576, 128), (96, 32), (50, 16)])
def test_token_group_activations_match_float64_reference(k, group_size, strict_numerics):
  rng = np.random.default_rng(k)
  x = rng.standard_normal((9, k)).astype(np.float32)
  x[:, 3] *= 40  # one outlier channel: only its own K-group's scale should grow
  w = rng.standard_normal((k, 12)).astype(np.float32)
  q = quantize_weight(jnp.asarray(w), WeightQuant(8, True, "group", group_size), activation=ActQuant(8, "token_group"))
  # Each token gets one activation scale per K-group of the weight (numpy_ref.quantize_rows with group=).
  expected = numpy_ref.quantize_rows(x, group=group_size) @ numpy_ref.fake_quant(w, 8, True, "group", group_size)
  np.testing.assert_allclose(np.asarray(ops.qdot(jnp.asarray(x), q)), expected, rtol=1e-4, atol=1e-3)


def test_token_group_with_one_k_group_is_token_wise():
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.standard_normal((5, 40)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((40, 6)), jnp.float32)
  outputs = [ops.qdot(x, quantize_weight(w, WeightQuant(8, True, "channel"), activation=ActQuant(8, mode)))
             for mode in ("token", "token_group")]
  np.testing.assert_array_equal(np.asarray(outputs[0]), np.asarray(outputs[1]))
