"""BERT encoder: all-MiniLM-L6-v2 against an independent numpy float64 forward written from the safetensors
file with HF's names and (out, in) weight layout; sentence embeddings sane on paraphrases; loader errors."""

import json
import math
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from jaxquant import assets, evaluate
from jaxquant.sources.loading import load_model
from jaxquant.sources.tokenizer import encode_batch, sentence_max_length, tokenizer_from_json

SENTENCES = ["A man is playing a guitar.", "Someone is strumming a guitar.",
             "The stock market fell sharply today.", "Alice was beginning to get very tired of sitting by her sister."]


@pytest.fixture(scope="module")
def minilm():
  path = assets.minilm_dir()
  return path, load_model(path, family="bert"), tokenizer_from_json(path)


def _reference_embeddings(path, token_ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(hidden (B, T, D), mean-pooled L2-normalised (B, D)) in float64, straight from HF tensors."""
  w = {k: v.astype(np.float64) for k, v in load_file(str(path / "model.safetensors")).items()}
  config = json.loads((path / "config.json").read_text())
  n_heads, eps = config["num_attention_heads"], config["layer_norm_eps"]

  def layer_norm(x, prefix):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w[prefix + ".weight"] + w[prefix + ".bias"]

  def dense(x, prefix):
    return x @ w[prefix + ".weight"].T + w[prefix + ".bias"]

  erf = np.vectorize(math.erf)
  batch, seq = token_ids.shape
  x = (w["embeddings.word_embeddings.weight"][token_ids] + w["embeddings.position_embeddings.weight"][:seq]
       + w["embeddings.token_type_embeddings.weight"][0])
  x = layer_norm(x, "embeddings.LayerNorm")
  dim = x.shape[-1]
  hd = dim // n_heads
  additive = np.where(mask[:, None, None, :] > 0, 0.0, -1e30)
  for i in range(config["num_hidden_layers"]):
    p = f"encoder.layer.{i}."
    heads = lambda y: y.reshape(batch, seq, n_heads, hd).transpose(0, 2, 1, 3)
    q, k, v = (heads(dense(x, p + f"attention.self.{n}")) for n in ("query", "key", "value"))
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd) + additive
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, seq, dim)
    x = layer_norm(x + dense(context, p + "attention.output.dense"), p + "attention.output.LayerNorm")
    inner = dense(x, p + "intermediate.dense")
    inner = 0.5 * inner * (1 + erf(inner / np.sqrt(2)))
    x = layer_norm(x + dense(inner, p + "output.dense"), p + "output.LayerNorm")
  pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  return x, pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


def test_minilm_matches_numpy_reference(minilm):
  path, model, tokenizer = minilm
  token_ids, mask = encode_batch(tokenizer, SENTENCES)
  assert token_ids[0, 0] == tokenizer.token_to_id("[CLS]") and mask.sum(1).min() < token_ids.shape[1]
  hidden = np.asarray(model(jnp.asarray(token_ids), jnp.asarray(mask)))
  embeddings = evaluate.sentence_embeddings(model, token_ids, mask)
  ref_hidden, ref_embeddings = _reference_embeddings(path, token_ids, mask)
  real = mask.astype(bool)  # padded positions are not compared (HF leaves them unmasked as queries too)
  np.testing.assert_allclose(hidden[real], ref_hidden[real], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(embeddings, ref_embeddings, atol=1e-5)


def test_minilm_paraphrases_are_close(minilm):
  _, model, tokenizer = minilm
  token_ids, mask = encode_batch(tokenizer, SENTENCES)
  e = evaluate.sentence_embeddings(model, token_ids, mask)
  np.testing.assert_allclose(np.linalg.norm(e, axis=-1), 1.0, atol=1e-5)
  cos = e @ e.T
  assert cos[0, 1] > 0.6 and cos[0, 2] < 0.2 and cos[1, 2] < 0.2


def test_padding_does_not_change_embeddings(minilm):
  _, model, tokenizer = minilm
  alone = evaluate.sentence_embeddings(model, *encode_batch(tokenizer, SENTENCES[:1], pad_to_multiple=1))
  padded = evaluate.sentence_embeddings(model, *encode_batch(tokenizer, SENTENCES[:1], pad_to_multiple=32))
  np.testing.assert_allclose(alone, padded, atol=1e-5)


def test_parameter_paths_and_block_api(minilm):
  path, model, tokenizer = minilm
  paths = {"/".join(str(p) for p in key) for key, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  for expected in ("embeddings/word_embeddings", "embeddings/position_embeddings",
                   "embeddings/token_type_embeddings", "embeddings/emb_norm/weight", "layers/5/attn/q_proj/kernel",
                   "layers/5/attn/o_proj/bias", "layers/0/attn_norm/bias", "layers/0/mlp/up_proj/kernel",
                   "layers/0/mlp/down_proj/kernel", "layers/0/mlp_norm/weight"):
    assert expected in paths
  token_ids, mask = (jnp.asarray(a) for a in encode_batch(tokenizer, SENTENCES))
  h = model.embeddings(token_ids)
  for block in model.layers:
    h = block(h, mask)
  np.testing.assert_allclose(h, model(token_ids, mask), atol=1e-6)
  assert sentence_max_length(path) == 256
  assert tokenizer.padding is None


def test_loader_errors_name_file_and_tensor(tmp_path, minilm):
  path, _, _ = minilm
  for name in ("config.json", "tokenizer.json"):
    shutil.copy(path / name, tmp_path / name)
  tensors = load_file(str(path / "model.safetensors"))
  del tensors["encoder.layer.1.output.dense.bias"]
  from safetensors.numpy import save_file
  save_file(tensors, str(tmp_path / "model.safetensors"))
  assert assets.resolve_model(tmp_path) == ("bert", tmp_path)
  assert len(load_model(tmp_path, n_layers=1, family="bert").layers) == 1
  with pytest.raises(ValueError, match=r"model.safetensors.*'encoder.layer.1.output.dense.bias'"):
    load_model(tmp_path, family="bert")
