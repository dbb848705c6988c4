"""The cases experiments/gpu_check.py runs: each a matmul (or fused activation quantization) with its inputs, a
reference, the kernels under test and their baselines, so that every row is checked and timed on the same inputs.

A Case's impls map a label to an Impl (a jitted function of named inputs). Labels:
  ref            the reference, in float32 from exact integer sums or a float32 dot (never timed)
  xla_bf16       XLA's bf16 dot on the float weight: the baseline every ratio is taken against
  xla_int8       ops' portable W8A8 path: int8 x int8 dot_general on the stored (N, K) weight + scale epilogue
  xla_int8_kn    the same with the weight (K, N) (the layout before weight format 2; shows the transpose cost)
  xla_dequant    dequantize the packed weight to bf16 in XLA, then a bf16 dot (what a framework without a kernel
                 does)
  mgpu[...]      a Mosaic GPU kernel of pallas_kernels/ with one TuningConfig (the sweep)
  triton_...     a Pallas Triton kernel (kept only where it measures faster than XLA)
  torch_...      peers timed with CUDA events in the same process (cuBLAS bf16, torch._int_mm, tinygemm int4)
`lowering_targets` gives every kernel impl as (label, fn, ShapeDtypeStructs) for the CUDA lowering tests.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from pallas_kernels import act_quant, int8_matmul_mgpu as im, int8_matmul_tuning, weight_only_gemv_mgpu as gemv

BF16 = jnp.bfloat16
GROUP = 128

# (family, N, K, M): the rows of ../shared/GPU.md and of issues 15 and 16. Weights of 28672 x 7168 exceed the
# 60 MB L2 at every width, so they measure HBM streaming; 8192 x 8192 at 4 bits is L2-resident.
FULL = [
    ("w8a8", 8192, 8192, 4096), ("w8a8", 28672, 7168, 4096), ("w8a8", 8192, 8192, 16), ("w8a8", 28672, 7168, 1),
    ("w8a8_g128", 8192, 8192, 4096),
    ("w8a8_quant", 8192, 8192, 4096),
    ("rmsnorm_quant", 8192, 0, 4096),
    ("w4_g128", 28672, 7168, 1), ("w4_g128", 28672, 7168, 16), ("w4_g128", 28672, 7168, 4096),
    ("w4_g128", 8192, 8192, 1),
    ("bcq3_g128", 28672, 7168, 1), ("bcq2_g128", 28672, 7168, 1),
]
SMOKE = [("w8a8", 96, 320, 5), ("w8a8_g128", 96, 256, 3), ("w8a8_quant", 64, 256, 4), ("rmsnorm_quant", 256, 0, 6),
         ("w4_g128", 80, 384, 1), ("bcq3_g128", 80, 384, 2), ("bcq2_g128", 48, 256, 1)]  # K a multiple of 128


@dataclasses.dataclass(frozen=True)
class Input:
  shape: tuple[int, ...]
  dtype: Any
  kind: str  # normal | int8 | bytes | scale | small


@dataclasses.dataclass(frozen=True)
class Impl:
  fn: Callable[..., Any]
  args: tuple[str, ...]
  kind: str  # ref | xla | kernel | torch
  bytes: int = 0  # compulsory HBM traffic of this implementation (inputs once, outputs once)
  note: str = ""  # e.g. the kernel's TuningConfig
  checked: bool = True  # False: it multiplies another weight of the same shape (a timing baseline only)


@dataclasses.dataclass
class Case:
  family: str
  n: int
  k: int
  m: int
  inputs: dict[str, Input]
  impls: dict[str, Impl]
  flops: float
  tolerance: float  # |out - ref| / |ref| (Frobenius) a kernel must stay under

  @property
  def name(self) -> str:
    return f"{self.family} {self.n}x{self.k} M={self.m}" if self.k else f"{self.family} {self.m}x{self.n}"


def _bf16_dot(x, w_kn):
  return jnp.dot(x, w_kn, preferred_element_type=jnp.float32).astype(BF16)


def _int8_epilogue(acc, xs, ws):
  return (acc.astype(jnp.float32) * xs * ws).astype(BF16)


def xla_int8_nk(x_i8, w_nk, xs, ws):
  """ops' W8A8 path on the stored layout: contract the weight's last (K) dimension, no transpose."""
  acc = jax.lax.dot_general(x_i8, w_nk, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
  return _int8_epilogue(acc, xs, ws)


def xla_int8_grouped(x_i8, w_nk, xs, ws, k_group=GROUP):
  """Per-K-group int32 sums, each scaled by its group's weight scale (ops' batched path)."""
  m, k = x_i8.shape
  n, g = w_nk.shape[0], k // k_group
  acc = jax.lax.dot_general(x_i8.reshape(m, g, k_group), w_nk.reshape(n, g, k_group),
                            (((2,), (2,)), ((1,), (1,))), preferred_element_type=jnp.int32)  # (G, M, N)
  return jnp.sum(acc.astype(jnp.float32) * xs[None] * ws[:, None, :], axis=0).astype(BF16)


def _int8_ref(x_i8, w_nk, xs, ws, k_group=None):
  k = x_i8.shape[1]
  kg = k_group or k
  xg = x_i8.reshape(-1, k // kg, kg).astype(jnp.int32)
  wg = w_nk.reshape(-1, k // kg, kg).astype(jnp.int32)
  acc = jnp.einsum("mgk,ngk->gmn", xg, wg, preferred_element_type=jnp.int32).astype(jnp.float32)
  return jnp.sum(acc * xs[None] * ws[:, None, :], axis=0)


def _quant_rows(x):
  xf = x.astype(jnp.float32)
  s = jnp.maximum(jnp.max(jnp.abs(xf), axis=-1, keepdims=True), 1e-30) / 127.0
  return jnp.clip(jnp.round(xf / s), -127, 127).astype(jnp.int8), s


def _quantized_first(matmul):
  """bf16 x -> token-wise int8 (x_i8, x_scale) -> matmul(x_i8, w, x_scale, w_scale)."""
  def run(x, w, ws):
    x_i8, xs = _quant_rows(x)
    return matmul(x_i8, w, xs, ws)
  return run


def _rmsnorm(x, g):
  xf = x.astype(jnp.float32)
  return xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + 1e-6) * g.astype(jnp.float32)


def dequant_uniform4(packed, scale, k):
  """(N, K/2) int4 bytes + (G, N) scales -> (K, N) bf16 (group along K)."""
  n = packed.shape[0]
  v = jax.lax.bitcast_convert_type(packed, jnp.int4).reshape(n, k).astype(jnp.float32)
  g = scale.shape[0]
  w = v.reshape(n, g, -1) * scale.T.astype(jnp.float32)[:, :, None]
  return w.reshape(n, k).T.astype(BF16)


def dequant_bcq(planes, alpha, offset, k):
  """(q, N, K/8) sign bits + (q, G, N) alphas + (G, N) offset -> (K, N) bf16."""
  q, n, _ = planes.shape
  bits = (planes[..., None] >> jnp.arange(8, dtype=jnp.uint8).reshape(1, 1, 1, 8)) & jnp.uint8(1)
  signs = bits.reshape(q, n, -1)[:, :, :k].astype(jnp.float32) * 2.0 - 1.0  # (q, N, K)
  g = alpha.shape[1]
  w = jnp.sum(signs.reshape(q, n, g, -1) * jnp.swapaxes(alpha, 1, 2).astype(jnp.float32)[..., None], axis=0)
  if offset is not None:
    w = w + offset.T.astype(jnp.float32)[:, :, None]
  return w.reshape(n, k).T.astype(BF16)


def _case(family: str, n: int, k: int, m: int, interpret: bool | None, sweep: bool = True) -> Case:
  jit = jax.jit
  if family in ("w8a8", "w8a8_g128", "w8a8_quant"):
    grouped = family == "w8a8_g128"
    groups = k // GROUP if grouped else 1
    inputs = {"x": Input((m, k), BF16, "normal"), "x_i8": Input((m, k), jnp.int8, "int8"),
              "xs": Input((m, 1), jnp.float32, "scale"), "w_nk": Input((n, k), jnp.int8, "int8"),
              "ws": Input((groups, n), jnp.float32, "scale"), "w_kn": Input((k, n), BF16, "small")}
    io8 = m * k + 4 * m + n * k + 4 * groups * n + 2 * m * n
    impls = {"xla_bf16": Impl(jit(_bf16_dot), ("x", "w_kn"), "xla", 2 * (m * k + k * n + m * n), checked=False)}
    if family == "w8a8_quant":
      impls["ref"] = Impl(jit(_quantized_first(_int8_ref)), ("x", "w_nk", "ws"), "ref")
      impls["xla_int8"] = Impl(jit(_quantized_first(xla_int8_nk)), ("x", "w_nk", "ws"), "xla", io8 + m * k)
    elif grouped:
      impls["ref"] = Impl(jit(functools.partial(_int8_ref, k_group=GROUP)), ("x_i8", "w_nk", "xs", "ws"), "ref")
      impls["xla_int8"] = Impl(jit(xla_int8_grouped), ("x_i8", "w_nk", "xs", "ws"), "xla", io8)
    else:
      impls["ref"] = Impl(jit(_int8_ref), ("x_i8", "w_nk", "xs", "ws"), "ref")
      impls["xla_int8"] = Impl(jit(xla_int8_nk), ("x_i8", "w_nk", "xs", "ws"), "xla", io8)
      if m >= 4096:  # the weight stored (K, N), as before weight format 2: XLA transposes it every call
        inputs["w_kn_i8"] = Input((k, n), jnp.int8, "int8")
        impls["xla_int8_kn"] = Impl(jit(lambda x, w, xs, ws: _int8_epilogue(jax.lax.dot_general(
            x, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32), xs, ws)),
            ("x_i8", "w_kn_i8", "xs", "ws"), "xla", io8, checked=False)
    impls.update(kernel_impls(family, n, k, m, io8, interpret, sweep))
    return Case(family, n, k, m, inputs, impls, 2.0 * m * n * k, 1e-2)
  if family == "rmsnorm_quant":
    inputs = {"x": Input((m, n), BF16, "normal"), "g": Input((n,), BF16, "scale")}
    io = 2 * m * n + m * n + 4 * m + 2 * n
    impls = {"ref": Impl(jit(lambda x, g: _quant_rows(_rmsnorm(x, g))), ("x", "g"), "ref"),
             "xla": Impl(jit(lambda x, g: _quant_rows(_rmsnorm(x, g))), ("x", "g"), "xla", io),
             "triton_rmsnorm_quant": Impl(jit(functools.partial(act_quant.rmsnorm_quantize, interpret=interpret)),
                                          ("x", "g"), "kernel", io)}
    return Case(family, n, 0, m, inputs, impls, 0.0, 1.0)
  # weight-only
  groups = -(-k // GROUP)
  inputs = {"x": Input((m, k), BF16, "normal"), "w_kn": Input((k, n), BF16, "small")}
  if family == "w4_g128":
    inputs |= {"packed": Input((n, k // 2), jnp.uint8, "bytes"), "scale": Input((groups, n), jnp.float16, "scale")}
    dequant, args = (lambda p, s: dequant_uniform4(p, s, k)), ("packed", "scale")
    w_bytes = n * k // 2 + 2 * groups * n
  else:
    q = 3 if family == "bcq3_g128" else 2
    inputs |= {"planes": Input((q, n, k // 8), jnp.uint8, "bytes"),
               "alpha": Input((q, groups, n), jnp.float16, "scale"),
               "offset": Input((groups, n), jnp.float16, "scale")}
    dequant, args = (lambda p, a, o: dequant_bcq(p, a, o, k)), ("planes", "alpha", "offset")
    w_bytes = q * n * k // 8 + 2 * (q + 1) * groups * n
  io = 2 * m * k + 2 * m * n
  impls = {"ref": Impl(jit(lambda x, *w: jnp.dot(x.astype(jnp.float32), dequant(*w).astype(jnp.float32))),
                       ("x",) + args, "ref"),
           "xla_bf16": Impl(jit(_bf16_dot), ("x", "w_kn"), "xla", io + 2 * k * n, checked=False),
           "xla_dequant": Impl(jit(lambda x, *w: _bf16_dot(x, dequant(*w))), ("x",) + args, "xla", io + w_bytes)}
  impls.update(kernel_impls(family, n, k, m, io + w_bytes, interpret, sweep))
  return Case(family, n, k, m, inputs, impls, 2.0 * m * n * k, 2e-2)


def kernel_impls(family: str, n: int, k: int, m: int, nbytes: int, interpret: bool | None,
                 sweep: bool = True) -> dict[str, Impl]:
  """The kernels under test for one case: one Impl per TuningConfig of the kernel's sweep (the default first,
  labelled mgpu; the others mgpu#i, their configs in `note`). A smoke run times the default only."""
  impls = {}
  if family.startswith("w8a8"):
    k_group = GROUP if family == "w8a8_g128" else None
    configs = (int8_matmul_tuning.sweep_configs(m, n, k, k_group) if sweep and interpret is not True else []) or [None]
    for i, config in enumerate(configs):
      label = "mgpu" if i == 0 else f"mgpu#{i}"
      matmul = functools.partial(im.int8_matmul, k_group=k_group, out_dtype=BF16, config=config,
                                 interpret=bool(interpret))
      if family == "w8a8_quant":
        impls[label + "+act_quant"] = Impl(jax.jit(_kernel_quantized_first(matmul, interpret)), ("x", "w_nk", "ws"),
                                           "kernel", nbytes + m * k, str(config))
      else:
        impls[label] = Impl(jax.jit(matmul), ("x_i8", "w_nk", "xs", "ws"), "kernel", nbytes, str(config))
  elif family in ("w4_g128", "bcq3_g128", "bcq2_g128"):
    kind, q = ("uniform", 1) if family == "w4_g128" else ("bcq", int(family[3]))
    configs = (gemv.sweep_configs(m, n, k, kind=kind, bits=4, q=q, k_group=GROUP)  # the GEMV is for M <= 64
               if sweep and interpret is not True and m <= 64 else []) or [None]
    for i, config in enumerate(configs):
      label = "mgpu" if i == 0 else f"mgpu#{i}"
      if kind == "uniform":
        fn = functools.partial(gemv.uniform_matmul, bits=4, k_group=GROUP, config=config, interpret=bool(interpret))
        impls[label] = Impl(jax.jit(lambda x, p, s, fn=fn: fn(x, p, s)), ("x", "packed", "scale"), "kernel", nbytes,
                            str(config))
      else:
        fn = functools.partial(gemv.bcq_matmul, k_group=GROUP, config=config, interpret=bool(interpret))
        impls[label] = Impl(jax.jit(fn), ("x", "planes", "alpha", "offset"), "kernel", nbytes, str(config))
  return impls


