import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import numpy_ref
from jaxquant import formats
from jaxquant.quantizers import WeightQuant, quantize_weight


def _numpy_pack(codes: np.ndarray, bits: int) -> np.ndarray:
  """Independent reference: a little-endian bit stream along the last axis, 8 codes (8*bits bits) a word."""
  n, k = codes.shape
  padded = -(-k // 8) * 8
  stream = np.zeros((n, padded * bits), np.uint8)
  for i in range(k):
    for j in range(bits):
      stream[:, i * bits + j] = (codes[:, i] >> j) & 1
  return np.packbits(stream, axis=1, bitorder="little")


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7])
@pytest.mark.parametrize("k", [1, 7, 8, 37, 576])
def test_pack_matches_a_numpy_bit_stream_and_round_trips(bits, k):
  rng = np.random.default_rng(bits * 1000 + k)
  codes = rng.integers(0, 2**bits, (5, k)).astype(np.uint8)
  packed = formats.pack(jnp.asarray(codes), bits)
  assert packed.dtype == jnp.uint8 and packed.shape == (5, formats.packed_len(k, bits))
  np.testing.assert_array_equal(np.asarray(packed), _numpy_pack(codes, bits))
  np.testing.assert_array_equal(np.asarray(formats.unpack(packed, bits, k, signed=False)), codes)
  signed = codes.astype(np.int16) - np.where(codes >= 2 ** (bits - 1), 2**bits, 0)
  np.testing.assert_array_equal(np.asarray(formats.unpack(packed, bits, k)), signed)


@st.composite
def _codes(draw):
  """(bits, signed codes of any leading shape and any K) for every packable bit width."""
  bits = draw(st.integers(1, 8))
  shape = tuple(draw(st.lists(st.integers(1, 3), max_size=2))) + (draw(st.integers(1, 70)),)
  low = -(1 << (bits - 1))
  return bits, draw(hnp.arrays(np.int32, shape, elements=st.integers(low, -low - 1)))


@settings(max_examples=40, deadline=None)
@given(_codes())
def test_pack_matches_the_numpy_bit_stream_for_any_shape(case):
  """Property: for every bit width 1..8 and any shape, pack() gives numpy_ref.pack's bytes (a bit stream written
  from docs/formats.md), unpack() inverts it (signed and raw), and signed values pack like their raw codes."""
  bits, values = case
  k = values.shape[-1]
  packed = np.asarray(formats.pack(jnp.asarray(values), bits))
  expected = numpy_ref.pack(values, bits)
  assert packed.dtype == expected.dtype == (np.int8 if bits == 8 else np.uint8)
  assert packed.shape == values.shape[:-1] + (formats.packed_len(k, bits),)
  np.testing.assert_array_equal(packed, expected)
  np.testing.assert_array_equal(np.asarray(formats.unpack(jnp.asarray(packed), bits, k)), values)
  raw = values & ((1 << bits) - 1)
  np.testing.assert_array_equal(np.asarray(formats.unpack(jnp.asarray(packed), bits, k, signed=False)), raw)
  np.testing.assert_array_equal(numpy_ref.unpack(packed, bits, k), values)
  if bits < 8:
    np.testing.assert_array_equal(np.asarray(formats.pack(jnp.asarray(raw), bits)), packed)


def test_eight_bit_values_are_stored_as_int8():
  values = jnp.asarray([[-128, -1, 0, 127]], jnp.int32)
  packed = formats.pack(values, 8)
  assert packed.dtype == jnp.int8
  np.testing.assert_array_equal(np.asarray(formats.unpack(packed, 8, 4)), [[-128, -1, 0, 127]])


def test_four_bit_is_two_codes_a_byte_low_nibble_first():
  codes = jnp.asarray([[1, 2, 3, 4, 5, 6, 7, 8]], jnp.uint8)
  packed = np.asarray(formats.pack(codes, 4))[0]
  np.testing.assert_array_equal(packed, [0x21, 0x43, 0x65, 0x87])


def test_four_bit_bytes_are_xla_int4_bytes():
  """Signed 4-bit values pack into the bytes of an int4 array (low nibble first), so kernels and XLA can read the
  stored bytes as int4 without a copy."""
  values = np.random.default_rng(0).integers(-8, 8, (3, 16)).astype(np.int8)
  packed = np.asarray(formats.pack(jnp.asarray(values), 4))
  as_int4 = jax.lax.bitcast_convert_type(jnp.asarray(packed), jnp.int4).reshape(3, 16)
  np.testing.assert_array_equal(np.asarray(as_int4.astype(jnp.int8)), values)


def test_codes_are_stored_k_contiguous_per_output_channel():
  """The stored (N, K) layout: row n of `packed` holds output column n's codes along K."""
  w = jnp.asarray(np.random.default_rng(3).standard_normal((24, 5)), jnp.float32)
  q = quantize_weight(w, WeightQuant(bits=8, granularity="channel"))
  assert q.packed.shape == (5, 24) and q.packed.dtype == jnp.int8
  expected = np.clip(np.round(np.asarray(w) / np.asarray(q.scale)), -127, 127).T
  np.testing.assert_array_equal(np.asarray(q.packed), expected)


