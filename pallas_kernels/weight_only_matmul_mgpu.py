"""Weight-only y = x @ W for prefill-sized M on Hopper (Mosaic GPU): decode in registers, wgmma, warp specialized.

  x (M, K) bf16/f16 (f32 cast to bf16); uniform 2/4-bit codes in storage v2 (see weight_only_gemv_mgpu):
  codes uint8 (N, ceil(K/8)*bits), scale/zero (ceil(K/k_group), N); y (M, N) = x @ W, float32 accumulation.

Same swap-AB form as the GEMV kernel, with big token tiles: a CTA computes a (tile_m tokens x 128 channels)
tile of y with two compute warpgroups (64 channels each: the decoded 64 x 64 weight block is the wgmma A operand
from registers, x^T (tile_m <= 256 tokens) the B operand from SMEM) and one TMA warpgroup
(`emit_pipeline_warp_specialized`), so each weight byte is read once per M tile and each x tile once per 128
channels. Scales and zero points are applied to the decoded weights in registers ("reg" mode of the decoder).
Supported: bits 2/4, k_group % 64 == 0 or k_group >= K, N % 128 == 0; other shapes raise ValueError (the
entry point then takes XLA's dequantize + dot). Untimed on a GPU at the time of writing: see the report.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import weight_only_decode_mgpu as dec
from pallas_kernels import weight_only_gemv_mgpu as gemv

TILE_N = 128  # two compute warpgroups of 64 output channels


@dataclasses.dataclass(frozen=True)
class TuningConfig:
  tile_m: int = 256  # tokens per CTA: the wgmma N (multiple of 64, <= 256)
  tile_k: int = 64   # K per pipeline step (64 or 128 codes)
  stages: int = 4


def smem_bytes(cfg: TuningConfig, bits: int = 4, out_itemsize: int = 2) -> int:
  per_stage = cfg.tile_m * cfg.tile_k * 2 + TILE_N * cfg.tile_k * bits // 8 + 2 * TILE_N * 4
  return cfg.stages * per_stage + cfg.tile_m * TILE_N * out_itemsize


def default_config(m: int, n: int, k: int, *, bits: int = 4) -> TuningConfig:
  return TuningConfig(tile_m=256 if m >= 256 else max(64, -(-m // 64) * 64), tile_k=64, stages=4)


def sweep_configs(m: int, n: int, k: int, *, bits: int = 4) -> list[TuningConfig]:
  cands = [default_config(m, n, k, bits=bits), TuningConfig(256, 64, 3), TuningConfig(128, 128, 4),
           TuningConfig(128, 64, 6), TuningConfig(256, 128, 2)]
  out = []
  for c in cands:
    if c not in out and smem_bytes(c, bits) <= 220_000:
      out.append(c)
  return out


def _kernel(x_gmem, w_gmem, *rest, bits, k_group, steps, cfg, dtype, n_coef, interpret):
  coef_gmem, o_gmem = rest[:n_coef], rest[n_coef]
  n_idx, m_idx = lax.axis_index("n"), lax.axis_index("m")
  tm, tk = cfg.tile_m, cfg.tile_k
  row_bytes = tk * bits // 8
  n_chunks = tk // 64
  bias = dec.MAGIC[jnp.dtype(dtype)] + (1 << (bits - 1))
  gpt = max(1, tk // k_group)
  g_map = (lambda k: (k * tk // k_group, 0)) if k_group >= tk else (lambda k: (k, 0))

  x_tr = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  w_tr = (plgpu.TilingTransform((8, row_bytes)), plgpu.SwizzleTransform(row_bytes))
  in_specs = [plgpu.BlockSpec((tm, tk), lambda k: (0, k), transforms=x_tr),
              plgpu.BlockSpec((TILE_N, row_bytes), lambda k: (0, k), transforms=w_tr)]
  in_specs += [plgpu.BlockSpec((gpt, TILE_N), g_map)] * n_coef

  def scoped(o_smem, a_smem):
    def body(idxs, x_sm, w_sm, *refs):
      del idxs
      coef_sms, acc = refs[:-1], refs[-1]
      wg = lax.axis_index("wg")
      rows = pl.ds(wg * 64, 64)
      w = plgpu.load(w_sm.at[rows], layout=dec.WG8)
      for j in range(n_chunks):
        g = 0 if k_group >= tk else j * 64 // k_group
        s = plgpu.load(coef_sms[0].at[g, rows], layout=dec.ROW).astype(jnp.float32)
        z = plgpu.load(coef_sms[1].at[g, rows], layout=dec.ROW).astype(jnp.float32) if n_coef > 1 else s * 0.0
        zz, ss = (z + bias).astype(dtype), s.astype(dtype)
        b = x_sm.at[:, pl.ds(64 * j, 64)].T
        if interpret:  # interpret-mode wgmma reads A from a ref
          a = dec.decode_jnp(w, j, kind="uniform", bits=bits, dtype=dtype, zz=[[zz] * 4] * (row_bytes // 16),
                             ss=[[ss] * 4] * (row_bytes // 16))
          a_smem.at[wg][...] = a
          plgpu.wgmma(acc, a_smem.at[wg], b)
        else:
          index = ((0, 0, 0, 0),) * (row_bytes // 16)
          a = dec.decode_ptx(j, kind="uniform", bits=bits, dtype=dtype, n_bytes=row_bytes, index=index)(
              w, [zz], [ss])
          plgpu.wgmma(acc, a, b)
      plgpu.wgmma_wait(0)  # the slot is released to the TMA warpgroup when this returns
      return acc

    def compute_context(eval_pipeline):
      @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((64, tm), jnp.float32))
      def _(acc_ref):
        eval_pipeline(acc_ref)
        acc = acc_ref[...]
        wg = lax.axis_index("wg")
        val = acc.astype(o_smem.dtype) if o_smem.dtype != jnp.float32 else plgpu.layout_cast(
            acc, plgpu.Layout._WGMMA_ACC_32BIT)
        o_smem.at[wg].T[...] = val  # (tm, 64) tile of y for this warpgroup's channels
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem.at[wg],
                                o_gmem.at[pl.ds(m_idx * tm, tm), pl.ds(n_idx * TILE_N + wg * 64, 64)])
        plgpu.wait_smem_to_gmem(0)

    pipe = plgpu.emit_pipeline_warp_specialized(
        body, grid=(steps,), memory_registers=40, in_specs=in_specs, wg_axis="wg", num_compute_wgs=2,
        max_concurrent_steps=cfg.stages, compute_context=compute_context)
    pipe(x_gmem.at[pl.ds(m_idx * tm, tm), :], w_gmem.at[pl.ds(n_idx * TILE_N, TILE_N), :],
         *[c.at[:, pl.ds(n_idx * TILE_N, TILE_N)] for c in coef_gmem])

  pl.run_scoped(scoped, plgpu.SMEM((2, tm, 64), o_gmem.dtype),
                plgpu.SMEM((2, 64, 64), dtype) if interpret else None, collective_axes="wg")


def uniform_matmul(x, codes, scale, zero=None, *, bits: int, k_group: int, config: TuningConfig | None = None,
                   out_dtype=None, interpret: bool | None = None):
  """y = x @ W for uniform codes at prefill M. See the module docstring for what is supported."""
  m, k = gemv._check_x(x)
  if bits not in gemv.BITS:
    raise ValueError(f"bits: supported {gemv.BITS}, got {bits!r}")
  need = gemv.cdiv(k, 8) * bits
  if codes.ndim != 2 or codes.dtype != jnp.uint8 or codes.shape[1] not in (need, need + (-need % 128)):
    raise ValueError(f"codes: uint8 (N, ceil(K/8)*bits) = (N, {need}), got {tuple(codes.shape)} {codes.dtype}")
  n = codes.shape[0]
  if n % TILE_N:
    raise ValueError(f"codes: N % {TILE_N} == 0 for the prefill kernel, got N={n}")
  if not isinstance(k_group, int) or k_group < 1 or (k_group < k and k_group % 64):
    raise ValueError(f"k_group: the prefill kernel supports multiples of 64 or k_group >= K={k}; got {k_group!r}")
  kg = min(k_group, k)
  shape = (gemv.cdiv(k, kg), n)
  gemv._check_coef("scale", scale, shape)
  gemv._check_coef("zero", zero, shape)
  cfg = config or default_config(m, n, k, bits=bits)
  if cfg.tile_m % 64 or not 64 <= cfg.tile_m <= 256 or cfg.tile_k not in (64, 128) or cfg.stages < 2:
    raise ValueError(f"config: tile_m in 64..256 (% 64), tile_k 64 or 128, stages >= 2; got {cfg}")
  if kg < k and kg % cfg.tile_k and cfg.tile_k % kg:
    raise ValueError(f"config.tile_k: must divide k_group={kg}, got {cfg.tile_k}")
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  dtype = jnp.dtype(jnp.bfloat16 if x.dtype == jnp.float32 else x.dtype)
  out_dtype = jnp.dtype(out_dtype or dtype)
  tm, tk = cfg.tile_m, cfg.tile_k
  kp = gemv.cdiv(k, tk) * tk
  mp = gemv.cdiv(m, tm) * tm
  xp = dec.permute_x(jnp.pad(x.astype(dtype), ((0, mp - m), (0, kp - k))), dec.pairs_per_word("uniform", bits))
  coefs = [gemv._pad_cols(c, 16 // c.dtype.itemsize) for c in (scale, zero) if c is not None]
  kern = functools.partial(_kernel, bits=bits, k_group=kg, steps=kp // tk, cfg=cfg, dtype=dtype,
                           n_coef=len(coefs), interpret=interpret)
  out = plgpu.kernel(
      kern, out_type=jax.ShapeDtypeStruct((mp, n), out_dtype), grid=(n // TILE_N, mp // tm),
      grid_names=("n", "m"), num_threads=3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
  )(xp, gemv.prepare_codes(codes), *coefs)
  return out if mp == m else out[:m]
