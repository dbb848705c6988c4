"""Decoding with a KV cache (jaxquant/models/decode.py, sampling.py): the cache gives the logits and the greedy
tokens of the full forward pass, for the llama family and Gemma 3 (sliding-window layers), float and every
recipe family (W8A8, W4/8, uniform 4-bit g128, BCQ 3-bit g128), for a left-padded batch of prompts of different
lengths; sampling is reproducible from a seed; bad requests are refused. Small random models, plus the real
SmolLM2-135M."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant import pipeline, recipes
from jaxquant.models import decode, gemma, llama
from jaxquant.models.sampling import Sampler, sample

# Untied head, projections 4x the default init: the next token depends on the context, not just on the last
# token, so a cache that loses a position shows in the tokens. K = 128 and 256: whole groups of 128.
LLAMA = llama.LlamaConfig(vocab_size=128, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, ffn_dim=256,
                          tie_embeddings=False)
GEMMA = gemma.GemmaConfig(vocab_size=128, dim=128, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=32, ffn_dim=256,
                          sliding_window=4, sliding_window_pattern=3, tie_embeddings=False)
RECIPES = ("fp", "zeroquant-w8a8", "zeroquant-w48a16", "rtn-w4-g128", "lutgemm-bcq3-g128")
PROMPTS = ([5, 7, 9, 11, 3, 60, 2], [6], [1, 2, 3, 4])  # different lengths: a left-padded batch
NEW = 10


def _lively(family, config, seed=0):
  weights = family.random_weights(config, seed)
  for name in weights:
    if name.endswith("_proj.kernel"):
      weights[name] = weights[name] * 4
  return family.Llama.from_weights(config, weights) if family is llama else family.Gemma.from_weights(config, weights)


@pytest.fixture(scope="module", params=["llama", "gemma"])
def model(request):
  return _lively(llama, LLAMA) if request.param == "llama" else _lively(gemma, GEMMA)


def _quantized(model, recipe_name):
  recipe = recipes.get_recipe(recipe_name)
  calibration = [np.random.default_rng(0).integers(0, 128, (4, 32)).astype(np.int32)]
  return pipeline.quantize_model(model, recipe, calibration if recipe.needs_calibration else None, progress=False)


def _teacher_forced_logits(model, rows, pad_id=0):
  """Logits (B, T, V) of each row's every position, fed one token a step through the cache (left-padded)."""
  tokens, pad = decode.left_pad(rows, pad_id)
  decoder = decode.Decoder(model)
  cache = decoder.init_cache(*tokens.shape)
  key = jax.random.key(0)
  out = []
  for t in range(tokens.shape[1]):
    _, logits, cache, key = decoder.run(jnp.asarray(tokens[:, t:t + 1]), cache, t, jnp.asarray(pad), key)
    out.append(np.asarray(logits))
  return np.stack(out, axis=1), pad


def test_cached_logits_equal_the_full_forward(model):
  rows = [list(range(3, 15)), [9, 8, 7, 6, 5]]  # 12 tokens: past Gemma's window of 4
  logits, pad = _teacher_forced_logits(model, rows)
  for b, row in enumerate(rows):
    full = np.asarray(model(jnp.asarray([row])))[0]
    np.testing.assert_allclose(logits[b, pad[b]:], full, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("recipe", RECIPES)
def test_greedy_decoding_with_the_cache_gives_the_full_forward_tokens(model, recipe):
  quantized = _quantized(model, recipe)
  result = decode.generate(quantized, PROMPTS, NEW)
  assert result.tokens.shape == (len(PROMPTS), NEW) and result.decode_steps == NEW - 1
  window = max(map(len, PROMPTS)) + NEW
  for b, prompt in enumerate(PROMPTS):
    assert list(result.tokens[b]) == list(decode.reference_greedy(quantized, prompt, NEW, window)), (recipe, b)


def test_a_prompt_decodes_the_same_alone_or_padded_in_a_batch(model):
  alone = decode.generate(model, [PROMPTS[1]], NEW).tokens[0]
  assert list(decode.generate(model, PROMPTS, NEW).tokens[1]) == list(alone)
  # the pad token's id does not matter: pad slots are never attended to
  assert list(decode.generate(model, PROMPTS, NEW, pad_id=77).tokens[1]) == list(alone)


def test_the_context_matters_in_these_models(model):
  """Guards the tests above: a cache that dropped earlier positions would not go unnoticed."""
  a = decode.generate(model, [[5, 7, 9, 11, 3]], NEW).tokens[0]
  b = decode.generate(model, [[6, 7, 9, 11, 3]], NEW).tokens[0]
  assert list(a) != list(b)


def test_sampling_is_reproducible_from_a_seed(model):
  sampler = Sampler(temperature=1.0, top_k=20)
  a = decode.generate(model, PROMPTS, NEW, sampler=sampler, seed=3).tokens
  assert np.array_equal(a, decode.generate(model, PROMPTS, NEW, sampler=sampler, seed=3).tokens)
  assert not np.array_equal(a, decode.generate(model, PROMPTS, NEW, sampler=sampler, seed=4).tokens)
  greedy = decode.generate(model, PROMPTS, NEW).tokens
  assert np.array_equal(greedy, decode.generate(model, PROMPTS, NEW, sampler=Sampler(1.0, top_k=1), seed=9).tokens)


def test_sample_draws_from_the_tempered_top_k_distribution():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000))
  keys = jax.random.key(0)
  freq = np.bincount(np.asarray(sample(logits, keys, Sampler(1.0))), minlength=4) / 4000
  np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)
  top2 = np.bincount(np.asarray(sample(logits, keys, Sampler(1.0, top_k=2))), minlength=4) / 4000
  np.testing.assert_allclose(top2, [0.625, 0.375, 0, 0], atol=0.03)
  cold = np.bincount(np.asarray(sample(logits, keys, Sampler(0.25))), minlength=4) / 4000
  p = np.array([0.5, 0.3, 0.15, 0.05]) ** 4
  np.testing.assert_allclose(cold, p / p.sum(), atol=0.03)
  assert np.all(np.asarray(sample(logits, keys)) == 0)


