"""GPTQ for group-wise formats (jaxquant.methods.gptq_core): it beats the format's own round-to-nearest fit on
the layer's output error when inputs are correlated, reduces to it when they are not, and its codes are the
nearest codes of the rows it returns as updated."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant import formats
from jaxquant.formats import BCQArray
from jaxquant.methods import bcq_core, gptq_core
from jaxquant.quantizers import weight_values


def _weight(k, n, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.standard_t(5, size=(k, n)) * rng.uniform(0.02, 0.1, size=(1, n)), jnp.float32)


def _inputs(n_tokens, k, seed=1, correlated=True):
  """Activations with correlated features and a few large ones, as a transformer's normed hidden states."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n_tokens, k))
  if correlated:
    x = x @ (np.eye(k) + 0.4 * rng.standard_normal((k, k)) / np.sqrt(k))
    x[:, :3] *= 8.0
  return jnp.asarray(x, jnp.float32)


def _hessian(x):
  return (x.T @ x) / x.shape[0]


def _output_error(x, w, approx):
  return float(jnp.sum((x @ (w - approx)) ** 2))


def _uniform_dequant(values, scale, zero, k_group, k):
  rows = np.repeat(np.arange(scale.shape[0]), k_group)[:k]
  z = 0.0 if zero is None else np.asarray(zero)[rows]
  return (np.asarray(values, np.float32) - z) * np.asarray(scale)[rows]


@pytest.mark.parametrize("bits,symmetric,k_group", [(3, False, 32), (4, False, 32), (4, True, 128), (2, False, 40)])
def test_uniform_beats_round_to_nearest_on_the_output(bits, symmetric, k_group, strict_numerics):
  k, n = 100, 24  # 100 = 3 groups of 32 + 4 rows (a shorter last group); 40: 2 whole groups + 20
  w, x = _weight(k, n), _inputs(512, k)
  values, scale, zero, _ = gptq_core.uniform(w, _hessian(x), bits=bits, symmetric=symmetric, k_group=k_group)
  lo, hi = gptq_core.uniform_bounds(bits, symmetric)
  assert values.dtype == jnp.int32 and int(values.min()) >= lo and int(values.max()) <= hi
  assert scale.shape == (-(-k // k_group), n)
  rtn_values, rtn_scale, rtn_zero = weight_values(w, bits=bits, symmetric=symmetric, k_group=k_group, n_group=1)
  rtn = _uniform_dequant(rtn_values, rtn_scale, rtn_zero, k_group, k)
  gptq = _uniform_dequant(values, scale, zero, k_group, k)
  assert _output_error(x, w, gptq) < 0.8 * _output_error(x, w, rtn)


@pytest.mark.parametrize("q,offset,k_group", [(3, True, 32), (2, False, 64), (4, True, 1000)])
def test_bcq_beats_the_activation_weighted_fit_on_the_output(q, offset, k_group, strict_numerics):
  k, n = 160, 16  # k_group 1000 >= K: one group, rounded in lazy blocks of 128
  w, x = _weight(k, n, seed=3), _inputs(640, k, seed=4)
  h = _hessian(x)
  signs, alpha, off, _ = gptq_core.bcq(w, h, q=q, k_group=k_group, use_offset=offset)
  group = min(k_group, k)
  groups = -(-k // group)
  assert signs.shape == (q, k, n) and signs.dtype == jnp.bool_
  assert alpha.shape == (q, groups, n) and alpha.dtype == jnp.float16
  assert (off is None) == (not offset) and (off is None or off.shape == (groups, n))
  got = BCQArray(planes=formats.pack_planes(signs), alpha=alpha, offset=off, shape=(k, n), k_group=group)
  f_signs, f_alpha, f_off, _ = bcq_core.fit(w, jnp.diag(h), q=q, k_group=group, use_offset=offset,
                                            scale_dtype="float16")
  fit = BCQArray(planes=formats.pack_planes(f_signs), alpha=f_alpha, offset=f_off, shape=(k, n), k_group=group)
  assert _output_error(x, w, got.dequantize()) < 0.8 * _output_error(x, w, fit.dequantize())


def test_uncorrelated_inputs_give_round_to_nearest(strict_numerics):
  """With H diagonal no error is carried: GPTQ's codes are weight_values' own, group by group."""
  k, n = 96, 8
  w = _weight(k, n, seed=5)
  h = jnp.diag(jnp.asarray(np.random.default_rng(6).uniform(0.5, 2.0, k), jnp.float32))
  values, scale, zero, updated = gptq_core.uniform(w, h, bits=3, symmetric=False, k_group=32)
  rtn_values, rtn_scale, rtn_zero = weight_values(w, bits=3, symmetric=False, k_group=32, n_group=1)
  np.testing.assert_array_equal(values, rtn_values)
  np.testing.assert_allclose(scale, rtn_scale, rtol=1e-6)
  np.testing.assert_allclose(zero, rtn_zero)
  np.testing.assert_allclose(updated, w, atol=1e-6)


def test_codes_are_the_nearest_codes_of_the_updated_rows(strict_numerics):
  """What a straight-through student starts from: nearest codes of `updated` under the stored alphas."""
  k, n = 70, 12
  w, x = _weight(k, n, seed=7), _inputs(256, k, seed=8)
  signs, alpha, off, updated = gptq_core.bcq(w, _hessian(x), q=3, k_group=32, use_offset=True)
  wg, _, _ = bcq_core.grouped(updated, 32)
  again = bcq_core.best_signs(wg, jnp.swapaxes(alpha, -1, -2).astype(jnp.float32), off.T.astype(jnp.float32))
  np.testing.assert_array_equal(bcq_core.ungrouped(again, k) > 0, signs)
  assert not np.allclose(updated, w)  # errors were carried


def test_dead_inputs_stay_finite(strict_numerics):
  """An input feature that never fires (a zero Hessian row and column) is rounded as zero, never NaN."""
  k, n = 64, 8
  x = np.array(_inputs(128, k, seed=9))
  x[:, 5] = 0.0
  w = _weight(k, n, seed=10)
  values, scale, zero, updated = gptq_core.uniform(w, _hessian(jnp.asarray(x)), bits=4, symmetric=False, k_group=32)
  assert np.all(np.isfinite(np.asarray(updated))) and np.all(np.isfinite(np.asarray(scale)))
  signs, alpha, off, updated = gptq_core.bcq(w, _hessian(jnp.asarray(x)), q=2, k_group=32, use_offset=True)
  assert np.all(np.isfinite(np.asarray(alpha, np.float32))) and np.all(np.isfinite(np.asarray(updated)))
