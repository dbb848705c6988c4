"""Gemma 3 family: GemmaConfig from GGUF metadata (architecture "gemma3") and its name table.

Unlike llama, q and k are NOT permuted (llama.cpp runs gemma3 with NEOX, i.e. rotate-half, RoPE); norm weights
are stored as HF's `1 + weight`, the multiplier itself. The GGUF omits the sliding-window pattern (6), the local
RoPE base (10000) and query_pre_attn_scalar (head_dim), which llama.cpp hard-codes for gemma3, so the same
defaults are used unless the file carries `gemma3.attention.sliding_window_pattern` / `gemma3.rope.freq_base_swa`
/ `gemma3.attention.query_pre_attn_scalar`.
"""

from __future__ import annotations

import gguf

from jaxquant.models.gemma import GemmaConfig, weight_shapes
from jaxquant.sources import llama
from jaxquant.sources.base import FileTensor, SourceError, name_table
from jaxquant.sources.gguf import decoder_fields, field

_GGUF_BLOCK = llama.GGUF_BLOCK | {
    "post_attn_norm.weight": "post_attention_norm.weight", "post_mlp_norm.weight": "post_ffw_norm.weight",
    "attn.q_norm.weight": "attn_q_norm.weight", "attn.k_norm.weight": "attn_k_norm.weight",
}


def config_from_gguf(reader: gguf.GGUFReader, path) -> GemmaConfig:
  """GemmaConfig from the metadata of a GGUF file of architecture "gemma3"."""
  get = lambda key, default=None: field(reader, path, f"gemma3.{key}", default)
  optional = lambda key, default: field(reader, path, f"gemma3.{key}", default, required=False)
  shape = decoder_fields(reader, path, "gemma3")
  if shape["bos_token_id"] is None:
    raise SourceError(f"{path}: missing GGUF metadata key 'tokenizer.ggml.bos_token_id' (Gemma needs BOS)")
  add_bos = field(reader, path, "tokenizer.ggml.add_bos_token", required=False)
  return GemmaConfig(
      **shape, rope_theta=float(get("rope.freq_base", 1_000_000.0)),
      rope_local_theta=float(optional("rope.freq_base_swa", 10_000.0)),
      sliding_window=int(get("attention.sliding_window")),
      sliding_window_pattern=int(optional("attention.sliding_window_pattern", 6)),
      query_pre_attn_scalar=float(optional("attention.query_pre_attn_scalar", shape["head_dim"])),
      add_bos=True if add_bos is None else bool(add_bos))


def gguf_table(config: GemmaConfig) -> dict[str, FileTensor]:
  """State path -> tensor of a gemma3 GGUF file (q/k rows as stored)."""
  return name_table(weight_shapes(config), llama.GGUF_NAMES, _GGUF_BLOCK, "blk.", config.tie_embeddings)
