"""ZeroQuant W4/8 with and without layer-by-layer knowledge distillation (LKD): SmolLM2-135M and MiniLM.

Every quantization runs in its own process under /usr/bin/time -v (`experiments/zeroquant.py quantize ...`,
which loads the model, builds the LKD data, quantizes, saves the checkpoint), so its wall time and peak memory
are its own; evaluation then runs here against the float model. LKD calibrates on lcet10 (not an evaluation
text); the data-free rows use no text at all. Finished rows are cached (--cache), so an interrupted run goes on
where it stopped.

  .venv/bin/python experiments/zeroquant.py                 # everything (several hours on 2 shared cores)
  .venv/bin/python experiments/zeroquant.py --only smollm2-135m:zeroquant-w48a16-lkd
  .venv/bin/python experiments/zeroquant.py quantize smollm2-135m zeroquant-w48a16-lkd /tmp/out [--layers 4]
  .venv/bin/python experiments/zeroquant.py lr-sweep        # learning rates on the first 4 blocks (~20 min)

Writes experiments/results/zeroquant.json and zeroquant.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import re
import resource
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments"))

import common  # noqa: E402  (experiments/common.py)

RESULTS = REPO / "experiments" / "results"
CALIB_TEXT = "lcet10"
EVAL_TOKENS = 4096

# (model, recipe, LKD steps override or None)
SMOL = "smollm2-135m"
MINI = "minilm-l6"
# (zeroquant-w8a8 is in README's W8A8 table, experiments/zeroquant_w8a8.py)
ROWS = [(SMOL, "fp", None), (SMOL, "zeroquant-w48a16", None),
        (SMOL, "zeroquant-w48a16-lkd", None), (SMOL, "zeroquant-w48a8", None), (SMOL, "zeroquant-w48a8-lkd", None),
        (SMOL, "zeroquant-w4a16", None), (SMOL, "zeroquant-w4a16-lkd", None), (SMOL, "zeroquant-w48a16-lkd-datafree", None),
        (SMOL, "zeroquant-w48a16-lkd-random", None),
        (SMOL, "zeroquant-w48a16-lkd", 25), (SMOL, "zeroquant-w48a16-lkd", 100),
        (MINI, "fp", None), (MINI, "zeroquant-w48a16", None),
        (MINI, "zeroquant-w48a16-lkd", None), (MINI, "zeroquant-w48a8", None), (MINI, "zeroquant-w48a8-lkd", None),
        (MINI, "zeroquant-w4a16", None), (MINI, "zeroquant-w4a16-lkd", None),
        (MINI, "zeroquant-w48a16-lkd-datafree", None)]
# Peak memory of LKD against depth: the default recipe on the first 4 blocks and on all 30, 5 steps a block (the
# arrays alive during a step do not depend on how many steps there are); the float model loaded whole, and
# streamed from disk a block at a time. (model, recipe, layers, steps, stream)
MEMORY_ROWS = [(SMOL, "zeroquant-w48a16-lkd", 4, 5, False), (SMOL, "zeroquant-w48a16-lkd", 30, 5, False),
               (SMOL, "zeroquant-w48a16-lkd", 4, 5, True), (SMOL, "zeroquant-w48a16-lkd", 30, 5, True)]


def _key(model: str, recipe: str, steps: int | None, layers: int | None = None, stream: bool = False) -> str:
  return (f"{model}:{recipe}" + (f":steps{steps}" if steps else "") + (f":layers{layers}" if layers else "")
          + (":stream" if stream else ""))


# ---------------------------------------------------------------------------------------------------------------
# the measured child process


def _status_bytes(field: str) -> int:
  """VmRSS / VmHWM of this process, from /proc/self/status."""
  return int(re.search(rf"{field}:\s+(\d+) kB", pathlib.Path("/proc/self/status").read_text()).group(1)) * 1024


def _reset_peak_rss() -> bool:
  """Start VmHWM again from the current RSS (Linux clear_refs 5), so the quantization phase's own peak can be
  read apart from the model load's."""
  try:
    pathlib.Path("/proc/self/clear_refs").write_text("5")
    return True
  except OSError:
    return False


