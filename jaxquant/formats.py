"""Quantized array formats: pytrees whose leaves are the bytes that are really stored.

A weight has the logical shape (K, N) (Flax kernel layout: y = x @ W), but its integer codes are stored K-contiguous
per output channel, (N, K)-major: this is what int8 tensor cores read without a transpose (cuBLASLt's int8 GEMM
and Hopper's int8 wgmma both want K contiguous; see docs/formats.md). Scales, zero points and BCQ alphas keep the
logical (K-groups, N-groups) grid.

`QArray` (uniform) stores signed b-bit two's-complement values v and float scales (and zero points for asymmetric
quantization) on a grid of groups; W[k, n] = (v[n, k] - zero[g, h]) * scale[g, h] with zero = 0 when symmetric.
One group is a block of `k_group` consecutive inputs by `n_group` consecutive outputs:

  per-tensor          k_group = K, n_group = N      scale (1, 1)
  per-channel         k_group = K, n_group = 1      scale (1, N)
  group-wise along K  k_group = g, n_group = 1      scale (ceil(K/g), N)   (the modern convention)
  ZeroQuant row-block k_group = K, n_group = g      scale (1, ceil(N/g))   (groups of whole output rows)

Where g does not divide the dimension, the last group is shorter (no silent switch to another group size).

Packing (along the last axis, K): 8-bit values are stored as int8, one a byte. For b in 1..7 every run of 8
consecutive codes becomes one (8*b)-bit little-endian word split into b bytes (uint8): 4-bit is two codes a byte,
low nibble first (the bytes of an int4 array as XLA and ml_dtypes pack it), 2-bit four a byte, 3-bit eight codes
in three bytes. K is padded with code 0 to a multiple of 8 and the padding is cut off again on unpacking.

WEIGHT_FORMAT_VERSION names this layout; checkpoints record it (version 1 stored unsigned codes (K, N)-major, see
`from_v1`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_BITS = (2, 3, 4, 6, 8)
WEIGHT_FORMAT_VERSION = 2


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
  """A uniformly quantized weight of logical shape (K, N).

  packed: bits == 8: int8 (N, K). bits < 8: uint8 (N, ceil(K/8) * bits). Signed b-bit values along K.
  scale:  (ceil(K/k_group), ceil(N/n_group)) float.
  zero:   same shape as scale, float holding integer values (asymmetric), or None (symmetric).
  activation: an ActQuant when the linear also quantizes its input (W8A8), else None (weight-only).

  Value v (signed, -2^(b-1)..2^(b-1)-1) decodes to (v - zero) * scale.
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
    return _leaf_bytes(self)

  def values(self) -> jax.Array:
    """The signed integer values v, (N, K) int8, K contiguous as stored."""
    return unpack(self.packed, self.bits, self.shape[0])

  def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
    """The float (K, N) weight the codes stand for."""
    values = self.values().T.astype(jnp.float32)
    scale = expand_groups(self.scale.astype(jnp.float32), self.shape, self.k_group, self.n_group)
    if self.zero is not None:
      values = values - expand_groups(self.zero.astype(jnp.float32), self.shape, self.k_group, self.n_group)
    return (values * scale).astype(dtype)


_register(
    QArray,
    data_fields=["packed", "scale", "zero", "activation"],
    meta_fields=["shape", "bits", "k_group", "n_group"],
)


def _leaf_bytes(tree) -> int:
  return sum(int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree_util.tree_leaves(tree))


def group_grid(shape: tuple[int, int], k_group: int, n_group: int) -> tuple[int, int]:
  """Number of groups along K and along N."""
  return math.ceil(shape[0] / k_group), math.ceil(shape[1] / n_group)


def expand_groups(values: jax.Array, shape: tuple[int, int], k_group: int, n_group: int) -> jax.Array:
  """(groups_k, groups_n) -> (K, N) by repeating each group's value over its block; the last block may be short."""
  rows = jnp.repeat(values, k_group, axis=0, total_repeat_length=values.shape[0] * k_group)[: shape[0]]
  return jnp.repeat(rows, n_group, axis=1, total_repeat_length=values.shape[1] * n_group)[:, : shape[1]]


def packed_len(k: int, bits: int) -> int:
  """Length of the packed last axis for K codes."""
  if bits == 8:
    return k
  return math.ceil(k / 8) * bits


