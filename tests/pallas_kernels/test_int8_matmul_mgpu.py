"""int8_matmul_mgpu (Mosaic GPU W8A8 GEMM) with no GPU.

1. Numerics in Mosaic GPU interpret mode (SMEM, TMA zero-fill/clipping, barriers and warpgroups simulated on the
   CPU) against numpy: the int32 sums exactly, the dequantized output within its own rounding, over unaligned
   M, N, K, a short last K-group, every x_scale/w_scale form, bias or not, each out dtype, and the schedule knobs
   (warpgroup split, K tiles inside a group, delayed release, one epilogue slot).
2. Lowering to CUDA (Mosaic GPU -> LLVM, SMEM budget checked) for every configuration `sweep_configs` proposes on
   the real shapes, as the GPU check will time them, with every TMA / bulk copy's addresses audited against PTX's
   alignment rules (pallas_kernels/mgpu_audit.py), which interpret mode does not model.
3. Bad input raises ValueError naming the argument, before anything is launched.
"""

import dataclasses
import itertools

import jax
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import int8_matmul_mgpu as mk
from pallas_kernels import int8_matmul_tuning as tuning
from pallas_kernels import mgpu_audit, mgpu_common

S = jax.ShapeDtypeStruct
# Small tiles keep interpret mode fast (it simulates every thread and copy on 2 shared cores).
SMALL = mk.TuningConfig(tile_m=64, tile_n=32, tile_k=64, max_concurrent_steps=2, wg_dimension="n",
                        epi_tile_m=64, epi_tile_n=32)
RTOL = {jnp.float32: 1e-6, jnp.bfloat16: 2 ** -8, jnp.float16: 2 ** -11}


