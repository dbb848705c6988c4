"""BERT family: BertConfig from a Hugging Face config.json and its name table (tensor names may carry a "bert."
prefix, which the directory reader tries). Linears are stored (out, in) and transposed to Flax (in, out).
"""

from __future__ import annotations

from jaxquant.models.bert import BertConfig, weight_shapes
from jaxquant.sources.base import FileTensor, SourceError, name_table

HF_PREFIX = "bert."  # some checkpoints name every tensor bert.<name>
_GELU = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True}
_HF_NAMES = {
    "embeddings.word_embeddings": "embeddings.word_embeddings.weight",
    "embeddings.position_embeddings": "embeddings.position_embeddings.weight",
    "embeddings.token_type_embeddings": "embeddings.token_type_embeddings.weight",
    "embeddings.emb_norm.weight": "embeddings.LayerNorm.weight",
    "embeddings.emb_norm.bias": "embeddings.LayerNorm.bias",
}
_HF_BLOCK = {  # leaf path inside layers.<i>. -> name inside encoder.layer.<i>.
    "attn.q_proj.kernel": "attention.self.query.weight", "attn.q_proj.bias": "attention.self.query.bias",
    "attn.k_proj.kernel": "attention.self.key.weight", "attn.k_proj.bias": "attention.self.key.bias",
    "attn.v_proj.kernel": "attention.self.value.weight", "attn.v_proj.bias": "attention.self.value.bias",
    "attn.o_proj.kernel": "attention.output.dense.weight", "attn.o_proj.bias": "attention.output.dense.bias",
    "attn_norm.weight": "attention.output.LayerNorm.weight", "attn_norm.bias": "attention.output.LayerNorm.bias",
    "mlp.up_proj.kernel": "intermediate.dense.weight", "mlp.up_proj.bias": "intermediate.dense.bias",
    "mlp.down_proj.kernel": "output.dense.weight", "mlp.down_proj.bias": "output.dense.bias",
    "mlp_norm.weight": "output.LayerNorm.weight", "mlp_norm.bias": "output.LayerNorm.bias",
}


def config_from_hf(raw: dict, file) -> BertConfig:
  """BertConfig from a parsed config.json (`file` names it in errors)."""
  if raw.get("model_type", "bert") != "bert":
    raise SourceError(f"{file}: model_type {raw.get('model_type')!r} is not 'bert'")
  if raw.get("position_embedding_type", "absolute") != "absolute":
    raise SourceError(f"{file}: position_embedding_type {raw['position_embedding_type']!r} "
                      "is not supported (only 'absolute')")
  act = raw.get("hidden_act", "gelu")
  if act not in _GELU:
    raise SourceError(f"{file}: hidden_act {act!r} is not supported ({', '.join(_GELU)})")
  try:
    return BertConfig(vocab_size=raw["vocab_size"], dim=raw["hidden_size"], n_layers=raw["num_hidden_layers"],
                      n_heads=raw["num_attention_heads"], ffn_dim=raw["intermediate_size"],
                      max_positions=raw.get("max_position_embeddings", 512),
                      n_token_types=raw.get("type_vocab_size", 2), norm_eps=raw.get("layer_norm_eps", 1e-12),
                      gelu_approximate=_GELU[act])
  except KeyError as e:
    raise SourceError(f"{file}: missing key {e.args[0]!r}") from e


def hf_table(config: BertConfig) -> dict[str, FileTensor]:
  """State path -> tensor of a Hugging Face BERT checkpoint (names without the "bert." prefix)."""
  return name_table(weight_shapes(config), _HF_NAMES, _HF_BLOCK, "encoder.layer.")
