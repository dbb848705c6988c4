"""Llama family: LlamaConfig from a Hugging Face config.json or GGUF metadata (architecture "llama"), and the
name tables of both formats (state path -> file tensor). Linears are stored (out, in) and transposed to Flax
(in, out); llama.cpp stores q and k rows in its own RoPE order, un-permuted to HF's rotate-half order; a tied
head (no lm_head.weight / output.weight) is the embedding, transposed.
"""

from __future__ import annotations

import gguf

from jaxquant.models.llama import LlamaConfig, weight_shapes
from jaxquant.sources.base import FileTensor, SourceError, name_table
from jaxquant.sources.gguf import decoder_fields, field

_HF_NAMES = {"embed.embedding": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "lm_head.kernel": "lm_head.weight"}
_HF_BLOCK = {  # leaf path inside layers.<i>. -> name inside model.layers.<i>.
    "attn_norm.weight": "input_layernorm.weight", "mlp_norm.weight": "post_attention_layernorm.weight",
    "attn.q_proj.kernel": "self_attn.q_proj.weight", "attn.k_proj.kernel": "self_attn.k_proj.weight",
    "attn.v_proj.kernel": "self_attn.v_proj.weight", "attn.o_proj.kernel": "self_attn.o_proj.weight",
    "mlp.gate_proj.kernel": "mlp.gate_proj.weight", "mlp.up_proj.kernel": "mlp.up_proj.weight",
    "mlp.down_proj.kernel": "mlp.down_proj.weight",
}
GGUF_NAMES = {"embed.embedding": "token_embd.weight", "norm.weight": "output_norm.weight",
              "lm_head.kernel": "output.weight"}
GGUF_BLOCK = {  # leaf path inside layers.<i>. -> name inside blk.<i>. (gemma3 adds its own)
    "attn_norm.weight": "attn_norm.weight", "mlp_norm.weight": "ffn_norm.weight",
    "attn.q_proj.kernel": "attn_q.weight", "attn.k_proj.kernel": "attn_k.weight",
    "attn.v_proj.kernel": "attn_v.weight", "attn.o_proj.kernel": "attn_output.weight",
    "mlp.gate_proj.kernel": "ffn_gate.weight", "mlp.up_proj.kernel": "ffn_up.weight",
    "mlp.down_proj.kernel": "ffn_down.weight",
}


def config_from_hf(raw: dict, file) -> LlamaConfig:
  """LlamaConfig from a parsed config.json (`file` names it in errors)."""
  if raw.get("model_type") != "llama":
    raise SourceError(f"{file}: model_type {raw.get('model_type')!r} is not 'llama'")
  if raw.get("rope_scaling"):
    raise SourceError(f"{file}: rope_scaling {raw['rope_scaling']!r} is not supported")
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
    raise SourceError(f"{file}: missing key {err.args[0]!r}") from None


def config_from_gguf(reader: gguf.GGUFReader, path) -> LlamaConfig:
  """LlamaConfig from the metadata of a GGUF file of architecture "llama"."""
  add_bos = field(reader, path, "tokenizer.ggml.add_bos_token", required=False)
  return LlamaConfig(**decoder_fields(reader, path, "llama"),
                     rope_theta=float(field(reader, path, "llama.rope.freq_base", 10000.0)),
                     add_bos=bool(add_bos or False))


def hf_table(config: LlamaConfig) -> dict[str, FileTensor]:
  """State path -> tensor of a Hugging Face llama checkpoint."""
  return name_table(weight_shapes(config), _HF_NAMES, _HF_BLOCK, "model.layers.", config.tie_embeddings)


def gguf_table(config: LlamaConfig) -> dict[str, FileTensor]:
  """State path -> tensor of a llama GGUF file."""
  return name_table(weight_shapes(config), GGUF_NAMES, GGUF_BLOCK, "blk.", config.tie_embeddings,
                    {"attn.q_proj.kernel": config.n_heads, "attn.k_proj.kernel": config.n_kv_heads})
