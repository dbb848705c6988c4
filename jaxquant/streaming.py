"""Streaming quantization: read one block of a checkpoint from disk, quantize it, write it, drop it.

Peak host memory is about one block (plus the embedding table), not the model: the source is read tensor by
tensor with explicit reads, never loaded whole, and the output is a per-part jaxquant checkpoint
(checkpoint.PartWriter) written as it goes. The result restores with `checkpoint.restore` like any other.

Sources (llama family):
  * a Hugging Face directory: config.json (model_type "llama") + model.safetensors or model.safetensors.index.json
    with its shards. Tensors are read with os.pread from the offsets in the safetensors header (no memory map:
    touched pages of a mapped file count toward the process's resident memory until the kernel drops them).
  * a GGUF file (architecture "llama"): each tensor dequantized with gguf.quants.dequantize (q/k un-permuted to
    HF's rotate-half order, as gguf_loader does); the reader's memory map is told to drop its pages
    (madvise MADV_DONTNEED) after every part.

Parts, in order: "embed" (embed.embedding), "layers.<i>" (that block's norms and linears), "head" (norm.weight,
lm_head.kernel; with tied embeddings lm_head is the embedding transposed, read again). Leaf paths are those of
nnx.state(Llama), so the checkpoint restores onto `abstract_llama(config)` or the loaded float model.

Recipes: rule recipes (round-to-nearest, BCQ fits, dynamic activation scales). Recipes that learn from
calibration data or a whole model (LKD, activation-weighted BCQ, static activation scales) are refused with an
error saying so. With a mesh, each block's weights are split over it and quantized per shard
(sharding.quantize_tree_sharded); the checkpoint then holds sharded arrays and restores onto any mesh.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from typing import Iterator, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from jaxquant import checkpoint, formats
from jaxquant.models import gguf_loader
from jaxquant.models.llama import Llama, LlamaConfig
from jaxquant.rules import Recipe, quantize_tree


class StreamingError(ValueError):
  """A source that cannot be streamed, or a recipe that cannot run block by block; names the file and the fix."""


# ----------------------------------------------------------------------------------------------------------------
# safetensors, read with explicit reads

_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


class SafetensorsFile:
  """One .safetensors file: the header parsed and checked up front, tensors read one at a time with os.pread."""

  def __init__(self, path):
    self.path = pathlib.Path(path)
    try:
      self._fd = os.open(self.path, os.O_RDONLY)
    except OSError as err:
      raise StreamingError(f"cannot open {self.path}: {err.strerror}") from None
    size = os.fstat(self._fd).st_size
    head = os.pread(self._fd, 8, 0)
    if len(head) < 8:
      self.close()
      raise StreamingError(f"{self.path} is not a safetensors file: shorter than its 8-byte header length")
    header_len = int.from_bytes(head, "little")
    if header_len > size - 8 or header_len > 100 << 20:
      self.close()
      raise StreamingError(f"{self.path} is not a safetensors file: header length {header_len} exceeds the file")
    try:
      header = json.loads(os.pread(self._fd, header_len, 8))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
      self.close()
      raise StreamingError(f"{self.path}: the safetensors header cannot be parsed ({err})") from None
    header.pop("__metadata__", None)
    self._data_start = 8 + header_len
    self.tensors: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    for name, info in header.items():
      dtype, shape, (begin, end) = info.get("dtype"), tuple(info.get("shape", ())), info.get("data_offsets", (0, 0))
      if dtype not in _SAFETENSORS_DTYPES:
        self.close()
        raise StreamingError(f"{self.path}: tensor {name!r} has dtype {dtype}; streaming reads "
                             f"{', '.join(_SAFETENSORS_DTYPES)}")
      itemsize = np.dtype(_SAFETENSORS_DTYPES[dtype]).itemsize
      if end - begin != int(np.prod(shape)) * itemsize or self._data_start + end > size or begin < 0:
        self.close()
        raise StreamingError(f"{self.path}: tensor {name!r} ({dtype} {list(shape)}) has data offsets "
                             f"[{begin}, {end}) that do not fit its shape or the file ({size} bytes): truncated?")
      self.tensors[name] = (dtype, shape, begin, end)

  def read(self, name: str) -> np.ndarray:
    """The tensor as a float32 array of its stored shape (a fresh copy; nothing of the file stays mapped)."""
    dtype, shape, begin, end = self.tensors[name]
    offset, length = self._data_start + begin, end - begin
    buffer = bytearray(length)
    view, done = memoryview(buffer), 0
    while done < length:
      got = os.preadv(self._fd, [view[done:]], offset + done)
      if got <= 0:
        raise StreamingError(f"{self.path}: tensor {name!r} is cut short at byte {offset + done}: truncated file")
      done += got
    if hasattr(os, "posix_fadvise"):  # the page cache is not ours to fill with a model we read once
      os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_DONTNEED)
    raw = np.frombuffer(buffer, dtype=_SAFETENSORS_DTYPES[dtype]).reshape(shape)
    if dtype == "BF16":  # bfloat16 is the top half of a float32
      return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32) if dtype != "F32" else raw

  def close(self) -> None:
    if getattr(self, "_fd", None) is not None:
      os.close(self._fd)
      self._fd = None


def _hf_llama_config(directory: pathlib.Path) -> LlamaConfig:
  file = directory / "config.json"
  try:
    raw = json.loads(file.read_text())
  except FileNotFoundError:
    raise StreamingError(f"{directory}: no config.json; a safetensors source is a Hugging Face model directory "
                         f"(config.json + model.safetensors)") from None
  except json.JSONDecodeError as err:
    raise StreamingError(f"{file} cannot be parsed ({err})") from None
  if raw.get("model_type") != "llama":
    raise StreamingError(f"{file}: model_type {raw.get('model_type')!r}; streaming reads llama-family "
                         f"checkpoints (model_type 'llama')")
  if raw.get("rope_scaling"):
    raise StreamingError(f"{file}: rope_scaling {raw['rope_scaling']!r} is not supported")
  try:
    n_heads = int(raw["num_attention_heads"])
    return LlamaConfig(
        vocab_size=int(raw["vocab_size"]), dim=int(raw["hidden_size"]), n_layers=int(raw["num_hidden_layers"]),
        n_heads=n_heads, n_kv_heads=int(raw.get("num_key_value_heads", n_heads)),
        head_dim=int(raw.get("head_dim") or raw["hidden_size"] // n_heads), ffn_dim=int(raw["intermediate_size"]),
        rope_theta=float(raw.get("rope_theta", 10000.0)), norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bos_token_id=raw.get("bos_token_id"))
  except KeyError as err:
    raise StreamingError(f"{file}: missing key {err.args[0]!r}") from None


_HF_BLOCK = {  # our name -> (HF name inside model.layers.<i>., is a linear stored (out, in))
    "attn_norm.weight": ("input_layernorm.weight", False), "mlp_norm.weight": ("post_attention_layernorm.weight", False),
    "attn.q_proj.kernel": ("self_attn.q_proj.weight", True), "attn.k_proj.kernel": ("self_attn.k_proj.weight", True),
    "attn.v_proj.kernel": ("self_attn.v_proj.weight", True), "attn.o_proj.kernel": ("self_attn.o_proj.weight", True),
    "mlp.gate_proj.kernel": ("mlp.gate_proj.weight", True), "mlp.up_proj.kernel": ("mlp.up_proj.weight", True),
    "mlp.down_proj.kernel": ("mlp.down_proj.weight", True),
}


def _block_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """Flax-layout shapes of one block's leaves (suffixes after "layers.<i>.")."""
  d, q, kv, f = config.dim, config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim, config.ffn_dim
  return {"attn_norm.weight": (d,), "mlp_norm.weight": (d,), "attn.q_proj.kernel": (d, q),
          "attn.k_proj.kernel": (d, kv), "attn.v_proj.kernel": (d, kv), "attn.o_proj.kernel": (q, d),
          "mlp.gate_proj.kernel": (d, f), "mlp.up_proj.kernel": (d, f), "mlp.down_proj.kernel": (f, d)}


