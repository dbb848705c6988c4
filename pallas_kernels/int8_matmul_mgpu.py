"""W8A8 GEMM for Hopper in Mosaic GPU: int8 x int8 -> int32 on wgmma, fused dequantization epilogue.

  y = sum_g (x[:, K_g] @ w[:, K_g].T)_int32 * x_scale_g * w_scale_g  (+ bias), in float32, cast to out_dtype

Contract
  x_int8  (M, K) int8; w_int8 (N, K) int8 (storage v2: K contiguous per output channel).
  x_scale () or (1, 1) per tensor | (M, 1) per token | (G, M, 1) per token and K-group (needs k_group).
  w_scale (1, N) per channel (k_group None) | (G, N) per K-group and channel, G = ceil(K / k_group), the
          last group may be shorter. Scales and bias: float32, bfloat16 or float16.
  bias (N,) optional; out_dtype float32 | bfloat16 | float16. `int8_matmul_int32` returns the raw int32 sum.
  K % 32 == 0 and N % 8 == 0 (Mosaic GPU's TMA descriptors tile the whole arrays by (8, swizzle) atoms);
  M, N, K need not be multiples of the tiles: TMA zero-fills reads past the edges and clips stores. When
  M % 8 != 0 and M > 8, x and y get padded to a multiple of 8 rows (copies of x and y, not of w: callers
  that can should keep M a multiple of 8).
  k_group must be a multiple of 32 (or >= K).

Schedule (JAX's hopper_matmul_mgpu.py, with int8 operands): persistent CTAs walk the output tiles; in each,
a memory warpgroup streams x and w K-tiles into SMEM with TMA (`max_concurrent_steps` stages) and two
compute warpgroups issue wgmma with int32 accumulators. Int8 wgmma takes no transposed operands, so w's
(cta_n, tile_k) SMEM tile is passed as its transposed view (K-major B). With K-groups every K tile lies in
one group (tile_k divides k_group) and is summed exactly in a fresh int32 accumulator (Mosaic GPU cannot
reset one); a group's int32 sum is scaled into a float32 register sum at its last tile, so integer sums
stay exact. Up to M = 256 the GEMM is weight-bandwidth bound: 64-row tiles, and an N tile that makes the
tiles fill the SMs in about one wave (28672 / 224 = 128 CTAs on 132 SMs), each CTA streaming its weight
rows over the whole K; beyond, 256 x 128 CTA tiles (128 x 128 with K-groups: two accumulators).
The configurations (TuningConfig, default_config, sweep_configs) are in int8_matmul_tuning.py.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from pallas_kernels import mgpu_common
from pallas_kernels.int8_matmul_tuning import (
    TuningConfig, check_config, default_config, epilogue_slots, epilogue_tile)
from pallas_kernels.mgpu_common import cdiv

OUT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
SCALE_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _swizzle(block_minor: int, array_minor: int, dtype) -> int | None:
  """Largest swizzle (bytes) whose atom divides both the SMEM block's and the GMEM array's minor dimension.

  Mosaic GPU builds TMA descriptors over the GMEM array tiled like the SMEM block ((8, swizzle) tiles), so
  the array's minor dimension must be a whole number of swizzle atoms (and its rows a multiple of 8, or < 8).
  """
  nbytes = jnp.dtype(dtype).itemsize
  for sw in (128, 64, 32):
    if (block_minor * nbytes) % sw == 0 and (array_minor * nbytes) % sw == 0:
      return sw
  return None


def _out_tile_n(tile_n: int, epi_n: int, n: int, dtype) -> tuple[int, int | None]:
  """Epilogue tile width and swizzle: the tile's own largest swizzle atom must divide N.

  Mosaic GPU gives the SMEM tile the largest swizzle its width allows (inferring one when none is given)
  and tiles the GMEM output the same way; an N that is not a whole number of atoms (e.g. 72 with 64-wide
  bf16 atoms) needs a narrower epilogue tile (down to 16 bytes: no swizzle).
  """
  nbytes = jnp.dtype(dtype).itemsize
  e = epi_n
  while True:
    sw = next((s for s in (128, 64, 32) if (e * nbytes) % s == 0), None)
    if sw is None or (n * nbytes) % sw == 0 or e % 2 or tile_n % (e // 2):
      return e, sw
    e //= 2


def _vec_slot(size: int, dtype) -> int:
  """Elements per warpgroup slot of an epilogue vector buffer (2, slot): a whole number of 128 bytes.

  Each warpgroup TMA-loads its scale/bias vector into its own slot, and cp.async.bulk.tensor faults
  (CUDA_ERROR_MISALIGNED_ADDRESS) on an SMEM address that is not 128-byte aligned: unpadded, the second
  slot of 16 or 112 float32 scales (tile_n at small M) starts at 64 mod 128. The padding costs no SMEM
  (each allocation is rounded up to 1024 bytes anyway) and is none at tile_n = 128 (the large-M configs).
  """
  per = 128 // jnp.dtype(dtype).itemsize
  return cdiv(size, per) * per


def _transforms(swizzle: int | None, dtype) -> tuple[Any, ...]:
  if swizzle is None:
    return ()
  return plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle)


def _kernel(*refs, cfg: TuningConfig, m: int, m_scale: int, n: int, k: int, groups: int, kg: int,
            xs_mode: str | None, has_bias: bool, out_dtype, num_ctas: int):
  """Refs: x (M, K), w (N, K), [x_scale: () | (M,) | (G*M,)], [w_scale (G*N,)], [bias (N,)], out (M, N)."""
  x_g, w_g, *rest = refs
  raw = xs_mode is None
  xs_g = ws_g = b_g = None
  if not raw:
    xs_g, ws_g, *rest = rest
    if has_bias:
      b_g, *rest = rest
  (out_g,) = rest
  grouped = groups > 1
  token_group = xs_mode == "token_group"
  tm, tn, tk = cfg.tile_m, cfg.tile_n, cfg.tile_k
  cta_m, cta_n = cfg.cta_m, cfg.cta_n
  m_iters, n_iters, k_iters = cdiv(m, cta_m), cdiv(n, cta_n), cdiv(k, tk)
  steps_per_group = kg // tk if grouped else k_iters
  em, en = epilogue_tile(cfg)
  slots = epilogue_slots(cfg)
  acc_dtype = jnp.int32 if raw else jnp.float32
  in_tr = _transforms(_swizzle(tk, k, jnp.int8), jnp.int8)
  en, out_sw = _out_tile_n(tn, en, n, out_dtype)
  out_tr = _transforms(out_sw, out_dtype)
  row_layout, col_layout = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)
  group_of = lambda kk: kk // steps_per_group

  def get_pipeline(body, compute_context):
    specs = [plgpu.BlockSpec((cta_m, tk), lambda kk: (0, kk), transforms=in_tr, delay_release=cfg.delay_release),
             plgpu.BlockSpec((cta_n, tk), lambda kk: (0, kk), transforms=in_tr, delay_release=cfg.delay_release)]
    if grouped:  # this K tile's group scales ride along with its operands (flattened (G*N,) / (G*M,))
      specs.append(plgpu.BlockSpec((pl.Element(cta_n),), lambda kk: (group_of(kk) * n,),
                                   oob_fill_mode=plgpu.OOBFillMode.UNDEFINED))
      if token_group:
        specs.append(plgpu.BlockSpec((pl.Element(cta_m),), lambda kk: (group_of(kk) * m_scale,)))
    return plgpu.emit_pipeline_warp_specialized(
        body, grid=(k_iters,), memory_registers=40, in_specs=specs, wg_axis="wg", num_compute_wgs=2,
        max_concurrent_steps=cfg.max_concurrent_steps, compute_context=compute_context)

  def pipeline_operands(m0, n0):
    ops = [x_g.at[pl.ds(m0, cta_m), :], w_g.at[pl.ds(n0, cta_n), :]]
    if grouped:
      ops.append(ws_g.at[pl.ds(n0, (groups - 1) * n + cta_n)])
      if token_group:
        ops.append(xs_g.at[pl.ds(m0, (groups - 1) * m_scale + cta_m)])
    return ops

  scratch = dict(out_smem=plgpu.SMEM((2, slots, em, en), out_dtype, transforms=out_tr))
  vec_specs = []  # per-tile epilogue vectors, prefetched by TMA while the K loop runs
  if xs_mode == "token":
    vec_specs.append(("xs", tm, xs_g.dtype, "m"))
  if not raw and not grouped:
    vec_specs.append(("ws", tn, ws_g.dtype, "n"))
  if has_bias:
    vec_specs.append(("bias", tn, b_g.dtype, "n"))
  for name, size, dtype, _ in vec_specs:
    scratch[name] = plgpu.SMEM((2, _vec_slot(size, dtype)), dtype)
    scratch[name + "_bar"] = plgpu.Barrier(num_barriers=2)
  ignore = lambda *_, **__: None
  dummy_ops = pipeline_operands(0, 0)

  @functools.partial(pl.run_scoped, allocs=get_pipeline(ignore, ignore).get_allocations(*dummy_ops),
                     collective_axes="wg", **scratch)
  def _scope(allocs, out_smem, **vecs):
    wg = lax.axis_index("wg")

    @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
    def _tile_loop(info):
      (lin,) = info.index
      mi, ni = plgpu.planar_snake(lin, (m_iters, n_iters), 0 if cfg.grid_minor_dim == "m" else 1,
                                  cfg.grid_tile_width)
      m0, n0 = mi * cta_m, ni * cta_n
      wg_m0 = m0 + (wg * tm if cfg.wg_dimension == "m" else 0)
      wg_n0 = n0 + (wg * tn if cfg.wg_dimension == "n" else 0)
      wg_m = pl.ds(wg * tm, tm) if cfg.wg_dimension == "m" else slice(None)
      wg_n = pl.ds(wg * tn, tn) if cfg.wg_dimension == "n" else slice(None)

      def vec_ref(name, size):  # this warpgroup's slot (its padding, if any, is never read)
        ref = vecs[name].at[wg]
        return ref if ref.shape[0] == size else ref.at[pl.ds(0, size)]

      def prefetch_vectors():
        for name, size, _, axis in vec_specs:
          src = {"xs": xs_g, "ws": ws_g, "bias": b_g}[name]
          start = wg_m0 if axis == "m" else wg_n0
          plgpu.copy_gmem_to_smem(src.at[pl.ds(start, size)], vec_ref(name, size), vecs[name + "_bar"].at[wg])

      def load_vector(name, size, layout):
        plgpu.barrier_wait(vecs[name + "_bar"].at[wg])
        return plgpu.load(vec_ref(name, size), layout=layout).astype(jnp.float32)

      def scaled(acc_i32, scale_refs):
        """acc (int32, exact) -> float32 times this group's scales (w per column, x per row if grouped)."""
        y = acc_i32.astype(jnp.float32)
        ws_s = scale_refs[0]
        ws = plgpu.load(ws_s if cfg.wg_dimension == "m" else ws_s.at[pl.ds(wg * tn, tn)], layout=col_layout)
        y = y * lax.broadcast_in_dim(ws.astype(jnp.float32), (tm, tn), [1])
        if token_group:
          xs_s = scale_refs[1]
          xs = plgpu.load(xs_s if cfg.wg_dimension == "n" else xs_s.at[pl.ds(wg * tm, tm)], layout=row_layout)
          y = y * lax.broadcast_in_dim(xs.astype(jnp.float32), (tm, tn), [0])
        return y

      def compute_context(eval_pipeline):
        prefetch_vectors()
        # a per-tensor scale is read from GMEM before the K loop, so its latency hides behind it
        xs_scalar = xs_g[...].astype(jnp.float32) if xs_mode == "tensor" else None
        epilogue = functools.partial(finish, xs_scalar)
        if grouped:  # the carry: float32 sum of scaled groups (and the current group's int32 sum)
          zeros_f = plgpu.layout_cast(jnp.zeros((tm, tn), jnp.float32), plgpu.Layout.WGMMA)
          zeros_i = plgpu.layout_cast(jnp.zeros((tm, tn), jnp.int32), plgpu.Layout.WGMMA)
          carry = eval_pipeline(zeros_f if steps_per_group == 1 else (zeros_i, zeros_f))
          epilogue(carry if steps_per_group == 1 else carry[1])
        else:
          @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tm, tn), jnp.int32))
          def _acc_scope(acc_ref):
            eval_pipeline(acc_ref)
            epilogue(acc_ref[...].astype(acc_dtype))

      def finish(xs_scalar, y):
        if xs_mode == "tensor":
          y = y * xs_scalar
        elif xs_mode == "token":
          y = y * lax.broadcast_in_dim(load_vector("xs", tm, row_layout), (tm, tn), [0])
        if not raw and not grouped:
          y = y * lax.broadcast_in_dim(load_vector("ws", tn, col_layout), (tm, tn), [1])
        if has_bias:
          y = y + lax.broadcast_in_dim(load_vector("bias", tn, col_layout), (tm, tn), [1])
        y = y.astype(out_dtype)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        for i in range(tm // em):
          for j in range(tn // en):
            slot = (i * (tn // en) + j) % slots
            plgpu.wait_smem_to_gmem(slots - 1, wait_read_only=True)
            out_smem[wg, slot] = y[i * em:(i + 1) * em, j * en:(j + 1) * en]
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem.at[wg, slot],
                                    out_g.at[pl.ds(wg_m0 + i * em, em), pl.ds(wg_n0 + j * en, en)])

      def mma_body(idxs, x_s, w_s, *scale_refs_and_carry):
        *scale_refs, carry = scale_refs_and_carry
        if not grouped:
          plgpu.wgmma(carry, x_s.at[wg_m], w_s.at[wg_n].T)  # int8 B must be K-major: w's tile, transposed
          plgpu.wgmma_wait(cfg.delay_release)
          return carry

        # K-groups: this tile's exact int32 sum in a fresh accumulator (an accumulator cannot be reset),
        # added to the group's int32 sum; at the group's end, scaled into the float32 sum.
        def tile_sum(acc_ref):
          plgpu.wgmma(acc_ref, x_s.at[wg_m], w_s.at[wg_n].T)
          return acc_ref[...]  # waits for the wgmma
        part = pl.run_scoped(tile_sum, plgpu.ACC((tm, tn), jnp.int32))
        if steps_per_group == 1:
          return carry + scaled(part, scale_refs)
        (kk,) = idxs
        run, f = carry
        run = run + part
        group_end = jnp.logical_or((kk + 1) % steps_per_group == 0, kk == k_iters - 1)
        return lax.cond(group_end, lambda r, f: (r * 0, f + scaled(r, scale_refs)), lambda r, f: (r, f), run, f)

      get_pipeline(mma_body, compute_context)(*pipeline_operands(m0, n0), allocations=allocs)

  plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _check_int8(name: str, a, ndim: int = 2):
  if getattr(a, "ndim", None) != ndim or jnp.dtype(a.dtype) != jnp.int8:
    raise ValueError(f"{name} must be a {ndim}-D int8 array, got {getattr(a, 'shape', None)} "
                     f"{getattr(a, 'dtype', type(a).__name__)}")


def _check_operands(x, w):
  _check_int8("x_int8", x)
  _check_int8("w_int8", w)
  (m, k), (n, k2) = x.shape, w.shape
  if k != k2:
    raise ValueError(f"w_int8 must be (N, K) with K = x_int8.shape[1] = {k}, got {w.shape}")
  if m < 1 or n < 1 or k < 1:
    raise ValueError(f"x_int8 {x.shape} and w_int8 {w.shape} must be non-empty")
  if k % 32:
    raise ValueError(f"x_int8/w_int8: K={k} must be a multiple of 32 (int8 wgmma reads K in swizzled "
                     "atoms of 32, 64 or 128 bytes, and TMA tiles the whole array by them)")
  if n % 8:
    raise ValueError(f"w_int8: N={n} must be a multiple of 8 (TMA needs 16-byte output row strides)")
  return m, n, k


def _launch(operands, *, m, n, k, groups, kg, xs_mode, has_bias, out_dtype, config, interpret):
  grouped = groups > 1
  check_config(config, grouped, xs_mode == "token_group")
  if grouped and kg % config.tile_k:
    raise ValueError(f"config: tile_k={config.tile_k} must divide k_group={kg}")
  if _swizzle(config.tile_k, k, jnp.int8) is None:
    raise ValueError(f"config: tile_k={config.tile_k} and K={k} share no swizzle atom of 32, 64 or 128")
  m_rows = m
  if m % 8 and m > 8:  # TMA tiles x and y by 8 rows: a partial last 8-row tile cannot be described
    m_rows = m + (-m % 8)
    operands = [jnp.pad(operands[0], ((0, m_rows - m), (0, 0))), *operands[1:]]
  tiles = cdiv(m, config.cta_m) * cdiv(n, config.cta_n)
  num_ctas = max(1, min(mgpu_common.num_sms(), tiles))
  body = functools.partial(_kernel, cfg=config, m=m_rows, m_scale=m, n=n, k=k, groups=groups, kg=kg, xs_mode=xs_mode,
                           has_bias=has_bias, out_dtype=jnp.dtype(out_dtype), num_ctas=num_ctas)
  f = plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((m_rows, n), out_dtype), grid=(num_ctas,), grid_names=("sm",),
      num_threads=3, thread_name="wg",
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=mgpu_common.interpret_params(interpret))
  y = f(*operands)
  return y if m_rows == m else y[:m]


def int8_matmul_int32(x_int8: jax.Array, w_int8: jax.Array, *, config: TuningConfig | None = None,
                      interpret: Any = False) -> jax.Array:
  """Raw int32 accumulator x_int8 (M, K) @ w_int8 (N, K).T -> (M, N) int32, no epilogue."""
  m, n, k = _check_operands(x_int8, w_int8)
  config = config or default_config(m, n, k, None, jnp.int32)
  return _launch((x_int8, w_int8), m=m, n=n, k=k, groups=1, kg=k, xs_mode=None, has_bias=False,
                 out_dtype=jnp.int32, config=config, interpret=interpret)


def _scale_mode(x_scale, w_scale, m, n, k, k_group):
  for name, s in (("x_scale", x_scale), ("w_scale", w_scale)):
    if not hasattr(s, "dtype") or jnp.dtype(s.dtype) not in [jnp.dtype(d) for d in SCALE_DTYPES]:
      raise ValueError(f"{name} must be a float32/bfloat16/float16 array, got {getattr(s, 'dtype', type(s))}")
  if k_group is not None and (not isinstance(k_group, int) or isinstance(k_group, bool) or k_group <= 0):
    raise ValueError(f"k_group must be a positive int or None, got {k_group!r}")
  groups = 1 if k_group is None else cdiv(k, k_group)
  if groups > 1 and k_group % 32:
    raise ValueError(f"k_group={k_group} must be a multiple of 32 (a K tile of wgmma .s8 is 32 wide) or >= K={k}")
  if tuple(w_scale.shape) != (groups, n):
    raise ValueError(f"w_scale must be ({groups}, {n}) (ceil(K / k_group), N) for k_group={k_group}, "
                     f"got {tuple(w_scale.shape)}")
  xs = tuple(x_scale.shape)
  if xs in ((), (1,), (1, 1)):
    return "tensor", groups
  if xs == (m, 1):
    return "token", groups
  if xs == (groups, m, 1) and k_group is not None:
    return ("token_group" if groups > 1 else "token"), groups
  raise ValueError(f"x_scale must be () or (1, 1) per tensor, ({m}, 1) per token or ({groups}, {m}, 1) per "
                   f"token and K-group (with k_group), got {xs} (k_group={k_group})")


def int8_matmul(x_int8: jax.Array, w_int8: jax.Array, x_scale: jax.Array, w_scale: jax.Array, *,
                k_group: int | None = None, bias: jax.Array | None = None, out_dtype=jnp.bfloat16,
                config: TuningConfig | None = None, interpret: Any = False) -> jax.Array:
  """y = dequantized (x_int8 @ w_int8.T) (+ bias) as out_dtype; see the module docstring for the shapes."""
  m, n, k = _check_operands(x_int8, w_int8)
  if jnp.dtype(out_dtype) not in [jnp.dtype(d) for d in OUT_DTYPES]:
    raise ValueError(f"out_dtype must be one of float32, bfloat16, float16, got {out_dtype}")
  xs_mode, groups = _scale_mode(x_scale, w_scale, m, n, k, k_group)
  if bias is not None and (tuple(bias.shape) != (n,) or jnp.dtype(bias.dtype) not in
                           [jnp.dtype(d) for d in SCALE_DTYPES]):
    raise ValueError(f"bias must be a float ({n},) array, got {getattr(bias, 'shape', None)} "
                     f"{getattr(bias, 'dtype', None)}")
  kg = k if groups == 1 else k_group
  config = config or default_config(m, n, k, kg if groups > 1 else None, out_dtype)
  xs_shape = {"tensor": (), "token": (m,), "token_group": (groups * m,)}[xs_mode]
  xs = jnp.reshape(x_scale, xs_shape)  # free reshapes: 1-D TMA sources
  operands = [x_int8, w_int8, xs, jnp.reshape(w_scale, (groups * n,))]
  if bias is not None:
    operands.append(bias)
  return _launch(operands, m=m, n=n, k=k, groups=groups, kg=kg, xs_mode=xs_mode, has_bias=bias is not None,
                 out_dtype=out_dtype, config=config, interpret=interpret)


def reference(x_int8, w_int8, x_scale, w_scale, *, k_group=None, bias=None, out_dtype=jnp.bfloat16):
  """Plain jnp: exact int32 sums per K-group, scaled in float32."""
  m, k = x_int8.shape
  n = w_int8.shape[0]
  groups = 1 if k_group is None else cdiv(k, k_group)
  kg = k if groups == 1 else k_group
  ws = jnp.asarray(w_scale, jnp.float32).reshape(groups, n)
  xs = jnp.asarray(x_scale, jnp.float32)
  xs = jnp.broadcast_to(xs.reshape(1 if xs.size == 1 else -1, 1 if xs.size == 1 else m, 1), (groups, m, 1))
  y = jnp.zeros((m, n), jnp.float32)
  for g in range(groups):
    sl = slice(g * kg, min(k, (g + 1) * kg))
    acc = lax.dot_general(x_int8[:, sl], w_int8[:, sl], (((1,), (1,)), ((), ())),
                          preferred_element_type=jnp.int32)
    y = y + acc.astype(jnp.float32) * xs[g] * ws[g][None, :]
  if bias is not None:
    y = y + jnp.asarray(bias, jnp.float32)[None, :]
  return y.astype(out_dtype)
