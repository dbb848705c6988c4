"""Model-level glue: calibrate a Flax NNX model on token batches, then quantize its state by a recipe.

The quantizers stay pure functions on pytrees (rules.quantize_tree); this file only moves a model's state in
and out of them. The original model is never modified.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from jaxquant import assets, ops
from jaxquant.methods import blockwise
from jaxquant.models import surgery
from jaxquant.rules import Recipe, path_str, quantize_tree
from jaxquant.sources import tokenizer as tokenizers
from jaxquant.sources.loading import load_model
from jaxquant.sources.onnx import load_vit


def set_backend(model: nnx.Module, backend: str) -> nnx.Module:
  """A copy of the model whose Linear layers run quantized matmuls on `backend` (see ops.BACKENDS):
  "interpret" runs the real Pallas kernel code on CPU, "pallas" compiles it for the GPU, "xla" is portable."""
  ops.resolve_backend(backend)
  model = nnx.clone(model)
  for module in surgery.modules(model).values():
    module.backend = backend
  return model


def quantize_model(model: nnx.Module, recipe: Recipe, calibration: Iterable[np.ndarray] | None = None,
                   progress: bool = True) -> nnx.Module:
  """A new model whose matching Linear kernels are QArrays, as `recipe` says."""
  if recipe.procedure is not None:
    if recipe.uses_calibration and calibration is None:
      raise ValueError(f"recipe {recipe.name!r} learns from data: pass calibration batches")
    return recipe.procedure(model, recipe, calibration, progress)
  act_absmax = None
  if recipe.needs_calibration:
    if calibration is None:
      raise ValueError(f"recipe {recipe.name!r} uses static activation scales: pass calibration batches")
    act_absmax = blockwise.input_absmax(model, calibration, progress=progress)
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, quantize_tree(state, recipe.rules, act_absmax, progress=progress))


@dataclasses.dataclass
class Loaded:
  """A float model ready to quantize: family ("llama", "gemma3", "bert" or "vit"), the NNX model, its tokenizer (None
  for the image model "vit"), and the identity of the source checkpoint (stored with every quantized checkpoint made
  from it)."""

  family: str
  model: nnx.Module
  tokenizer: Any
  source: dict


def load(name_or_path: str, n_layers: int | None = None) -> Loaded:
  """Load a built-in model name or a user checkpoint path (GGUF file, safetensors directory or ViT .onnx file) as
  float32."""
  family, path = assets.resolve_model(name_or_path)
  source = {"family": family, "name": str(name_or_path), "path": str(path), "n_layers": n_layers}
  if family == "vit":  # an image model: no tokenizer
    return Loaded(family, load_vit(path, n_layers=n_layers), None, source)
  model = load_model(path, n_layers, family)
  if family == "bert":
    tokenizer = tokenizers.tokenizer_from_json(pathlib.Path(path) / "tokenizer.json")
  else:
    tokenizer = tokenizers.tokenizer_from_gguf(path)
  return Loaded(family, model, tokenizer, source)
