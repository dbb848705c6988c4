"""int8_matmul in interpret mode against numpy: the int32 accumulator exactly, the epilogue in float64."""

import zlib

import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant import ops
from jaxquant.formats import ActQuant
from jaxquant.quantizers import WeightQuant, quantize_weight
from pallas_kernels import act_quant, int8_matmul as im


def _rng(*case):
  return np.random.default_rng(zlib.crc32(repr(case).encode()))


def _codes(rng, shape):
  """Random int8 codes in +-127 with no zero (a zero code hides indexing mistakes)."""
  mag = rng.integers(1, 128, shape)
  return (mag * rng.choice([-1, 1], shape)).astype(np.int8)


def _numpy_w8a8(x, w, x_scale, w_scale, k_group, bias):
  """float64: per K-group integer products, scaled per group and summed."""
  m, k = x.shape
  kg = k if k_group is None else min(k_group, k)
  xs = np.asarray(x_scale, np.float64)
  y = 0.0
  for g, start in enumerate(range(0, k, kg)):
    acc = x[:, start:start + kg].astype(np.int64) @ w[start:start + kg].astype(np.int64)
    xs_g = xs.reshape(()) if xs.size == 1 else (xs[g] if xs.ndim == 3 else xs)
    y = y + acc * xs_g * np.asarray(w_scale, np.float64)[g][None, :]
  if bias is not None:
    y = y + np.asarray(bias, np.float64)[None, :]
  return y


@pytest.mark.parametrize("m,k,n", [(1, 16, 16), (5, 40, 24), (33, 300, 70), (70, 129, 130)])
def test_int32_accumulator_is_exact(m, k, n):
  rng = _rng("acc", m, k, n)
  x, w = _codes(rng, (m, k)), _codes(rng, (k, n))
  acc = im.int8_matmul_int32(jnp.asarray(x), jnp.asarray(w), interpret=True)
  assert acc.dtype == jnp.int32 and acc.shape == (m, n)
  np.testing.assert_array_equal(np.asarray(acc), x.astype(np.int64) @ w.astype(np.int64))


def test_int32_accumulator_beyond_float_precision():
  # |sums| up to 127*128*2048 > 2^24: a float32 accumulator would round, int32 must not.
  rng = _rng("big")
  x = np.full((3, 2048), 127, np.int8)
  x[1] = -128
  x[2] = _codes(rng, (2048,))
  w = _codes(rng, (2048, 20))
  w[:, 0] = 127
  w[:, 1] = -127
  acc = np.asarray(im.int8_matmul_int32(jnp.asarray(x), jnp.asarray(w), interpret=True))
  ref = x.astype(np.int64) @ w.astype(np.int64)
  assert np.abs(ref).max() > 2**24
  np.testing.assert_array_equal(acc, ref)


CASES = [
    # m, k, n, k_group, x_scale mode
    (1, 64, 48, None, "token"),
    (7, 100, 33, None, "tensor"),
    (9, 200, 40, None, "tensor11"),
    (3, 576, 40, 128, "token"),       # shorter last group (576 = 4*128 + 64)
    (6, 576, 24, 128, "token_group"),
    (5, 200, 33, 100, "token_group"),  # group size with no power-of-two tile: masked tiles inside groups
    (17, 96, 20, 32, "tensor"),
]


@pytest.mark.parametrize("m,k,n,k_group,mode", CASES)
def test_epilogue_matches_float64(m, k, n, k_group, mode):
  rng = _rng("epi", m, k, n, k_group, mode)
  x, w = _codes(rng, (m, k)), _codes(rng, (k, n))
  groups = -(-k // (k_group or k))
  w_scale = rng.uniform(0.01, 0.1, (groups, n)).astype(np.float32)
  x_scale = {
      "token": rng.uniform(0.01, 0.1, (m, 1)),
      "tensor": np.float32(rng.uniform(0.01, 0.1)),
      "tensor11": rng.uniform(0.01, 0.1, (1, 1)),
      "token_group": rng.uniform(0.01, 0.1, (groups, m, 1)),
  }[mode]
  x_scale = np.asarray(x_scale, np.float32)
  bias = rng.normal(size=n).astype(np.float32)
  y = im.int8_matmul(jnp.asarray(x), jnp.asarray(w), jnp.asarray(x_scale), jnp.asarray(w_scale),
                     k_group=k_group, bias=jnp.asarray(bias), interpret=True)
  ref = _numpy_w8a8(x, w, x_scale, w_scale, k_group, bias)
  assert y.shape == (m, n) and y.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=2e-6, atol=2e-6 * np.abs(ref).max())