@pytest.mark.parametrize("bits,ratio", [(8, 1 / 4), (4, 1 / 8), (3, 3 / 32), (2, 1 / 16)])
def test_stored_bytes_follow_the_bits(bits, ratio):
  rng = np.random.default_rng(bits)
  w = jnp.asarray(rng.standard_normal((576, 1536)), jnp.float32)
  q = quantize_weight(w, WeightQuant(bits=bits, granularity="channel"))
  # Counted from the arrays really held, not from the config.
  held = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(q))
  assert q.nbytes == held
  assert q.packed.nbytes == pytest.approx(w.nbytes * ratio, rel=0.01)
  assert q.nbytes == pytest.approx(w.nbytes * ratio + 1536 * 4, rel=0.01)


def test_qarray_is_a_pytree_that_jits():
  w = jnp.asarray(np.random.default_rng(0).standard_normal((40, 24)), jnp.float32)
  q = quantize_weight(w, WeightQuant(bits=4, group_size=16))
  leaves, treedef = jax.tree_util.tree_flatten(q)
  rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
  assert (rebuilt.shape, rebuilt.bits, rebuilt.k_group) == (q.shape, q.bits, q.k_group)
  out = jax.jit(lambda qa: qa.dequantize())(q)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(q.dequantize()))


def test_short_last_group_keeps_the_requested_group_size():
  w = jnp.asarray(np.random.default_rng(1).standard_normal((576, 8)), jnp.float32)
  q = quantize_weight(w, WeightQuant(bits=4, granularity="group", group_size=128))
  assert q.k_group == 128 and q.scale.shape == (5, 8)  # 4 full groups and one of 64
  # The last group's scale comes from its own 64 rows only.
  last = np.abs(np.asarray(w)[512:]).max(axis=0) / 7
  np.testing.assert_allclose(np.asarray(q.scale[4]), last, rtol=1e-6)


def test_expand_groups_row_blocks():
  values = jnp.asarray([[1.0, 2.0, 3.0]])
  full = formats.expand_groups(values, (2, 7), 2, 3)
  np.testing.assert_array_equal(np.asarray(full[0]), [1, 1, 1, 2, 2, 2, 3])


def test_check_bits_names_the_choice():
  with pytest.raises(ValueError, match=r"unsupported bits=5.*\(2, 3, 4, 6, 8\)"):
    formats.check_bits(5)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_uniform_converts_exactly_to_bcq_with_offset(bits, symmetric):
  w = jnp.asarray(np.random.default_rng(bits).standard_normal((576, 24)), jnp.float32)
  q = quantize_weight(w, WeightQuant(bits, symmetric, "group", 128))
  bcq = formats.uniform_to_bcq(q)
  assert bcq.planes.shape == (bits, 24, 72) and bcq.alpha.shape == (bits, 5, 24)
  np.testing.assert_allclose(np.asarray(bcq.dequantize()), np.asarray(q.dequantize()), rtol=1e-6, atol=1e-6)


def _v1_qarray(w: np.ndarray, bits: int, symmetric: bool, k_group: int):
  """A QArray as weight format 1 stored it, built with numpy alone: unsigned codes u packed along K, (K, N)-major."""
  k, n = w.shape
  groups = -(-k // k_group)
  pad = groups * k_group - k
  blocks = np.pad(w, ((0, pad), (0, 0)), mode="edge").reshape(groups, k_group, n)
  half, levels = 2 ** (bits - 1), 2**bits - 1
  if symmetric:
    scale = np.maximum(np.abs(blocks).max(axis=1), 1e-8) / (half - 1)
    zero_u = np.full_like(scale, half)
  else:
    low, high = np.minimum(blocks.min(axis=1), 0), np.maximum(blocks.max(axis=1), 0)
    scale = (high - low) / levels
    zero_u = np.clip(np.round(-low / scale), 0, levels)
  full = lambda a: np.repeat(a, k_group, axis=0)[:k]
  u = np.clip(np.round(w / full(scale)) + full(zero_u), 0, levels).astype(np.uint8)  # (K, N)
  packed = u if bits == 8 else _numpy_pack(u.T, bits).T  # v1: the same words, K along axis 0
  return formats.QArray(packed=jnp.asarray(packed), scale=jnp.asarray(scale, jnp.float32),
                        zero=None if symmetric else jnp.asarray(zero_u, jnp.float32), activation=None,
                        shape=(k, n), bits=bits, k_group=k_group, n_group=1), (u - full(zero_u)) * full(scale)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_weight_format_1_converts_exactly(bits, symmetric):
  w = np.random.default_rng(bits).standard_normal((44, 6)).astype(np.float32)
  old, expected = _v1_qarray(w, bits, symmetric, k_group=16)
  new = formats.from_v1(old)
  assert new.packed.shape == (6, formats.packed_len(44, bits))
  np.testing.assert_allclose(np.asarray(new.dequantize()), expected, rtol=1e-6, atol=1e-6)


def test_weight_format_1_bcq_planes_transpose():
  signs = np.random.default_rng(5).random((3, 20, 7)) > 0.5  # (q, K, N)
  v1_planes = np.stack([_numpy_pack(s.T.astype(np.uint8), 1).T for s in signs])  # (q, ceil(K/8), N)
  alpha = jnp.ones((3, 1, 7), jnp.float32) * jnp.asarray([1.0, 0.5, 0.25])[:, None, None]
  old = formats.BCQArray(planes=jnp.asarray(v1_planes), alpha=alpha, offset=None, shape=(20, 7), k_group=20)
  new = formats.from_v1(old)
  expected = np.sum(np.asarray(alpha) * np.where(signs, 1.0, -1.0), axis=0)
  np.testing.assert_allclose(np.asarray(new.dequantize()), expected, rtol=1e-6)
