import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_ref
from jaxquant import formats, quantizers
from jaxquant.quantizers import WeightQuant, quantize_weight


def _reference_symmetric(w, bits, k_group):
  """float64 numpy round-to-nearest, group-wise along K (short last group)."""
  qmax = 2 ** (bits - 1) - 1
  out = np.empty_like(w)
  for start in range(0, w.shape[0], k_group):
    block = w[start:start + k_group]
    scale = np.abs(block).max(axis=0) / qmax
    scale[scale == 0] = 1
    out[start:start + k_group] = np.clip(np.round(block / scale), -qmax, qmax) * scale
  return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 100, 128])
def test_symmetric_group_rtn_matches_numpy(bits, group_size, strict_numerics):
  rng = np.random.default_rng(bits + group_size)
  w = rng.standard_normal((300, 17)).astype(np.float32)
  q = quantize_weight(jnp.asarray(w), WeightQuant(bits=bits, granularity="group", group_size=group_size))
  np.testing.assert_allclose(np.asarray(q.dequantize()), _reference_symmetric(w.astype(np.float64), bits, group_size),
                             rtol=1e-5, atol=1e-6)


# Shapes with short last groups both ways: K = 100 is 4 x 24 + 4 and 64 + 36; N = 40 is 16 + 16 + 8 row blocks.
SCHEMES = [("tensor", 128), ("channel", 128), ("group", 24), ("group", 64), ("row_block", 16)]


def _weight(seed, shape=(100, 40)):
  """Off-centre normal values (asymmetric ranges differ from symmetric ones), one all-positive column and one
  all-zero column (scale 1 by definition)."""
  w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) + 0.3
  w[:, 5] = np.abs(w[:, 5]) + 0.5
  w[:, 7] = 0.0
  return w


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("granularity,group_size", SCHEMES, ids=[f"{g}-{s}" for g, s in SCHEMES])
def test_scales_zero_points_and_codes_match_numpy(bits, symmetric, granularity, group_size, strict_numerics):
  """Every granularity against tests/numpy_ref.quantize (float64, written from the format's definition)."""
  w = _weight(bits)
  q = quantize_weight(jnp.asarray(w), WeightQuant(bits, symmetric, granularity, group_size))
  k_group, n_group = numpy_ref.groups(w.shape, granularity, group_size)
  assert (q.k_group, q.n_group) == (k_group, n_group)
  values, scale, zero = numpy_ref.quantize(w, bits, symmetric, k_group, n_group)
  assert q.scale.shape == scale.shape and q.packed.shape == (40, formats.packed_len(100, bits))
  np.testing.assert_allclose(np.asarray(q.scale), scale, rtol=1e-6)
  if symmetric:
    assert q.zero is None
  else:
    np.testing.assert_array_equal(np.asarray(q.zero), zero)
  codes = np.asarray(q.values()).T  # stored (N, K): back to the logical (K, N)
  assert numpy_ref.code_mismatches(codes, w, bits, symmetric, k_group, n_group).size == 0
  # The stored bytes alone (numpy bit stream, scale, zero) decode to the reference weight.
  np.testing.assert_allclose(numpy_ref.stored_dequantize(q), numpy_ref.dequantize(values, scale, zero, k_group,
                                                                                   n_group), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group", "row_block"])
def test_error_is_within_half_a_step(bits, granularity, strict_numerics):
  """The step is the reference's (numpy_ref.quantize), not the implementation's own scale: a scale too large would
  give a larger error and fail here."""
  rng = np.random.default_rng(bits)
  w = (rng.standard_normal((96, 40)) + 0.3).astype(np.float32)
  for symmetric in (True, False):
    q = quantize_weight(jnp.asarray(w), WeightQuant(bits, symmetric, granularity, group_size=32))
    k_group, n_group = numpy_ref.groups(w.shape, granularity, 32)
    _, scale, _ = numpy_ref.quantize(w, bits, symmetric, k_group, n_group)
    step = numpy_ref.expand(scale, w.shape, k_group, n_group)
    error = np.abs(np.asarray(q.dequantize(), np.float64) - w)
    assert np.all(error <= step * (0.5 + 1e-5)), (symmetric, float(np.max(error / step)))


def test_finer_groups_lower_the_error():
  w = jnp.asarray(np.random.default_rng(3).standard_normal((512, 64)) * np.linspace(0.1, 4, 512)[:, None],
                  jnp.float32)
  errors = [float(jnp.mean((quantize_weight(w, WeightQuant(4, True, g, 64)).dequantize() - w) ** 2))
            for g in ("tensor", "channel", "group")]
  assert errors[0] > errors[1] > errors[2]


def test_all_zero_and_constant_groups_stay_finite():
  w = jnp.zeros((64, 4), jnp.float32).at[:, 1].set(2.5)
  for symmetric in (True, False):
    q = quantize_weight(w, WeightQuant(4, symmetric, "group", 16))
    out = np.asarray(q.dequantize())
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, np.asarray(w), atol=1e-6)


def test_nan_weight_names_the_parameter():
  w = jnp.ones((8, 8), jnp.float32).at[3, 5].set(jnp.nan)
  with pytest.raises(ValueError, match=r"layers\.2\.mlp\.up_proj\.kernel has 1 NaN/Inf.*\(3, 5\)"):
    quantize_weight(w, WeightQuant(), path="layers.2.mlp.up_proj.kernel")


def test_inf_weight_is_refused():
  with pytest.raises(ValueError, match="NaN/Inf"):
    quantize_weight(jnp.full((4, 4), jnp.inf, jnp.float32), WeightQuant(), path="w")


@pytest.mark.parametrize("bad", [0, -8])
def test_group_size_must_be_positive(bad):
  with pytest.raises(ValueError, match="group_size must be a positive integer"):
    WeightQuant(group_size=bad)


@pytest.mark.parametrize("bits", [1, 5, 16])
def test_unsupported_bits(bits):
  with pytest.raises(ValueError, match="unsupported bits"):
    WeightQuant(bits=bits)


def test_token_quantization_one_scale_per_row(strict_numerics):
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 9, 33)), jnp.float32)
  x = x.at[1, 2].set(0.0)
  q, scale = quantizers.quantize_tokens(x)
  assert q.dtype == jnp.int8 and scale.shape == (4, 9, 1)
  absmax = np.abs(np.asarray(x)).max(-1)
  np.testing.assert_allclose(np.asarray(scale[..., 0]), np.where(absmax > 0, absmax / 127, 1.0), rtol=1e-6)
  assert int(jnp.max(jnp.abs(q.astype(jnp.int32)))) == 127
  np.testing.assert_allclose(np.asarray(q.astype(jnp.float32) * scale), np.asarray(x),
                             atol=float(jnp.max(scale)) / 2 + 1e-6)


def test_fake_quant_has_straight_through_gradient():
  w = jnp.asarray(np.random.default_rng(0).standard_normal((32, 8)), jnp.float32)
  config = WeightQuant(4, True, "group", 16)
  np.testing.assert_allclose(np.asarray(quantizers.fake_quant_weight(w, config)),
                             np.asarray(quantize_weight(w, config).dequantize()), rtol=1e-6, atol=1e-7)
  grad = jax.grad(lambda v: jnp.sum(quantizers.fake_quant_weight(v, config) * 3.0))(w)
  np.testing.assert_array_equal(np.asarray(grad), np.full(w.shape, 3.0, np.float32))
