"""Weight-only y = x @ W on Hopper (Mosaic GPU) for 1-64 tokens: the packed weights are streamed once.

  x (M, K) bf16/f16 (f32 is cast to bf16); W (K, N) in storage v2 (see `uniform_matmul`, `bcq_matmul`):
    uniform  codes uint8 (N, ceil(K/8)*bits), bits 2 or 4; scale/zero (ceil(K/k_group), ceil(N/n_group))
             W[k, n] = (v[n, k] - zero[g(k), h(n)]) * scale[g(k), h(n)]
    bcq      planes uint8 (q, N, ceil(K/8)), q = 1..4; alpha (q, ceil(K/k_group), N); offset (G, N) or None
             W[k, n] = sum_i alpha[i, g(k), n] * (+-1) + offset[g(k), n]
  y (M, N) = x @ W (+ bias), float32 accumulation, out dtype = x's (bf16 for f32 x) unless given.

"Swap AB": a warpgroup computes y^T for 64 output channels; the decoded weights (64 x 64 per wgmma, see
weight_only_decode_mgpu) are the wgmma A operand from registers and x^T (tile_m tokens) the B operand from
SMEM, so M <= 64 costs one tensor-core pass over the weights with tiny accumulators. TMA streams code tiles,
x tiles and the step's scale rows through `stages` SMEM slots; grid (N / tile_n, M tiles, split_k).

Two ways to apply scales ("mode"):
  reg  (default) scales / zero points / alphas / offsets applied to the decoded weights in registers, one
       wgmma per 64 x 64 block. Uniform: lop3, sub (magic + 2^(b-1) + zero), mul scale per register pair,
       any k_group % 32 == 0. BCQ: per plane a shift of the sign bits to 15/31 and a lop3 flipping alpha's
       sign, then an add (bf16 rounding after each of the q + 1 adds).
  acc  every (plane, K-group) gets its own wgmma accumulator per step; scales etc. are applied to those
       (64 x tile_m) float32 sums by per-row FMAs, with the group sums of x (from XLA) for the constant
       terms. Decode is one lop3 per register (uniform: exact magic + 2^(b-1) + v; BCQ: 1 + b 2^(j-7) on an
       x pre-scaled by 2^(7-j)), results are float32-exact, but it costs q wgmmas per block (BCQ) and an
       x-sum kernel. Needs k_group % 64 == 0 (uniform) / % 128 == 0 (BCQ), or one group.
Measured on an H200 at M <= 16 the wgmma count is the bottleneck (~18 SM cycles per m64n8k16 with A from
registers), the decode ALU work second: see weight_only_mgpu for the numbers.
Other group sizes raise ValueError naming k_group and the supported values, before launch.
Interpret mode (CPU) runs the same kernel with jnp decoders and A staged through SMEM.
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

from pallas_kernels import weight_only_decode_mgpu as dec

BITS = (2, 4)
MAX_PLANES = 4
SCALE_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
MAX_TILE_M = 64


@dataclasses.dataclass(frozen=True)
class TuningConfig:
  tile_n: int = 64    # output channels per CTA (multiple of 64: one wgmma M per 64)
  tile_k: int = 256   # K per pipeline step (a multiple of 16 bytes of codes per row, >= 64 codes)
  stages: int = 4     # SMEM slots: TMA copies in flight = stages - 1 while one slot is decoded
  split_k: int = 1    # CTAs along K; their float32 partial sums are added by XLA
  tile_m: int = 8     # tokens per CTA, the wgmma N (multiple of 8, <= 64)
  mode: str = "acc"   # "acc" or "reg" (see module docstring)


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _row_bytes(kind, bits, tile_k):
  return tile_k // 8 * (1 if kind == "bcq" else bits)


def smem_bytes(cfg: TuningConfig, *, kind="uniform", bits=4, q=1, k_group=128, coef_arrays=2, x_itemsize=2):
  gpt = max(1, cfg.tile_k // k_group)
  per_stage = (cfg.tile_m * cfg.tile_k * x_itemsize + q * cfg.tile_n * _row_bytes(kind, bits, cfg.tile_k)
               + coef_arrays * gpt * cfg.tile_n * 4)
  return cfg.stages * per_stage + cfg.tile_n * cfg.tile_m * 4 + (8192 if cfg.mode == "reg" else 0)


def tile_m_for(m: int) -> int:
  return min(MAX_TILE_M, cdiv(m, 8) * 8 if m <= 16 else 1 << (m - 1).bit_length())


def supported_groups(kind: str, bits: int = 4) -> str:
  if kind == "bcq":
    return "multiples of 128, or k_group >= K"
  return "multiples of 32 (multiples of 64 use the faster 'acc' mode), or k_group >= K"


def pick_mode(kind: str, k_group: int, k: int) -> str:
  if kind == "bcq" or k_group >= k or k_group % 64 == 0:
    return "acc"
  return "reg"


def check_k_group(kind: str, k_group, k: int, bits: int = 4):
  if not isinstance(k_group, (int, np.integer)) or k_group < 1:
    raise ValueError(f"k_group: a positive int, got {k_group!r}")
  if k_group < k and k_group % (128 if kind == "bcq" else 32):
    raise ValueError(f"k_group: the Mosaic GPU {kind} kernel supports {supported_groups(kind, bits)} (K={k}); "
                     f"got k_group={k_group}")


def fit_tile_k(tile_k: int, kind: str, bits: int, k_group: int, k: int) -> int:
  """The nearest tile_k (whole 16-byte tiles per row) inside one group or holding whole groups."""
  unit = 128 if kind == "bcq" else 128 // bits
  tile_k = max(2 * unit, tile_k // unit * unit, 64)  # >= 32 bytes of codes per row: swizzle 32 or more
  if k_group >= k or tile_k % k_group == 0 or k_group % tile_k == 0:
    return tile_k
  lcm = math.lcm(unit, 64, k_group)
  if lcm <= 4096:
    return lcm
  for t in range(tile_k, 0, -unit):
    if k_group % t == 0 and t % 64 == 0:
      return t
  raise ValueError(f"k_group: no tile_k fits k_group={k_group}")


def default_config(m, n, k, *, kind="uniform", bits=4, q=1, k_group=128, num_sms=132) -> TuningConfig:
  """Measured best on an H200 (28672 x 7168, 8192 x 8192, g128): 64 channels per CTA (several CTAs per SM
  hide the decode latency), 4 stages, 128-byte rows of codes (BCQ: 64-byte rows of each plane), "reg" mode
  (no x-sum kernel; "acc" was as fast in the kernel but needs one), split-K up to ~4 CTAs per SM."""
  k_group = min(k_group, k)
  tm = tile_m_for(m)
  tk = fit_tile_k(512 if kind == "bcq" else 1024 // bits, kind, bits, k_group, k)
  ctas = cdiv(n, 64) * cdiv(m, tm)
  split = 1
  while ctas * split < 4 * num_sms and cdiv(k, tk) // (split * 2) >= 4 and split < 4:
    split *= 2
  mode = "reg" if kind == "bcq" or k_group % 32 == 0 or k_group >= k else pick_mode(kind, k_group, k)
  return TuningConfig(tile_n=64, tile_k=tk, stages=4, split_k=split, tile_m=tm, mode=mode)


def sweep_configs(m, n, k, *, kind="uniform", bits=4, q=1, k_group=128) -> list[TuningConfig]:
  """<= 8 candidates worth timing for one shape (each fits 2+ CTAs in an SM's 227 KB of SMEM)."""
  base = default_config(m, n, k, kind=kind, bits=bits, q=q, k_group=k_group)
  unit = 256 if kind == "bcq" else 1024 // bits  # BCQ: 32 bytes of each plane's rows; else 128 bytes
  # (tile_n, tile_k / unit, stages, split_k, mode): H200, M=1: 64-channel CTAs (several per SM) were 2x
  # faster than 128-channel ones; "reg" and "acc" cost the same wgmmas, "acc" fewer ALU instructions
  other = "acc" if base.mode == "reg" and pick_mode(kind, k_group, k) == "acc" else None
  grid = [(64, 1, 4, 2, other), (64, 2, 4, 1, other), (64, 1, 4, 1, other), (64, 2, 4, 1, None),
          (64, 1, 3, 2, None), (64, 1, 6, 1, None),
          (64, 2, 3, 1, None), (64, 1, 4, 2, None), (64, 4, 2, 1, None), (128, 1, 4, 1, None),
          (64, 1, 8, 1, None)]
  out = [base]
  for tn, mult, st, sp, mode in grid:
    c = dataclasses.replace(base, tile_n=tn, tile_k=fit_tile_k(mult * unit, kind, bits, min(k_group, k), k),
                            stages=st, split_k=sp, mode=mode or base.mode)
    if c not in out and smem_bytes(c, kind=kind, bits=bits, q=q, k_group=k_group) <= 113_000:
      out.append(c)
  return out[:8]


# ---- kernel --------------------------------------------------------------------------------------------

def _kernel(x_gmem, w_gmem, *rest, kind, bits, q, n_in, k_group, steps, cfg, dtype, interpret, out_rows):
  coef_gmem, xs_gmem, o_gmem = rest[:n_in], rest[n_in:-1], rest[-1]
  n_idx, m_idx, s_idx = lax.axis_index("n"), lax.axis_index("m"), lax.axis_index("s")
  tn, tk, tm = cfg.tile_n, cfg.tile_k, cfg.tile_m
  acc_mode = cfg.mode == "acc"
  row_bytes = _row_bytes(kind, bits, tk)
  chunk_bytes = min(128, row_bytes)  # one swizzle row: what a warpgroup loads at once
  cpt = dec.codes_per_tile(kind, bits)
  gpt = max(1, tk // k_group)
  k_off = s_idx * steps
  if k_group >= tk:
    g_map = lambda k: ((k + k_off) * tk // k_group, n_idx)
  else:
    g_map = lambda k: (k + k_off, n_idx)
  n_sets = gpt if acc_mode else 1
  per_set = q if acc_mode else 1
  n_xs = (2 if kind == "bcq" else 1) if acc_mode else 0  # group sums of x (and of x' for BCQ), from XLA

  def group_of(code):  # K-group (row of the step's coefficient block) of a code offset inside the step
    return 0 if k_group >= tk else code // k_group

  def chunk_group(kk):  # group of wgmma chunk kk (64 permuted columns) of the step
    return group_of(kk * 64 if kind != "bcq" else kk // 2 * 128)

  def coef_rows(coef_sms, g, rows):
    load = lambda ref: plgpu.load(ref.at[g, rows], layout=dec.ROW).astype(jnp.float32)
    return [load(ref) for ref in coef_sms]

  def fold(total, vals, coefs, xs):
    """total (64, tm) f32 += the group's accumulators times per-row coefficients, plus the per-row x
    per-token group-sum outer products (xs: (tm,) sums of x, and for BCQ of x')."""
    bc = lambda v: plgpu.layout_cast(lax.broadcast_in_dim(v, (64, tm), (0,)), dec.WG)
    bx = lambda v: plgpu.layout_cast(lax.broadcast_in_dim(v, (64, tm), (1,)), dec.WG)
    if kind == "bcq":  # sum_i alpha_i (2 (acc_i - xs') - xs) + offset xs
      alphas, offset = coefs[:q], (coefs[q] if len(coefs) > q else None)
      asum = functools.reduce(lambda a, b: a + b, alphas)
      for i in range(q):
        total = total + vals[i] * bc(2.0 * alphas[i])
      total = total - bc(2.0 * asum) * bx(xs[1])
      return total + bc((offset - asum) if offset is not None else -asum) * bx(xs[0])
    s = coefs[0]  # s (acc - (magic + 2^(b-1) + zero) xs)
    zb = dec.MAGIC[jnp.dtype(dtype)] + (1 << (bits - 1)) + (coefs[1] if len(coefs) > 1 else 0.0)
    return total + vals[0] * bc(s) - bc(s * zb) * bx(xs[0])

  def step(idxs, x_sm, *refs, a_smem, xs_sms):
    (k_step,) = idxs
    w_sms, coef_sms, carry = refs[:q], refs[q:-1], refs[-1]
    new = []
    for r in range(tn // 64):
      rows = pl.ds(64 * r, 64)

      def acc_scope(*accs):
        for ch in range(row_bytes // chunk_bytes):
          ws = [plgpu.load(w_sm.at[rows, pl.ds(chunk_bytes * ch, chunk_bytes)], layout=dec.WG8) for w_sm in w_sms]
          n_chunks = chunk_bytes * 8 // (1 if kind == "bcq" else bits) // 64
          reg_rows = None
          if not acc_mode and kind != "bcq":  # lane c of 16-byte tile t: its group's (magic + 2^(b-1) + zero, scale) rows
            index = [[group_of((ch * chunk_bytes // 16 + t) * cpt + c * cpt // 4) for c in range(4)]
                     for t in range(chunk_bytes // 16)]
            distinct = sorted({g for ti in index for g in ti})
            bias = dec.MAGIC[jnp.dtype(dtype)] + (1 << (bits - 1))
            zz, ss = [], []
            for g in distinct:
              cr = coef_rows(coef_sms, g, rows)
              ss.append(cr[0].astype(dtype))
              zz.append((cr[1] + bias if len(cr) > 1 else cr[0] * 0.0 + bias).astype(dtype))
            reg_rows = (index, distinct, zz, ss)
          for j in range(n_chunks):
            kk = ch * n_chunks + j
            b = x_sm.at[:, pl.ds(64 * kk, 64)].T
            set_base = per_set * chunk_group(kk) if acc_mode else 0
            if kind == "bcq" and not acc_mode:  # planes combined in registers: one wgmma
              cr = [c.astype(dtype) for c in coef_rows(coef_sms, chunk_group(kk), rows)]
              alphas, offs = cr[:q], cr[q:]
              if interpret:
                a = dec.decode_bcq_reg_jnp(ws, j, alphas, offs[0] if offs else None, dtype=dtype)
              else:
                a = dec.decode_bcq_reg_ptx(j, q=q, n_bytes=chunk_bytes, with_offset=bool(offs), dtype=dtype)(
                    ws, alphas, offs)
              _mma(accs[0], a, b)
              continue
            for i, w in enumerate(ws):
              if interpret:
                kw = {}
                if reg_rows is not None:
                  index, distinct, zz, ss = reg_rows
                  kw = dict(zz=[[zz[distinct.index(g)] for g in ti] for ti in index],
                            ss=[[ss[distinct.index(g)] for g in ti] for ti in index])
                a = dec.decode_jnp(w, j, kind=kind, bits=bits, dtype=dtype, **kw)
              elif reg_rows is None:
                a = dec.decode_ptx(j, kind=kind, bits=bits, dtype=dtype, n_bytes=chunk_bytes)(w)
              else:
                index, distinct, zz, ss = reg_rows
                local = tuple(tuple(distinct.index(g) for g in ti) for ti in index)
                a = dec.decode_ptx(j, kind=kind, bits=bits, dtype=dtype, n_bytes=chunk_bytes, index=local)(w, zz, ss)
              _mma(accs[set_base + i], a, b)
        return [acc[...] for acc in accs]

      def _mma(acc, a, b):
        if interpret:  # interpret-mode wgmma reads A from a ref
          a_smem[...] = a
          plgpu.wgmma(acc, a_smem, b)
        else:
          plgpu.wgmma(acc, a, b)

      vals = pl.run_scoped(acc_scope, *[plgpu.ACC((64, tm), jnp.float32) for _ in range(n_sets * per_set)])
      total = carry[r]
      if acc_mode:
        for g in range(n_sets):
          seg = (k_step + k_off) * gpt + g
          xs = [plgpu.load(ref.at[seg], layout=dec.COL) for ref in xs_sms]
          total = fold(total, vals[g * per_set:(g + 1) * per_set], coef_rows(coef_sms, g, rows), xs)
      else:
        total = total + vals[0]
      new.append(total)
    return new

  x_sw = 128
  w_sw = chunk_bytes
  in_specs = [plgpu.BlockSpec((tm, tk), lambda k: (m_idx, k + k_off),
                              transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(x_sw)))]
  in_specs += [plgpu.BlockSpec((tn, row_bytes), lambda k: (n_idx, k + k_off),
                               transforms=(plgpu.TilingTransform((8, w_sw)), plgpu.SwizzleTransform(w_sw)))] * q
  w_refs = [w_gmem] if kind != "bcq" else [w_gmem.at[i] for i in range(q)]
  c_refs = list(coef_gmem) if kind != "bcq" else [coef_gmem[0].at[i] for i in range(q)] + list(coef_gmem[1:])
  in_specs += [plgpu.BlockSpec((gpt, tn), g_map)] * len(c_refs)

  def scoped(o_smem, a_smem, xs_sms, xs_bar):
    # x sums per segment of min(k_group, tile_k) (a group spanning several steps gets its share in each),
    # all segments of this CTA's M tile, copied once
    for ref, sm in zip(xs_gmem, xs_sms):
      for r0 in range(0, ref.shape[0], 256):
        rows_ = pl.ds(r0, min(256, ref.shape[0] - r0))
        plgpu.copy_gmem_to_smem(ref.at[rows_, pl.ds(m_idx * tm, tm)], sm.at[rows_], xs_bar)
    if xs_gmem:
      plgpu.barrier_wait(xs_bar)
    zero = plgpu.layout_cast(jnp.zeros((64, tm), jnp.float32), dec.WG)
    pipe = plgpu.emit_pipeline(
        functools.partial(step, a_smem=a_smem, xs_sms=xs_sms),
        grid=(steps,), in_specs=in_specs, max_concurrent_steps=cfg.stages, init_carry=[zero] * (tn // 64))
    totals = pipe(x_gmem, *w_refs, *c_refs)
    for r, tot in enumerate(totals):
      val = tot.astype(o_smem.dtype) if o_smem.dtype != jnp.float32 else plgpu.layout_cast(
          tot, plgpu.Layout._WGMMA_ACC_32BIT)
      o_smem.T.at[pl.ds(64 * r, 64)][...] = val  # (tm, tn) tile, tokens as rows: y, not y^T
    plgpu.commit_smem()
    dst = o_gmem if o_gmem.ndim == 2 else o_gmem.at[s_idx]
    if out_rows is not None:  # one M tile holding all M rows: store only those (TMA clips N)
      plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, out_rows)], dst.at[:, pl.ds(n_idx * tn, tn)])
    else:
      plgpu.copy_smem_to_gmem(o_smem, dst.at[pl.ds(m_idx * tm, tm), pl.ds(n_idx * tn, tn)])
    plgpu.wait_smem_to_gmem(0)

  out_dtype = o_gmem.dtype
  n_copies = sum(cdiv(ref.shape[0], 256) for ref in xs_gmem)
  pl.run_scoped(scoped, plgpu.SMEM((tm, tn), out_dtype), plgpu.SMEM((64, 64), dtype) if interpret else None,
                [plgpu.SMEM((ref.shape[0], tm), jnp.float32) for ref in xs_gmem],
                plgpu.Barrier(num_arrivals=n_copies) if n_copies else None)


# ---- wrappers ------------------------------------------------------------------------------------------

def _check_x(x):
  if x.ndim != 2 or x.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
    raise ValueError(f"x: (M, K) bf16/f16/f32, got {x.shape} {x.dtype}")
  return x.shape


def _check_coef(name, a, shape):
  if a is not None and (tuple(a.shape) != tuple(shape) or a.dtype not in SCALE_DTYPES):
    raise ValueError(f"{name}: {tuple(shape)} f32/bf16/f16, got {tuple(a.shape)} {a.dtype}")


def _pad_cols(a, mult):
  extra = -a.shape[-1] % mult
  return a if extra == 0 else jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, extra)])


def prepare_codes(codes):
  """Pad rows of packed codes/planes to whole 128-byte TMA rows (zero codes past K; a no-op when
  ceil(K/8)*bits is a multiple of 128, e.g. K % 256 == 0 at 4 bits). Do it once at load time for odd K."""
  return _pad_cols(codes, 128)


def _launch(kind, x, w, coefs, *, bits, q, k_group, n, cfg, interpret, out_dtype, bias):
  m, k = x.shape
  k_group = min(k_group, k)
  rb = _row_bytes(kind, bits, cfg.tile_k)
  if cfg.tile_k % 64 or not (rb in (32, 64, 128) or rb % 128 == 0):
    raise ValueError(f"config.tile_k: 32, 64 or a multiple of 128 bytes of codes per row and a multiple of 64; "
                     f"got tile_k={cfg.tile_k} ({rb} bytes)")
  if k_group < k and cfg.tile_k % k_group and k_group % cfg.tile_k:
    raise ValueError(f"config.tile_k: must divide or be a multiple of k_group={k_group}, got {cfg.tile_k}")
  if cfg.mode == "acc" and pick_mode(kind, k_group, k) != "acc":
    raise ValueError(f"config.mode: 'acc' needs k_group % 64 == 0 (uniform) or one group; got {k_group}")
  if cfg.mode not in ("acc", "reg"):
    raise ValueError(f"config.mode: 'acc' or 'reg', got {cfg.mode!r}")
  if cfg.tile_n % 64 or cfg.tile_m % 8 or not 8 <= cfg.tile_m <= MAX_TILE_M or cfg.stages < 2 or cfg.split_k < 1:
    raise ValueError(f"config: tile_n % 64, tile_m in 8..{MAX_TILE_M} (% 8), stages >= 2, split_k >= 1; got {cfg}")
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  # BCQ decodes to bf16 (its x' = x * 2^(7-j) could overflow f16); uniform codes run in f16 for f16 x.
  dtype = jnp.dtype(jnp.bfloat16 if kind == "bcq" or x.dtype == jnp.float32 else x.dtype)
  out_dtype = jnp.dtype(out_dtype or (x.dtype if x.dtype != jnp.float32 else jnp.bfloat16))
  tm, tk = cfg.tile_m, cfg.tile_k
  steps = cdiv(cdiv(k, tk), cfg.split_k)
  kp = steps * cfg.split_k * tk
  m_tiles = cdiv(m, tm)
  n_tiles = cdiv(n, cfg.tile_n)
  # TMA: rows of codes are whole 128-byte swizzle rows (prepare_codes), coefficient rows 16-byte multiples
  # (N % 8 == 0 for 16-bit scales); other shapes pay a copy here. x rows past M are zero-filled by TMA.
  w = prepare_codes(w)
  coefs = [None if c is None else _pad_cols(c, 16 // c.dtype.itemsize) for c in coefs]
  xp = jnp.pad(x.astype(dtype), ((0, 0 if m <= 8 else -m % 8), (0, kp - k)))
  xp = dec.permute_x(xp, dec.pairs_per_word(kind, bits))
  if kind == "bcq" and cfg.mode == "acc":  # x' = x * 2^(7-j): exact in bf16
    xp = (xp.astype(jnp.float32) * jnp.asarray(dec.bcq_x_scale(kp), jnp.float32)).astype(dtype)
  coefs = [c for c in coefs if c is not None]
  xs = []
  if cfg.mode == "acc":  # per-group sums of the x the kernel sees (bf16 values, f32 sums), (G, M tiles * tm)
    kg = min(k_group, tk)  # segments: whole groups inside a step, or the step's part of its group
    g = kp // kg
    xk = jnp.pad(x.astype(dtype).astype(jnp.float32), ((0, m_tiles * tm - m), (0, g * kg - k)))
    pad4 = lambda a: jnp.pad(a, ((0, -a.shape[0] % 4), (0, 0)))  # TMA: copies of 128-byte multiples
    xs.append(pad4(xk.reshape(m_tiles * tm, g, kg).sum(-1).T))
    if kind == "bcq":  # groups are whole 128-blocks, inside which the permutation stays
      xq = jnp.pad(xp.astype(jnp.float32), ((0, m_tiles * tm - xp.shape[0]), (0, g * kg - kp)))
      xs.append(pad4(xq.reshape(m_tiles * tm, g, kg).sum(-1).T))
  single = m_tiles == 1
  rows = m if single else m_tiles * tm
  direct = cfg.split_k == 1
  shape = (rows, n_tiles * cfg.tile_n) if direct else (cfg.split_k, rows, n_tiles * cfg.tile_n)
  kern = functools.partial(_kernel, kind=kind, bits=bits, q=q, n_in=len(coefs), k_group=k_group, steps=steps,
                           cfg=cfg, dtype=dtype, interpret=interpret, out_rows=m if single else None)
  out = plgpu.kernel(
      kern, out_type=jax.ShapeDtypeStruct(shape, out_dtype if direct else jnp.float32),
      grid=(n_tiles, m_tiles, cfg.split_k), grid_names=("n", "m", "s"),
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
  )(xp, w, *coefs, *xs)
  y = out if direct else out.sum(0)
  if y.shape != (m, n):
    y = y[:m, :n]
  if bias is not None:
    y = y.astype(jnp.float32) + bias.astype(jnp.float32)
  return y.astype(out_dtype)


def uniform_matmul(x, codes, scale, zero=None, *, bits: int, k_group: int, n_group: int = 1, bias=None,
                   config: TuningConfig | None = None, out_dtype=None, interpret: bool | None = None):
  """y = x @ W (+ bias) for uniform `bits`-bit codes (storage v2, or rows padded by `prepare_codes`)."""
  m, k = _check_x(x)
  if bits not in BITS:
    raise ValueError(f"bits: the Mosaic GPU uniform kernel supports {BITS} (3-bit: planes, see bcq_matmul); got {bits!r}")
  need = cdiv(k, 8) * bits
  if codes.ndim != 2 or codes.dtype != jnp.uint8 or codes.shape[1] not in (need, need + (-need % 128)):
    raise ValueError(f"codes: uint8 (N, ceil(K/8)*bits) = (N, {need}), got {tuple(codes.shape)} {codes.dtype}")
  n = codes.shape[0]
  check_k_group("uniform", k_group, k, bits)
  if not isinstance(n_group, (int, np.integer)) or n_group < 1:
    raise ValueError(f"n_group: a positive int, got {n_group!r}")
  shape = (cdiv(k, min(k_group, k)), cdiv(n, n_group))
  if scale is None:
    raise ValueError("scale: required")
  _check_coef("scale", scale, shape)
  _check_coef("zero", zero, shape)
  if bias is not None and tuple(bias.shape) != (n,):
    raise ValueError(f"bias: ({n},), got {tuple(bias.shape)}")
  if n_group > 1:  # per-channel rows for the kernel (a copy of the small scale arrays)
    scale = jnp.repeat(scale, n_group, axis=1)[:, :n]
    zero = None if zero is None else jnp.repeat(zero, n_group, axis=1)[:, :n]
  cfg = config or default_config(m, n, k, bits=bits, k_group=k_group)
  return _launch("uniform", x, codes, [scale, zero], bits=bits, q=1, k_group=k_group, n=n, cfg=cfg,
                 interpret=interpret, out_dtype=out_dtype, bias=bias)


def bcq_matmul(x, planes, alpha, offset=None, *, k_group: int, bias=None, config: TuningConfig | None = None,
               out_dtype=None, interpret: bool | None = None):
  """y = x @ W (+ bias) for BCQ sign planes (storage v2; uniform q-bit codes convert exactly, see
  jaxquant.formats). f16 x is rounded to bf16 here (the output keeps x's dtype)."""
  m, k = _check_x(x)
  if planes.ndim != 3 or planes.dtype != jnp.uint8 or not 1 <= planes.shape[0] <= MAX_PLANES:
    raise ValueError(f"planes: uint8 (q, N, ceil(K/8)) with q in 1..{MAX_PLANES}, got {tuple(planes.shape)} {planes.dtype}")
  q, n, c = planes.shape
  if c not in (cdiv(k, 8), cdiv(k, 8) + (-cdiv(k, 8) % 128)):
    raise ValueError(f"planes: last dim ceil(K/8) = {cdiv(k, 8)} for K={k}, got {c}")
  check_k_group("bcq", k_group, k)
  g = cdiv(k, min(k_group, k))
  if alpha is None:
    raise ValueError("alpha: required")
  _check_coef("alpha", alpha, (q, g, n))
  _check_coef("offset", offset, (g, n))
  if bias is not None and tuple(bias.shape) != (n,):
    raise ValueError(f"bias: ({n},), got {tuple(bias.shape)}")
  cfg = config or default_config(m, n, k, kind="bcq", q=q, k_group=k_group)
  return _launch("bcq", x, planes, [alpha, offset], bits=1, q=q, k_group=k_group, n=n, cfg=cfg,
                 interpret=interpret, out_dtype=out_dtype, bias=bias)


# ---- references (plain jnp / numpy) ----------------------------------------------------------------------

def unpack_codes(codes, k: int, bits: int) -> np.ndarray:
  """uint8 (N, >= ceil(K/8)*bits) -> int64 (N, K) signed codes (numpy)."""
  codes = np.asarray(codes)
  n = codes.shape[0]
  words = codes[:, :cdiv(k, 8) * bits].reshape(n, -1, bits).astype(np.uint64)
  word = np.zeros(words.shape[:2], np.uint64)
  for i in range(bits):
    word |= words[:, :, i] << np.uint64(8 * i)
  v = np.stack([(word >> np.uint64(bits * j)) & np.uint64((1 << bits) - 1) for j in range(8)], axis=-1)
  v = v.reshape(n, -1)[:, :k].astype(np.int64)
  return np.where(v >= 1 << (bits - 1), v - (1 << bits), v)


def uniform_reference(x, codes, scale, zero=None, *, bits: int, k_group: int, n_group: int = 1, bias=None):
  m, k = x.shape
  v = jnp.asarray(unpack_codes(codes, k, bits), jnp.float32)  # (N, K)
  g = jnp.arange(k) // min(k_group, k)
  h = jnp.arange(v.shape[0]) // n_group
  s = scale.astype(jnp.float32)[g][:, h]
  w = (v.T - (0.0 if zero is None else zero.astype(jnp.float32)[g][:, h])) * s
  y = jnp.dot(x.astype(jnp.float32), w, precision=lax.Precision.HIGHEST)
  return y if bias is None else y + bias.astype(jnp.float32)


def bcq_reference(x, planes, alpha, offset=None, *, k_group: int, bias=None):
  m, k = x.shape
  bits = np.unpackbits(np.asarray(planes)[:, :, :cdiv(k, 8)], axis=-1, bitorder="little")[:, :, :k]
  signs = jnp.asarray(2.0 * bits - 1.0, jnp.float32)  # (q, N, K)
  g = jnp.arange(k) // min(k_group, k)
  w = jnp.sum(alpha.astype(jnp.float32)[:, g, :] * jnp.swapaxes(signs, 1, 2), axis=0)  # (K, N)
  if offset is not None:
    w = w + offset.astype(jnp.float32)[g]
  y = jnp.dot(x.astype(jnp.float32), w, precision=lax.Precision.HIGHEST)
  return y if bias is None else y + bias.astype(jnp.float32)
