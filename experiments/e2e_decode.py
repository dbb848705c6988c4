"""End-to-end decode: tokens/s, time to first token and stored weight bytes of quantized models against float,
with jaxquant's KV-cache decoder (jaxquant/models/decode.py) and every linear through ops.qdot.

CPU mode (default): the real SmolLM2-135M, fp32 against each recipe (W8A8 `zeroquant-w8a8`, W4/8
`zeroquant-w48a16`, W4 g128 `rtn-w4-g128`, BCQ3 g128 `lutgemm-bcq3-g128`), batch 1, 8 and 32, prompts of 128
and 1024 tokens (windows of alice29), greedy, --new-tokens new tokens (default 16: 2 shared cores). No bf16 row:
the models compute in float32 and ops.qdot upcasts a bf16 weight at every call, so bf16 would only add work on
a CPU. For each (recipe, prompt, batch): both executables are compiled first (compile seconds recorded apart), then
generations are timed: time to first token (prompt in, first new token on the host) and the decode steps after
it, dispatched back to back; the best of two runs where the prompt batch is at most 2048 tokens (an
executable's first run carries a fixed cost of about 0.2 s, and the machine is shared), one run above. Ratios are to
fp at the same prompt and batch, in the same run. Writes experiments/results/e2e_decode.{json,md} (commit and
command recorded) and README's `e2e_decode` table.

  .venv/bin/python experiments/e2e_decode.py                        # the README table (about 40 min, 2 cores)
  .venv/bin/python experiments/e2e_decode.py --batches 1 --prompts 128 --no-readme --out /tmp/q   # a quick look

Device mode (--device-model llama3-8b, or tiny for a CPU test): see experiments/e2e_device.py. Rows go to
<out>/e2e_decode_device.jsonl as they finish and <out>/e2e_decode_device.md at the end:

  python experiments/e2e_decode.py --device-model llama3-8b --out DIR     # on the GPU machine, ~3 min on an H200
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(REPO), str(REPO / "experiments")) if p not in sys.path]

import common  # noqa: E402  (experiments/common.py)

RESULTS = REPO / "experiments" / "results"
CPU_RECIPES = ("fp", "zeroquant-w8a8", "zeroquant-w48a16", "rtn-w4-g128", "lutgemm-bcq3-g128")
LABELS = {"fp": "fp32", "bf16": "bf16 (ops.qdot)", "bf16-xla-dot": "bf16, XLA dot (baseline)",
          "zeroquant-w8a8": "W8A8", "zeroquant-w48a16": "W4/8 (A16)", "rtn-w4-g128": "W4 g128",
          "lutgemm-bcq3-g128": "BCQ3 g128"}
SMALL_PROMPT_BATCH = 2048  # prompt tokens of a batch up to which a case is timed twice


def _commit() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def _meta(argv: list[str]) -> dict:
  import jax
  return {"commit": _commit(), "command": "python experiments/e2e_decode.py " + " ".join(argv),
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "jax": jax.__version__, "machine": platform.machine(), "cpus": _cpus()}


def _cpus() -> int:
  import os
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _prompts(tokens, batch: int, length: int, bos: int | None):
  """`batch` windows of `length` tokens from the text, spread over it ([BOS] first where the model needs it)."""
  import numpy as np
  body = length - (bos is not None)
  starts = np.linspace(0, len(tokens) - body - 1, batch).astype(int)
  rows = np.stack([tokens[s:s + body] for s in starts]).astype(np.int32)
  return rows if bos is None else np.concatenate([np.full((batch, 1), bos, np.int32), rows], axis=1)


def cpu_case(decoder, prompts, new: int) -> dict:
  """Compile, then time generations: the best of two where the prompt batch is small (the first run of an
  executable carries a fixed cost of ~0.2 s, and the machine is shared), one run otherwise."""
  from jaxquant.models import decode
  batch, width = prompts.shape
  compile_s = decoder.compile(batch, width, width + new) + decoder.compile(batch, 1, width + new)
  runs = [decode.generate(decoder, prompts, new) for _ in range(2 if batch * width <= SMALL_PROMPT_BATCH else 1)]
  ttft = min(r.prefill_seconds for r in runs)
  best = max(runs, key=lambda r: r.decode_tokens_per_s)
  return {"compile_s": compile_s, "runs": len(runs), "time_to_first_token_s": ttft,
          "prefill_tokens_per_s": batch * width / ttft, "decode_tokens_per_s": best.decode_tokens_per_s,
          "ms_per_step": 1e3 * best.decode_seconds / best.decode_steps, "decode_steps": best.decode_steps,
          "tokens": runs[0].tokens[0, :8].tolist()}


def run_cpu(args, meta: dict) -> list[dict]:
  import gc

  from flax import nnx

  from jaxquant import data, formats, measure, pipeline, recipes
  from jaxquant.models import decode
  loaded = pipeline.load(args.model)
  text, _ = data.load_text("alice29")
  tokens = data.tokenize(loaded.tokenizer, text)
  bos = measure.bos_id(loaded)
  rows = []
  for name in args.recipes:
    model, quantize_s = measure.quantize_loaded(loaded, recipes.get_recipe(name), progress=False)
    decoder = decode.Decoder(model)
    sizes = {"weight_bytes": formats.tree_nbytes(nnx.state(model)),
             "block_bytes": formats.tree_nbytes(nnx.state(model.layers))}
    for length in args.prompts:
      for batch in args.batches:
        row = {**meta, "mode": "cpu", "model": args.model, "recipe": name, "batch": batch, "prompt": length,
               "new_tokens": args.new_tokens, "quantize_s": quantize_s, **sizes}
        row.update(cpu_case(decoder, _prompts(tokens, batch, length, bos), args.new_tokens))
        rows.append(row)
        print(json.dumps(row), flush=True)
    del model, decoder
    gc.collect()
  return rows


def _ratio(rows, row, key, base_recipe) -> str:
  base = next((r for r in rows if r["recipe"] == base_recipe and r["batch"] == row["batch"]
               and r["prompt"] == row["prompt"] and key in r), None)
  if base is None or key not in row:
    return "-"
  value = base[key] / row[key] if key == "time_to_first_token_s" else row[key] / base[key]
  return f"{value:.2f}x"


def render_cpu(rows: list[dict], meta: dict) -> str:
  lines = ["| recipe | prompt | batch | decode tok/s | vs fp | ms/step | time to first token s | vs fp | "
           "prefill tok/s | weights MB (blocks) | compile s |", "|" + "---|" * 11]
  for r in rows:
    lines.append(
        f"| {LABELS.get(r['recipe'], r['recipe'])} | {r['prompt']} | {r['batch']} | {r['decode_tokens_per_s']:.1f} | "
        f"{_ratio(rows, r, 'decode_tokens_per_s', 'fp')} | {r['ms_per_step']:.0f} | "
        f"{r['time_to_first_token_s']:.2f} | {_ratio(rows, r, 'time_to_first_token_s', 'fp')} | "
        f"{r['prefill_tokens_per_s']:.0f} | {r['weight_bytes'] / 1e6:.1f} ({r['block_bytes'] / 1e6:.1f}) | "
        f"{r['compile_s']:.1f} |")
  new = rows[0]["new_tokens"] if rows else "?"
  note = (f"\nSmolLM2-135M-Instruct on {meta['cpus']} shared CPU cores ({meta['machine']}, JAX {meta['jax']}, "
          f"commit {meta['commit']}), XLA path of ops.qdot (integer dot for W8A8; weight-only formats dequantized "
          f"at each call); greedy, {new} new tokens after a prompt of alice29 windows. Decode tok/s: new tokens of "
          "the whole batch a second over the steps after the first token; time to first token: prompt in, first "
          "new token on the host; vs fp: this run's fp32 at the same prompt and batch (> 1 is faster). Weights: "
          "stored bytes of the whole model (float32 embeddings and tied head included) and of the 30 blocks. "
          f"Compilation excluded and listed apart. Regenerate: `{meta['command']}`.\n")
  return "\n".join(lines) + "\n" + note


def render_device(rows: list[dict]) -> str:
  lines = ["| recipe | batch | tok/s | ms/step | vs bf16 (ops.qdot) | vs bf16 XLA dot | weights GB (blocks) | "
           "compile s | note |", "|" + "---|" * 9]
  for r in rows:
    if "tokens_per_s" not in r:
      lines.append(f"| {LABELS.get(r['recipe'], r['recipe'])} | {r['batch']} | - | - | - | - | - | - | "
                   f"{r.get('error', '')[:120]} |")
      continue
    lines.append(f"| {LABELS.get(r['recipe'], r['recipe'])} | {r['batch']} | {r['tokens_per_s']:.1f} | "
                 f"{r['ms_per_step']:.2f} | {_ratio(rows, r, 'tokens_per_s', 'bf16')} | "
                 f"{_ratio(rows, r, 'tokens_per_s', 'bf16-xla-dot')} | {r['weight_bytes'] / 1e9:.2f} "
                 f"({r['block_bytes'] / 1e9:.2f}) | {r['compile_s']:.1f} | {r['steps']} steps |")
  head = rows[0] if rows else {}
  return "\n".join(lines) + (f"\n\n{head.get('model')} on {head.get('device')}, backend {head.get('backend')}, "
                             f"cache of {head.get('prompt')} + {head.get('new_tokens')} positions, commit "
                             f"{head.get('commit')}.\n")


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="smollm2-135m", help="CPU mode: the real model (default smollm2-135m)")
  parser.add_argument("--recipes", nargs="+", default=None, help="recipes (default: the five of the table)")
  parser.add_argument("--batches", nargs="+", type=int, default=None, help="CPU: 1 8 32; device: 1 32")
  parser.add_argument("--prompts", nargs="+", type=int, default=[128, 1024], help="CPU prompt lengths")
  parser.add_argument("--new-tokens", type=int, default=None, help="new tokens (CPU 16, device 64)")
  parser.add_argument("--out", default=None, help="results directory (default experiments/results)")
  parser.add_argument("--no-readme", action="store_true", help="CPU: do not rewrite README's table")
  parser.add_argument("--device-model", choices=("llama3-8b", "tiny"), default=None,
                      help="device mode: a model of this shape with random weights made on the device")
  parser.add_argument("--device-prompt", type=int, default=128, help="device mode: cached prompt positions")
  parser.add_argument("--device-prefill", action="store_true", help="device mode: also time a real prefill")
  parser.add_argument("--budget-s", type=float, default=170.0, help="device mode: start no case after this")
  parser.add_argument("--cap-s", type=float, default=8.0, help="device mode: at most this long timing one case")
  args = parser.parse_args(argv)
  meta = _meta(argv)
  out = pathlib.Path(args.out) if args.out else RESULTS
  if args.device_model:
    import e2e_device
    recipes = tuple(r for r in (args.recipes or e2e_device.RECIPES) if r not in (e2e_device.BF16, e2e_device.PLAIN))
    rows = e2e_device.run(args.device_model, out, batches=tuple(args.batches or (1, 32)), prompt=args.device_prompt,
                          new=args.new_tokens or 64, recipes=recipes, budget_s=args.budget_s, cap_s=args.cap_s,
                          prefill=args.device_prefill, meta=meta)
    (out / "e2e_decode_device.md").write_text(render_device(rows))
    return
  args.recipes = args.recipes or list(CPU_RECIPES)
  if args.recipes[0] != "fp":
    args.recipes = ["fp"] + [r for r in args.recipes if r != "fp"]  # ratios need fp, measured first
  args.batches = args.batches or [1, 8, 32]
  args.new_tokens = args.new_tokens or 16
  start = time.perf_counter()
  rows = run_cpu(args, meta)
  meta["total_s"] = time.perf_counter() - start
  out.mkdir(parents=True, exist_ok=True)
  (out / "e2e_decode.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
  table = render_cpu(rows, meta)
  (out / "e2e_decode.md").write_text(table)
  if not args.no_readme and out == RESULTS:
    if not common.write_readme_region("e2e_decode", table):
      print("README has no e2e_decode markers: table not written there", file=sys.stderr)
  print(table)


if __name__ == "__main__":
  main()
