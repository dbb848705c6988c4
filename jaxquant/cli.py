"""Command line: `jaxquant quantize | eval | generate | demo | recipes`.

Progress bars go to stderr; with --json the last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import sys
import time

import jax
from flax import nnx

from jaxquant import assets, checkpoint, cli_args, formats, pipeline, recipes, rules, streaming
from jaxquant.assets import AssetError
from jaxquant.checkpoint import CheckpointError
from jaxquant.measure import evaluate_loaded, own_calibration, procedure_settings, quantize_loaded
from jaxquant.models import decode
from jaxquant.sources import loading, tokenizer as tokenizers
from jaxquant.models.sampling import Sampler

def _peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _recipe(name: str, group_size: int | None, lkd_steps: int | None = None, lkd_resume: str | None = None):
  recipe = recipes.get_recipe(name)
  recipe = rules.with_group_size(recipe, group_size) if group_size else recipe
  if lkd_steps is not None and lkd_steps <= 0:
    raise ValueError(f"--lkd-steps must be a positive number of optimizer steps a block, got {lkd_steps}")
  options = {key: value for key, value in (("steps", lkd_steps), ("checkpoint_dir", lkd_resume)) if value is not None}
  if options:
    configure = getattr(recipe.procedure, "configure", None)  # rules.Procedure's optional hook
    if configure is None:
      raise ValueError(f"--lkd-steps / --lkd-resume apply to LKD recipes (zeroquant-*-lkd), not {recipe.name!r}")
    recipe = configure(recipe, **options)
  return recipe


def _quantize_recipe(args):
  return _recipe(args.recipe, args.group_size, args.lkd_steps, args.lkd_resume)


def _cmd_quantize(args) -> dict:
  if args.stream:
    return _quantize_streaming(args)
  recipe = _quantize_recipe(args)
  loaded = pipeline.load(args.model, n_layers=args.layers)
  source = loaded.source
  source = {**source, **procedure_settings(recipe)}  # a rerun with other settings is another model
  checkpoint.check_destination(pathlib.Path(args.out).absolute(), recipe.name, source, args.overwrite)  # fail first
  quantized, seconds = quantize_loaded(loaded, recipe, args.calib_text, args.calib_samples, progress=not args.quiet)
  out = checkpoint.save(args.out, quantized, recipe_name=recipe.name, source=source, overwrite=args.overwrite)
  return {"recipe": recipe.name, "out": str(out), "seconds": seconds,
          "weight_bytes": formats.tree_nbytes(nnx.state(quantized)),
          "fp_weight_bytes": formats.tree_nbytes(nnx.state(loaded.model)), "peak_rss_bytes": _peak_rss_bytes()}


def _quantize_streaming(args) -> dict:
  """--stream: one block at a time from disk (jaxquant.streaming): memory independent of depth."""
  path = pathlib.Path(args.model)
  source = path if path.exists() else assets.resolve_model(args.model)[1]
  recipe = _quantize_recipe(args)
  streaming.check_streamable(recipe)
  calibration = (own_calibration(recipe, streaming.source_tokenizer(source), args.calib_text)
                 if hasattr(recipe.procedure, "calibration_from_text") else None)
  report = streaming.stream_quantize(source, args.out, recipe, calibration=calibration, n_layers=args.layers,
                                     overwrite=args.overwrite, progress=not args.quiet)
  result = {"recipe": recipe.name, "out": report.directory, "seconds": report.seconds,
            "weight_bytes": report.stored_bytes, "fp_weight_bytes": report.read_bytes, "parts": report.parts,
            "peak_rss_bytes": _peak_rss_bytes()}
  if report.lkd_blocks is not None:  # how many blocks LKD improved ("lkd") or left round-to-nearest, and resumed
    statuses = [b["status"] for b in report.lkd_blocks]
    result["lkd_blocks"] = {status: statuses.count(status) for status in sorted(set(statuses))}
    result["lkd_blocks_resumed"] = sum(b["resumed"] for b in report.lkd_blocks)
  return result


def _saved_checkpoint(model_arg: str) -> pathlib.Path | None:
  """The directory when `model_arg` is a checkpoint written by `quantize`, else None."""
  path = pathlib.Path(model_arg)
  return path if path.is_dir() and (path / checkpoint.METADATA_FILE).exists() else None


def _model_for(args):
  """The model `eval` and `generate` run: a saved checkpoint restored onto its float source, or a model name /
  path with --recipe applied on the fly. -> (loaded float source, model, recipe name, quantize seconds or None)."""
  saved = _saved_checkpoint(args.model)
  if saved is not None:
    metadata = checkpoint.load_metadata(saved)
    source = metadata["source"]
    loaded = pipeline.load(source["name"], n_layers=source.get("n_layers"))
    template = recipes.restore_template(loaded.model, metadata["recipe"])
    return loaded, checkpoint.restore(saved, template), metadata["recipe"], None
  loaded = pipeline.load(args.model, n_layers=args.layers)
  recipe = _recipe(args.recipe, args.group_size)
  model, quant_seconds = quantize_loaded(loaded, recipe, args.calib_text, args.calib_samples,
                                         progress=not args.quiet)
  return loaded, model, recipe.name, quant_seconds


def _cmd_eval(args) -> dict:
  loaded, model, recipe_name, quant_seconds = _model_for(args)
  result = {"model": args.model, "recipe": recipe_name, "text": args.text}
  result.update(evaluate_loaded(loaded, model, args.text, args.max_tokens, args.window, sentences=args.sentences,
                                progress=not args.quiet))
  result["quantize_seconds"] = quant_seconds
  result["peak_rss_bytes"] = _peak_rss_bytes()
  return result


def _generation_source(model_arg: str) -> tuple[str, str]:
  """(family, float source name or path) of what `generate` was given, read without loading any weights: a
  checkpoint's recorded source, a built-in name's family, or a file's own metadata."""
  saved = _saved_checkpoint(model_arg)
  if saved is not None:
    source = checkpoint.load_metadata(saved)["source"]
    return source["family"], source["name"]
  if model_arg in assets.MODELS:
    return assets.MODELS[model_arg].family, model_arg
  return assets.resolve_model(model_arg)[0], model_arg


