"""Where W8A8 loses accuracy on SmolLM2-135M: int8 activations on one kind of linear at a time.

All block weights are int8 group-wise (group 128) in every row; activations are quantized (int8) only at the
inputs named in the row, token-wise (one scale per token) or per token and K-group of 128. Figures on the first
4096 tokens of alice29 against the float model. Writes experiments/results/w8a8_layers.{json,md} and README's table:w8a8_layers region.

  .venv/bin/python experiments/w8a8_layers.py          # about 15 min on 2 cores
"""

from __future__ import annotations

import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments"))

import common  # noqa: E402  (experiments/common.py)

from jaxquant import data, evaluate, pipeline, rules  # noqa: E402
from jaxquant.quantizers import WeightQuant  # noqa: E402
from jaxquant.rules import Recipe, Rule  # noqa: E402

WEIGHTS = WeightQuant(8, True, "group", 128)
INPUTS = {
    "none (weights only)": None,
    "q/k/v (post-attn-norm)": r"attn\.[qkv]_proj\.kernel$",
    "o (attention output)": r"attn\.o_proj\.kernel$",
    "gate/up (post-mlp-norm)": r"mlp\.(gate|up)_proj\.kernel$",
    "down (gated MLP hidden)": r"mlp\.down_proj\.kernel$",
    "all": rules.BLOCK_LINEARS,
}


def recipe(pattern: str | None, mode: str) -> Recipe:
  chosen = (Rule(pattern, WEIGHTS, activation=mode),) if pattern else ()
  return Recipe("layers", "per-layer W8A8 ablation", chosen + (Rule(rules.BLOCK_LINEARS, WEIGHTS),))


def main() -> None:
  loaded = pipeline.load("smollm2-135m")
  text, source = data.load_text("alice29")
  windows = data.eval_windows(data.tokenize(loaded.tokenizer, text), 512, 4096, source=source)
  rows = []
  for label, pattern in INPUTS.items():
    for mode in (("token",) if pattern is None else ("token", "token_group")):
      model = pipeline.quantize_model(loaded.model, recipe(pattern, mode), progress=False)
      figures = evaluate.compare_to_reference(model, loaded.model, windows, progress=False)
      row = {"activations_quantized_at": label, "mode": mode if pattern else "-", **figures}
      rows.append(row)
      print(json.dumps(row), flush=True)
  # Weight-only int8 by grouping: which weight granularity the W8A8 recipes should use.
  weight_rows = []
  for label, config in (("per channel", WeightQuant(8, True, "channel")),
                        ("row blocks of 128 output channels (ZeroQuant reference)", WeightQuant(8, True, "row_block", 128)),
                        ("groups of 128 along K", WEIGHTS),
                        ("groups of 32 along K", WeightQuant(8, True, "group", 32))):
    model = pipeline.quantize_model(loaded.model, Recipe("w8", "w8", (Rule(rules.BLOCK_LINEARS, config),)),
                                    progress=False)
    figures = evaluate.compare_to_reference(model, loaded.model, windows, progress=False)
    weight_rows.append({"weights": label, **figures})
    print(json.dumps(weight_rows[-1]), flush=True)
  results = common.RESULTS
  results.mkdir(parents=True, exist_ok=True)
  (results / "w8a8_layers.json").write_text(json.dumps({**common.provenance(), "activations": rows,
                                                        "weights": weight_rows}, indent=1))
  lines = ["| int8 activations at | activation scales | ppl alice29 | vs fp | KL | top-1 |", "|---|---|---|---|---|---|"]
  for row in rows:
    change = 100 * (row["perplexity"] / row["ref_perplexity"] - 1)
    lines.append(f"| {row['activations_quantized_at']} | {row['mode']} | {row['perplexity']:.2f} | {change:+.2f}% "
                 f"| {row['kl']:.4f} | {row['top1']:.3f} |")
  lines += ["", "| int8 weights only, grouping | ppl alice29 | vs fp | KL | top-1 |", "|---|---|---|---|---|"]
  for row in weight_rows:
    change = 100 * (row["perplexity"] / row["ref_perplexity"] - 1)
    lines.append(f"| {row['weights']} | {row['perplexity']:.2f} | {change:+.2f}% | {row['kl']:.4f} | {row['top1']:.3f} |")
  table = "\n".join(lines) + "\n"
  (results / "w8a8_layers.md").write_text(table)
  common.write_readme_region("w8a8_layers", table)
  print(table)


if __name__ == "__main__":
  main()
