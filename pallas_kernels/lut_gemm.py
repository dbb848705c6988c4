"""Weight-only matmul of binary-coded (BCQ) weights, and of uniform q-bit weights converted to BCQ.

  W ~ sum_i alpha[i, g(k), n] * B_i[k, n]  (+ offset[g(k), n]),   B_i in {-1, +1},  g(k) = k // k_group
  y = x @ W                                                       (+ bias)

Weights stay packed: planes (q, ceil(K/8), N) uint8, bit j of planes[i, r, n] is B_i[8r + j, n] (1 -> +1),
the layout of `jaxquant.formats.BCQArray`. No dequantized (K, N) matrix is ever written to HBM.

Two strategies behind one kernel body (`method`):

  "lut"     (small batch, the LUT-GEMM method). A first small kernel builds, for every row m of x and every
            chunk c of 8 activations, the 256 signed sums lut[m, c, b] = sum_j (+-1 by bit j of b) x[m, 8c+j],
            once, by the doubling recurrence lut[i] = lut[i - 2^s] + 2 x[s] starting from -sum(chunk) (built
            with 2-way stacks, which the Triton lowering has). The GEMM kernel then reads each packed sign
            byte and gathers lut[m, c, byte] (a ref gather with an integer index array), sums over the chunks
            of a tile and scales by alpha per plane; the offset term uses the group sums of x, which are the
            entries lut[m, c, 255]. Needs k_group % 8 == 0 (one byte of signs never straddles two groups).
  "decode"  (larger batch, as FLUTE does). Each (bk, bn) weight tile is decoded in registers: unpack the
            sign bits, w = sum_i alpha_i * (+-1) (+ offset), i.e. the tile's 2^q code values, and fed to a
            tensor-core dot with the (bm, bk) activation tile (in x's dtype, float32 accumulation).
  "auto"    "lut" for M <= LUT_MAX_M (and k_group % 8 == 0), else "decode".

K tiling is uniform (tiles of bk rows = bc bytes) and independent of the group size. When the tile size
divides k_group (or there is one group) each tile lies in one group and alpha/offset are read as rows of
bn values; otherwise (e.g. k_group=100, or 8 x odd) alpha/offset are gathered per row (decode) or per chunk
(lut). A shorter last group (K=576, k_group=128) needs nothing special. Unaligned M, N, K edges are masked.
Split-K over a third grid axis when the M x N grid is too small to fill the GPU.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import backend

LUT_MAX_M = 8          # "auto" uses lookup tables up to this many rows (untuned: see experiments/bench_kernels.py)
MAX_PLANES = 4
METHODS = ("auto", "lut", "decode")
OUT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
TARGET_PROGRAMS = 264  # about two programs per SM of an H100


class Blocks(NamedTuple):
  bm: int       # rows of x per program
  bn: int       # output columns per program
  bc: int       # K tile in bytes of signs (8 * bc rows of K)
  split: int    # split-K programs
  grouped: bool # True: each tile lies in one K-group (alpha as rows); False: per-row/chunk alpha gathers
  num_warps: int
  num_stages: int


def _fast_tile(bc_target: int, k: int, k_group: int, min_bc: int) -> tuple[int, bool]:
  """bc and whether tiles lie inside one group."""
  if k_group >= k:
    return bc_target, True
  if k_group % 8 == 0:
    bc = backend.pow2_divisor(k_group // 8, bc_target)
    if bc >= max(min_bc, bc_target // 4):
      return bc, True
  return bc_target, False


def block_sizes(method: str, m: int, n: int, k: int, k_group: int, split: int | None = None) -> Blocks:
  """Tile sizes (powers of two) and split-K for the given strategy ("lut" or "decode")."""
  c = backend.cdiv(k, 8)
  if method == "lut":
    bm = min(backend.pow2_ceil(m), 16)
    bn = min(128 if bm <= 2 else 64, max(16, backend.pow2_ceil(n)))
    bc_target = max(1, min(32, 4096 // (bm * bn), backend.pow2_ceil(c)))
    bc, grouped = _fast_tile(bc_target, k, k_group, 1)
    warps, stages = 4, 2
  elif method == "decode":
    bm = min(128, max(16, backend.pow2_ceil(m)))
    bn = min(64 if m <= 64 else 128, max(16, backend.pow2_ceil(n)))
    bk_target = 64 if m <= 64 else 32
    bk_target = max(16, min(bk_target, backend.pow2_ceil(k)))
    bc, grouped = _fast_tile(bk_target // 8, k, k_group, 2)  # dot needs bk >= 16
    warps = 4 if bm * bn <= 64 * 64 else 8
    stages = 3
  else:
    raise ValueError(f"method: unknown {method!r}")
  if split is None:
    programs = backend.cdiv(m, bm) * backend.cdiv(n, bn)
    tiles = backend.cdiv(c, bc)
    split = 1
    if programs < TARGET_PROGRAMS // 2 and m <= 256:
      split = max(1, min(tiles // 4, TARGET_PROGRAMS // programs, 16))
  return Blocks(bm, bn, bc, max(1, int(split)), grouped, warps, stages)


# ---- LUT construction ------------------------------------------------------------------------------------

def lut_block_sizes(m: int, c: int) -> tuple[int, int]:
  bm = min(backend.pow2_ceil(m), 16)
  bc = max(1, min(16 // bm, backend.pow2_ceil(c)))
  return bm, bc


def _lut_kernel(x_ref, lut_ref, *, m, c, bm, bc):
  """x_ref (M, C, 8) float -> lut_ref (M, C, 256) float32."""
  m0, c0 = pl.program_id(0) * bm, pl.program_id(1) * bc
  rows, chunks = backend.lanes(m0, bm), backend.lanes(c0, bc)
  ok = (rows[:, None] < m) & (chunks[None, :] < c)
  xs = [backend.load(x_ref.at[pl.ds(m0, bm), pl.ds(c0, bc), jnp.int32(j)], mask=ok).astype(jnp.float32)
        for j in range(8)]  # eight (bm, bc) values, x[m, 8c + j]
  total = xs[0]
  for j in range(1, 8):
    total = total + xs[j]
  t = (-total)[:, :, None]  # lut with no bit set: every sign -1
  # Append bits from the most significant (7) down: stacking [t, t + 2 x_j] along a new last axis makes
  # bit j the least significant of the index so far; after bit 0 the index is sum_j bit_j 2^j.
  for j in range(7, -1, -1):
    size = t.shape[-1]
    t = jnp.stack([t, t + 2.0 * xs[j][:, :, None]], axis=-1).reshape(bm, bc, 2 * size)
  backend.store(lut_ref.at[pl.ds(m0, bm), pl.ds(c0, bc), backend.whole(256)], t, mask=ok[:, :, None])


def build_lut(x: jax.Array, *, interpret: bool | None = None) -> jax.Array:
  """x (M, K) float -> lut (M, ceil(K/8), 256) float32: all signed sums of every chunk of 8 activations."""
  m, k = x.shape
  c = backend.cdiv(k, 8)
  if c * 8 != k:  # zero activations past K contribute nothing whatever their sign bit
    x = jnp.pad(x, ((0, 0), (0, c * 8 - k)))
  x3 = x.reshape(m, c, 8)
  bm, bc = lut_block_sizes(m, c)
  kernel = functools.partial(_lut_kernel, m=m, c=c, bm=bm, bc=bc)
  return backend.call(kernel, x3, out_shape=jax.ShapeDtypeStruct((m, c, 256), jnp.float32),
                      grid=(backend.cdiv(m, bm), backend.cdiv(c, bc)), interpret=interpret,
                      num_warps=4, num_stages=1, name="lut_build")


def lut_reference(x: jax.Array) -> jax.Array:
  """Plain jnp: lut[m, c, b] = sum_j (2 * bit_j(b) - 1) * x[m, 8c + j]."""
  m, k = x.shape
  c = -(-k // 8)
  x3 = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, c * 8 - k))).reshape(m, c, 8)
  signs = ((jnp.arange(256)[None, :] >> jnp.arange(8)[:, None]) & 1).astype(jnp.float32) * 2 - 1  # (8, 256)
  return jnp.einsum("mcj,jb->mcb", x3, signs, precision=jax.lax.Precision.HIGHEST)


def lut_index(rows: jax.Array, chunks: jax.Array, byte: jax.Array, c: int) -> jax.Array:
  """Flat index of lut[rows, chunks, byte] in the (M * C * 256,) table (broadcasting int32 arrays)."""
  return (rows * c + chunks) * 256 + byte


# ---- the GEMM body ---------------------------------------------------------------------------------------

def _kernel(*refs, method, q, m, n, k, kg, groups, bm, bn, bc, grouped, split, per_split, has_offset,
            has_bias, compute_dtype, out_dtype):
  src_ref, planes_ref, alpha_ref = refs[:3]  # src: flat LUT (lut) or x (decode); alpha flat (q*G*N,)
  i = 3
  off_ref = b_ref = None
  if has_offset:
    off_ref, i = refs[i], i + 1  # flat (G*N,)
  if has_bias:
    b_ref, i = refs[i], i + 1
  o_ref = refs[i]

  c = backend.cdiv(k, 8)
  bk = 8 * bc
  n_tiles = backend.cdiv(c, bc)
  pm, pn = pl.program_id(0), pl.program_id(1)
  m0, n0 = pm * bm, pn * bn
  rows, cols = backend.lanes(m0, bm), backend.lanes(n0, bn)
  row_ok1 = None if m % bm == 0 else rows < m
  col_ok1 = None if n % bn == 0 else cols < n
  row_ok = None if row_ok1 is None else row_ok1[:, None]
  col_ok = None if col_ok1 is None else col_ok1[None, :]

  def alpha_row(plane, g):  # (1, bn) for one group g
    row = backend.load(alpha_ref.at[pl.ds((plane * groups + g) * n + n0, bn)], mask=col_ok1)
    return row.astype(jnp.float32)[None, :]

  def offset_row(g):
    return backend.load(off_ref.at[pl.ds(g * n + n0, bn)], mask=col_ok1).astype(jnp.float32)[None, :]

  def gathered(ref, base, g_of, ok):  # ref[base + g_of * N + n] for g_of (L, 1) -> (L, bn)
    return backend.load(ref.at[base + g_of * n + cols[None, :]], mask=backend.all_masks(ok, col_ok)).astype(jnp.float32)

  def lut_tile(t, acc):
    c0 = t * bc
    chunks = backend.lanes(c0, bc)
    c_ok1 = None if c % bc == 0 else chunks < c
    c_ok = None if c_ok1 is None else c_ok1[:, None]
    g = (c0 * 8) // kg
    mask3 = backend.all_masks(None if row_ok is None else row_ok[:, :, None],
                 None if c_ok is None else c_ok[None], None if col_ok is None else col_ok[None])
    if not grouped:
      g_of = jnp.minimum((chunks[:, None] * 8) // kg, groups - 1)  # (bc, 1); 8 | kg: a chunk is in one group
    for plane in range(q):
      byte = backend.load(planes_ref.at[jnp.int32(plane), pl.ds(c0, bc), pl.ds(n0, bn)],
                          mask=backend.all_masks(c_ok, col_ok)).astype(jnp.int32)
      idx = lut_index(rows[:, None, None], chunks[None, :, None], byte[None], c)  # (bm, bc, bn), 0..M*C*256
      vals = backend.load(src_ref.at[idx], mask=mask3, other=0.0)
      if grouped:
        acc = acc + jnp.sum(vals, axis=1) * alpha_row(plane, g)
      else:
        a = gathered(alpha_ref, plane * groups * n, g_of, c_ok)  # (bc, bn)
        acc = acc + jnp.sum(vals * a[None], axis=1)
    if has_offset:
      xsum = backend.load(src_ref.at[lut_index(rows[:, None], chunks[None, :], 255, c)],
                          mask=backend.all_masks(row_ok, None if c_ok1 is None else c_ok1[None, :]), other=0.0)  # (bm, bc)
      if grouped:
        acc = acc + jnp.sum(xsum, axis=1, keepdims=True) * offset_row(g)
      else:
        off = gathered(off_ref, 0, g_of, c_ok)  # (bc, bn)
        acc = acc + jnp.sum(xsum[:, :, None] * off[None], axis=1)
    return acc

  shifts = jnp.arange(8, dtype=jnp.int32)[None, :, None]

  def decode_tile(t, acc):
    c0 = t * bc
    k0 = c0 * 8
    ks = backend.lanes(k0, bk)
    k_ok1 = None if k % bk == 0 else ks < k
    c_ok = None if c % bc == 0 else (backend.lanes(c0, bc) < c)[:, None]
    x = backend.load(src_ref.at[pl.ds(m0, bm), pl.ds(k0, bk)],
                     mask=backend.all_masks(row_ok, None if k_ok1 is None else k_ok1[None, :]))
    if grouped:
      g = k0 // kg
    else:
      g_of = jnp.minimum(ks[:, None] // kg, groups - 1)  # (bk, 1)
    w = jnp.zeros((bk, bn), jnp.float32)
    for plane in range(q):
      byte = backend.load(planes_ref.at[jnp.int32(plane), pl.ds(c0, bc), pl.ds(n0, bn)],
                          mask=backend.all_masks(c_ok, col_ok)).astype(jnp.int32)
      bits = ((byte[:, None, :] >> shifts) & 1).reshape(bk, bn)  # row 8r + j <- bit j of byte r
      a = alpha_row(plane, g) if grouped else gathered(alpha_ref, plane * groups * n, g_of, None)
      w = w + jnp.where(bits == 1, a, -a)
    if has_offset:
      w = w + (offset_row(g) if grouped else gathered(off_ref, 0, g_of, None))
    return acc + jnp.dot(x.astype(compute_dtype), w.astype(compute_dtype), preferred_element_type=jnp.float32)

  tile = lut_tile if method == "lut" else decode_tile
  if split == 1:
    lo, hi = 0, n_tiles
  else:
    s = pl.program_id(2)
    lo = s * per_split
    hi = jnp.minimum(lo + per_split, n_tiles)
  acc = jax.lax.fori_loop(lo, hi, tile, jnp.zeros((bm, bn), jnp.float32))

  if split > 1:
    backend.store(o_ref.at[pl.program_id(2), pl.ds(m0, bm), pl.ds(n0, bn)], acc, mask=backend.all_masks(row_ok, col_ok))
    return
  if has_bias:
    acc = acc + backend.load(b_ref.at[pl.ds(n0, bn)], mask=col_ok1).astype(jnp.float32)[None, :]
  backend.store(o_ref.at[pl.ds(m0, bm), pl.ds(n0, bn)], acc.astype(out_dtype), mask=backend.all_masks(row_ok, col_ok))


# ---- public wrapper --------------------------------------------------------------------------------------

def choose_method(m: int, k: int, k_group: int) -> str:
  kg = min(k_group, k)
  if m <= LUT_MAX_M and (kg % 8 == 0 or kg >= k):
    return "lut"
  return "decode"


def _validate(x, planes, alpha, offset, k_group, bias, method, out_dtype, block):
  if not hasattr(x, "shape") or x.ndim < 1:
    raise ValueError(f"x: expected an array of shape (..., K), got {getattr(x, 'shape', type(x))}")
  backend.float_dtype(x.dtype, "x")
  k = x.shape[-1]
  if x.size == 0:
    raise ValueError(f"x: empty input of shape {x.shape}")
  if not hasattr(planes, "shape") or planes.ndim != 3 or planes.dtype != jnp.uint8:
    raise ValueError(f"planes: expected a (q, ceil(K/8), N) uint8 array, got "
                     f"{getattr(planes, 'shape', type(planes))} {getattr(planes, 'dtype', '')}")
  q, c, n = planes.shape
  if not 1 <= q <= MAX_PLANES:
    raise ValueError(f"planes: unsupported bits q={q}; choose 1..{MAX_PLANES} sign planes")
  if c != backend.cdiv(k, 8):
    raise ValueError(f"planes: expected {backend.cdiv(k, 8)} rows of packed signs for K={k} (x's last "
                     f"dimension), got {c}")
  if n == 0:
    raise ValueError("planes: N = 0 output columns")
  if not isinstance(k_group, int) or isinstance(k_group, bool) or k_group < 1:
    raise ValueError(f"k_group: must be a positive int, got {k_group!r}")
  groups = backend.cdiv(k, min(k_group, k))
  if not hasattr(alpha, "shape") or alpha.shape != (q, groups, n):
    raise ValueError(f"alpha: expected shape ({q}, {groups}, {n}) (planes, K-groups of {k_group}, N), got "
                     f"{getattr(alpha, 'shape', type(alpha))}")
  backend.float_dtype(alpha.dtype, "alpha")
  if offset is not None:
    if not hasattr(offset, "shape") or offset.shape != (groups, n):
      raise ValueError(f"offset: expected shape ({groups}, {n}) or None, got {getattr(offset, 'shape', type(offset))}")
    backend.float_dtype(offset.dtype, "offset")
  if bias is not None:
    if not hasattr(bias, "shape") or bias.shape != (n,):
      raise ValueError(f"bias: expected shape ({n},), got {getattr(bias, 'shape', type(bias))}")
    backend.float_dtype(bias.dtype, "bias")
  if method not in METHODS:
    raise ValueError(f"method: unknown {method!r}; choose one of {METHODS}")
  kg = min(k_group, k)
  if method == "lut" and kg % 8 and kg < k:
    raise ValueError(f"method 'lut' needs k_group % 8 == 0 (a byte of signs must not straddle two groups), got "
                     f"k_group={k_group}; use method='decode' or 'auto'")
  backend.float_dtype(out_dtype, "out_dtype", OUT_DTYPES)
  if block is not None:
    if not isinstance(block, Blocks):
      raise ValueError(f"block: expected a lut_gemm.Blocks, got {type(block).__name__}")
    for name in ("bm", "bn", "bc"):
      v = getattr(block, name)
      if not backend.is_pow2(v):
        raise ValueError(f"block.{name}={v}: must be a power of two")
    if method == "decode" and (block.bm < 16 or block.bn < 16 or 8 * block.bc < 16):
      raise ValueError("block: the decode strategy's dot needs bm, bn, 8*bc >= 16")
    if block.grouped and kg < k and kg % (8 * block.bc):
      raise ValueError(f"block.grouped needs 8*bc={8 * block.bc} to divide k_group={k_group}")
  return q, c, n, k, groups


def lut_gemm(
    x: jax.Array,
    planes: jax.Array,
    alpha: jax.Array,
    offset: jax.Array | None = None,
    *,
    k_group: int,
    bias: jax.Array | None = None,
    method: str = "auto",
    out_dtype: Any = jnp.float32,
    interpret: bool | None = None,
    block: Blocks | None = None,
) -> jax.Array:
  """x (..., K) float @ BCQ weight (planes, alpha, offset) -> (..., N) out_dtype."""
  q, c, n, k, groups = _validate(x, planes, alpha, offset, k_group, bias, method, out_dtype, block)
  out_dtype = jnp.dtype(out_dtype)
  lead = x.shape[:-1]
  x2 = x.reshape(-1, k)
  m = x2.shape[0]
  kg = min(k_group, k)
  if method == "auto":
    method = choose_method(m, k, kg)
  if method == "lut" and m * c * 256 >= 2**31:
    raise ValueError(f"x: M={m} rows x K={k} is too large for a lookup table with int32 indices; use method='decode'")
  b = block if block is not None else block_sizes(method, m, n, k, kg)
  n_tiles = backend.cdiv(c, b.bc)
  split = max(1, min(b.split, n_tiles))
  per_split = backend.cdiv(n_tiles, split)
  split = backend.cdiv(n_tiles, per_split)
  if x2.dtype == jnp.float32:
    compute_dtype = jnp.float32
  else:
    compute_dtype = x2.dtype
  if method == "lut":
    src = build_lut(x2, interpret=interpret).reshape(-1)
  else:
    src = x2
  args = [src, planes, alpha.reshape(-1)]  # alpha/offset keep their stored dtype (f16 halves the metadata)
  if offset is not None:
    args.append(offset.reshape(-1))
  has_bias = bias is not None and split == 1
  if has_bias:
    args.append(bias)
  kernel = functools.partial(
      _kernel, method=method, q=q, m=m, n=n, k=k, kg=kg, groups=groups, bm=b.bm, bn=b.bn, bc=b.bc,
      grouped=b.grouped, split=split, per_split=per_split, has_offset=offset is not None, has_bias=has_bias,
      compute_dtype=compute_dtype, out_dtype=out_dtype)
  if split == 1:
    out_shape = jax.ShapeDtypeStruct((m, n), out_dtype)
    grid = (backend.cdiv(m, b.bm), backend.cdiv(n, b.bn))
  else:
    out_shape = jax.ShapeDtypeStruct((split, m, n), jnp.float32)
    grid = (backend.cdiv(m, b.bm), backend.cdiv(n, b.bn), split)
  out = backend.call(kernel, *args, out_shape=out_shape, grid=grid, interpret=interpret,
                     num_warps=b.num_warps, num_stages=b.num_stages, name=f"lut_gemm_{method}")
  if split > 1:
    out = jnp.sum(out, axis=0)
    if bias is not None:
      out = out + bias.astype(jnp.float32)[None, :]
    out = out.astype(out_dtype)
  return out.reshape(*lead, n)


def bcq_matmul(x: jax.Array, w: Any, **kwargs) -> jax.Array:
  """lut_gemm with a `jaxquant.formats.BCQArray` (read by attribute: planes, alpha, offset, shape, k_group)."""
  if tuple(w.shape)[0] != x.shape[-1]:
    raise ValueError(f"x has {x.shape[-1]} features but the weight expects K={w.shape[0]}")
  planes = jnp.swapaxes(w.planes, 1, 2)  # formats stores (q, N, C), K-contiguous; this kernel reads (q, C, N)
  return lut_gemm(x, planes, w.alpha, w.offset, k_group=int(w.k_group), **kwargs)


def reference(x, planes, alpha, offset=None, *, k_group, bias=None, out_dtype=jnp.float32,
              compute_dtype=jnp.float32):
  """Dequantize-then-dot in plain jnp (compute_dtype float64 needs jax x64 enabled)."""
  k = x.shape[-1]
  q, c, n = planes.shape
  kg = min(k_group, k)
  bits = (planes[:, :, None, :].astype(jnp.int32) >> jnp.arange(8)[None, None, :, None]) & 1  # (q, C, 8, N)
  signs = (bits.reshape(q, c * 8, n)[:, :k] * 2 - 1).astype(compute_dtype)
  expand = lambda a: jnp.repeat(a.astype(compute_dtype), kg, axis=-2, total_repeat_length=a.shape[-2] * kg)[..., :k, :]
  w = jnp.sum(expand(alpha) * signs, axis=0)
  if offset is not None:
    w = w + expand(offset)
  y = jnp.matmul(x.astype(compute_dtype), w, precision=jax.lax.Precision.HIGHEST)
  if bias is not None:
    y = y + bias.astype(compute_dtype)
  return y.astype(out_dtype)
