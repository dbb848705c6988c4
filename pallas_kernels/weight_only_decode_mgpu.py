"""In-register decoders of packed weights for the Mosaic GPU weight-only kernels (wgmma A operands).

Each decoder turns the packed bytes one warpgroup loaded for 64 rows (a (64, 16*t) uint8 array in the
WGMMA_8BIT layout: lane c of a quad holds bytes 4c..4c+3 of every 16-byte column tile) into (64, 64) bf16/f16
arrays in the WGMMA layout, one per 64 columns of K. No shuffles: the 32-bit word of lane c yields register
pairs (bit fields i and i + 16) that become wgmma columns (8P + 2c + e) of their block; the kernel contracts
over that permuted K and `permute_x` applies the same permutation to x. Per 16-bit half, with the float
"magic" M (bf16 128.0 / f16 1024.0, where one ulp is 1.0):

  "uniform"  (bits 2/4, acc mode)  one lop3 per pair: M + 2^(bits-1) + v, exact (v the signed code).
  "uniform"  (reg mode)            lop3, sub (M + 2^(bits-1) + zero), mul scale: bf16((v - zero) * scale).
  "bcq"      (sign planes, acc)    one lop3 per pair, no shift for 14 of 16 pairs: bit P of the word sits at
                                   mantissa bit j(P) in 0..6 of 1.0 -> 1 + b * 2^(j-7); x is pre-scaled by
                                   2^(7-j) so that A * x' = x' + b * x (the x' group sums come from XLA).
  "bcq"      (reg mode)            per plane: shift bits P, P+16 to 15/31, lop3 flips alpha's sign where the
                                   bit is 0, add: offset + sum_i +-alpha_i in bf16 (decode_bcq_reg_*).

`_jnp` versions compute the same values in the same order for interpret mode (the PTX runs only on a GPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import mosaic_gpu as plgpu

WG8 = plgpu.Layout.WGMMA_8BIT
WG = plgpu.Layout.WGMMA
ROW = plgpu.Layout.WGMMA.reduce(1)
COL = plgpu.Layout.WGMMA.reduce(0)
MAGIC = {jnp.dtype(jnp.bfloat16): 128.0, jnp.dtype(jnp.float16): 1024.0}
_MAGIC_BITS = {jnp.dtype(jnp.bfloat16): 0x4300, jnp.dtype(jnp.float16): 0x6400}


def pairs_per_word(kind: str, bits: int) -> int:
  return 16 if kind == "bcq" else 16 // bits


def codes_per_tile(kind: str, bits: int) -> int:
  """Codes of K in one 16-byte column tile of a row."""
  return 128 if kind == "bcq" else 128 // bits


def bcq_shift(p: int) -> tuple[int, int]:
  """Pair p (bits p, p + 16 of a word): right shift, then mantissa position j in 0..6."""
  s = 0 if p < 7 else (7 if p < 14 else 14)
  return s, p - s


def permute_x(x: jax.Array, pp: int) -> jax.Array:
  """x (M, Kp) in storage order -> the kernel's K order: inside each block of 8*pp codes, column
  (8p + 2c + e) holds code (2*pp*c + pp*e + p) (lane c, its pair p, e = low/high 16 bits)."""
  m, kp = x.shape
  return x.reshape(m, kp // (8 * pp), 4, 2, pp).transpose(0, 1, 4, 2, 3).reshape(m, kp)


def bcq_x_scale(kp: int) -> np.ndarray:
  """2^(7 - j) for every permuted column (numpy, (Kp,))."""
  p = (np.arange(kp) % 128) // 8
  j = np.array([bcq_shift(int(q))[1] for q in range(16)])[p]
  return np.exp2(7.0 - j)


def bcq_pattern(half: int, dtype) -> np.ndarray:
  """The (64, 64) wgmma operand 2^(j - 7) whose product with x' sums x itself (chunk `half` of a tile)."""
  p = np.arange(64) // 8 + 8 * half
  j = np.array([bcq_shift(int(q))[1] for q in range(16)])[p]
  return np.broadcast_to(np.exp2(j - 7.0)[None, :], (64, 64)).astype(dtype)


