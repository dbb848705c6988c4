"""Gemma 3 decoder: a tiny random model against an independent numpy float64 forward (sandwich norms, QK-norm,
GeGLU, scaled embeddings, sliding-window and global layers with their own RoPE bases); the real Gemma-3-270M
GGUF (first 2 blocks) against the same reference fed straight from the GGUF tensors; the SentencePiece-style
tokenizer against a plain-Python version of llama.cpp's SPM merge loop; loader errors."""

import re

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxquant import assets, data, rules
from jaxquant.models.gemma import GemmaConfig, random_gemma, random_weights
from jaxquant.sources.base import SourceError
from jaxquant.sources.gguf import open_gguf
from jaxquant.sources.loading import load_model, read_config
from jaxquant.sources.tokenizer import tokenizer_from_gguf

# 3 layers with pattern 3: layers 0 and 1 slide over 4 positions, layer 2 is global. query_pre_attn_scalar is
# not head_dim here, so the test sees which one scales the logits.
TINY = GemmaConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=48,
                   rope_theta=1_000_000.0, rope_local_theta=10_000.0, sliding_window=4, sliding_window_pattern=3,
                   query_pre_attn_scalar=12.0, norm_eps=1e-6)


def _reference_logits(config: GemmaConfig, weights: dict, tokens: np.ndarray) -> np.ndarray:
  """Gemma 3 forward in numpy float64, written from HF's modeling_gemma3 independently of jaxquant.models.
  weights: keyed by state path (kernels (in, out)). tokens (T,) -> logits (T, vocab)."""
  w = {k: np.asarray(v, np.float64) for k, v in weights.items() if k != "embed.embedding"}
  embed = weights["embed.embedding"]
  seq, hd = len(tokens), config.head_dim

  def rms(x, weight):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + config.norm_eps) * weight

  def rope(x, theta):  # x (T, heads, hd); pairs (j, j + hd/2) rotate by pos * theta^(-2j/hd)
    half = hd // 2
    angle = np.arange(seq)[:, None] * theta ** (-2.0 * np.arange(half) / hd)[None, :]  # (T, half)
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)

  def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))

  x = np.asarray(embed[tokens], np.float64) * np.sqrt(config.dim)
  group = config.n_heads // config.n_kv_heads
  for i in range(config.n_layers):
    p = lambda name: w[f"layers.{i}.{name}"]
    local = (i + 1) % config.sliding_window_pattern != 0
    theta = config.rope_local_theta if local else config.rope_theta
    h = rms(x, p("attn_norm.weight"))
    q = rms((h @ p("attn.q_proj.kernel")).reshape(seq, config.n_heads, hd), p("attn.q_norm.weight"))
    k = rms((h @ p("attn.k_proj.kernel")).reshape(seq, config.n_kv_heads, hd), p("attn.k_norm.weight"))
    v = (h @ p("attn.v_proj.kernel")).reshape(seq, config.n_kv_heads, hd)
    q, k = rope(q, theta), rope(k, theta)
    out = np.zeros((seq, config.n_heads, hd))
    t, s = np.arange(seq)[:, None], np.arange(seq)[None, :]
    hidden = (s > t) | (local & (t - s >= config.sliding_window))  # future keys, and keys out of a local window
    for head in range(config.n_heads):
      kv = head // group
      scores = q[:, head] @ k[:, kv].T / np.sqrt(config.query_pre_attn_scalar)
      scores[hidden] = -np.inf
      probs = np.exp(scores - scores.max(-1, keepdims=True))
      out[:, head] = (probs / probs.sum(-1, keepdims=True)) @ v[:, kv]
    x = x + rms(out.reshape(seq, -1) @ p("attn.o_proj.kernel"), p("post_attn_norm.weight"))
    h = rms(x, p("mlp_norm.weight"))
    x = x + rms((gelu_tanh(h @ p("mlp.gate_proj.kernel")) * (h @ p("mlp.up_proj.kernel"))) @ p("mlp.down_proj.kernel"),
                 p("post_mlp_norm.weight"))
  # A 262k-row head is applied in float32 (a float64 copy of it would dominate the test's time).
  head = np.asarray(embed, np.float64 if len(embed) <= 4096 else np.float32)
  return rms(x, w["norm.weight"]).astype(head.dtype) @ head.T


