"""Weight-only y = x @ W for uniform 2/4-bit codes on Hopper (Mosaic GPU), streaming the packed bytes once.

  x (M, K) bf16/f16 (f32 is cast to bf16), W given in storage v2: codes uint8 (N, ceil(K/8)*bits), code k of
  row n the b-bit two's-complement value v[n, k] (8 codes = one little-endian (8*bits)-bit word); scale
  (ceil(K/k_group), ceil(N/n_group)) f32/bf16/f16; zero the same shape or None.
  W[k, n] = (v[n, k] - zero[g(k), h(n)]) * scale[g(k), h(n)];  y = x @ W (+ bias), float32 accumulation.

"Swap AB": each warpgroup computes y^T for 64 output channels: the decoded weight tile (64 x 64 per wgmma)
is the wgmma A operand from registers, x^T (64 x tile_m tokens, from SMEM) the B operand, so a batch of 1-64
tokens costs one tensor-core pass over the weights and a tiny (64 x tile_m) f32 accumulator. TMA streams
(tile_n x tile_k) code tiles, (tile_m x tile_k) activation tiles and the scale rows of the step's groups into
`stages` SMEM slots; split-K (grid axis "s") when N / tile_n CTAs are too few for the SMs.

Decode (per thread, per 32-bit word of codes, inline PTX; CUTLASS-style magic numbers): a word holds
cpw = 32 / bits codes; pair p = codes (p, p + cpw/2) sit at bits (bits*p, bits*p + 16). One lop3 builds the two
16-bit floats (magic + (v + 2^(bits-1))) exactly, `sub` of the per-row (magic + 2^(bits-1) + zero) gives v - zero
exactly, `mul` by the per-row scale rounds once to bf16/f16. No shuffles: the pair of word p, thread lane c
simply is wgmma column (8p + 2c + e) of its block of 4*cpw codes, i.e. the kernel contracts over a permuted K.
The same permutation is applied to x (a gather in the wrapper, on M x K elements only): see `permute_x`.

Interpret mode (CPU) runs the same kernel with the decode written in jnp (`_decode_jnp`, same rounding, same
permutation) and the A operand staged through SMEM (interpret wgmma reads refs only); the PTX path runs only on
a GPU. Group sizes: k_group a multiple of 32 (2-bit: 16 codes share a scale inside a word, so 32 is the least
the decode handles), or k_group >= K (one group); anything else raises ValueError before launch.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

BITS = (2, 4)
X_DTYPES = (jnp.bfloat16, jnp.float16)
SCALE_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
MAX_TILE_M = 64          # tokens per CTA; more rows of x are more CTAs (the batched kernel is for those)
_MAGIC = {jnp.dtype(jnp.bfloat16): 128, jnp.dtype(jnp.float16): 1024}  # exponent where 1 ulp == 1.0

_WG8 = plgpu.Layout.WGMMA_8BIT
_WG = plgpu.Layout.WGMMA
_ROW = plgpu.Layout.WGMMA.reduce(1)


@dataclasses.dataclass(frozen=True)
class TuningConfig:
  tile_n: int = 128   # output channels per CTA (multiple of 64: one wgmma M per 64)
  tile_k: int = 512   # K per pipeline step (multiple of 1024 / bits: one 128-byte swizzle row of codes)
  stages: int = 4     # SMEM slots (TMA copies in flight = stages - 1 while one slot is decoded)
  split_k: int = 1    # CTAs along K; their float32 partial sums are added by XLA
  tile_m: int = 8     # tokens per CTA: the wgmma N (8..64, multiple of 8)

  def validate(self, bits: int):
    if self.tile_n % 64 or not 64 <= self.tile_n <= 256:
      raise ValueError(f"config.tile_n: a multiple of 64 in [64, 256], got {self.tile_n}")
    row = 1024 // bits
    if self.tile_k % row or self.tile_k > 4096:
      raise ValueError(f"config.tile_k: a multiple of {row} (128 bytes of {bits}-bit codes) <= 4096, got {self.tile_k}")
    if self.tile_m % 8 or not 8 <= self.tile_m <= MAX_TILE_M:
      raise ValueError(f"config.tile_m: a multiple of 8 in [8, {MAX_TILE_M}], got {self.tile_m}")
    if self.stages < 2 or self.split_k < 1:
      raise ValueError(f"config: stages >= 2 and split_k >= 1, got {self.stages}, {self.split_k}")


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def smem_bytes(cfg: TuningConfig, bits: int, x_itemsize: int = 2, scale_itemsize: int = 4,
               k_group: int = 128, with_zero: bool = False) -> int:
  """Shared memory one CTA needs (pipeline slots + output tile)."""
  gpt = max(1, cfg.tile_k // k_group)
  per_stage = (cfg.tile_m * cfg.tile_k * x_itemsize + cfg.tile_n * cfg.tile_k * bits // 8
               + gpt * cfg.tile_n * scale_itemsize * (2 if with_zero else 1))
  return cfg.stages * per_stage + cfg.tile_n * cfg.tile_m * 4


def tile_m_for(m: int) -> int:
  return min(MAX_TILE_M, max(8, cdiv(m, 8) * 8 if m <= 16 else 1 << (m - 1).bit_length()))


def fit_tile_k(tile_k: int, k_group: int, k: int, bits: int) -> int:
  """The nearest tile_k that lies inside one group or holds whole groups (k_group a multiple of 32)."""
  row = 1024 // bits
  if k_group >= k or tile_k % k_group == 0 or k_group % tile_k == 0:
    return tile_k
  if math.lcm(row, k_group) <= 4096:
    return math.lcm(row, k_group)
  for t in range(tile_k, 0, -row):
    if k_group % t == 0:
      return t
  raise ValueError(f"k_group: no tile_k fits k_group={k_group} for {bits}-bit codes")


def default_config(m: int, n: int, k: int, *, bits: int = 4, k_group: int = 128, num_sms: int = 132) -> TuningConfig:
  """Untimed starting point: 2 CTAs of 64 channels per SM for small N, split-K when CTAs are few."""
  tile_m = tile_m_for(m)
  tile_k = fit_tile_k(2 * 1024 // bits, min(k_group, k), k, bits)
  tile_n = 128 if n >= 128 * num_sms else 64
  ctas = cdiv(n, tile_n) * cdiv(m, tile_m)
  steps = cdiv(k, tile_k)
  split = 1
  while ctas * split < 2 * num_sms and steps // (split * 2) >= 4:
    split *= 2
  return TuningConfig(tile_n=tile_n, tile_k=tile_k, stages=4, split_k=split, tile_m=tile_m)


def sweep_configs(m: int, n: int, k: int, *, bits: int = 4, k_group: int = 128) -> list[TuningConfig]:
  """<= 8 candidates worth timing for one shape (all fit in 227 KB of SMEM)."""
  tm = tile_m_for(m)
  row = 1024 // bits
  cands = [default_config(m, n, k, bits=bits, k_group=k_group)]
  for tn, tk, st, sp in [(64, 2 * row, 4, 1), (128, 2 * row, 4, 1), (128, 2 * row, 4, 2), (64, 4 * row, 3, 1),
                         (256, 2 * row, 3, 1), (128, row, 8, 1), (64, 2 * row, 6, 2)]:
    c = TuningConfig(tile_n=tn, tile_k=fit_tile_k(tk, min(k_group, k), k, bits), stages=st, split_k=sp, tile_m=tm)
    if c not in cands and smem_bytes(c, bits, k_group=k_group) <= 200_000:
      cands.append(c)
  return cands[:8]


# ---- decode --------------------------------------------------------------------------------------------

def _pairs_per_word(bits: int) -> int:
  return 16 // bits


def permute_x(x: jax.Array, bits: int) -> jax.Array:
  """x (M, Kp) -> the K order the kernel contracts in: inside each block of 4*cpw codes (cpw = 32/bits),
  column (8p + 2c + e) holds code (cpw*c + cpw/2*e + p) (lane c of a quad, pair p of its word, e low/high)."""
  m, kp = x.shape
  pp = _pairs_per_word(bits)
  return x.reshape(m, kp // (8 * pp), 4, 2, pp).transpose(0, 1, 4, 2, 3).reshape(m, kp)


def _decode_jnp(w, zz, ss, *, bits, dtype):
  """Interpret-mode stand-in for `_decode_ptx`: w (64, 128) uint8 -> (64, 128 * 8 / bits) in permuted order.

  zz, ss: per 16-byte column tile, per quad lane c, (64,) rows of (magic + 2^(bits-1) + zero) and scale."""
  cpb = 8 // bits
  w = w.astype(jnp.int32)
  n = jnp.stack([(w >> (bits * i)) & ((1 << bits) - 1) for i in range(cpb)], axis=-1).reshape(64, 128 * cpb)
  half = 1 << (bits - 1)
  u = (n ^ half).astype(jnp.float32)  # v + 2^(bits-1)
  tile = 16 * cpb  # codes per 16-byte column tile
  cols = []
  for t in range(8):
    for c in range(4):
      sl = u[:, t * tile + c * tile // 4: t * tile + (c + 1) * tile // 4]
      z = zz[t][c].astype(jnp.float32)[:, None] - _MAGIC[jnp.dtype(dtype)]
      d = (sl - z).astype(dtype).astype(jnp.float32)  # exact: small integers
      cols.append((d * ss[t][c].astype(jnp.float32)[:, None]).astype(dtype))
  return permute_x(jnp.concatenate(cols, axis=1), bits)


def _decode_ptx(bits, dtype, index):
  """Mosaic GPU decode: (64, 128) uint8 in WGMMA_8BIT layout -> one (64, 64) WGMMA-layout array per 64 codes.

  index[t][c]: which of the given zz/ss rows lane c uses in 16-byte column tile t."""
  from jax.experimental.mosaic import gpu as mgpu
  from jax.experimental.mosaic.gpu import fragmented_array as fa
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, llvm

  codes = 128 * 8 // bits
  out_t = plgpu.ShapeDtypeStruct((64, 64), dtype, layout=_WG)
  half = 1 << (bits - 1)
  magic = _MAGIC[jnp.dtype(dtype)]
  base = {128: 0x4300, 1024: 0x6400}[magic] | half
  mask = (1 << bits) - 1
  suf = "bf16x2" if dtype == jnp.bfloat16 else "f16x2"
  pp = _pairs_per_word(bits)
  n_zz = 1 + max(max(ti) for ti in index)

  @plgpu.inline_mgpu(arg_types=(_WG8, [_ROW] * n_zz, [_ROW] * n_zz), return_type=[out_t] * (codes // 64))
  def decode(ctx, w, zz_rows, ss_rows):
    del ctx
    i32 = ir.IntegerType.get_signless(32)
    i16 = ir.IntegerType.get_signless(16)
    vec2 = ir.VectorType.get((2,), mgpu.utils.dtype_to_ir_type(dtype))
    lane = arith.remui(mgpu.utils.thread_idx(), arith.constant(i32, 4))

    def pack(row, i):  # the 16-bit float of row half i, twice in one 32-bit register
      h = mgpu.utils.bitcast(row.registers[0, 0, i, 0, 0], i16)
      return llvm.inline_asm(i32, [h], "mov.b32 $0, {$1, $1};", "=r,h")

    packed = [[(pack(zz_rows[j], i), pack(ss_rows[j], i)) for i in range(2)] for j in range(n_zz)]
    out = np.empty(fa.WGMMA_LAYOUT.registers_shape((64, codes)), dtype=object)
    for t in range(8):
      for i in range(2):
        zi = index[t]
        if len(set(zi)) == 1:
          zz, ss = packed[zi[0]][i]
        else:  # several groups in one 16-byte tile: lane c picks its own
          zz, ss = packed[zi[3]][i]
          for c in (2, 1, 0):
            is_c = arith.cmpi(arith.CmpIPredicate.eq, lane, arith.constant(i32, c))
            zz = arith.select(is_c, packed[zi[c]][i][0], zz)
            ss = arith.select(is_c, packed[zi[c]][i][1], ss)
        word = mgpu.utils.bitcast(w.registers[0, t, 0, 0, i, 0, 0, 0, 0], i32)
        for p in range(pp):
          wp = word if p == 0 else arith.shrui(word, arith.constant(i32, bits * p))
          r = llvm.inline_asm(
              i32, [wp, zz, ss],
              "{ .reg .b32 t;\n"
              f"lop3.b32 t, $1, {mask | mask << 16:#x}, {base | base << 16:#x}, 0x6a;\n"  # (a & b) ^ c
              f"sub.{suf} t, t, $2;\n"
              f"mul.rn.{suf} $0, t, $3;\n"
              "}", "=r,r,r,r")
          out[0, pp * t + p, 0, 0, i, 0, 0, 0, 0] = mgpu.utils.bitcast(r, vec2)
    return [fa.FragmentedArray(_registers=out[:, 8 * j:8 * j + 8], _layout=fa.WGMMA_LAYOUT, _is_signed=None)
            for j in range(codes // 64)]

  return decode


# ---- kernel --------------------------------------------------------------------------------------------

def _kernel(x_gmem, w_gmem, s_gmem, *rest, bits, k_group, steps, cfg, dtype, interpret, with_zero):
  if with_zero:
    z_gmem, o_gmem = rest
  else:
    (o_gmem,) = rest
    z_gmem = None
  n_idx, m_idx, s_idx = lax.axis_index("n"), lax.axis_index("m"), lax.axis_index("s")
  tn, tk, tm = cfg.tile_n, cfg.tile_k, cfg.tile_m
  row_bytes = tk * bits // 8
  codes_per_tile = 128 // bits  # codes in one 16-byte column tile of a row
  gpt = max(1, tk // k_group)   # scale rows per step
  k_off = s_idx * steps
  if k_group >= tk:
    g_map = lambda k: ((k + k_off) * tk // k_group, n_idx)
  else:
    g_map = lambda k: (k + k_off, n_idx)
  bias = _MAGIC[jnp.dtype(dtype)] + (1 << (bits - 1))

  def group_of(chunk, t, c):  # scale row (inside the step's block) of lane c's word in column tile t
    if k_group >= tk:
      return 0
    return ((chunk * 8 + t) * codes_per_tile + c * codes_per_tile // 4) // k_group

  def step(idxs, x_smem, w_smem, s_smem, *z_smem_acc):
    del idxs
    z_smem = z_smem_acc[0] if with_zero else None
    acc_refs, a_smem = z_smem_acc[-2], z_smem_acc[-1]
    for r in range(tn // 64):
      rows = pl.ds(64 * r, 64)
      for chunk in range(row_bytes // 128):
        w = plgpu.load(w_smem.at[rows, pl.ds(128 * chunk, 128)], layout=_WG8)
        index = [[group_of(chunk, t, c) for c in range(4)] for t in range(8)]
        distinct = sorted({g for ti in index for g in ti})
        zz_rows, ss_rows = [], []
        for g in distinct:
          ss_rows.append(plgpu.load(s_smem.at[g, rows], layout=_ROW).astype(dtype))
          if with_zero:
            z = plgpu.load(z_smem.at[g, rows], layout=_ROW).astype(jnp.float32)
            zz_rows.append((z + float(bias)).astype(dtype))
          else:
            zz_rows.append(plgpu.layout_cast(jnp.full((64,), bias, dtype), _ROW))
        if interpret:
          zz = [[zz_rows[distinct.index(g)] for g in ti] for ti in index]
          ss = [[ss_rows[distinct.index(g)] for g in ti] for ti in index]
          a = _decode_jnp(w, zz, ss, bits=bits, dtype=dtype)
          a = [a[:, 64 * j:64 * (j + 1)] for j in range(a.shape[1] // 64)]
        else:
          local = tuple(tuple(distinct.index(g) for g in ti) for ti in index)
          a = _decode_ptx(bits, dtype, local)(w, zz_rows, ss_rows)
        for j, a_j in enumerate(a):
          kk = chunk * len(a) + j
          b = x_smem.at[:, pl.ds(64 * kk, 64)].T
          if interpret:  # interpret-mode wgmma reads A from a ref
            a_smem[...] = a_j
            plgpu.wgmma(acc_refs[r], a_smem, b)
          else:
            plgpu.wgmma(acc_refs[r], a_j, b)
    plgpu.wgmma_wait(0)  # the slot is refilled as soon as this step returns

  x_tr = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  w_tr = (plgpu.TilingTransform((8, 128)), plgpu.SwizzleTransform(128))
  in_specs = [
      plgpu.BlockSpec((tm, tk), lambda k: (m_idx, k + k_off), transforms=x_tr),
      plgpu.BlockSpec((tn, row_bytes), lambda k: (n_idx, k + k_off), transforms=w_tr),
      plgpu.BlockSpec((gpt, tn), g_map),
  ]
  if with_zero:
    in_specs.append(plgpu.BlockSpec((gpt, tn), g_map))
  gmem = (x_gmem, w_gmem, s_gmem) + ((z_gmem,) if with_zero else ())

  def scoped(o_smem, a_smem):
    def acc_scope(*acc_refs):
      pipe = plgpu.emit_pipeline(
          lambda idxs, *refs: step(idxs, *refs, acc_refs, a_smem),
          grid=(steps,), in_specs=in_specs, max_concurrent_steps=cfg.stages)
      pipe(*gmem)
      return [acc[...] for acc in acc_refs]
    accs = pl.run_scoped(acc_scope, *[plgpu.ACC((64, tm), jnp.float32) for _ in range(tn // 64)])
    for r, acc in enumerate(accs):
      o_smem[pl.ds(64 * r, 64), :] = acc
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[s_idx, pl.ds(n_idx * tn, tn), pl.ds(m_idx * tm, tm)])
    plgpu.wait_smem_to_gmem(0)

  pl.run_scoped(scoped, plgpu.SMEM((tn, tm), jnp.float32),
                plgpu.SMEM((64, 64), dtype) if interpret else None)


# ---- wrapper -------------------------------------------------------------------------------------------

def check_k_group(k_group: int, k: int, bits: int):
  if not isinstance(k_group, (int, np.integer)) or k_group < 1:
    raise ValueError(f"k_group: a positive int, got {k_group!r}")
  if k_group < k and k_group % 32:
    raise ValueError(f"k_group: this kernel supports multiples of 32 (32, 64, 128, ...) or k_group >= K={k}; "
                     f"got k_group={k_group}")


def _check_args(x, codes, scale, zero, bits, k_group, n_group, bias):
  if x.ndim != 2 or x.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
    raise ValueError(f"x: (M, K) bf16/f16/f32, got {x.shape} {x.dtype}")
  if bits not in BITS:
    raise ValueError(f"bits: supported {BITS}, got {bits!r}")
  m, k = x.shape
  need = cdiv(k, 8) * bits
  if (codes.ndim != 2 or codes.dtype != jnp.uint8
      or codes.shape[1] not in (need, need + (-need % 128))):  # storage v2, or as prepare_codes pads it
    raise ValueError(f"codes: uint8 (N, ceil(K/8)*bits) = (N, {need}), got {codes.shape} {codes.dtype}")
  n = codes.shape[0]
  check_k_group(k_group, k, bits)
  if n_group < 1:
    raise ValueError(f"n_group: a positive int, got {n_group}")
  sshape = (cdiv(k, k_group), cdiv(n, n_group))
  if scale.shape != sshape or scale.dtype not in SCALE_DTYPES:
    raise ValueError(f"scale: {sshape} f32/bf16/f16, got {scale.shape} {scale.dtype}")
  if zero is not None and (zero.shape != sshape or zero.dtype not in SCALE_DTYPES):
    raise ValueError(f"zero: {sshape} float or None, got {zero.shape} {zero.dtype}")
  if bias is not None and bias.shape != (n,):
    raise ValueError(f"bias: ({n},), got {bias.shape}")
  return m, n, k


def prepare_codes(codes):
  """Pad rows of codes to whole 128-byte TMA swizzle rows (zero codes past K; no-op for K % 256 == 0)."""
  return _pad_cols(codes, 128)


def _pad_cols(a, mult):
  extra = -a.shape[-1] % mult
  return a if extra == 0 else jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, extra)])


def uniform_matmul(x, codes, scale, zero=None, *, bits: int, k_group: int, n_group: int = 1, bias=None,
                   config: TuningConfig | None = None, out_dtype=None, interpret: bool | None = None):
  """y = x @ W (+ bias) for uniform `bits`-bit codes in storage v2. See the module docstring."""
  m, n, k = _check_args(x, codes, scale, zero, bits, k_group, n_group, bias)
  cfg = config or default_config(m, n, k, bits=bits, k_group=k_group)
  cfg.validate(bits)
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  out_dtype = jnp.dtype(out_dtype or (x.dtype if x.dtype != jnp.float32 else jnp.bfloat16))
  dtype = jnp.dtype(x.dtype if x.dtype != jnp.float32 else jnp.bfloat16)
  k_group = min(k_group, k)
  if k_group < k and cfg.tile_k % k_group and k_group % cfg.tile_k:
    raise ValueError(f"config.tile_k: must divide or be a multiple of k_group={k_group}, got {cfg.tile_k}")
  if n_group > 1:  # per-channel rows for the kernel (a copy of the small scale arrays)
    scale = jnp.repeat(scale, n_group, axis=1)[:, :n]
    zero = None if zero is None else jnp.repeat(zero, n_group, axis=1)[:, :n]
  tm, tk = cfg.tile_m, cfg.tile_k
  steps = cdiv(cdiv(k, tk), cfg.split_k)
  kp = steps * cfg.split_k * tk
  mp = cdiv(m, tm) * tm
  n_tiles = cdiv(n, cfg.tile_n)
  # TMA needs 16-byte row strides (scale rows of N floats) and rows of codes that are whole 128-byte swizzle
  # rows. Real shapes (K a multiple of 256, N of 8) pass untouched; others pay a copy here (or once: see
  # `prepare_codes`).
  codes = prepare_codes(codes)
  scale = _pad_cols(scale, 16 // scale.dtype.itemsize)
  zero = None if zero is None else _pad_cols(zero, 16 // zero.dtype.itemsize)
  # rows past M are zero-filled by TMA; the 8-row tiling only needs M <= 8 or a multiple of 8
  xp = jnp.pad(x.astype(dtype), ((0, 0 if m <= 8 else -m % 8), (0, kp - k)))
  xp = permute_x(xp, bits)
  kern = functools.partial(_kernel, bits=bits, k_group=k_group, steps=steps, cfg=cfg, dtype=dtype,
                           interpret=interpret, with_zero=zero is not None)
  out = plgpu.kernel(
      kern, out_type=jax.ShapeDtypeStruct((cfg.split_k, n_tiles * cfg.tile_n, mp), jnp.float32),
      grid=(n_tiles, mp // tm, cfg.split_k), grid_names=("n", "m", "s"),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
  )(xp, codes, scale, *(() if zero is None else (zero,)))
  y = out.sum(0) if cfg.split_k > 1 else out[0]
  y = y[:n, :m].T
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(out_dtype)


def unpack_codes(codes: np.ndarray, k: int, bits: int) -> np.ndarray:
  """uint8 (N, ceil(K/8)*bits) -> int (N, K) signed codes (numpy; for references and tests)."""
  n = codes.shape[0]
  words = codes.reshape(n, -1, bits).astype(np.uint64)
  word = np.zeros(words.shape[:2], np.uint64)
  for i in range(bits):
    word |= words[:, :, i] << np.uint64(8 * i)
  v = np.stack([(word >> np.uint64(bits * j)) & np.uint64((1 << bits) - 1) for j in range(8)], axis=-1)
  v = v.reshape(n, -1)[:, :k].astype(np.int64)
  return np.where(v >= 1 << (bits - 1), v - (1 << bits), v)


def reference(x, codes, scale, zero=None, *, bits: int, k_group: int, n_group: int = 1, bias=None):
  """Plain jnp: dequantize W (K, N) in float32, then x @ W."""
  m, k = x.shape
  v = jnp.asarray(unpack_codes(np.asarray(codes), k, bits), jnp.float32)  # (N, K)
  n = v.shape[0]
  g = jnp.arange(k) // min(k_group, k)
  h = jnp.arange(n) // n_group
  s = scale.astype(jnp.float32)[g][:, h]
  z = 0.0 if zero is None else zero.astype(jnp.float32)[g][:, h]
  w = (v.T - z) * s
  y = jnp.dot(x.astype(jnp.float32), w, precision=lax.Precision.HIGHEST)
  return y if bias is None else y + bias.astype(jnp.float32)
