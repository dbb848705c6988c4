"""Mosaic GPU weight-only kernels: interpret mode against numpy float64, CUDA lowering of every timed config,
bad input rejected before launch, the entry point's table and XLA path. No GPU needed.

Tolerances. The reference is float64 on the x the kernel sees (x rounded to bf16/f16; BCQ rounds f16 x to bf16)
and the exact W. Output is requested in float32, so what remains is:
  acc mode  decoded values exact, scales applied to float32 partial sums: float32 accumulation error only,
            relative ~1e-6 of max|y| -> 1e-4.
  reg mode  W rounded once to bf16 (f16) per element: each product off by <= 2^-9 (2^-12) relative, errors
            independent, so |err| ~ 2^-9 * sqrt(K) * |x| |w| ~ 2^-9 * max|y| -> 1e-2 (bf16), 2e-3 (f16).
"""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import weight_only_gemv_mgpu as gemv
from pallas_kernels import weight_only_matmul_mgpu as prefill
from pallas_kernels import weight_only_mgpu as wo


def _rng(*case):
  return np.random.default_rng(zlib.crc32(repr(case).encode()))


def pack_uniform(v, bits):
  """Signed codes (N, K) -> storage v2 uint8 (N, ceil(K/8)*bits), written independently of the kernel."""
  n, k = v.shape
  k8 = -(-k // 8) * 8
  u = (np.pad(v, ((0, 0), (0, k8 - k))) & ((1 << bits) - 1)).astype(np.uint64).reshape(n, k8 // 8, 8)
  word = np.zeros(u.shape[:2], np.uint64)
  for j in range(8):
    word |= u[:, :, j] << np.uint64(bits * j)
  return np.stack([(word >> np.uint64(8 * i)) & np.uint64(255) for i in range(bits)], -1).reshape(n, -1).astype(np.uint8)


def uniform_case(rng, m, n, k, bits, k_group, zero, n_group=1):
  v = rng.integers(-(1 << bits - 1), 1 << bits - 1, size=(n, k))
  g, h = -(-k // min(k_group, k)), -(-n // n_group)
  scale = rng.uniform(0.5, 1.5, (g, h)).astype(np.float32)
  z = rng.integers(-2, 3, (g, h)).astype(np.float32) if zero else None
  gi, hi = np.arange(k) // min(k_group, k), np.arange(n) // n_group
  w = (v.T - (0.0 if z is None else z[gi][:, hi])) * scale[gi][:, hi]  # float64 (K, N)
  x = rng.standard_normal((m, k)).astype(np.float32)
  return x, pack_uniform(v, bits), scale, z, w


def bcq_case(rng, m, n, k, q, k_group, offset):
  planes = rng.integers(0, 256, (q, n, -(-k // 8))).astype(np.uint8)
  if k % 8:  # padding bits past K are 0, as storage v2 writes them
    planes[:, :, -1] &= np.uint8((1 << (k % 8)) - 1)
  g = -(-k // min(k_group, k))
  alpha = rng.uniform(0.05, 1.0, (q, g, n)).astype(np.float32)
  off = rng.normal(size=(g, n)).astype(np.float32) if offset else None
  bits = np.unpackbits(planes, axis=-1, bitorder="little")[:, :, :k].astype(np.float64)  # (q, N, K)
  gi = np.arange(k) // min(k_group, k)
  w = np.einsum("qnk,qkn->kn", 2 * bits - 1, alpha.astype(np.float64)[:, gi, :])
  if off is not None:
    w = w + off[gi]
  x = rng.standard_normal((m, k)).astype(np.float32)
  return x, planes, alpha, off, w


def _check(y, x_seen, w, tol):
  ref = np.asarray(x_seen, np.float64) @ w
  y = np.asarray(y, np.float64)
  assert y.shape == ref.shape and np.all(np.isfinite(y))
  np.testing.assert_allclose(y, ref, rtol=0, atol=tol * np.abs(ref).max())


UNIFORM = [
    # m, n, k, bits, k_group, zero, x dtype, mode, split_k
    (1, 64, 512, 4, 128, False, jnp.bfloat16, "acc", 1),
    (3, 130, 576, 4, 128, True, jnp.float16, "acc", 1),     # short last group, N not a multiple of 64
    (5, 64, 200, 4, 32, True, jnp.bfloat16, "reg", 1),      # K unaligned (padded codes), group 32
    (4, 64, 512, 4, 64, False, jnp.float16, "reg", 1),      # reg mode forced at a 64 group, f16
    (2, 70, 1024, 2, 64, True, jnp.bfloat16, "acc", 2),     # 2-bit, split-K partial sums
    (2, 70, 600, 2, 32, False, jnp.bfloat16, "reg", 1),     # 2-bit group 32: lanes of one word pick scales
    (9, 64, 576, 4, 576, True, jnp.bfloat16, "acc", 1),     # one group (k_group = K), M > 8 unaligned
    (20, 64, 256, 4, 128, True, jnp.float32, "acc", 1),     # f32 x (cast to bf16), tile_m 32
]


@pytest.mark.parametrize("m,n,k,bits,k_group,zero,dtype,mode,split", UNIFORM)
def test_uniform_interpret_matches_float64(m, n, k, bits, k_group, zero, dtype, mode, split):
  x, codes, scale, z, w = uniform_case(_rng("u", m, n, k, bits, k_group), m, n, k, bits, k_group, zero)
  cfg = gemv.default_config(m, n, k, bits=bits, k_group=k_group)
  cfg = gemv.TuningConfig(tile_n=64, tile_k=cfg.tile_k, stages=2, split_k=split, tile_m=cfg.tile_m, mode=mode)
  xd = jnp.asarray(x, dtype)
  y = gemv.uniform_matmul(xd, jnp.asarray(codes), jnp.asarray(scale), None if z is None else jnp.asarray(z),
                          bits=bits, k_group=k_group, config=cfg, out_dtype=jnp.float32, interpret=True)
  seen = xd.astype(jnp.bfloat16) if dtype == jnp.float32 else xd
  tol = 1e-4 if mode == "acc" else (2e-3 if dtype == jnp.float16 else 1e-2)
  _check(y, seen, w, tol)


def test_uniform_n_group_bias_and_out_dtype():
  m, n, k = 2, 96, 256
  x, codes, scale, z, w = uniform_case(_rng("ng"), m, n, k, 4, 128, True, n_group=32)
  bias = _rng("bias").standard_normal(n).astype(np.float32)
  xd = jnp.asarray(x, jnp.bfloat16)
  y = gemv.uniform_matmul(xd, jnp.asarray(codes), jnp.asarray(scale), jnp.asarray(z), bits=4, k_group=128,
                          n_group=32, bias=jnp.asarray(bias), interpret=True)
  assert y.dtype == jnp.bfloat16
  ref = np.asarray(xd, np.float64) @ w + bias
  np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=0, atol=1e-2 * np.abs(ref).max())


BCQ = [
    # m, n, k, q, k_group, offset, x dtype, split_k, tile_k, mode
    (1, 64, 1024, 3, 128, True, jnp.bfloat16, 1, 512, "acc"),
    (1, 64, 1024, 3, 128, True, jnp.bfloat16, 1, 512, "reg"),
    (3, 70, 576, 2, 128, True, jnp.float16, 1, 256, "acc"),   # short last group; f16 x rounded to bf16
    (3, 70, 576, 2, 128, True, jnp.float16, 1, 256, "reg"),
    (2, 64, 300, 4, 300, False, jnp.bfloat16, 1, 256, "acc"),  # one group, K unaligned
    (2, 64, 300, 4, 300, False, jnp.bfloat16, 1, 256, "reg"),
    (1, 64, 512, 1, 256, True, jnp.bfloat16, 2, 256, "acc"),   # one plane, split-K
    (20, 64, 256, 2, 128, True, jnp.bfloat16, 1, 256, "acc"),  # tile_m 32
]


@pytest.mark.parametrize("m,n,k,q,k_group,offset,dtype,split,tile_k,mode", BCQ)
def test_bcq_interpret_matches_float64(m, n, k, q, k_group, offset, dtype, split, tile_k, mode):
  x, planes, alpha, off, w = bcq_case(_rng("b", m, n, k, q, k_group), m, n, k, q, k_group, offset)
  cfg = gemv.TuningConfig(tile_n=64, tile_k=tile_k, stages=2, split_k=split, tile_m=gemv.tile_m_for(m), mode=mode)
  xd = jnp.asarray(x, dtype)
  y = gemv.bcq_matmul(xd, jnp.asarray(planes), jnp.asarray(alpha), None if off is None else jnp.asarray(off),
                      k_group=k_group, config=cfg, out_dtype=jnp.float32, interpret=True)
  # reg mode: W = offset + sum_i +-alpha_i rounded to bf16 after each of <= q + 1 adds (see module docstring)
  _check(y, xd.astype(jnp.bfloat16), w, 1e-4 if mode == "acc" else 1.5e-2)


def test_entry_point_paths_agree():
  m, n, k = 2, 64, 256
  x, codes, scale, z, w = uniform_case(_rng("entry"), m, n, k, 4, 64, True)
  xd = jnp.asarray(x, jnp.bfloat16)
  kw = dict(fmt="uniform", codes=jnp.asarray(codes), scale=jnp.asarray(scale), zero=jnp.asarray(z), bits=4,
            k_group=64, out_dtype=jnp.float32)
  y_k = wo.weight_only_matmul(xd, interpret=True, **kw)
  y_x = wo.weight_only_matmul(xd, path="xla", **kw)
  ref = np.asarray(xd, np.float64) @ w
  for y in (y_k, y_x):
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=0, atol=1e-2 * np.abs(ref).max())
  xb, planes, alpha, off, wb = bcq_case(_rng("entry-b"), m, n, k, 2, 128, True)
  yb = wo.weight_only_matmul(jnp.asarray(xb, jnp.bfloat16), fmt="bcq", planes=jnp.asarray(planes),
                             alpha=jnp.asarray(alpha), offset=jnp.asarray(off), k_group=128, path="xla",
                             out_dtype=jnp.float32)
  refb = np.asarray(jnp.asarray(xb, jnp.bfloat16), np.float64) @ wb
  np.testing.assert_allclose(np.asarray(yb, np.float64), refb, rtol=0, atol=1e-2 * np.abs(refb).max())


def test_choose_path_table():
  assert wo.choose_path(1, "uniform", k_group=128, k=7168) == "mgpu_gemv"
  assert wo.choose_path(64, "bcq", k_group=128, k=7168) == "mgpu_gemv"
  assert wo.choose_path(4096, "uniform", k_group=128, k=7168) == "xla"
  assert wo.choose_path(1, "bcq", k_group=64, k=7168) == "xla"        # BCQ groups: multiples of 128
  assert wo.choose_path(1, "uniform", k_group=48, k=7168) == "xla"
  assert wo.choose_path(1, "uniform", k_group=128, k=7168, bits=3) == "xla"
  assert wo.expected_bytes("uniform", 28672, 7168, k_group=128) == 28672 * 3584 + 56 * 28672 * 2


# ---- bad input: ValueError naming the argument, before anything is launched ----------------------------

def _u_args(n=64, k=256, bits=4, k_group=128):
  x, codes, scale, z, _ = uniform_case(_rng("bad"), 1, n, k, bits, k_group, True)
  return jnp.asarray(x, jnp.bfloat16), jnp.asarray(codes), jnp.asarray(scale), jnp.asarray(z)


@pytest.mark.parametrize("mutate,word", [
    (lambda a, kw: ((a[0], a[1][:, :-1]) + a[2:], kw), "codes"),
    (lambda a, kw: ((a[0], a[1].astype(jnp.int8)) + a[2:], kw), "codes"),
    (lambda a, kw: (a[:2] + (a[2][:1],) + a[3:], kw), "scale"),
    (lambda a, kw: (a[:3] + (a[3][:, :5],), kw), "zero"),
    (lambda a, kw: (a, dict(kw, bits=3)), "bits"),
    (lambda a, kw: (a, dict(kw, k_group=48)), "k_group"),
    (lambda a, kw: (a, dict(kw, n_group=0)), "n_group"),
    (lambda a, kw: ((a[0][None],) + a[1:], kw), "x"),
    (lambda a, kw: (a, dict(kw, config=gemv.TuningConfig(tile_k=384, mode="reg"))), "config.tile_k"),
    (lambda a, kw: (_u_args(k_group=96), dict(kw, k_group=96, config=gemv.TuningConfig(tile_k=256, mode="reg"))),
     "config.tile_k"),
    (lambda a, kw: (_u_args(k_group=96), dict(kw, k_group=96, config=gemv.TuningConfig(tile_k=768, mode="acc"))),
     "config.mode"),
    (lambda a, kw: (a, dict(kw, config=gemv.TuningConfig(tile_m=12))), "config"),
])
def test_uniform_bad_input(mutate, word):
  args, kw = mutate(_u_args(), dict(bits=4, k_group=128, interpret=False))
  with pytest.raises(ValueError, match=word):
    gemv.uniform_matmul(*args, **kw)


def test_group_error_names_supported_values():
  with pytest.raises(ValueError, match=r"k_group.*multiples of 32"):
    gemv.uniform_matmul(*_u_args(), bits=4, k_group=40)
  x, planes, alpha, off, _ = bcq_case(_rng("badb"), 1, 64, 512, 2, 64, True)
  with pytest.raises(ValueError, match=r"k_group.*multiples of 128"):
    gemv.bcq_matmul(jnp.asarray(x), jnp.asarray(planes), jnp.asarray(alpha), jnp.asarray(off), k_group=64)


@pytest.mark.parametrize("what", ["planes_q", "planes_k", "alpha", "offset", "planes_dtype"])
def test_bcq_bad_input(what):
  x, planes, alpha, off, _ = bcq_case(_rng("badb2"), 1, 64, 512, 2, 128, True)
  args = dict(x=jnp.asarray(x), planes=jnp.asarray(planes), alpha=jnp.asarray(alpha), offset=jnp.asarray(off))
  if what == "planes_q":
    args["planes"] = jnp.zeros((5, 64, 64), jnp.uint8)
  elif what == "planes_k":
    args["planes"] = args["planes"][:, :, :-1]
  elif what == "planes_dtype":
    args["planes"] = args["planes"].astype(jnp.int32)
  elif what == "alpha":
    args["alpha"] = args["alpha"][:1]
  else:
    args["offset"] = args["offset"][:, :3]
  with pytest.raises(ValueError, match=what.split("_")[0]):
    gemv.bcq_matmul(args["x"], args["planes"], args["alpha"], args["offset"], k_group=128)


# ---- lowering to CUDA for every configuration the GPU check times -------------------------------------

def _lower(kind, m, n, k, cfg, *, bits=4, q=3, k_group=128, zero=False, dtype=jnp.bfloat16):
  sds = jax.ShapeDtypeStruct
  g = -(-k // min(k_group, k))
  if kind == "bcq":
    args = (sds((m, k), dtype), sds((q, n, -(-k // 8)), jnp.uint8), sds((q, g, n), jnp.float16), sds((g, n), jnp.float16))
    f = functools.partial(gemv.bcq_matmul, k_group=k_group, config=cfg, interpret=False)
  else:
    args = (sds((m, k), dtype), sds((n, -(-k // 8) * bits), jnp.uint8), sds((g, n), jnp.float16),
            sds((g, n), jnp.float16) if zero else None)
    f = functools.partial(gemv.uniform_matmul, bits=bits, k_group=k_group, config=cfg, interpret=False)
  jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))


LOWER_SHAPES = [
    ("uniform", 1, 28672, 7168, dict()), ("uniform", 16, 28672, 7168, dict()), ("uniform", 1, 8192, 8192, dict()),
    ("uniform", 1, 28672, 7168, dict(bits=2)), ("bcq", 1, 28672, 7168, dict(q=3)), ("bcq", 1, 28672, 7168, dict(q=2)),
    ("bcq", 1, 28672, 7168, dict(q=4)), ("bcq", 16, 28672, 7168, dict(q=3)),
]


@pytest.mark.parametrize("kind,m,n,k,kw", LOWER_SHAPES)
def test_sweep_configs_lower_for_cuda(kind, m, n, k, kw):
  cands = gemv.sweep_configs(m, n, k, kind=kind, **kw)
  assert 1 <= len(cands) <= 8 and cands[0] == gemv.default_config(m, n, k, kind=kind, **kw)
  for cfg in cands:
    _lower(kind, m, n, k, cfg, **kw)


def test_lowering_odd_shapes_and_prefill_default():
  _lower("uniform", 3, 640, 576, None, k_group=32, zero=True, dtype=jnp.float16)   # padded codes rows
  _lower("bcq", 3, 640, 576, None, q=3)
  _lower("uniform", 4096, 28672, 7168, None)  # what the entry point would do if forced at prefill


# ---- prefill kernel (warp specialized) ----------------------------------------------------------------

@pytest.mark.parametrize("m,k,k_group,zero,tile_k", [(70, 256, 128, True, 64), (64, 320, 64, False, 128)])
def test_prefill_interpret_matches_float64(m, k, k_group, zero, tile_k):
  n = 128
  x, codes, scale, z, w = uniform_case(_rng("pf", m, k, k_group), m, n, k, 4, k_group, zero)
  xd = jnp.asarray(x, jnp.bfloat16)
  y = prefill.uniform_matmul(xd, jnp.asarray(codes), jnp.asarray(scale), None if z is None else jnp.asarray(z),
                             bits=4, k_group=k_group, config=prefill.TuningConfig(64, tile_k, 2),
                             out_dtype=jnp.float32, interpret=True)
  _check(y, xd, w, 1e-2)  # reg-mode decode: W rounded once to bf16


def test_prefill_bad_input():
  x, codes, scale, z = _u_args(n=64)
  with pytest.raises(ValueError, match="codes"):  # N % 128
    prefill.uniform_matmul(x, codes, scale, z, bits=4, k_group=128)
  x, codes, scale, z = _u_args(n=128, k_group=32)
  with pytest.raises(ValueError, match="k_group"):
    prefill.uniform_matmul(x, codes, scale, z, bits=4, k_group=32)


def test_prefill_configs_lower_for_cuda():
  sds = jax.ShapeDtypeStruct
  args = (sds((4096, 7168), jnp.bfloat16), sds((28672, 3584), jnp.uint8), sds((56, 28672), jnp.float16))
  for cfg in prefill.sweep_configs(4096, 28672, 7168):
    f = functools.partial(prefill.uniform_matmul, bits=4, k_group=128, config=cfg, interpret=False)
    jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))