def test_tiny_gemma_matches_numpy_reference(strict_numerics):
  weights = random_weights(TINY, seed=3)
  model = random_gemma(TINY, seed=3)
  tokens = np.random.default_rng(0).integers(0, TINY.vocab_size, 11).astype(np.int32)
  logits = np.asarray(model(jnp.asarray(tokens[None])))[0]
  np.testing.assert_allclose(logits, _reference_logits(TINY, weights, tokens), rtol=1e-4, atol=1e-4)
  # The block API composes to __call__.
  h = model.embed_tokens(jnp.asarray(tokens[None]))
  for block in model.layers:
    h = block(h)
  np.testing.assert_allclose(np.asarray(model.head(h))[0], logits, rtol=1e-5, atol=1e-5)
  assert [layer.attn.sliding_window for layer in model.layers] == [4, 4, None]
  assert [layer.attn.rope_theta for layer in model.layers] == [10_000.0, 10_000.0, 1_000_000.0]


def test_sliding_window_limits_what_a_local_layer_sees():
  config = GemmaConfig(**{**TINY.__dict__, "n_layers": 1})  # one local layer, window 4
  model = random_gemma(config, seed=1)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, config.vocab_size, (1, 9)), jnp.int32)
  changed = tokens.at[0, 0].set((tokens[0, 0] + 1) % config.vocab_size)
  base, other = np.asarray(model(tokens)), np.asarray(model(changed))
  assert not np.allclose(base[0, 3], other[0, 3])              # position 3 still sees position 0
  np.testing.assert_allclose(base[0, 4:], other[0, 4:], rtol=1e-6, atol=1e-6)  # 4 and later do not


