"""Load a llama-family GGUF checkpoint (e.g. SmolLM2-135M Q4_1) as a float32 `Llama`, or a Gemma 3 one
(architecture `gemma3`, e.g. Gemma-3-270M Q4_K_M) as a float32 `gemma.Gemma`.

Every tensor is dequantized with `gguf.quants.dequantize` to float32; that float model is the full-precision
reference. GGUF conventions handled here:
  * numpy shapes are ggml's `ne` reversed: a linear weight is (out, in); we transpose to Flax (in, out);
  * llama.cpp stores q and k rows in its own RoPE order; they are un-permuted back to HF's rotate-half order;
  * no `output.weight` means the output head is tied to `token_embd.weight`;
  * gemma3: q and k are NOT permuted (llama.cpp runs gemma3 with NEOX, i.e. rotate-half, RoPE); norm weights
    are stored as HF's `1 + weight`; the GGUF omits the sliding-window pattern (6), the local RoPE base (10000)
    and query_pre_attn_scalar (head_dim), which llama.cpp hard-codes for gemma3, so the same defaults are used
    unless the file carries `gemma3.attention.sliding_window_pattern` / `gemma3.rope.freq_base_swa` /
    `gemma3.attention.query_pre_attn_scalar`.
"""

from __future__ import annotations

import dataclasses
import functools
import mmap
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.models.gemma import Gemma, GemmaConfig
from jaxquant.models.llama import Llama, LlamaConfig

SUPPORTED_ARCHITECTURES = ("llama", "gemma3")


class GGUFError(ValueError):
  """A GGUF file that cannot be loaded: names the file and the key or tensor at fault."""


@functools.lru_cache(maxsize=4)
def _cached_reader(path: str, mtime_ns: int, size: int):
  import gguf
  return gguf.GGUFReader(path)


def open_gguf(path):
  """A gguf.GGUFReader (memory-mapped) for path, cached by (path, mtime, size): parsing SmolLM2's header
  (49k tokens, 49k merges) takes seconds, and the loader, tokenizer and resolve_model all need it."""
  import gguf
  if isinstance(path, gguf.GGUFReader):
    return path
  resolved = Path(path).resolve()
  stat = resolved.stat()
  return _cached_reader(str(resolved), stat.st_mtime_ns, stat.st_size)


def _field(reader, path, key, default=None, required=True):
  field = reader.fields.get(key)
  if field is None:
    if required and default is None:
      raise GGUFError(f"{path}: missing GGUF metadata key {key!r}")
    return default
  return field.contents()


def architecture(path) -> str:
  """The GGUF's `general.architecture`, checked to be one this loader supports (else GGUFError)."""
  return _architecture(open_gguf(path), path)


