"""safetensors readers on small hand-made files: the BERT loader (models/safetensors_loader.py) and the streaming
reader (streaming.SafetensorsFile / SafetensorsLlama): each error names the file and what is wrong; dtypes
are read exactly."""

import json

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxquant import streaming
from jaxquant.models.safetensors_loader import load_bert_weights, read_bert_config
from jaxquant.streaming import StreamingError

BERT_CONFIG = {"model_type": "bert", "vocab_size": 10, "hidden_size": 4, "num_hidden_layers": 2,
               "num_attention_heads": 2, "intermediate_size": 6, "max_position_embeddings": 8, "type_vocab_size": 2,
               "layer_norm_eps": 1e-12, "hidden_act": "gelu"}


def _bert_tensors(n_layers=2, prefix=""):
  rng = np.random.default_rng(0)
  shapes = {"embeddings.word_embeddings.weight": (10, 4), "embeddings.position_embeddings.weight": (8, 4),
            "embeddings.token_type_embeddings.weight": (2, 4), "embeddings.LayerNorm.weight": (4,),
            "embeddings.LayerNorm.bias": (4,)}
  for i in range(n_layers):
    for name, (out, inp) in {"attention.self.query": (4, 4), "attention.self.key": (4, 4),
                             "attention.self.value": (4, 4), "attention.output.dense": (4, 4),
                             "intermediate.dense": (6, 4), "output.dense": (4, 6)}.items():
      shapes[f"encoder.layer.{i}.{name}.weight"] = (out, inp)
      shapes[f"encoder.layer.{i}.{name}.bias"] = (out,)
    for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
      shapes[f"encoder.layer.{i}.{norm}.weight"] = (4,)
      shapes[f"encoder.layer.{i}.{norm}.bias"] = (4,)
  return {prefix + k: rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()}


def _bert_dir(path, config=None, tensors=None):
  path.mkdir()
  (path / "config.json").write_text(json.dumps(BERT_CONFIG if config is None else config))
  save_file(_bert_tensors() if tensors is None else tensors, str(path / "model.safetensors"))
  return path


def test_bert_loader_reads_hf_layout_with_or_without_prefix(tmp_path):
  tensors = _bert_tensors()
  config, weights = load_bert_weights(_bert_dir(tmp_path / "plain", tensors=tensors))
  _, prefixed = load_bert_weights(_bert_dir(tmp_path / "prefixed", tensors=_bert_tensors(prefix="bert.")))
  assert (config.dim, config.n_layers, config.n_heads, config.ffn_dim, config.gelu_approximate) == (4, 2, 2, 6, False)
  # HF (out, in) -> Flax (in, out); the up projection is non-square, so a lost transpose shows.
  np.testing.assert_array_equal(weights["layers.1.up_proj.kernel"],
                                tensors["encoder.layer.1.intermediate.dense.weight"].T)
  np.testing.assert_array_equal(weights["layers.0.mlp_norm.bias"], tensors["encoder.layer.0.output.LayerNorm.bias"])
  assert weights.keys() == prefixed.keys()
  assert all(np.array_equal(weights[k], prefixed[k]) for k in weights)
  one, _ = load_bert_weights(tmp_path / "plain", n_layers=1)
  assert one.n_layers == 1
  (tmp_path / "plain" / "config.json").write_text(json.dumps(dict(BERT_CONFIG, hidden_act="gelu_new")))
  assert read_bert_config(tmp_path / "plain").gelu_approximate


@pytest.mark.parametrize("change,message", [
    ({"model_type": "roberta"}, r"config.json: model_type 'roberta' is not 'bert'"),
    ({"position_embedding_type": "relative_key"}, r"config.json: position_embedding_type 'relative_key' is not "
                                                   r"supported \(only 'absolute'\)"),
    ({"hidden_act": "relu"}, r"config.json: hidden_act 'relu' is not supported \(gelu, gelu_new, gelu_pytorch_tanh\)"),
    ({"hidden_size": None}, r"config.json: missing key 'hidden_size'"),
])
def test_bert_config_errors_name_file_and_key(tmp_path, change, message):
  config = {k: v for k, v in {**BERT_CONFIG, **change}.items() if v is not None}
  with pytest.raises(ValueError, match=message):
    load_bert_weights(_bert_dir(tmp_path / "m", config=config))


def test_bert_tensor_errors_name_file_and_tensor(tmp_path):
  tensors = _bert_tensors()
  del tensors["encoder.layer.1.attention.self.key.bias"]
  with pytest.raises(ValueError, match=r"missing/model.safetensors: missing tensor "
                                       r"'encoder.layer.1.attention.self.key.bias'"):
    load_bert_weights(_bert_dir(tmp_path / "missing", tensors=tensors))
  tensors = _bert_tensors()
  tensors["encoder.layer.0.output.dense.weight"] = tensors["encoder.layer.0.output.dense.weight"].T.copy()
  with pytest.raises(ValueError, match=r"shape/model.safetensors: tensor 'encoder.layer.0.output.dense.weight' has "
                                       r"shape \(6, 4\), expected \(4, 6\)"):
    load_bert_weights(_bert_dir(tmp_path / "shape", tensors=tensors))
  tensors = _bert_tensors()
  tensors["embeddings.position_embeddings.weight"][3, 1] = np.inf
  with pytest.raises(ValueError, match=r"inf/model.safetensors: tensor 'embeddings.position_embeddings.weight' "
                                       r"contains NaN or Inf"):
    load_bert_weights(_bert_dir(tmp_path / "inf", tensors=tensors))


