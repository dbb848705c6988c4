"""Regenerate README's LUT-GEMM tables: BCQ vs round-to-nearest uniform weights on SmolLM2-135M and on
Gemma-3-270M (a second decoder: 262k vocabulary, sandwich norms, QK-norm, GeGLU, sliding-window layers).

SmolLM2 (default --model smollm2-135m): for q in {2, 3, 4} and groups {64, 128} along the input dim:
`rtn-w{q}-g{g}` (uniform asymmetric RTN, the baseline) and `lutgemm-bcq{q}-g{g}` (binary-coding quantization,
no offset, fit weighted by calibration activations), plus, at group 128, the data-free plain-MSE BCQ fit (q=3)
and BCQ with an offset (q=3, 4). Gemma (--model gemma3-270m; its evaluation costs about twice SmolLM2's): RTN
and BCQ at group 128 for q = 3, 4, 2, then q=3 at group 64. Every linear of every block is quantized;
embeddings and the tied output head stay float32. Figures: perplexity on the
first 4096 tokens of alice29 and of asyoulik (windows of 512), KL(float || quantized) of the next-token
distribution and top-1 agreement with the float model, real stored bits per weight of the block linears (packed
codes or sign planes + scales / alphas / offsets, counted from the arrays), and quantization seconds (in this
process, jit compilation and calibration included, model load excluded).

  .venv/bin/python experiments/lutgemm.py                        # SmolLM2 table (27 min on 2 CPU cores)
  .venv/bin/python experiments/lutgemm.py --model gemma3-270m    # Gemma table (21 min)
  .venv/bin/python experiments/lutgemm.py --quick                # 1024 tokens of each text, q=3 g=128 only

Results are appended to experiments/results/lutgemm.json row by row (rows of every model share the file); a
rerun skips the (model, recipe) rows already there (--fresh drops this model's rows). The rendered tables
(experiments/results/lutgemm.md and README's marker region) hold every model with rows, SmolLM2 first.
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
MODELS = ("smollm2-135m", "gemma3-270m")  # table order


def default_recipes(quick: bool, model: str = "smollm2-135m") -> list[str]:
  if quick:
    return ["fp", "rtn-w3-g128", "lutgemm-bcq3-g128"]
  if model == "gemma3-270m":
    names = ["fp"]
    for q, g in ((3, 128), (4, 128), (2, 128), (3, 64)):
      names += [f"rtn-w{q}-g{g}", f"lutgemm-bcq{q}-g{g}"]
    return names
  names = ["fp"]
  for q in (2, 3, 4):
    for g in (64, 128):
      names += [f"rtn-w{q}-g{g}", f"lutgemm-bcq{q}-g{g}"]
  # at group 128: the data-free fit at 3 bits, an offset at 3 and 4 bits
  return names + ["lutgemm-bcq3-mse-g128", "lutgemm-bcq3-offset-g128", "lutgemm-bcq4-offset-g128"]


def block_linear_bits(model) -> dict:
  """Stored bits per weight over the kernels of the block linears (every array a QArray/BCQArray holds)."""
  import numpy as np

  from jaxquant import formats
  from jaxquant.models import surgery
  stored, weights = 0, 0
  for name, module in surgery.modules(model).items():
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

  from jaxquant import formats, recipes
  from jaxquant.measure import evaluate_loaded, quantize_loaded
  recipe = recipes.get_recipe(name)
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
  parser.add_argument("--model", default="smollm2-135m",
                      help="built-in name (smollm2-135m, gemma3-270m) or a llama / gemma3 GGUF path")
  parser.add_argument("--fresh", action="store_true", help="drop this model's rows already in the results file")
  parser.add_argument("--render-only", action="store_true", help="run nothing; re-render the tables from the file")
  args = parser.parse_args()

  from jaxquant import pipeline
  recipes = args.recipes or default_recipes(args.quick, args.model)
  max_tokens = 1024 if args.quick else 4096
  stem = "lutgemm_quick" if args.quick else "lutgemm"
  RESULTS.mkdir(parents=True, exist_ok=True)
  path = RESULTS / f"{stem}.json"
  all_rows = [] if not path.exists() else json.loads(path.read_text())
  mine = lambda r: r.get("model") == args.model and r.get("max_tokens") == max_tokens
  if args.fresh:
    all_rows = [r for r in all_rows if not mine(r)]
  done = {r["recipe"] for r in all_rows if mine(r)}
  loaded = None
  for name in [] if args.render_only else recipes:
    if name in done:
      continue
    loaded = loaded or pipeline.load(args.model)
    row = {"model": args.model, "max_tokens": max_tokens, **run_recipe(loaded, name, max_tokens),
           **common.provenance()}
    all_rows.append(row)
    path.write_text(json.dumps(all_rows, indent=1))
    print(json.dumps({k: v for k, v in row.items() if k != "description"}), flush=True)

  # Rows grouped by model (SmolLM2, Gemma, then any other), each in its default recipe order.
  model_rank = lambda m: MODELS.index(m) if m in MODELS else len(MODELS)
  models = sorted({r["model"] for r in all_rows if r.get("max_tokens") == max_tokens}, key=model_rank)
  orders = {m: {name: i for i, name in enumerate(recipes if m == args.model else default_recipes(args.quick, m))}
            for m in models}
  all_rows.sort(key=lambda r: (model_rank(r["model"]), r["model"], orders.get(r["model"], {}).get(r["recipe"], 99)))
  path.write_text(json.dumps(all_rows, indent=1))
  table = "\n".join(render([r for r in all_rows if r["model"] == m and r.get("max_tokens") == max_tokens],
                           args.quick, m) for m in models)
  (RESULTS / f"{stem}.md").write_text(table)
  if not args.quick:
    common.write_readme_region("lutgemm", table)
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


_MODEL_NOTES = {
    "smollm2-135m": (
        "SmolLM2-135M-Instruct",
        "SmolLM2-135M-Instruct (float32 from the Q4_1 GGUF), every linear of the 30 blocks quantized; embeddings "
        "and the tied output head float32. Perplexity on the first {tokens} tokens of each text (alice29 from "
        "\"CHAPTER I\"), windows of 512, no BOS; "),
    "gemma3-270m": (
        "Gemma-3-270M",
        "Gemma-3-270M base (float32 dequantized from the Q4_K_M GGUF, whose tensors are Q4_K / Q5_0 / Q8_0 / Q6_K), "
        "every linear of the 18 blocks quantized (K = 640, 1024 or 2048: whole groups at 64 and 128); the "
        "262144 x 640 embeddings and the tied output head float32. Perplexity on the first {tokens} tokens of "
        "each text (alice29 from \"CHAPTER I\"), windows of [BOS] + 511 tokens (calibration windows too); "),
}
_COMMON_NOTE = (
    "KL(float || quantized) in nats and top-1 agreement per predicted token against the float model. Bits/weight: "
    "stored bytes x 8 / weights of the block linears, scales included (RTN: float32 scale and zero a group; BCQ: "
    "float16 alphas, float16 offset where named). BCQ act.-weighted: each input row's squared error weighted by "
    "its mean square activation on calibration text (lcet10, 8 x 512 tokens, not an evaluation text); plain MSE: "
    "the paper's data-free fit. ")
_SMOLLM2_GROUPS = ("SmolLM2's K = 576 is not a multiple of 128: group 128 leaves a last group of 64 rows, so "
                   "group-128 scales cost 5/576 per weight rather than 1/128. ")


def render(rows: list[dict], quick: bool, model: str = "smollm2-135m") -> str:
  """One model's table and its note (markdown)."""
  fp = next((r for r in rows if r["recipe"] == "fp"), None)
  title, lead = _MODEL_NOTES.get(model, (model, f"{model}, every block linear quantized. Perplexity on the first "
                                                "{tokens} tokens of each text, windows of 512; "))
  lines = [f"#### {title}", "",
           "| recipe | method | q | group | ppl alice29 | ppl asyoulik | KL alice29 / asyoulik "
           "| top-1 alice29 / asyoulik | bits/weight (block linears) | stored MB | quantize s |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for row in rows:
    method, q, group = _label(row["recipe"])
    cells = [f"`{row['recipe']}`", method, q, group]
    for text in TEXTS:
      ppl = row[text]["perplexity"]
      ref = fp[text]["perplexity"] if fp else row[text]["fp_perplexity"]
      ratio = ppl / ref
      change = (f"x{ratio:.1e}" if ratio >= 1e6 else f"x{ratio:.0f}") if ratio > 10 else f"{100 * (ratio - 1):+.1f}%"
      cells.append(f"{ppl:.4g} ({change})" if ppl >= 1000 else f"{ppl:.2f} ({change})")
    cells.append(" / ".join(f"{row[t]['kl']:.4f}" for t in TEXTS))
    cells.append(" / ".join(f"{row[t]['top1_agreement']:.3f}" for t in TEXTS))
    cells += [f"{row['bits_per_weight']:.3f}", f"{row['weight_bytes'] / 1e6:.1f}", f"{row['quantize_seconds']:.1f}"]
    lines.append("| " + " | ".join(cells) + " |")
  tokens = 1024 if quick else 4096
  flag = "" if model == "smollm2-135m" else f" --model {model}"
  lines += ["", (
      lead.format(tokens=tokens) + _COMMON_NOTE + (_SMOLLM2_GROUPS if model == "smollm2-135m" else "")
      + "Quantize s: in-process wall time on 2 shared CPU cores, jit compilation and calibration included. "
      + f"Regenerate: `.venv/bin/python experiments/lutgemm.py{flag}`.")]
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