def _check_generation(args):
  """Every refusal that needs no weights, before any are loaded. -> (prompt token ids, GGUF config)."""
  if not args.prompt.strip():
    raise ValueError("the prompt is empty: give some text, e.g. --prompt \"Once upon a time\"")
  if args.max_new_tokens < 1:
    raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
  if args.temperature < 0:
    raise ValueError(f"--temperature must be >= 0 (0 is greedy), got {args.temperature}")
  if args.top_k is not None and args.top_k < 1:
    raise ValueError(f"--top-k must be at least 1 (leave it out to sample from every token), got {args.top_k}")
  family, source = _generation_source(args.model)
  if family not in assets.DECODER_FAMILIES:
    what = "an image model (vit): it embeds images" if family == "vit" else f"an encoder ({family}): it embeds text"
    raise ValueError(f"{args.model} is {what} and cannot generate any; give a "
                     "decoder (smollm2-135m, gemma3-270m, a llama / gemma3 .gguf, or a checkpoint of one)")
  path = assets.resolve_model(source)[1]
  config = loading.read_config(path)
  ids = [int(i) for i in tokenizers.encode(tokenizers.tokenizer_from_gguf(path), args.prompt)]
  if config.add_bos and config.bos_token_id is not None:
    ids = [config.bos_token_id] + ids
  context = config.context_length
  if context is not None and len(ids) > context:
    raise ValueError(f"the prompt is {len(ids)} tokens, longer than the model's context of {context}: shorten it")
  if context is not None and len(ids) + args.max_new_tokens > context:
    raise ValueError(f"the prompt ({len(ids)} tokens) plus --max-new-tokens {args.max_new_tokens} exceed the "
                     f"model's context of {context}: lower --max-new-tokens to at most {context - len(ids)}")
  return ids, config


def _device_peak_bytes() -> int | None:
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def _cmd_generate(args) -> dict:
  """Stream the continuation of --prompt to stdout; figures after it (with --json, one JSON line last)."""
  ids, config = _check_generation(args)
  start = time.perf_counter()
  loaded, model, recipe_name, quant_seconds = _model_for(args)
  load_seconds = time.perf_counter() - start - (quant_seconds or 0.0)
  tokenizer = loaded.tokenizer
  prefix = tokenizer.decode(ids)
  generated: list[int] = []
  shown = [0]
  sys.stdout.write(args.prompt)
  sys.stdout.flush()

  def show(_, tokens):
    if tokens[0] == config.eos_token_id:
      return
    generated.append(int(tokens[0]))
    text = tokenizer.decode(ids + generated)
    text = text[len(prefix):] if text.startswith(prefix) else tokenizer.decode(generated)
    if not text.endswith("\ufffd"):  # hold back a character whose UTF-8 bytes are not all out yet
      sys.stdout.write(text[shown[0]:])
      sys.stdout.flush()
      shown[0] = len(text)

  sampler = Sampler(temperature=args.temperature, top_k=args.top_k)
  result = decode.generate(model, [ids], args.max_new_tokens, sampler=sampler, seed=args.seed,
                           eos_id=config.eos_token_id, on_token=show)
  sys.stdout.write("\n")
  return {"model": args.model, "recipe": recipe_name, "prompt_tokens": len(ids), "new_tokens": len(generated),
          "stopped_at_eos": len(generated) < int(result.lengths[0]),  # the EOS token is counted, not shown
          "text": tokenizer.decode(generated), "time_to_first_token_s": result.prefill_seconds,
          "prefill_tokens_per_s": result.prefill_tokens_per_s,
          "decode_tokens_per_s": result.decode_tokens_per_s if result.decode_steps else None,  # JSON has no NaN
          "decode_steps": result.decode_steps, "compile_seconds": result.compile_seconds,
          "load_seconds": load_seconds, "quantize_seconds": quant_seconds,
          "weight_bytes": formats.tree_nbytes(nnx.state(model)), "peak_rss_bytes": _peak_rss_bytes(),
          "device_peak_bytes": _device_peak_bytes(), "temperature": args.temperature, "top_k": args.top_k,
          "seed": args.seed}


