"""Benchmark jaxquant's Pallas kernels against XLA on one GPU (H100 roofline), or smoke-run them on CPU.

  .venv/bin/python experiments/bench_kernels.py                 # full sweep on a GPU
  .venv/bin/python experiments/bench_kernels.py --check         # GPU correctness against references first
  .venv/bin/python experiments/bench_kernels.py --smoke         # tiny shapes in interpret mode (any machine)

Sweep: M in {1, 16, 64, 256, 4096} over weights of (N, K) = (4096, 4096), (8192, 8192), (28672, 7168)
(N outputs x K inputs; the weight is stored (K, N), Flax layout; 28672 x 7168 is an MLP up-projection).

Variants (each Pallas implementation and its XLA baselines get the same inputs):
  w8a8        int8_matmul: int8 activations (given) x int8 per-channel weights, token scales, bf16 out
              vs XLA bf16 dot, XLA int8 dot_general (int32) + scale epilogue
  w8a8_quant  act_quant.quantize_rows(bf16 x) + int8_matmul, vs XLA quantize_tokens + int8 dot + epilogue
  w4g128      lut_gemm on uniform 4-bit group-128 weights as BCQ (4 planes + offset, f16 alphas),
              strategies lut (M <= 64), decode and auto; vs XLA bf16 dot and dequantize-then-XLA-dot of the
              same packed planes
  bcq3g128    lut_gemm on 3-plane BCQ with offset, group 128 (same comparisons)
  act_quant   quantize_rows and rmsnorm_quantize on (M, K) bf16 vs the same math in XLA

Timing: after `--warmup` calls, `--reps` samples of `--inner` back-to-back calls each (asynchronous dispatch,
one block_until_ready per sample); the median per-call time is reported. Weight buffers rotate over enough
copies (>= 2x the 50 MB L2) that every call reads its weights from HBM. Reported: microseconds, TFLOP/s (2MNK
per matmul), GB/s of compulsory traffic (inputs once, output once), fraction of the H100 SXM roofline
(3.35 TB/s, 989 dense bf16 TFLOP/s, 1979 dense int8 TOPS: ideal time = max(bytes / BW, flops / peak),
fraction = ideal / measured) and speedups of each Pallas row over each baseline.
Writes experiments/results/bench_kernels[_smoke].json and .md and prints the exact command.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Any, Callable

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels import act_quant, int8_matmul as im, lut_gemm as lg  # noqa: E402

SHAPES = {"4096x4096": (4096, 4096), "8192x8192": (8192, 8192), "28672x7168": (28672, 7168)}  # (N, K)
MS = (1, 16, 64, 256, 4096)
SMOKE_SHAPES = {"96x320": (96, 320)}
SMOKE_MS = (1, 16)
VARIANTS = ("w8a8", "w8a8_quant", "w4g128", "bcq3g128", "act_quant")
GROUP = 128
LUT_MAX_BENCH_M = 64  # the lut strategy is timed up to this batch (its table grows as M * K * 128 bytes)

HBM_BW = 3.35e12
PEAK_BF16 = 989e12
PEAK_INT8 = 1979e12
L2_BYTES = 50 * 2**20


@dataclasses.dataclass(frozen=True)
class Arg:
  name: str
  shape: tuple[int, ...]
  dtype: Any
  kind: str  # normal | int8 | bits | scale | small
  weight: bool = False  # rotated over copies


@dataclasses.dataclass
class Impl:
  label: str
  fn: Callable[..., jax.Array]
  args: tuple[str, ...]
  pallas: bool
  peak: float  # compute peak used for the roofline
  baselines: tuple[str, ...] | None = None  # the XLA rows a Pallas row is compared with (None: all)


@dataclasses.dataclass
class Case:
  variant: str
  shape: str
  m: int
  n: int
  k: int
  args: list[Arg]
  impls: list[Impl]
  flops: float
  bytes_by_impl: dict[str, float]
  check: Callable[[dict[str, jax.Array]], dict[str, float]] | None = None


# ---- shared jnp pieces (the XLA baselines) -----------------------------------------------------------------

def _xla_quantize_rows(x):
  x = x.astype(jnp.float32)
  absmax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
  scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
  return jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8), scale


def _xla_int8_dot(x_i8, w_i8, xs, ws):
  acc = jax.lax.dot_general(x_i8, w_i8, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
  return (acc.astype(jnp.float32) * xs * ws).astype(jnp.bfloat16)


def _xla_dequant_dot(x, planes, alpha, offset, k_group):
  """Dequantize the packed BCQ planes to a bf16 (K, N) matrix in XLA, then a bf16 dot."""
  k = x.shape[-1]
  q, c, n = planes.shape
  bits = (planes[:, :, None, :] >> jnp.arange(8, dtype=jnp.uint8)[None, None, :, None]) & 1
  signs = bits.reshape(q, c * 8, n)[:, :k].astype(jnp.float32) * 2 - 1
  rep = lambda a: jnp.repeat(a.astype(jnp.float32), k_group, axis=-2, total_repeat_length=a.shape[-2] * k_group)[..., :k, :]
  w = jnp.sum(rep(alpha) * signs, axis=0) + rep(offset)
  return jnp.dot(x, w.astype(jnp.bfloat16), preferred_element_type=jnp.float32).astype(jnp.bfloat16)


def _xla_rmsnorm_quant(x, w):
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + 1e-6) * w.astype(jnp.float32)
  return _xla_quantize_rows(y)


# ---- cases ---------------------------------------------------------------------------------------------------

def build_cases(variants, shapes, ms, interpret: bool | None) -> list[Case]:
  cases = []
  for shape_name, (n, k) in shapes.items():
    for m in ms:
      for v in variants:
        cases.extend(_cases_for(v, shape_name, m, n, k, interpret))
  return cases


def _cases_for(variant, shape_name, m, n, k, interpret) -> list[Case]:
  bf16 = jnp.bfloat16
  flops = 2.0 * m * n * k
  if variant in ("w8a8", "w8a8_quant"):
    args = [Arg("x", (m, k), bf16, "normal"), Arg("x_i8", (m, k), jnp.int8, "int8"),
            Arg("x_scale", (m, 1), jnp.float32, "scale"), Arg("w_i8", (k, n), jnp.int8, "int8", True),
            Arg("w_scale", (1, n), jnp.float32, "scale", True), Arg("w_bf16", (k, n), bf16, "small", True)]
    kernel = jax.jit(functools.partial(im.int8_matmul, out_dtype=bf16, interpret=interpret))
    xla_bf16 = Impl("xla_bf16", jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(bf16)),
                    ("x", "w_bf16"), False, PEAK_BF16)
    if variant == "w8a8":
      impls = [Impl("pallas", kernel, ("x_i8", "w_i8", "x_scale", "w_scale"), True, PEAK_INT8),
               Impl("xla_int8", jax.jit(_xla_int8_dot), ("x_i8", "w_i8", "x_scale", "w_scale"), False, PEAK_INT8),
               xla_bf16]
      a_bytes = m * k + 4 * m
    else:
      def fused(x, w, ws):
        xq, xs = act_quant.quantize_rows(x, interpret=interpret)
        return im.int8_matmul(xq, w, xs, ws, out_dtype=bf16, interpret=interpret)
      def xla(x, w, ws):
        xq, xs = _xla_quantize_rows(x)
        return _xla_int8_dot(xq, w, xs, ws)
      impls = [Impl("pallas", jax.jit(fused), ("x", "w_i8", "w_scale"), True, PEAK_INT8),
               Impl("xla_int8", jax.jit(xla), ("x", "w_i8", "w_scale"), False, PEAK_INT8), xla_bf16]
      a_bytes = 2 * m * k
    w8 = a_bytes + k * n + 4 * n + 2 * m * n
    bytes_by = {"pallas": w8, "xla_int8": w8, "xla_bf16": 2 * m * k + 2 * k * n + 2 * m * n}

    def check(a, variant=variant):
      if variant == "w8a8":
        ref = _xla_int8_dot(a["x_i8"], a["w_i8"], a["x_scale"], a["w_scale"])
        got = impls[0].fn(a["x_i8"], a["w_i8"], a["x_scale"], a["w_scale"])
      else:
        ref = impls[1].fn(a["x"], a["w_i8"], a["w_scale"])
        got = impls[0].fn(a["x"], a["w_i8"], a["w_scale"])
      return {"pallas": _rel_err(got, ref)}
    return [Case(variant, shape_name, m, n, k, args, impls, flops, bytes_by, check)]

  if variant in ("w4g128", "bcq3g128"):
    q = 4 if variant == "w4g128" else 3
    groups = -(-k // GROUP)
    c = -(-k // 8)
    args = [Arg("x", (m, k), bf16, "normal"), Arg("planes", (q, c, n), jnp.uint8, "bits", True),
            Arg("alpha", (q, groups, n), jnp.float16, "scale", True),
            Arg("offset", (groups, n), jnp.float16, "small", True), Arg("w_bf16", (k, n), bf16, "small", True)]
    packed = args[1]
    impls = []
    methods = (["lut"] if m <= LUT_MAX_BENCH_M else []) + ["decode", "auto"]
    for method in methods:
      fn = jax.jit(functools.partial(lg.lut_gemm, k_group=GROUP, method=method, out_dtype=bf16, interpret=interpret))
      impls.append(Impl(f"pallas_{method}", fn, ("x", "planes", "alpha", "offset"), True, PEAK_BF16))
    impls.append(Impl("xla_bf16", jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(bf16)),
                      ("x", "w_bf16"), False, PEAK_BF16))
    impls.append(Impl("dequant_xla", jax.jit(functools.partial(_xla_dequant_dot, k_group=GROUP)),
                      ("x", "planes", "alpha", "offset"), False, PEAK_BF16))
    w_bytes = q * c * n + 2 * (q + 1) * groups * n
    io = 2 * m * k + 2 * m * n
    bytes_by = {i.label: io + w_bytes for i in impls}
    bytes_by["xla_bf16"] = io + 2 * k * n

    def check(a):
      ref = impls[-1].fn(a["x"], a["planes"], a["alpha"], a["offset"])
      return {i.label: _rel_err(i.fn(a["x"], a["planes"], a["alpha"], a["offset"]), ref)
              for i in impls if i.pallas}
    del packed
    return [Case(variant, shape_name, m, n, k, args, impls, flops, bytes_by, check)]

  if variant == "act_quant":
    args = [Arg("x", (m, k), bf16, "normal"), Arg("g", (k,), bf16, "scale")]
    impls = [Impl("pallas_rows", jax.jit(functools.partial(act_quant.quantize_rows, interpret=interpret)), ("x",), True, PEAK_BF16, ("xla_rows",)),
             Impl("xla_rows", jax.jit(_xla_quantize_rows), ("x",), False, PEAK_BF16),
             Impl("pallas_rmsnorm", jax.jit(functools.partial(act_quant.rmsnorm_quantize, interpret=interpret)), ("x", "g"), True, PEAK_BF16, ("xla_rmsnorm",)),
             Impl("xla_rmsnorm", jax.jit(_xla_rmsnorm_quant), ("x", "g"), False, PEAK_BF16)]
    b = 2 * m * k + m * k + 4 * m
    bytes_by = {i.label: b + (2 * k if "rmsnorm" in i.label else 0) for i in impls}

    def check(a):
      out = {}
      for p, r in ((impls[0], impls[1]), (impls[2], impls[3])):
        qa, sa = p.fn(*[a[n_] for n_ in p.args])
        qb, sb = r.fn(*[a[n_] for n_ in r.args])
        out[p.label] = float(jnp.max(jnp.abs(qa.astype(jnp.int32) - qb.astype(jnp.int32))))  # codes off by <= 1
      return out
    return [Case(variant, shape_name, m, n, k, args, impls, 0.0, bytes_by, check)]
  raise ValueError(f"unknown variant {variant!r}")


def _rel_err(got, ref):
  got, ref = jnp.asarray(got, jnp.float32), jnp.asarray(ref, jnp.float32)
  return float(jnp.max(jnp.abs(got - ref)) / jnp.maximum(jnp.max(jnp.abs(ref)), 1e-30))


def lowering_targets(case: Case):
  """(label, jitted fn, ShapeDtypeStructs) of every implementation in a case, for lowering without a GPU."""
  st = structs(case)
  return [(i.label, i.fn, tuple(st[n] for n in i.args)) for i in case.impls]


def structs(case: Case) -> dict[str, jax.ShapeDtypeStruct]:
  return {a.name: jax.ShapeDtypeStruct(a.shape, a.dtype) for a in case.args}


def make_args(case: Case, key, copies: int = 1) -> list[dict[str, jax.Array]]:
  """`copies` argument sets: activations shared, weights distinct per copy."""
  def one(a: Arg, k):
    if a.kind == "normal":
      return jax.random.normal(k, a.shape, jnp.float32).astype(a.dtype)
    if a.kind == "small":
      return (jax.random.normal(k, a.shape, jnp.float32) * 0.02).astype(a.dtype)
    if a.kind == "scale":
      return jax.random.uniform(k, a.shape, jnp.float32, 0.005, 0.02).astype(a.dtype)
    if a.kind == "int8":
      return jax.random.randint(k, a.shape, -127, 128, jnp.int32).astype(jnp.int8)
    if a.kind == "bits":
      return jax.random.bits(k, a.shape, jnp.uint8)
    raise ValueError(a.kind)
  keys = jax.random.split(key, len(case.args) * (copies + 1))
  shared = {a.name: one(a, keys[i]) for i, a in enumerate(case.args) if not a.weight}
  sets = []
  for c in range(copies):
    d = dict(shared)
    for i, a in enumerate(case.args):
      if a.weight:
        d[a.name] = one(a, keys[len(case.args) * (c + 1) + i])
    sets.append(d)
  return sets


def weight_copies(case: Case) -> int:
  wbytes = sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in case.args if a.weight)
  if wbytes == 0:
    return 1
  return int(min(16, max(1, math.ceil(2 * L2_BYTES / wbytes))))


def time_impl(impl: Impl, arg_sets, warmup: int, reps: int, inner: int) -> float:
  """Median seconds per call."""
  calls = [tuple(s[n] for n in impl.args) for s in arg_sets]
  for i in range(warmup):
    jax.block_until_ready(impl.fn(*calls[i % len(calls)]))
  samples = []
  j = 0
  for _ in range(reps):
    t0 = time.perf_counter()
    out = None
    for _ in range(inner):
      out = impl.fn(*calls[j % len(calls)])
      j += 1
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - t0) / inner)
  return statistics.median(samples)


def run(args) -> dict:
  smoke = args.smoke
  interpret = True if smoke else None
  shapes = SMOKE_SHAPES if smoke else {s: SHAPES[s] for s in args.shapes}
  ms = tuple(args.ms) if args.ms else (SMOKE_MS if smoke else MS)
  cases = build_cases(args.variants, shapes, ms, interpret)
  device = jax.devices()[0]
  rows = []
  key = jax.random.key(0)
  for ci, case in enumerate(cases):
    copies = 1 if smoke else weight_copies(case)
    arg_sets = make_args(case, jax.random.fold_in(key, ci), copies)
    errors = {}
    if args.check and case.check is not None:
      errors = case.check(arg_sets[0])
      limit = 1.0 if case.variant == "act_quant" else 3e-2
      bad = {k_: v for k_, v in errors.items() if not v <= limit}
      if bad:
        raise SystemExit(f"--check failed for {case.variant} {case.shape} M={case.m}: {bad} (limit {limit})")
    times = {}
    for impl in case.impls:
      times[impl.label] = time_impl(impl, arg_sets, args.warmup, args.reps, args.inner)
    baselines = [i.label for i in case.impls if not i.pallas]
    for impl in case.impls:
      t = times[impl.label]
      nbytes = case.bytes_by_impl[impl.label]
      ideal = max(nbytes / HBM_BW, case.flops / impl.peak)
      row = {
          "variant": case.variant, "shape": case.shape, "M": case.m, "N": case.n, "K": case.k,
          "impl": impl.label, "pallas": impl.pallas, "us": t * 1e6,
          "tflops": case.flops / t / 1e12 if case.flops else None, "gbps": nbytes / t / 1e9,
          "roofline_frac": ideal / t, "weight_copies": copies,
      }
      if impl.pallas:
        row["speedup"] = {b: times[b] / t for b in (impl.baselines or baselines)}
        if impl.label in errors:
          row["check_err"] = errors[impl.label]
      rows.append(row)
    print(f"[{ci + 1}/{len(cases)}] {case.variant} {case.shape} M={case.m}: " +
          ", ".join(f"{k_} {v * 1e6:.1f}us" for k_, v in times.items()), flush=True)
  return {
      "command": " ".join([sys.executable] + sys.argv),
      "device": f"{device.platform}: {device.device_kind}",
      "jax": jax.__version__, "python": platform.python_version(), "smoke": smoke,
      "interpret": bool(interpret) or jax.default_backend() == "cpu",
      "roofline": {"hbm_bytes_per_s": HBM_BW, "bf16_flops": PEAK_BF16, "int8_ops": PEAK_INT8},
      "timing": {"warmup": args.warmup, "reps": args.reps, "inner": args.inner, "statistic": "median"},
      "results": rows,
  }


def markdown(report: dict) -> str:
  lines = [f"# Pallas kernel benchmark ({report['device']}, jax {report['jax']})", "",
           f"Command: `{report['command']}`", ""]
  if report["interpret"]:
    lines += ["**Interpret mode (CPU smoke run): timings say nothing about GPU performance.**", ""]
  lines += ["| variant | N x K | M | impl | us | TFLOP/s | GB/s | roofline | speedups |",
            "|---|---|---|---|---:|---:|---:|---:|---|"]
  for r in report["results"]:
    sp = ", ".join(f"{b} {v:.2f}x" for b, v in r.get("speedup", {}).items())
    tf = f"{r['tflops']:.2f}" if r["tflops"] is not None else "-"
    lines.append(f"| {r['variant']} | {r['shape']} | {r['M']} | {r['impl']} | {r['us']:.1f} | {tf} | "
                 f"{r['gbps']:.0f} | {r['roofline_frac']:.1%} | {sp} |")
  return "\n".join(lines) + "\n"


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--smoke", action="store_true", help="tiny shapes in interpret mode (runs on CPU)")
  p.add_argument("--check", action="store_true", help="compare every Pallas output with its reference first")
  p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
  p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES), help="(N, K) weight shapes")
  p.add_argument("--ms", nargs="+", type=int, default=None, help=f"batch sizes M (default {MS}; smoke {SMOKE_MS})")
  p.add_argument("--warmup", type=int, default=None)
  p.add_argument("--reps", type=int, default=None)
  p.add_argument("--inner", type=int, default=None)
  p.add_argument("--out", type=pathlib.Path, default=REPO / "experiments" / "results")
  args = p.parse_args(argv)
  if args.warmup is None:
    args.warmup = 1 if args.smoke else 5
  if args.reps is None:
    args.reps = 2 if args.smoke else 30
  if args.inner is None:
    args.inner = 1 if args.smoke else 10
  return args


def main(argv=None) -> int:
  args = parse(argv)
  if not args.smoke and jax.default_backend() != "gpu":
    print("no GPU: the full sweep needs one (Pallas runs in interpret mode on CPU); use --smoke to check that "
          "the script executes", file=sys.stderr)
    return 2
  report = run(args)
  args.out.mkdir(parents=True, exist_ok=True)
  stem = "bench_kernels_smoke" if args.smoke else "bench_kernels"
  (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1))
  (args.out / f"{stem}.md").write_text(markdown(report))
  print(markdown(report))
  print(f"wrote {args.out / (stem + '.json')} and {args.out / (stem + '.md')}")
  print(f"command: {report['command']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
