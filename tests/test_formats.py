import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant import formats
from jaxquant.quantizers import WeightQuant, quantize_weight


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("k", [1, 7, 8, 37, 576])
def test_pack_roundtrip_exact(bits, k):
  rng = np.random.default_rng(bits * 1000 + k)
  codes = rng.integers(0, 2**bits, (k, 5)).astype(np.uint8)
  packed = formats.pack(jnp.asarray(codes), bits)
  assert packed.dtype == jnp.uint8
  assert packed.shape == (formats.packed_rows(k, bits), 5)
  np.testing.assert_array_equal(np.asarray(formats.unpack(packed, bits, k)), codes)


def test_four_bit_is_two_codes_a_byte_low_nibble_first():
  codes = jnp.asarray([[1], [2], [3], [4], [5], [6], [7], [8]], jnp.uint8)
  packed = np.asarray(formats.pack(codes, 4))[:, 0]
  np.testing.assert_array_equal(packed, [0x21, 0x43, 0x65, 0x87])


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
  assert bcq.planes.shape == (bits, 72, 24) and bcq.alpha.shape == (bits, 5, 24)
  np.testing.assert_allclose(np.asarray(bcq.dequantize()), np.asarray(q.dequantize()), rtol=1e-6, atol=1e-6)
