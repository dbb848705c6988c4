"""GPU check of the Mosaic GPU weight-only kernels: correctness against an XLA float32 reference and CUPTI
kernel times against XLA's bf16 dot. Not a pytest file (needs an H100/H200); one JSON line per case.

  python tests/pallas_kernels/gpu_weight_only_mgpu.py [group ...]      groups: see GROUPS below
"""

import functools
import json
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.mosaic.gpu import profiler

sys.path.insert(0, ".")
from pallas_kernels import weight_only_gemv_mgpu as gemv  # noqa: E402
from pallas_kernels import weight_only_matmul_mgpu as prefill  # noqa: E402
from pallas_kernels import weight_only_mgpu as entry  # noqa: E402

T0 = time.time()
BUDGET_S = float(dict(a.split("=") for a in sys.argv[1:] if "=" in a).get("budget", 400))


LOG = None


def emit(**kw):
  kw["t"] = round(time.time() - T0, 1)
  line = json.dumps(kw)
  print(line, flush=True)
  if LOG:
    with open(LOG, "a") as f:
      f.write(line + "\n")


def timed(f, *args, iterations=10):
  _, runs = profiler.measure(f, aggregate=False, iterations=iterations)(*args)
  per_kernel = {}
  for run in runs:
    for name, ms in run:
      per_kernel.setdefault(name, []).append(ms * 1e3)
  kernels = {k[:40]: round(statistics.median(v), 2) for k, v in per_kernel.items()}
  total = statistics.median([sum(ms for _, ms in run) * 1e3 for run in runs])
  return round(total, 2), kernels


