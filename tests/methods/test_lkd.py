"""LKD: it lowers each block's quantized output error against the teacher, a block's result never depends on
later blocks, one compilation serves every block, NaN losses and interrupted runs are handled, short calibration
data is refused clearly, data-free sampling matches the model, encoders work. Tiny random models, plus one block
of the real SmolLM2."""

import dataclasses
import re
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxquant import formats, measure, ops, rules
from jaxquant.methods import blockwise, lkd
from jaxquant.methods.zeroquant import W48A8, W48A16
from jaxquant.models import bert, gemma, llama
from jaxquant.quantizers import WeightQuant

CONFIG = llama.LlamaConfig(vocab_size=96, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96)
# 4-bit, groups of 48 along the input dim: two groups of the 96-wide down_proj, a short last group (16) of 64.
W4A16 = (rules.Rule(rules.BLOCK_LINEARS, WeightQuant(bits=4, granularity="group", group_size=48)),)
LKD = lkd.LKDConfig(steps=20, batch_size=4, seq_len=32, n_samples=16, learning_rate=3e-5, keep_best=False)


def _tokens(n=16, seq=32, vocab=96, seed=0):
  return np.random.default_rng(seed).integers(0, vocab, (n, seq)).astype(np.int32)


@pytest.fixture(scope="module")
def tiny():
  return llama.random_llama(CONFIG, seed=1)


@pytest.fixture(scope="module")
def tiny_result(tiny):
  return lkd.lkd_quantize(tiny, W4A16, [_tokens()], LKD, progress=False)


def _leaves(module):
  return jax.tree_util.tree_leaves(nnx.state(module), is_leaf=formats.is_qarray)


def _same(a, b) -> bool:
  la, lb = _leaves(a), _leaves(b)
  return len(la) == len(lb) and all(
      jax.tree_util.tree_all(jax.tree.map(lambda u, v: bool(jnp.array_equal(u, v)), x, y)) for x, y in zip(la, lb))


def _teacher_inputs(model, tokens):
  """Independent of lkd.py: the float model's hidden states entering each block."""
  h = model.embed_tokens(jnp.asarray(tokens))
  inputs = []
  for block in model.layers:
    inputs.append(h)
    h = block(h)
  return inputs


def test_lkd_lowers_each_blocks_quantized_output_error(tiny, tiny_result):
  tokens = _tokens()
  rtn = rules.quantize_tree(nnx.state(tiny), W4A16, progress=False)
  rtn_model = nnx.merge(nnx.graphdef(tiny), rtn)
  for index, x in enumerate(_teacher_inputs(tiny, tokens)):
    teacher = tiny.layers[index](x)
    mse_rtn = float(jnp.mean((rtn_model.layers[index](x) - teacher) ** 2))
    mse_lkd = float(jnp.mean((tiny_result.model.layers[index](x) - teacher) ** 2))
    assert mse_lkd < 0.8 * mse_rtn, (index, mse_lkd, mse_rtn)
    report = tiny_result.blocks[index]
    assert report.status == "lkd" and report.mse_rtn == pytest.approx(mse_rtn, rel=1e-4)
    assert report.mse_lkd == pytest.approx(mse_lkd, rel=1e-4)
  # really quantized: packed int4 QArrays in every block linear, the rest as it was
  kernel = tiny_result.model.layers[2].mlp.down_proj.kernel.get_value()
  assert isinstance(kernel, formats.QArray) and kernel.bits == 4 and kernel.k_group == 48
  assert kernel.scale.shape == (2, 64)
  assert tiny_result.model.embed.embedding.get_value() is tiny.embed.embedding.get_value()
  assert isinstance(tiny.layers[0].mlp.up_proj.kernel.get_value(), jax.Array)  # the float model is untouched


def test_block_result_never_depends_on_later_blocks(tiny, tiny_result):
  other = llama.random_weights(CONFIG, seed=1)
  changed = llama.random_weights(CONFIG, seed=7)
  for key in other:
    if key.startswith("layers.2."):
      other[key] = changed[key]
  perturbed = llama.Llama.from_weights(CONFIG, other)
  result = lkd.lkd_quantize(perturbed, W4A16, [_tokens()], LKD, progress=False)
  for index in (0, 1):
    assert _same(result.model.layers[index], tiny_result.model.layers[index])
    assert result.blocks[index].last_loss == tiny_result.blocks[index].last_loss
  assert not _same(result.model.layers[2], tiny_result.model.layers[2])


