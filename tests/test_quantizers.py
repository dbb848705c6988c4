import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant import quantizers
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


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group", "row_block"])
def test_error_is_within_half_a_step(bits, granularity, strict_numerics):
  rng = np.random.default_rng(bits)
  w = jnp.asarray(rng.standard_normal((96, 40)) + 0.3, jnp.float32)
  for symmetric in (True, False):
    q = quantize_weight(w, WeightQuant(bits, symmetric, granularity, group_size=32))
    step = q.dequantize() - w
    scale = jnp.repeat(jnp.repeat(q.scale, q.k_group, 0, total_repeat_length=q.scale.shape[0] * q.k_group)[:96],
                       q.n_group, 1, total_repeat_length=q.scale.shape[1] * q.n_group)[:, :40]
    assert bool(jnp.all(jnp.abs(step) <= scale * 0.5 + 1e-6))


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