def test_eos_stops_a_sequence_and_the_loop():
  model = _lively(llama, LLAMA)
  free = decode.generate(model, PROMPTS, NEW).tokens
  eos = int(free[0, 2])  # the first row's third token: that row stops there
  seen = []
  result = decode.generate(model, PROMPTS, NEW, eos_id=eos, on_token=lambda i, t: seen.append(t.copy()))
  assert result.lengths[0] == 3 and np.all(result.tokens[0, 2:] == eos)
  assert len(seen) == result.tokens.shape[1] and np.array_equal(np.stack(seen, 1), result.tokens)
  for b in range(len(PROMPTS)):
    n = result.lengths[b]
    assert list(result.tokens[b, :n]) == list(free[b, :n])


def test_bad_requests_are_refused():
  model = _lively(llama, LLAMA)
  with pytest.raises(decode.DecodeError, match="empty prompt"):
    decode.generate(model, [[1, 2], []], 4)
  with pytest.raises(decode.DecodeError, match="no prompts"):
    decode.generate(model, [], 4)
  with pytest.raises(decode.DecodeError, match="max_new_tokens must be a positive integer"):
    decode.generate(model, [[1]], 0)
  with pytest.raises(ValueError, match="temperature must be a number >= 0"):
    Sampler(temperature=-1)
  with pytest.raises(ValueError, match="top_k must be a positive integer"):
    Sampler(1.0, top_k=0)
  from jaxquant.models import bert
  from jaxquant.models.layers import LayerNorm
  zeros = lambda *s: jnp.zeros(s, jnp.float32)
  encoder = bert.Bert(bert.BertConfig(vocab_size=8, dim=4, n_layers=0, n_heads=1, ffn_dim=8),
                      bert.Embeddings(zeros(8, 4), zeros(16, 4), zeros(2, 4), LayerNorm(zeros(4), zeros(4), 1e-12)), [])
  with pytest.raises(decode.DecodeError, match="encoder"):
    decode.Decoder(encoder)


def test_one_compilation_per_shape():
  model = _lively(llama, LLAMA)
  decoder = decode.Decoder(model)
  first = decode.generate(decoder, PROMPTS, NEW)
  assert first.compile_seconds > 0 and len(decoder._compiled) == 2  # the prompt shape and the one-token shape
  again = decode.generate(decoder, PROMPTS, NEW)
  assert again.compile_seconds == 0 and np.array_equal(first.tokens, again.tokens)


def test_real_smollm2_greedy_decoding_matches_the_full_forward():
  loaded = pipeline.load("smollm2-135m")
  prompt = [int(t) for t in loaded.tokenizer.encode("The capital of France is").ids]
  tokens = decode.generate(loaded.model, [prompt], 8).tokens[0]
  assert list(tokens) == list(decode.reference_greedy(loaded.model, prompt, 8))
  assert "Paris" in loaded.tokenizer.decode(list(tokens))
