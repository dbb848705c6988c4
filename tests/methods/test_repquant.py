"""RepQuant: packing of 5..7-bit codes, asymmetric static integer activations, the reparameterization (float model
unchanged, integer codes identical to per-channel quantization; LayerNorm and RMSNorm), the log-sqrt2 softmax
quantizer and its log2 inference form, the fake-quant block equal to the integer block, reconstruction, recipes and
bad input. Tiny random models; the real models are in experiments/repquant.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxquant import formats, ops, recipes
from jaxquant.formats import ActQuant
from jaxquant.methods import blockwise, naive_ptq
from jaxquant.methods import repquant as rq
from jaxquant.methods import repquant_core as core
from jaxquant.models import bert, llama, vit
from jaxquant.quantizers import SoftmaxQuant, WeightQuant, quantize_weight

LLAMA = llama.LlamaConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96)


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
      # Uneven per-channel ranges, as in real post-norm activations.
      w[f"layers.{i}.{norm}.weight"] = (1 + 3 * np.abs(normal(32)) * rng.integers(1, 20, 32)).astype(np.float32)
      w[f"layers.{i}.{norm}.bias"] = (10 * normal(32)).astype(np.float32)
  return bert.Bert.from_weights(config, w)


def _tokens(n=8, seq=16, vocab=80, seed=0):
  return np.random.default_rng(seed).integers(0, vocab, (n, seq)).astype(np.int32)


# every choice beyond RepQ-ViT's own (the defaults): latent weights and activation scales trained, quantized inputs,
# calibrated softmax step; rq.PAPER turns them off
FULL = dict(recon_weights=True, recon_act_scales=True, recon_inputs="quantized", calibrate_softmax=True)
FAST = rq.RepQuantConfig(weight_bits=4, act_bits=4, n_samples=8, seq_len=16, clip_steps=10, recon_steps=5,
                         recon_batch=4)


# ---------------------------------------------------------------------------------------------------------------
# formats and ops


def test_six_bit_weight_is_stored_in_six_bits_a_code():
  w = jnp.asarray(np.random.default_rng(0).standard_normal((64, 16)), jnp.float32)
  q = quantize_weight(w, WeightQuant(bits=6, granularity="channel"))
  assert q.packed.shape == (16, 48)
  assert float(jnp.max(jnp.abs(q.dequantize() - w))) <= float(jnp.max(q.scale)) / 2 + 1e-6


@pytest.mark.parametrize("act_bits", [4, 6, 8])
def test_asymmetric_static_activation_integer_path_is_exact(act_bits, strict_numerics):
  """q @ W_int + (2^(b-1) - z) colsum(W_int) in int32 equals the float product of the dequantized operands."""
  rng = np.random.default_rng(act_bits)
  x = jnp.asarray(rng.standard_normal((5, 7, 48)) + 0.7, jnp.float32)
  w = jnp.asarray(rng.standard_normal((48, 24)), jnp.float32)
  scale, zero = jnp.float32(0.9 / (2**act_bits - 1) * 8), jnp.float32(2**act_bits // 3)
  for weight in (WeightQuant(4, True, "channel"), WeightQuant(8, True, "group", 16)):
    q = quantize_weight(w, weight, activation=ActQuant(act_bits, "tensor", scale, zero))
    y = ops.qdot(x, q, backend="xla")
    codes = core.channel_codes(x, scale, zero, act_bits)
    reference = jnp.dot((codes - zero) * scale, q.dequantize(), precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(np.asarray(y), np.asarray(reference), rtol=1e-5, atol=1e-4)


def test_activation_zero_point_refused_by_the_kernels_with_the_fix():
  w = quantize_weight(jnp.ones((16, 8), jnp.float32), WeightQuant(8, True, "channel"),
                      activation=ActQuant(8, "tensor", jnp.float32(0.1), jnp.float32(3.0)))
  with pytest.raises(ValueError, match="backend='xla'"):
    ops.qdot(jnp.ones((2, 16), jnp.float32), w, backend="interpret")


# ---------------------------------------------------------------------------------------------------------------
# reparameterization


def _uneven_channels(rng, shape):
  """Activations whose channels have very different, shifted ranges (like post-LayerNorm ones)."""
  c = shape[-1]
  return (rng.standard_normal(shape) * rng.uniform(0.05, 8.0, c) + rng.uniform(-3, 3, c)).astype(np.float32)


@pytest.mark.parametrize("with_beta", [True, False])
def test_reparameterization_keeps_outputs_and_codes(with_beta, strict_numerics):
  """LayerNorm (beta) and RMSNorm (no beta: the fold adds one): the folded norm + linear compute the same outputs,
  and the layer-wise codes of the folded activations equal the per-channel codes of the original ones."""
  rng = np.random.default_rng(1)
  c, n, bits = 48, 20, 4
  normalized = jnp.asarray(rng.standard_normal((300, c)), jnp.float32)
  gamma = jnp.asarray(rng.uniform(0.1, 6.0, c), jnp.float32)
  beta = jnp.asarray(rng.uniform(-2, 2, c), jnp.float32) if with_beta else None
  kernel = jnp.asarray(rng.standard_normal((c, n)) * 0.1, jnp.float32)
  bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
  x = normalized * gamma[None, :] + (beta[None, :] if beta is not None else 0.0)
  lo, hi = core.init_bounds(x, per_channel=True, quantile=0.99)
  scale, zero = core.channel_qparams(lo, hi, bits)
  layer_scale, layer_zero = core.layerwise_qparams(scale, zero)
  r1, r2 = core.reparam_factors(scale, zero, layer_scale, layer_zero)
  gamma2, beta2 = core.fold_norm(gamma, beta, scale, r1, r2)
  kernel2, bias2 = core.fold_linear(kernel, bias, scale, r1, r2)
  x2 = normalized * gamma2[None, :] + beta2[None, :]
  y = x @ kernel + bias[None, :]
  y2 = x2 @ kernel2 + bias2[None, :]
  np.testing.assert_allclose(np.asarray(y2), np.asarray(y), rtol=1e-4, atol=1e-4)
  per_channel = core.channel_codes(x, scale, zero, bits)
  layer_wise = core.channel_codes(x2, layer_scale, layer_zero, bits)
  assert float(jnp.max(jnp.abs(r2 - jnp.round(r2)))) == 0.0  # integer zero-point shifts
  assert len(np.unique(np.asarray(scale))) > 10  # the test really has per-channel scales
  np.testing.assert_array_equal(np.asarray(layer_wise), np.asarray(per_channel))


def _qparams_from_acts(block, acts, bits):
  out = {}
  for group in rq.input_groups(block):
    x = acts[group.name]
    per_channel = group.norm is not None
    lo, hi = core.init_bounds(x, per_channel, quantile=0.995)
    out[group.name] = rq.GroupQParams(*core.channel_qparams(lo, hi, bits))
  return out


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_folded_model_blocks_match_float_and_per_channel_codes(family):
  """On real blocks: the folded float block's output equals the original's; the activations entering every
  reparameterized linear, quantized layer-wise (s~, z~), give exactly the per-channel codes of the original."""
  if family == "llama":
    model = llama.random_llama(LLAMA, seed=3)
    for block in model.layers:  # uneven RMSNorm weights, so per-channel scales differ a lot
      w = block.attn_norm.weight.get_value()
      block.attn_norm.weight.set_value(w * jnp.asarray(np.random.default_rng(0).uniform(0.1, 8, w.shape[0]),
                                                       jnp.float32))
    x = model.embed_tokens(jnp.asarray(_tokens(vocab=96)))
    extra = ()
  else:
    model = _tiny_bert()
    tokens = _tokens()
    x = model.embeddings(jnp.asarray(tokens))
    extra = (jnp.ones(tokens.shape, jnp.int32),)
  bits = 4
  block = model.layers[0]
  groups = rq.input_groups(block)
  y, acts = rq.capture_inputs(block, x, extra, groups, chunk=4)
  qparams = _qparams_from_acts(block, acts, bits)
  folded, layer_qparams = rq.fold_block(block, qparams)
  y_folded = blockwise.apply_block(folded, x, extra, 4)
  np.testing.assert_allclose(np.asarray(y_folded), np.asarray(y), rtol=1e-4, atol=2e-5)
  # The activations entering the folded block's linears, recorded the one way the library records them.
  _, recorded = blockwise.apply_recording(folded, x, extra, 4, [g.linears[0] for g in groups])
  checked = 0
  for group in groups:
    if not qparams[group.name].per_channel:
      continue
    original = core.channel_codes(acts[group.name], qparams[group.name].scale, qparams[group.name].zero, bits)
    folded_x = jnp.concatenate(recorded[group.linears[0]])
    q = layer_qparams[group.name]
    assert q.scale.ndim == 0 and q.zero.ndim == 0
    mismatch = int(jnp.sum(core.channel_codes(folded_x, q.scale, q.zero, bits) != original))
    assert mismatch == 0, f"{group.name}: {mismatch} codes differ"
    checked += 1
  assert checked == 2


# ---------------------------------------------------------------------------------------------------------------
# softmax


def test_log_sqrt2_codes_values_and_zero(strict_numerics):
  sq = SoftmaxQuant(4, "log_sqrt2")
  p = jnp.asarray([1.0, 0.5, 2 ** -0.5, 0.3, 2 ** -7, 2 ** -7.5, 1e-4, 0.0], jnp.float32)
  codes = sq.codes(p)
  np.testing.assert_array_equal(np.asarray(codes), [0, 2, 1, 3, 14, 15, 15, 15])
  values = sq.dequantize(codes)
  expected = np.where(np.asarray(codes) == 15, 0.0, 2.0 ** (-np.asarray(codes) / 2))
  np.testing.assert_allclose(np.asarray(values), expected, rtol=1e-6)


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_log2_inference_form_equals_log_sqrt2(bits, strict_numerics):
  """P @ V through exact powers of two with the sqrt2 folded into the odd codes' partial sum equals the
  calibration form (dequantized log-sqrt2 probabilities times V) up to float summation order."""
  rng = np.random.default_rng(bits)
  scores = jnp.asarray(rng.standard_normal((2, 3, 12, 12)) * 3, jnp.float32)
  probs = jax.nn.softmax(scores, axis=-1)
  v = jnp.asarray(rng.standard_normal((2, 12, 3, 8)), jnp.float32)
  spec = "bhts,bshd->bthd"
  calibration = SoftmaxQuant(bits, "log_sqrt2").attend(probs, v, spec)
  inference = SoftmaxQuant(bits, "log2").attend(probs, v, spec)
  np.testing.assert_allclose(np.asarray(inference), np.asarray(calibration), rtol=2e-6, atol=2e-6)
  codes = SoftmaxQuant(bits, "log2").codes(probs)
  exponent, odd = (codes + 1) // 2, codes % 2 == 1
  powers = jnp.ldexp(jnp.float32(1.0), -exponent)
  # the powers really are powers of two (mantissa 1) and odd codes really occur
  mantissa, _ = jnp.frexp(powers)
  assert bool(jnp.all(mantissa == 0.5)) and bool(jnp.any(odd))


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_attention_log_sqrt2_and_log2_give_the_same_model_outputs(family):
  if family == "llama":
    model, inputs = llama.random_llama(LLAMA, seed=0), (jnp.asarray(_tokens(vocab=96)),)
  else:
    tokens = _tokens()
    model, inputs = _tiny_bert(), (jnp.asarray(tokens), jnp.ones(tokens.shape, jnp.int32))
  ref = model(*inputs)
  calib = naive_ptq.set_softmax_quant(nnx.clone(model), SoftmaxQuant(4, "log_sqrt2"))(*inputs)
  infer = naive_ptq.set_softmax_quant(nnx.clone(model), SoftmaxQuant(4, "log2"))(*inputs)
  np.testing.assert_allclose(np.asarray(infer), np.asarray(calib), rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(calib - ref))) > 0  # the quantizer is really applied
  np.testing.assert_array_equal(np.asarray(naive_ptq.set_softmax_quant(nnx.clone(model), None)(*inputs)), np.asarray(ref))


# ---------------------------------------------------------------------------------------------------------------
# the whole method


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_fake_block_equals_integer_block_and_model_runs(family):
  if family == "llama":
    model, batches = llama.random_llama(LLAMA, seed=2), [_tokens(vocab=96)]
  else:
    model, batches = _tiny_bert(), [_tokens()]
  block = model.layers[0]
  x = (model.embed_tokens if family == "llama" else model.embeddings)(jnp.asarray(batches[0]))
  extra = () if family == "llama" else (jnp.ones(batches[0].shape, jnp.int32),)
  groups = rq.input_groups(block)
  _, acts = rq.capture_inputs(block, x, extra, groups, 4)
  fake, _ = rq.build_fake_block(block, acts, FAST, 0, np.random.default_rng(0))
  real = rq.to_real_block(fake)
  linears = [node for _, node in nnx.iter_graph(real) if isinstance(node, rq.Linear)]
  assert len(linears) >= 6 and all(isinstance(lin.kernel.get_value(), formats.QArray) for lin in linears)
  assert all(lin.kernel.get_value().activation.zero is not None for lin in linears)
  assert real.attn.probs_quant.form == "log2" and fake.attn.probs_quant.form == "log_sqrt2"
  np.testing.assert_allclose(np.asarray(blockwise.apply_block(real, x, extra, 4)),
                             np.asarray(blockwise.apply_block(fake, x, extra, 4)), rtol=1e-4, atol=1e-4)


def test_repquant_run_reconstructs_and_beats_naive_on_a_tiny_decoder():
  model = llama.random_llama(LLAMA, seed=5)
  calibration = [_tokens(vocab=96, seed=1)]
  config = rq.RepQuantConfig(weight_bits=4, act_bits=4, n_samples=8, seq_len=16, clip_steps=30, recon_steps=20,
                             recon_lr=3e-3)
  result = rq.repquant_quantize(model, calibration, config, progress=False)
  assert [b.status for b in result.blocks] in (["reconstructed"] * 2,)
  assert all(b.mse_after < b.mse_before for b in result.blocks)
  assert sum(g.loss_learned < 0.99 * g.loss_minmax for b in result.blocks for g in b.groups) >= 4  # clipping helps
  naive = naive_ptq.NaivePTQProcedure(4, 4)(model, None, calibration, progress=False)
  tokens = jnp.asarray(_tokens(vocab=96, seed=7))
  ref = model(tokens)
  err = lambda m: float(jnp.mean(jnp.square(m(tokens) - ref)))
  assert err(result.model) < err(naive)


def test_calibrated_softmax_is_softmax_quant_with_that_step_in_both_forms(strict_numerics):
  rng = np.random.default_rng(0)
  probs = jax.nn.softmax(jnp.asarray(3 * rng.standard_normal((2, 3, 5, 40)), jnp.float32), axis=-1)
  v = jnp.asarray(rng.standard_normal((2, 40, 3, 8)), jnp.float32)
  spec = "bhts,bshd->bthd"
  for step in (1.0, 0.5 ** 0.5, 0.125):
    want = jnp.einsum(spec, SoftmaxQuant(4, "log_sqrt2", step).fake(probs), v)
    for form in ("log_sqrt2", "log2"):
      got = rq.CalibratedSoftmax(SoftmaxQuant(4, form), step).attend(probs, v, spec)
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_calibrated_softmax_step_keeps_diffuse_attention_that_step_one_zeroes():
  """With q = k = 0 every probability is 1/T; at T = 256 that is below a 4-bit log quantizer's smallest level
  (2^-7; below 2^-7.25 rounds to the zero code) at step 1, so P^ = 0 and attention is lost. The calibrated step
  must go below 2^7.25 / T and the block error must drop; the chosen step is a sqrt2 power."""
  model = vit.random_vit(vit.ViTConfig(dim=16, n_layers=1, n_heads=2, ffn_dim=32, patch=2, image_size=32), seed=1)
  block = model.layers[0]
  for path in ("attn.q_proj", "attn.k_proj"):
    lin = rq.surgery.get(block, path)
    lin.kernel.set_value(jnp.zeros_like(lin.kernel.get_value()))
    lin.bias.set_value(jnp.zeros_like(lin.bias.get_value()))
  images = np.random.default_rng(0).standard_normal((4, 32, 32, 3)).astype(np.float32)
  x = model.embed_tokens(jnp.asarray(images))
  assert x.shape[1] == 257
  y, acts = rq.capture_inputs(block, x, (), rq.input_groups(block), 4)
  config = rq.RepQuantConfig(weight_bits=8, act_bits=8, softmax_bits=4, dual_clipping=False)
  fake, _ = rq.build_fake_block(block, acts, config, 0, np.random.default_rng(0))
  mse_one = blockwise.block_mse(fake, x, y, (), 4)
  step, mse = rq.calibrate_softmax(fake, x, y, (), 4)
  assert step < 2.0 ** 7.25 / 257 and mse < 0.1 * mse_one
  assert any(abs(step - 2 ** (-k / 2)) < 1e-9 for k in range(rq.SOFTMAX_STEPS + 1))
  real = rq.to_real_block(fake)
  assert real.attn.probs_quant.form == "log2" and float(real.attn.probs_quant.scale.get_value()) == np.float32(step)
  np.testing.assert_allclose(np.asarray(blockwise.apply_block(real, x, (), 4)),
                             np.asarray(blockwise.apply_block(fake, x, (), 4)), rtol=1e-4, atol=1e-4)


def test_training_latent_weights_and_activation_scales_lowers_the_block_error_further():
  """The reconstruction options train more than RepQ-ViT's weight scales and biases: with the same steps, the
  block error after reconstruction is lower, the integer codes and activation scales moved, and the integer block
  still equals the fake one."""
  model = llama.random_llama(LLAMA, seed=5)
  calibration = [_tokens(vocab=96, seed=1)]
  base = rq.RepQuantConfig(weight_bits=4, act_bits=4, n_samples=8, seq_len=16, clip_steps=10, recon_steps=40,
                           recon_lr=3e-3, **rq.PAPER)
  plain = rq.repquant_quantize(model, calibration, base, progress=False)
  more = rq.repquant_quantize(model, calibration, dataclasses.replace(
      base, recon_weights=True, recon_weight_lr=1e-3, recon_act_scales=True), progress=False)
  assert more.blocks[0].mse_before == plain.blocks[0].mse_before
  assert more.blocks[0].mse_after < 0.9 * plain.blocks[0].mse_after
  codes = lambda result: result.model.layers[0].mlp.up_proj.kernel.get_value()
  assert not np.array_equal(np.asarray(codes(plain).packed), np.asarray(codes(more).packed))
  assert float(codes(plain).activation.scale) != float(codes(more).activation.scale)
  quantized_inputs = rq.repquant_quantize(model, calibration, dataclasses.replace(base, recon_inputs="quantized"),
                                          progress=False)
  assert quantized_inputs.blocks[0].mse_before == plain.blocks[0].mse_before  # block 0's input is the embedding
  assert quantized_inputs.blocks[1].mse_before != plain.blocks[1].mse_before


def test_recipes_are_registered():
  for bits in (4, 6, 8):
    recipe = recipes.get_recipe(f"repquant-w{bits}a{bits}")
    assert recipe.uses_calibration and recipe.procedure.config.weight_bits == bits
    assert recipes.get_recipe(f"naive-w{bits}a{bits}").procedure.act_bits == bits
    for name in rq.ABLATIONS:
      assert recipes.get_recipe(f"repquant-w{bits}a{bits}-{name}").procedure.config != recipe.procedure.config
    paper = recipes.get_recipe(f"repquant-w{bits}a{bits}-paper").procedure.config
    assert paper == dataclasses.replace(recipe.procedure.config, **rq.PAPER) and not paper.calibrate_softmax


# ---------------------------------------------------------------------------------------------------------------
# bad input


def test_zero_range_channel_is_coded_exactly(strict_numerics):
  x = jnp.asarray(np.random.default_rng(0).standard_normal((50, 6)), jnp.float32).at[:, 2].set(0.0)
  lo, hi = core.init_bounds(x, per_channel=True)
  scale, zero = core.channel_qparams(lo, hi, 4)
  assert bool(jnp.all(jnp.isfinite(scale))) and float(scale[2]) > 0
  np.testing.assert_allclose(float(scale[2]), float(jnp.mean(jnp.delete(scale, 2))), rtol=1e-5)
  codes = core.channel_codes(x, scale, zero, 4)
  assert bool(jnp.all((codes[:, 2] - zero[2]) == 0))
  layer_scale, layer_zero = core.layerwise_qparams(scale, zero)
  r1, r2 = core.reparam_factors(scale, zero, layer_scale, layer_zero)
  assert bool(jnp.all(jnp.isfinite(r1))) and float(jnp.min(r1)) > 0


def test_unknown_reconstruction_inputs_are_refused():
  with pytest.raises(core.RepQuantError, match="recon_inputs must be 'float' or 'quantized'.*'student'"):
    rq.RepQuantConfig(recon_inputs="student")


def test_crossed_bounds_are_refused_naming_the_channel():
  with pytest.raises(core.RepQuantError, match=r"layers.1.attn.q_proj input.*channel 2.*lower"):
    rq.qparams_from_bounds(jnp.asarray([-1.0, -1.0, 0.5]), jnp.asarray([1.0, 1.0, 0.2]), 4,
                           "layers.1.attn.q_proj input")


def test_nan_calibration_activations_are_refused_naming_the_place():
  model = llama.random_llama(LLAMA, seed=0)
  w = model.layers[1].mlp_norm.weight.get_value()
  model.layers[1].mlp_norm.weight.set_value(w.at[3].set(jnp.nan))
  with pytest.raises(core.RepQuantError, match=r"layers\.1\.mlp\.gate_proj input.*NaN"):
    rq.repquant_quantize(model, [_tokens(vocab=96)], FAST, progress=False)


def test_symmetric_rms_option_folds_without_a_norm_bias():
  """RMSNorm with symmetric per-channel clipping: every zero point is 2^(b-1), so r2 = 0, the norm stays an
  RMSNorm (no bias) and the linears get no bias; the folded block still computes the same output."""
  model = llama.random_llama(LLAMA, seed=4)
  x = model.embed_tokens(jnp.asarray(_tokens(vocab=96)))
  block = model.layers[0]
  y, acts = rq.capture_inputs(block, x, (), rq.input_groups(block), 4)
  config = rq.RepQuantConfig(weight_bits=4, act_bits=4, symmetric_rms=True, dual_clipping=False)
  qparams, _ = rq.calibrate_block(block, acts, config, 0, np.random.default_rng(0))
  assert bool(jnp.all(qparams["attn_norm"].zero == 8.0))
  folded, layer = rq.fold_block(block, qparams, symmetric_rms=True)
  assert type(folded.attn_norm) is rq.RMSNorm and folded.attn.q_proj.bias is None
  assert float(layer["attn_norm"].zero) == 8.0
  np.testing.assert_allclose(np.asarray(blockwise.apply_block(folded, x, (), 4)), np.asarray(y), rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("options", [rq.PAPER, FULL], ids=["paper", "full"])
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_saved_repquant_model_restores_onto_the_procedures_template(family, options, tmp_path):
  """A RepQuant checkpoint has modules the float model lacks; the procedure's template supplies that graph, so
  save -> restore gives back the same model (what `jaxquant eval <checkpoint>` does)."""
  from jaxquant import checkpoint, pipeline
  if family == "llama":
    model, batches, inputs = llama.random_llama(LLAMA, seed=2), [_tokens(vocab=96)], (jnp.asarray(_tokens(2, 8, 96)),)
  else:
    tokens = _tokens(2, 8)
    model, batches, inputs = _tiny_bert(), [_tokens()], (jnp.asarray(tokens), jnp.ones(tokens.shape, jnp.int32))
  procedure = rq.RepQuantProcedure(dataclasses.replace(FAST, **options))
  quantized = procedure(model, None, batches, progress=False)
  checkpoint.save(tmp_path / "q", quantized, recipe_name="repquant-test", source={"name": "tiny"})
  with pytest.raises(checkpoint.CheckpointError, match="template model lacks"):
    checkpoint.restore(tmp_path / "q", model)
  restored = checkpoint.restore(tmp_path / "q", procedure.template(model))
  np.testing.assert_array_equal(np.asarray(restored(*inputs)), np.asarray(quantized(*inputs)))
  assert recipes.restore_template(model, "zeroquant-w8a8") is model


# ---------------------------------------------------------------------------------------------------------------
# a pre-norm LayerNorm model whose samples are images (models.vit)


VIT = vit.ViTConfig(dim=16, n_layers=2, n_heads=2, ffn_dim=32, patch=4, image_size=16)


def _vit_images(n=8, seed=0):
  return np.random.default_rng(seed).standard_normal((n, 16, 16, 3)).astype(np.float32)


def test_norm_fold_into_a_layernorm_keeps_a_layernorm_with_its_bias_and_the_block_output():
  """fold "norm" into a LayerNorm (pre-norm ViT): gamma' = gamma / r1, beta' = (beta + s r2) / r1 in the LayerNorm
  itself; the folded block computes the same output and the layer-wise codes equal the per-channel ones."""
  model = vit.random_vit(VIT, seed=2)
  x = model.embed_tokens(jnp.asarray(_vit_images()))
  block = model.layers[0]
  groups = rq.input_groups(block)
  y, acts = rq.capture_inputs(block, x, (), groups, chunk=4)
  qparams = _qparams_from_acts(block, acts, 4)
  folded, layer_qparams = rq.fold_block(block, qparams)
  assert type(folded.attn_norm) is type(block.attn_norm)  # still a LayerNorm, carrying beta'
  r1, r2 = core.reparam_factors(qparams["attn_norm"].scale, qparams["attn_norm"].zero,
                                *core.layerwise_qparams(qparams["attn_norm"].scale, qparams["attn_norm"].zero))
  np.testing.assert_allclose(np.asarray(folded.attn_norm.bias.get_value()),
                             np.asarray((block.attn_norm.bias.get_value() + qparams["attn_norm"].scale * r2) / r1),
                             rtol=1e-6)
  np.testing.assert_allclose(np.asarray(blockwise.apply_block(folded, x, (), 4)), np.asarray(y), rtol=1e-4,
                             atol=2e-5)
  _, recorded = blockwise.apply_recording(folded, x, (), 4, ["attn.q_proj", "mlp.up_proj"])
  for group, path in (("attn_norm", "attn.q_proj"), ("mlp_norm", "mlp.up_proj")):
    want = core.channel_codes(acts[group], qparams[group].scale, qparams[group].zero, 4)
    got = core.channel_codes(jnp.concatenate(recorded[path]), layer_qparams[group].scale, layer_qparams[group].zero, 4)
    assert int(jnp.sum(got != want)) == 0, group


@pytest.mark.parametrize("options", [rq.PAPER, FULL], ids=["paper", "full"])
def test_repquant_and_naive_run_on_image_samples_and_restore_onto_the_template(options, tmp_path):
  from jaxquant import checkpoint
  model = vit.random_vit(VIT, seed=3)
  images = _vit_images()
  procedure = rq.RepQuantProcedure(dataclasses.replace(FAST, **options))
  quantized = procedure(model, None, [images], progress=False)
  assert quantized.layers[0].attn.probs_quant.form == "log2"
  checkpoint.save(tmp_path / "q", quantized, recipe_name="repquant-test", source={"name": "tiny-vit"})
  restored = checkpoint.restore(tmp_path / "q", procedure.template(model))
  np.testing.assert_array_equal(np.asarray(restored(images[:2])), np.asarray(quantized(images[:2])))
  naive = naive_ptq.NaivePTQProcedure(8, 8)(model, None, [images], progress=False)
  ref, out = np.asarray(model(images)), np.asarray(naive(images))
  assert np.mean(np.sum(ref * out, -1) / np.linalg.norm(ref, axis=-1) / np.linalg.norm(out, axis=-1)) > 0.9
