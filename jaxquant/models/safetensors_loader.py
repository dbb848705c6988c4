"""Load a Hugging Face BERT checkpoint directory (config.json + model.safetensors) without torch or a hub.

HF linear weights are (out, in); they are transposed to Flax (in, out). Keys may carry a "bert." prefix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from jaxquant.models.bert import BertConfig

_GELU = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True}


def read_bert_config(path: str | os.PathLike) -> BertConfig:
  """BertConfig from <path>/config.json; raises ValueError naming the file and key when unsupported."""
  config_path = Path(path) / "config.json"
  raw = json.loads(config_path.read_text())
  if raw.get("model_type", "bert") != "bert":
    raise ValueError(f"{config_path}: model_type {raw.get('model_type')!r} is not 'bert'")
  if raw.get("position_embedding_type", "absolute") != "absolute":
    raise ValueError(f"{config_path}: position_embedding_type {raw['position_embedding_type']!r} "
                     "is not supported (only 'absolute')")
  act = raw.get("hidden_act", "gelu")
  if act not in _GELU:
    raise ValueError(f"{config_path}: hidden_act {act!r} is not supported ({', '.join(_GELU)})")
  try:
    return BertConfig(vocab_size=raw["vocab_size"], dim=raw["hidden_size"], n_layers=raw["num_hidden_layers"],
                      n_heads=raw["num_attention_heads"], ffn_dim=raw["intermediate_size"],
                      max_positions=raw.get("max_position_embeddings", 512),
                      n_token_types=raw.get("type_vocab_size", 2), norm_eps=raw.get("layer_norm_eps", 1e-12),
                      gelu_approximate=_GELU[act])
  except KeyError as e:
    raise ValueError(f"{config_path}: missing key {e.args[0]!r}") from e


def load_bert_weights(path: str | os.PathLike, n_layers: int | None = None) -> tuple[BertConfig, dict[str, np.ndarray]]:
  """(config, weights) in `Bert.from_weights` format from a checkpoint directory, float32, kernels (in, out).

  n_layers: keep only the first n_layers blocks. Raises ValueError naming the file and tensor for a missing
  tensor, a wrong shape or NaN/Inf.
  """
  from safetensors.numpy import load_file
  path = Path(path)
  config = read_bert_config(path)
  if n_layers is not None:
    config = BertConfig(**{**config.__dict__, "n_layers": min(n_layers, config.n_layers)})
  file = path / "model.safetensors"
  tensors = {k.removeprefix("bert."): v for k, v in load_file(str(file)).items()}
  d, f = config.dim, config.ffn_dim

  def load(name: str, shape: tuple[int, ...], transpose: bool = False) -> np.ndarray:
    if name not in tensors:
      raise ValueError(f"{file}: missing tensor {name!r}")
    array = np.asarray(tensors[name], dtype=np.float32)
    if array.shape != shape:
      raise ValueError(f"{file}: tensor {name!r} has shape {array.shape}, expected {shape}")
    if not np.all(np.isfinite(array)):
      raise ValueError(f"{file}: tensor {name!r} contains NaN or Inf")
    return array.T if transpose else array

  weights = {
      "word_embeddings": load("embeddings.word_embeddings.weight", (config.vocab_size, d)),
      "position_embeddings": load("embeddings.position_embeddings.weight", (config.max_positions, d)),
      "token_type_embeddings": load("embeddings.token_type_embeddings.weight", (config.n_token_types, d)),
      "emb_norm.weight": load("embeddings.LayerNorm.weight", (d,)),
      "emb_norm.bias": load("embeddings.LayerNorm.bias", (d,)),
  }
  for i in range(config.n_layers):
    hf, ours = f"encoder.layer.{i}.", f"layers.{i}."
    pairs = {  # ours -> (hf name, out, in)
        "q_proj": ("attention.self.query", d, d), "k_proj": ("attention.self.key", d, d),
        "v_proj": ("attention.self.value", d, d), "o_proj": ("attention.output.dense", d, d),
        "up_proj": ("intermediate.dense", f, d), "down_proj": ("output.dense", d, f),
    }
    for name, (hf_name, n_out, n_in) in pairs.items():
      weights[ours + name + ".kernel"] = load(hf + hf_name + ".weight", (n_out, n_in), transpose=True)
      weights[ours + name + ".bias"] = load(hf + hf_name + ".bias", (n_out,))
    for name, hf_name in (("attn_norm", "attention.output.LayerNorm"), ("mlp_norm", "output.LayerNorm")):
      weights[ours + name + ".weight"] = load(hf + hf_name + ".weight", (d,))
      weights[ours + name + ".bias"] = load(hf + hf_name + ".bias", (d,))
  return config, weights


def load_bert(path: str | os.PathLike, n_layers: int | None = None):
  """A float32 `Bert` from a checkpoint directory (same as `jaxquant.models.bert.load_bert`)."""
  from jaxquant.models.bert import load_bert as _load
  return _load(path, n_layers)