def _generation_summary(r: dict) -> str:
  device = f", device peak {r['device_peak_bytes'] / 2**30:.2f} GiB" if r["device_peak_bytes"] else ""
  return (f"[{r['recipe']}] {r['prompt_tokens']} prompt tokens, {r['new_tokens']} new; time to first token "
          f"{r['time_to_first_token_s'] * 1e3:.0f} ms (prefill {r['prefill_tokens_per_s']:.1f} tok/s), decode "
          f"{r['decode_tokens_per_s'] or 0:.1f} tok/s; compile {r['compile_seconds']:.1f} s; weights "
          f"{r['weight_bytes'] / 1e6:.1f} MB; peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB{device}")


def _pct(value: float, base: float) -> str:
  return f"{100 * (value / base - 1):+.1f}%"  # as README's tables print it


def _cmd_demo(args) -> dict:
  loaded = pipeline.load("smollm2-135m")
  rows = []
  for name in ("fp", "w8a8-per-tensor", "zeroquant-w8a8", "zeroquant-w8a8-kgroup"):
    recipe = _recipe(name, None)
    if not args.quiet:  # each recipe's bars under its name, one line each (calibrate stays, then quantize)
      print(f"{name}:", file=sys.stderr, flush=True)
    model, seconds = quantize_loaded(loaded, recipe, progress=not args.quiet)
    row = {"recipe": name, "quantize_seconds": seconds}
    for text in ("alice29", "asyoulik"):
      figures = evaluate_loaded(loaded, model, text, args.max_tokens, 512, progress=not args.quiet)
      row[text] = figures
    rows.append(row)
  fp = rows[0]
  print("\nSmolLM2-135M-Instruct, windows of 512 tokens, first", args.max_tokens or "all", "tokens of each text")
  print(f"{'recipe':<22} {'ppl alice29':>18} {'ppl asyoulik':>18} {'KL':>7} {'top-1':>6} {'blocks MB':>9} "
        f"{'in-process quantize s':>21}")
  for row in rows:
    a, b = row["alice29"], row["asyoulik"]
    alice = f"{a['perplexity']:.2f} ({_pct(a['perplexity'], fp['alice29']['perplexity'])})"
    asyou = f"{b['perplexity']:.2f} ({_pct(b['perplexity'], fp['asyoulik']['perplexity'])})"
    print(f"{row['recipe']:<22} {alice:>18} {asyou:>18} {a['kl']:>7.4f} {a['top1_agreement']:>6.3f} "
          f"{a['block_bytes'] / 1e6:>9.1f} {row['quantize_seconds']:>21.1f}")
  print("KL and top-1 agreement against the float model on alice29; blocks MB: stored bytes of the 30 transformer "
        "blocks (packed codes + scales); the float32 embeddings are not quantized. In-process quantize s: "
        "calibration and quantization inside this process (model load excluded; README's W8A8 table times the "
        "whole `jaxquant quantize` process).")
  return {"rows": rows, "peak_rss_bytes": _peak_rss_bytes()}


def _cmd_recipes(args) -> dict:
  if args.name:
    print(recipes.describe(args.name))
    return {"recipe": args.name}
  print(recipes.listing())
  return {"recipes": list(recipes.RECIPES)}


COMMANDS = {"quantize": _cmd_quantize, "eval": _cmd_eval, "generate": _cmd_generate, "demo": _cmd_demo,
            "recipes": _cmd_recipes}


def main(argv: list[str] | None = None) -> int:
  args = cli_args.build_parser().parse_args(argv)
  try:
    cli_args.validate(args)  # every check that needs no model, before one is loaded
    result = COMMANDS[args.command](args)
  except (ValueError, FileNotFoundError, AssetError, CheckpointError) as error:
    print(f"jaxquant {args.command}: error: {error}", file=sys.stderr)
    return 2
  if getattr(args, "json", False):
    print(json.dumps(result))
  elif args.command == "generate":
    print(_generation_summary(result))
  elif args.command in ("quantize", "eval"):
    for key, value in result.items():
      if value is None:  # a figure this model has not (an encoder's perplexity)
        continue
      print(f"{key:>18}: {value:.6g}" if isinstance(value, float) else f"{key:>18}: {value}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
