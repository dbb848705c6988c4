"""Regenerate README's LUT-GEMM table: BCQ vs round-to-nearest uniform weights on SmolLM2-135M.

For q in {2, 3, 4} and groups {64, 128} along the input dim: `rtn-w{q}-g{g}` (uniform asymmetric RTN, the
baseline) and `lutgemm-bcq{q}-g{g}` (binary-coding quantization, no offset, fit weighted by calibration
activations), plus, at group 128, the data-free plain-MSE BCQ fit (q=3) and BCQ with an offset (q=3, 4). Every
linear of every block is quantized; embeddings and the tied output head stay float32. Figures: perplexity on the
first 4096 tokens of alice29 and of asyoulik (windows of 512), KL(float || quantized) of the next-token
distribution and top-1 agreement with the float model, real stored bits per weight of the block linears (packed
codes or sign planes + scales / alphas / offsets, counted from the arrays), and quantization seconds (in this
process, jit compilation and calibration included, model load excluded).

  .venv/bin/python experiments/lutgemm.py            # full table (1-2 hours on 2 shared cores)
  .venv/bin/python experiments/lutgemm.py --quick    # 1024 tokens of each text, q=3 g=128 only

Results are appended to experiments/results/lutgemm.json row by row; a rerun skips the recipes already there
(--fresh starts over).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "experiments" / "results"
MARK_BEGIN, MARK_END = "<!-- table:lutgemm begin -->", "<!-- table:lutgemm end -->"
TEXTS = ("alice29", "asyoulik")


def default_recipes(quick: bool) -> list[str]:
  if quick:
    return ["fp", "rtn-w3-g128", "lutgemm-bcq3-g128"]
  names = ["fp"]
  for q in (2, 3, 4):
    for g in (64, 128):
      names += [f"rtn-w{q}-g{g}", f"lutgemm-bcq{q}-g{g}"]
  # at group 128: the data-free fit at 3 bits, an offset at 3 and 4 bits
  return names + ["lutgemm-bcq3-mse-g128", "lutgemm-bcq3-offset-g128", "lutgemm-bcq4-offset-g128"]


def block_linear_bits(model) -> dict:
  """Stored bits per weight over the kernels of the block linears (every array a QArray/BCQArray holds)."""
  import numpy as np

  from jaxquant import formats, pipeline
  stored, weights = 0, 0
  for name, module in pipeline.linear_modules(model).items():
    if not name.startswith("layers."):
      continue
    kernel = module.kernel.get_value()
    weights += int(kernel.shape[0]) * int(kernel.shape[1])
    if formats.is_qarray(kernel):
      stored += kernel.nbytes
    else:
      stored += int(np.prod(kernel.shape)) * kernel.dtype.itemsize
  return {"block_linear_bytes": stored, "block_linear_weights": weights, "bits_per_weight": stored * 8 / weights}


def run_recipe(loaded, name: str, max_tokens: int) -> dict:
  from flax import nnx

  from jaxquant import formats, rules
  from jaxquant.cli import evaluate_loaded, quantize_loaded
  recipe = rules.get_recipe(name)
  # as `jaxquant quantize` does it: calibration (lcet10, 8 x 512 tokens) only for recipes that read data
  model, seconds = quantize_loaded(loaded, recipe, progress=False)
  row = {"recipe": name, "description": recipe.description, "quantize_seconds": seconds,
         "calibration": "lcet10, 8 x 512 tokens" if recipe.needs_calibration else None,
         "weight_bytes": formats.tree_nbytes(nnx.state(model)), **block_linear_bits(model)}
  for text in TEXTS:
    row[text] = evaluate_loaded(loaded, model, text, max_tokens, 512, progress=False)
  return row


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="1024 tokens of each text, fp / rtn-w3 / bcq3 at g128")
  parser.add_argument("--recipes", nargs="*", default=None, help="recipes to run (default: the table's)")
  parser.add_argument("--model", default="smollm2-135m", help="built-in name or llama-family GGUF path")
  parser.add_argument("--fresh", action="store_true", help="ignore rows already in the results file")
  args = parser.parse_args()

  from jaxquant import pipeline
  recipes = args.recipes or default_recipes(args.quick)
  max_tokens = 1024 if args.quick else 4096
  stem = "lutgemm_quick" if args.quick else "lutgemm"
  RESULTS.mkdir(parents=True, exist_ok=True)
  path = RESULTS / f"{stem}.json"
  rows = [] if args.fresh or not path.exists() else json.loads(path.read_text())
  rows = [r for r in rows if r.get("model") == args.model and r.get("max_tokens") == max_tokens]
  done = {r["recipe"] for r in rows}
  loaded = None
  for name in recipes:
    if name in done:
      continue
    loaded = loaded or pipeline.load(args.model)
    row = {"model": args.model, "max_tokens": max_tokens, **run_recipe(loaded, name, max_tokens)}
    rows.append(row)
    path.write_text(json.dumps(rows, indent=1))
    print(json.dumps({k: v for k, v in row.items() if k != "description"}), flush=True)

  order = {name: i for i, name in enumerate(recipes)}
  rows.sort(key=lambda r: order.get(r["recipe"], len(order)))
  path.write_text(json.dumps(rows, indent=1))
  table = render(rows, args.quick)
  (RESULTS / f"{stem}.md").write_text(table)
  readme = REPO / "README.md"
  if not args.quick and readme.exists() and MARK_BEGIN in readme.read_text():
    text = readme.read_text()
    head, rest = text.split(MARK_BEGIN, 1)
    readme.write_text(head + MARK_BEGIN + "\n" + table + MARK_END + rest.split(MARK_END, 1)[1])
  print(table)


def _label(name: str) -> tuple[str, str, str]:
  """recipe -> (method, q, group)."""
  if name == "fp":
    return "float32", "-", "-"
  group = name.rsplit("-g", 1)[1]
  if name.startswith("rtn-w"):
    return "RTN uniform", name[5], group
  if "-offset-" in name:
    return "BCQ + offset, act.-weighted", name[len("lutgemm-bcq")], group
  if "-mse-" in name:
    return "BCQ, plain MSE (data-free)", name[len("lutgemm-bcq")], group
  if name.startswith("lutgemm-bcq"):
    return "BCQ, act.-weighted", name[len("lutgemm-bcq")], group
  if name.startswith("lutgemm-uniform"):
    return "uniform-as-BCQ", name[len("lutgemm-uniform")], group
  return name, "?", group


def render(rows: list[dict], quick: bool) -> str:
  fp = next((r for r in rows if r["recipe"] == "fp"), None)
  lines = ["| recipe | method | q | group | ppl alice29 | ppl asyoulik | KL alice29 / asyoulik "
           "| top-1 alice29 / asyoulik | bits/weight (block linears) | stored MB | quantize s |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for row in rows:
    method, q, group = _label(row["recipe"])
    cells = [f"`{row['recipe']}`", method, q, group]
    for text in TEXTS:
      ppl = row[text]["perplexity"]
      ref = fp[text]["perplexity"] if fp else row[text]["fp_perplexity"]
      change = f"x{ppl / ref:.0f}" if ppl > 10 * ref else f"{100 * (ppl / ref - 1):+.1f}%"
      cells.append(f"{ppl:.4g} ({change})" if ppl >= 1000 else f"{ppl:.2f} ({change})")
    cells.append(" / ".join(f"{row[t]['kl']:.4f}" for t in TEXTS))
    cells.append(" / ".join(f"{row[t]['top1_agreement']:.3f}" for t in TEXTS))
    cells += [f"{row['bits_per_weight']:.3f}", f"{row['weight_bytes'] / 1e6:.1f}", f"{row['quantize_seconds']:.1f}"]
    lines.append("| " + " | ".join(cells) + " |")
  tokens = 1024 if quick else 4096
  lines += ["", (
      f"SmolLM2-135M-Instruct (float32 from the Q4_1 GGUF), every linear of the 30 blocks quantized; embeddings and "
      f"the tied output head float32. Perplexity on the first {tokens} tokens of each text (alice29 from "
      f"\"CHAPTER I\"), windows of 512, no BOS; KL(float || quantized) in nats and top-1 agreement per predicted "
      f"token against the float model. Bits/weight: stored bytes x 8 / weights of the block linears, scales "
      f"included (RTN: float32 scale and zero a group; BCQ: float16 alphas, float16 offset where named). "
      f"BCQ act.-weighted: each input row's squared error weighted by its mean square activation on calibration "
      f"text (lcet10, 8 x 512 tokens, not an evaluation text); plain MSE: the paper's data-free fit. "
      f"SmolLM2's K = 576 is not a multiple of 128: group 128 leaves a last group of 64 rows, so group-128 scales cost 5/576 per weight rather than 1/128. "
      f"Quantize s: in-process wall time on 2 shared CPU cores, jit compilation and calibration included. Gemma-3-270M is not "
      f"in the table: its GGUF architecture is `gemma3`, which jaxquant's GGUF loader does not load (llama "
      f"family only; Gemma 3 needs QK-norm, pre/post sandwich norms, GeGLU, scaled embeddings and sliding-window "
      f"attention in jaxquant/models). Regenerate: `.venv/bin/python experiments/lutgemm.py`.")]
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
