"""act_quant in interpret mode: token-wise int8 codes and scales, alone and fused with RMSNorm / LayerNorm."""

import zlib

import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant import quantizers
from pallas_kernels import act_quant as aq


def _rng(*case):
  return np.random.default_rng(zlib.crc32(repr(case).encode()))


def _numpy(x, weight=None, bias=None, norm="none", eps=1e-6, bits=8):
  """float64 reference: the normed activation y, its scale and codes."""
  qmax = 2 ** (bits - 1) - 1
  y = np.asarray(x, np.float64)
  if norm == "rms":
    y = y / np.sqrt(np.mean(y * y, -1, keepdims=True) + eps)
  elif norm == "layer":
    mu = y.mean(-1, keepdims=True)
    y = (y - mu) / np.sqrt(np.mean((y - mu) ** 2, -1, keepdims=True) + eps)
  if weight is not None:
    y = y * np.asarray(weight, np.float64)
  if bias is not None:
    y = y + np.asarray(bias, np.float64)
  absmax = np.abs(y).max(-1, keepdims=True)
  scale = np.where(absmax > 0, absmax / qmax, 1.0)
  return y / scale, scale


def _assert_codes(q, s, y_over_scale, scale, qmax=127, rtol=1e-5):
  """Codes equal round(y/scale) except within float32 noise of a .5 tie; scales to rtol."""
  np.testing.assert_allclose(np.asarray(s, np.float64), scale, rtol=rtol)
  want = np.clip(np.round(y_over_scale), -qmax, qmax)
  got = np.asarray(q, np.int64)
  diff = np.abs(got - want)
  assert diff.max() <= 1
  near_tie = np.abs(np.abs(y_over_scale - np.floor(y_over_scale)) - 0.5) < 1e-3
  assert np.all(near_tie[diff == 1]), "a code differs away from a rounding tie"


@pytest.mark.parametrize("shape", [(1, 16), (5, 40), (17, 576), (2, 3, 40), (3, 9000)])
def test_quantize_rows_equals_quantizers_and_float64(shape):
  rng = _rng("rows", shape)
  x = (rng.standard_normal(shape) * rng.uniform(0.1, 10, shape[:-1] + (1,))).astype(np.float32)
  q, s = aq.quantize_rows(jnp.asarray(x), interpret=True)
  assert q.shape == shape and q.dtype == jnp.int8 and s.shape == shape[:-1] + (1,) and s.dtype == jnp.float32
  q_ref, s_ref = quantizers.quantize_tokens(jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(q), np.asarray(q_ref))  # same float32 math, bit for bit
  np.testing.assert_array_equal(np.asarray(s), np.asarray(s_ref))
  _assert_codes(q, s, *_numpy(x))


def test_ties_round_to_even_and_zero_rows():
  x = np.zeros((3, 16), np.float32)
  x[0, :8] = [127, 0.5, 1.5, 2.5, -0.5, -2.5, 3.5, -126.5]  # scale 1: exact ties
  x[2] = _rng("tie").standard_normal(16)
  q, s = aq.quantize_rows(jnp.asarray(x), interpret=True)
  np.testing.assert_array_equal(np.asarray(q)[0, :8], [127, 0, 2, 2, 0, -2, 4, -126])
  np.testing.assert_array_equal(np.asarray(q)[1], 0)  # all-zero token: scale 1, codes 0
  assert float(s[0, 0]) == 1.0 and float(s[1, 0]) == 1.0


def test_bf16_input_and_4_bits():
  rng = _rng("bf16")
  x = jnp.asarray(rng.standard_normal((6, 72)), jnp.bfloat16)
  q, s = aq.quantize_rows(x, bits=4, interpret=True)
  assert int(jnp.max(jnp.abs(q.astype(jnp.int32)))) == 7
  _assert_codes(q, s, *_numpy(np.asarray(x, np.float32), bits=4), qmax=7)


@pytest.mark.parametrize("m,k,with_bias", [(1, 64, False), (7, 576, True), (2, 9000, False)])
def test_rmsnorm_quantize_matches_float64(m, k, with_bias):
  rng = _rng("rms", m, k, with_bias)
  x = (rng.standard_normal((m, k)) * 3 + 0.5).astype(np.float32)
  w = rng.uniform(0.5, 1.5, k).astype(np.float32)
  b = rng.standard_normal(k).astype(np.float32) * 0.1 if with_bias else None
  q, s = aq.rmsnorm_quantize(jnp.asarray(x), jnp.asarray(w), bias=None if b is None else jnp.asarray(b),
                             eps=1e-6, interpret=True)
  _assert_codes(q, s, *_numpy(x, w, b, "rms", 1e-6))
  q2, s2 = aq.reference(jnp.asarray(x), jnp.asarray(w), None if b is None else jnp.asarray(b), norm="rms", eps=1e-6)
  assert np.abs(np.asarray(q, np.int32) - np.asarray(q2, np.int32)).max() <= 1


@pytest.mark.parametrize("m,k", [(3, 40), (9, 384), (2, 9000)])
def test_layernorm_quantize_matches_float64(m, k):
  rng = _rng("ln", m, k)
  x = (rng.standard_normal((m, k)) * 2 + 5).astype(np.float32)  # a large mean: the centring matters
  w = rng.uniform(0.5, 1.5, k).astype(np.float32)
  b = (rng.standard_normal(k) * 0.2).astype(np.float32)
  q, s = aq.layernorm_quantize(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b), eps=1e-5, interpret=True)
  _assert_codes(q, s, *_numpy(x, w, b, "layer", 1e-5))


def test_layernorm_without_affine():
  rng = _rng("ln-plain")
  x = rng.standard_normal((4, 50)).astype(np.float32)
  q, s = aq.layernorm_quantize(jnp.asarray(x), None, None, interpret=True)
  _assert_codes(q, s, *_numpy(x, norm="layer", eps=1e-5))


def test_block_sizes_are_powers_of_two():
  for m in (1, 16, 4096):
    for k in (40, 576, 4096, 8192, 28672):
      bm, bk, nk = aq.block_sizes(m, k)
      assert bm & (bm - 1) == 0 and bk & (bk - 1) == 0 and bm * bk <= 8192 and bk * nk >= k


@pytest.mark.parametrize("call,message", [
    (lambda: aq.quantize_rows(jnp.ones((2, 8), jnp.int8)), r"x: unsupported dtype int8"),
    (lambda: aq.quantize_rows(jnp.ones((2, 0), jnp.float32)), r"x: empty input"),
    (lambda: aq.quantize_rows(jnp.ones((2, 8)), bits=9), r"bits: unsupported value 9"),
    (lambda: aq.rmsnorm_quantize(jnp.ones((2, 8)), jnp.ones((7,))), r"weight: expected shape \(8,\)"),
    (lambda: aq.layernorm_quantize(jnp.ones((2, 8)), jnp.ones((8,)), jnp.ones((8,), jnp.int32)),
     r"bias: unsupported dtype int32"),
    (lambda: aq.rmsnorm_quantize(jnp.ones((2, 8)), jnp.ones((8,)), eps=0.0), r"eps: must be a positive float"),
])
def test_bad_inputs(call, message):
  with pytest.raises(ValueError, match=message):
    call()