def _kernel_quantized_first(matmul, interpret):
  """Token-wise int8 quantization by the act_quant kernel, then the W8A8 kernel (the models' W8A8 path)."""
  def run(x, w, ws):
    x_i8, xs = act_quant.quantize_rows(x, interpret=interpret)
    return matmul(x_i8, w, xs, ws)
  return run


def cases(smoke: bool, interpret: bool | None = None, sweep: bool = True) -> list[Case]:
  """The cases to run: kernels interpreted on CPU in a smoke run, compiled otherwise (interpret=False forces a
  compiled launch even on CPU: the lowering tests); sweep=False times each kernel's default config only."""
  interpret = True if smoke else interpret
  return [_case(f, n, k, m, interpret, sweep) for f, n, k, m in (SMOKE if smoke else FULL)]


def make_inputs(case: Case, key) -> dict[str, jax.Array]:
  out = {}
  for i, (name, spec) in enumerate(sorted(case.inputs.items())):
    kk = jax.random.fold_in(key, i)
    if spec.kind == "normal":
      out[name] = jax.random.normal(kk, spec.shape, jnp.float32).astype(spec.dtype)
    elif spec.kind == "small":
      out[name] = (jax.random.normal(kk, spec.shape, jnp.float32) * 0.02).astype(spec.dtype)
    elif spec.kind == "scale":
      out[name] = jax.random.uniform(kk, spec.shape, jnp.float32, 0.005, 0.02).astype(spec.dtype)
    elif spec.kind == "int8":
      out[name] = jax.random.randint(kk, spec.shape, -127, 128, jnp.int32).astype(jnp.int8)
    else:
      out[name] = jax.random.bits(kk, spec.shape, jnp.uint8)
  return out


def lowering_targets(case: Case) -> list[tuple[str, Callable, tuple]]:
  """(label, fn, ShapeDtypeStructs) of every kernel impl of a case, for lowering to CUDA without a GPU."""
  structs = {name: jax.ShapeDtypeStruct(s.shape, s.dtype) for name, s in case.inputs.items()}
  return [(label, impl.fn, tuple(structs[a] for a in impl.args))
          for label, impl in case.impls.items() if impl.kind == "kernel"]