@pytest.mark.parametrize("out_dtype,eps", [(jnp.bfloat16, 2.0**-8), (jnp.float16, 2.0**-11)])
def test_low_precision_outputs_round_once(out_dtype, eps):
  rng = _rng("dtype", str(out_dtype))
  m, k, n = 4, 160, 36
  x, w = _codes(rng, (m, k)), _codes(rng, (k, n))
  x_scale = rng.uniform(0.01, 0.02, (m, 1)).astype(np.float32)
  w_scale = rng.uniform(0.001, 0.002, (1, n)).astype(np.float32)
  y = im.int8_matmul(jnp.asarray(x), jnp.asarray(w), jnp.asarray(x_scale), jnp.asarray(w_scale),
                     out_dtype=out_dtype, interpret=True)
  assert y.dtype == out_dtype
  ref = _numpy_w8a8(x, w, x_scale, w_scale, None, None)
  err = np.abs(np.asarray(y, np.float64) - ref)
  assert np.all(err <= eps * np.abs(ref) + 1e-6 * np.abs(ref).max())


@pytest.mark.parametrize("k_group,split", [(None, 3), (64, 2)])
def test_split_k_and_explicit_blocks(k_group, split):
  rng = _rng("split", k_group, split)
  m, k, n = 2, 320, 24
  x, w = _codes(rng, (m, k)), _codes(rng, (k, n))
  groups = -(-k // (k_group or k))
  x_scale = rng.uniform(0.01, 0.1, (m, 1)).astype(np.float32)
  w_scale = rng.uniform(0.01, 0.1, (groups, n)).astype(np.float32)
  bias = rng.normal(size=n).astype(np.float32)
  block = im.Blocks(bm=16, bn=16, bk=32, split=split, num_warps=4, num_stages=2)
  y = im.int8_matmul(jnp.asarray(x), jnp.asarray(w), jnp.asarray(x_scale), jnp.asarray(w_scale), k_group=k_group,
                     bias=jnp.asarray(bias), interpret=True, block=block)
  ref = _numpy_w8a8(x, w, x_scale, w_scale, k_group, bias)
  np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=2e-6, atol=2e-6 * np.abs(ref).max())


def test_block_heuristic_is_powers_of_two():
  for m in (1, 16, 64, 256, 4096):
    for n, k, kg in ((4096, 4096, None), (28672, 7168, 128), (576, 576, 128), (33, 200, 100)):
      b = im.block_sizes(m, n, k, kg)
      for v in (b.bm, b.bn, b.bk):
        assert v >= 16 and v & (v - 1) == 0, b
      if kg is not None and kg % 32 == 0:
        assert kg % b.bk == 0, b  # no partial tiles for power-of-two-friendly groups


