"""The GGUF reader: a memory-mapped gguf.GGUFReader (cached per file), each tensor dequantized with
gguf.quants.dequantize to a fresh float32 array; and the metadata every llama.cpp decoder carries.

numpy shapes are ggml's `ne` reversed: a linear weight reads as (out, in).
"""

from __future__ import annotations

import functools
import mmap
import pathlib

import gguf
import numpy as np

from jaxquant.sources.base import SourceError


@functools.lru_cache(maxsize=4)
def _cached_reader(path: str, mtime_ns: int, size: int) -> gguf.GGUFReader:
  return gguf.GGUFReader(path)


def open_gguf(path) -> gguf.GGUFReader:
  """A gguf.GGUFReader (memory-mapped) for path, cached by (path, mtime, size): parsing SmolLM2's header
  (49k tokens, 49k merges) takes seconds, and the loader, tokenizer and resolve_model all need it."""
  if isinstance(path, gguf.GGUFReader):
    return path
  resolved = pathlib.Path(path).resolve()
  stat = resolved.stat()
  return _cached_reader(str(resolved), stat.st_mtime_ns, stat.st_size)


def field(reader: gguf.GGUFReader, path, key: str, default=None, required: bool = True):
  """Metadata `key`'s value; `default` when absent, SourceError naming the file and key if required and none."""
  found = reader.fields.get(key)
  if found is None:
    if required and default is None:
      raise SourceError(f"{path}: missing GGUF metadata key {key!r}")
    return default
  return found.contents()


def decoder_fields(reader: gguf.GGUFReader, path, arch: str) -> dict:
  """The config fields llama.cpp decoders share (LlamaConfig / GemmaConfig names) from `<arch>.*` and
  `tokenizer.ggml.*` metadata; SourceError for missing keys or what jaxquant does not run (unequal key/value
  head sizes, partial RoPE, RoPE scaling)."""
  get = lambda key, default=None: field(reader, path, f"{arch}.{key}", default)
  optional = lambda key: field(reader, path, key, required=False)
  dim = int(get("embedding_length"))
  n_heads = int(get("attention.head_count"))
  head_dim = int(get("attention.key_length", dim // n_heads))
  value_dim = int(get("attention.value_length", head_dim))
  if value_dim != head_dim:
    raise SourceError(f"{path}: {arch}.attention.value_length={value_dim} differs from key_length={head_dim}; "
                      "only equal key and value head sizes are supported")
  rope_dims = int(get("rope.dimension_count", head_dim))
  if rope_dims != head_dim:
    raise SourceError(f"{path}: partial RoPE ({arch}.rope.dimension_count={rope_dims}, head_dim={head_dim}) "
                      "is not supported")
  names = {t.name for t in reader.tensors}
  scaling = optional(f"{arch}.rope.scaling.type")
  if scaling not in (None, "none") or "rope_freqs.weight" in names:
    raise SourceError(f"{path}: RoPE scaling ({arch}.rope.scaling.type={scaling!r} / rope_freqs.weight) "
                      "is not supported")
  tokens = optional("tokenizer.ggml.tokens")
  vocab = get("vocab_size", len(tokens) if tokens is not None else None)
  if vocab is None:
    raise SourceError(f"{path}: neither {arch}.vocab_size nor tokenizer.ggml.tokens gives the vocabulary size")
  bos, eos = optional("tokenizer.ggml.bos_token_id"), optional("tokenizer.ggml.eos_token_id")
  context = optional(f"{arch}.context_length")
  return dict(vocab_size=int(vocab), dim=dim, n_layers=int(get("block_count")), n_heads=n_heads,
              n_kv_heads=int(get("attention.head_count_kv", n_heads)), head_dim=head_dim,
              ffn_dim=int(get("feed_forward_length")), norm_eps=float(get("attention.layer_norm_rms_epsilon")),
              tie_embeddings="output.weight" not in names, bos_token_id=None if bos is None else int(bos),
              eos_token_id=None if eos is None else int(eos), context_length=None if context is None else int(context))


def release_pages(reader: gguf.GGUFReader) -> None:
  """Drop the resident pages of the reader's memory-mapped file (MADV_DONTNEED); the mapping stays valid and
  pages come back on the next read. Touched pages of a mapped file otherwise count toward the process's memory."""
  mapping = getattr(getattr(reader, "data", None), "_mmap", None)
  if mapping is not None and hasattr(mapping, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
    mapping.madvise(mmap.MADV_DONTNEED)


class GGUFFile:
  """A GGUF file as a source reader: `read(name, shape)` dequantizes one tensor."""

  def __init__(self, path):
    self.path = pathlib.Path(path)
    self.reader = open_gguf(self.path)
    self._tensors = {t.name: t for t in self.reader.tensors}

  def read(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Tensor `name` as float32, checked to have `shape` and finite values (SourceError naming file and tensor)."""
    tensor = self._tensors.get(name)
    if tensor is None:
      raise SourceError(f"{self.path}: missing tensor {name!r}")
    numpy_shape = tuple(int(n) for n in reversed(tensor.shape))  # ggml ne order is reversed
    if numpy_shape != shape:
      raise SourceError(f"{self.path}: tensor {name!r} has shape {numpy_shape} (ggml ne {list(tensor.shape)}), "
                        f"expected {shape}")
    array = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
    if not np.all(np.isfinite(array)):
      raise SourceError(f"{self.path}: tensor {name!r} contains NaN or Inf")
    return np.array(array, copy=True) if array.base is not None else array  # nothing of the map stays referenced

  def release(self) -> None:
    # The reader memory-maps the whole file; pages read for this part would otherwise stay resident.
    release_pages(self.reader)

  def close(self) -> None:
    """Nothing to close: the memory-mapped reader is cached for the tokenizer and later loads."""