def test_one_compilation_for_every_block_and_deterministic(tiny, tiny_result):
  assert tiny_result.compilations == 1
  again = lkd.lkd_quantize(tiny, W4A16, [_tokens()], LKD, progress=False)
  assert _same(again.model, tiny_result.model)
  other_seed = lkd.lkd_quantize(tiny, W4A16, [_tokens()], dataclasses.replace(LKD, seed=3), progress=False)
  assert not _same(other_seed.model, tiny_result.model)


def test_nan_loss_keeps_round_to_nearest_and_names_the_block(tiny):
  config = dataclasses.replace(LKD, steps=5, learning_rate=1e30)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    result = lkd.lkd_quantize(tiny, W4A16, [_tokens()], config, progress=False)
  messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
  assert len(messages) == 3
  assert re.match(r"LKD of block layers\.0: the loss became (nan|inf) at step \d+ .*round-to-nearest", messages[0])
  assert [b.status for b in result.blocks] == ["nan"] * 3  # the run went on past the failed block
  assert result.blocks[0].nan_step is not None
  rtn = nnx.merge(nnx.graphdef(tiny), rules.quantize_tree(nnx.state(tiny), W4A16, progress=False))
  assert _same(result.model, rtn)
  with pytest.raises(lkd.LKDError, match=r"block layers\.0.*on_nan='raise'"):
    lkd.lkd_quantize(tiny, W4A16, [_tokens()], dataclasses.replace(config, on_nan="raise"), progress=False)


def test_interrupted_run_resumes_from_the_last_finished_block(tiny, tiny_result, tmp_path):
  class Stop(Exception):
    pass

  def stop_after_first(index, report):
    if index == 0:
      raise Stop

  with pytest.raises(Stop):
    lkd.lkd_quantize(tiny, W4A16, [_tokens()], LKD, checkpoint_dir=tmp_path, progress=False,
                     callback=stop_after_first)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["block_000"]  # nothing partial, no temporary dirs
  seen = []
  result = lkd.lkd_quantize(tiny, W4A16, [_tokens()], LKD, checkpoint_dir=tmp_path, progress=False,
                            callback=lambda i, r: seen.append((r.status, r.resumed)))
  assert seen == [("lkd", True), ("lkd", False), ("lkd", False)]
  assert result.blocks[0].mse_lkd == tiny_result.blocks[0].mse_lkd
  assert _same(result.model, tiny_result.model)  # bit-identical to the uninterrupted run
  with pytest.raises(lkd.LKDError, match="different LKD run.*config"):
    lkd.lkd_quantize(tiny, W4A16, [_tokens()], dataclasses.replace(LKD, steps=3), checkpoint_dir=tmp_path,
                     progress=False)


def test_a_block_and_its_result_are_freed_before_the_next_block_is_taken(tiny):
  """What lets memory stay flat with depth when blocks come from disk: distill_blocks keeps no reference to a
  float block or to its quantized result once the caller has dropped it and the next block is taken."""
  import gc
  import weakref

  alive = []

  def blocks():
    for block in tiny.layers:
      gc.collect()
      assert [ref() for ref in alive] == [None] * len(alive), "an earlier block or result is still referenced"
      copy = nnx.clone(block)
      alive.append(weakref.ref(copy))
      yield copy
      del copy

  x = blockwise.embed_samples(tiny.embed_tokens, _tokens(), LKD.batch_size)
  step = lkd.train_step(LKD)
  done = 0
  for qblock, _ in lkd.distill_blocks(blocks(), x, W4A16, LKD, step, progress=False):
    alive.append(weakref.ref(qblock))
    del qblock
    done += 1
  assert done == CONFIG.n_layers and len(alive) == 2 * CONFIG.n_layers


def test_short_calibration_is_refused_clearly(tmp_path, tiny):
  class WordTokenizer:
    def encode(self, text, add_special_tokens=False):
      return type("E", (), {"ids": [hash(w) % 96 for w in text.split()]})()

  short = tmp_path / "short.txt"
  short.write_text("only a few words here " * 20)
  config = lkd.LKDConfig(batch_size=4, seq_len=32, n_samples=8)
  with pytest.raises(lkd.LKDError, match=r"short\.txt has 100 tokens, fewer than one LKD batch of 4 x 32 = 128"):
    lkd.calibration_from_text(WordTokenizer(), str(short), config)
  batches = lkd.calibration_from_text(WordTokenizer(), str(short), dataclasses.replace(config, seq_len=16))
  assert sum(len(b) for b in batches) == 8 and batches[0].shape == (4, 16)
  with pytest.raises(lkd.LKDError, match="at least batch_size=4 calibration samples.*gives 3 sample"):
    lkd.lkd_quantize(tiny, W4A16, [_tokens(n=3)], LKD, progress=False)
  with pytest.raises(lkd.LKDError, match="needs calibration batches"):
    lkd.lkd_quantize(tiny, W4A16, None, LKD, progress=False)


