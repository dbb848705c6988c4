"""GPU probe of the W8A8 Mosaic GPU kernel's small-M schedule (M <= 256), one configuration at a time.

The H200 run of 2026-12-04 faulted (CUDA_ERROR_MISALIGNED_ADDRESS, asynchronous) while timing the five sweep
configs of M=16, N=K=8192. Diagnosis from the lowering (pallas_kernels/mgpu_audit.py, no GPU): each compute
warpgroup TMA-loads its tile_n scale (and bias) values into its own slot of a (2, tile_n) SMEM buffer, and
cp.async.bulk.tensor needs a 128-byte aligned SMEM address; at tile_n=16 (float32) warpgroup 1's slot starts at
64 mod 128, at tile_n=112 (the M=1, N=28672 default) at 448. The slots are now padded to 128 bytes. This script
checks that on the GPU: each probe compiles, runs, is compared with XLA's float32 reference, and is timed with
CUPTI beside XLA's int8 dot on the same arrays. The two `old-layout` probes at the end rebuild the unpadded
slots: `old-tn16` should fault (confirming the cause), `old-default` (tile_n=32: 128-byte slots) should pass.

  python experiments/probe_w8a8_small_m.py [--out DIR] [--iterations 10] [--only LABEL ...]

Probes run in worker processes in order; a CUDA fault ends its worker (the fault is named by the "START" line
printed before each probe), is recorded against that probe, and a fresh worker takes the next one. One JSON line
per probe goes to stdout and to <out>/probe_w8a8_small_m.jsonl. About 2 minutes on an H200.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(REPO),) if p not in sys.path]

from pallas_kernels import int8_matmul_mgpu as mk  # noqa: E402

C = mk.TuningConfig
SMALL = dict(tile_m=64, wg_dimension="n", epi_tile_m=64, epi_tile_n=None)
M16 = (16, 8192, 8192)
M1 = (1, 28672, 7168)


@dataclasses.dataclass(frozen=True)
class Probe:
  label: str
  mnk: tuple[int, int, int]
  config: mk.TuningConfig
  scale_dtype: str = "float32"
  bias: str | None = None  # dtype of a bias, or none
  old_layout: bool = False  # the unpadded (2, tile_n) vector slots that ran on 2026-12-04
  expect: str = "ok"  # "ok" or "fault"


PROBES = [
    # M=16, N=K=8192: the five sweep configs of the faulting run (default first), then the padded bias slot
    Probe("m16-default", M16, C(tile_n=32, tile_k=128, max_concurrent_steps=8, **SMALL)),
    Probe("m16-tk256", M16, C(tile_n=32, tile_k=256, max_concurrent_steps=6, **SMALL)),
    Probe("m16-steps6", M16, C(tile_n=32, tile_k=128, max_concurrent_steps=6, **SMALL)),
    Probe("m16-tn16", M16, C(tile_n=16, tile_k=128, max_concurrent_steps=6, **SMALL)),  # faulted before the fix
    Probe("m16-delay1", M16, C(tile_n=32, tile_k=128, max_concurrent_steps=6, delay_release=1, **SMALL)),
    Probe("m16-default-bf16scales-bf16bias", M16, C(tile_n=32, tile_k=128, max_concurrent_steps=8, **SMALL),
          "bfloat16", "bfloat16"),  # the bias slot was 64 bytes before the fix
    # M=1, N=28672, K=7168: never ran (dead context); tile_n=112 slots were 448 bytes
    Probe("m1-default", M1, C(tile_n=112, tile_k=128, max_concurrent_steps=5, **SMALL)),
    Probe("m1-tn128", M1, C(tile_n=128, tile_k=128, max_concurrent_steps=4, **SMALL)),
    Probe("m1-default-f32bias", M1, C(tile_n=112, tile_k=128, max_concurrent_steps=5, **SMALL), bias="float32"),
    # controls with the old layout: one that must pass, one that must fault (each ends its worker if it does)
    Probe("old-layout-m16-default", M16, C(tile_n=32, tile_k=128, max_concurrent_steps=8, **SMALL),
          old_layout=True),
    Probe("old-layout-m16-tn16", M16, C(tile_n=16, tile_k=128, max_concurrent_steps=6, **SMALL),
          old_layout=True, expect="fault"),
]


def run_probe(p: Probe, iterations: int, smoke: bool = False) -> dict:
  import jax
  import jax.numpy as jnp
  from jax.experimental.mosaic.gpu import profiler

  m, n, k = p.mnk
  if smoke:  # CPU check of this script: interpret mode (no alignment modelled), 2 tiles + a partial one
    n, k = 2 * p.config.cta_n + 8, 256
  if p.old_layout:
    mk._vec_slot = lambda size, dtype: size  # noqa: SLF001 - rebuild the layout that faulted
  sd = jnp.dtype(p.scale_dtype)
  key = jax.random.split(jax.random.key(m * 7 + n), 5)
  x = jax.random.randint(key[0], (m, k), -128, 128, jnp.int8)
  w = jax.random.randint(key[1], (n, k), -128, 128, jnp.int8)
  xs = jax.random.uniform(key[2], (m, 1), jnp.float32, 0.5, 2.0).astype(sd) / 128
  ws = jax.random.uniform(key[3], (1, n), jnp.float32, 0.5, 2.0).astype(sd) / 128
  bias = None if p.bias is None else (jax.random.normal(key[4], (n,)) * 10).astype(p.bias)
  kernel = jax.jit(lambda x, w, xs, ws, b: mk.int8_matmul(x, w, xs, ws, bias=b, out_dtype=jnp.bfloat16,
                                                          config=p.config, interpret=smoke))
  ref_fn = jax.jit(lambda x, w, xs, ws, b: mk.reference(x, w, xs, ws, bias=b, out_dtype=jnp.float32))
  xla_int8 = jax.jit(lambda x, w, xs, ws, b: mk.reference(x, w, xs, ws, bias=b, out_dtype=jnp.bfloat16))
  args = (x, w, xs, ws, bias)
  y = jax.block_until_ready(kernel(*args))
  ref = jax.block_until_ready(ref_fn(*args))
  err = float(jnp.linalg.norm(y.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))

  def cupti(f):
    if smoke:
      return None
    _, runs = profiler.measure(f, aggregate=False, iterations=iterations)(*args)
    return round(statistics.median(sum(t for _, t in run) * 1e3 for run in runs), 2)

  return {"rel_err": err, "ok": err <= 1e-2, "us": cupti(kernel), "xla_int8_us": cupti(xla_int8)}


def worker(args) -> int:
  probes = _selected(args.only)
  for i in range(args.start, len(probes)):
    p = probes[i]
    print(f"START {p.label} {p.mnk} {p.config} scales={p.scale_dtype} bias={p.bias} old_layout={p.old_layout}",
          file=sys.stderr, flush=True)
    row = {"probe": p.label, "m_n_k": p.mnk, "config": str(p.config), "expect": p.expect}
    try:
      row |= run_probe(p, args.iterations, args.smoke)
    except Exception as e:  # noqa: BLE001 - record it; a CUDA error means this worker's context is gone
      row |= {"error": f"{type(e).__name__}: {str(e)[:400]}", "traceback": traceback.format_exc()[-1500:]}
    print("RESULT " + json.dumps(row), flush=True)
    if "CUDA" in row.get("error", "") or p.old_layout:
      return 3  # a fresh worker (and CUDA context) for the next probe; old layouts never share one
  return 0


def _selected(only):
  return [p for p in PROBES if not only or any(o in p.label for o in only)]


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", type=pathlib.Path, default=REPO / "experiments" / "results")
  ap.add_argument("--iterations", type=int, default=10)
  ap.add_argument("--only", nargs="+", default=None, help="probes whose label contains one of these")
  ap.add_argument("--timeout-s", type=float, default=240.0, help="per worker")
  ap.add_argument("--smoke", action="store_true", help="CPU: small N, K in interpret mode (checks this script)")
  ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.worker:
    return worker(args)
  probes = _selected(args.only)
  args.out.mkdir(parents=True, exist_ok=True)
  log = args.out / "probe_w8a8_small_m.jsonl"
  rows, start = {}, 0
  while start < len(probes):
    cmd = [sys.executable, __file__, "--worker", "--start", str(start), "--iterations", str(args.iterations)]
    cmd += ["--only", *args.only] if args.only else []
    cmd += ["--smoke"] if args.smoke else []
    t0 = time.time()
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s)
      out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
      out, err, rc = e.stdout or "", e.stderr or "", "timeout"
      out, err = (out.decode() if isinstance(out, bytes) else out), (err.decode() if isinstance(err, bytes) else err)
    done = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
    started = [line for line in err.splitlines() if line.startswith("START ")]
    for row in done:
      rows[row["probe"]] = row
    if len(started) > len(done):  # the worker died inside a probe: that probe is the one that faulted
      p = probes[start + len(done)]
      tail = "\n".join(err.splitlines()[-8:])
      rows[p.label] = {"probe": p.label, "m_n_k": p.mnk, "config": str(p.config), "expect": p.expect,
                       "error": f"worker ended (rc={rc}) inside this probe", "stderr_tail": tail}
      done.append(rows[p.label])
    if not done:
      print(f"worker made no progress (rc={rc}):\n{err[-3000:]}", file=sys.stderr)
      return 2
    start += len(done)
    print(f"  {len(done)} probe(s) in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
  bad = []
  with open(log, "a") as f:
    for p in probes:
      row = rows[p.label]
      faulted = "error" in row
      expect_fault = p.expect == "fault" and not args.smoke  # interpret mode cannot fault on alignment
      if faulted != expect_fault or (not faulted and not row.get("ok")):
        bad.append(p.label)
      row["as_expected"] = p.label not in bad
      f.write(json.dumps(row) + "\n")
      print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
  print(f"not as expected: {bad or 'none'}", flush=True)
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