class _Source:
  """A llama checkpoint readable part by part. `config`, `description`; `part(name)` -> leaf path -> float32."""

  config: LlamaConfig
  description: dict

  def part_names(self) -> list[str]:
    return ["embed", *(f"layers.{i}" for i in range(self.config.n_layers)), "head"]

  def part(self, name: str) -> dict[str, np.ndarray]:
    if name == "embed":
      return {"embed.embedding": self._read("embed", (self.config.vocab_size, self.config.dim))}
    if name == "head":
      head = (self._read("embed", (self.config.vocab_size, self.config.dim)) if self.config.tie_embeddings
              else self._read("lm_head", (self.config.vocab_size, self.config.dim)))
      return {"norm.weight": self._read("norm", (self.config.dim,)), "lm_head.kernel": np.ascontiguousarray(head.T)}
    index = int(name.split(".")[1])
    return {f"layers.{index}.{leaf}": self._read_block(index, leaf, shape)
            for leaf, shape in _block_shapes(self.config).items()}

  def release(self) -> None:
    """Drop whatever the reader still holds of the part just read."""

  def close(self) -> None:
    """Release the files."""


class SafetensorsLlama(_Source):
  """A Hugging Face llama directory (config.json + model.safetensors [+ index and shards])."""

  def __init__(self, directory, n_layers: int | None = None):
    self.directory = pathlib.Path(directory)
    if not self.directory.is_dir():
      raise StreamingError(f"{self.directory} is not a directory; a safetensors source is a Hugging Face model "
                           f"directory (config.json + model.safetensors)")
    config = _hf_llama_config(self.directory)
    self.config = dataclasses.replace(config, n_layers=min(n_layers or config.n_layers, config.n_layers))
    index = self.directory / "model.safetensors.index.json"
    if index.is_file():
      weight_map = json.loads(index.read_text())["weight_map"]
      files = {name: self.directory / file for name, file in weight_map.items()}
    elif (self.directory / "model.safetensors").is_file():
      files = None
    else:
      raise StreamingError(f"{self.directory}: neither model.safetensors nor model.safetensors.index.json")
    self._files: dict[pathlib.Path, SafetensorsFile] = {}
    if files is None:
      single = SafetensorsFile(self.directory / "model.safetensors")
      self._files[single.path] = single
      self._where = {name: single for name in single.tensors}
    else:
      self._where = {}
      for name, path in files.items():
        if path not in self._files:
          self._files[path] = SafetensorsFile(path)
        self._where[name] = self._files[path]
    self.description = {"family": "llama", "name": str(self.directory), "path": str(self.directory.resolve()),
                        "n_layers": n_layers, "format": "safetensors"}

  def _tensor(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    file = self._where.get(name)
    if file is None or name not in file.tensors:
      raise StreamingError(f"{self.directory}: missing tensor {name!r}")
    array = file.read(name)
    if array.shape != shape:
      raise StreamingError(f"{file.path}: tensor {name!r} has shape {array.shape}, expected {shape}")
    if not np.all(np.isfinite(array)):
      raise StreamingError(f"{file.path}: tensor {name!r} contains NaN or Inf")
    return array

  def _read(self, what: str, shape) -> np.ndarray:
    name = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight", "lm_head": "lm_head.weight"}[what]
    return self._tensor(name, shape)

  def _read_block(self, index: int, leaf: str, shape) -> np.ndarray:
    hf, linear = _HF_BLOCK[leaf]
    if linear:  # HF stores (out, in); Flax kernels are (in, out)
      return np.ascontiguousarray(self._tensor(f"model.layers.{index}.{hf}", shape[::-1]).T)
    return self._tensor(f"model.layers.{index}.{hf}", shape)

  def close(self) -> None:
    for file in self._files.values():
      file.close()


class GGUFLlama(_Source):
  """A llama-architecture GGUF file, dequantized tensor by tensor."""

  def __init__(self, path, n_layers: int | None = None):

    self.path = pathlib.Path(path)
    self._reader = gguf_loader.open_gguf(self.path)
    config = gguf_loader.read_config(self.path)
    if not isinstance(config, LlamaConfig) or type(config) is not LlamaConfig:
      raise StreamingError(f"{self.path}: architecture {type(config).__name__}; streaming quantization reads "
                           f"llama-architecture GGUF files (load others whole with pipeline.load)")
    self.config = dataclasses.replace(config, n_layers=min(n_layers or config.n_layers, config.n_layers))
    self._tensors = {t.name: t for t in self._reader.tensors}
    self._unpermute = gguf_loader.unpermute_rope
    self.description = {"family": "llama", "name": str(path), "path": str(self.path.resolve()), "n_layers": n_layers}

  def _tensor(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    import gguf

    tensor = self._tensors.get(name)
    if tensor is None:
      raise StreamingError(f"{self.path}: missing tensor {name!r}")
    numpy_shape = tuple(int(n) for n in reversed(tensor.shape))  # ggml ne order is reversed
    if numpy_shape != shape:
      raise StreamingError(f"{self.path}: tensor {name!r} has shape {numpy_shape}, expected {shape}")
    array = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
    if not np.all(np.isfinite(array)):
      raise StreamingError(f"{self.path}: tensor {name!r} contains NaN or Inf")
    return np.array(array, copy=True) if array.base is not None else array

  def _read(self, what: str, shape) -> np.ndarray:
    name = {"embed": "token_embd.weight", "norm": "output_norm.weight", "lm_head": "output.weight"}[what]
    return self._tensor(name, shape)

  def _read_block(self, index: int, leaf: str, shape) -> np.ndarray:
    gguf_names = {"attn_norm.weight": "attn_norm", "mlp_norm.weight": "ffn_norm", "attn.q_proj.kernel": "attn_q",
                  "attn.k_proj.kernel": "attn_k", "attn.v_proj.kernel": "attn_v", "attn.o_proj.kernel": "attn_output",
                  "mlp.gate_proj.kernel": "ffn_gate", "mlp.up_proj.kernel": "ffn_up",
                  "mlp.down_proj.kernel": "ffn_down"}
    name = f"blk.{index}.{gguf_names[leaf]}.weight"
    if len(shape) == 1:
      return self._tensor(name, shape)
    w = self._tensor(name, shape[::-1])  # (out, in)
    if leaf == "attn.q_proj.kernel":
      w = self._unpermute(w, self.config.n_heads)
    elif leaf == "attn.k_proj.kernel":
      w = self._unpermute(w, self.config.n_kv_heads)
    return np.ascontiguousarray(w.T)

  def release(self) -> None:
    # The reader memory-maps the whole file; pages read for this part would otherwise stay resident.
    gguf_loader.release_pages(self._reader)


def open_source(path, n_layers: int | None = None) -> _Source:
  """A streaming source: a GGUF file or a Hugging Face llama directory (config.json + safetensors)."""
  path = pathlib.Path(path)
  if not path.exists():
    raise StreamingError(f"no model at {path}: give a .gguf file or a Hugging Face llama directory")
  if path.is_dir():
    return SafetensorsLlama(path, n_layers)
  if path.suffix == ".safetensors":
    return SafetensorsLlama(path.parent, n_layers)
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != b"GGUF":
    raise StreamingError(f"{path} is neither a GGUF file (magic {magic!r}) nor a model directory")
  return GGUFLlama(path, n_layers)


def abstract_llama(config: LlamaConfig) -> Llama:
  """A Llama of this config with abstract (shape-only) parameters: a restore template that costs no memory."""
  def build():
    weights = {"embed": jnp.zeros((config.vocab_size, config.dim)), "norm": jnp.zeros((config.dim,))}
    if not config.tie_embeddings:
      weights["lm_head"] = jnp.zeros((config.dim, config.vocab_size))
    for i in range(config.n_layers):
      for leaf, shape in _block_shapes(config).items():
        name = leaf.split(".")[-2] if leaf.endswith("kernel") else leaf.split(".")[0]
        weights[f"layers.{i}.{name}"] = jnp.zeros(shape)
    return Llama.from_weights(config, weights)

  return nnx.eval_shape(build)


# ----------------------------------------------------------------------------------------------------------------
# the loop


def check_streamable(recipe: Recipe) -> None:
  """Raise unless the recipe is a pass of rules with no calibration (what can run one block at a time alone)."""
  if recipe.procedure is not None or recipe.needs_calibration:
    raise StreamingError(f"recipe {recipe.name!r} learns from calibration data or runs over the whole model; "
                         f"streaming quantization runs rule recipes (round-to-nearest, BCQ fits, dynamic "
                         f"activation scales), e.g. zeroquant-w8a8, zeroquant-w48a16, lutgemm-rtn-q4")


@dataclasses.dataclass
class StreamReport:
  """What a streaming run did: parts written, seconds, float bytes read and bytes stored."""

  directory: str
  parts: int
  seconds: float
  read_bytes: int
  stored_bytes: int
  config: dict


def stream_quantize(source, out, recipe: Recipe, *, n_layers: int | None = None, mesh=None,
                    partition_rules: Sequence | None = None, overwrite: bool = False,
                    progress: bool = True) -> StreamReport:
  """Quantize the llama checkpoint at `source` (GGUF file or HF safetensors directory) block by block into a
  per-part jaxquant checkpoint at `out`. Peak memory: about one block's float weights and its quantized copy,
  plus the embedding table. With `mesh`, each block is split over it (partition_rules, default
  sharding.TENSOR_PARALLEL) and quantized per shard."""
  check_streamable(recipe)
  if mesh is not None:
    from jaxquant import sharding
    partition_rules = sharding.TENSOR_PARALLEL if partition_rules is None else partition_rules
  start = time.perf_counter()
  reader = source if isinstance(source, _Source) else open_source(source, n_layers)
  read_bytes = stored_bytes = 0
  try:
    names = reader.part_names()
    with checkpoint.PartWriter(out, recipe_name=recipe.name, source=reader.description,
                               overwrite=overwrite) as writer:
      for name in tqdm(names, desc="stream", unit="part", disable=not progress, leave=False):
        floats = reader.part(name)
        read_bytes += sum(a.nbytes for a in floats.values())
        quantized = quantize_part(floats, recipe, mesh, partition_rules)
        del floats
        reader.release()
        stored_bytes += formats.tree_nbytes(quantized)
        writer.write(name, quantized)
        del quantized
  finally:
    if not isinstance(source, _Source):
      reader.close()
  config = dataclasses.asdict(reader.config)
  return StreamReport(str(pathlib.Path(out).absolute()), len(names), time.perf_counter() - start, read_bytes,
                      stored_bytes, config)


def quantize_part(floats: Mapping[str, np.ndarray], recipe: Recipe, mesh=None, partition_rules=None) -> dict:
  """One part's leaves (path -> float32 numpy) quantized by the recipe's rules; on the mesh if given."""
  if mesh is None:
    arrays = {path: jnp.asarray(a) for path, a in floats.items()}
    return quantize_tree(arrays, recipe.rules, progress=False)
  from jaxquant import sharding
  return sharding.quantize_tree_sharded(dict(floats), recipe.rules, mesh, partition_rules, progress=False)


def _from_weights_name(path: str) -> str:
  """nnx state path -> Llama.from_weights key: "layers.3.attn.q_proj.kernel" -> "layers.3.q_proj"."""
  parts = path.split(".")
  if parts[0] == "layers":
    return f"layers.{parts[1]}.{parts[-2] if parts[-1] == 'kernel' else parts[2]}"
  return {"embed.embedding": "embed", "norm.weight": "norm", "lm_head.kernel": "lm_head"}[path]


def load_llama(source, n_layers: int | None = None) -> Llama:
  """The whole float model from a streaming source (for comparisons; this one holds the model in memory)."""
  reader = open_source(source, n_layers)
  try:
    weights = {}
    for name in reader.part_names():
      weights |= {_from_weights_name(path): array for path, array in reader.part(name).items()}
    if reader.config.tie_embeddings:
      weights.pop("lm_head")  # from_weights makes its own copy of the embedding
    return Llama.from_weights(reader.config, weights)
  finally:
    reader.close()


def iter_parts(source, n_layers: int | None = None) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
  """(part name, leaf path -> float32) of a source, one part at a time (for custom block-wise methods)."""
  reader = open_source(source, n_layers)
  try:
    for name in reader.part_names():
      yield name, reader.part(name)
      reader.release()
  finally:
    reader.close()


# ----------------------------------------------------------------------------------------------------------------
# writing a Hugging Face llama directory (synthetic models for tests and experiments/scaling.py)


def write_hf_llama(directory, config: LlamaConfig, seed: int = 0) -> int:
  """Write a random llama (Llama.random_weights' distribution: std 0.02 linears, norms near 1) as a Hugging
  Face directory: config.json + model.safetensors, tensor by tensor (memory: one tensor). Returns bytes written."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  d = config.dim
  shapes: list[tuple[str, tuple[int, ...], str]] = [("model.embed_tokens.weight", (config.vocab_size, d), "normal")]
  for i in range(config.n_layers):
    for leaf, shape in _block_shapes(config).items():
      hf, linear = _HF_BLOCK[leaf]
      shapes.append((f"model.layers.{i}.{hf}", shape[::-1] if linear else shape, "normal" if linear else "norm"))
  shapes.append(("model.norm.weight", (d,), "norm"))
  if not config.tie_embeddings:
    shapes.append(("lm_head.weight", (config.vocab_size, d), "normal"))
  header, offset = {}, 0
  for name, shape, _ in shapes:
    length = int(np.prod(shape)) * 4
    header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + length]}
    offset += length
  blob = json.dumps(header).encode()
  blob += b" " * (-len(blob) % 8)
  rng = np.random.default_rng(seed)
  with open(directory / "model.safetensors", "wb") as f:
    f.write(len(blob).to_bytes(8, "little") + blob)
    for name, shape, kind in shapes:
      if kind == "normal":
        array = (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
      else:
        array = (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
      f.write(array.tobytes())
  hf_config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": config.vocab_size,
               "hidden_size": d, "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
               "num_key_value_heads": config.n_kv_heads, "head_dim": config.head_dim,
               "intermediate_size": config.ffn_dim, "rope_theta": config.rope_theta,
               "rms_norm_eps": config.norm_eps, "tie_word_embeddings": config.tie_embeddings}
  (directory / "config.json").write_text(json.dumps(hf_config, indent=1))
  return 8 + len(blob) + offset