def test_long_rows_are_cut_into_windows():
  ids, mask = lkd.samples_from_batches([np.arange(2 * 70).reshape(2, 70)], lkd.LKDConfig(seq_len=32, batch_size=2))
  assert ids.shape == (4, 32) and mask is None
  assert list(ids[1, :2]) == [32, 33] and list(ids[2, :2]) == [70, 71]


def _resampled(model, first, seq_len, seed, batch_size, temperature=1.0):
  """Independent of lkd.py and models/decode.py: the draws generate_tokens promises, made by re-running the full
  forward pass on the growing window (no cache), with the same keys (batch b: fold_in(key(seed), b), one split a
  token)."""
  out = np.zeros((len(first), seq_len), np.int32)
  for b in range(-(-len(first) // batch_size)):
    rows = slice(b * batch_size, min(len(first), (b + 1) * batch_size))
    tokens = np.zeros((batch_size, seq_len), np.int32)
    prefix = np.asarray(first[rows]).reshape(rows.stop - rows.start, -1)  # (rows,) first tokens or (rows, w) prefixes
    tokens[:rows.stop - rows.start, :prefix.shape[1]] = prefix
    key = jax.random.fold_in(jax.random.key(seed), b)
    for t in range(prefix.shape[1] - 1, seq_len - 1):
      logits = model(jnp.asarray(tokens))[:, t]
      key, sub = jax.random.split(key)
      tokens[:, t + 1] = np.asarray(jax.random.categorical(sub, logits / temperature, axis=-1))
    out[rows] = tokens[:rows.stop - rows.start]
  return out


def test_generated_data_is_deterministic_and_sampled_from_the_model(tiny):
  a = blockwise.generate_tokens(tiny, 3, 10, seed=5, progress=False, batch_size=2)
  assert a.shape == (3, 10) and a.dtype == np.int32 and a.min() >= 0 and a.max() < CONFIG.vocab_size
  assert np.array_equal(a, blockwise.generate_tokens(tiny, 3, 10, seed=5, progress=False, batch_size=2))
  assert np.array_equal(a, _resampled(tiny, a[:, 0], 10, seed=5, batch_size=2))


def test_generated_data_for_a_model_that_reads_text_after_bos_starts_with_bos():
  config = gemma.GemmaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, ffn_dim=48)
  model = gemma.random_gemma(config, seed=2)
  a = blockwise.generate_tokens(model, 3, 8, seed=4, progress=False, batch_size=2)
  assert a.shape == (3, 8) and np.all(a[:, 0] == config.bos_token_id)
  assert np.array_equal(a[:, 1], blockwise.random_tokens(config.vocab_size, 3, 1, 4)[:, 0])  # the uniform token
  assert np.array_equal(a, _resampled(model, a[:, :2], 8, seed=4, batch_size=2))


def test_own_calibration_puts_bos_first_where_the_model_reads_text_after_it():
  windows = [np.arange(12, dtype=np.int32).reshape(2, 6) + 10]
  procedure = types.SimpleNamespace(calibration_from_text=lambda tokenizer, text: windows)
  recipe = types.SimpleNamespace(procedure=procedure, uses_calibration=True)
  assert measure.own_calibration(recipe, None, "lcet10") is windows
  (with_bos,) = measure.own_calibration(recipe, None, "lcet10", bos=2)
  assert with_bos.shape == (2, 6) and with_bos.dtype == np.int32
  np.testing.assert_array_equal(with_bos[:, 0], [2, 2])
  np.testing.assert_array_equal(with_bos[:, 1:], windows[0][:, :-1])


def test_data_free_lkd_needs_no_calibration(tiny):
  config = dataclasses.replace(LKD, steps=10, data="generated", n_samples=8, seq_len=16)
  result = lkd.lkd_quantize(tiny, W48A16, None, config, progress=False)
  assert result.samples == (8, 16)
  assert all(b.mse_lkd < b.mse_rtn for b in result.blocks)


def test_a8_student_computes_what_the_integer_path_computes():
  rng = np.random.default_rng(0)
  w = jnp.asarray(0.05 * rng.standard_normal((160, 24)), jnp.float32)
  x = jnp.asarray(rng.standard_normal((3, 5, 160)), jnp.float32)
  for rule in W48A8[:1] + (rules.Rule(W48A8[0].pattern, W48A8[0].weight, activation="token_group"),):
    student = lkd.FakeQuantLinear(w, None, rule.weight, rule.activation, rule.activation_bits)
    qarray = rule.weight.quantize(w, activation=formats.ActQuant(8, rule.activation))
    np.testing.assert_allclose(np.asarray(student(x)), np.asarray(ops.qdot(x, qarray)), rtol=1e-5, atol=1e-5)
  # straight-through: gradient of the latent weight as if unquantized
  grad = jax.grad(lambda k: jnp.sum(lkd.FakeQuantLinear(k, None, W48A8[0].weight, "token", 8)(x)))(w)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(jnp.sum(lkd.fake_quant_activations(x, 8, "token", 160),
                                                                  axis=(0, 1))[:, None] * jnp.ones((1, 24))),
                             rtol=1e-5)


