"""RepQuant's finishing pass (RepQuantConfig.finish_steps, methods/repquant_finish): it lowers the held-out loss on
a decoder (logit KL) and an encoder (feature MSE), the integer model it returns computes the loss it reports,
a pass that makes things worse is dropped with a warning, and bad settings are refused. Tiny random models."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxquant.methods import repquant as rq
from jaxquant.methods import repquant_core as core
from jaxquant.methods import repquant_finish
from jaxquant.methods.logit_kl import mean_kl
from jaxquant.models import llama, vit

LLAMA = llama.LlamaConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96)
VIT = vit.ViTConfig(dim=16, n_layers=2, n_heads=2, ffn_dim=32, patch=4, image_size=16)
# RepQ-ViT's reconstruction (rq.PAPER) leaves the tiny models enough error for the pass to show
BASE = rq.RepQuantConfig(weight_bits=4, act_bits=4, n_samples=16, seq_len=16, clip_steps=10, recon_steps=10,
                         recon_lr=3e-3, **rq.PAPER)


def _tokens(n=16, seq=16, vocab=96, seed=1):
  return np.random.default_rng(seed).integers(0, vocab, (n, seq)).astype(np.int32)


def _images(n=16, seed=0):
  return np.random.default_rng(seed).standard_normal((n, 16, 16, 3)).astype(np.float32)


@pytest.mark.parametrize("family", ["llama", "vit"])
def test_finishing_pass_lowers_the_held_out_loss_and_the_integer_model_computes_it(family):
  if family == "llama":
    model, data = llama.random_llama(LLAMA, seed=5), _tokens()
    loss = lambda out, ref: float(mean_kl(ref, out))
  else:
    model, data = vit.random_vit(VIT, seed=3), _images()
    loss = lambda out, ref: float(jnp.mean(jnp.square(out - ref)))
  config = dataclasses.replace(BASE, finish_steps=40, finish_lr=3e-3)
  plain = rq.repquant_quantize(model, [data], BASE, progress=False)
  result = rq.repquant_quantize(model, [data], config, progress=False)
  report = result.finish
  assert report.loss == ("kl" if family == "llama" else "mse")
  assert report.kept and report.loss_after < 0.95 * report.loss_before
  assert report.held_out == repquant_finish.held_out(16) == 2
  held = jnp.asarray(data[-report.held_out:])
  ref = model(held)
  # the integer model is what was trained, and the pass started where reconstruction ended
  assert loss(result.model(held), ref) == pytest.approx(report.loss_after, rel=1e-3, abs=1e-7)
  assert loss(plain.model(held), ref) == pytest.approx(report.loss_before, rel=1e-3, abs=1e-7)
  assert plain.finish is None
  assert [b.mse_after for b in result.blocks] == [b.mse_after for b in plain.blocks]


def test_a_pass_that_raises_the_held_out_loss_is_dropped_with_a_warning():
  model, data = llama.random_llama(LLAMA, seed=5), _tokens()
  plain = rq.repquant_quantize(model, [data], BASE, progress=False)
  with pytest.warns(RuntimeWarning, match="held-out loss went .* keep their block-wise reconstruction"):
    result = rq.repquant_quantize(model, [data], dataclasses.replace(BASE, finish_steps=5, finish_lr=10.0),
                                  progress=False)
  assert not result.finish.kept
  tokens = jnp.asarray(_tokens(seed=9))
  np.testing.assert_array_equal(np.asarray(result.model(tokens)), np.asarray(plain.model(tokens)))


def test_bad_finishing_settings_are_refused_by_name():
  with pytest.raises(core.RepQuantError, match="finish_steps must be an integer >= 0, got -1"):
    rq.RepQuantConfig(finish_steps=-1)
  with pytest.raises(core.RepQuantError, match="finish_steps .* needs reconstruction=True"):
    rq.RepQuantConfig(finish_steps=10, reconstruction=False)


def test_a_finishing_pass_on_one_calibration_sample_is_refused_before_any_block_runs():
  model = vit.random_vit(VIT, seed=3)
  config = dataclasses.replace(BASE, n_samples=1, recon_batch=1, finish_steps=5)
  with pytest.raises(core.RepQuantError, match="finish_steps: the finishing pass holds out 1 of 1 calibration"):
    rq.repquant_quantize(model, [_images(1)], config, progress=False)


def test_template_of_a_finished_recipe_has_the_same_structure():
  """finish_steps changes values only: the procedure's template (for checkpoint restore) is the same graph."""
  model = vit.random_vit(VIT, seed=3)
  config = dataclasses.replace(BASE, n_samples=8, finish_steps=2)
  quantized = rq.RepQuantProcedure(config)(model, None, [_images(8)], progress=False)
  template = rq.RepQuantProcedure(config).template(model)
  shapes = lambda m: [(a.shape, a.dtype) for a in jax.tree_util.tree_leaves(nnx.state(m))]
  assert shapes(quantized) == shapes(template)
