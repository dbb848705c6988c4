"""experiments/gpu_check.py runs end to end on CPU (--smoke: tiny shapes, interpret mode), every case checked."""

import importlib.util
import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]


def _gpu_check():
  sys.path.insert(0, str(REPO / "experiments"))
  spec = importlib.util.spec_from_file_location("gpu_check", REPO / "experiments" / "gpu_check.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


def test_smoke_run_checks_every_case_and_writes_results(tmp_path):
  gpu_check = _gpu_check()
  assert gpu_check.main(["--smoke", "--in-process", "--out", str(tmp_path)]) == 0
  report = json.loads((tmp_path / "gpu_check_smoke.json").read_text())
  assert report["meta"]["smoke"] and len(report["cases"]) == len(gpu_check.gpu_cases.SMOKE)
  for row in report["cases"]:
    assert row["status"] == "ok", row
    checked = [label for label, e in row["impls"].items() if "rel_err" in e]
    assert checked and all(row["impls"][label]["ok"] for label in checked), row
    assert all(e["us"] > 0 for e in row["impls"].values())
  kinds = {e["kind"] for row in report["cases"] for e in row["impls"].values()}
  assert {"xla", "kernel"} <= kinds
  assert "wall clock in interpret mode" in (tmp_path / "gpu_check_smoke.md").read_text()
  lines = (tmp_path / "gpu_check_smoke.jsonl").read_text().splitlines()
  assert [json.loads(line)["index"] for line in lines] == list(range(len(report["cases"])))


def test_a_wrong_kernel_fails_the_check(tmp_path, monkeypatch):
  """The check has teeth: an implementation off by 5% is flagged and the run returns 1."""
  gpu_check = _gpu_check()
  cases = gpu_check.gpu_cases
  original = cases._case

  def broken(*args):
    case = original(*args)
    impl = case.impls["xla_int8"] if "xla_int8" in case.impls else None
    if impl is not None:
      case.impls["xla_int8"] = cases.Impl(lambda *a: impl.fn(*a) * 1.05, impl.args, impl.kind, impl.bytes)
    return case

  monkeypatch.setattr(cases, "_case", broken)
  assert gpu_check.main(["--smoke", "--in-process", "--only", "w8a8 96x320", "--out", str(tmp_path)]) == 1
  row = json.loads((tmp_path / "gpu_check_smoke.json").read_text())["cases"][0]
  assert row["impls"]["xla_int8"]["ok"] is False


def test_without_a_gpu_the_full_check_refuses(capsys):
  gpu_check = _gpu_check()
  import jax
  if jax.default_backend() == "gpu":
    return
  assert gpu_check.main([]) == 2
  assert "--smoke" in capsys.readouterr().err