def test_parameter_paths_match_block_linear_rules():
  model = random_gemma(TINY)
  paths = [".".join(str(p) for p in path) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
  linears = [p for p in paths if re.search(rules.BLOCK_LINEARS, p)]
  assert len(linears) == 7 * TINY.n_layers
  assert {p.split(".", 2)[2] for p in linears} == {f"attn.{n}_proj.kernel" for n in "qkvo"} | {
      f"mlp.{n}_proj.kernel" for n in ("gate", "up", "down")}
  assert "layers.0.attn.q_norm.weight" in paths and "layers.2.post_mlp_norm.weight" in paths
  np.testing.assert_array_equal(model.lm_head.kernel.get_value(), model.embed.embedding.get_value().T)


# ----------------------------------------------------------------------------------------- real Gemma-3-270M

GGUF_NORMS = {"attn_norm.weight": "attn_norm", "post_attn_norm.weight": "post_attention_norm",
              "mlp_norm.weight": "ffn_norm", "post_mlp_norm.weight": "post_ffw_norm",
              "attn.q_norm.weight": "attn_q_norm", "attn.k_norm.weight": "attn_k_norm"}
GGUF_LINEARS = {"attn.q_proj.kernel": "attn_q", "attn.k_proj.kernel": "attn_k", "attn.v_proj.kernel": "attn_v",
                "attn.o_proj.kernel": "attn_output", "mlp.gate_proj.kernel": "ffn_gate",
                "mlp.up_proj.kernel": "ffn_up", "mlp.down_proj.kernel": "ffn_down"}


@pytest.fixture(scope="module")
def gguf_path():
  return assets.gemma3_gguf_path()


@pytest.fixture(scope="module")
def tokenizer(gguf_path):
  return tokenizer_from_gguf(gguf_path)


def test_gemma_config_from_metadata(gguf_path):
  config = read_config(gguf_path)
  assert isinstance(config, GemmaConfig)
  assert (config.vocab_size, config.dim, config.n_layers, config.n_heads, config.n_kv_heads) == (262144, 640, 18, 4, 1)
  assert (config.head_dim, config.ffn_dim, config.sliding_window) == (256, 2048, 512)
  assert (config.rope_theta, config.rope_local_theta, config.query_pre_attn_scalar) == (1e6, 1e4, 256.0)
  assert config.add_bos and config.bos_token_id == 2 and config.tie_embeddings
  assert [config.is_sliding(i) for i in range(12)] == [True] * 5 + [False] + [True] * 5 + [False]
  assert assets.resolve_model("gemma3-270m") == ("gemma3", gguf_path)


def test_gemma_first_two_layers_match_numpy_reference(gguf_path, tokenizer):
  """The loader's tensor mapping: the reference reads the GGUF tensors by their llama.cpp names itself."""
  config = GemmaConfig(**{**read_config(gguf_path).__dict__, "n_layers": 2})
  weights = _gguf_weights(gguf_path, 2)
  text = "Alice was beginning to get very tired of sitting by her sister on the bank."
  tokens = np.concatenate([[config.bos_token_id], data.tokenize(tokenizer, text)]).astype(np.int32)
  model = load_model(gguf_path, n_layers=2, family="gemma3")
  assert model.config.n_layers == 2 and len(model.layers) == 2
  logits = np.asarray(model(jnp.asarray(tokens[None])))[0]
  assert logits.shape == (len(tokens), 262144) and np.all(np.isfinite(logits))
  reference = _reference_logits(config, weights, tokens)
  # Measured on CPU (JAX 0.11.2): max |logits - reference| 5.0e-5 with logits up to 98.5: float32 against
  # float64, through two blocks and the float32 head of the reference. The bounds leave a 10x margin.
  np.testing.assert_allclose(logits, reference, rtol=1e-5, atol=5e-4)
  assert np.mean(np.argmax(logits, -1) == np.argmax(reference, -1)) == 1.0


def _spm_reference(text: str, tokens: list[str], scores, token_types) -> list[int]:
  """llama.cpp's SPM tokenizer in plain Python: cut out user-defined pieces, spaces -> "▁", then repeatedly
  merge the adjacent pair whose concatenation is a piece of highest score (leftmost on ties); characters
  without a piece become their UTF-8 bytes <0xXX>."""
  ids = {t: i for i, t in enumerate(tokens)}
  user = sorted((t for t, k in zip(tokens, token_types) if int(k) == 4), key=len, reverse=True)
  out, pos = [], 0

  def fragment(s):
    symbols = list(s.replace(" ", "\u2581"))
    while True:
      best = None
      for j in range(len(symbols) - 1):
        merged = symbols[j] + symbols[j + 1]
        if merged in ids and (best is None or scores[ids[merged]] > scores[ids[symbols[best] + symbols[best + 1]]]):
          best = j
      if best is None:
        break
      symbols[best:best + 2] = [symbols[best] + symbols[best + 1]]
    for sym in symbols:
      out.extend([ids[sym]] if sym in ids else [ids[f"<0x{b:02X}>"] for b in sym.encode("utf-8")])

  for m in re.finditer("|".join(re.escape(u) for u in user), text):
    fragment(text[pos:m.start()])
    out.append(ids[m.group()])
    pos = m.end()
  fragment(text[pos:])
  return out


def test_tokenizer_matches_spm_reference_and_round_trips(gguf_path, tokenizer):
  reader = open_gguf(gguf_path)
  field = lambda key: reader.fields[key].contents()
  vocab = (list(field("tokenizer.ggml.tokens")), np.asarray(field("tokenizer.ggml.scores")),
           field("tokenizer.ggml.token_type"))
  samples = [data.load_text("alice29")[0][:4000], data.load_text("asyoulik")[0][:3000],
             "naïve café, 日本語 🤖 \u0007 and  two   spaces\n\n\n\tx"]
  for text in samples:
    ids = data.tokenize(tokenizer, text)
    assert ids.tolist() == _spm_reference(text, *vocab)
    assert tokenizer.decode(ids.tolist()) == text
  # Literal ids, each pinned to the GGUF's token list as read by the gguf package (not by the tokenizer).
  ids = {piece: i for i, piece in enumerate(vocab[0])}
  assert ids["<bos>"] == tokenizer.token_to_id("<bos>") == 2 and ids["<eos>"] == tokenizer.token_to_id("<eos>") == 1
  assert data.tokenize(tokenizer, " the").tolist() == [ids["\u2581the"]] == [506]
  assert data.tokenize(tokenizer, "\n\n").tolist() == [ids["\n\n"]] == [108] and vocab[2][108] == 4  # user-defined
  assert data.tokenize(tokenizer, "Hello, world!").tolist() == [ids[p] for p in ("Hello", ",", "\u2581world", "!")] == [
      9259, 236764, 1902, 236888]


# --------------------------------------------------------------------------------------------- user GGUF files


def _write_gemma_gguf(path, arch="gemma3", skip_key=None):
  """A tiny float32 gemma3 GGUF (1 layer) from `random_weights`, in llama.cpp's tensor names and (out, in)."""
  config = GemmaConfig(vocab_size=16, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=4, ffn_dim=12,
                       sliding_window=3, query_pre_attn_scalar=4.0, norm_eps=float(np.float32(1e-6)))
  writer = gguf.GGUFWriter(str(path), arch)
  keys = {"embedding_length": 8, "block_count": 1, "feed_forward_length": 12, "attention.head_count": 2,
          "attention.head_count_kv": 1, "attention.key_length": 4, "attention.sliding_window": 3,
          "vocab_size": 16}
  for key, value in keys.items():
    if key != skip_key:
      writer.add_uint32(f"{arch}.{key}", value)
  writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
  writer.add_uint32("tokenizer.ggml.bos_token_id", 2)
  weights = random_weights(config, seed=5)
  writer.add_tensor("token_embd.weight", weights["embed.embedding"])
  writer.add_tensor("output_norm.weight", weights["norm.weight"])
  for ours, theirs in (GGUF_NORMS | GGUF_LINEARS).items():
    array = weights[f"layers.0.{ours}"]
    writer.add_tensor(f"blk.0.{theirs}.weight", np.ascontiguousarray(array.T if array.ndim == 2 else array))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return config, weights


def test_user_gemma_gguf_loads_and_errors_name_file_and_key(tmp_path):
  config, weights = _write_gemma_gguf(tmp_path / "tiny.gguf")
  model = load_model(tmp_path / "tiny.gguf")
  assert model.config == config
  tokens = np.array([2, 5, 7, 1, 9], np.int32)
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens[None])))[0],
                             _reference_logits(config, weights, tokens), rtol=1e-4, atol=1e-4)
  assert assets.resolve_model(tmp_path / "tiny.gguf") == ("gemma3", tmp_path / "tiny.gguf")
  _write_gemma_gguf(tmp_path / "nowindow.gguf", skip_key="attention.sliding_window")
  with pytest.raises(SourceError, match=r"nowindow.gguf.*'gemma3.attention.sliding_window'"):
    load_model(tmp_path / "nowindow.gguf", family="gemma3")
  _write_gemma_gguf(tmp_path / "gemma2.gguf", arch="gemma2")
  with pytest.raises(SourceError, match=r"gemma2.gguf.*architecture 'gemma2' is not supported.*gemma3"):
    load_model(tmp_path / "gemma2.gguf")
  with pytest.raises(ValueError, match=r"gemma2.gguf.*architecture 'gemma2'"):
    assets.resolve_model(tmp_path / "gemma2.gguf")