def _data(m, n, k, k_group, xs_mode, seed=0, scale_dtype=np.float32):
  rng = np.random.default_rng(seed)
  x = rng.integers(-128, 128, (m, k), dtype=np.int8)
  w = rng.integers(-128, 128, (n, k), dtype=np.int8)
  groups = 1 if k_group is None else -(-k // k_group)
  u = lambda *shape: rng.uniform(0.5, 2, shape) / 128  # scales of int8 quantization: outputs stay in f16 range
  xs = {"tensor": np.float32(u()), "tensor11": u(1, 1), "token": u(m, 1), "token_group": u(groups, m, 1)}[xs_mode]
  ws = u(groups, n)
  bias = rng.normal(size=(n,)) * 10
  return x, w, np.asarray(xs, scale_dtype), ws.astype(scale_dtype), bias.astype(np.float32)


def _numpy_ref(x, w, xs, ws, k_group, bias):
  """float64: exact integer group sums, each scaled, summed."""
  m, k = x.shape
  n = w.shape[0]
  kg = k if k_group is None else k_group
  groups = -(-k // kg)
  xs = np.asarray(xs, np.float64)
  xs = xs.reshape(groups, m, 1) if xs.ndim == 3 else np.broadcast_to(xs.reshape(-1, 1), (m, 1))[None]
  y = np.zeros((m, n))
  for g in range(groups):
    sl = slice(g * kg, min(k, (g + 1) * kg))
    acc = x[:, sl].astype(np.int64) @ w[:, sl].astype(np.int64).T
    y += acc * xs[min(g, xs.shape[0] - 1)] * np.asarray(ws, np.float64)[g][None, :]
  return y if bias is None else y + bias[None, :]


def _check(y, ref, out_dtype):
  y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
  assert y.shape == ref.shape
  # output rounding: half an ulp of out_dtype per element, plus float32 accumulation of the groups
  tol = RTOL[out_dtype] * np.abs(ref) + 1e-6 * np.abs(ref).max() + 1e-30
  bad = np.abs(y - ref) > tol
  assert not bad.any(), f"{bad.sum()} mismatches, worst {np.abs(y - ref).max()} (ref max {np.abs(ref).max()})"


# (m, n, k, k_group): unaligned M (incl. M % 8 != 0 padding and M < 8), N not a multiple of the tile (and of a
# 64-wide swizzle atom), K not a multiple of tile_k, a short last group (576 = 4 x 128 + 64), groups of 64.
SHAPES = [(70, 72, 576, 128), (13, 136, 256, None), (1, 64, 160, None), (130, 40, 320, 64)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_int32_accumulator_is_exact(shape):
  m, n, k, _ = shape
  x, w, *_ = _data(m, n, k, None, "token")
  y = mk.int8_matmul_int32(jnp.asarray(x), jnp.asarray(w), config=SMALL, interpret=True)
  assert y.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(y), x.astype(np.int64) @ w.astype(np.int64).T)


def _cases():
  """Every x_scale form x each out dtype x bias or not, spread over the shapes (not the full product)."""
  modes = ["tensor", "tensor11", "token", "token_group"]
  outs = [jnp.bfloat16, jnp.float16, jnp.float32]
  for i, (mode, od) in enumerate(itertools.product(modes, outs)):
    shape = SHAPES[i % len(SHAPES)]
    if mode == "token_group" and shape[3] is None:
      shape = SHAPES[(i + 1) % len(SHAPES)] if SHAPES[(i + 1) % len(SHAPES)][3] else SHAPES[0]
    yield pytest.param(shape, mode, od, i % 2 == 0, id=f"{shape}-{mode}-{jnp.dtype(od).name}-bias{i % 2 == 0}")


@pytest.mark.parametrize("shape,xs_mode,out_dtype,use_bias", list(_cases()))
def test_epilogue_matches_numpy(shape, xs_mode, out_dtype, use_bias):
  m, n, k, kg = shape
  x, w, xs, ws, bias = _data(m, n, k, kg, xs_mode, seed=m + n + k)
  bias = bias if use_bias else None
  args = [jnp.asarray(a) for a in (x, w, xs, ws)]
  y = mk.int8_matmul(*args, k_group=kg, bias=None if bias is None else jnp.asarray(bias), out_dtype=out_dtype,
                     config=SMALL, interpret=True)
  assert y.dtype == out_dtype and y.shape == (m, n)
  ref = _numpy_ref(x, w, xs, ws, kg, bias)
  _check(y, ref, out_dtype)
  _check(mk.reference(*args, k_group=kg, bias=bias, out_dtype=out_dtype), ref, out_dtype)


R = dataclasses.replace


@pytest.mark.parametrize("cfg", [
    R(SMALL, wg_dimension="m"),
    R(SMALL, tile_k=32),  # 4 K tiles per group of 128: a group's int32 sum spans tiles
    R(SMALL, tile_k=128, epi_tile_n=16, out_slots=1),
    R(SMALL, tile_n=16, epi_tile_n=None, grid_minor_dim="m", grid_tile_width=2),
], ids=["wg_m", "tk32", "tk128_epi16_1slot", "tn16_minor_m"])
def test_schedule_knobs_keep_results(cfg):
  m, n, k, kg = 70, 72, 576, 128
  x, w, xs, ws, bias = _data(m, n, k, kg, "token_group", seed=3, scale_dtype=np.float16)
  args = [jnp.asarray(a) for a in (x, w, xs, ws)]
  y = mk.int8_matmul(*args, k_group=kg, bias=jnp.asarray(bias, jnp.bfloat16), out_dtype=jnp.float32, config=cfg,
                     interpret=True)
  _check(y, _numpy_ref(x, w, xs.astype(np.float32), ws.astype(np.float32), kg,
                       np.asarray(jnp.asarray(bias, jnp.bfloat16).astype(jnp.float32))), jnp.float32)


@pytest.mark.parametrize("tile_n,bias_dtype", [(16, jnp.float32), (48, jnp.bfloat16)])
def test_small_m_layout_with_padded_vector_slots(tile_n, bias_dtype):
  """The small-M schedule (64-row tiles, warpgroups split along N) with tiles whose scale/bias slots are padded
  to 128 bytes (16 f32 = 64 bytes, 48 f32 = 192, 48 bf16 = 96): each warpgroup reads its own scales, never the
  padding; N = 200 leaves a partial last tile."""
  m, n, k = 16, 200, 256
  cfg = mk.TuningConfig(tile_m=64, tile_n=tile_n, tile_k=128, max_concurrent_steps=2, wg_dimension="n",
                        epi_tile_m=64, epi_tile_n=None)
  x, w, xs, ws, bias = _data(m, n, k, None, "token", seed=tile_n)
  bias = np.asarray(jnp.asarray(bias, bias_dtype).astype(jnp.float32))
  y = mk.int8_matmul(*[jnp.asarray(a) for a in (x, w, xs, ws)], bias=jnp.asarray(bias, bias_dtype),
                     out_dtype=jnp.float32, config=cfg, interpret=True)
  _check(y, _numpy_ref(x, w, xs, ws, None, bias), jnp.float32)


def test_per_channel_with_delayed_release_and_no_races():
  """No K-groups: wgmma_wait(1) keeps one MMA in flight; the race detector watches the epilogue's own SMEM
  traffic (scale-vector TMA + barrier, double-buffered output tiles). (Reads of pipelined buffers through
  plgpu.load are reported as races by jax 0.11.2's detector even in a minimal canonical pipeline, so the
  K-group path, which reads its group scales that way, is not run with it.)"""
  from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as ipc
  m, n, k = 70, 72, 576
  cfg = R(SMALL, delay_release=1, wg_dimension="m")
  x, w, xs, ws, bias = _data(m, n, k, None, "token", seed=5)
  y = mk.int8_matmul(*[jnp.asarray(a) for a in (x, w, xs, ws)], bias=jnp.asarray(bias), out_dtype=jnp.float32,
                     config=cfg, interpret=plgpu.InterpretGPUParams(detect_races=True))
  _check(y, _numpy_ref(x, w, xs, ws, None, bias), jnp.float32)
  assert not ipc.get_races().races_found


# ---------------------------------------------------------------------------------------------------------
# Lowering to CUDA for every configuration the GPU check times.

REAL = [(n, k, m, kg) for (n, k) in [(8192, 8192), (28672, 7168)] for m in (1, 16, 4096) for kg in (None, 128)]


def _lower(m, n, k, kg, config, out_dtype=jnp.bfloat16, xs_mode="token", bias=False, scale_dtype=jnp.float32):
  groups = 1 if kg is None else -(-k // kg)
  xs = {"tensor": (), "token": (m, 1), "token_group": (groups, m, 1)}[xs_mode]
  structs = [S((m, k), jnp.int8), S((n, k), jnp.int8), S(xs, scale_dtype), S((groups, n), scale_dtype)]
  if bias:
    structs.append(S((n,), jnp.bfloat16 if bias is True else bias))
  f = lambda x, w, a, b, *bb: mk.int8_matmul(x, w, a, b, k_group=kg, bias=bb[0] if bb else None,
                                             out_dtype=out_dtype, config=config)
  with mgpu_common.abstract_gpu():
    return jax.jit(f).trace(*structs).lower(lowering_platforms=("cuda",)).as_text()


def _copy_problems(*args, **kwargs) -> list[str]:
  """Lower (as _lower) and audit every async copy of the kernel: the alignment rules it breaks."""
  jax.clear_caches()  # a cached lowering would record no copies
  with mgpu_audit.record() as copies:
    assert "mosaic_gpu" in _lower(*args, **kwargs)
  assert copies, "no async copy recorded"
  return mgpu_audit.problems(copies)


@pytest.mark.parametrize("n,k,m,kg", REAL, ids=str)
def test_every_sweep_config_lowers(n, k, m, kg):
  configs = tuning.sweep_configs(m, n, k, kg, num_sms=132)
  assert 1 <= len(configs) <= 8 and configs[0] == mk.default_config(m, n, k, kg, num_sms=132)
  assert len(set(configs)) == len(configs)
  for c in configs:
    assert tuning.smem_bytes(c, jnp.bfloat16, kg is not None) <= mgpu_common.HOPPER_SMEM_BYTES
    assert _copy_problems(m, n, k, kg, c) == [], c  # lowers, and every TMA / bulk copy is aligned


# The H200 fault (CUDA_ERROR_MISALIGNED_ADDRESS, W8A8 M=16, N=K=8192): in this sweep config each warpgroup
# TMA-loaded its 16 float32 w_scales (64 bytes) into its slot of a (2, 16) SMEM buffer, so warpgroup 1's
# destination sat at 64 mod 128; cp.async.bulk.tensor needs 128-byte aligned SMEM. Same at M=1, N=28672:
# 112 scales = 448 bytes per slot, in every config with tile_n=112 (the default there).
FAULTED = mk.TuningConfig(tile_m=64, tile_n=16, tile_k=128, max_concurrent_steps=6, wg_dimension="n",
                          epi_tile_m=64, epi_tile_n=None)


def test_audit_catches_the_small_m_fault(monkeypatch):
  """The audit has teeth: with the old (unpadded) vector slots it reports exactly the faulting copies."""
  assert _copy_problems(16, 8192, 8192, None, FAULTED) == []
  m1_default = mk.default_config(1, 28672, 7168, num_sms=132)
  assert m1_default.tile_n == 112 and _copy_problems(1, 28672, 7168, None, m1_default) == []
  monkeypatch.setattr(mk, "_vec_slot", lambda size, dtype: size)  # the layout that ran on the H200
  (p,) = _copy_problems(16, 8192, 8192, None, FAULTED)
  assert "load memref<8192xf32>" in p and "+ 64*s" in p and "not 128-byte aligned" in p, p
  (p,) = _copy_problems(1, 28672, 7168, None, m1_default)
  assert "load memref<28672xf32>" in p and "+ 448*s" in p, p
  # a bfloat16 bias at the M=16 default (tile_n=32: 64 bytes per slot) broke the same rule
  assert any("memref<8192xbf16>" in q for q in _copy_problems(
      16, 8192, 8192, None, mk.default_config(16, 8192, 8192, num_sms=132), bias=jnp.bfloat16))


@pytest.mark.parametrize("scale_dtype,bias", [(jnp.float32, jnp.bfloat16), (jnp.float16, jnp.float32)],
                         ids=["f32_scales-bf16_bias", "f16_scales-f32_bias"])
def test_epilogue_vectors_are_tma_aligned_for_every_tile_n(scale_dtype, bias):
  """Every wgmma N a config may use, per-token and per-channel scales and a bias (all three TMA-loaded per
  warpgroup): no copy breaks an alignment rule."""
  for tn in tuning.S8_WGMMA_N:
    cfg = mk.TuningConfig(tile_m=64, tile_n=tn, tile_k=128, max_concurrent_steps=2, wg_dimension="n",
                          epi_tile_n=None if tn <= 128 else 16)
    assert _copy_problems(16, 4096, 1024, None, cfg, bias=bias, scale_dtype=scale_dtype) == [], tn


def test_epilogue_variants_lower():
  _lower(4096, 8192, 8192, None, None, jnp.float32, "tensor", bias=True)
  _lower(4095, 8192, 8192, 128, None, jnp.float16, "token_group", bias=True)  # M % 8 != 0: padded rows
  _lower(70, 72, 576, 128, None, jnp.bfloat16, "token_group")
  with mgpu_common.abstract_gpu():
    jax.jit(mk.int8_matmul_int32).trace(S((16, 8192), jnp.int8), S((8192, 8192), jnp.int8)).lower(
        lowering_platforms=("cuda",))


def test_lowering_catches_oversized_smem():
  """The lowering test has teeth: a configuration past the 227 KiB of SMEM fails it, as on the GPU."""
  big = mk.TuningConfig(tile_m=128, tile_n=128, tile_k=128, max_concurrent_steps=6, wg_dimension="m")
  with pytest.raises(ValueError, match="exceeds available shared memory"):
    _lower(4096, 8192, 8192, None, big)


def test_small_m_fills_the_sms_in_one_wave():
  # 28672 / 224 = 128 CTAs, 8192 / 64 = 128 CTAs on 132 SMs, each streaming its weight rows over all of K
  assert mk.default_config(1, 28672, 7168, num_sms=132).cta_n == 224
  assert mk.default_config(16, 8192, 8192, num_sms=132).cta_n == 64
  assert mk.default_config(4096, 8192, 8192, num_sms=132).cta_m == 256


# ---------------------------------------------------------------------------------------------------------
# Bad input: ValueError naming the argument, raised before launch.

def _good(m=8, n=64, k=256, kg=None):
  groups = 1 if kg is None else -(-k // kg)
  return dict(x=jnp.zeros((m, k), jnp.int8), w=jnp.zeros((n, k), jnp.int8), xs=jnp.ones((m, 1), jnp.float32),
              ws=jnp.ones((groups, n), jnp.float32))


@pytest.mark.parametrize("change,match", [
    (dict(x=jnp.zeros((8, 256), jnp.uint8)), "x_int8"),
    (dict(x=jnp.zeros((8, 256), jnp.float32)), "x_int8"),
    (dict(w=jnp.zeros((256, 64), jnp.int8)), "w_int8"),
    (dict(w=jnp.zeros((64, 256, 1), jnp.int8)), "w_int8"),
    (dict(x=jnp.zeros((8, 200), jnp.int8), w=jnp.zeros((64, 200), jnp.int8)), "K=200"),
    (dict(w=jnp.zeros((60, 256), jnp.int8), ws=jnp.ones((1, 60))), "N=60"),
    (dict(xs=jnp.ones((7, 1))), "x_scale"),
    (dict(xs=jnp.ones((8, 1), jnp.int32)), "x_scale"),
    (dict(xs=jnp.ones((2, 8, 1))), "x_scale"),  # per-group x_scale without k_group
    (dict(ws=jnp.ones((64,))), "w_scale"),
    (dict(ws=jnp.ones((2, 64))), "w_scale"),  # groups without k_group
    (dict(kg=100), "k_group"),
    (dict(kg=128, ws=jnp.ones((1, 64))), "w_scale"),
    (dict(kg=0), "k_group"),
    (dict(bias=jnp.ones((63,))), "bias"),
    (dict(bias=jnp.ones((64,), jnp.int32)), "bias"),
    (dict(out_dtype=jnp.int8), "out_dtype"),
    (dict(config=mk.TuningConfig(tile_m=96)), "config"),
    (dict(config=mk.TuningConfig(tile_n=40)), "config"),
    (dict(kg=64, ws=jnp.ones((4, 64)), config=mk.TuningConfig(tile_k=128)), "config"),
    (dict(config=mk.TuningConfig(tile_k=48)), "config"),
])
def test_bad_input_raises_value_error(change, match):
  a = _good(kg=change.get("kg") if change.get("kg") not in (0, 100) else None)
  a.update({k: v for k, v in change.items() if k in a})
  kwargs = {k: v for k, v in change.items() if k in ("bias", "out_dtype", "config")}
  if "kg" in change:
    kwargs["k_group"] = change["kg"]
  with pytest.raises(ValueError, match=match):
    mk.int8_matmul(a["x"], a["w"], a["xs"], a["ws"], interpret=True, **kwargs)


def test_int32_entry_checks_operands():
  with pytest.raises(ValueError, match="w_int8"):
    mk.int8_matmul_int32(jnp.zeros((4, 64), jnp.int8), jnp.zeros((8, 32), jnp.int8))