PACK_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def pack(codes: jax.Array, bits: int) -> jax.Array:
  """(..., K) integer codes -> packed along the last axis (see the module docstring).

  The low `bits` bits of each code are stored, so signed values come out as two's complement. bits == 8 gives
  int8 (..., K); bits < 8 gives uint8 (..., ceil(K/8) * bits).
  """
  check_bits(bits, allowed=PACK_BITS)
  if bits == 8:
    return codes.astype(jnp.int32).astype(jnp.uint8).astype(jnp.int8) if codes.dtype != jnp.int8 else codes
  lead, k = codes.shape[:-1], codes.shape[-1]
  padded = math.ceil(k / 8) * 8
  codes = codes.astype(jnp.int32).astype(jnp.uint32) & jnp.uint32((1 << bits) - 1)
  codes = jnp.pad(codes, [(0, 0)] * len(lead) + [(0, padded - k)]).reshape(*lead, padded // 8, 8)
  if bits > 4:  # words of more than 32 bits: bit j of code i is bit i*bits + j of the word, built bit by bit
    stream = (codes[..., None] >> _lanes(bits, 1, codes.ndim + 1)) & jnp.uint32(1)  # (..., K/8, 8, bits)
    stream = stream.reshape(*lead, padded // 8, bits, 8)  # word bit 8*byte + j
    packed = jnp.sum(stream << _lanes(8, 1, stream.ndim), axis=-1, dtype=jnp.uint32)
  else:
    words = jnp.sum(codes << _lanes(8, bits, codes.ndim), axis=-1, dtype=jnp.uint32)
    packed = (words[..., None] >> _lanes(bits, 8, words.ndim + 1)) & jnp.uint32(0xFF)
  return packed.reshape(*lead, padded // 8 * bits).astype(jnp.uint8)


def unpack(packed: jax.Array, bits: int, k: int, signed: bool = True) -> jax.Array:
  """Inverse of pack: packed codes -> (..., K) int8 (signed: sign-extended from `bits`) or uint8 (raw codes)."""
  check_bits(bits, allowed=PACK_BITS)
  if bits == 8:
    values = packed.astype(jnp.int8)
    return values if signed else jax.lax.bitcast_convert_type(values, jnp.uint8)
  lead, length = packed.shape[:-1], packed.shape[-1]
  if length % bits:
    raise ValueError(f"packed array has {length} bytes along K, not a multiple of bits={bits}")
  words = length // bits
  chunks = packed.astype(jnp.uint32).reshape(*lead, words, bits)
  if bits > 4:
    stream = (chunks[..., None] >> _lanes(8, 1, chunks.ndim + 1)) & jnp.uint32(1)  # (..., W, bits, 8)
    stream = stream.reshape(*lead, words, 8, bits)  # (word, code i, bit j of the code)
    codes = jnp.sum(stream << _lanes(bits, 1, stream.ndim), axis=-1, dtype=jnp.uint32)
  else:
    word = jnp.sum(chunks << _lanes(bits, 8, chunks.ndim), axis=-1, dtype=jnp.uint32)
    codes = (word[..., None] >> _lanes(8, bits, word.ndim + 1)) & jnp.uint32((1 << bits) - 1)
  codes = codes.reshape(*lead, words * 8)[..., :k]
  if not signed:
    return codes.astype(jnp.uint8)
  wrap = jnp.where(codes >= jnp.uint32(1 << (bits - 1)), jnp.int32(1 << bits), jnp.int32(0))
  return (codes.astype(jnp.int32) - wrap).astype(jnp.int8)


def _lanes(size: int, step: int, ndim: int) -> jax.Array:
  """(0, step, 2*step, ...) as uint32 shift amounts along the last of `ndim` axes."""
  return (jnp.arange(size, dtype=jnp.uint32) * jnp.uint32(step)).reshape((1,) * (ndim - 1) + (size,))


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
  """A weight of logical shape (K, N) in binary-coding form: W ~ sum_i alpha_i * B_i (+ offset), B_i in {-1, +1}.

  planes: (q, N, ceil(K/8)) uint8; bit j of planes[i, n, r] is plane i's sign at input k = 8*r + j
          (1 -> +1, 0 -> -1); the layout of `pack(bits=1)` along K; padding bits are 0.
  alpha:  (q, ceil(K/k_group), N) float, one per (plane, group along K, output column).
  offset: (ceil(K/k_group), N) float or None; a uniform q-bit weight is BCQ with alpha_i = (s/2) * 2^i and
          offset = s * ((2^q - 1)/2 - u_zero), u_zero the zero point of the unsigned codes (see uniform_to_bcq).
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
    return _leaf_bytes(self)

  def signs(self) -> jax.Array:
    """(q, K, N) float32 of +-1, in the logical layout."""
    bits = unpack(self.planes, 1, self.shape[0], signed=False)  # (q, N, K)
    return jnp.swapaxes(bits, 1, 2).astype(jnp.float32) * 2.0 - 1.0

  def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
    alpha = jax.vmap(lambda a: expand_groups(a, self.shape, self.k_group, 1))(self.alpha.astype(jnp.float32))
    w = jnp.sum(alpha * self.signs(), axis=0)
    if self.offset is not None:
      w = w + expand_groups(self.offset.astype(jnp.float32), self.shape, self.k_group, 1)
    return w.astype(dtype)


_register(BCQArray, data_fields=["planes", "alpha", "offset"], meta_fields=["shape", "k_group"])


def pack_planes(signs: jax.Array) -> jax.Array:
  """(q, K, N) signs (> 0 means +1) in the logical layout -> BCQArray.planes (q, N, ceil(K/8)) uint8."""
  positive = signs if signs.dtype == jnp.bool_ else signs > 0
  return pack(jnp.swapaxes(positive, 1, 2).astype(jnp.uint32), 1)


def uniform_to_bcq(q: QArray) -> BCQArray:
  """Exact conversion of a group-wise (n_group == 1) uniform QArray to BCQ with offset.

  With u = v + 2^(q-1) the unsigned code (0..2^q-1) and u_zero = zero + 2^(q-1): u = sum_i 2^i b_i, b_i in {0, 1};
  b_i = (B_i + 1)/2 gives s * (u - u_zero) = sum_i (s * 2^(i-1)) * B_i + s * ((2^q - 1)/2 - u_zero).
  """
  if q.n_group != 1:
    raise ValueError(f"uniform_to_bcq needs one scale per output column (n_group=1), got n_group={q.n_group}")
  if q.bits > 4:
    raise ValueError(f"uniform_to_bcq supports 1..4 bits, got {q.bits}")
  half = 1 << (q.bits - 1)
  codes = unpack(q.packed, q.bits, q.shape[0], signed=False).astype(jnp.uint32) ^ jnp.uint32(half)  # (N, K) u
  planes = jnp.stack([pack((codes >> jnp.uint32(i)) & jnp.uint32(1), 1) for i in range(q.bits)])
  scale = q.scale.astype(jnp.float32)
  alpha = jnp.stack([scale * (2.0 ** (i - 1)) for i in range(q.bits)])
  u_zero = jnp.float32(half) if q.zero is None else q.zero.astype(jnp.float32) + half
  offset = scale * (jnp.float32(((1 << q.bits) - 1) / 2) - u_zero)
  return BCQArray(planes=planes, alpha=alpha, offset=offset, shape=q.shape, k_group=q.k_group)


def from_v1(leaf):
  """A QArray / BCQArray as weight format 1 stored it -> the same weight in this format (exact).

  Version 1 stored unsigned codes u (offset 2^(b-1) when symmetric, the unsigned zero point otherwise) packed
  along K with K as the leading axis: QArray.packed (ceil(K/8)*b or K, N) uint8, BCQArray.planes (q, ceil(K/8), N).
  """
  if isinstance(leaf, BCQArray):
    return dataclasses.replace(leaf, planes=jnp.swapaxes(jnp.asarray(leaf.planes), 1, 2))
  if not isinstance(leaf, QArray):
    return leaf
  k = leaf.shape[0]
  old = jnp.swapaxes(jnp.asarray(leaf.packed), 0, 1)  # (N, packed K): v1 packed the same words along axis 0
  codes = old.astype(jnp.uint8) if leaf.bits == 8 else unpack(old, leaf.bits, k, signed=False)  # (N, K) unsigned
  half = 1 << (leaf.bits - 1)
  values = codes.astype(jnp.int32) - half
  zero = None if leaf.zero is None else (jnp.asarray(leaf.zero) - half).astype(jnp.asarray(leaf.zero).dtype)
  return dataclasses.replace(leaf, packed=pack(values, leaf.bits), zero=zero)
