"""Regenerate README's W8A8 table: SmolLM2-135M (perplexity, KL, top-1) and MiniLM (embedding cosine).

Each recipe's quantization runs in its own process under /usr/bin/time -v (`jaxquant quantize ... --json`), so
its wall time and peak memory are measured alone; evaluation then runs here against the float model.

  .venv/bin/python experiments/zeroquant_w8a8.py            # full table (about 25 min on 2 cores)
  .venv/bin/python experiments/zeroquant_w8a8.py --quick    # 2048 tokens of each text
  .venv/bin/python experiments/zeroquant_w8a8.py --models minilm-l6 --recipes w8a8-per-tensor --merge
                                                            # (re)measure some rows, keep the others
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments"))

import common  # noqa: E402  (experiments/common.py)
RESULTS = common.RESULTS


def measured_quantize(model: str, recipe: str, out: pathlib.Path) -> dict:
  """Run `jaxquant quantize` in a fresh process under /usr/bin/time -v: its JSON plus the peak RSS."""
  return common.measured_run(["-m", "jaxquant.cli", "quantize", model, "--recipe", recipe, "--out", str(out),
                              "--overwrite", "--json", "--quiet"])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="2048 tokens of each text, fewer sentences")
  parser.add_argument("--recipes", nargs="*",
                      default=["fp", "w8a8-per-tensor", "zeroquant-w8a8", "zeroquant-w8a8-kgroup",
                               "zeroquant-w8a8-kgroup-g64"])
  parser.add_argument("--models", nargs="*", default=["smollm2-135m", "minilm-l6"])
  parser.add_argument("--merge", action="store_true",
                      help="replace or add only the rows measured now in results/zeroquant_w8a8.json, in the "
                           "table's order, each row recording the commit it was measured at")
  args = parser.parse_args()

  from jaxquant import checkpoint, pipeline
  from jaxquant.measure import evaluate_loaded

  max_tokens = {"alice29": 2048 if args.quick else 4096, "asyoulik": 2048 if args.quick else 4096}
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for family, model_name in (("llama", "smollm2-135m"), ("bert", "minilm-l6")):
      if model_name not in args.models:
        continue
      loaded = pipeline.load(model_name)
      for recipe in args.recipes:
        out = pathlib.Path(tmp) / f"{model_name}-{recipe}"
        quant = measured_quantize(model_name, recipe, out)
        model = checkpoint.restore(out, loaded.model)
        row = {"model": model_name, "recipe": recipe, "quantize": quant, **common.provenance()}
        if family == "llama":
          for text in ("alice29", "asyoulik"):
            row[text] = evaluate_loaded(loaded, model, text, max_tokens[text], 512, progress=False)
        else:
          row["sentences"] = evaluate_loaded(loaded, model, "alice29", None, 512,
                                             sentences=100 if args.quick else 300, progress=False)
        rows.append(row)
        print(json.dumps(row), flush=True)

  RESULTS.mkdir(parents=True, exist_ok=True)
  if args.merge:
    rows = merge_rows(json.loads((RESULTS / "zeroquant_w8a8.json").read_text()), rows)
  (RESULTS / "zeroquant_w8a8.json").write_text(json.dumps(rows, indent=1))
  table = render(rows, args.quick)
  (RESULTS / "zeroquant_w8a8.md").write_text(table)
  if not args.quick:
    common.write_readme_region("w8a8", table)
  print(table)


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
  """old rows with those of new (same model and recipe) replaced or added; models, then recipes, in the order of
  the full table."""
  order = ["fp", "w8a8-per-tensor", "zeroquant-w8a8", "zeroquant-w8a8-kgroup", "zeroquant-w8a8-kgroup-g64"]
  merged = {(row["model"], row["recipe"]): row for row in old}
  merged.update({(row["model"], row["recipe"]): row for row in new})
  key = lambda item: (["smollm2-135m", "minilm-l6"].index(item[0][0]),
                      order.index(item[0][1]) if item[0][1] in order else len(order))
  return [row for _, row in sorted(merged.items(), key=key)]


def render(rows: list[dict], quick: bool) -> str:
  fp = {row["model"]: row for row in rows if row["recipe"] == "fp"}
  lines = ["| model | recipe | ppl alice29 | ppl asyoulik | KL (alice29) | top-1 (alice29) | embedding cosine "
           "| block weights MB | whole model MB | quantize s | peak RSS GiB |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for row in rows:
    quant, base = row["quantize"], fp.get(row["model"])
    figures = row.get("alice29") or row["sentences"]
    size = f"{figures['block_bytes'] / 1e6:.1f} | {figures['weight_bytes'] / 1e6:.1f}"
    cells = [row["model"], f"`{row['recipe']}`"]
    if "alice29" in row:
      for text in ("alice29", "asyoulik"):
        ppl = row[text]["perplexity"]
        ref = base[text]["perplexity"] if base else ppl
        cells.append(f"{ppl:.2f} ({100 * (ppl / ref - 1):+.1f}%)")
      cells += [f"{row['alice29']['kl']:.4f}", f"{row['alice29']['top1_agreement']:.3f}", "-"]
    else:
      cells += ["-", "-", "-", "-", f"{row['sentences']['embedding_cosine']:.4f}"]
    cells += [size, f"{quant['process_wall_seconds']:.1f}", f"{quant['peak_rss_bytes'] / 2**30:.2f}"]
    lines.append("| " + " | ".join(cells) + " |")
  note = ("alice29 (from \"CHAPTER I\") and asyoulik: first 4096 tokens each, 8 windows of 512, no BOS. "
          "MiniLM: mean cosine to the float embeddings of 300 alice29 sentences. "
          if not quick else "quick run: 2048 tokens of each text. ")
  later = [f"{row['model']} `{row['recipe']}`" for row in rows if row.get("commit")]
  if later and len(later) < len(rows):
    commits = sorted({row["commit"] for row in rows if row.get("commit")})
    note += (f"Measured later, at commit {', '.join(commits)}: {', '.join(later)} (added with --merge; the other "
             f"rows come from the full run before it). ")
  lines.append("")
  lines.append(note + "Stored MB counts the arrays really held (packed codes, scales, static activation scales; "
               "block weights = the 30 (6) transformer blocks the recipes quantize; whole model adds the float32 "
               "embeddings and, for SmolLM2, a float32 copy of the tied embedding as output head). Quantize seconds and peak RSS: the whole `jaxquant quantize` process (model load "
               "included, fetch excluded) under /usr/bin/time -v. Regenerate: "
               "`.venv/bin/python experiments/zeroquant_w8a8.py`.")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
