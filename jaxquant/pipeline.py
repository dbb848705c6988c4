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
from jaxquant.models.bert import Bert
from jaxquant.models.layers import Linear
from jaxquant.rules import Recipe, get_recipe, path_str, quantize_tree
from jaxquant.sources import tokenizer as tokenizers
from jaxquant.sources.loading import load_model


def linear_modules(model: nnx.Module) -> dict[str, Linear]:
  """Dotted module path -> Linear, e.g. "layers.0.attn.q_proj"."""
  found = {}
  for path, module in nnx.iter_graph(model):
    if isinstance(module, Linear):
      found[".".join(str(p) for p in path)] = module
  return found


def set_backend(model: nnx.Module, backend: str) -> nnx.Module:
  """A copy of the model whose Linear layers run quantized matmuls on `backend` (see ops.BACKENDS):
  "interpret" runs the real Pallas kernel code on CPU, "pallas" compiles it for the GPU, "xla" is portable."""
  ops.resolve_backend(backend)
  model = nnx.clone(model)
  for module in linear_modules(model).values():
    module.backend = backend
  return model


def calibrate_input_absmax(model: nnx.Module, batches: Iterable[np.ndarray], progress: bool = True,
                           **call_kwargs) -> dict[str, float]:
  """Run the model over token batches; return kernel path -> absmax of the activations entering that linear."""
  model = nnx.clone(model)
  linears = linear_modules(model)
  for module in linears.values():
    module.record_input_absmax = True

  @nnx.jit
  def forward(model, tokens):
    # Encoders also take a padding mask; calibration windows are full, so every token is real.
    inputs = (tokens, jnp.ones_like(tokens)) if isinstance(model, Bert) else (tokens,)
    _, sown = nnx.capture(model, nnx.Intermediate)(*inputs, **call_kwargs)
    return sown

  absmax: dict[str, float] = {}
  for tokens in tqdm(list(batches), desc="calibrate", unit="batch", disable=not progress, leave=False):
    sown = forward(model, jnp.asarray(tokens))
    for path, value in jax.tree_util.tree_leaves_with_path(sown):
      name = path_str(path)
      # ".../q_proj.input_absmax.0" -> ".../q_proj.kernel"
      module_path = name.split(".input_absmax")[0]
      key = f"{module_path}.kernel"
      absmax[key] = max(absmax.get(key, 0.0), float(value))
  return absmax


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
    act_absmax = calibrate_input_absmax(model, calibration, progress=progress)
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, quantize_tree(state, recipe.rules, act_absmax, progress=progress))


def restore_template(model: nnx.Module, recipe_name: str) -> nnx.Module:
  """What checkpoint.restore needs to restore a model quantized by `recipe_name` from float `model`: the float
  model itself, unless the recipe's procedure changes the graph (RepQuant adds modules and biases) and says how
  to build that graph (`procedure.template(model)`). Unknown recipe names (made by other code) use `model`."""
  try:
    recipe = get_recipe(recipe_name)
  except (KeyError, ValueError):
    return model
  template = getattr(recipe.procedure, "template", None)
  return template(model) if template is not None else model


@dataclasses.dataclass
class Loaded:
  """A float model ready to quantize: family ("llama", "gemma3" or "bert"), the NNX model, its tokenizer, and the
  identity of the source checkpoint (stored with every quantized checkpoint made from it)."""

  family: str
  model: nnx.Module
  tokenizer: Any
  source: dict


def load(name_or_path: str, n_layers: int | None = None) -> Loaded:
  """Load a built-in model name or a user checkpoint path (GGUF file or safetensors directory) as float32."""
  family, path = assets.resolve_model(name_or_path)
  source = {"family": family, "name": str(name_or_path), "path": str(path), "n_layers": n_layers}
  model = load_model(path, n_layers, family)
  if family == "bert":
    tokenizer = tokenizers.tokenizer_from_json(pathlib.Path(path) / "tokenizer.json")
  else:
    tokenizer = tokenizers.tokenizer_from_gguf(path)
  return Loaded(family, model, tokenizer, source)
