"""Quantized array formats: pytrees whose leaves are the bytes that are really stored.

`QArray` holds a 2-D weight of logical shape (K, N) (Flax kernel layout: inputs x outputs) as unsigned
b-bit codes packed along K, plus float scales (and zero points for asymmetric quantization) on a grid of
groups. One group is a block of `k_group` consecutive rows by `n_group` consecutive columns:

  per-tensor          k_group = K, n_group = N      scale (1, 1)
  per-channel         k_group = K, n_group = 1      scale (1, N)
  group-wise along K  k_group = g, n_group = 1      scale (ceil(K/g), N)   (the modern convention)
  ZeroQuant row-block k_group = K, n_group = g      scale (1, ceil(N/g))   (groups of whole output rows)

Where g does not divide the dimension, the last group is shorter: the group size the user asked for is kept
and the result stays exact (no silent switch to another group size, no group crossing a row).

Packing: 8-bit codes are stored one a byte. For b in 1..7, every run of 8 consecutive codes along K
becomes one (8*b)-bit little-endian word split into b bytes, so 4-bit is two codes a byte (low nibble first),
2-bit four a byte, 3-bit eight codes in three bytes and 6-bit eight codes in six bytes. K is padded with code 0
to a multiple of 8 and the padding is cut off again on unpacking. (Words of more than 32 bits, b in 5..7, are
built bit by bit, since JAX has no 64-bit integers by default; the layout is the same little-endian word.)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_BITS = (2, 3, 4, 6, 8)


def _register(cls, data_fields, meta_fields):
  return jax.tree_util.register_dataclass(cls, data_fields=data_fields, meta_fields=meta_fields)


@dataclasses.dataclass(frozen=True)
class ActQuant:
  """How the activations entering a quantized linear are quantized.

  mode "token":  one dynamic scale per token (row of x), absmax / (2^(bits-1) - 1); `scale` is None.
  mode "token_group": one dynamic scale per token and per K-group of the weight (weights grouped along K).
  mode "tensor": one static scale for the whole tensor, calibrated beforehand; `scale` is a () float32.
  Activations are symmetric signed integers of `bits` bits, except in mode "tensor" with a `zero`: then they are
  asymmetric, unsigned codes u = clip(round(x / scale) + zero, 0, 2^bits - 1) standing for scale * (u - zero),
  `zero` a () float32 holding an integer (RepQuant's layer-wise (s~, z~) after reparameterization).
  """

  bits: int
  mode: str
  scale: jax.Array | None = None
  zero: jax.Array | None = None

  @property
  def symmetric(self) -> bool:
    return self.zero is None


_register(ActQuant, data_fields=["scale", "zero"], meta_fields=["bits", "mode"])


@dataclasses.dataclass(frozen=True)
class QArray:
  """A uniformly quantized (K, N) weight.

  packed: uint8 codes. bits == 8: (K, N). bits < 8: (ceil(K/8) * bits, N).
  scale:  (ceil(K/k_group), ceil(N/n_group)) float.
  zero:   same shape as scale, float holding integer values (asymmetric), or None (symmetric).
  activation: an ActQuant when the linear also quantizes its input (W8A8), else None (weight-only).

  Code u (unsigned, 0..2^bits-1) decodes to value (u - offset) * scale where offset is 2^(bits-1) for
  symmetric and the zero point for asymmetric quantization.
  """

  packed: jax.Array
  scale: jax.Array
  zero: jax.Array | None
  activation: ActQuant | None
  shape: tuple[int, int]
  bits: int
  k_group: int
  n_group: int

  @property
  def symmetric(self) -> bool:
    return self.zero is None

  @property
  def ndim(self) -> int:
    return 2

  @property
  def nbytes(self) -> int:
    """Bytes really stored: packed codes, scales, zero points and static activation scales."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(self):
      total += int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
    return total

  def codes(self) -> jax.Array:
    """Unpacked unsigned codes, (K, N) uint8."""
    return unpack(self.packed, self.bits, self.shape[0])

  def int_values(self) -> jax.Array:
    """Signed integer values (codes minus offset) of a symmetric QArray, (K, N) int8."""
    if not self.symmetric:
      raise ValueError("int_values() needs a symmetric QArray; an asymmetric one has per-group zero points")
    offset = 1 << (self.bits - 1)
    return (self.codes().astype(jnp.int16) - offset).astype(jnp.int8)

  def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
    """The float (K, N) weight the codes stand for."""
    codes = self.codes().astype(jnp.float32)
    scale = expand_groups(self.scale.astype(jnp.float32), self.shape, self.k_group, self.n_group)
    if self.zero is None:
      offset = jnp.float32(1 << (self.bits - 1))
    else:
      offset = expand_groups(self.zero.astype(jnp.float32), self.shape, self.k_group, self.n_group)
    return ((codes - offset) * scale).astype(dtype)


_register(
    QArray,
    data_fields=["packed", "scale", "zero", "activation"],
    meta_fields=["shape", "bits", "k_group", "n_group"],
)


def group_grid(shape: tuple[int, int], k_group: int, n_group: int) -> tuple[int, int]:
  """Number of groups along K and along N."""
  return math.ceil(shape[0] / k_group), math.ceil(shape[1] / n_group)


def expand_groups(values: jax.Array, shape: tuple[int, int], k_group: int, n_group: int) -> jax.Array:
  """(groups_k, groups_n) -> (K, N) by repeating each group's value over its block; the last block may be short."""
  rows = jnp.repeat(values, k_group, axis=0, total_repeat_length=values.shape[0] * k_group)[: shape[0]]
  return jnp.repeat(rows, n_group, axis=1, total_repeat_length=values.shape[1] * n_group)[:, : shape[1]]


def packed_rows(k: int, bits: int) -> int:
  """Rows of the packed array for K logical rows."""
  if bits == 8:
    return k
  return math.ceil(k / 8) * bits


PACK_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def pack(codes: jax.Array, bits: int) -> jax.Array:
  """(K, N) unsigned codes < 2^bits -> packed uint8 along K (see the module docstring)."""
  check_bits(bits, allowed=PACK_BITS)
  codes = codes.astype(jnp.uint32)
  if bits == 8:
    return codes.astype(jnp.uint8)
  if bits > 4:
    return _pack_bitwise(codes, bits)
  k, n = codes.shape
  padded = math.ceil(k / 8) * 8
  codes = jnp.pad(codes, ((0, padded - k), (0, 0))).reshape(padded // 8, 8, n)
  shifts = (jnp.arange(8, dtype=jnp.uint32) * jnp.uint32(bits))[None, :, None]
  words = jnp.sum(codes << shifts, axis=1, dtype=jnp.uint32)  # (K/8, N), 8*bits bits used
  byte_shifts = (jnp.arange(bits, dtype=jnp.uint32) * jnp.uint32(8))[None, :, None]
  packed = (words[:, None, :] >> byte_shifts) & jnp.uint32(0xFF)  # (K/8, bits, N)
  return packed.reshape(padded // 8 * bits, n).astype(jnp.uint8)


def _pack_bitwise(codes: jax.Array, bits: int) -> jax.Array:
  """pack() for words wider than 32 bits: split every code into its bits, regroup the 8*bits bits of each run of
  8 codes into bytes. Bit j of code i lands at bit i*bits + j of the little-endian word, as in pack()."""
  k, n = codes.shape
  padded = math.ceil(k / 8) * 8
  codes = jnp.pad(codes, ((0, padded - k), (0, 0))).reshape(padded // 8, 8, 1, n)
  bit_index = jnp.arange(bits, dtype=jnp.uint32)[None, None, :, None]
  stream = ((codes >> bit_index) & jnp.uint32(1)).reshape(padded // 8, bits, 8, n)  # word bit 8*byte + j
  weights = (jnp.uint32(1) << jnp.arange(8, dtype=jnp.uint32))[None, None, :, None]
  packed = jnp.sum(stream * weights, axis=2, dtype=jnp.uint32)  # (K/8, bits, N)
  return packed.reshape(padded // 8 * bits, n).astype(jnp.uint8)


def _unpack_bitwise(packed: jax.Array, bits: int, k: int) -> jax.Array:
  rows, n = packed.shape
  chunks = packed.astype(jnp.uint32).reshape(rows // bits, bits, 1, n)
  stream = (chunks >> jnp.arange(8, dtype=jnp.uint32)[None, None, :, None]) & jnp.uint32(1)
  stream = stream.reshape(rows // bits, 8, bits, n)  # (word, code i, bit j of the code)
  weights = (jnp.uint32(1) << jnp.arange(bits, dtype=jnp.uint32))[None, None, :, None]
  codes = jnp.sum(stream * weights, axis=2, dtype=jnp.uint32)  # (K/8, 8, N)
  return codes.reshape(rows // bits * 8, n)[:k].astype(jnp.uint8)


def unpack(packed: jax.Array, bits: int, k: int) -> jax.Array:
  """Inverse of pack: packed uint8 -> (K, N) uint8 codes."""
  if bits == 8:
    return packed.astype(jnp.uint8)
  rows, n = packed.shape
  if rows % bits:
    raise ValueError(f"packed array has {rows} rows, not a multiple of bits={bits}")
  if bits > 4:
    return _unpack_bitwise(packed, bits, k)
  chunks = packed.astype(jnp.uint32).reshape(rows // bits, bits, n)
  byte_shifts = (jnp.arange(bits, dtype=jnp.uint32) * jnp.uint32(8))[None, :, None]
  words = jnp.sum(chunks << byte_shifts, axis=1, dtype=jnp.uint32)  # (K/8, N)
  shifts = (jnp.arange(8, dtype=jnp.uint32) * jnp.uint32(bits))[None, :, None]
  mask = jnp.uint32((1 << bits) - 1)
  codes = (words[:, None, :] >> shifts) & mask  # (K/8, 8, N)
  return codes.reshape(rows // bits * 8, n)[:k].astype(jnp.uint8)


def check_bits(bits: int, allowed: tuple[int, ...] = SUPPORTED_BITS, where: str = "") -> None:
  if bits not in allowed:
    place = f" for {where}" if where else ""
    raise ValueError(f"unsupported bits={bits}{place}: choose one of {allowed}")


def is_qarray(x: Any) -> bool:
  return isinstance(x, (QArray, BCQArray))


def tree_nbytes(tree: Any) -> int:
  """Stored bytes of a pytree: QArrays count their packed storage, other arrays their own bytes."""
  total = 0
  for leaf in jax.tree_util.tree_leaves(tree, is_leaf=is_qarray):
    if isinstance(leaf, (QArray, BCQArray)):
      total += leaf.nbytes
    elif hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
      total += int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
  return total


@dataclasses.dataclass(frozen=True)
class BCQArray:
  """A (K, N) weight in binary-coding form: W ~ sum_i alpha_i * B_i (+ offset), B_i in {-1, +1}.

  planes: (q, ceil(K/8), N) uint8; bit j of planes[i, r, n] is plane i's sign at row k = 8*r + j
          (1 -> +1, 0 -> -1); the same little-endian layout as `pack(bits=1)`; padding rows are 0.
  alpha:  (q, ceil(K/k_group), N) float, one per (plane, group along K, output column).
  offset: (ceil(K/k_group), N) float or None; a uniform q-bit weight is BCQ with alpha_i = (s/2) * 2^i and
          offset = s * ((2^q - 1)/2 - zero).
  """

  planes: jax.Array
  alpha: jax.Array
  offset: jax.Array | None
  shape: tuple[int, int]
  k_group: int

  @property
  def bits(self) -> int:
    return int(self.planes.shape[0])

  @property
  def nbytes(self) -> int:
    return sum(int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
               for leaf in jax.tree_util.tree_leaves(self))

  def signs(self) -> jax.Array:
    """(q, K, N) float32 of +-1."""
    bits = jax.vmap(lambda p: unpack(p, 1, self.shape[0]))(self.planes)
    return bits.astype(jnp.float32) * 2.0 - 1.0

  def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
    alpha = jax.vmap(lambda a: expand_groups(a, self.shape, self.k_group, 1))(self.alpha.astype(jnp.float32))
    w = jnp.sum(alpha * self.signs(), axis=0)
    if self.offset is not None:
      w = w + expand_groups(self.offset.astype(jnp.float32), self.shape, self.k_group, 1)
    return w.astype(dtype)


_register(BCQArray, data_fields=["planes", "alpha", "offset"], meta_fields=["shape", "k_group"])


def uniform_to_bcq(q: QArray) -> BCQArray:
  """Exact conversion of a group-wise (n_group == 1) uniform QArray to BCQ with offset.

  code u = sum_i 2^i b_i with b_i in {0, 1}; b_i = (B_i + 1)/2 gives
  s * (u - z) = sum_i (s * 2^(i-1)) * B_i + s * ((2^q - 1)/2 - z).
  """
  if q.n_group != 1:
    raise ValueError(f"uniform_to_bcq needs one scale per output column (n_group=1), got n_group={q.n_group}")
  if q.bits > 4:
    raise ValueError(f"uniform_to_bcq supports 1..4 bits, got {q.bits}")
  codes = q.codes().astype(jnp.uint32)
  planes = jnp.stack([pack((codes >> jnp.uint32(i)) & jnp.uint32(1), 1) for i in range(q.bits)])
  scale = q.scale.astype(jnp.float32)
  alpha = jnp.stack([scale * (2.0 ** (i - 1)) for i in range(q.bits)])
  zero = jnp.float32(1 << (q.bits - 1)) if q.zero is None else q.zero.astype(jnp.float32)
  offset = scale * (jnp.float32(((1 << q.bits) - 1) / 2) - zero)
  return BCQArray(planes=planes, alpha=alpha, offset=offset, shape=q.shape, k_group=q.k_group)
