"""Any supported checkpoint as a Source, its family found from the file (or checked against `family`):

  * a GGUF file, general.architecture "llama" or "gemma3";
  * a Hugging Face directory (or a .safetensors file in one): config.json with model_type "llama" or "bert",
    and model.safetensors or model.safetensors.index.json with its shards.

`load_model` builds the whole float model; `read_config` reads only the config.
"""

from __future__ import annotations

import dataclasses
import pathlib

from flax import nnx

from jaxquant.models.bert import Bert
from jaxquant.models.gemma import Gemma
from jaxquant.models.llama import Llama
from jaxquant.sources import bert, gemma, llama
from jaxquant.sources.base import Source, SourceError
from jaxquant.sources.gguf import GGUFFile, field
from jaxquant.sources.safetensors import HFDirectory, read_config_json

# family -> (config from the file's metadata, name table)
_GGUF = {"llama": (llama.config_from_gguf, llama.gguf_table), "gemma3": (gemma.config_from_gguf, gemma.gguf_table)}
_HF = {"llama": (llama.config_from_hf, llama.hf_table), "bert": (bert.config_from_hf, bert.hf_table)}
_HF_PREFIXES = {"bert": bert.HF_PREFIX}
_MODELS = {"llama": Llama, "gemma3": Gemma, "bert": Bert}
SUPPORTED_ARCHITECTURES = tuple(_GGUF)


def open_source(path, n_layers: int | None = None, family: str | None = None) -> Source:
  """A Source for the checkpoint at `path` (first n_layers blocks only if given). `family`: the one expected
  ("llama", "gemma3", "bert"), else the file's. SourceError names the file and what is wrong."""
  path = pathlib.Path(path)
  if not path.exists():
    raise SourceError(f"no model at {path}: give a .gguf file or a Hugging Face model directory "
                      f"(config.json + model.safetensors)")
  if path.is_dir() or path.suffix == ".safetensors":
    return _open_hf(path if path.is_dir() else path.parent, n_layers, family)
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != b"GGUF":
    raise SourceError(f"{path} is neither a GGUF file (magic {magic!r}) nor a model directory")
  return _open_gguf(path, n_layers, family)


def _open_gguf(path: pathlib.Path, n_layers: int | None, family: str | None) -> Source:
  reader = GGUFFile(path)
  arch = field(reader.reader, path, "general.architecture")
  if arch not in _GGUF:
    raise SourceError(f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(_GGUF)})")
  if family is not None and arch != family:
    raise SourceError(f"{path}: GGUF architecture {arch!r} is not {family}")
  config_from, table = _GGUF[arch]
  config = _first_layers(config_from(reader.reader, path), n_layers)
  return Source(arch, config, table(config), reader, _description(arch, path, n_layers, "gguf"))


def _open_hf(directory: pathlib.Path, n_layers: int | None, family: str | None) -> Source:
  raw, file = read_config_json(directory)
  found = family or raw.get("model_type")
  if found not in _HF:
    raise SourceError(f"{file}: model_type {found!r} is not supported (supported: {', '.join(_HF)})")
  config_from, table = _HF[found]
  config = _first_layers(config_from(raw, file), n_layers)
  reader = HFDirectory(directory, _HF_PREFIXES.get(found, ""))
  return Source(found, config, table(config), reader, _description(found, directory, n_layers, "safetensors"))


def _first_layers(config, n_layers: int | None):
  return config if n_layers is None else dataclasses.replace(config, n_layers=min(n_layers, config.n_layers))


def _description(family: str, path: pathlib.Path, n_layers: int | None, file_format: str) -> dict:
  return {"family": family, "name": str(path), "path": str(path.resolve()), "n_layers": n_layers,
          "format": file_format}


def read_config(path):
  """The model config (LlamaConfig, GemmaConfig or BertConfig) of the checkpoint at `path`."""
  with open_source(path) as source:
    return source.config


def load_model(path, n_layers: int | None = None, family: str | None = None) -> nnx.Module:
  """The whole float32 model (Llama, Gemma or Bert) of the checkpoint at `path` (see open_source)."""
  with open_source(path, n_layers, family) as source:
    return _MODELS[source.family].from_weights(source.config, source.weights())
