"""Quantize a loaded model with a recipe and measure it against its float self: what the CLI and the experiment
scripts report.

Decoders: perplexity, KL(float || quantized) and top-1 agreement on windows of a text; encoders: mean cosine of
sentence embeddings to the float model's; image models (ViT): CLS/patch feature cosine and saliency agreement on
crops of evaluation photos it was never calibrated on (vision.compare). Stored bytes count every array the model holds (packed codes, scales).
"""

from __future__ import annotations

import time

import jax
import numpy as np
from flax import nnx

from jaxquant import assets, data, evaluate, formats, images, pipeline, vision
from jaxquant.sources.tokenizer import encode_batch

VIT_EVAL_IMAGES = 16  # evaluation crops an image model is compared on


def bos_id(loaded) -> int | None:
  """The BOS id to start every window with, for decoders that need one (Gemma); None otherwise (SmolLM2)."""
  config = getattr(loaded.model, "config", None)
  return config.bos_token_id if getattr(config, "add_bos", False) else None


def calibration_batches(loaded, text: str, samples: int, seq_len: int):
  """Calibration windows of `text` for static activation scales (Gemma's with its BOS first); for an image model,
  `samples` crops of the calibration photos instead, whatever the text."""
  if loaded.family == "vit":
    return [images.calibration_images(samples)]
  if loaded.family == "bert":
    seq_len = min(seq_len, 128)  # sentence encoder: short windows
  text_body, source = data.load_text(text)
  ids = data.tokenize(loaded.tokenizer, text_body)
  bos = bos_id(loaded)
  if bos is None:
    return data.calibration_batches(ids, n_samples=samples, seq_len=seq_len, batch_size=4, source=source)
  # [BOS] + seq_len-1 text tokens, as the model sees text at evaluation
  batches = data.calibration_batches(ids, n_samples=samples, seq_len=seq_len - 1, batch_size=4, source=source)
  return [np.concatenate([np.full((len(b), 1), bos, np.int32), b], axis=1) for b in batches]


def procedure_settings(recipe) -> dict:
  """What a checkpoint records of the recipe's procedure (rules.Procedure.settings, e.g. LKD's settings), {} for
  none: a rerun with other settings is another model."""
  settings = getattr(recipe.procedure, "settings", None)
  return settings() if settings is not None else {}


def own_calibration(recipe, tokenizer, text: str, bos: int | None = None):
  """The procedure's own calibration windows from `text` (rules.Procedure.calibration_from_text, e.g. LKD's
  n_samples x seq_len windows) when it reads calibration data, else None. bos (bos_id(loaded)): each window
  becomes [bos] + its first seq_len-1 tokens, as the model sees text at evaluation (Gemma without BOS computes
  other hidden states, and blocks distilled on them break the model)."""
  own = getattr(recipe.procedure, "calibration_from_text", None)
  if own is None or not recipe.uses_calibration:
    return None
  batches = own(tokenizer, text)
  if bos is None:
    return batches
  return [np.concatenate([np.full((len(b), 1), bos, np.int32), np.asarray(b)[:, :-1]], axis=1) for b in batches]


def quantize_loaded(loaded, recipe, calib_text: str = "lcet10", calib_samples: int = 8, calib_seq_len: int = 512,
                    progress: bool = True):
  """(quantized model, seconds). Calibration text is only read when the recipe needs it."""
  if not recipe.rules and recipe.procedure is None:  # "fp": the float model itself
    return loaded.model, 0.0
  start = time.perf_counter()
  if loaded.family == "vit":  # an image model: every calibrating recipe gets photo crops, not text windows
    calibration = (calibration_batches(loaded, calib_text, calib_samples, calib_seq_len)
                   if recipe.needs_calibration else None)
  else:
    calibration = own_calibration(recipe, loaded.tokenizer, calib_text, bos_id(loaded))
    if calibration is None and recipe.needs_calibration and not hasattr(recipe.procedure, "calibration_from_text"):
      calibration = calibration_batches(loaded, calib_text, calib_samples, calib_seq_len)
  quantized = pipeline.quantize_model(loaded.model, recipe, calibration, progress=progress)
  jax.block_until_ready(jax.tree_util.tree_leaves(quantized))
  return quantized, time.perf_counter() - start


def evaluate_loaded(loaded, model, text: str, max_tokens: int | None, window: int, sentences: int = 300,
                    progress: bool = True) -> dict:
  """Figures of `model` against the float `loaded.model` on a text."""
  result = {"weight_bytes": formats.tree_nbytes(nnx.state(model)),
            "fp_weight_bytes": formats.tree_nbytes(nnx.state(loaded.model)),
            # The transformer blocks: what the recipes quantize (embeddings and head stay float).
            "block_bytes": formats.tree_nbytes(nnx.state(model.layers)),
            "fp_block_bytes": formats.tree_nbytes(nnx.state(loaded.model.layers))}
  start = time.perf_counter()
  if loaded.family in assets.DECODER_FAMILIES:
    text_body, source = data.load_text(text)
    windows = data.eval_windows(data.tokenize(loaded.tokenizer, text_body), window, max_tokens, source=source,
                                bos_id=bos_id(loaded))
    if model is loaded.model:  # the float model against itself: one pass, KL 0 and agreement 1 by definition
      ppl = evaluate.perplexity(model, windows, progress=progress)
      figures = {"perplexity": ppl, "ref_perplexity": ppl, "kl": 0.0, "top1": 1.0,
                 "n_tokens": windows.shape[0] * (windows.shape[1] - 1)}
    else:
      figures = evaluate.compare_to_reference(model, loaded.model, windows, progress=progress)
    result.update(perplexity=figures["perplexity"], fp_perplexity=figures["ref_perplexity"], kl=figures["kl"],
                  top1_agreement=figures["top1"], tokens=figures["n_tokens"])
  elif loaded.family == "vit":  # crops of the evaluation photos (never calibrated on), not the text
    config = loaded.model.config
    decoder = vision.load_decoder(loaded.source["path"], config.image_size, config.grid)
    ref = vision.reference(loaded.model, images.evaluation_images(VIT_EVAL_IMAGES), decoder)
    result.update(vision.compare(model, ref), perplexity=None, kl=None, top1_agreement=None)
  else:
    picked = data.corpus_sentences(text, n=sentences, seed=0)
    token_ids, mask = encode_batch(loaded.tokenizer, picked)
    result.update(embedding_cosine=evaluate.embedding_cosine(model, loaded.model, token_ids, mask),
                  sentences=len(picked), perplexity=None, kl=None, top1_agreement=None)
  result["seconds"] = time.perf_counter() - start
  return result
