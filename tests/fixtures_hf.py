"""Writing a Hugging Face llama directory (config.json + model.safetensors): synthetic models for the streaming
and source tests (experiments/scaling.py imports it too). Written here, apart from jaxquant.sources, so the
readers are checked against a writer of their own."""

import json
import pathlib

import numpy as np

from jaxquant.models.llama import LlamaConfig

# Block leaves in writing order: (HF name inside model.layers.<i>., HF shape (linears (out, in)), kind)
_BLOCK = (("input_layernorm.weight", "dim", None, "norm"), ("post_attention_layernorm.weight", "dim", None, "norm"),
          ("self_attn.q_proj.weight", "q", "dim", "normal"), ("self_attn.k_proj.weight", "kv", "dim", "normal"),
          ("self_attn.v_proj.weight", "kv", "dim", "normal"), ("self_attn.o_proj.weight", "dim", "q", "normal"),
          ("mlp.gate_proj.weight", "ffn", "dim", "normal"), ("mlp.up_proj.weight", "ffn", "dim", "normal"),
          ("mlp.down_proj.weight", "dim", "ffn", "normal"))


def write_hf_llama(directory, config: LlamaConfig, seed: int = 0) -> int:
  """Write a random llama (Llama.random_weights' distribution: std 0.02 linears, norms near 1) as a Hugging
  Face directory: config.json + model.safetensors, tensor by tensor (memory: one tensor). Returns bytes written."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  d = config.dim
  sizes = {"dim": d, "q": config.n_heads * config.head_dim, "kv": config.n_kv_heads * config.head_dim,
           "ffn": config.ffn_dim}
  shapes: list[tuple[str, tuple[int, ...], str]] = [("model.embed_tokens.weight", (config.vocab_size, d), "normal")]
  for i in range(config.n_layers):
    for name, rows, cols, kind in _BLOCK:
      shape = (sizes[rows],) if cols is None else (sizes[rows], sizes[cols])
      shapes.append((f"model.layers.{i}.{name}", shape, kind))
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
