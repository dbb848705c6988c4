"""W8A8 matmul: int8 x int8 -> int32 accumulation with a fused dequantization epilogue.

  y = sum_g (x_g @ w_g)_int32 * x_scale_g * w_scale_g  (+ bias)            in float32, cast to out_dtype

where g runs over the K-groups of the weight (one group when the weight is per-channel/per-tensor).

Scales
  x_scale: ()        one static scale for the whole tensor (mode "tensor"); (1, 1) is accepted too
           (M, 1)    one dynamic scale per token (mode "token")
           (G, M, 1) one scale per token and K-group (mode "token_group"; needs k_group)
  w_scale: (1, N)    one scale per output column (k_group=None)
           (G, N)    one scale per (K-group, column), G = ceil(K / k_group); the last group may be shorter

K tiling. Every K tile lies inside one K-group: the tiles of group g start at g*k_group and step by bk, the
last tile of a group is masked at the group end (and at K). bk is the largest power of two <= the target
(128..256) that divides k_group, so that for k_group in {32, 64, 128, ...} no tile is partial; a k_group
without a power-of-two factor >= 32 (e.g. 100, 24) still works, at the price of partly masked tiles. Each group's
int32 sum is scaled once and added into a float32 accumulator, so integer sums stay exact.

Edges. Refs are whole arrays; unaligned M, N, K edges are masked in the loads/stores (nothing is padded in
HBM). Split-K: when the M x N grid is too small to fill the GPU (decode-sized M), the K-groups (or, with a
single group, the K tiles) are split over a third grid axis; partial float32 results are summed by XLA.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import backend

MIN_BK = 32  # the int8 MMA instructions (mma m16n8k32, wgmma k=32) consume 32 values of K at a time
TARGET_PROGRAMS = 264  # about two programs per SM of an H100 (132 SMs)
OUT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


class Blocks(NamedTuple):
  bm: int
  bn: int
  bk: int
  split: int
  num_warps: int
  num_stages: int


def block_sizes(m: int, n: int, k: int, k_group: int | None = None, split: int | None = None) -> Blocks:
  """Tile sizes (powers of two; bm, bn >= 16 and bk >= 32 for the int8 dot) and split-K count for an (m, k) x (k, n) product."""
  bm = min(128, max(16, backend.pow2_ceil(m)))
  bn = 64 if m <= 64 else 128
  bn = min(bn, max(16, backend.pow2_ceil(n)))
  target = 256 if m <= 64 else 128
  kg = k if k_group is None or k_group >= k else k_group
  bk = backend.pow2_divisor(kg, target) if kg < k else target
  if bk < MIN_BK:  # k_group with a small power-of-two factor: partly masked tiles
    bk = min(target, backend.pow2_ceil(kg))
  bk = max(MIN_BK, min(bk, backend.pow2_ceil(k)))
  if split is None:
    groups = backend.cdiv(k, kg)
    units = backend.cdiv(kg, bk) if groups == 1 else groups
    programs = backend.cdiv(m, bm) * backend.cdiv(n, bn)
    split = 1
    if programs < TARGET_PROGRAMS // 2 and m <= 256:
      split = max(1, min(units if groups > 1 else units // 4, TARGET_PROGRAMS // programs, 16))
  warps = 4 if bm * bn <= 64 * 64 else 8
  stages = 4 if bk <= 128 else 3
  return Blocks(bm, bn, bk, max(1, int(split)), warps, stages)


def _kernel(*refs, m, n, k, bm, bn, bk, groups, kg, tiles_per_group, split, per_split, gx, has_bias, raw,
            out_dtype, w_offset):
  x_ref, w_ref = refs[:2]
  if raw:
    (o_ref,) = refs[2:]
  else:
    xs_ref, ws_ref = refs[2:4]
    b_ref = refs[4] if has_bias else None
    o_ref = refs[-1]
  pm, pn = pl.program_id(0), pl.program_id(1)
  m0, n0 = pm * bm, pn * bn
  rows, cols = backend.lanes(m0, bm), backend.lanes(n0, bn)
  row_ok = None if m % bm == 0 else rows[:, None] < m
  col_ok = None if n % bn == 0 else cols[None, :] < n
  k_aligned = k % bk == 0 and (groups == 1 or kg % bk == 0)

  def tile(k0, kend, acc):
    kok = None if k_aligned else backend.lanes(k0, bk) < kend
    x = backend.load(x_ref.at[pl.ds(m0, bm), pl.ds(k0, bk)],
                     mask=backend.all_masks(row_ok, None if kok is None else kok[None, :]))
    w = backend.load(w_ref.at[pl.ds(k0, bk), pl.ds(n0, bn)],
                     mask=backend.all_masks(None if kok is None else kok[:, None], col_ok), other=w_offset)
    if w_offset:  # uint8 codes u stand for u - 128 (QArray bits=8 storage): decode in registers
      w = (w.astype(jnp.int32) - w_offset).astype(jnp.int8)
    return acc + jnp.dot(x, w, preferred_element_type=jnp.int32)

  zeros_i = jnp.zeros((bm, bn), jnp.int32)
  s = pl.program_id(2) if split > 1 else 0

  def x_scale_row(g):
    v = backend.load(xs_ref.at[jnp.asarray(g, jnp.int32), pl.ds(m0, bm)], mask=None if row_ok is None else rows < m, other=1.0)
    return v.astype(jnp.float32)[:, None]

  def w_scale_row(g):
    v = backend.load(ws_ref.at[jnp.asarray(g, jnp.int32), pl.ds(n0, bn)], mask=None if col_ok is None else cols < n, other=0.0)
    return v.astype(jnp.float32)[None, :]

  if groups == 1:
    n_tiles = tiles_per_group
    if split == 1:
      lo, hi = 0, n_tiles
    else:
      lo = s * per_split
      hi = jnp.minimum(lo + per_split, n_tiles)
    acc_i = jax.lax.fori_loop(lo, hi, lambda t, a: tile(t * bk, k, a), zeros_i)
    if raw:
      backend.store(o_ref.at[pl.ds(m0, bm), pl.ds(n0, bn)], acc_i, mask=backend.all_masks(row_ok, col_ok))
      return
    acc = acc_i.astype(jnp.float32) * x_scale_row(0) * w_scale_row(0)
  else:
    def group_body(g, acc):
      kstart = g * kg
      kend = jnp.minimum(kstart + kg, k)
      acc_i = jax.lax.fori_loop(0, tiles_per_group, lambda t, a: tile(kstart + t * bk, kend, a), zeros_i)
      return acc + acc_i.astype(jnp.float32) * x_scale_row(g if gx > 1 else 0) * w_scale_row(g)
    if split == 1:
      lo, hi = 0, groups
    else:
      lo = s * per_split
      hi = jnp.minimum(lo + per_split, groups)
    acc = jax.lax.fori_loop(lo, hi, group_body, jnp.zeros((bm, bn), jnp.float32))

  if split > 1:  # partial sums (split, M, N) float32; bias and cast happen after the sum
    backend.store(o_ref.at[s, pl.ds(m0, bm), pl.ds(n0, bn)], acc, mask=backend.all_masks(row_ok, col_ok))
    return
  if has_bias:
    b = backend.load(b_ref.at[pl.ds(n0, bn)], mask=None if col_ok is None else cols < n)
    acc = acc + b.astype(jnp.float32)[None, :]
  backend.store(o_ref.at[pl.ds(m0, bm), pl.ds(n0, bn)], acc.astype(out_dtype), mask=backend.all_masks(row_ok, col_ok))


def _check_operands(x_int8, w_int8):
  for name, a, allowed in (("x_int8", x_int8, (jnp.int8,)), ("w_int8", w_int8, (jnp.int8, jnp.uint8))):
    if not hasattr(a, "shape") or a.ndim != 2:
      raise ValueError(f"{name}: expected a 2-D array, got shape {getattr(a, 'shape', type(a))}")
    if a.dtype not in allowed:
      want = "int8" if len(allowed) == 1 else "int8 (or uint8 codes with offset 128)"
      raise ValueError(f"{name}: expected dtype {want}, got {a.dtype}")
    if 0 in a.shape:
      raise ValueError(f"{name}: empty array of shape {a.shape}")
  if x_int8.shape[1] != w_int8.shape[0]:
    raise ValueError(f"x_int8 has K={x_int8.shape[1]} columns but w_int8 has K={w_int8.shape[0]} rows")


def _check_block(block, k_group, k):
  if block is None:
    return
  bm, bn, bk, split = block.bm, block.bn, block.bk, block.split
  for name, v, least in (("bm", bm, 16), ("bn", bn, 16), ("bk", bk, MIN_BK)):
    if not backend.is_pow2(v) or v < least:
      raise ValueError(f"block.{name}={v}: must be a power of two >= {least} (Triton int8 dot)")
  if split < 1:
    raise ValueError(f"block.split={split}: must be >= 1")


def _resolve_blocks(m, n, k, k_group, block, split_allowed=True):
  b = block if block is not None else block_sizes(m, n, k, k_group)
  if not split_allowed:
    b = b._replace(split=1)
  kg = k if k_group is None or k_group >= k else k_group
  groups = backend.cdiv(k, kg)
  tiles_per_group = backend.cdiv(kg, b.bk)
  units = tiles_per_group if groups == 1 else groups
  split = max(1, min(b.split, units))
  per_split = backend.cdiv(units, split)
  split = backend.cdiv(units, per_split)  # no empty split
  return b._replace(split=split), kg, groups, tiles_per_group, per_split


def int8_matmul(
    x_int8: jax.Array,
    w_int8: jax.Array,
    x_scale: jax.Array,
    w_scale: jax.Array,
    *,
    k_group: int | None = None,
    bias: jax.Array | None = None,
    out_dtype: Any = jnp.float32,
    interpret: bool | None = None,
    block: Blocks | None = None,
) -> jax.Array:
  """(M, K) int8 @ (K, N) int8 with int32 accumulation and the scale/bias epilogue fused; returns (M, N).

  w_int8 may also be uint8 codes u standing for u - 128 (how `QArray` stores bits=8 symmetric weights:
  pass `qarray.packed` directly, no (K, N) int8 copy is made; the offset is removed in registers).
  """
  _check_operands(x_int8, w_int8)
  m, k = x_int8.shape
  n = w_int8.shape[1]
  if k_group is not None and (not isinstance(k_group, int) or isinstance(k_group, bool) or k_group < 1):
    raise ValueError(f"k_group: must be a positive int or None, got {k_group!r}")
  kg = k if k_group is None or k_group >= k else k_group
  groups = backend.cdiv(k, kg)
  out_dtype = backend.float_dtype(out_dtype, "out_dtype", OUT_DTYPES)
  for name, sc in (("x_scale", x_scale), ("w_scale", w_scale)):
    if not hasattr(sc, "shape"):
      raise ValueError(f"{name}: expected an array, got {type(sc).__name__}")
    backend.float_dtype(sc.dtype, name)
  # weight scale
  if w_scale.shape != (groups, n):
    want = f"({groups}, {n})" + (f" (K={k} in groups of k_group={kg})" if k_group is not None else "")
    raise ValueError(f"w_scale: expected shape {want}, got {w_scale.shape}")
  # activation scale -> (gx, M)
  xs = x_scale
  if xs.shape in ((), (1, 1)):
    xs2 = jnp.broadcast_to(xs.reshape(1, 1), (1, m))
  elif xs.shape == (m, 1):
    xs2 = xs.reshape(1, m)
  elif xs.ndim == 3 and xs.shape == (groups, m, 1) and k_group is not None:
    xs2 = xs.reshape(groups, m)
  else:
    allowed = f"(), (1, 1), ({m}, 1)" + (f" or ({groups}, {m}, 1)" if k_group is not None else
                                          " (per-(token, K-group) scales need k_group)")
    raise ValueError(f"x_scale: expected shape {allowed}, got {xs.shape}")
  gx = xs2.shape[0]
  if bias is not None:
    if not hasattr(bias, "shape") or bias.shape != (n,):
      raise ValueError(f"bias: expected shape ({n},), got {getattr(bias, 'shape', type(bias))}")
    backend.float_dtype(bias.dtype, "bias")
  _check_block(block, k_group, k)
  b, kg, groups, tiles_per_group, per_split = _resolve_blocks(m, n, k, k_group, block)
  split = b.split
  args = [x_int8, w_int8, xs2, w_scale]  # scales are cast to float32 in the kernel
  if bias is not None and split == 1:
    args.append(bias)
  kernel = functools.partial(
      _kernel, m=m, n=n, k=k, bm=b.bm, bn=b.bn, bk=b.bk, groups=groups, kg=kg, tiles_per_group=tiles_per_group,
      split=split, per_split=per_split, gx=gx, has_bias=bias is not None and split == 1, raw=False,
      out_dtype=out_dtype, w_offset=128 if w_int8.dtype == jnp.uint8 else 0)
  if split == 1:
    out_shape = jax.ShapeDtypeStruct((m, n), out_dtype)
  else:
    out_shape = jax.ShapeDtypeStruct((split, m, n), jnp.float32)
  grid = (backend.cdiv(m, b.bm), backend.cdiv(n, b.bn)) + ((split,) if split > 1 else ())
  out = backend.call(kernel, *args, out_shape=out_shape, grid=grid, interpret=interpret,
                     num_warps=b.num_warps, num_stages=b.num_stages, name="int8_matmul")
  if split > 1:
    out = jnp.sum(out, axis=0)
    if bias is not None:
      out = out + bias.astype(jnp.float32)[None, :]
    out = out.astype(out_dtype)
  return out


def int8_matmul_int32(x_int8: jax.Array, w_int8: jax.Array, *, interpret: bool | None = None,
                      block: Blocks | None = None) -> jax.Array:
  """The raw int32 accumulator x_int8 @ w_int8 (no scales): the same kernel body with the epilogue off."""
  _check_operands(x_int8, w_int8)
  _check_block(block, None, x_int8.shape[1])
  m, k = x_int8.shape
  n = w_int8.shape[1]
  b, kg, groups, tiles_per_group, per_split = _resolve_blocks(m, n, k, None, block, split_allowed=False)
  kernel = functools.partial(
      _kernel, m=m, n=n, k=k, bm=b.bm, bn=b.bn, bk=b.bk, groups=1, kg=k, tiles_per_group=tiles_per_group,
      split=1, per_split=per_split, gx=1, has_bias=False, raw=True, out_dtype=jnp.int32,
      w_offset=128 if w_int8.dtype == jnp.uint8 else 0)
  return backend.call(kernel, x_int8, w_int8, out_shape=jax.ShapeDtypeStruct((m, n), jnp.int32),
                      grid=(backend.cdiv(m, b.bm), backend.cdiv(n, b.bn)), interpret=interpret,
                      num_warps=b.num_warps, num_stages=b.num_stages, name="int8_matmul_int32")


def reference(x_int8, w_int8, x_scale, w_scale, *, k_group=None, bias=None, out_dtype=jnp.float32,
              compute_dtype=jnp.float32):
  """Plain jnp: per-group int32 dots, scaled and summed in `compute_dtype` (float64 needs jax x64)."""
  m, k = x_int8.shape
  n = w_int8.shape[1]
  if w_int8.dtype == jnp.uint8:
    w_int8 = (w_int8.astype(jnp.int16) - 128).astype(jnp.int8)
  kg = k if k_group is None or k_group >= k else k_group
  groups = -(-k // kg)
  pad = groups * kg - k
  xg = jnp.pad(x_int8, ((0, 0), (0, pad))).reshape(m, groups, kg)
  wg = jnp.pad(w_int8, ((0, pad), (0, 0))).reshape(groups, kg, n)
  acc = jnp.einsum("mgk,gkn->gmn", xg, wg, preferred_element_type=jnp.int32).astype(compute_dtype)
  xs = jnp.asarray(x_scale, compute_dtype)
  xs = xs.reshape(1, 1, 1) if xs.ndim <= 2 and xs.size == 1 else (xs[None] if xs.ndim == 2 else xs)
  y = jnp.sum(acc * xs * jnp.asarray(w_scale, compute_dtype)[:, None, :], axis=0)
  if bias is not None:
    y = y + bias.astype(compute_dtype)[None, :]
  return y.astype(out_dtype)