def _architecture(reader, path) -> str:
  arch = _field(reader, path, "general.architecture")
  if arch not in SUPPORTED_ARCHITECTURES:
    raise GGUFError(f"{path}: GGUF architecture {arch!r} is not supported "
                    f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
  return arch


def read_config(path: str | os.PathLike) -> LlamaConfig | GemmaConfig:
  """LlamaConfig (arch `llama`) or GemmaConfig (arch `gemma3`) from the GGUF's metadata; raises GGUFError for
  another architecture or missing keys."""
  return _config(open_gguf(path), path)


def _config(reader, path) -> LlamaConfig | GemmaConfig:
  arch = _architecture(reader, path)
  get = lambda key, default=None: _field(reader, path, f"{arch}.{key}", default)
  dim = int(get("embedding_length"))
  n_heads = int(get("attention.head_count"))
  n_kv_heads = int(get("attention.head_count_kv", n_heads))
  head_dim = int(get("attention.key_length", dim // n_heads))
  value_dim = int(get("attention.value_length", head_dim))
  if value_dim != head_dim:
    raise GGUFError(f"{path}: {arch}.attention.value_length={value_dim} differs from key_length={head_dim}; "
                    "only equal key and value head sizes are supported")
  rope_dims = int(get("rope.dimension_count", head_dim))
  if rope_dims != head_dim:
    raise GGUFError(f"{path}: partial RoPE ({arch}.rope.dimension_count={rope_dims}, head_dim={head_dim}) "
                    "is not supported")
  scaling = _field(reader, path, f"{arch}.rope.scaling.type", required=False)
  if scaling not in (None, "none") or "rope_freqs.weight" in {t.name for t in reader.tensors}:
    raise GGUFError(f"{path}: RoPE scaling ({arch}.rope.scaling.type={scaling!r} / rope_freqs.weight) "
                    "is not supported")
  tokens = _field(reader, path, "tokenizer.ggml.tokens", required=False)
  vocab = get("vocab_size", len(tokens) if tokens is not None else None)
  if vocab is None:
    raise GGUFError(f"{path}: neither {arch}.vocab_size nor tokenizer.ggml.tokens gives the vocabulary size")
  names = {t.name for t in reader.tensors}
  bos = _field(reader, path, "tokenizer.ggml.bos_token_id", required=False)
  eos = _field(reader, path, "tokenizer.ggml.eos_token_id", required=False)
  add_bos = _field(reader, path, "tokenizer.ggml.add_bos_token", required=False)
  context = _field(reader, path, f"{arch}.context_length", required=False)
  shape = dict(vocab_size=int(vocab), dim=dim, n_layers=int(get("block_count")), n_heads=n_heads,
               n_kv_heads=n_kv_heads, head_dim=head_dim, ffn_dim=int(get("feed_forward_length")),
               norm_eps=float(get("attention.layer_norm_rms_epsilon")), tie_embeddings="output.weight" not in names,
               bos_token_id=None if bos is None else int(bos), eos_token_id=None if eos is None else int(eos),
               context_length=None if context is None else int(context))
  if arch == "gemma3":
    if bos is None:
      raise GGUFError(f"{path}: missing GGUF metadata key 'tokenizer.ggml.bos_token_id' (Gemma needs BOS)")
    optional = lambda key, default: _field(reader, path, f"{arch}.{key}", default, required=False)
    return GemmaConfig(
        **shape, rope_theta=float(get("rope.freq_base", 1_000_000.0)),
        rope_local_theta=float(optional("rope.freq_base_swa", 10_000.0)),
        sliding_window=int(get("attention.sliding_window")),
        sliding_window_pattern=int(optional("attention.sliding_window_pattern", 6)),
        query_pre_attn_scalar=float(optional("attention.query_pre_attn_scalar", head_dim)),
        add_bos=True if add_bos is None else bool(add_bos))
  return LlamaConfig(**shape, rope_theta=float(get("rope.freq_base", 10000.0)), add_bos=bool(add_bos or False))


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undo llama.cpp's q/k row permutation. w: (n_heads*hd, in) in GGUF order -> same shape, HF order.

  llama.cpp's converter did w.reshape(n_heads, 2, hd//2, in).swapaxes(1, 2) (interleaving the two halves of
  each head); this is its inverse.
  """
  out_features, in_features = w.shape
  hd = out_features // n_heads
  return w.reshape(n_heads, hd // 2, 2, in_features).swapaxes(1, 2).reshape(out_features, in_features)


def _owned(array: np.ndarray) -> jax.Array:
  """A float32 jax array of its own: each dequantized numpy tensor is freed as soon as it is converted, so loading
  holds about one model, not a numpy model and its jax copy at once."""
  return jnp.array(array, dtype=jnp.float32)


def release_pages(reader) -> None:
  """Drop the resident pages of the reader's memory-mapped file (MADV_DONTNEED); the mapping stays valid and
  pages come back on the next read. Touched pages of a mapped file otherwise count toward the process's memory."""
  mapping = getattr(getattr(reader, "data", None), "_mmap", None)
  if mapping is not None and hasattr(mapping, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
    mapping.madvise(mmap.MADV_DONTNEED)


def load_weights(path: str | os.PathLike, n_layers: int | None = None
                 ) -> tuple[LlamaConfig | GemmaConfig, dict[str, jax.Array]]:
  """(config, weights) in `Llama.from_weights` / `Gemma.from_weights` format (by the file's architecture),
  float32 jax arrays, kernels (in, out).

  n_layers: keep only the first n_layers blocks (config.n_layers is set accordingly); None keeps all.
  Raises GGUFError naming the file and tensor for a missing tensor, a wrong shape or a NaN/Inf value.
  """
  import gguf
  reader = open_gguf(path)
  config = _config(reader, path)
  if n_layers is not None:
    config = dataclasses.replace(config, n_layers=min(n_layers, config.n_layers))
  gemma = isinstance(config, GemmaConfig)
  tensors = {t.name: t for t in reader.tensors}
  d, hd, f = config.dim, config.head_dim, config.ffn_dim

  def load(name: str, shape: tuple[int, ...]) -> np.ndarray:
    tensor = tensors.get(name)
    if tensor is None:
      raise GGUFError(f"{path}: missing tensor {name!r}")
    numpy_shape = tuple(int(n) for n in reversed(tensor.shape))  # ggml ne order is reversed
    if numpy_shape != shape:
      raise GGUFError(f"{path}: tensor {name!r} has shape {numpy_shape} (ggml ne {list(tensor.shape)}), "
                      f"expected {shape}")
    array = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    array = array.reshape(shape)
    if not np.all(np.isfinite(array)):
      raise GGUFError(f"{path}: tensor {name!r} contains NaN or Inf")
    return array

  # llama.cpp permutes q/k rows for llama only; gemma3 runs NEOX (rotate-half) RoPE on the rows as stored.
  rope_order = (lambda w, heads: w) if gemma else unpermute_rope
  weights = {"embed": _owned(load("token_embd.weight", (config.vocab_size, d))),
             "norm": _owned(load("output_norm.weight", (d,)))}
  if not config.tie_embeddings:
    weights["lm_head"] = _owned(load("output.weight", (config.vocab_size, d)).T)
  q_out, kv_out = config.n_heads * hd, config.n_kv_heads * hd
  for i in range(config.n_layers):
    blk = f"blk.{i}."
    weights |= {
        f"layers.{i}.attn_norm": _owned(load(blk + "attn_norm.weight", (d,))),
        f"layers.{i}.mlp_norm": _owned(load(blk + "ffn_norm.weight", (d,))),
        f"layers.{i}.q_proj": _owned(rope_order(load(blk + "attn_q.weight", (q_out, d)), config.n_heads).T),
        f"layers.{i}.k_proj": _owned(rope_order(load(blk + "attn_k.weight", (kv_out, d)), config.n_kv_heads).T),
        f"layers.{i}.v_proj": _owned(load(blk + "attn_v.weight", (kv_out, d)).T),
        f"layers.{i}.o_proj": _owned(load(blk + "attn_output.weight", (d, q_out)).T),
        f"layers.{i}.gate_proj": _owned(load(blk + "ffn_gate.weight", (f, d)).T),
        f"layers.{i}.up_proj": _owned(load(blk + "ffn_up.weight", (f, d)).T),
        f"layers.{i}.down_proj": _owned(load(blk + "ffn_down.weight", (d, f)).T),
    }
    if gemma:
      weights |= {
          f"layers.{i}.post_attn_norm": _owned(load(blk + "post_attention_norm.weight", (d,))),
          f"layers.{i}.post_mlp_norm": _owned(load(blk + "post_ffw_norm.weight", (d,))),
          f"layers.{i}.q_norm": _owned(load(blk + "attn_q_norm.weight", (hd,))),
          f"layers.{i}.k_norm": _owned(load(blk + "attn_k_norm.weight", (hd,))),
      }
  release_pages(reader)
  return config, weights


def load_llama_gguf(path: str | os.PathLike, n_layers: int | None = None) -> Llama:
  """A float32 `Llama` from a llama-family GGUF file (first n_layers blocks only if given)."""
  if (arch := architecture(path)) != "llama":
    raise GGUFError(f"{path}: GGUF architecture {arch!r} is not the llama family; load it with load_gguf")
  config, weights = load_weights(Path(path), n_layers)
  return Llama.from_weights(config, weights)


def load_gemma_gguf(path: str | os.PathLike, n_layers: int | None = None) -> Gemma:
  """A float32 `Gemma` from a Gemma 3 (`gemma3`) GGUF file (first n_layers blocks only if given)."""
  if (arch := architecture(path)) != "gemma3":
    raise GGUFError(f"{path}: GGUF architecture {arch!r} is not gemma3; load it with load_gguf")
  config, weights = load_weights(Path(path), n_layers)
  return Gemma.from_weights(config, weights)


def load_gguf(path: str | os.PathLike, n_layers: int | None = None) -> Llama | Gemma:
  """A float32 model of whichever supported architecture the GGUF file holds (see SUPPORTED_ARCHITECTURES)."""
  config, weights = load_weights(Path(path), n_layers)
  return (Gemma if isinstance(config, GemmaConfig) else Llama).from_weights(config, weights)
