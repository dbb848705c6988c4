"""lut_gemm in interpret mode against numpy float64 dequantize-then-dot, both strategies, any group size."""

import zlib

import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant import formats
from jaxquant.quantizers import WeightQuant, quantize_weight
from pallas_kernels import backend, lut_gemm as lg


def _rng(*case):
  return np.random.default_rng(zlib.crc32(repr(case).encode()))


def _bcq(rng, q, k, n, k_group, with_offset):
  c, groups = -(-k // 8), -(-k // min(k_group, k))
  planes = rng.integers(0, 256, (q, c, n)).astype(np.uint8)
  if k % 8:  # padding rows past K hold sign bit 0, as formats.pack writes them
    planes[:, -1] &= np.uint8((1 << (k % 8)) - 1)
  alpha = rng.uniform(0.05, 1.0, (q, groups, n)).astype(np.float32)
  offset = rng.normal(size=(groups, n)).astype(np.float32) if with_offset else None
  return planes, alpha, offset


def _numpy_weight(planes, alpha, offset, k, k_group):
  q, c, n = planes.shape
  bits = np.unpackbits(planes[:, :, None, :], axis=2, bitorder="little").reshape(q, c * 8, n)[:, :k]
  g = np.arange(k) // min(k_group, k)
  w = np.sum(alpha.astype(np.float64)[:, g] * (2.0 * bits - 1.0), axis=0)
  if offset is not None:
    w = w + offset.astype(np.float64)[g]
  return w


def _check(y, ref, rtol):
  y = np.asarray(y, np.float64)
  assert y.shape == ref.shape and np.all(np.isfinite(y))
  np.testing.assert_allclose(y, ref, rtol=rtol, atol=rtol * np.abs(ref).max())


def test_lut_build_matches_all_signed_sums():
  rng = _rng("lut")
  x = rng.standard_normal((3, 37)).astype(np.float32)  # K not a multiple of 8: zero padding
  lut = np.asarray(lg.build_lut(jnp.asarray(x), interpret=True), np.float64)
  assert lut.shape == (3, 5, 256)
  x3 = np.pad(x.astype(np.float64), ((0, 0), (0, 3))).reshape(3, 5, 8)
  signs = 2.0 * ((np.arange(256)[None, :] >> np.arange(8)[:, None]) & 1) - 1.0
  np.testing.assert_allclose(lut, np.einsum("mcj,jb->mcb", x3, signs), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(lut[..., 255], x3.sum(-1), rtol=1e-5, atol=1e-5)  # the group sums come from here
  np.testing.assert_allclose(lut[..., 0], -x3.sum(-1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(lg.lut_reference(jnp.asarray(x))), lut, rtol=1e-5, atol=1e-5)


CASES = [
    # m, k, n, k_group, q, offset, method
    (1, 576, 40, 128, 3, True, "lut"),      # SmolLM2 width: shorter last group, LUT at batch 1
    (1, 576, 40, 128, 3, True, "decode"),
    (3, 200, 33, 96, 2, True, "lut"),       # 96 = 8*12: tile of 4 bytes inside groups
    (2, 300, 24, 24, 4, True, "lut"),       # 24 = 8*3: tiles span groups -> per-chunk alpha gathers
    (5, 200, 33, 100, 2, True, "decode"),   # k_group not a multiple of 8: per-row alpha gathers
    (16, 256, 64, 256, 1, False, "lut"),    # per-channel, one plane
    (20, 576, 64, 128, 4, False, "decode"),
    (64, 136, 20, 64, 2, True, "lut"),      # batch 64 still through lookup tables when asked
    (64, 136, 20, 64, 2, True, "decode"),
    (70, 96, 130, 32, 3, True, "auto"),
]


@pytest.mark.parametrize("m,k,n,k_group,q,with_offset,method", CASES)
def test_matches_float64_dequantize_then_dot(m, k, n, k_group, q, with_offset, method):
  rng = _rng("gemm", m, k, n, k_group, q, with_offset, method)
  planes, alpha, offset = _bcq(rng, q, k, n, k_group, with_offset)
  x = rng.standard_normal((m, k)).astype(np.float32)
  bias = rng.standard_normal(n).astype(np.float32)
  y = lg.lut_gemm(jnp.asarray(x), jnp.asarray(planes), jnp.asarray(alpha),
                  None if offset is None else jnp.asarray(offset), k_group=k_group, bias=jnp.asarray(bias),
                  method=method, interpret=True)
  assert y.dtype == jnp.float32
  ref = x.astype(np.float64) @ _numpy_weight(planes, alpha, offset, k, k_group) + bias
  _check(y, ref, 1e-5)


def test_split_k_and_leading_dims():
  rng = _rng("split")
  k, n, kg = 512, 48, 64
  planes, alpha, offset = _bcq(rng, 3, k, n, kg, True)
  x = rng.standard_normal((2, 3, k)).astype(np.float32)
  ref = x.astype(np.float64) @ _numpy_weight(planes, alpha, offset, k, kg)
  for method, block in (("lut", lg.Blocks(4, 16, 8, 3, True, 4, 2)), ("decode", lg.Blocks(16, 16, 4, 5, True, 4, 2))):
    y = lg.lut_gemm(jnp.asarray(x), jnp.asarray(planes), jnp.asarray(alpha), jnp.asarray(offset), k_group=kg,
                    method=method, interpret=True, block=block)
    assert y.shape == (2, 3, n)
    _check(y, ref, 1e-5)


@pytest.mark.parametrize("method", ["lut", "decode"])
def test_bf16_activations_and_output(method):
  rng = _rng("bf16", method)
  k, n, kg = 256, 32, 128
  planes, alpha, offset = _bcq(rng, 4, k, n, kg, True)
  alpha, offset = alpha.astype(np.float16), offset.astype(np.float16)  # stored half-precision metadata
  x = jnp.asarray(rng.standard_normal((4, k)), jnp.bfloat16)
  y = lg.lut_gemm(x, jnp.asarray(planes), jnp.asarray(alpha), jnp.asarray(offset), k_group=kg, method=method,
                  out_dtype=jnp.bfloat16, interpret=True)
  assert y.dtype == jnp.bfloat16
  ref = np.asarray(x, np.float64) @ _numpy_weight(planes, alpha, offset, k, kg)
  _check(y, ref, 2e-2)  # decode rounds the weight tile to bf16 for the dot, and the output is bf16


@pytest.mark.parametrize("bits,symmetric", [(4, True), (3, False), (2, True)])
def test_uniform_weights_through_bcq(bits, symmetric):
  """Uniform q-bit group-wise weights, converted exactly to BCQ, give x @ dequantize()."""
  rng = _rng("uniform", bits, symmetric)
  w = jnp.asarray(rng.standard_normal((576, 24)), jnp.float32)
  qa = quantize_weight(w, WeightQuant(bits, symmetric, "group", 128))
  bcq = formats.uniform_to_bcq(qa)
  x = rng.standard_normal((3, 576)).astype(np.float32)
  ref = x.astype(np.float64) @ np.asarray(qa.dequantize(jnp.float32), np.float64)
  for method in ("lut", "decode"):
    _check(lg.bcq_matmul(jnp.asarray(x), bcq, method=method, interpret=True), ref, 1e-5)


def test_auto_switches_strategy_with_batch():
  assert lg.choose_method(1, 4096, 128) == "lut"
  assert lg.choose_method(lg.LUT_MAX_M, 4096, 128) == "lut"
  assert lg.choose_method(lg.LUT_MAX_M + 1, 4096, 128) == "decode"
  assert lg.choose_method(1, 4096, 100) == "decode"  # a byte of signs would straddle two groups
  for m in (1, 16, 64, 256, 4096):
    for method in ("lut", "decode"):
      b = lg.block_sizes(method, m, 4096, 4096, 128)
      assert all(backend.is_pow2(v) for v in (b.bm, b.bn, b.bc)) and b.grouped and 128 % (8 * b.bc) == 0


@pytest.mark.parametrize("m,k,n,k_group", [(1, 576, 40, 128), (3, 200, 33, 96), (2, 300, 24, 24), (70, 96, 130, 32),
                                           (5, 200, 33, 100)])
def test_gather_indices_stay_in_range(m, k, n, k_group):
  """interpret mode clamps out-of-range gathers silently: replay the kernel's index arithmetic on every tile
  and check that every unmasked lane reads inside the table (bytes 0..255, rows < M, chunks < C)."""
  c, groups = -(-k // 8), -(-k // k_group)
  b = lg.block_sizes("lut", m, n, k, k_group)
  size = m * c * 256
  planes = _rng("idx", m, k, n).integers(0, 256, (c, n)).astype(np.uint8)
  byte_seen = set()
  for pm in range(-(-m // b.bm)):
    rows = pm * b.bm + np.arange(b.bm)
    for t in range(-(-c // b.bc)):
      chunks = t * b.bc + np.arange(b.bc)
      for pn in range(-(-n // b.bn)):
        cols = pn * b.bn + np.arange(b.bn)
        ok = (rows[:, None, None] < m) & (chunks[None, :, None] < c) & (cols[None, None, :] < n)
        byte = planes[np.minimum(chunks, c - 1)][:, np.minimum(cols, n - 1)].astype(np.int64)
        assert byte.min() >= 0 and byte.max() <= 255
        byte_seen.update(np.unique(byte).tolist())
        idx = np.asarray(lg.lut_index(rows[:, None, None], chunks[None, :, None], byte[None], c))
        assert np.all((idx[ok] >= 0) & (idx[ok] < size))
        sums = np.asarray(lg.lut_index(rows[:, None], chunks[None, :], 255, c))
        assert np.all(sums[ok[:, :, 0]] < size)
        if not b.grouped:  # per-chunk alpha/offset gathers, masked by chunk and column
          g_of = np.minimum(chunks[:, None] * 8 // k_group, groups - 1)
          a_idx = g_of * n + cols[None, :]
          a_ok = (chunks[:, None] < c) & (cols[None, :] < n)
          assert np.all((a_idx[a_ok] >= 0) & (a_idx[a_ok] < groups * n))
  assert len(byte_seen) > 64  # the table really is indexed all over
  # the decode strategy's per-row alpha gathers (tiles that span groups), masked by column only
  d = lg.block_sizes("decode", m, n, k, k_group)
  if not d.grouped:
    for t in range(-(-c // d.bc)):
      ks = t * 8 * d.bc + np.arange(8 * d.bc)
      g_of = np.minimum(ks[:, None] // k_group, groups - 1)
      for pn in range(-(-n // d.bn)):
        cols = pn * d.bn + np.arange(d.bn)
        a_idx = (g_of * n + cols[None, :])[:, cols < n]
        assert np.all((a_idx >= 0) & (a_idx < groups * n))


def _args(k=64, n=16, q=2, k_group=32):
  groups = -(-k // k_group)
  return (jnp.ones((2, k), jnp.float32), jnp.zeros((q, k // 8, n), jnp.uint8), jnp.ones((q, groups, n), jnp.float32),
          jnp.zeros((groups, n), jnp.float32))


@pytest.mark.parametrize("change,message", [
    (lambda a, kw: ((a[0].astype(jnp.int8),) + a[1:], kw), r"x: unsupported dtype int8"),
    (lambda a, kw: ((a[0], a[1].astype(jnp.int8)) + a[2:], kw), r"planes: expected a \(q, ceil\(K/8\), N\) uint8"),
    (lambda a, kw: ((a[0], jnp.zeros((5, 8, 16), jnp.uint8), jnp.ones((5, 2, 16))) + a[3:], kw),
     r"planes: unsupported bits q=5"),
    (lambda a, kw: ((a[0], jnp.zeros((2, 9, 16), jnp.uint8)) + a[2:], kw), r"expected 8 rows of packed signs for K=64"),
    (lambda a, kw: (a[:2] + (jnp.ones((2, 3, 16)),) + a[3:], kw), r"alpha: expected shape \(2, 2, 16\)"),
    (lambda a, kw: (a[:3] + (jnp.ones((2, 15)),), kw), r"offset: expected shape \(2, 16\)"),
    (lambda a, kw: (a, dict(kw, k_group=0)), r"k_group: must be a positive int"),
    (lambda a, kw: (a, dict(kw, method="fast")), r"method: unknown 'fast'"),
    (lambda a, kw: (a[:2] + (jnp.ones((2, 7, 16)), jnp.ones((7, 16))), dict(kw, k_group=10, method="lut")),
     r"method 'lut' needs k_group % 8 == 0"),
    (lambda a, kw: (a, dict(kw, bias=jnp.ones((15,)))), r"bias: expected shape \(16,\)"),
    (lambda a, kw: (a, dict(kw, out_dtype=jnp.int32)), r"out_dtype: unsupported dtype int32"),
    (lambda a, kw: (a, dict(kw, block=lg.Blocks(3, 16, 2, 1, True, 4, 2))), r"block.bm=3: must be a power of two"),
])
def test_bad_inputs(change, message):
  args, kwargs = change(_args(), {"k_group": 32, "interpret": True})
  with pytest.raises(ValueError, match=message):
    lg.lut_gemm(*args, **kwargs)


def test_bcq_matmul_checks_features():
  planes, alpha, offset = _bcq(_rng("bcq"), 2, 64, 8, 32, True)
  w = formats.BCQArray(planes=jnp.asarray(planes), alpha=jnp.asarray(alpha), offset=jnp.asarray(offset),
                       shape=(64, 8), k_group=32)
  with pytest.raises(ValueError, match=r"x has 63 features but the weight expects K=64"):
    lg.bcq_matmul(jnp.ones((1, 63)), w)
