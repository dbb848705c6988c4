"""The safetensors reader (sources/safetensors.py) on small hand-made files, read as BERT and llama sources
(sources/loading.py): each error names the file and what is wrong; dtypes are read exactly."""

import json

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from fixtures_hf import write_hf_llama
from jaxquant.models.llama import LlamaConfig
from jaxquant.sources.base import SourceError
from jaxquant.sources.loading import open_source, read_config
from jaxquant.sources.safetensors import HFDirectory, SafetensorsFile

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


def load_bert_weights(path, n_layers=None):
  """(config, state path -> float32) of a BERT directory, read through its source."""
  with open_source(path, n_layers, family="bert") as source:
    return source.config, {path: array for _, part in source.parts() for path, array in part.items()}


def test_bert_loader_reads_hf_layout_with_or_without_prefix(tmp_path):
  tensors = _bert_tensors()
  config, weights = load_bert_weights(_bert_dir(tmp_path / "plain", tensors=tensors))
  _, prefixed = load_bert_weights(_bert_dir(tmp_path / "prefixed", tensors=_bert_tensors(prefix="bert.")))
  assert (config.dim, config.n_layers, config.n_heads, config.ffn_dim, config.gelu_approximate) == (4, 2, 2, 6, False)
  # HF (out, in) -> Flax (in, out); the up projection is non-square, so a lost transpose shows.
  np.testing.assert_array_equal(weights["layers.1.mlp.up_proj.kernel"],
                                tensors["encoder.layer.1.intermediate.dense.weight"].T)
  np.testing.assert_array_equal(weights["layers.0.mlp_norm.bias"], tensors["encoder.layer.0.output.LayerNorm.bias"])
  assert weights.keys() == prefixed.keys()
  assert all(np.array_equal(weights[k], prefixed[k]) for k in weights)
  one, _ = load_bert_weights(tmp_path / "plain", n_layers=1)
  assert one.n_layers == 1
  (tmp_path / "plain" / "config.json").write_text(json.dumps(dict(BERT_CONFIG, hidden_act="gelu_new")))
  assert read_config(tmp_path / "plain").gelu_approximate


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
  file = SafetensorsFile(tmp_path / "m.safetensors")
  try:
    for name, array in arrays.items():
      got = file.read(name)
      assert got.dtype == np.float32 and got.shape == (3, 5)
      np.testing.assert_array_equal(got, array.astype(np.float32), err_msg=name)  # each exactly representable
  finally:
    file.close()


def test_reader_matches_the_safetensors_library(tmp_path):
  write_hf_llama(tmp_path / "hf", LlamaConfig(vocab_size=96, dim=128, n_layers=3, n_heads=4, n_kv_heads=2,
                                               head_dim=32, ffn_dim=256), seed=3)
  reference = load_file(str(tmp_path / "hf" / "model.safetensors"))
  file = SafetensorsFile(tmp_path / "hf" / "model.safetensors")
  try:
    assert set(file.tensors) == set(reference)
    for name, array in reference.items():
      np.testing.assert_array_equal(file.read(name), array)
  finally:
    file.close()


def _raw(path, header: bytes, body: bytes = b"", length=None):
  path.write_bytes((len(header) if length is None else length).to_bytes(8, "little") + header + body)
  return path


def test_streaming_reader_errors_name_the_file(tmp_path):
  (tmp_path / "tiny.safetensors").write_bytes(b"\x01\x02")
  with pytest.raises(SourceError, match=r"tiny.safetensors is not a safetensors file: shorter than its 8-byte"):
    SafetensorsFile(tmp_path / "tiny.safetensors")
  with pytest.raises(SourceError, match=r"long.safetensors is not a safetensors file: header length 4096 exceeds"):
    SafetensorsFile(_raw(tmp_path / "long.safetensors", b"{}", length=4096))
  with pytest.raises(SourceError, match=r"json.safetensors: the safetensors header cannot be parsed"):
    SafetensorsFile(_raw(tmp_path / "json.safetensors", b"{not json"))
  header = json.dumps({"x": {"dtype": "I32", "shape": [2], "data_offsets": [0, 8]}}).encode()
  ints = SafetensorsFile(_raw(tmp_path / "int.safetensors", header, bytes(8)))  # listed (BERT's position_ids)...
  try:
    with pytest.raises(SourceError, match=r"int.safetensors: tensor 'x' has dtype I32; streaming reads F32, F16, "
                                          r"BF16, F64"):
      ints.read("x")  # ... but not read
  finally:
    ints.close()
  header = json.dumps({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode()
  with pytest.raises(SourceError, match=r"offsets.safetensors: tensor 'x' \(F32 \[3\]\) has data offsets \[0, 8\) "
                                           r"that do not fit its shape"):
    SafetensorsFile(_raw(tmp_path / "offsets.safetensors", header, bytes(8)))
  with pytest.raises(SourceError, match=r"cannot open .*absent.safetensors"):
    SafetensorsFile(tmp_path / "absent.safetensors")


LLAMA_CONFIG = {"model_type": "llama", "vocab_size": 8, "hidden_size": 4, "num_hidden_layers": 1,
                "num_attention_heads": 2, "intermediate_size": 6}


def test_hf_llama_source_errors_name_file_and_fix(tmp_path):
  directory = tmp_path / "m"
  directory.mkdir()
  with pytest.raises(SourceError, match=r"m: no config.json; a safetensors source is a Hugging Face model "
                                           r"directory"):
    open_source(directory)
  (directory / "config.json").write_text("{")
  with pytest.raises(SourceError, match=r"config.json cannot be parsed"):
    open_source(directory)
  (directory / "config.json").write_text(json.dumps(dict(LLAMA_CONFIG, rope_scaling={"type": "linear", "factor": 2})))
  with pytest.raises(SourceError, match=r"config.json: rope_scaling \{'type': 'linear', 'factor': 2\} is not "
                                           r"supported"):
    open_source(directory)
  without = {k: v for k, v in LLAMA_CONFIG.items() if k != "intermediate_size"}
  (directory / "config.json").write_text(json.dumps(without))
  with pytest.raises(SourceError, match=r"config.json: missing key 'intermediate_size'"):
    open_source(directory)
  (directory / "config.json").write_text(json.dumps(LLAMA_CONFIG))
  with pytest.raises(SourceError, match=r"m: neither model.safetensors nor model.safetensors.index.json"):
    open_source(directory)
  save_file({"model.embed_tokens.weight": np.zeros((8, 5), np.float32)}, str(directory / "model.safetensors"))
  source = open_source(directory)
  try:
    with pytest.raises(SourceError, match=r"model.safetensors: tensor 'model.embed_tokens.weight' has shape "
                                             r"\(8, 5\), expected \(8, 4\)"):
      source.part("embed")
  finally:
    source.close()
  with pytest.raises(SourceError, match=r"config.json is not a directory"):
    HFDirectory(directory / "config.json")
