"""The GPU run as one prepared script: every kernel checked against its reference and timed with CUPTI beside its
baselines (experiments/gpu_cases.py), then the `gpu`-marked tests, in one call that ends within --budget-s.

  python experiments/gpu_check.py --commit $(git rev-parse --short HEAD)   # on the GPU machine
  python experiments/gpu_check.py --smoke                                  # CPU: tiny shapes, interpret mode
  python experiments/gpu_check.py --only w4_g128 --no-tests                # cases whose name contains a pattern

Kernel time is CUPTI's (jax.experimental.mosaic.gpu.profiler.measure, every kernel a call launches, summed; the
median over --iterations calls), never wall clock: a dispatch costs ~31 us on the H200. Torch peers are timed with
CUDA events. On CPU (--smoke) the same code runs in interpret mode and times by wall clock (marked so).
Each case runs in a worker process: a kernel that faults the GPU is recorded as that case's error and the next
case starts in a new worker. Results stream to <out>/gpu_check.jsonl (one JSON line per case, written as soon as
the case ends), and <out>/gpu_check.md renders them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
import traceback
import zlib

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU in this process
REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(REPO), str(REPO / "experiments")) if p not in sys.path]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import gpu_cases  # noqa: E402

BASELINE = "xla_bf16"


def cupti_us(fn, args, iterations: int) -> tuple[float, list]:
  """Median over `iterations` calls of the summed kernel time (us), and the kernels of the median call."""
  from jax.experimental.mosaic.gpu import profiler
  _, per_call = profiler.measure(fn, aggregate=False, iterations=iterations)(*args)
  if per_call is None:
    raise RuntimeError("CUPTI saw no kernel launch")
  totals = [sum(t for _, t in call) * 1e3 for call in per_call]
  median = statistics.median(totals)
  nearest = min(range(len(totals)), key=lambda i: abs(totals[i] - median))
  return median, [[name, round(t * 1e3, 2)] for name, t in per_call[nearest]]


def wall_us(fn, args, iterations: int) -> tuple[float, list]:
  jax.block_until_ready(fn(*args))
  samples = []
  for _ in range(iterations):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    samples.append((time.perf_counter() - start) * 1e6)
  return statistics.median(samples), []


def rel_err(got, ref) -> float:
  """||got - ref|| / ||ref|| (Frobenius) over every output; NaN anywhere gives inf."""
  num = den = 0.0
  for g, r in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
    g, r = np.asarray(g, np.float64), np.asarray(r, np.float64)
    if g.shape != r.shape or not np.all(np.isfinite(g)):
      return float("inf")
    num += float(np.sum((g - r) ** 2))
    den += float(np.sum(r ** 2))
  return float(np.sqrt(num / max(den, 1e-300)))


def run_case(case, iterations: int, on_gpu: bool) -> dict:
  inputs = gpu_cases.make_inputs(case, jax.random.key(zlib.crc32(case.name.encode())))
  row = {"case": case.name, "family": case.family, "m": case.m, "n": case.n, "k": case.k, "impls": {}}
  ref_impl = case.impls["ref"]
  ref = jax.block_until_ready(ref_impl.fn(*[inputs[a] for a in ref_impl.args]))
  timer = cupti_us if on_gpu else wall_us
  for label, impl in case.impls.items():
    if impl.kind == "ref":
      continue
    entry = row["impls"].setdefault(label, {"kind": impl.kind} | ({"note": impl.note} if impl.note else {}))
    print(f"  {label} {impl.note}", file=sys.stderr, flush=True)  # the last line names a faulting kernel
    try:
      args = [inputs[a] for a in impl.args]
      out = jax.block_until_ready(impl.fn(*args))
      if impl.checked:
        entry["rel_err"] = rel_err(out, ref) if case.family != "rmsnorm_quant" else _code_diff(out, ref)
        entry["ok"] = entry["rel_err"] <= case.tolerance
      entry["us"], entry["kernels"] = timer(impl.fn, args, iterations)
    except Exception as err:  # noqa: BLE001 - one failing implementation must not lose the case's others
      entry["error"] = f"{type(err).__name__}: {str(err)[:500]}"
      entry["traceback"] = traceback.format_exc()[-2000:]
      if "CUDA" in str(err):  # the context is gone: nothing after this can run in this process
        row["fatal"] = label
        return row
  if on_gpu:
    try:
      row["impls"].update(torch_peers(case, inputs))
    except Exception as err:  # noqa: BLE001 - e.g. an earlier kernel's asynchronous fault surfacing here
      row["fatal"] = f"torch peers: {type(err).__name__}: {str(err)[:300]}"
      return row
  _ratios(case, row)
  return row


def _code_diff(out, ref) -> float:
  """Largest difference of int8 codes (off by one from rounding order is fine)."""
  return float(np.max(np.abs(np.asarray(out[0], np.int32) - np.asarray(ref[0], np.int32))))


def _ratios(case, row) -> None:
  base = row["impls"].get(BASELINE if BASELINE in row["impls"] else "xla", {}).get("us")
  for label, entry in row["impls"].items():
    us = entry.get("us")
    if not us:
      continue
    if base:
      entry["vs_baseline"] = base / us
    nbytes = case.impls[label].bytes if label in case.impls else entry.get("bytes", 0)
    if nbytes:
      entry["gbps"] = nbytes / us / 1e3
    if case.flops:
      entry["tflops"] = case.flops / us / 1e6


def torch_peers(case, inputs) -> dict:
  """cuBLAS bf16, torch._int_mm and tinygemm int4 on the same arrays (dlpack, no copy), timed with CUDA events."""
  try:
    import torch
  except ImportError:
    return {}
  t = {name: torch.from_dlpack(value) for name, value in inputs.items()}
  peers = {}
  if "w_kn" in t:
    peers["torch_bf16"] = lambda: torch.matmul(t["x"], t["w_kn"])
  if case.family == "w8a8" and case.m > 16:
    peers["torch_int_mm"] = lambda: torch._int_mm(t["x_i8"], t["w_nk"].t())
  if case.family == "w4_g128" and case.m <= 16:
    try:
      packed = torch._convert_weight_to_int4pack(t["packed"].contiguous(), 8)
      sz = torch.stack([t["scale"].to(torch.bfloat16), torch.zeros_like(t["scale"], dtype=torch.bfloat16)], -1)
      peers["torch_tinygemm_int4"] = lambda: torch._weight_int4pack_mm(t["x"], packed, gpu_cases.GROUP, sz)
    except Exception as err:  # noqa: BLE001
      return {"torch_tinygemm_int4": {"kind": "torch", "error": f"{type(err).__name__}: {str(err)[:300]}"}}
  out = {}
  for label, fn in peers.items():
    try:
      for _ in range(3):
        fn()
      samples = []
      for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3)
      out[label] = {"kind": "torch", "us": statistics.median(samples), "timer": "cuda events"}
    except Exception as err:  # noqa: BLE001
      out[label] = {"kind": "torch", "error": f"{type(err).__name__}: {str(err)[:300]}"}
  return out


def worker(args) -> int:
  """Run cases [--start, ...) of the selection, appending one JSON line per case to the results file."""
  on_gpu = jax.default_backend() == "gpu"
  selected = select(gpu_cases.cases(args.smoke, sweep=not args.no_sweep), args.only)
  deadline = args.deadline or float("inf")
  with open(args.out / "gpu_check.jsonl", "a") as results:
    for index in range(args.start, len(selected)):
      case = selected[index]
      if time.time() > deadline:
        row = {"case": case.name, "index": index, "status": "skipped", "error": "time budget spent"}
      else:
        print(f"[{index + 1}/{len(selected)}] {case.name}", file=sys.stderr, flush=True)
        started = time.time()
        try:
          row = run_case(case, args.iterations, on_gpu) | {"status": "ok"}
        except Exception as err:  # noqa: BLE001
          row = {"case": case.name, "status": "error", "error": f"{type(err).__name__}: {str(err)[:500]}",
                 "traceback": traceback.format_exc()[-2000:]}
        row |= {"index": index, "seconds": round(time.time() - started, 1)}
      results.write(json.dumps(row) + "\n")
      results.flush()
      if row.get("fatal") or "CUDA" in row.get("error", ""):
        return 3  # a fresh worker (and CUDA context) takes the next case
  return 0


def select(all_cases, only):
  return [c for c in all_cases if not only or any(p in c.name for p in only)]


def _done_indices(path: pathlib.Path) -> set[int]:
  if not path.exists():
    return set()
  return {json.loads(line)["index"] for line in path.read_text().splitlines() if line.strip()}


def supervise(args) -> int:
  """Workers in fresh processes until every selected case has a line; a crashed case gets an error line."""
  results = args.out / "gpu_check.jsonl"
  total = len(select(gpu_cases.cases(args.smoke, sweep=False), args.only))
  deadline = time.time() + args.budget_s
  while True:
    done = _done_indices(results)
    start = next((i for i in range(total) if i not in done), None)
    if start is None:
      return 0
    command = [sys.executable, __file__, "--worker", "--start", str(start), "--deadline", str(deadline),
               "--out", str(args.out), "--iterations", str(args.iterations)] + (["--smoke"] if args.smoke else [])
    command += ["--only", *args.only] if args.only else []
    command += ["--no-sweep"] if args.no_sweep else []
    proc = subprocess.run(command, stderr=subprocess.PIPE, text=True)
    sys.stderr.write(proc.stderr[-4000:])
    done = _done_indices(results)
    if proc.returncode != 0 and start not in done:  # the worker died inside case `start`
      crashed = select(gpu_cases.cases(args.smoke, sweep=False), args.only)[start]
      with open(results, "a") as f:
        f.write(json.dumps({"case": crashed.name, "index": start, "status": "crashed",
                            "error": f"worker exited with {proc.returncode}: {proc.stderr[-1500:]}"}) + "\n")


def run_gpu_tests(args) -> dict:
  """The `gpu`-marked tests (compiled kernels against their references), bounded in time."""
  command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
             str(REPO / "tests" / "pallas_kernels" / "test_gpu_compiled.py")]  # no gguf/nbformat on GPU machines
  try:
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.tests_timeout_s, cwd=REPO)
    return {"command": " ".join(command[1:]), "returncode": done.returncode, "tail": done.stdout[-3000:]}
  except subprocess.TimeoutExpired as err:
    return {"command": " ".join(command[1:]), "returncode": "timeout", "tail": str(err.stdout)[-3000:]}


def run_e2e_decode(args) -> dict:
  """experiments/e2e_decode.py's GPU mode (a Llama-3-8B-shaped decoder made on the device, bf16 vs each recipe),
  bounded in time; its rows are read back from the JSON lines it appends."""
  out = args.out / "e2e_decode_device.jsonl"  # e2e_decode.py appends its rows there as they finish
  out.unlink(missing_ok=True)
  command = [sys.executable, str(REPO / "experiments" / "e2e_decode.py"), "--device-model", "llama3-8b",
             "--out", str(args.out)]
  try:
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.e2e_timeout_s, cwd=REPO)
    status = {"returncode": done.returncode, "tail": (done.stdout + done.stderr)[-3000:]}
  except subprocess.TimeoutExpired as err:
    status = {"returncode": "timeout", "tail": str(err.stderr)[-3000:]}
  rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
  return {"command": " ".join(command[1:]).replace(str(REPO) + "/", ""), "rows": rows} | status


def render(rows: list[dict], meta: dict) -> str:
  lines = [f"# GPU check: {meta['device']}", "",
           f"Commit `{meta['commit']}`, {meta['date']}, jax {meta['jax']}, python {meta['python']}. "
           f"Command: `{meta['command']}`", "",
           "Kernel time in microseconds: " + ("**wall clock in interpret mode on CPU: says nothing about GPU "
                                               "speed**" if meta["smoke"] else "CUPTI, every kernel of a call "
                                                                                "summed, median of the calls") +
           f". Ratio: {BASELINE} time / this time. Error: Frobenius ||out - ref|| / ||ref|| against a float32 "
           "reference (act-quant rows: largest int8 code difference).", "",
           "| case | impl | us | ratio | GB/s | TFLOP/s | error | |", "|---|---|---:|---:|---:|---:|---:|---|"]
  for row in rows:
    if row.get("status") != "ok":
      lines.append(f"| {row['case']} | - | | | | | | {row.get('status')}: {row.get('error', '')[:120]} |")
      continue
    for label, e in sorted(row["impls"].items(), key=lambda kv: kv[1].get("us") or 1e18):
      if "error" in e:
        lines.append(f"| {row['case']} | {label} | | | | | | error: {e['error'][:120]} |")
        continue
      cell = lambda key, fmt: format(e[key], fmt) if e.get(key) is not None else ""
      flag = "" if e.get("ok", True) else "WRONG"
      lines.append(f"| {row['case']} | {label} | {e['us']:.1f} | {cell('vs_baseline', '.2f')} | "
                   f"{cell('gbps', '.0f')} | {cell('tflops', '.0f')} | {cell('rel_err', '.1e')} | {flag} |")
  e2e = meta.get("e2e_decode")
  if e2e:
    lines += ["", f"End-to-end decode, `{e2e['command']}` (return code {e2e['returncode']}):", "",
              "```", "\n".join(json.dumps(r) for r in e2e["rows"]) or e2e["tail"][-1500:], "```"]
  tests = meta.get("gpu_tests")
  if tests:
    lines += ["", f"`{tests['command']}`: return code {tests['returncode']}", "", "```", tests["tail"][-1500:], "```"]
  return "\n".join(lines) + "\n"


def summary(reports: list[dict]) -> str:
  """README's table: per case, the default kernel, the best of its sweep, XLA's baselines and torch's peers, in us
  and as a ratio to XLA's bf16 dot, from one or more gpu_check JSON reports (each row names its report's commit)."""
  lines = ["| case | kernel (default config) | best of sweep | XLA bf16 | XLA int8 / dequant | torch | commit |",
           "|---|---:|---:|---:|---:|---:|---|"]
  fmt = lambda e, base: f"{e['us']:.1f} ({base / e['us']:.2f}x)" if e and e.get("us") else "-"
  for report in reports:
    for row in report["cases"]:
      if row.get("status") != "ok":
        continue
      impls = row["impls"]
      base = (impls.get(BASELINE) or impls.get("xla") or {}).get("us")
      kernels = {k: e for k, e in impls.items() if e["kind"] == "kernel" and e.get("us") and e.get("ok", True)}
      default = next((e for k, e in kernels.items() if "#" not in k), None)
      best = min(kernels.values(), key=lambda e: e["us"], default=None)
      xla = impls.get("xla_int8") or impls.get("xla_dequant") or (impls.get("xla") if "xla_bf16" in impls else None)
      torch = min((e for k, e in impls.items() if e["kind"] == "torch" and e.get("us") and "bf16" not in k),
                  key=lambda e: e["us"], default=None)
      torch_name = next((k for k, e in impls.items() if e is torch), "")
      lines.append(f"| {row['case']} | {fmt(default, base)} | {fmt(best, base)} | {base:.1f} | {fmt(xla, base)} | "
                   f"{fmt(torch, base)} {torch_name.removeprefix('torch_')} | `{report['meta']['commit']}` |")
  return "\n".join(lines) + "\n"


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--smoke", action="store_true", help="tiny shapes in interpret mode (runs on CPU)")
  p.add_argument("--only", nargs="+", default=None, help="run the cases whose name contains one of these")
  p.add_argument("--out", type=pathlib.Path, default=None, help="results directory (default experiments/results)")
  p.add_argument("--commit", default=None, help="the commit being measured (the GPU machine has no .git)")
  p.add_argument("--iterations", type=int, default=None, help="timed calls per implementation (default 10; smoke 2)")
  p.add_argument("--budget-s", type=float, default=400.0, help="start no case after this many seconds")
  p.add_argument("--tests-timeout-s", type=float, default=90.0)
  p.add_argument("--no-tests", action="store_true", help="skip pytest -m gpu")
  p.add_argument("--no-sweep", action="store_true", help="time each kernel's default config only")
  p.add_argument("--e2e", action="store_true", help="also run experiments/e2e_decode.py's GPU mode")
  p.add_argument("--e2e-timeout-s", type=float, default=200.0)
  p.add_argument("--in-process", action="store_true", help="no worker processes (smoke runs inside pytest)")
  p.add_argument("--readme", nargs="+", type=pathlib.Path, default=None, metavar="REPORT_JSON",
                 help="write README's GPU table from these gpu_check reports (no GPU needed) and exit")
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
  p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  args.iterations = args.iterations or (2 if args.smoke else 10)
  args.out = args.out or REPO / "experiments" / "results"
  return args


def main(argv=None) -> int:
  args = parse(argv)
  if args.worker:
    return worker(args)
  if args.readme:
    import common
    table = summary([json.loads(path.read_text()) for path in args.readme])
    print(table)
    return 0 if common.write_readme_region("gpu", table) else 1
  on_gpu = jax.default_backend() == "gpu"
  if not args.smoke and not on_gpu:
    print("no GPU here: the full check needs one; --smoke runs the same code on CPU in interpret mode",
          file=sys.stderr)
    return 2
  stem = "gpu_check_smoke" if args.smoke else "gpu_check"
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "gpu_check.jsonl").unlink(missing_ok=True)
  if args.in_process:
    args.deadline = time.time() + args.budget_s
    worker(args)
  else:
    supervise(args)
  rows = sorted((json.loads(line) for line in (args.out / "gpu_check.jsonl").read_text().splitlines()),
                key=lambda r: r["index"])
  device = jax.devices()[0]
  meta = {"device": f"{device.platform} {device.device_kind}", "jax": jax.__version__,
          "python": platform.python_version(), "smoke": args.smoke, "commit": args.commit or _commit(),
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "command": " ".join(["python", "experiments/gpu_check.py"] + (argv if argv is not None else sys.argv[1:]))}
  if on_gpu and args.e2e:
    meta["e2e_decode"] = run_e2e_decode(args)
  if on_gpu and not args.no_tests:
    meta["gpu_tests"] = run_gpu_tests(args)
  (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "cases": rows}, indent=1))
  (args.out / f"{stem}.md").write_text(render(rows, meta))
  (args.out / "gpu_check.jsonl").rename(args.out / f"{stem}.jsonl")
  print(render(rows, meta))
  bad = [r["case"] for r in rows if r.get("status") != "ok"]
  wrong = [f"{r['case']}: {label}" for r in rows if r.get("status") == "ok"
           for label, e in r["impls"].items() if e.get("ok") is False or ("error" in e and e["kind"] != "torch")]
  print(f"cases not ok: {bad or 'none'}; implementations wrong or failing: {wrong or 'none'}", file=sys.stderr)
  return 1 if bad or wrong else 0


def _commit() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


if __name__ == "__main__":
  sys.exit(main())
