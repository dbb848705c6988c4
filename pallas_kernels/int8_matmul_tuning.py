"""Tuning of int8_matmul_mgpu's schedule: its TuningConfig, the checks on one, the shared-memory estimate, and
the default / sweep configurations for a shape (see int8_matmul_mgpu's docstring for the schedule itself).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from pallas_kernels import mgpu_common
from pallas_kernels.mgpu_common import cdiv

S8_WGMMA_N = (8, 16, 24, *range(32, 257, 16))  # the N sizes PTX allows for wgmma .s8


@dataclasses.dataclass(frozen=True)
class TuningConfig:
  """Tile sizes are per compute warpgroup; the CTA tile is twice one of them (`wg_dimension`)."""
  tile_m: int = 128  # multiple of 64 (wgmma M)
  tile_n: int = 128  # a wgmma .s8 N: 8, 16, 24, 32, 48, ..., 256
  tile_k: int = 128  # multiple of 32; <= 128 gives one swizzle atom of tile_k bytes
  max_concurrent_steps: int = 4  # SMEM pipeline stages
  wg_dimension: str = "n"  # "m" or "n": the axis along which the two compute warpgroups split the CTA tile
  grid_minor_dim: str = "n"  # tile order (planar snake) for L2 reuse
  grid_tile_width: int = 1
  epi_tile_m: int | None = 64  # epilogue SMEM tile (None: the whole warpgroup tile)
  epi_tile_n: int | None = 64
  out_slots: int = 2  # epilogue SMEM buffers per warpgroup (2: the next tile's store overlaps the last's)
  delay_release: int = 0  # 1: keep one wgmma in flight while the next stage is waited for

  @property
  def cta_m(self) -> int:
    return self.tile_m * (2 if self.wg_dimension == "m" else 1)

  @property
  def cta_n(self) -> int:
    return self.tile_n * (2 if self.wg_dimension == "n" else 1)


def check_config(cfg: TuningConfig, grouped: bool, token_group: bool):
  bad = None
  if cfg.tile_m % 64 or cfg.tile_m <= 0:
    bad = f"tile_m={cfg.tile_m} must be a positive multiple of 64"
  elif cfg.tile_n not in S8_WGMMA_N:
    bad = f"tile_n={cfg.tile_n} must be one of {S8_WGMMA_N}"
  elif cfg.tile_k % 32 or cfg.tile_k <= 0:
    bad = f"tile_k={cfg.tile_k} must be a positive multiple of 32"
  elif cfg.wg_dimension not in ("m", "n") or cfg.grid_minor_dim not in ("m", "n"):
    bad = "wg_dimension and grid_minor_dim must be 'm' or 'n'"
  elif cfg.delay_release not in (0, 1) or cfg.max_concurrent_steps <= cfg.delay_release:
    bad = "delay_release must be 0 or 1 and smaller than max_concurrent_steps"
  elif grouped and cfg.delay_release:
    bad = "delay_release=1 is not supported with K-groups (a group's sum is read right after its wgmma)"
  elif cfg.tile_m % epilogue_tile(cfg)[0] or cfg.tile_n % epilogue_tile(cfg)[1]:
    bad = "epi_tile_m/epi_tile_n must divide tile_m/tile_n"
  elif token_group and cfg.cta_m > 256:
    bad = "per-token-group x_scale needs a CTA M tile <= 256 (one TMA box)"
  if bad:
    raise ValueError(f"config: {bad}")


def epilogue_tile(cfg: TuningConfig) -> tuple[int, int]:
  return cfg.epi_tile_m or cfg.tile_m, cfg.epi_tile_n or cfg.tile_n


def epilogue_slots(cfg: TuningConfig) -> int:
  em, en = epilogue_tile(cfg)
  return max(1, min(cfg.out_slots, (cfg.tile_m * cfg.tile_n) // (em * en)))


def smem_bytes(cfg: TuningConfig, out_dtype=jnp.bfloat16, grouped: bool = False) -> int:
  """Estimate of the SMEM a configuration allocates (pipeline stages + epilogue tiles + scale vectors)."""
  steps = cfg.max_concurrent_steps
  stage = (cfg.cta_m + cfg.cta_n) * cfg.tile_k + (cfg.cta_n + cfg.cta_m) * 4 * grouped
  em, en = epilogue_tile(cfg)
  slots = epilogue_slots(cfg)
  out = 2 * slots * em * en * jnp.dtype(out_dtype).itemsize
  vecs = 2 * (cfg.tile_m + 2 * cfg.tile_n) * 4
  return steps * stage + out + vecs + 1024  # + barriers and alignment


def _fill(n: int, sms: int, cta_n: int, m_tiles: int = 1) -> float:
  """Fraction of SM-waves doing work when m_tiles x ceil(n / cta_n) tiles run on `sms` persistent CTAs."""
  t = m_tiles * cdiv(n, cta_n)
  return t / (cdiv(t, sms) * sms)


def _best_cta_n(n: int, sms: int, candidates, m_tiles: int = 1) -> int:
  """The CTA N tile that best fills the SMs (nearly full waves), discounting narrow tiles, whose fixed costs
  per K step (a 64-row x tile, TMA issue, barriers) weigh on few weight rows: score fill * c / (c + 32)."""
  return max(candidates, key=lambda c: (_fill(n, sms, c, m_tiles) * c / (c + 32), c))


def _fit_stages(cfg: TuningConfig, out_dtype, grouped: bool, most: int = 8) -> TuningConfig:
  for s in range(most, 1, -1):
    c = dataclasses.replace(cfg, max_concurrent_steps=s)
    if smem_bytes(c, out_dtype, grouped) <= mgpu_common.HOPPER_SMEM_BYTES:
      return c
  return dataclasses.replace(cfg, max_concurrent_steps=2)


def _group_tile_k(k_group: int | None, k: int, target: int = 128) -> int:
  if k_group is None or k_group >= k:
    return target
  for t in (target, 128, 64, 32):
    if t <= target and k_group % t == 0:
      return t
  raise ValueError(f"k_group={k_group} must be a multiple of 32")


def default_config(m: int, n: int, k: int, k_group: int | None = None, out_dtype=jnp.bfloat16,
                   num_sms: int | None = None) -> TuningConfig:
  """A configuration for (M, K) x (N, K): weight streaming up to M = 256 (64-row tiles, N tiles sized to fill
  the SMs), 256 x 128 CTA tiles beyond (128 x 128 with K-groups)."""
  sms = num_sms or mgpu_common.num_sms()
  grouped = k_group is not None and k_group < k
  tk = _group_tile_k(k_group, k)
  if m <= 256:  # weight-bandwidth bound: about one wave of CTAs, each streaming cta_n weight rows over all K
    # CTA N tiles up to 256: 4-8 pipeline stages of (64 + cta_n) x tile_k bytes keep enough bytes in flight
    cta_n = _best_cta_n(n, sms, [c for c in range(256, 31, -32)] + [16], cdiv(m, 64))
    cfg = TuningConfig(tile_m=64, tile_n=cta_n // 2, tile_k=tk, wg_dimension="n",
                       epi_tile_m=64, epi_tile_n=None)
  elif grouped:  # int32 + float32 accumulators: 64 x 128 per warpgroup keeps both in registers
    cfg = TuningConfig(tile_m=64, tile_n=128, tile_k=tk, wg_dimension="m")
  else:  # H200 sweep (experiments/results/gpu/gpu_check_w8a8_sweep.md): M-minor tile order in strips of 8 was
    # within 1% of the best of 8 configs on both 8192 x 8192 and 28672 x 7168 at M = 4096 (2.22x / 2.20x bf16)
    cfg = TuningConfig(tile_m=128, tile_n=128, tile_k=tk, wg_dimension="m", grid_minor_dim="m", grid_tile_width=8)
  return _fit_stages(cfg, out_dtype, grouped)


def sweep_configs(m: int, n: int, k: int, k_group: int | None = None, out_dtype=jnp.bfloat16,
                  num_sms: int | None = None) -> list[TuningConfig]:
  """At most 8 candidates worth timing for this shape (the default first), all fitting SMEM."""
  sms = num_sms or mgpu_common.num_sms()
  grouped = k_group is not None and k_group < k
  base = default_config(m, n, k, k_group, out_dtype, sms)
  r = dataclasses.replace
  tk = base.tile_k
  if m <= 256:
    cands = [base, r(base, tile_k=2 * tk) if not grouped else r(base, tile_k=max(32, tk // 2)),
             r(base, max_concurrent_steps=max(2, base.max_concurrent_steps - 2))]
    for cta_n in (base.cta_n // 2, 256, _best_cta_n(n, sms, [512, 448, 384, 320], cdiv(m, 64))):
      if (cta_n != base.cta_n and cta_n // 2 in S8_WGMMA_N and _fill(n, sms, cta_n, cdiv(m, 64)) >= 0.75
          and not (grouped and cta_n > 256)):
        cands.append(r(base, tile_n=cta_n // 2))
    if not grouped:
      cands.append(r(base, delay_release=1))
  elif grouped:
    cands = [base, r(base, wg_dimension="n"), r(base, tile_n=192), r(base, tile_m=128, tile_n=64),
             r(base, grid_minor_dim="m", grid_tile_width=8), r(base, tile_k=max(32, tk // 2))]
  else:
    cands = [base, r(base, out_slots=1, max_concurrent_steps=4), r(base, wg_dimension="n"),
             r(base, tile_k=64), r(base, tile_m=64, tile_n=256), r(base, grid_minor_dim="m", grid_tile_width=8),
             r(base, delay_release=1), r(base, tile_k=64, delay_release=1)]
  out, seen = [], set()
  for c in cands:
    if grouped and (k_group % c.tile_k or c.delay_release):
      continue
    if c is not base and c.max_concurrent_steps == base.max_concurrent_steps:  # as many stages as fit
      c = _fit_stages(c, out_dtype, grouped, most=8 if c.tile_k <= 64 else 6)
    if c not in seen and c.tile_k > 0:
      seen.add(c)
      out.append(c)
  return out[:8]
