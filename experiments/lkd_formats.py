"""Regenerate README's format-distillation table (issue 18): each weight format's own fit against the same fit
followed by layer-wise distillation (jaxquant/methods/lkd_formats.py, the `-lkd` recipes), on SmolLM2-135M.

Rows: float32; at 4 and 3 bits group 128 and 3 bits group 64, BCQ with offset (lutgemm-bcq{q}-offset-g{g}) and its
-lkd variant; at 2 bits group 128, BCQ without offset (lutgemm-bcq2-g128) and its -lkd variant; at 3 bits group
128, uniform round-to-nearest (rtn-w3-g128) and its -lkd variant; after each -lkd row its -lkd-kl variant (the
same, then the logit KL pass of jaxquant/methods/logit_kl.py; one worker process makes both rows, the -lkd-kl
row continuing from the -lkd row's distilled model as the recipe does). Every linear of every block is quantized;
embeddings and the tied head stay float32. Calibration: lcet10 (the recipes' default; LKD draws 128 windows of
128 tokens from it), never an evaluation text. Figures: perplexity on the first --max-tokens tokens of alice29
and of asyoulik (windows of 512), KL(float || quantized) and top-1 agreement with the float model, stored bits per
weight of the block linears, quantization wall seconds and the peak resident memory of the process that
quantized and evaluated (each recipe runs in its own process under /usr/bin/time, common.measured_run).
--model gemma3-270m runs the same rows on Gemma-3-270M (18 blocks; its evaluation costs about twice SmolLM2's);
each model gets its own table under one README region.

  PYTHONPATH=. .venv/bin/python experiments/lkd_formats.py                       # the full table (hours)
  PYTHONPATH=. .venv/bin/python experiments/lkd_formats.py --model gemma3-270m   # Gemma's table (hours)
  PYTHONPATH=. .venv/bin/python experiments/lkd_formats.py --layers 2 --max-tokens 256 \
      --recipes fp lutgemm-bcq3-offset-g128 lutgemm-bcq3-offset-g128-lkd     # smoke: a few minutes

Results go to experiments/results/lkd_formats.json / .md row by row (a rerun skips rows already there; --fresh
starts over); a run with --layers or other --max-tokens than 4096 writes lkd_formats_smoke.* instead and never
touches README. The full run writes README's region <!-- table:lkd_formats begin/end --> (common.write_readme_region).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments"))

import common  # noqa: E402  (experiments/common.py)

RESULTS = REPO / "experiments" / "results"
TEXTS = ("alice29", "asyoulik")
FITS = ("lutgemm-bcq4-offset-g128", "lutgemm-bcq3-offset-g128", "lutgemm-bcq2-g128", "lutgemm-bcq3-offset-g64",
        "rtn-w3-g128")
MODELS = ("smollm2-135m", "gemma3-270m")  # table order
# Issue 18's goals, perplexity against float at group 128, per model.
GOALS = {"smollm2-135m": {"4": "<= +6%", "3": "<= +35%", "2": "<= x4"}, "gemma3-270m": {"3": "<= +60%"}}
TITLES = {"smollm2-135m": "SmolLM2-135M-Instruct", "gemma3-270m": "Gemma-3-270M"}


def default_recipes() -> list[str]:
  return ["fp"] + [name for fit in FITS for name in (fit, f"{fit}-lkd", f"{fit}-lkd-kl")]


def block_linear_bits(model) -> dict:
  """Stored bits per weight over the block linears' kernels (every array a QArray / BCQArray holds)."""
  import numpy as np

  from jaxquant import formats
  from jaxquant.models import surgery
  stored = weights = 0
  for name, module in surgery.modules(model).items():
    if name.startswith("layers."):
      kernel = module.kernel.get_value()
      weights += int(kernel.shape[0]) * int(kernel.shape[1])
      stored += kernel.nbytes if formats.is_qarray(kernel) else int(np.prod(kernel.shape)) * kernel.dtype.itemsize
  return {"bits_per_weight": stored * 8 / weights}


def model_of(row: dict) -> str:
  return row.get("model", "smollm2-135m")  # rows written before --model existed are SmolLM2's


