"""The GGUF reader (sources/gguf.py) and the name tables: llama.cpp's q/k permutation undone, every table naming
exactly the model's state paths, a model written as GGUF read back exactly, and errors naming file and tensor."""

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxquant import assets, checkpoint_parts
from jaxquant.models import bert, gemma, llama
from jaxquant.sources import bert as bert_names
from jaxquant.sources import gemma as gemma_names
from jaxquant.sources import llama as llama_names
from jaxquant.sources.base import SourceError, unpermute_rope
from jaxquant.sources.loading import load_model, open_source

LLAMA = llama.LlamaConfig(vocab_size=40, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4, ffn_dim=24,
                          tie_embeddings=False)


def test_unpermute_inverts_llama_cpp_permute():
  n_heads, hd, d_in = 3, 8, 5
  w = np.random.default_rng(0).standard_normal((n_heads * hd, d_in))
  permuted = w.reshape(n_heads, 2, hd // 2, d_in).swapaxes(1, 2).reshape(n_heads * hd, d_in)  # convert_hf_to_gguf
  np.testing.assert_array_equal(unpermute_rope(permuted, n_heads), w)


@pytest.mark.parametrize("tie", [False, True])
def test_every_name_table_names_exactly_the_state_paths(tie):
  config = llama.LlamaConfig(**{**LLAMA.__dict__, "tie_embeddings": tie})
  paths = set(checkpoint_parts.flat_leaves(nnx.state(llama.random_llama(config))))
  assert set(llama_names.hf_table(config)) == set(llama_names.gguf_table(config)) == paths
  gemma_config = gemma.GemmaConfig(vocab_size=40, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4, ffn_dim=24)
  assert set(gemma_names.gguf_table(gemma_config)) == set(
      checkpoint_parts.flat_leaves(nnx.state(gemma.random_gemma(gemma_config))))
  bert_config = bert.BertConfig(vocab_size=30, dim=8, n_layers=2, n_heads=2, ffn_dim=12, max_positions=16)
  shapes = bert.weight_shapes(bert_config)
  model = bert.Bert.from_weights(bert_config, {path: np.zeros(shape, np.float32) for path, shape in shapes.items()})
  assert set(bert_names.hf_table(bert_config)) == set(checkpoint_parts.flat_leaves(nnx.state(model))) == set(shapes)


def _write_llama_gguf(path, config: llama.LlamaConfig, weights: dict):
  """`weights` (state paths) as llama.cpp writes a llama: linears (out, in), q/k rows in its RoPE order."""
  writer = gguf.GGUFWriter(str(path), "llama")
  for key, value in {"embedding_length": config.dim, "block_count": config.n_layers,
                     "feed_forward_length": config.ffn_dim, "attention.head_count": config.n_heads,
                     "attention.head_count_kv": config.n_kv_heads, "vocab_size": config.vocab_size}.items():
    writer.add_uint32(f"llama.{key}", value)
  writer.add_float32("llama.attention.layer_norm_rms_epsilon", config.norm_eps)
  writer.add_float32("llama.rope.freq_base", config.rope_theta)

  def permute(w, heads):  # llama.cpp's convert_hf_to_gguf
    return w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)

  writer.add_tensor("token_embd.weight", weights["embed.embedding"])
  writer.add_tensor("output_norm.weight", weights["norm.weight"])
  writer.add_tensor("output.weight", np.ascontiguousarray(weights["lm_head.kernel"].T))
  names = {"attn_norm.weight": "attn_norm", "mlp_norm.weight": "ffn_norm", "attn.q_proj.kernel": "attn_q",
           "attn.k_proj.kernel": "attn_k", "attn.v_proj.kernel": "attn_v", "attn.o_proj.kernel": "attn_output",
           "mlp.gate_proj.kernel": "ffn_gate", "mlp.up_proj.kernel": "ffn_up", "mlp.down_proj.kernel": "ffn_down"}
  for i in range(config.n_layers):
    for leaf, name in names.items():
      array = weights[f"layers.{i}.{leaf}"]
      if array.ndim == 2:
        array = array.T
      if leaf in ("attn.q_proj.kernel", "attn.k_proj.kernel"):
        array = permute(array, config.n_heads if leaf.startswith("attn.q") else config.n_kv_heads)
      writer.add_tensor(f"blk.{i}.{name}.weight", np.ascontiguousarray(array))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