@pytest.mark.parametrize("granularity,mode", [("channel", "token"), ("group", "token"), ("group", "token_group")])
def test_matches_ops_integer_path(granularity, mode, strict_numerics):
  """The kernel path (act_quant + int8_matmul) reproduces jaxquant.ops' XLA integer W8A8 path."""
  rng = _rng("ops", granularity, mode)
  x = jnp.asarray(rng.standard_normal((5, 576)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((576, 40)), jnp.float32)
  q = quantize_weight(w, WeightQuant(8, True, granularity, 128), activation=ActQuant(8, mode))
  want = np.asarray(ops.qdot(x, q))
  k_group = q.k_group if granularity == "group" else None
  if mode == "token":
    x_int, x_scale = act_quant.quantize_rows(x, interpret=True)
  else:
    groups = q.scale.shape[0]
    xg = jnp.pad(x, ((0, 0), (0, groups * 128 - 576))).reshape(5, groups, 128)
    x_int, x_scale = act_quant.quantize_rows(xg, interpret=True)
    x_int = x_int.reshape(5, groups * 128)[:, :576]
    x_scale = jnp.transpose(x_scale, (1, 0, 2))
  w = q.values().T  # this (Triton) kernel reads the weight (K, N)
  y = im.int8_matmul(x_int, w, x_scale, q.scale, k_group=k_group, interpret=True)
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("k_group", [None, 64])
def test_uint8_codes_with_offset_128(k_group):
  """QArray stores 8-bit symmetric weights as uint8 codes u = w + 128: the kernel takes them as they are."""
  rng = _rng("u8", k_group)
  m, k, n = 5, 200, 40
  x = _codes(rng, (m, k))
  codes = rng.integers(1, 256, (k, n)).astype(np.uint8)
  w = (codes.astype(np.int64) - 128).astype(np.int8)
  acc = im.int8_matmul_int32(jnp.asarray(x), jnp.asarray(codes), interpret=True)
  np.testing.assert_array_equal(np.asarray(acc), x.astype(np.int64) @ w.astype(np.int64))
  groups = -(-k // (k_group or k))
  xs = rng.uniform(0.01, 0.1, (m, 1)).astype(np.float32)
  ws = rng.uniform(0.01, 0.1, (groups, n)).astype(np.float32)
  y = im.int8_matmul(jnp.asarray(x), jnp.asarray(codes), jnp.asarray(xs), jnp.asarray(ws), k_group=k_group,
                     interpret=True)
  ref = _numpy_w8a8(x, w, xs, ws, k_group, None)
  np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=2e-6, atol=2e-6 * np.abs(ref).max())


def test_reference_function_agrees():
  rng = _rng("ref")
  x, w = _codes(rng, (3, 200)), _codes(rng, (200, 16))
  xs = rng.uniform(0.01, 0.1, (2, 3, 1)).astype(np.float32)
  ws = rng.uniform(0.01, 0.1, (2, 16)).astype(np.float32)
  ref = np.asarray(im.reference(jnp.asarray(x), jnp.asarray(w), jnp.asarray(xs), jnp.asarray(ws), k_group=100))
  want = _numpy_w8a8(x, w, xs, ws, 100, None)
  np.testing.assert_allclose(ref, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def _args(m=4, k=64, n=32, groups=1):
  return (jnp.ones((m, k), jnp.int8), jnp.ones((k, n), jnp.int8), jnp.ones((m, 1), jnp.float32),
          jnp.ones((groups, n), jnp.float32))


@pytest.mark.parametrize("change,message", [
    (lambda a, kw: ((a[0].astype(jnp.float32),) + a[1:], kw), r"x_int8: expected dtype int8"),
    (lambda a, kw: ((a[0], a[1].astype(jnp.int16)) + a[2:], kw), r"w_int8: expected dtype int8 \(or uint8 codes"),
    (lambda a, kw: ((a[0], jnp.ones((65, 32), jnp.int8)) + a[2:], kw), r"K=64 columns but w_int8 has K=65"),
    (lambda a, kw: ((a[0][None],) + a[1:], kw), r"x_int8: expected a 2-D array"),
    (lambda a, kw: (a[:3] + (jnp.ones((2, 32), jnp.float32),), kw), r"w_scale: expected shape \(1, 32\)"),
    (lambda a, kw: (a[:3] + (jnp.ones((1, 32), jnp.float32),), dict(kw, k_group=16)),
     r"w_scale: expected shape \(4, 32\) \(K=64 in groups of k_group=16\)"),
    (lambda a, kw: (a[:2] + (jnp.ones((4,), jnp.float32), a[3]), kw), r"x_scale: expected shape"),
    (lambda a, kw: (a[:2] + (jnp.ones((2, 4, 1), jnp.float32), a[3]), kw), r"need k_group"),
    (lambda a, kw: (a[:2] + (jnp.ones((4, 1), jnp.int32), a[3]), kw), r"x_scale: unsupported dtype int32"),
    (lambda a, kw: (a, dict(kw, k_group=0)), r"k_group: must be a positive int"),
    (lambda a, kw: (a, dict(kw, bias=jnp.ones((31,), jnp.float32))), r"bias: expected shape \(32,\)"),
    (lambda a, kw: (a, dict(kw, out_dtype=jnp.int32)), r"out_dtype: unsupported dtype int32"),
    (lambda a, kw: (a, dict(kw, block=im.Blocks(24, 16, 16, 1, 4, 2))), r"block.bm=24: must be a power of two"),
])
def test_bad_inputs_raise_before_launch(change, message):
  args, kwargs = change(_args(), {"interpret": True})
  with pytest.raises(ValueError, match=message):
    im.int8_matmul(*args, **kwargs)


def test_bad_raw_inputs():
  with pytest.raises(ValueError, match=r"w_int8: expected dtype int8"):
    im.int8_matmul_int32(jnp.ones((2, 16), jnp.int8), jnp.ones((16, 16), jnp.int32))