def _row(loaded, recipe, model, seconds: float, model_name: str, layers: int | None, max_tokens: int) -> dict:
  from jaxquant.measure import evaluate_loaded
  row = {"recipe": recipe.name, "model": model_name, "quantize_seconds": seconds, "layers": layers,
         "max_tokens": max_tokens,
         "calibration": "lcet10" if recipe.needs_calibration else None, **block_linear_bits(model),
         "settings": {k: v for k, v in (getattr(recipe.procedure, "settings", lambda: {})()).items()}}
  for text in TEXTS:
    row[text] = evaluate_loaded(loaded, model, text, max_tokens, min(512, max_tokens), progress=False)
  return row


def one(name: str, model_name: str, layers: int | None, max_tokens: int, then_kl: bool = False) -> dict:
  """Quantize and evaluate one recipe in this process; the row (printed as the last stdout line by --one).

  then_kl (name an -lkd recipe): then finish that model as its -lkd-kl recipe does (the logit KL pass with the
  recipe's settings on the same calibration windows) and evaluate it too: {"rows": [-lkd row, -lkd-kl row]}, the
  -lkd-kl row's quantize_seconds the sum of both stages. This is what the -lkd-kl recipe computes, without
  distilling the blocks twice; the -lkd row's peak memory is the process's up to its own evaluation."""
  import resource
  import time

  import numpy as np

  from jaxquant import pipeline, recipes
  from jaxquant.measure import bos_id, own_calibration, quantize_loaded
  from jaxquant.methods import logit_kl
  start = time.perf_counter()
  loaded = pipeline.load(model_name, n_layers=layers)
  recipe = recipes.get_recipe(name)
  model, seconds = quantize_loaded(loaded, recipe, progress=False)
  row = _row(loaded, recipe, model, seconds, model_name, layers, max_tokens)
  if not then_kl:
    return row
  row.update(peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
             process_wall_seconds=time.perf_counter() - start)
  finishing = recipes.get_recipe(f"{name}-kl")
  windows = np.concatenate([np.asarray(b) for b in own_calibration(finishing, loaded.tokenizer, "lcet10", bos_id(loaded))])
  kl_start = time.perf_counter()
  finished, _ = logit_kl.finish_on_logits(loaded.model, model, windows, finishing.procedure.finish, progress=False)
  del model
  kl_row = _row(loaded, finishing, finished, seconds + time.perf_counter() - kl_start, model_name, layers, max_tokens)
  return {"rows": [row, kl_row]}


def _change(ppl: float, ref: float) -> str:
  ratio = ppl / ref
  return f"x{ratio:.1f}" if ratio > 2 else f"{100 * (ratio - 1):+.1f}%"