def test_a_llama_written_as_gguf_reads_back_exactly(tmp_path):
  weights = llama.random_weights(LLAMA, seed=4)
  path = _write_llama_gguf(tmp_path / "tiny.gguf", LLAMA, weights)
  with open_source(path) as source:
    assert source.family == "llama" and source.config.n_layers == 2
    assert source.part_names() == ["embed", "layers.0", "layers.1", "head"]
    read = {p: a for _, part in source.parts() for p, a in part.items()}
  assert read.keys() == weights.keys()
  for key, array in weights.items():
    np.testing.assert_array_equal(read[key], array, err_msg=key)
  loaded = checkpoint_parts.flat_leaves(nnx.state(load_model(path)))
  assert loaded.keys() == weights.keys()
  assert all(np.array_equal(loaded[key], array) for key, array in weights.items())


def _write_gguf(path, arch="llama", skip_tensor=None, nan_tensor=None):
  """A tiny float32 llama-family GGUF (2 heads, 1 kv head, 1 layer)."""
  writer = gguf.GGUFWriter(str(path), arch)
  dim, hd, ffn, vocab = 8, 4, 12, 10
  writer.add_uint32(f"{arch}.embedding_length", dim)
  writer.add_uint32(f"{arch}.block_count", 1)
  writer.add_uint32(f"{arch}.feed_forward_length", ffn)
  writer.add_uint32(f"{arch}.attention.head_count", 2)
  writer.add_uint32(f"{arch}.attention.head_count_kv", 1)
  writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
  writer.add_uint32(f"{arch}.vocab_size", vocab)
  rng = np.random.default_rng(0)
  shapes = {"token_embd.weight": (vocab, dim), "output_norm.weight": (dim,), "blk.0.attn_norm.weight": (dim,),
            "blk.0.ffn_norm.weight": (dim,), "blk.0.attn_q.weight": (dim, dim), "blk.0.attn_k.weight": (hd, dim),
            "blk.0.attn_v.weight": (hd, dim), "blk.0.attn_output.weight": (dim, dim),
            "blk.0.ffn_gate.weight": (ffn, dim), "blk.0.ffn_up.weight": (ffn, dim), "blk.0.ffn_down.weight": (dim, ffn)}
  for name, shape in shapes.items():
    if name != skip_tensor:
      array = rng.standard_normal(shape).astype(np.float32)
      if name == nan_tensor:
        array[0] = np.nan
      writer.add_tensor(name, array)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


def test_user_gguf_loads_and_errors_name_file_and_tensor(tmp_path):
  model = load_model(_write_gguf(tmp_path / "ok.gguf"), family="llama")
  assert model(jnp.zeros((1, 3), jnp.int32)).shape == (1, 3, 10)
  assert assets.resolve_model(tmp_path / "ok.gguf") == ("llama", tmp_path / "ok.gguf")
  with pytest.raises(SourceError, match=r"missing.gguf.*'blk.0.ffn_up.weight'"):
    load_model(_write_gguf(tmp_path / "missing.gguf", skip_tensor="blk.0.ffn_up.weight"), family="llama")
  with pytest.raises(SourceError, match=r"nan.gguf.*'blk.0.attn_v.weight'.*NaN"):
    load_model(_write_gguf(tmp_path / "nan.gguf", nan_tensor="blk.0.attn_v.weight"), family="llama")
  with pytest.raises(SourceError, match=r"gpt2.gguf.*architecture 'gpt2'"):
    load_model(_write_gguf(tmp_path / "gpt2.gguf", arch="gpt2"), family="llama")
  with pytest.raises(ValueError, match="architecture 'gpt2'"):
    assets.resolve_model(tmp_path / "gpt2.gguf")
  with pytest.raises(SourceError, match=r"ok.gguf: GGUF architecture 'llama' is not gemma3"):
    load_model(tmp_path / "ok.gguf", family="gemma3")