def uniform_weights(key, n, k, bits, k_group, zero):
  kc, ks, kz = jax.random.split(key, 3)
  codes = jax.random.bits(kc, (n, -(-k // 8) * bits), jnp.uint8)
  g = -(-k // k_group)
  scale = jax.random.uniform(ks, (g, n), jnp.float32, 0.001, 0.01).astype(jnp.float16)
  z = jax.random.randint(kz, (g, n), -2, 3).astype(jnp.float16) if zero else None
  return codes, scale, z


def uniform_dequant(codes, scale, zero, k, bits, k_group):
  n = codes.shape[0]
  b = codes.astype(jnp.uint32).reshape(n, -1, bits)
  word = sum(b[:, :, i] << (8 * i) for i in range(bits))
  v = jnp.stack([(word >> (bits * j)) & ((1 << bits) - 1) for j in range(8)], -1).reshape(n, -1)[:, :k]
  v = v.astype(jnp.int32)
  v = jnp.where(v >= 1 << (bits - 1), v - (1 << bits), v).astype(jnp.float32)
  gi = jnp.arange(k) // k_group
  s = scale.astype(jnp.float32)[gi].T
  z = 0.0 if zero is None else zero.astype(jnp.float32)[gi].T
  return ((v - z) * s).T  # (K, N)


def check_uniform(name, m, n, k, bits, k_group, zero=False, dtype=jnp.bfloat16, configs=(None,), check=True,
                  fn=None):
  key = jax.random.key(hash((m, n, k, bits, k_group)) % 2**31)
  codes, scale, z = uniform_weights(key, n, k, bits, k_group, zero)
  x = jax.random.normal(jax.random.key(1), (m, k), jnp.float32).astype(dtype)
  ref = None
  if check:
    w = uniform_dequant(codes, scale, z, k, bits, k_group)
    ref = jnp.dot(x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
    del w
  for cfg in configs:
    if time.time() - T0 > BUDGET_S:
      emit(case=name, skipped="budget")
      return
    try:
      f = jax.jit(functools.partial(fn or gemv.uniform_matmul, bits=bits, k_group=k_group, config=cfg,
                                    interpret=False))
      args = (x, codes, scale) + (() if z is None else (z,))
      y = f(*args)
      err = None
      if ref is not None:
        err = float(jnp.abs(y.astype(jnp.float32) - ref).max() / jnp.abs(ref).max())
      us, kernels = timed(f, *args)
      cfg = cfg or (gemv.default_config(m, n, k, bits=bits, k_group=k_group) if fn is None else "default")
      emit(case=name, m=m, n=n, k=k, bits=bits, k_group=k_group, zero=zero, cfg=str(cfg), err=err, us=us,
           kernels=kernels, gbps=round((codes.size + scale.size * 2 * (2 if zero else 1)) / us / 1e3, 1))
    except Exception as e:  # noqa: BLE001
      emit(case=name, cfg=str(cfg), error=f"{type(e).__name__}: {str(e)[:1500]}", tb=traceback.format_exc()[-1500:])


def bcq_weights(key, q, n, k, k_group, offset):
  kp, ka, ko = jax.random.split(key, 3)
  planes = jax.random.bits(kp, (q, n, -(-k // 8)), jnp.uint8)
  g = -(-k // k_group)
  alpha = (jax.random.uniform(ka, (q, g, n), jnp.float32, 0.002, 0.01)
           * (2.0 ** jnp.arange(q, dtype=jnp.float32))[:, None, None]).astype(jnp.float16)
  off = (jax.random.normal(ko, (g, n), jnp.float32) * 0.01).astype(jnp.float16) if offset else None
  return planes, alpha, off


def bcq_dequant(planes, alpha, offset, k, k_group):
  q, n, c = planes.shape
  bits = (planes[..., None] >> jnp.arange(8, dtype=jnp.uint8)) & 1
  signs = (2.0 * bits.reshape(q, n, c * 8)[:, :, :k].astype(jnp.float32) - 1.0)
  gi = jnp.arange(k) // k_group
  w = jnp.einsum("qnk,qkn->kn", signs, alpha.astype(jnp.float32)[:, gi, :])
  return w if offset is None else w + offset.astype(jnp.float32)[gi]


def check_bcq(name, m, n, k, q, k_group, offset=True, dtype=jnp.bfloat16, configs=(None,), check=True):
  key = jax.random.key(hash((m, n, k, q, k_group)) % 2**31)
  planes, alpha, off = bcq_weights(key, q, n, k, k_group, offset)
  x = jax.random.normal(jax.random.key(1), (m, k), jnp.float32).astype(dtype)
  ref = None
  if check:
    ref = jnp.dot(x.astype(jnp.float32), bcq_dequant(planes, alpha, off, k, k_group),
                  precision=jax.lax.Precision.HIGHEST)
  for cfg in configs:
    if time.time() - T0 > BUDGET_S:
      emit(case=name, skipped="budget")
      return
    try:
      f = jax.jit(functools.partial(gemv.bcq_matmul, k_group=k_group, config=cfg, interpret=False))
      args = (x, planes, alpha, off)
      y = f(*args)
      err = None
      if ref is not None:
        err = float(jnp.abs(y.astype(jnp.float32) - ref).max() / jnp.abs(ref).max())
      us, kernels = timed(f, *args)
      cfg = cfg or gemv.default_config(m, n, k, kind="bcq", q=q, k_group=k_group)
      nbytes = planes.size + alpha.size * 2 + (0 if off is None else off.size * 2)
      emit(case=name, m=m, n=n, k=k, q=q, k_group=k_group, offset=offset, cfg=str(cfg), err=err, us=us,
           kernels=kernels, gbps=round(nbytes / us / 1e3, 1))
    except Exception as e:  # noqa: BLE001
      emit(case=name, cfg=str(cfg), error=f"{type(e).__name__}: {str(e)[:1500]}", tb=traceback.format_exc()[-1500:])


def xla_bf16(m, n, k):
  x = jax.random.normal(jax.random.key(1), (m, k), jnp.bfloat16)
  w = jax.random.normal(jax.random.key(2), (k, n), jnp.bfloat16)
  us, kernels = timed(jax.jit(jnp.dot), x, w)
  emit(case="xla_bf16", m=m, n=n, k=k, us=us, kernels=kernels)


def group_v2():
  xla_bf16(1, 28672, 7168)
  check_uniform("u4_g32_f16_zero", 3, 640, 576, 4, 32, zero=True, dtype=jnp.float16)
  check_uniform("u4_g128_zero_m9", 9, 640, 576, 4, 128, zero=True)
  check_uniform("u2_g64_zero", 5, 256, 1024, 2, 64, zero=True)
  check_bcq("b3_smallcheck", 3, 640, 576, 3, 128)
  check_bcq("b2_smallcheck_f16", 2, 256, 1024, 2, 1024, offset=False, dtype=jnp.float16)
  for name, m in (("u4g128_m1", 1), ("u4g128_m16", 16)):
    cands = gemv.sweep_configs(m, 28672, 7168)
    check_uniform(name, m, 28672, 7168, 4, 128, configs=cands[:1])
    check_uniform(name, m, 28672, 7168, 4, 128, configs=cands[1:], check=False)
  for name, q in (("b3g128_m1", 3), ("b2g128_m1", 2), ("b4g128_m1", 4)):
    cands = gemv.sweep_configs(1, 28672, 7168, kind="bcq", q=q)
    check_bcq(name, 1, 28672, 7168, q, 128, configs=cands[:1])
    check_bcq(name, 1, 28672, 7168, q, 128, configs=cands[1:6 if q == 3 else 4], check=False)
  check_uniform("u2g128_m1", 1, 28672, 7168, 2, 128, configs=gemv.sweep_configs(1, 28672, 7168, bits=2)[:3])
  check_uniform("u4g128_8192_m1", 1, 8192, 8192, 4, 128, configs=gemv.sweep_configs(1, 8192, 8192)[:3])
  check_bcq("b3g128_m16", 16, 28672, 7168, 3, 128, configs=gemv.sweep_configs(16, 28672, 7168, kind="bcq", q=3)[:2])


def group_v3():
  xla_bf16(1, 28672, 7168)
  xla_bf16(16, 28672, 7168)
  check_uniform("u4_g32_f16_zero_reg", 3, 640, 576, 4, 32, zero=True, dtype=jnp.float16)
  check_uniform("u4_g128_zero_m9", 9, 640, 576, 4, 128, zero=True)
  check_uniform("u2_g64_zero", 5, 256, 1024, 2, 64, zero=True)
  check_bcq("b3_smallcheck", 3, 640, 576, 3, 128)
  check_bcq("b2_onegroup_f16", 2, 256, 1000, 2, 1000, offset=False, dtype=jnp.float16)
  for name, m in (("u4g128_m1", 1), ("u4g128_m16", 16)):
    cands = gemv.sweep_configs(m, 28672, 7168)
    check_uniform(name, m, 28672, 7168, 4, 128, configs=cands[:1])
    check_uniform(name, m, 28672, 7168, 4, 128, configs=cands[1:], check=False)
  for name, q, nc in (("b3g128_m1", 3, 6), ("b2g128_m1", 2, 4), ("b4g128_m1", 4, 2)):
    cands = gemv.sweep_configs(1, 28672, 7168, kind="bcq", q=q)
    check_bcq(name, 1, 28672, 7168, q, 128, configs=cands[:1])
    check_bcq(name, 1, 28672, 7168, q, 128, configs=cands[1:nc], check=False)
  check_uniform("u2g128_m1", 1, 28672, 7168, 2, 128, configs=gemv.sweep_configs(1, 28672, 7168, bits=2)[:4],
                check=False)
  check_uniform("u4g128_8192_m1", 1, 8192, 8192, 4, 128, configs=gemv.sweep_configs(1, 8192, 8192)[:3],
                check=False)
  check_bcq("b3g128_m16", 16, 28672, 7168, 3, 128, configs=gemv.sweep_configs(16, 28672, 7168, kind="bcq", q=3)[:2],
            check=False)
  xla_bf16(4096, 28672, 7168)
  check_uniform("u4g128_m4096_gemv", 4096, 28672, 7168, 4, 128, configs=[None], check=False)


def group_v4():
  C = gemv.TuningConfig
  xla_bf16(1, 28672, 7168)
  check_bcq("b3_reg_smallcheck_f16", 3, 640, 576, 3, 128, dtype=jnp.float16,
            configs=[C(tile_k=256, mode="reg")])
  check_bcq("b2_reg_onegroup", 2, 256, 1000, 2, 1000, offset=False, configs=[C(tile_k=256, mode="reg")])
  r = lambda tk, st, sp=1, tm=8: C(tile_n=64, tile_k=tk, stages=st, split_k=sp, tile_m=tm, mode="reg")
  a = lambda tk, st, sp=1, tm=8: C(tile_n=64, tile_k=tk, stages=st, split_k=sp, tile_m=tm, mode="acc")
  check_bcq("b3g128_m1", 1, 28672, 7168, 3, 128, configs=[r(256, 4)])
  check_bcq("b3g128_m1", 1, 28672, 7168, 3, 128, configs=[r(512, 4), r(256, 4, 2), r(512, 3), r(256, 6),
                                                           r(512, 4, 2)], check=False)
  check_bcq("b2g128_m1", 1, 28672, 7168, 2, 128, configs=[r(256, 4)])
  check_bcq("b2g128_m1", 1, 28672, 7168, 2, 128, configs=[r(512, 4), r(256, 4, 2), r(512, 4, 2)], check=False)
  check_bcq("b4g128_m1", 1, 28672, 7168, 4, 128, configs=[r(256, 4)])
  check_bcq("b4g128_m1", 1, 28672, 7168, 4, 128, configs=[r(256, 4, 2), r(512, 3)], check=False)
  check_bcq("b3g128_m16", 16, 28672, 7168, 3, 128, configs=[r(256, 4, 1, 16)])
  check_bcq("b3g128_m16", 16, 28672, 7168, 3, 128, configs=[r(256, 4, 2, 16), r(512, 3, 1, 16)], check=False)
  check_uniform("u4g128_m1", 1, 28672, 7168, 4, 128, configs=[a(256, 4, 2), a(512, 4, 2), r(256, 4, 2),
                                                              a(256, 3, 2), a(512, 3, 2)], check=False)
  check_uniform("u4g128_m16", 16, 28672, 7168, 4, 128, configs=[a(256, 4, 2, 16), a(256, 3, 2, 16),
                                                                a(512, 3, 2, 16), r(256, 4, 2, 16)], check=False)
  check_uniform("u4g128_m64", 64, 28672, 7168, 4, 128, configs=[None])
  check_uniform("u4g128_m256", 256, 28672, 7168, 4, 128, configs=[None], check=False)
  xla_bf16(64, 28672, 7168)
  xla_bf16(256, 28672, 7168)


def group_final():
  """Defaults (default_config) across the decode batch range, group sizes, zero points and f16 x."""
  xla_bf16(1, 28672, 7168)
  xla_bf16(8, 28672, 7168)
  xla_bf16(1, 8192, 8192)
  for m in (1, 4, 8):
    check_uniform(f"u4g128_m{m}_default", m, 28672, 7168, 4, 128, check=(m == 8))
  check_uniform("u4g128_zero_m1_default", 1, 28672, 7168, 4, 128, zero=True)
  check_uniform("u4g128_f16_m1_default", 1, 28672, 7168, 4, 128, dtype=jnp.float16)
  check_uniform("u4g32_zero_m1_default", 1, 28672, 7168, 4, 32, zero=True)
  check_uniform("u4g64_m1_default", 1, 28672, 7168, 4, 64, check=False)
  check_uniform("u4gK_m1_default", 1, 28672, 7168, 4, 7168, check=False)
  check_uniform("u4g128_8192_m1_default", 1, 8192, 8192, 4, 128, check=False)
  check_uniform("u2g128_m1_default", 1, 28672, 7168, 2, 128, check=False)
  for q in (2, 3, 4):
    check_bcq(f"b{q}g128_m1_default", 1, 28672, 7168, q, 128, check=(q == 3))
  check_bcq("b3g128_m8_default", 8, 28672, 7168, 3, 128, check=False)
  check_bcq("b3gK_m1_default", 1, 28672, 7168, 3, 7168, check=False)


def _xla_path(x, codes, scale, zero=None, *, bits, k_group, config=None, interpret=False):
  del config, interpret
  return entry.weight_only_matmul(x, fmt="uniform", codes=codes, scale=scale, zero=zero, bits=bits,
                                  k_group=k_group, path="xla")


def group_prefill():
  xla_bf16(4096, 28672, 7168)
  check_uniform("pf_u4g128_m512", 512, 28672, 7168, 4, 128, zero=True, fn=prefill.uniform_matmul)
  check_uniform("pf_u4g128_m4096", 4096, 28672, 7168, 4, 128, fn=prefill.uniform_matmul,
                configs=prefill.sweep_configs(4096, 28672, 7168), check=False)
  check_uniform("xla_dequant_u4g128_m4096", 4096, 28672, 7168, 4, 128, fn=_xla_path, check=False)
  check_uniform("pf_u4g128_m256", 256, 28672, 7168, 4, 128, fn=prefill.uniform_matmul, check=False)
  check_uniform("pf_u4g128_m64", 64, 28672, 7168, 4, 128, fn=prefill.uniform_matmul, check=False)
  check_uniform("pf_u4g128_m16", 16, 28672, 7168, 4, 128, fn=prefill.uniform_matmul, check=False)
  xla_bf16(512, 28672, 7168)


def group_base():
  for m in (1, 16):
    xla_bf16(m, 28672, 7168)
  xla_bf16(1, 8192, 8192)
  check_uniform("u4_smallcheck", 3, 640, 576, 4, 32, zero=True, dtype=jnp.float16)
  check_uniform("u2_smallcheck", 5, 256, 1024, 2, 64, zero=True)
  check_uniform("u4g128_m1", 1, 28672, 7168, 4, 128, configs=[None])
  check_uniform("u2g128_m1", 1, 28672, 7168, 2, 128, configs=[None])
  check_uniform("u4g128_8192_m1", 1, 8192, 8192, 4, 128, configs=[None])


def group_sweep1():
  check_uniform("u4g128_m1", 1, 28672, 7168, 4, 128, configs=gemv.sweep_configs(1, 28672, 7168)[1:], check=False)
  check_uniform("u4g128_m16", 16, 28672, 7168, 4, 128, configs=gemv.sweep_configs(16, 28672, 7168), check=False)


GROUPS = {"base": group_base, "sweep1": group_sweep1, "v2": group_v2, "v3": group_v3, "v4": group_v4, "final": group_final, "prefill": group_prefill}

if __name__ == "__main__":
  import os
  LOG = os.path.join(os.environ["OUT"], "log.jsonl") if os.environ.get("OUT") else None
  emit(devices=str(jax.devices()), jax=jax.__version__)
  for g in [a for a in sys.argv[1:] if "=" not in a] or ["base"]:
    GROUPS[g]()
  emit(done=True)