def _gguf_weights(gguf_path, n_layers):
  """The reference's weights straight from the GGUF tensors by their llama.cpp names (float32, kernels (in, out))."""
  reader = open_gguf(gguf_path)
  tensors = {t.name: t for t in reader.tensors}

  def get(name):
    t = tensors[name]
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(n) for n in reversed(t.shape)))

  weights = {"embed.embedding": get("token_embd.weight"), "norm.weight": get("output_norm.weight")}
  for i in range(n_layers):
    weights |= {f"layers.{i}.{k}": get(f"blk.{i}.{v}.weight") for k, v in GGUF_NORMS.items()}
    weights |= {f"layers.{i}.{k}": get(f"blk.{i}.{v}.weight").T for k, v in GGUF_LINEARS.items()}
  return weights


@pytest.mark.slow
def test_gemma_full_precision_perplexity_alice29(gguf_path, tokenizer):
  """20.34: the perplexity of the numpy forward above (all 18 blocks in float64, the 262144-row head in float32;
  no jaxquant code) on the same windows, as computed by this test (numpy 2.4.6, gguf 0.19.0); jaxquant's model
  must agree with it to 0.1%. README's Gemma fp row is this figure."""
  from jaxquant import evaluate
  windows = data.text_windows(tokenizer, "alice29", window=512, max_tokens=4096, bos_id=2)
  assert windows.shape == (8, 512) and np.all(windows[:, 0] == 2)
  ppl = evaluate.perplexity(load_model(gguf_path, family="gemma3"), windows, progress=False)
  config = read_config(gguf_path)
  weights = _gguf_weights(gguf_path, config.n_layers)
  nll = []
  for window in windows:  # one window's (512, 262144) float32 logits at a time, reduced in float64 by rows
    logits = _reference_logits(config, weights, window)
    for start in range(0, len(window) - 1, 64):
      z = logits[start:start + 64].astype(np.float64)
      z = z - z.max(-1, keepdims=True)
      targets = window[start + 1:start + 65]
      nll.append(np.log(np.exp(z[:len(targets)]).sum(-1)) - z[np.arange(len(targets)), targets])
  reference = float(np.exp(np.mean(np.concatenate(nll))))
  print(f"Gemma-3-270M alice29 perplexity: jaxquant {ppl:.4f}, numpy reference {reference:.4f}")
  assert abs(ppl / reference - 1) < 1e-3
  assert abs(reference / 20.34 - 1) < 0.0005