def _tiny_bert():
  config = bert.BertConfig(vocab_size=80, dim=32, n_layers=2, n_heads=4, ffn_dim=64, max_positions=64)
  rng = np.random.default_rng(0)
  normal = lambda *s: (0.05 * rng.standard_normal(s)).astype(np.float32)
  w = {"embeddings.word_embeddings": normal(80, 32), "embeddings.position_embeddings": normal(64, 32),
       "embeddings.token_type_embeddings": normal(2, 32), "embeddings.emb_norm.weight": np.ones(32, np.float32),
       "embeddings.emb_norm.bias": np.zeros(32, np.float32)}
  for i in range(2):
    for name, shape in (("attn.q_proj", (32, 32)), ("attn.k_proj", (32, 32)), ("attn.v_proj", (32, 32)),
                        ("attn.o_proj", (32, 32)), ("mlp.up_proj", (32, 64)), ("mlp.down_proj", (64, 32))):
      w[f"layers.{i}.{name}.kernel"], w[f"layers.{i}.{name}.bias"] = normal(*shape), normal(shape[1])
    for norm in ("attn_norm", "mlp_norm"):
      w[f"layers.{i}.{norm}.weight"] = (1 + normal(32)).astype(np.float32)
      w[f"layers.{i}.{norm}.bias"] = normal(32)
  return bert.Bert.from_weights(config, w)


def test_encoder_blocks_take_the_mask():
  model = _tiny_bert()
  ids = _tokens(n=8, seq=16, vocab=80)
  mask = np.ones_like(ids)
  mask[:, 12:] = 0
  config = lkd.LKDConfig(steps=30, batch_size=4, seq_len=16, n_samples=8, learning_rate=1e-4, keep_best=False)
  result = lkd.lkd_quantize(model, W48A16, [(ids[:4], mask[:4]), (ids[4:], mask[4:])], config, progress=False)
  assert all(b.mse_lkd < b.mse_rtn for b in result.blocks), result.blocks
  assert isinstance(result.model.layers[1].mlp.up_proj.kernel.get_value(), formats.QArray)
  # padded positions do not matter to real ones, as in the float model
  ids2 = ids.copy()
  ids2[:, 12:] = 3
  a = result.model.embed_sentences(jnp.asarray(ids), jnp.asarray(mask))
  b = result.model.embed_sentences(jnp.asarray(ids2), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  random = lkd.lkd_quantize(model, W48A16, None, dataclasses.replace(config, data="generated"), progress=False)
  assert random.samples == (8, 16)


def test_unsupported_rules_are_refused(tiny):
  static = (rules.Rule(rules.BLOCK_LINEARS, W4A16[0].weight, activation="tensor"),)
  with pytest.raises(lkd.LKDError, match="static per-tensor"):
    lkd.lkd_quantize(tiny, static, [_tokens()], LKD, progress=False)
  with pytest.raises(lkd.LKDError, match="learning_rate must be positive"):
    lkd.LKDConfig(learning_rate=0)


def test_real_smollm2_block_gets_closer_to_its_teacher():
  """One block of the real SmolLM2-135M (fetched on first use), W4/8, a few steps on real text."""
  from jaxquant import pipeline
  loaded = pipeline.load("smollm2-135m", n_layers=1)
  config = lkd.LKDConfig(steps=6, batch_size=4, seq_len=32, n_samples=4, learning_rate=1e-4, keep_best=False)
  calibration = lkd.calibration_from_text(loaded.tokenizer, "lcet10", config)
  result = lkd.lkd_quantize(loaded.model, W48A16, calibration, config, progress=False)
  block = result.blocks[0]
  assert block.status == "lkd" and block.mse_lkd < block.mse_rtn, block