# ------------------------------------------------------------------------------------------- streaming reader


def test_streaming_reader_reads_every_float_dtype_exactly(tmp_path):
  values = np.random.default_rng(1).standard_normal((3, 5))
  arrays = {"f32": values.astype(np.float32), "f16": values.astype(np.float16), "f64": values,
            "bf16": values.astype(ml_dtypes.bfloat16)}
  save_file(arrays, str(tmp_path / "m.safetensors"))
  file = streaming.SafetensorsFile(tmp_path / "m.safetensors")
  try:
    for name, array in arrays.items():
      got = file.read(name)
      assert got.dtype == np.float32 and got.shape == (3, 5)
      np.testing.assert_array_equal(got, array.astype(np.float32), err_msg=name)  # each exactly representable
  finally:
    file.close()


def _raw(path, header: bytes, body: bytes = b"", length=None):
  path.write_bytes((len(header) if length is None else length).to_bytes(8, "little") + header + body)
  return path


def test_streaming_reader_errors_name_the_file(tmp_path):
  (tmp_path / "tiny.safetensors").write_bytes(b"\x01\x02")
  with pytest.raises(StreamingError, match=r"tiny.safetensors is not a safetensors file: shorter than its 8-byte"):
    streaming.SafetensorsFile(tmp_path / "tiny.safetensors")
  with pytest.raises(StreamingError, match=r"long.safetensors is not a safetensors file: header length 4096 exceeds"):
    streaming.SafetensorsFile(_raw(tmp_path / "long.safetensors", b"{}", length=4096))
  with pytest.raises(StreamingError, match=r"json.safetensors: the safetensors header cannot be parsed"):
    streaming.SafetensorsFile(_raw(tmp_path / "json.safetensors", b"{not json"))
  header = json.dumps({"x": {"dtype": "I32", "shape": [2], "data_offsets": [0, 8]}}).encode()
  with pytest.raises(StreamingError, match=r"int.safetensors: tensor 'x' has dtype I32; streaming reads F32, F16, "
                                           r"BF16, F64"):
    streaming.SafetensorsFile(_raw(tmp_path / "int.safetensors", header, bytes(8)))
  header = json.dumps({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode()
  with pytest.raises(StreamingError, match=r"offsets.safetensors: tensor 'x' \(F32 \[3\]\) has data offsets \[0, 8\) "
                                           r"that do not fit its shape"):
    streaming.SafetensorsFile(_raw(tmp_path / "offsets.safetensors", header, bytes(8)))
  with pytest.raises(StreamingError, match=r"cannot open .*absent.safetensors"):
    streaming.SafetensorsFile(tmp_path / "absent.safetensors")


LLAMA_CONFIG = {"model_type": "llama", "vocab_size": 8, "hidden_size": 4, "num_hidden_layers": 1,
                "num_attention_heads": 2, "intermediate_size": 6}


def test_hf_llama_source_errors_name_file_and_fix(tmp_path):
  directory = tmp_path / "m"
  directory.mkdir()
  with pytest.raises(StreamingError, match=r"m: no config.json; a safetensors source is a Hugging Face model "
                                           r"directory"):
    streaming.open_source(directory)
  (directory / "config.json").write_text("{")
  with pytest.raises(StreamingError, match=r"config.json cannot be parsed"):
    streaming.open_source(directory)
  (directory / "config.json").write_text(json.dumps(dict(LLAMA_CONFIG, rope_scaling={"type": "linear", "factor": 2})))
  with pytest.raises(StreamingError, match=r"config.json: rope_scaling \{'type': 'linear', 'factor': 2\} is not "
                                           r"supported"):
    streaming.open_source(directory)
  without = {k: v for k, v in LLAMA_CONFIG.items() if k != "intermediate_size"}
  (directory / "config.json").write_text(json.dumps(without))
  with pytest.raises(StreamingError, match=r"config.json: missing key 'intermediate_size'"):
    streaming.open_source(directory)
  (directory / "config.json").write_text(json.dumps(LLAMA_CONFIG))
  with pytest.raises(StreamingError, match=r"m: neither model.safetensors nor model.safetensors.index.json"):
    streaming.open_source(directory)
  save_file({"model.embed_tokens.weight": np.zeros((8, 5), np.float32)}, str(directory / "model.safetensors"))
  source = streaming.open_source(directory)
  try:
    with pytest.raises(StreamingError, match=r"model.safetensors: tensor 'model.embed_tokens.weight' has shape "
                                             r"\(8, 5\), expected \(8, 4\)"):
      source.part("embed")
  finally:
    source.close()
  with pytest.raises(StreamingError, match=r"config.json is not a directory"):
    streaming.SafetensorsLlama(directory / "config.json")