# ---- interpret-mode stand-ins -----------------------------------------------------------------------

def _fields(w, kind, bits):
  """(64, B) uint8 -> (64, B * 8 / bits) unsigned bit fields in storage order (int32)."""
  w = w.astype(jnp.int32)
  b = 1 if kind == "bcq" else bits
  f = jnp.stack([(w >> (b * i)) & ((1 << b) - 1) for i in range(8 // b)], axis=-1)
  return f.reshape(w.shape[0], -1)


def decode_jnp(w, chunk, *, kind, bits, dtype, zz=None, ss=None):
  """Chunk `chunk` (64 permuted columns) of w (64, B) uint8. Reg mode: zz[t][c], ss[t][c] (64,) rows."""
  dtype = jnp.dtype(dtype)
  f = _fields(w, kind, bits).astype(jnp.float32)
  pp = pairs_per_word(kind, bits)
  if kind == "bcq":
    p = jax.lax.broadcasted_iota(jnp.int32, f.shape, 1) % 16  # storage column -> pair p of its word
    j = jnp.where(p < 7, p, jnp.where(p < 14, p - 7, p - 14))
    a = (1.0 + f * jnp.left_shift(1, j).astype(jnp.float32) * (1.0 / 128)).astype(dtype)
  else:
    u = f.astype(jnp.int32) ^ (1 << (bits - 1))  # v + 2^(bits-1)
    a = (MAGIC[dtype] + u.astype(jnp.float32))
    if zz is not None:
      cpt = codes_per_tile(kind, bits)
      cols = []
      for t in range(f.shape[1] // cpt):
        for c in range(4):
          sl = a[:, t * cpt + c * cpt // 4: t * cpt + (c + 1) * cpt // 4]
          d = (sl - zz[t][c].astype(jnp.float32)[:, None]).astype(dtype).astype(jnp.float32)  # exact
          cols.append(d * ss[t][c].astype(jnp.float32)[:, None])
      a = jnp.concatenate(cols, axis=1)
    a = a.astype(dtype)
  # Column 8u + 2c + e of the chunk is what the PTX decoder puts there: register pair u = (tile t, pair p)
  # of lane c, half e, i.e. storage code t*cpt + c*(2 pp) + e*pp + p. Written out here independently of
  # permute_x, so that the tests compare permute_x (applied to x) against this register-level mapping.
  cpt = codes_per_tile(kind, bits)
  units = [(t, p) for t in range(a.shape[1] // cpt) for p in range(pp)][8 * chunk:8 * chunk + 8]
  cols = [t * cpt + c * 2 * pp + e * pp + p for (t, p) in units for c in range(4) for e in range(2)]
  return jnp.concatenate([a[:, i:i + 1] for i in cols], axis=1)


# ---- PTX (Mosaic GPU) ---------------------------------------------------------------------------------

def decode_ptx(chunk, *, kind, bits, dtype, n_bytes, index=None):
  """inline_mgpu decoder of chunk `chunk` of a (64, n_bytes) uint8 WGMMA_8BIT array -> (64, 64) WGMMA array.

  Reg mode (`index` given): index[t][c] picks lane c's (zz, ss) row pair in 16-byte tile t."""
  from jax.experimental.mosaic import gpu as mgpu
  from jax.experimental.mosaic.gpu import fragmented_array as fa
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, llvm

  dtype = jnp.dtype(dtype)
  pp = pairs_per_word(kind, bits)
  units = [(t, p) for t in range(n_bytes // 16) for p in range(pp)][8 * chunk:8 * chunk + 8]
  out_t = plgpu.ShapeDtypeStruct((64, 64), dtype, layout=WG)
  suf = "bf16x2" if dtype == jnp.bfloat16 else "f16x2"
  n_rows = 0 if index is None else 1 + max(max(ti) for ti in index)
  arg_types = (WG8,) if index is None else (WG8, [ROW] * n_rows, [ROW] * n_rows)

  @plgpu.inline_mgpu(arg_types=arg_types, return_type=out_t)
  def decode(ctx, w, *rows):
    del ctx
    i32 = ir.IntegerType.get_signless(32)
    i16 = ir.IntegerType.get_signless(16)
    vec2 = ir.VectorType.get((2,), mgpu.utils.dtype_to_ir_type(dtype))
    c32 = lambda v: arith.constant(i32, v)

    def pack(row, i):  # the 16-bit float of row half i, twice in one 32-bit register
      h = mgpu.utils.bitcast(row.registers[0, 0, i, 0, 0], i16)
      return llvm.inline_asm(i32, [h], "mov.b32 $0, {$1, $1};", "=r,h")

    if index is not None:
      lane = arith.remui(mgpu.utils.thread_idx(), c32(4))
      zz_rows, ss_rows = rows
      packed = [[(pack(zz_rows[j], i), pack(ss_rows[j], i)) for i in range(2)] for j in range(n_rows)]
    out = np.empty(fa.WGMMA_LAYOUT.registers_shape((64, 64)), dtype=object)
    words, shifted = {}, {}
    for u, (t, p) in enumerate(units):
      for i in range(2):
        if (t, i) not in words:
          words[t, i] = mgpu.utils.bitcast(w.registers[0, t, 0, 0, i, 0, 0, 0, 0], i32)
        if kind == "bcq":
          s, j = bcq_shift(p)
          mask, base, lut = (1 << j) | (1 << (j + 16)), 0x3F803F80, 0xEA  # (a & b) | c
          if dtype == jnp.float16:
            raise NotImplementedError("bcq decode is bf16 only")
        else:
          s, mask, lut = bits * p, ((1 << bits) - 1) * 0x10001, 0x6A  # (a & b) ^ c
          base = (_MAGIC_BITS[dtype] | (1 << (bits - 1))) * 0x10001
        if (t, i, s) not in shifted:
          shifted[t, i, s] = words[t, i] if s == 0 else arith.shrui(words[t, i], c32(s))
        src = shifted[t, i, s]
        if index is None:
          r = llvm.inline_asm(i32, [src], f"lop3.b32 $0, $1, {mask:#x}, {base:#x}, {lut:#x};", "=r,r")
        else:
          zi = index[t]
          zz, ss = packed[zi[3]][i]
          for c in (2, 1, 0):
            if zi[c] != zi[3]:
              is_c = arith.cmpi(arith.CmpIPredicate.eq, lane, c32(c))
              zz = arith.select(is_c, packed[zi[c]][i][0], zz)
              ss = arith.select(is_c, packed[zi[c]][i][1], ss)
          r = llvm.inline_asm(
              i32, [src, zz, ss],
              "{ .reg .b32 t;\n"
              f"lop3.b32 t, $1, {mask:#x}, {base:#x}, {lut:#x};\n"
              f"sub.{suf} t, t, $2;\n"
              f"mul.rn.{suf} $0, t, $3;\n"
              "}", "=r,r,r,r")
        out[0, u, 0, 0, i, 0, 0, 0, 0] = mgpu.utils.bitcast(r, vec2)
    return fa.FragmentedArray(_registers=out, _layout=fa.WGMMA_LAYOUT, _is_signed=None)

  return decode


# ---- BCQ, reg mode: all planes combined in registers, one wgmma per 64 x 64 block -----------------------

def decode_bcq_reg_jnp(ws, chunk, alphas, offset, *, dtype):
  """sum_i alpha_i * (+-1)_i + offset, rounded to bf16 after each add (as the PTX does), chunk `chunk`."""
  acc = None
  for w, a in zip(ws, alphas):
    f = _fields(w, "bcq", 1).astype(jnp.float32)
    t = (2.0 * f - 1.0) * a.astype(jnp.float32)[:, None]  # exact: +-alpha
    if acc is None:
      acc = t if offset is None else (t + offset.astype(jnp.float32)[:, None]).astype(dtype).astype(jnp.float32)
    else:
      acc = (acc + t).astype(dtype).astype(jnp.float32)
  a = acc.astype(dtype)
  cpt, pp = 128, 16
  units = [(t, p) for t in range(a.shape[1] // cpt) for p in range(pp)][8 * chunk:8 * chunk + 8]
  cols = [t * cpt + c * 2 * pp + e * pp + p for (t, p) in units for c in range(4) for e in range(2)]
  return jnp.concatenate([a[:, i:i + 1] for i in cols], axis=1)


def decode_bcq_reg_ptx(chunk, *, q, n_bytes, with_offset, dtype):
  """inline_mgpu: q (64, n_bytes) plane arrays + q alpha rows (+ offset row) -> (64, 64) WGMMA array.
  Per pair and plane: shift the sign bits to 15/31, lop3 flips alpha's sign where the bit is 0, add."""
  from jax.experimental.mosaic import gpu as mgpu
  from jax.experimental.mosaic.gpu import fragmented_array as fa
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, llvm

  dtype = jnp.dtype(dtype)
  suf = "bf16x2" if dtype == jnp.bfloat16 else "f16x2"
  units = [(t, p) for t in range(n_bytes // 16) for p in range(16)][8 * chunk:8 * chunk + 8]
  out_t = plgpu.ShapeDtypeStruct((64, 64), dtype, layout=WG)
  arg_types = ([WG8] * q, [ROW] * q, [ROW] * (1 if with_offset else 0))

  @plgpu.inline_mgpu(arg_types=arg_types, return_type=out_t)
  def decode(ctx, ws, alphas, offs):
    del ctx
    i32 = ir.IntegerType.get_signless(32)
    i16 = ir.IntegerType.get_signless(16)
    vec2 = ir.VectorType.get((2,), mgpu.utils.dtype_to_ir_type(dtype))

    def pack(row, i):
      h = mgpu.utils.bitcast(row.registers[0, 0, i, 0, 0], i16)
      return llvm.inline_asm(i32, [h], "mov.b32 $0, {$1, $1};", "=r,h")

    al = [[pack(a, i) for i in range(2)] for a in alphas]
    of = [[pack(o, i) for i in range(2)] for o in offs]
    out = np.empty(fa.WGMMA_LAYOUT.registers_shape((64, 64)), dtype=object)
    words = {}
    for u, (t, p) in enumerate(units):
      for i in range(2):
        acc = of[0][i] if offs else None
        for pl_ in range(q):
          if (pl_, t, i) not in words:
            words[pl_, t, i] = mgpu.utils.bitcast(ws[pl_].registers[0, t, 0, 0, i, 0, 0, 0, 0], i32)
          w = words[pl_, t, i]
          sh = w if p == 15 else arith.shli(w, arith.constant(i32, 15 - p))
          # (~a & b) ^ c: alpha with its sign flipped where the sign bit (bit p / p + 16) is 0
          v = llvm.inline_asm(i32, [sh, al[pl_][i]], "lop3.b32 $0, $1, 0x80008000, $2, 0xa6;", "=r,r,r")
          acc = v if acc is None else llvm.inline_asm(i32, [acc, v], f"add.rn.{suf} $0, $1, $2;", "=r,r,r")
        out[0, u, 0, 0, i, 0, 0, 0, 0] = mgpu.utils.bitcast(acc, vec2)
    return fa.FragmentedArray(_registers=out, _layout=fa.WGMMA_LAYOUT, _is_signed=None)

  return decode
