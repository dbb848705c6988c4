"""experiments/e2e_decode.py: the device mode runs end to end on CPU at a tiny shape (every recipe, quantized on
the device without a device-to-host copy), the budget guard skips what it must, and the CPU mode's timing and
table work on a small random model."""

import importlib.util
import json
import pathlib
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from jaxquant import formats

REPO = pathlib.Path(__file__).resolve().parents[1]


def _load(name):
  if str(REPO / "experiments") not in sys.path:
    sys.path.insert(0, str(REPO / "experiments"))
  if name in sys.modules:
    return sys.modules[name]
  spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


def test_device_mode_runs_every_recipe_at_a_tiny_shape(tmp_path):
  e2e = _load("e2e_decode")
  e2e.main(["--device-model", "tiny", "--batches", "1", "3", "--new-tokens", "4", "--device-prompt", "8",
            "--device-prefill", "--out", str(tmp_path)])
  rows = [json.loads(line) for line in (tmp_path / "e2e_decode_device.jsonl").read_text().splitlines()]
  device = _load("e2e_device")
  order = {1: (device.BF16, device.PLAIN, *device.RECIPES), 3: (device.BF16, *device.RECIPES, device.PLAIN)}
  assert [(r["batch"], r["recipe"]) for r in rows] == [(b, n) for b in (1, 3) for n in order[b]]
  for row in rows:
    assert "error" not in row, row
    assert row["tokens_per_s"] > 0 and row["steps"] == 4 and row["time_to_first_token_s"] > 0
    assert row["commit"] and row["command"].startswith("python experiments/e2e_decode.py --device-model tiny")
  size = {r["recipe"]: r["block_bytes"] for r in rows if r["batch"] == 1}
  assert size["lutgemm-bcq3-g128"] < size["rtn-w4-g128"] < size["zeroquant-w48a16"] < size["zeroquant-w8a8"]
  assert size["zeroquant-w8a8"] < size["bf16"] / 1.7
  table = (tmp_path / "e2e_decode_device.md").read_text()
  assert "bf16, XLA dot (baseline)" in table and "BCQ3 g128" in table


def test_device_quantization_stays_on_the_device(monkeypatch):
  """No array is read back to the host while the recipes quantize (the 8B model's 16 GB would cross PCIe)."""
  from jax._src.array import ArrayImpl

  from jaxquant import quantizers
  device = _load("e2e_device")
  config = device.SHAPES["tiny"]
  model = device.assemble(config, device.random_weights(config))

  def to_host(*args, **kwargs):
    raise AssertionError("an array was read back to the host")
  for method in ("__array__", "__bool__", "__float__", "__int__", "tolist"):
    monkeypatch.setattr(ArrayImpl, method, to_host)
  with pytest.raises(AssertionError, match="read back"):  # the guard has teeth: the checked host path trips it
    quantizers.quantize_weight(model.layers[0].mlp.up_proj.kernel.get_value(), quantizers.WeightQuant())
  for name in device.RECIPES:
    quantized = device.quantize_on_device(model, name)
    kernels = [l.kernel.get_value() for b in quantized.layers for l in (b.attn.q_proj, b.mlp.down_proj)]
    assert all(isinstance(k, (formats.QArray, formats.BCQArray)) for k in kernels), name
  assert quantized.embed.embedding.get_value() is model.embed.embedding.get_value()  # shared, not copied


def test_device_budget_skips_the_remaining_cases(tmp_path):
  device = _load("e2e_device")
  rows = device.run("tiny", tmp_path, batches=(1,), prompt=4, new=2, recipes=("zeroquant-w8a8",), budget_s=0.0)
  assert len(rows) == 3 and all(r["error"].startswith("TimeoutError: skipped") for r in rows)


def test_cpu_mode_times_a_case_and_renders_ratios_to_fp():
  e2e = _load("e2e_decode")
  from jaxquant.models import decode, llama
  model = llama.random_llama(llama.LlamaConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                                               head_dim=16, ffn_dim=64))
  prompts = np.arange(2 * 12, dtype=np.int32).reshape(2, 12) % 64
  case = e2e.cpu_case(decode.Decoder(model), prompts, 5)
  assert case["runs"] == 2 and case["decode_steps"] == 4 and case["decode_tokens_per_s"] > 0
  base = {"batch": 2, "prompt": 12, "new_tokens": 5, "weight_bytes": 1e6, "block_bytes": 5e5, **case}
  rows = [{**base, "recipe": "fp"},
          {**base, "recipe": "zeroquant-w8a8", "decode_tokens_per_s": case["decode_tokens_per_s"] / 2,
           "time_to_first_token_s": case["time_to_first_token_s"] * 4}]
  meta = {"cpus": 2, "machine": "x", "jax": jax.__version__, "commit": "abc", "command": "python e2e"}
  table = e2e.render_cpu(rows, meta)
  w8a8 = table.splitlines()[3]
  assert w8a8.startswith("| W8A8 | 12 | 2 |") and "| 0.50x |" in w8a8 and "| 0.25x |" in w8a8
  assert "commit abc" in table and "Regenerate: `python e2e`" in table