def render(rows: list[dict]) -> str:
  """One model's table and its note (markdown)."""
  fp = next((r for r in rows if r["recipe"] == "fp"), None)
  model = model_of(rows[0]) if rows else "smollm2-135m"
  lines = [f"#### {TITLES.get(model, model)}", "",
           "| recipe | distilled | ppl alice29 | ppl asyoulik | KL alice29 / asyoulik | top-1 alice29 / asyoulik "
           "| bits/weight | quantize s | peak RSS GB |", "|---|---|---|---|---|---|---|---|---|"]
  for row in rows:
    distilled = ("blocks + logits" if row["recipe"].endswith("-lkd-kl") else
                 "blocks" if row["recipe"].endswith("-lkd") else "no")
    cells = [f"`{row['recipe']}`", distilled]
    for text in TEXTS:
      ref = fp[text]["perplexity"] if fp else row[text]["fp_perplexity"]
      cells.append(f"{row[text]['perplexity']:.2f} ({_change(row[text]['perplexity'], ref)})")
    cells.append(" / ".join(f"{row[t]['kl']:.4f}" for t in TEXTS))
    cells.append(" / ".join(f"{row[t]['top1_agreement']:.3f}" for t in TEXTS))
    cells += [f"{row['bits_per_weight']:.3f}", f"{row['quantize_seconds']:.0f}", f"{row['peak_rss_bytes'] / 1e9:.2f}"]
    lines.append("| " + " | ".join(cells) + " |")
  first = rows[0] if rows else {}
  blocks = first.get("layers") or {"smollm2-135m": "all 30", "gemma3-270m": "all 18"}.get(model, "all")
  lines += ["", f"{TITLES.get(model, model)} ({blocks} blocks), every block linear quantized; "
            f"perplexity on the first {first.get('max_tokens')} tokens of each text, windows of "
            f"{min(512, first.get('max_tokens') or 512)}; KL in nats. "
            "-lkd: the fit, then each block, on the input the quantized blocks before it compute, distilled against the "
            "float block on lcet10 windows "
            "(jaxquant/methods/lkd_formats.py); -lkd-kl: then the formats' alphas, offsets and scales of all blocks "
            "trained together on the final logits' KL (jaxquant/methods/logit_kl.py). Goals at group 128: "
            + ", ".join(f"{q}-bit {goal}" for q, goal in GOALS.get(model, {}).items())
            + f". Rows from commit {', '.join(sorted({r['commit'] for r in rows if 'commit' in r}))}.", ""]
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="smollm2-135m", choices=MODELS, help="which model's rows to run")
  parser.add_argument("--recipes", nargs="*", default=None, help="recipes to run (default: the table's)")
  parser.add_argument("--layers", type=int, default=None, help="only the first N blocks (a smoke run)")
  parser.add_argument("--max-tokens", type=int, default=4096, help="tokens of each text (default 4096)")
  parser.add_argument("--fresh", action="store_true", help="drop the rows already in the results file")
  parser.add_argument("--render-only", action="store_true", help="run nothing; re-render from the results file")
  parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the worker: one recipe, JSON on stdout
  parser.add_argument("--then-kl", action="store_true", help=argparse.SUPPRESS)  # ... and its -lkd-kl row
  args = parser.parse_args()
  if args.one:
    print(json.dumps(one(args.one, args.model, args.layers, args.max_tokens, args.then_kl)))
    return

  full = args.layers is None and args.max_tokens == 4096
  stem = "lkd_formats" if full else "lkd_formats_smoke"
  RESULTS.mkdir(parents=True, exist_ok=True)
  path = RESULTS / f"{stem}.json"
  rows = [] if args.fresh or not path.exists() else json.loads(path.read_text())
  wanted = args.recipes or default_recipes()
  same = lambda r: r.get("layers") == args.layers and r.get("max_tokens") == args.max_tokens
  done = {r["recipe"] for r in rows if same(r) and model_of(r) == args.model}
  for name in [] if args.render_only else wanted:
    if name in done:
      continue
    # An -lkd row whose -lkd-kl row is also wanted: one worker makes both (the blocks are distilled once).
    chained = name.endswith("-lkd") and f"{name}-kl" in wanted and f"{name}-kl" not in done
    worker = [str(pathlib.Path(__file__).relative_to(REPO)), "--one", name, "--model", args.model,
              "--max-tokens", str(args.max_tokens)]
    worker += ["--layers", str(args.layers)] if args.layers is not None else []
    worker += ["--then-kl"] if chained else []
    result = common.measured_run(worker)
    made = result.pop("rows") if chained else [result]
    for row in made:
      for key in ("peak_rss_bytes", "process_wall_seconds"):  # the process's, where the worker gave none
        row.setdefault(key, result[key])
      row["worker_command"] = result["command"]
      row.update(common.provenance())
      rows.append(row)
      done.add(row["recipe"])
      print(json.dumps({k: row[k] for k in ("recipe", "quantize_seconds", "bits_per_weight")}), flush=True)
    path.write_text(json.dumps(rows, indent=1))
  order = {name: i for i, name in enumerate(default_recipes())}  # the table's order, whatever ran
  rank = lambda m: MODELS.index(m) if m in MODELS else len(MODELS)
  table = "\n".join(render(sorted((r for r in rows if same(r) and model_of(r) == m),
                                  key=lambda r: order.get(r["recipe"], len(order))))
                    for m in sorted({model_of(r) for r in rows if same(r)}, key=rank))
  (RESULTS / f"{stem}.md").write_text(table)
  if full:
    common.write_readme_region("lkd_formats", table)
  print(table)


if __name__ == "__main__":
  main()
