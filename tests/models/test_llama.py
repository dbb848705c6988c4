"""Llama decoder: structure on a tiny random model, and the real SmolLM2 GGUF against an independent numpy
float64 forward written from the GGUF tensors in llama.cpp's own conventions (rope on adjacent pairs, q/k kept
in GGUF order), so the loader's un-permute and the model's rotate-half RoPE are both checked."""

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bpe_ref
from jaxquant import assets, data
from jaxquant.models.llama import LlamaConfig, random_llama
from jaxquant.sources.gguf import open_gguf
from jaxquant.sources.loading import load_model, read_config
from jaxquant.sources.tokenizer import tokenizer_from_gguf

TINY = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=48,
                   rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=True)


def test_parameter_paths_match_quantization_rules():
  model = random_llama(TINY)
  paths = {"/".join(str(p) for p in path) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  for expected in ("embed/embedding", "layers/0/attn_norm/weight", "layers/1/attn/q_proj/kernel",
                   "layers/1/attn/k_proj/kernel", "layers/1/attn/v_proj/kernel", "layers/1/attn/o_proj/kernel",
                   "layers/0/mlp_norm/weight", "layers/0/mlp/gate_proj/kernel", "layers/0/mlp/up_proj/kernel",
                   "layers/0/mlp/down_proj/kernel", "norm/weight", "lm_head/kernel"):
    assert expected in paths
  assert model.lm_head.kernel.get_value().shape == (TINY.dim, TINY.vocab_size)
  np.testing.assert_array_equal(model.lm_head.kernel.get_value(), model.embed.embedding.get_value().T)


def test_block_api_composes_to_call_and_is_causal():
  model = random_llama(TINY, seed=1)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 10)), jnp.int32)
  h = model.embed_tokens(tokens)
  assert h.shape == (2, 10, TINY.dim)
  for block in model.layers:
    h = block(h)
  logits = model(tokens)
  assert logits.shape == (2, 10, TINY.vocab_size) and logits.dtype == jnp.float32
  np.testing.assert_allclose(model.head(h), logits, rtol=1e-5, atol=1e-5)
  changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % TINY.vocab_size)
  np.testing.assert_allclose(model(changed)[:, :7], logits[:, :7], rtol=1e-5, atol=1e-5)
  assert not np.allclose(model(changed)[:, 7:], logits[:, 7:])


# ----------------------------------------------------------------------------------------------- real SmolLM2


@pytest.fixture(scope="module")
def gguf_path():
  return assets.smollm2_gguf_path()


