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

T0 = time.time()
BUDGET_S = float(dict(a.split("=") for a in sys.argv[1:] if "=" in a).get("budget", 400))


def emit(**kw):
  kw["t"] = round(time.time() - T0, 1)
  print(json.dumps(kw), flush=True)


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


def check_uniform(name, m, n, k, bits, k_group, zero=False, dtype=jnp.bfloat16, configs=(None,), check=True):
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
      f = jax.jit(functools.partial(gemv.uniform_matmul, bits=bits, k_group=k_group, config=cfg,
                                    interpret=False))
      args = (x, codes, scale) + (() if z is None else (z,))
      y = f(*args)
      err = None
      if ref is not None:
        err = float(jnp.abs(y.astype(jnp.float32) - ref).max() / jnp.abs(ref).max())
      us, kernels = timed(f, *args)
      cfg = cfg or gemv.default_config(m, n, k, bits=bits, k_group=k_group)
      emit(case=name, m=m, n=n, k=k, bits=bits, k_group=k_group, zero=zero, cfg=str(cfg), err=err, us=us,
           kernels=kernels, gbps=round((codes.size + scale.size * 2 * (2 if zero else 1)) / us / 1e3, 1))
    except Exception as e:  # noqa: BLE001
      emit(case=name, cfg=str(cfg), error=f"{type(e).__name__}: {str(e)[:1500]}", tb=traceback.format_exc()[-1500:])


def xla_bf16(m, n, k):
  x = jax.random.normal(jax.random.key(1), (m, k), jnp.bfloat16)
  w = jax.random.normal(jax.random.key(2), (k, n), jnp.bfloat16)
  us, kernels = timed(jax.jit(jnp.dot), x, w)
  emit(case="xla_bf16", m=m, n=n, k=k, us=us, kernels=kernels)


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


GROUPS = {"base": group_base, "sweep1": group_sweep1}

if __name__ == "__main__":
  emit(devices=str(jax.devices()), jax=jax.__version__)
  for g in [a for a in sys.argv[1:] if "=" not in a] or ["base"]:
    GROUPS[g]()
  emit(done=True)
