"""RepQuant against naive PTQ at W4A4, W6A6, W8A8, with each RepQuant component ablated: MiniLM and SmolLM2-135M.

Both models are quantized on calibration text lcet10 (not an evaluation text): MiniLM on 32 lcet10 sentences
(encoded as at evaluation: [CLS] ... [SEP], padded), SmolLM2 on 32 windows of 128 lcet10 tokens.
Evaluation:
  MiniLM   300 alice29 sentences: mean cosine of the sentence embeddings to the float model's, and nearest-neighbour
           agreement (the fraction of sentences whose most similar other sentence, by embedding cosine, is the same
           for the quantized and the float model).
  SmolLM2  the first 2048 tokens of alice29 in 512-token windows (4 windows; ~1 min per 4096 tokens on the shared
           2-core machine, hence the short text): perplexity, KL(float || quantized) and top-1 agreement.
Every quantized linear of the blocks runs on the integer path (ops.qdot, backend xla); the softmax runs in its
inference form (log2 for RepQuant, uniform for naive). The "-norecon" row reuses the RepQuant run's calibration
with round-to-nearest weights (RepQuantResult.without_reconstruction: the same computation without the last step).
Rows are cached in experiments/results/repquant.json as they finish (rerun to continue).

  nice -n 10 .venv/bin/python experiments/repquant.py [--models minilm-l6,smollm2-135m] [--bits 4,6,8]
                                                      [--ablations noclip,nochannel,nolog,norecon,paper]

Writes experiments/results/repquant.{json,md} and the README region <!-- table:repquant begin/end -->.
  ... experiments/repquant.py --rms-zero-point   # writes experiments/results/repquant_rms.md (about 2 minutes)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import re
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments"))

import common  # noqa: E402  (experiments/common.py)

RESULTS = REPO / "experiments" / "results"
CALIB_TEXT = "lcet10"
EVAL_TEXT = "alice29"
SMOL_TOKENS = 2048
N_SENTENCES = 300
SMOL, MINI = "smollm2-135m", "minilm-l6"
ABLATIONS = ("noclip", "nochannel", "nolog", "norecon", "paper")


def calibration(loaded, n_samples: int = 32, seq_len: int = 128):
  import numpy as np

  from jaxquant import data
  if loaded.family == "bert":
    from jaxquant.sources.tokenizer import encode_batch
    sentences = data.corpus_sentences(CALIB_TEXT, n=n_samples, seed=0)
    ids, mask = encode_batch(loaded.tokenizer, sentences)
    return [(ids, mask)]
  body, source = data.load_text(CALIB_TEXT)
  ids = data.tokenize(loaded.tokenizer, body)
  return [np.asarray(b) for b in data.calibration_batches(ids, n_samples=n_samples, seq_len=seq_len, batch_size=8,
                                                          source=source)]


class Evaluator:
  """Figures of a model against the float one (float-side results computed once)."""

  def __init__(self, loaded):
    import numpy as np

    from jaxquant import data, evaluate
    self.loaded = loaded
    if loaded.family == "bert":
      from jaxquant.sources.tokenizer import encode_batch
      sentences = data.corpus_sentences(EVAL_TEXT, n=N_SENTENCES, seed=0)
      self.ids, self.mask = encode_batch(loaded.tokenizer, sentences)
      self.ref = evaluate.sentence_embeddings(loaded.model, self.ids, self.mask)
      self.ref_nn = self._neighbours(self.ref)
    else:
      self.windows = data.text_windows(loaded.tokenizer, EVAL_TEXT, 512, SMOL_TOKENS)
    self.np = np

  def _neighbours(self, emb):
    np = self.np if hasattr(self, "np") else __import__("numpy")
    sims = emb @ emb.T
    np.fill_diagonal(sims, -np.inf)
    return np.argmax(sims, axis=1)

  def __call__(self, model) -> dict:
    from jaxquant import evaluate
    np = self.np
    if self.loaded.family == "bert":
      emb = evaluate.sentence_embeddings(model, self.ids, self.mask)
      cos = np.sum(emb * self.ref, -1) / (np.linalg.norm(emb, axis=-1) * np.linalg.norm(self.ref, axis=-1))
      return {"cosine": float(np.mean(cos)), "nn_agreement": float(np.mean(self._neighbours(emb) == self.ref_nn)),
              "sentences": int(len(self.ids))}
    if model is self.loaded.model:
      ppl = evaluate.perplexity(model, self.windows, progress=False)
      return {"perplexity": ppl, "kl": 0.0, "top1": 1.0, "tokens": int(self.windows.size - len(self.windows))}
    figures = evaluate.compare_to_reference(model, self.loaded.model, self.windows, progress=False)
    return {"perplexity": figures["perplexity"], "kl": figures["kl"], "top1": figures["top1"],
            "tokens": figures["n_tokens"]}


def _load_results(path: pathlib.Path) -> dict:
  return json.loads(path.read_text()) if path.exists() else {}


def run(models, bits_list, ablations, out: pathlib.Path, overrides: dict[str, dict] | None = None) -> dict:
  from flax import nnx

  from jaxquant import formats, pipeline, recipes
  from jaxquant.methods import repquant as rq
  results = _load_results(out)
  overrides = overrides or {}

  def save():
    # Merge with what is on disk: runs of other models (other processes) write the same file.
    merged = {**_load_results(out), **results}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(merged, indent=1))
    tmp.replace(out)

  for name in models:
    loaded = pipeline.load(name)
    evaluator = Evaluator(loaded)
    calib = calibration(loaded)
    key = f"{name}:fp"
    if key not in results:
      results[key] = {"model": name, "recipe": "fp", **evaluator(loaded.model),
                      "block_bytes": formats.tree_nbytes(nnx.state(loaded.model.layers)), **common.provenance()}
      save()
    for bits in bits_list:
      todo = [f"naive-w{bits}a{bits}", f"repquant-w{bits}a{bits}"] + [f"repquant-w{bits}a{bits}-{a}"
                                                                       for a in ablations if a != "norecon"]
      for recipe_name in todo:
        key = f"{name}:{recipe_name}"
        if key in results:
          norecon_key = f"{name}:repquant-w{bits}a{bits}-norecon"
          if not (recipe_name == f"repquant-w{bits}a{bits}" and "norecon" in ablations
                  and norecon_key not in results):
            continue
        recipe = recipes.get_recipe(recipe_name)
        print(f"== {key}", flush=True)
        start, cpu_start = time.perf_counter(), time.process_time()
        extra_rows = {}
        if isinstance(recipe.procedure, rq.RepQuantProcedure):
          config = dataclasses.replace(recipe.procedure.config, **overrides.get(name, {}))
          result = rq.repquant_quantize(loaded.model, calib, config, progress=True)
          model = result.model
          details = {"blocks": [dataclasses.asdict(b) for b in result.blocks], "calibration_samples": result.samples,
                     "config": dataclasses.asdict(config)}
          if result.without_reconstruction is not None and recipe_name == f"repquant-w{bits}a{bits}":
            extra_rows[f"{name}:repquant-w{bits}a{bits}-norecon"] = result.without_reconstruction
        else:
          model = recipe.procedure(loaded.model, recipe, calib, progress=False)
          details = {}
        seconds = time.perf_counter() - start
        # CPU seconds of this process (all threads): on a shared machine wall time also counts other jobs' load.
        cpu_seconds = time.process_time() - cpu_start
        figures = evaluator(model)
        results[key] = {"model": name, "recipe": recipe_name, "quantize_seconds": seconds,
                        "quantize_cpu_seconds": cpu_seconds, "load_average": list(__import__("os").getloadavg()),
                        **figures,
                        "block_bytes": formats.tree_nbytes(nnx.state(model.layers)), **details,
                        **common.provenance()}
        print(f"   {key}: {figures} ({seconds:.0f} s)", flush=True)
        save()
        for extra_key, extra_model in extra_rows.items():
          if "norecon" in ablations:
            results[extra_key] = {"model": name, "recipe": extra_key.split(":")[1], "quantize_seconds": None,
                                  **evaluator(extra_model), "config": details["config"],
                                  "block_bytes": formats.tree_nbytes(nnx.state(extra_model.layers)),
                                  **common.provenance()}
            print(f"   {extra_key}: {results[extra_key]}", flush=True)
            save()
  return results


LABELS = {"noclip": "RepQuant without dual clipping (min/max bounds)",
          "nochannel": "RepQuant without per-channel + reparameterization (layer-wise bounds)",
          "nolog": "RepQuant without log-sqrt2/log2 softmax (uniform)",
          "norecon": "RepQuant without weight reconstruction (round-to-nearest weights)",
          "paper": "RepQuant as RepQ-ViT (weight scales and biases reconstructed on float block inputs, softmax "
                   "step 1)"}


def _label(recipe: str) -> str:
  if recipe == "fp":
    return "full precision"
  m = re.fullmatch(r"(naive|repquant)-w(\d)a\d(?:-(\w+))?", recipe)
  kind, bits, ablation = m.group(1), m.group(2), m.group(3)
  if kind == "naive":
    return f"W{bits}A{bits} naive PTQ (per-tensor act., uniform softmax)"
  return f"W{bits}A{bits} " + (LABELS[ablation] if ablation else "**RepQuant** (all components)")


def _order(recipe: str) -> tuple:
  if recipe == "fp":
    return (0,)
  m = re.fullmatch(r"(naive|repquant)-w(\d)a\d(?:-(\w+))?", recipe)
  ablation = m.group(3)
  return (1, int(m.group(2)), 0 if m.group(1) == "naive" else 1,
          -1 if ablation is None else list(LABELS).index(ablation))


def _seconds(row: dict) -> str:
  """Wall seconds of the quantization, and its process CPU seconds where recorded."""
  if not row.get("quantize_seconds"):
    return "-"
  cpu = row.get("quantize_cpu_seconds")
  return f"{row['quantize_seconds']:.0f}" + (f" ({cpu:.0f} CPU)" if cpu else "")


def _note(rows: list[dict]) -> str:
  """The footnote: how the seconds were taken (the load average each timed row recorded as it finished)."""
  loads = [r["load_average"][0] for r in rows if r.get("load_average")]
  load = f" (1-minute load average {min(loads):.1f}-{max(loads):.1f} as they finished)" if loads else ""
  return ("quantize s: wall seconds of calibration and reconstruction, rows run one after another on the 2-core "
          f"machine{load}, with the process's CPU seconds in brackets; the \"without weight reconstruction\" rows "
          "reuse the full run's calibration (no separate time). Every quantized linear runs on the integer path; "
          "block MiB counts packed codes, scales, biases and folded norm parameters.")


def table(results: dict) -> str:
  lines = []
  mini = sorted((r for r in results.values() if r["model"] == MINI), key=lambda r: _order(r["recipe"]))
  smol = sorted((r for r in results.values() if r["model"] == SMOL), key=lambda r: _order(r["recipe"]))
  if mini:
    n = mini[0].get("sentences", N_SENTENCES)
    budget = next((r["config"] for r in mini if r.get("config")), None)
    budget_text = (f"; RepQuant budget: {budget['clip_steps']} clipping steps on {budget['clip_tokens']} tokens, "
                   f"{budget['recon_steps']} reconstruction steps a block" if budget else "")
    lines += [f"all-MiniLM-L6-v2, {n} alice29 sentences (calibration: 32 lcet10 sentences{budget_text})", "",
              "| model | cosine to fp | nearest-neighbour agreement | quantize s | block MiB |",
              "|---|---:|---:|---:|---:|"]
    for r in mini:
      secs = _seconds(r)
      lines.append(f"| {_label(r['recipe'])} | {r['cosine']:.4f} | {r['nn_agreement']:.3f} | {secs} | "
                   f"{r['block_bytes'] / 2**20:.2f} |")
    lines.append("")
  if smol:
    tokens = smol[0].get("tokens")
    budget = next((r["config"] for r in smol if r.get("config")), None)
    budget_text = (f"; RepQuant budget: {budget['clip_steps']} clipping steps on {budget['clip_tokens']} tokens, "
                   f"{budget['recon_steps']} reconstruction steps a block" if budget else "")
    if budget and not budget.get("calibrate_softmax", False):
      budget_text += ", softmax step 1 (not calibrated)"
    lines += [f"SmolLM2-135M, first {SMOL_TOKENS} tokens of alice29 ({tokens} predicted tokens, 512-token windows; "
              "calibration: 32 x 128 lcet10 tokens" + budget_text + ")", "",
              "| model | perplexity | KL to fp (nats) | top-1 agreement | quantize s | block MiB |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in smol:
      secs = _seconds(r)
      lines.append(f"| {_label(r['recipe'])} | {r['perplexity']:.2f} | {r['kl']:.4f} | {r['top1']:.3f} | {secs} | "
                   f"{r['block_bytes'] / 2**20:.2f} |")
  lines += ["", _note(mini + smol)]
  return "\n".join(lines).rstrip() + "\n"


def write_outputs(results: dict) -> str:
  md = table(results)
  (RESULTS / "repquant.md").write_text(md)
  common.write_readme_region("repquant", md)
  return md


def rms_zero_point(n_layers: int = 4) -> str:
  """The measurement behind RMSNorm's zero-point choice: next-layer output MSE of per-channel quantization of
  SmolLM2's attn_norm / mlp_norm outputs (min/max bounds), asymmetric (what the norm bias allows) against symmetric
  (r2 = 0, no norm bias), on 32 x 128 lcet10 tokens (4096 of them), first n_layers blocks."""
  import jax.numpy as jnp

  from jaxquant import pipeline
  from jaxquant.methods import repquant as rq
  from jaxquant.methods import repquant_core as core
  from jaxquant.models import surgery
  loaded = pipeline.load(SMOL, n_layers=n_layers)
  tokens = __import__("numpy").concatenate(calibration(loaded))
  x = loaded.model.embed_tokens(jnp.asarray(tokens))
  lines = ["| block input | W4 asymmetric | W4 symmetric | ratio | W6 asymmetric | W6 symmetric | ratio |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  for i, block in enumerate(loaded.model.layers):
    y, acts = rq.capture_inputs(block, x, (), rq.input_groups(block), 8)
    for group in rq.input_groups(block):
      if group.norm is None:
        continue
      a = acts[group.name].reshape(-1, acts[group.name].shape[-1])[:4096]
      kernel = jnp.concatenate([surgery.get(block, p).kernel.get_value() for p in group.linears], axis=1)
      target = a @ kernel
      cells = []
      for bits in (4, 6):
        lo, hi = core.init_bounds(a, True)
        asym = float(core.clip_loss((lo, hi), a, kernel, target, bits))
        half = 1 << (bits - 1)
        bound = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
        scale = bound / (half - 1)
        xq = (core.channel_codes(a, scale, jnp.full_like(scale, float(half)), bits) - half) * scale[None, :]
        sym = float(jnp.mean(jnp.square(xq @ kernel - target)))
        cells += [f"{asym:.4g}", f"{sym:.4g}", f"{sym / asym:.2f}x"]
      lines.append(f"| layers.{i}.{group.name} | " + " | ".join(cells) + " |")
      print(lines[-1], flush=True)
    x = y
  text = ("Next-layer output MSE of per-channel quantized RMSNorm outputs, SmolLM2-135M, min/max bounds, 4096 lcet10 "
          "tokens:\n\n" + "\n".join(lines) + "\n")
  (RESULTS / "repquant_rms.md").write_text(text)
  return text


def time_minilm(recipes: list[str]) -> str:
  """Calibration + reconstruction seconds of MiniLM alone (the issue's 10-minute bound), one recipe after another
  in this process, with the load average beside each: the table's seconds were taken while other jobs ran."""
  import os

  from jaxquant import pipeline
  from jaxquant.methods import repquant as rq
  from jaxquant.recipes import get_recipe
  loaded = pipeline.load(MINI)
  calib = calibration(loaded)
  rows = []
  for name in recipes:
    recipe = get_recipe(name)
    start, cpu_start = time.perf_counter(), time.process_time()
    rq.repquant_quantize(loaded.model, calib, recipe.procedure.config, progress=False)
    rows.append({"recipe": name, "seconds": time.perf_counter() - start,
                 "cpu_seconds": time.process_time() - cpu_start, "load_average": list(os.getloadavg())})
    print(json.dumps(rows[-1]), flush=True)
  (RESULTS / "repquant_time.json").write_text(json.dumps(rows, indent=1))
  lines = ["| recipe | calibration + reconstruction s (wall) | CPU s | load average (1 min) |", "|---|---|---|---|"]
  lines += [f"| `{r['recipe']}` | {r['seconds']:.0f} | {r['cpu_seconds']:.0f} | {r['load_average'][0]:.1f} |"
            for r in rows]
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", default=f"{MINI},{SMOL}")
  parser.add_argument("--bits", default="4,6,8")
  parser.add_argument("--ablations", default=",".join(ABLATIONS))
  parser.add_argument("--table-only", action="store_true", help="rewrite the table from the cached JSON")
  parser.add_argument("--rms-zero-point", action="store_true",
                      help="only the RMSNorm zero-point measurement (asymmetric + norm bias vs symmetric)")
  parser.add_argument("--smol-budget", default="clip_steps=20,recon_steps=20,clip_tokens=512,calibrate_softmax=False",
                      help="RepQuantConfig overrides for SmolLM2 (30 blocks on a shared 2-core CPU; the calibrated "
                           "softmax step nearly tripled the time of a W4A4 run for no gain); '' = defaults")
  parser.add_argument("--time-minilm", action="store_true",
                      help="only time MiniLM's calibration + reconstruction (repquant-w4a4, -w6a6, -w8a8)")
  args = parser.parse_args()
  out = RESULTS / "repquant.json"
  if args.time_minilm:
    print(time_minilm(["repquant-w4a4", "repquant-w6a6", "repquant-w8a8"]))
    return
  if args.rms_zero_point:
    print(rms_zero_point())
    return
  if args.table_only:
    results = _load_results(out)
  else:
    ablations = tuple(a for a in args.ablations.split(",") if a)
    smol = common.parse_settings(args.smol_budget)
    run(args.models.split(","), [int(b) for b in args.bits.split(",")], ablations, out, {SMOL: smol})
    results = _load_results(out)  # every model's rows, including other processes' runs
  print(write_outputs(results))


if __name__ == "__main__":
  main()