def _reference_logits(path, tokens: np.ndarray, n_layers: int, cache: dict | None = None) -> np.ndarray:
  """Plain numpy float64 forward of the first n_layers blocks of a llama GGUF, llama.cpp conventions. `cache`
  (a dict) keeps the dequantized float32 tensors between calls."""
  reader = open_gguf(path)  # the gguf package's reader, cached
  meta = lambda key: reader.fields[key].contents()
  tensors = {t.name: t for t in reader.tensors}
  cache = {} if cache is None else cache

  def get(name):
    if name not in cache:
      cache[name] = np.asarray(gguf.quants.dequantize(tensors[name].data, tensors[name].tensor_type),
                               np.float32).reshape([int(n) for n in reversed(tensors[name].shape)])
    return cache[name].astype(np.float64)

  n_heads, n_kv = meta("llama.attention.head_count"), meta("llama.attention.head_count_kv")
  eps, theta = meta("llama.attention.layer_norm_rms_epsilon"), meta("llama.rope.freq_base")
  emb = get("token_embd.weight")  # (vocab, dim)
  dim = emb.shape[1]
  hd = dim // n_heads
  seq = len(tokens)

  def rms(x, w):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w

  def rope_adjacent_pairs(x):  # x: (seq, heads, hd); llama.cpp NORM rope: pairs (2i, 2i+1)
    freqs = theta ** (-np.arange(0, hd, 2) / hd)
    angle = np.arange(seq)[:, None, None] * freqs[None, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * np.cos(angle) - odd * np.sin(angle)
    out[..., 1::2] = even * np.sin(angle) + odd * np.cos(angle)
    return out

  x = emb[tokens]
  for i in range(n_layers):
    w = lambda name: get(f"blk.{i}.{name}.weight")
    h = rms(x, w("attn_norm"))
    q = rope_adjacent_pairs((h @ w("attn_q").T).reshape(seq, n_heads, hd))
    k = rope_adjacent_pairs((h @ w("attn_k").T).reshape(seq, n_kv, hd))
    v = (h @ w("attn_v").T).reshape(seq, n_kv, hd)
    out = np.zeros((seq, n_heads, hd))
    for head in range(n_heads):
      kv = head // (n_heads // n_kv)
      scores = q[:, head] @ k[:, kv].T / np.sqrt(hd)
      scores = np.where(np.tril(np.ones((seq, seq), bool)), scores, -np.inf)
      p = np.exp(scores - scores.max(-1, keepdims=True))
      out[:, head] = (p / p.sum(-1, keepdims=True)) @ v[:, kv]
    x = x + out.reshape(seq, dim) @ w("attn_output").T
    h = rms(x, w("ffn_norm"))
    gate = h @ w("ffn_gate").T
    x = x + ((gate / (1 + np.exp(-gate))) * (h @ w("ffn_up").T)) @ w("ffn_down").T
  head = get("output.weight") if "output.weight" in tensors else emb
  return rms(x, get("output_norm.weight")) @ head.T


def test_smollm2_first_two_layers_match_numpy_reference(gguf_path):
  tokenizer = tokenizer_from_gguf(gguf_path)
  tokens = data.tokenize(tokenizer, "Alice was beginning to get very tired of sitting by her sister on the bank.")
  model = load_model(gguf_path, n_layers=2, family="llama")
  assert model.config.n_layers == 2 and len(model.layers) == 2
  logits = np.asarray(model(jnp.asarray(tokens[None])))[0]
  reference = _reference_logits(gguf_path, tokens, n_layers=2)
  assert logits.shape == reference.shape == (len(tokens), 49152)
  np.testing.assert_allclose(logits, reference, rtol=1e-4, atol=2e-3)
  assert np.mean(np.argmax(logits, -1) == np.argmax(reference, -1)) == 1.0


def test_smollm2_config_from_metadata(gguf_path):
  config = read_config(gguf_path)
  assert (config.vocab_size, config.dim, config.n_layers, config.n_heads, config.n_kv_heads) == (49152, 576, 30, 9, 3)
  assert (config.head_dim, config.ffn_dim, config.rope_theta) == (64, 1536, 100000.0)
  assert config.tie_embeddings and not config.add_bos


def test_tokenizer_round_trip_and_known_ids(gguf_path):
  tokenizer = tokenizer_from_gguf(gguf_path)
  text = data.load_text("alice29")[0][:3000]
  ids = data.tokenize(tokenizer, text)
  assert tokenizer.decode(ids.tolist()) == text
  vocab = tokenizer.get_vocab()
  assert tokenizer.token_to_id("<|endoftext|>") == 0 and tokenizer.token_to_id("<|im_start|>") == 1
  assert tokenizer.encode("<|im_start|>user", add_special_tokens=False).ids[0] == 1
  assert list(data.tokenize(tokenizer, " the")) == [vocab["Ġthe"]]
  # SmolLM2's pre-tokenizer splits digits one by one.
  assert list(data.tokenize(tokenizer, "2024")) == [vocab[c] for c in "2024"]
  # Pinned to the GGUF's own token list: the ids of "Hello", ",", "Ġworld", "!" there.
  assert list(data.tokenize(tokenizer, "Hello, world!")) == [vocab[t] for t in ("Hello", ",", "Ġworld", "!")] == [
      19556, 28, 905, 17]


def test_tokenizer_matches_a_plain_python_byte_level_bpe(gguf_path):
  """tests/bpe_ref.py (GPT-2's pre-tokenization and merge loop by hand, SmolLM2's digit splitting) over the GGUF's
  tokens and merges read with the gguf package gives the same ids as the tokenizer rebuilt by jaxquant."""
  reader = open_gguf(gguf_path)
  field = lambda key: reader.fields[key].contents()
  assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "smollm"
  tokens, merges = list(field("tokenizer.ggml.tokens")), list(field("tokenizer.ggml.merges"))
  tokenizer = tokenizer_from_gguf(gguf_path)
  samples = [data.load_text("alice29")[0][:4000], data.load_text("asyoulik")[0][:2000],
             "naïve café, 日本語 🤖 \u0007 and  two   spaces\n\n\n\tx",
             "In 2024: 3.14159 it's, I'LL  ½ ok?!\r\n"]
  for text in samples:
    assert data.tokenize(tokenizer, text).tolist() == bpe_ref.encode(text, tokens, merges, pre="smollm")


def _nll(logits: np.ndarray, window: np.ndarray) -> np.ndarray:
  """-log p(next token) at each position of one window from its (T, V) logits, float64."""
  z = np.asarray(logits, np.float64)[:-1]
  z = z - z.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return -np.take_along_axis(logp, window[1:, None].astype(np.int64), -1)[:, 0]


@pytest.mark.slow
def test_smollm2_full_precision_perplexity_alice29(gguf_path):
  """23.58: the perplexity of the numpy float64 forward above (all 30 blocks, llama.cpp's conventions, no jaxquant
  code) on the same windows, as computed by this test (numpy 2.4.6, gguf 0.19.0); jaxquant's float32 model must
  agree with that forward to 0.1%. README's fp rows and DESIGN.md's "23.6" are this figure."""
  from jaxquant import evaluate
  tokenizer = tokenizer_from_gguf(gguf_path)
  windows = data.text_windows(tokenizer, "alice29", window=512, max_tokens=4096)
  assert windows.shape == (8, 512)
  ppl = evaluate.perplexity(load_model(gguf_path, family="llama"), windows, progress=False)
  cache = {}
  reference = float(np.exp(np.mean([_nll(_reference_logits(gguf_path, w, 30, cache), w) for w in windows])))
  print(f"SmolLM2 alice29 perplexity: jaxquant {ppl:.4f}, numpy float64 reference {reference:.4f}")
  assert abs(ppl / reference - 1) < 1e-3
  assert abs(reference / 23.58 - 1) < 0.0005