def quantize_main(argv: list[str]) -> None:
  """Child process: load, quantize (LKD data built here), save; print one JSON line."""
  parser = argparse.ArgumentParser(prog="zeroquant.py quantize")
  parser.add_argument("model")
  parser.add_argument("recipe")
  parser.add_argument("out")
  parser.add_argument("--layers", type=int, default=None)
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--stream", action="store_true",
                      help="read the float model block by block from disk (jaxquant.streaming) instead of loading it")
  args = parser.parse_args(argv)
  if args.stream:
    stream_main(args)
    return

  from flax import nnx

  from jaxquant import checkpoint, formats, pipeline, recipes
  from jaxquant.measure import calibration_batches
  from jaxquant.methods import lkd

  start = time.perf_counter()
  loaded = pipeline.load(args.model, n_layers=args.layers)
  load_seconds = time.perf_counter() - start
  recipe = recipes.get_recipe(args.recipe)
  result = {"model": args.model, "recipe": args.recipe, "layers": len(loaded.model.layers),
            "load_seconds": load_seconds, "rss_after_load_bytes": _status_bytes("VmRSS")}
  phase_peak = _reset_peak_rss()
  start = time.perf_counter()
  if isinstance(recipe.procedure, lkd.LKDProcedure):
    if args.steps:
      recipe = lkd.with_lkd_options(recipe, steps=args.steps)
    config = recipe.procedure.config
    calibration = (lkd.calibration_from_text(loaded.tokenizer, CALIB_TEXT, config)
                   if config.data == "calibration" else None)
    run = lkd.lkd_quantize(loaded.model, recipe.rules, calibration, config, progress=False)
    model = run.model
    result.update(lkd_config=dataclasses.asdict(config), lkd_blocks=[dataclasses.asdict(b) for b in run.blocks],
                  lkd_samples=list(run.samples), lkd_compilations=run.compilations)
  else:
    calibration = calibration_batches(loaded, CALIB_TEXT, 8, 512) if recipe.needs_calibration else None
    model = pipeline.quantize_model(loaded.model, recipe, calibration, progress=False)
  import jax
  jax.block_until_ready(jax.tree_util.tree_leaves(nnx.state(model)))
  result["quantize_seconds"] = time.perf_counter() - start
  # peak RSS from the end of the load to the end of quantization (LKD data, LKD), the save excluded
  result["quantize_phase_peak_rss_bytes"] = _status_bytes("VmHWM") if phase_peak else None
  result["weight_bytes"] = formats.tree_nbytes(nnx.state(model))
  result["fp_weight_bytes"] = formats.tree_nbytes(nnx.state(loaded.model))
  result["block_fp_bytes"] = formats.tree_nbytes(nnx.state(loaded.model.layers))
  result["block_stored_bytes"] = formats.tree_nbytes(nnx.state(model.layers))
  checkpoint.save(args.out, model, recipe_name=args.recipe, source=loaded.source, overwrite=True)
  result["self_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  print(json.dumps(result), flush=True)


def stream_main(args) -> None:
  """Child process, --stream: LKD reading the float model a block at a time from its GGUF file, each quantized
  block written as it is done (streaming.stream_quantize); print one JSON line. Nothing is loaded whole, so
  rss_after_load_bytes is the process before quantizing (libraries, tokenizer, calibration tokens)."""
  from flax import nnx

  from jaxquant import assets, formats, recipes, streaming
  from jaxquant.methods import lkd

  recipe = recipes.get_recipe(args.recipe)
  if args.steps:
    recipe = lkd.with_lkd_options(recipe, steps=args.steps)
  source = assets.resolve_model(args.model)[1]
  config = recipe.procedure.config
  calibration = (lkd.calibration_from_text(streaming.source_tokenizer(source), CALIB_TEXT, config)
                 if config.data == "calibration" else None)
  result = {"model": args.model, "recipe": args.recipe, "stream": True, "rss_after_load_bytes": _status_bytes("VmRSS")}
  phase_peak = _reset_peak_rss()
  report = streaming.stream_quantize(source, args.out, recipe, calibration=calibration, n_layers=args.layers,
                                     overwrite=True, progress=False)
  # peak RSS of LKD from disk, writing each block as it goes (the save is part of the loop)
  result["quantize_phase_peak_rss_bytes"] = _status_bytes("VmHWM") if phase_peak else None
  from jaxquant.models.llama import LlamaConfig, abstract_llama
  template = abstract_llama(LlamaConfig(**report.config))  # shapes only
  result.update(layers=len(template.layers), quantize_seconds=report.seconds, lkd_config=dataclasses.asdict(config),
                lkd_blocks=report.lkd_blocks, weight_bytes=report.stored_bytes, read_bytes=report.read_bytes,
                block_fp_bytes=formats.tree_nbytes(nnx.state(template.layers)),
                block_stored_bytes=sum(n for part, n in report.part_bytes.items() if part.startswith("layers.")))
  result["self_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  print(json.dumps(result), flush=True)


def measured_quantize(model: str, recipe: str, out: pathlib.Path, steps: int | None = None,
                      layers: int | None = None, stream: bool = False) -> dict:
  """`quantize_main` in a fresh process under /usr/bin/time -v: its JSON plus wall time and peak RSS."""
  args = [str(pathlib.Path(__file__).resolve()), "quantize", model, recipe, str(out)]
  if steps:
    args += ["--steps", str(steps)]
  if layers:
    args += ["--layers", str(layers)]
  if stream:
    args += ["--stream"]
  return common.measured_run(args)


# ---------------------------------------------------------------------------------------------------------------
# the table


def run_row(model_name: str, recipe: str, steps: int | None, layers: int | None, loaded_cache: dict,
            tmp: pathlib.Path, evaluate_it: bool = True, stream: bool = False) -> dict:
  from jaxquant import assets, checkpoint, pipeline
  from jaxquant.measure import evaluate_loaded

  out = tmp / _key(model_name, recipe, steps, layers, stream).replace(":", "_")
  quant = measured_quantize(model_name, recipe, out, steps, layers, stream)
  # provenance: the table script's commit and command (quant["command"] is the measured quantize process)
  row = {"model": model_name, "recipe": recipe, "steps": steps, "layers": layers, "stream": stream,
         "quantize": quant, **common.provenance()}
  if evaluate_it and layers is None:
    if model_name not in loaded_cache:
      loaded_cache.clear()
      loaded_cache[model_name] = pipeline.load(model_name)
    loaded = loaded_cache[model_name]
    model = checkpoint.restore(out, loaded.model)
    if loaded.family in assets.DECODER_FAMILIES:
      for text in ("alice29", "asyoulik"):
        row[text] = evaluate_loaded(loaded, model, text, EVAL_TOKENS, 512, progress=False)
    else:
      row["sentences"] = evaluate_loaded(loaded, model, "alice29", None, 512, sentences=300, progress=False)
  import shutil
  shutil.rmtree(out, ignore_errors=True)
  return row


LR_SWEEP = [(5e-6, "constant"), (2e-5, "constant"), (1e-4, "constant"), (3e-4, "constant"), (3e-4, "cosine"),
            (1e-3, "constant")]


def lr_sweep_main(argv: list[str]) -> None:
  """Learning rate study on the first 4 blocks of SmolLM2 (W4/8A16, LKD budget otherwise): KL and top-1 of the
  quantized 4-block slice to its float version on alice29 (2048 tokens), and each block's quantized output MSE."""
  parser = argparse.ArgumentParser(prog="zeroquant.py lr-sweep")
  parser.add_argument("--layers", type=int, default=4)
  args = parser.parse_args(argv)
  from jaxquant import data, evaluate, pipeline, recipes
  from jaxquant.methods import lkd
  from jaxquant.methods.zeroquant import W48A16

  loaded = pipeline.load(SMOL, n_layers=args.layers)
  text, source = data.load_text("alice29")
  windows = data.eval_windows(data.tokenize(loaded.tokenizer, text), 512, 2048, source=source)
  rtn = pipeline.quantize_model(loaded.model, recipes.get_recipe("zeroquant-w48a16"), progress=False)
  base = evaluate.compare_to_reference(rtn, loaded.model, windows, progress=False)
  rows = [{"learning_rate": None, "schedule": "round-to-nearest", "kl": base["kl"], "top1": base["top1"]}]
  for lr, schedule in LR_SWEEP:
    config = dataclasses.replace(lkd.BUDGET, learning_rate=lr, schedule=schedule, keep_best=False)
    calibration = lkd.calibration_from_text(loaded.tokenizer, CALIB_TEXT, config)
    start = time.perf_counter()
    run = lkd.lkd_quantize(loaded.model, W48A16, calibration, config, progress=False)
    seconds = time.perf_counter() - start
    figures = evaluate.compare_to_reference(run.model, loaded.model, windows, progress=False)
    rows.append({"learning_rate": lr, "schedule": schedule, "kl": figures["kl"], "top1": figures["top1"],
                 "seconds": seconds, "mse_rtn": [b.mse_rtn for b in run.blocks],
                 "mse_lkd": [b.mse_lkd for b in run.blocks]})
    print(json.dumps(rows[-1]), flush=True)
  RESULTS.mkdir(parents=True, exist_ok=True)
  (RESULTS / "zeroquant.lr.json").write_text(json.dumps({"layers": args.layers, "rows": rows}, indent=1))


def main() -> None:
  if len(sys.argv) > 1 and sys.argv[1] == "quantize":
    quantize_main(sys.argv[2:])
    return
  if len(sys.argv) > 1 and sys.argv[1] == "lr-sweep":
    lr_sweep_main(sys.argv[2:])
    return
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--only", nargs="*", default=None, help="row keys model:recipe[:stepsN] to (re)run")
  parser.add_argument("--cache", default="/tmp/jaxquant-zeroquant-rows.jsonl",
                      help="finished rows (JSON lines); rows found there are not rerun")
  parser.add_argument("--no-memory", action="store_true", help="skip the 4-block memory runs")
  args = parser.parse_args()

  cache_path = pathlib.Path(args.cache)
  done = {}
  if cache_path.exists():
    for line in cache_path.read_text().splitlines():
      row = json.loads(line)
      done[_key(row["model"], row["recipe"], row["steps"], row["layers"], row.get("stream", False))] = row
  todo = [(m, r, s, None, False) for m, r, s in ROWS]
  if not args.no_memory:
    todo += [(m, r, steps, layers, stream) for m, r, layers, steps, stream in MEMORY_ROWS]
  loaded_cache: dict = {}
  with tempfile.TemporaryDirectory() as tmp:
    for model_name, recipe, steps, layers, stream in todo:
      key = _key(model_name, recipe, steps, layers, stream)
      if args.only is not None and key not in args.only:
        continue
      if key in done and args.only is None:
        continue
      print(f"[{time.strftime('%H:%M:%S')}] {key} ...", flush=True)
      row = run_row(model_name, recipe, steps, layers, loaded_cache, pathlib.Path(tmp), stream=stream)
      done[key] = row
      with cache_path.open("a") as f:
        f.write(json.dumps(row) + "\n")
      print(json.dumps({k: v for k, v in row.items() if k != "quantize"}), flush=True)

  rows = [done[_key(m, r, s)] for m, r, s in ROWS if _key(m, r, s) in done]
  memory = [done[_key(m, r, s, layers, stream)] for m, r, layers, s, stream in MEMORY_ROWS
            if _key(m, r, s, layers, stream) in done]
  RESULTS.mkdir(parents=True, exist_ok=True)
  (RESULTS / "zeroquant.json").write_text(json.dumps({"rows": rows, "memory": memory}, indent=1))
  table = render(rows, memory)
  (RESULTS / "zeroquant.md").write_text(table)
  common.write_readme_region("zeroquant", table)
  print(table)


def _name(row: dict) -> str:
  steps = row["steps"] or (row["quantize"].get("lkd_config") or {}).get("steps")
  return f"`{row['recipe']}`" + (f" ({steps} steps)" if steps and "lkd" in row["recipe"] else "")


def render(rows: list[dict], memory: list[dict]) -> str:
  fp = {row["model"]: row for row in rows if row["recipe"] == "fp"}
  lines = ["| model | recipe | ppl alice29 | ppl asyoulik | KL (alice29) | top-1 (alice29) | embedding cosine "
           "| stored MB (blocks) | quantize s (process) | peak RSS GiB |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for row in rows:
    quant, base = row["quantize"], fp.get(row["model"])
    cells = [row["model"], _name(row)]
    if "alice29" in row:
      for text in ("alice29", "asyoulik"):
        ppl = row[text]["perplexity"]
        ref = base[text]["perplexity"] if base else ppl
        cells.append(f"{ppl:.2f} ({100 * (ppl / ref - 1):+.1f}%)")
      cells += [f"{row['alice29']['kl']:.4f}", f"{row['alice29']['top1_agreement']:.3f}", "-"]
    else:
      cells += ["-", "-", "-", "-", f"{row['sentences']['embedding_cosine']:.4f}"]
    cells += [f"{quant['weight_bytes'] / 1e6:.1f} ({quant['block_stored_bytes'] / 1e6:.1f})",
              f"{quant['quantize_seconds']:.0f} ({quant['process_wall_seconds']:.0f})",
              f"{quant['peak_rss_bytes'] / 2**30:.2f}"]
    lines.append("| " + " | ".join(cells) + " |")
  lines.append("")
  lines += gap_lines(rows)
  lines += memory_lines(rows, memory)
  lines += lr_lines()
  lines.append("")
  lines.append(
      f"Perplexity on the first {EVAL_TOKENS} tokens of alice29 (from \"CHAPTER I\") and of asyoulik, windows of "
      "512, no BOS; KL(fp || quantized) and top-1 agreement on alice29; MiniLM: mean cosine of 300 alice29 sentence "
      "embeddings to full precision. LKD calibrates on lcet10 (random windows); `-datafree` trains on sequences "
      "sampled from the float SmolLM2 (MiniLM, which cannot generate: random tokens), `-random` on uniform random "
      "tokens. Stored MB: every array of the model (embeddings and norms float32, packed codes and scales), the "
      "blocks' share in brackets. Quantize seconds: LKD data + quantization (LKD included); in brackets, and peak "
      "RSS: the whole quantizing process (model load, LKD data, LKD, save) under /usr/bin/time -v, on the shared "
      "2-core machine. Regenerate: "
      "`.venv/bin/python experiments/zeroquant.py`.")
  return "\n".join(lines) + "\n"


def gap_lines(rows: list[dict]) -> list[str]:
  """Per LKD row on SmolLM2: the share of its round-to-nearest recipe's perplexity gap to fp that LKD closes."""
  by = {(r["model"], r["recipe"], r["steps"]): r for r in rows}
  fp = by.get((SMOL, "fp", None))
  if not fp:
    return []
  out = ["Share of the round-to-nearest perplexity gap (same recipe without LKD, minus fp) that LKD closes on "
         f"SmolLM2, by recipe, data and step budget (default: {lkd_budget_text()}):", "",
         "| recipe | round-to-nearest baseline | gap closed, alice29 | gap closed, asyoulik | KL (alice29): RTN -> LKD "
         "| LKD s (process) |", "|---|---|---|---|---|---|"]
  order = lambda item: (item[0][1], item[1]["steps"] or lkd_default_steps())
  for (model, recipe, steps), row in sorted(by.items(), key=order):
    if model != SMOL or "-lkd" not in recipe:
      continue
    baseline = recipe.split("-lkd")[0]  # zeroquant-w48a16-lkd-datafree -> zeroquant-w48a16
    rtn = by.get((SMOL, baseline, None))
    if rtn is None:
      continue
    cells = [_name(row), f"`{baseline}`"]
    for text in ("alice29", "asyoulik"):
      gap = rtn[text]["perplexity"] - fp[text]["perplexity"]
      cells.append(f"{100 * (rtn[text]['perplexity'] - row[text]['perplexity']) / gap:.0f}%")
    cells.append(f"{rtn['alice29']['kl']:.3f} -> {row['alice29']['kl']:.3f}")
    cells.append(f"{row['quantize']['process_wall_seconds']:.0f}")
    out.append("| " + " | ".join(cells) + " |")
  return out + [""]


def memory_lines(rows: list[dict], memory: list[dict]) -> list[str]:
  by = {(r["layers"], bool(r.get("stream"))): r["quantize"] for r in memory if r["recipe"] == "zeroquant-w48a16-lkd"}
  modes = [stream for stream in (False, True) if (4, stream) in by and (30, stream) in by]
  if not modes:
    return []
  mib = lambda b: f"{b / 2**20:.0f} MiB"
  signed = lambda b: f"{round(b / 2**20):+d} MiB"
  q4, q30 = by[(4, modes[0])], by[(30, modes[0])]
  added_fp = q30["block_fp_bytes"] - q4["block_fp_bytes"]
  added_stored = q30["block_stored_bytes"] - q4["block_stored_bytes"]
  header = "| |" + "".join(" loaded: 4 blocks | 30 blocks | growth |" if not stream else
                           " streamed: 4 blocks | 30 blocks | growth |" for stream in modes)
  out = ["Memory of LKD (`zeroquant-w48a16-lkd`, SmolLM2) against depth: the first 4 blocks against all 30, "
         f"{q4['lkd_config']['steps']} steps a block (what is alive during a step does not depend on the number "
         "of steps), RSS of the quantizing process (`experiments/zeroquant.py quantize ... --layers N --steps 5 "
         "[--stream]`). *Loaded*: the float model loaded whole, then `lkd.lkd_quantize`; *streamed*: "
         "`streaming.stream_quantize` (what `jaxquant quantize --stream` runs), each float block read from the GGUF "
         "file when LKD reaches it and each quantized block written when done:", "",
         header, "|---|" + "---|---|---|" * len(modes)]
  for name, key in (("before quantizing (loaded: after the load)", "rss_after_load_bytes"),
                    ("peak while LKD runs (streamed: writing included)", "quantize_phase_peak_rss_bytes"),
                    ("peak of the whole process (load and save included)", "peak_rss_bytes")):
    cells = []
    for stream in modes:
      a, b = by[(4, stream)].get(key), by[(30, stream)].get(key)
      cells += [mib(a), mib(b), signed(b - a)] if a and b else ["-", "-", "-"]
    out.append(f"| {name} | " + " | ".join(cells) + " |")
  # the process's peak since the load (None where /proc/self/clear_refs could not reset it)
  phase = lambda q: q.get("quantize_phase_peak_rss_bytes") or q["peak_rss_bytes"]
  cells = []
  for stream in modes:
    own4, own30 = (phase(q) - q["rss_after_load_bytes"] for q in (by[(4, stream)], by[(30, stream)]))
    cells += [mib(own4), mib(own30), signed(own30 - own4)]
  out.append("| LKD's own memory (its peak minus the line above it) | " + " | ".join(cells) + " |")
  out += ["", f"The 26 added blocks' own weights: {mib(added_fp)} float32 (the teacher) + {mib(added_stored)} "
          f"stored (the quantized result) = {mib(added_fp + added_stored)}."]
  for stream in modes:
    lkd_growth = phase(by[(30, stream)]) - phase(by[(4, stream)])
    process_growth = by[(30, stream)]["peak_rss_bytes"] - by[(4, stream)]["peak_rss_bytes"]
    verdict = "within" if max(lkd_growth, process_growth) <= added_fp + added_stored else "over"
    out.append(f"{'Streamed' if stream else 'Loaded'}: from 4 to 30 blocks the peak while LKD runs changes by "
               f"{signed(lkd_growth)} (the whole process's by {signed(process_growth)}), {verdict} the added blocks' "
               f"{mib(added_fp + added_stored)}.")
  return out + [""]


def lr_lines() -> list[str]:
  path = RESULTS / "zeroquant.lr.json"
  if not path.exists():
    return []
  sweep = json.loads(path.read_text())
  out = [f"Learning rate (AdamW, {lkd_budget_text()}) on the first {sweep['layers']} blocks of SmolLM2, W4/8A16: KL "
         "and top-1 of the quantized slice to the float slice (alice29, 2048 tokens), and the blocks' quantized "
         "output MSE (`experiments/zeroquant.py lr-sweep`):", "",
         "| learning rate | KL | top-1 | block output MSE (block 0..3) |", "|---|---|---|---|"]
  for row in sweep["rows"]:
    name = "round-to-nearest" if row["learning_rate"] is None else f"{row['learning_rate']:g} {row['schedule']}"
    mse = row.get("mse_lkd") or (sweep["rows"][1].get("mse_rtn", []) if len(sweep["rows"]) > 1 else [])
    out.append(f"| {name} | {row['kl']:.4f} | {row['top1']:.3f} | {' / '.join(f'{m:.4f}' for m in mse) or '-'} |")
  return out + [""]


def lkd_default_steps() -> int:
  from jaxquant.methods import lkd
  return lkd.BUDGET.steps


def lkd_budget_text() -> str:
  from jaxquant.methods import lkd
  b = lkd.BUDGET
  return f"{b.steps} steps of {b.batch_size} x {b.seq_len} tokens, {b.n_samples} lcet10 samples"


if __name__ == "__main__":
  main()
