"""experiments/bench_kernels.py executes end to end on CPU (--smoke: tiny shapes, interpret mode, --check)."""

import importlib.util
import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]


def _bench():
  spec = importlib.util.spec_from_file_location("bench_kernels_smoke", REPO / "experiments" / "bench_kernels.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


def test_smoke_run_writes_json_and_markdown(tmp_path, capsys):
  bench = _bench()
  rc = bench.main(["--smoke", "--check", "--ms", "1", "--variants", "w8a8", "w4g128", "act_quant",
                   "--out", str(tmp_path)])
  assert rc == 0
  report = json.loads((tmp_path / "bench_kernels_smoke.json").read_text())
  assert report["smoke"] and report["interpret"]
  labels = {(r["variant"], r["impl"]) for r in report["results"]}
  assert {("w8a8", "pallas"), ("w8a8", "xla_int8"), ("w8a8", "xla_bf16"), ("w4g128", "pallas_lut"),
          ("w4g128", "pallas_decode"), ("w4g128", "dequant_xla"), ("act_quant", "pallas_rmsnorm")} <= labels
  for r in report["results"]:
    assert r["us"] > 0 and r["roofline_frac"] > 0
    if r["pallas"]:
      assert r["speedup"] and "check_err" in r
  md = (tmp_path / "bench_kernels_smoke.md").read_text()
  assert "Interpret mode" in md and "| w4g128 |" in md
  assert "command: " in capsys.readouterr().out


def test_full_sweep_refuses_without_gpu(capsys):
  bench = _bench()
  import jax
  if jax.default_backend() == "gpu":
    return
  assert bench.main([]) == 2
  assert "--smoke" in capsys.readouterr().err
