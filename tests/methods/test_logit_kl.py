"""The logit KL finishing pass (jaxquant/methods/logit_kl.py): what it trains, what it stores, when it keeps nothing,
and its errors. A 2-block random llama whose block kernels are scaled up 4x, so that 3-bit weights move its
logits (KL ~0.05; at the initial scale it is ~1e-5, too little to train on)."""

import jax
import numpy as np
import pytest
from flax import nnx

import numpy_ref
from jaxquant import formats, pipeline, recipes, streaming
from jaxquant.formats import BCQArray, QArray
from jaxquant.methods import lkd, logit_kl
from jaxquant.models import llama, surgery

CONFIG = llama.LlamaConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96)
WINDOWS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (64, 32)).astype(np.int32)
FAST = logit_kl.LogitKLConfig(steps=20, learning_rate=1e-3)


@pytest.fixture(scope="module")
def teacher():
  model = llama.random_llama(CONFIG)
  for module in surgery.modules(model).values():
    module.kernel.set_value(module.kernel.get_value() * 4)
  return model


def _kernels(model) -> dict:
  return {path: m.kernel.get_value() for path, m in surgery.modules(model).items() if path.startswith("layers.")}


def _held_out_kl(teacher, model) -> float:
  held = WINDOWS[-FAST.check_windows:]
  return numpy_ref.kl_top1(np.asarray(teacher(held), np.float64), np.asarray(model(held), np.float64))[0]


@pytest.mark.parametrize("recipe", ["lutgemm-bcq3-offset-g128", "rtn-w3-g64"])
def test_the_pass_trains_the_formats_parameters_and_stores_what_it_trained(teacher, recipe):
  quantized = pipeline.quantize_model(teacher, recipes.get_recipe(recipe), [WINDOWS[:8]], progress=False)
  finished, report = logit_kl.finish_on_logits(teacher, quantized, WINDOWS, FAST, progress=False)
  assert report.kept and report.arrays == 14 and report.steps == FAST.steps
  # The report's figures are the models' own held-out KL, recomputed in float64 from their logits: the stored
  # (float16-rounded) parameters compute what was trained.
  assert report.kl_before == pytest.approx(_held_out_kl(teacher, quantized), rel=1e-3)
  assert report.kl_after == pytest.approx(_held_out_kl(teacher, finished), rel=1e-3)
  assert report.kl_after < 0.95 * report.kl_before
  for path, before in _kernels(quantized).items():
    after = _kernels(finished)[path]
    assert type(after) is type(before) and after.shape == before.shape
    if isinstance(before, BCQArray):  # the sign planes stay; alphas and offsets move, in their stored dtype
      np.testing.assert_array_equal(np.asarray(after.planes), np.asarray(before.planes), err_msg=path)
      assert after.alpha.dtype == before.alpha.dtype and after.offset.dtype == before.offset.dtype
      assert not np.array_equal(np.asarray(after.alpha), np.asarray(before.alpha)), path
    else:  # the codes and zero points stay; scales move
      assert isinstance(before, QArray)
      np.testing.assert_array_equal(np.asarray(after.packed), np.asarray(before.packed), err_msg=path)
      np.testing.assert_array_equal(np.asarray(after.zero), np.asarray(before.zero), err_msg=path)
      assert after.scale.dtype == before.scale.dtype
      assert not np.array_equal(np.asarray(after.scale), np.asarray(before.scale)), path
  # Outside the formats nothing moved, and the input model is untouched.
  float_leaves = lambda m: [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(nnx.state(m),
                                                                                    is_leaf=formats.is_qarray)
                            if not formats.is_qarray(leaf)]
  for a, b in zip(float_leaves(quantized), float_leaves(finished)):
    np.testing.assert_array_equal(a, b)
  assert _held_out_kl(teacher, quantized) == pytest.approx(report.kl_before, rel=1e-6)


def test_a_pass_that_makes_things_worse_keeps_the_models_parameters(teacher):
  quantized = pipeline.quantize_model(teacher, recipes.get_recipe("rtn-w3-g64"), progress=False)
  with pytest.warns(RuntimeWarning, match=r"held-out KL went .*\(learning_rate=30\.0\); the model keeps"):
    finished, report = logit_kl.finish_on_logits(teacher, quantized, WINDOWS,
                                                 logit_kl.LogitKLConfig(steps=5, learning_rate=30.0), progress=False)
  assert not report.kept
  for path, before in _kernels(quantized).items():
    np.testing.assert_array_equal(np.asarray(_kernels(finished)[path].scale), np.asarray(before.scale))


def test_bad_input_is_refused_before_any_training(teacher):
  quantized = pipeline.quantize_model(teacher, recipes.get_recipe("rtn-w3-g64"), progress=False)
  with pytest.raises(logit_kl.LogitKLError, match="8 calibration windows: the pass needs more than check_windows=8"):
    logit_kl.finish_on_logits(teacher, quantized, WINDOWS[:8], FAST)
  with pytest.raises(logit_kl.LogitKLError, match=r"windows must be \(N, T\) integer token ids, got float32"):
    logit_kl.finish_on_logits(teacher, quantized, WINDOWS.astype(np.float32), FAST)
  with pytest.raises(logit_kl.LogitKLError, match="holds no weight-only BCQArray or QArray"):
    logit_kl.finish_on_logits(teacher, teacher, WINDOWS, FAST)
  with pytest.raises(logit_kl.LogitKLError, match="learning_rate must be positive"):
    logit_kl.LogitKLConfig(learning_rate=0.0)
  with pytest.raises(logit_kl.LogitKLError, match="steps must be a positive integer"):
    logit_kl.LogitKLConfig(steps=0)


def test_the_kl_recipes_need_calibration_text_and_a_whole_model(teacher):
  recipe = recipes.get_recipe("lutgemm-bcq3-offset-g128-lkd-kl")
  assert recipe.procedure.finish == logit_kl.LogitKLConfig() and "final logits' KL" in recipe.description
  with pytest.raises(lkd.LKDError, match="the logit KL pass trains a decoder on calibration text windows"):
    recipe.procedure(teacher, recipe, None, progress=False)
  with pytest.raises(streaming.StreamingError, match="runs over the whole model"):
    streaming.check_streamable(recipe)
  streaming.check_streamable(recipes.get_recipe("lutgemm-bcq3-offset-g128-lkd"))  # block-wise alone streams
