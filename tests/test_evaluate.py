"""evaluate: perplexity, KL, top-1 agreement and embedding cosine on tiny random models, checked by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxquant import evaluate
from jaxquant.models.bert import Bert, BertConfig
from jaxquant.models.llama import Llama, LlamaConfig, random_weights

CONFIG = LlamaConfig(vocab_size=50, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, ffn_dim=24)


@pytest.fixture(scope="module")
def models():
  weights = random_weights(CONFIG, seed=0)
  noisy = {k: v + 0.05 * np.random.default_rng(1).standard_normal(v.shape).astype(np.float32)
           for k, v in weights.items()}
  return Llama.from_weights(CONFIG, weights), Llama.from_weights(CONFIG, noisy)


@pytest.fixture(scope="module")
def windows():
  return np.random.default_rng(2).integers(0, CONFIG.vocab_size, (5, 12)).astype(np.int32)


def _numpy_figures(model, ref, windows):
  logp = np.asarray(jax.nn.log_softmax(model(jnp.asarray(windows))[:, :-1], -1), np.float64)
  ref_logp = np.asarray(jax.nn.log_softmax(ref(jnp.asarray(windows))[:, :-1], -1), np.float64)
  targets = windows[:, 1:]
  nll = -np.take_along_axis(logp, targets[..., None], -1).mean()
  kl = (np.exp(ref_logp) * (ref_logp - logp)).sum(-1).mean()
  top1 = (logp.argmax(-1) == ref_logp.argmax(-1)).mean()
  return np.exp(nll), kl, top1


def test_perplexity_matches_numpy_and_batching_does_not_matter(models, windows):
  model, _ = models
  expected, _, _ = _numpy_figures(model, model, windows)
  for batch_size in (1, 2, 5, 8):  # 5 windows: padded last batches must not count
    assert evaluate.perplexity(model, windows, batch_size=batch_size, progress=False) == pytest.approx(expected, rel=1e-5)


def test_identical_models_have_zero_kl_and_full_agreement(models, windows):
  model, _ = models
  figures = evaluate.compare_to_reference(model, model, windows, batch_size=2, progress=False)
  assert figures["kl"] == pytest.approx(0.0, abs=1e-6)
  assert figures["top1"] == 1.0
  assert figures["perplexity"] == pytest.approx(figures["ref_perplexity"])
  assert figures["n_tokens"] == 5 * 11


def test_compare_matches_numpy_for_different_models(models, windows):
  model, noisy = models
  ppl, kl, top1 = _numpy_figures(noisy, model, windows)
  figures = evaluate.compare_to_reference(noisy, model, windows, batch_size=2, progress=False)
  assert figures["perplexity"] == pytest.approx(ppl, rel=1e-5)
  assert figures["ref_perplexity"] == pytest.approx(evaluate.perplexity(model, windows, progress=False), rel=1e-5)
  assert figures["kl"] == pytest.approx(kl, rel=1e-4, abs=1e-7) and figures["kl"] > 0
  assert figures["top1"] == pytest.approx(top1)


def _tiny_bert(seed):
  config = BertConfig(vocab_size=30, dim=16, n_layers=2, n_heads=2, ffn_dim=32, max_positions=16)
  rng = np.random.default_rng(seed)
  normal = lambda *shape: (0.1 * rng.standard_normal(shape)).astype(np.float32)
  w = {"embeddings.word_embeddings": normal(30, 16), "embeddings.position_embeddings": normal(16, 16),
       "embeddings.token_type_embeddings": normal(2, 16), "embeddings.emb_norm.weight": np.ones(16, np.float32),
       "embeddings.emb_norm.bias": np.zeros(16, np.float32)}
  for i in range(2):
    for name, (n_in, n_out) in {"attn.q_proj": (16, 16), "attn.k_proj": (16, 16), "attn.v_proj": (16, 16),
                                "attn.o_proj": (16, 16), "mlp.up_proj": (16, 32), "mlp.down_proj": (32, 16)}.items():
      w[f"layers.{i}.{name}.kernel"], w[f"layers.{i}.{name}.bias"] = normal(n_in, n_out), normal(n_out)
    for name in ("attn_norm", "mlp_norm"):
      w[f"layers.{i}.{name}.weight"], w[f"layers.{i}.{name}.bias"] = 1 + normal(16), normal(16)
  return Bert.from_weights(config, w)


def test_embedding_cosine():
  model, other = _tiny_bert(0), _tiny_bert(1)
  token_ids = np.random.default_rng(0).integers(0, 30, (7, 8)).astype(np.int32)
  mask = np.ones_like(token_ids)
  mask[3:, 5:] = 0
  assert evaluate.embedding_cosine(model, model, token_ids, mask, batch_size=4) == pytest.approx(1.0, abs=1e-6)
  a = evaluate.sentence_embeddings(model, token_ids, mask, batch_size=4)
  b = evaluate.sentence_embeddings(other, token_ids, mask, batch_size=3)
  expected = np.mean(np.sum(a * b, -1))
  assert evaluate.embedding_cosine(model, other, token_ids, mask, batch_size=4) == pytest.approx(expected, abs=1e-6)
