"""Format distillation (methods/lkd_formats.py): it starts from the format's own fit exactly, lowers each block's
stored output error below that fit, stores the same packed arrays the fit stores, keeps the fit (and says so) when
training diverges, resumes, round-trips through checkpoints, streams, and its recipes work through the CLI's
options. Tiny random llamas."""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fixtures_hf import write_hf_llama
from jaxquant import checkpoint, cli, formats, pipeline, recipes, rules, streaming
from jaxquant.methods import blockwise, gptq_core, lkd, lkd_formats
from jaxquant.methods import lkd_formats_students as students
from jaxquant.methods.bcq import BCQQuant, UniformAsBCQ
from jaxquant.models import llama
from jaxquant.models.llama import abstract_llama
from jaxquant.quantizers import WeightQuant
from jaxquant.sources.loading import load_model

CONFIG = llama.LlamaConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96)
# lr 3e-4: the recipes' 1e-3 (sized on SmolLM2) overshoots on this tiny model's small random weights in 15 steps.
SMALL = dict(steps=15, batch_size=4, seq_len=16, n_samples=8, learning_rate=3e-4)
# BCQ with offset (whole-column groups at K = 64, 96), BCQ without offset with groups of 64 (down_proj: 64 + 32),
# uniform 3-bit with groups of 48 (64 = 48 + 16).
NAMES = ("lutgemm-bcq3-offset-g128-lkd", "lutgemm-bcq2-g64-lkd", "rtn-w3-g128-lkd-g48")


def _tokens(n=8, seq=16, seed=0):
  return np.random.default_rng(seed).integers(0, CONFIG.vocab_size, (n, seq)).astype(np.int32)


def _recipe(name, **overrides):
  return lkd_formats.with_options(recipes.get_recipe(name), **{**SMALL, **overrides})


def _run(model, recipe, **kwargs):
  return lkd.lkd_quantize(model, recipe.rules, [_tokens()], progress=False, method=recipe.procedure,
                          checkpoint_dir=recipe.procedure.checkpoint_dir, **kwargs)


def _kernels(model):
  return {path: leaf for path, leaf in ((rules.path_str(p), leaf) for p, leaf in jax.tree_util.tree_leaves_with_path(
      nnx.state(model), is_leaf=formats.is_qarray)) if formats.is_qarray(leaf)}


def _same(a, b) -> bool:
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  return (jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
          and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb)))


def _teacher_inputs(model, tokens):
  h = model.embed_tokens(jnp.asarray(tokens))
  inputs = []
  for block in model.layers:
    inputs.append(h)
    h = block(h)
  return inputs


def _fit(model, recipe, index, tokens):
  """The format's own fit of block `index` (the start of distillation), on the run's samples (hidden states computed
as the harness computes them: the BCQ fit is sensitive to the last bit of its row weights)."""
  x, _ = blockwise.model_inputs(model, tokens, None, 4)
  for block in list(model.layers)[:index]:
    x = blockwise.apply_block(block, x, (), 4)
  block = model.layers[index]
  _, recorded = blockwise.apply_recording(block, x, (), 4, *students.record_inputs(block))
  options = recipe.procedure.options
  weights = students.mean_squares(recorded, options.damp)
  return students.to_block(students.make_student(block, f"layers.{index}.", recipe.rules, options.codes, weights),
                           block)


@pytest.fixture(scope="module")
def tiny():
  return llama.random_llama(CONFIG, seed=1)


@pytest.fixture(scope="module")
def results(tiny):
  with warnings.catch_warnings():
    warnings.simplefilter("error", RuntimeWarning)  # a healthy run keeps no fit
    return {name: _run(tiny, _recipe(name)) for name in NAMES}


@pytest.mark.parametrize("codes", lkd_formats.CODES)
def test_the_student_starts_at_the_formats_own_fit(tiny, codes):
  block, prefix = tiny.layers[0], "layers.0."
  uniform = (rules.Rule(rules.BLOCK_LINEARS, WeightQuant(bits=3, symmetric=False, granularity="group",
                                                         group_size=48)),)
  start = students.to_block(students.make_student(block, prefix, uniform, codes), block)
  rtn = rules.quantize_tree({"layers": {0: nnx.state(block)}}, uniform, progress=False)["layers"][0]
  assert _same(nnx.state(start), rtn)  # round-to-nearest, bit for bit
  config = BCQQuant(bits=3, group_size=48, offset=True)
  bcq = (rules.Rule(rules.BLOCK_LINEARS, config),)
  row_weight = jnp.linspace(0.1, 3.0, CONFIG.dim)
  start = students.make_student(block, prefix, bcq, codes, {"attn.q_proj": row_weight})
  kernel = block.attn.q_proj.kernel.get_value()
  assert _same(start.attn.q_proj.stored(), config.quantize(kernel, row_weight=row_weight))  # the weighted fit
  assert _same(start.mlp.up_proj.stored(), config.quantize(block.mlp.up_proj.kernel.get_value()))


@pytest.mark.parametrize("name", NAMES)
def test_distillation_lowers_every_blocks_error_below_the_fit_in_the_fits_format(tiny, results, name):
  result, recipe = results[name], _recipe(name)
  tokens = _tokens()
  assert recipe.procedure.options.inputs == "quantized"  # the recipes': block k trains on what 0..k-1 compute
  student_input = tiny.embed_tokens(jnp.asarray(tokens))
  for index, x in enumerate(_teacher_inputs(tiny, tokens)):
    teacher = tiny.layers[index](x)
    fit = _fit(tiny, recipe, index, tokens)
    mse_fit = float(jnp.mean((fit(student_input) - teacher) ** 2))
    mse = float(jnp.mean((result.model.layers[index](student_input) - teacher) ** 2))
    student_input = result.model.layers[index](student_input)
    assert mse < 0.9 * mse_fit, (index, mse, mse_fit)
    report = result.blocks[index]
    assert report.status == "lkd" and report.mse_rtn == pytest.approx(mse_fit, rel=1e-4)
    assert report.mse_lkd == pytest.approx(mse, rel=1e-4)
    ours, theirs = _kernels(result.model.layers[index]), _kernels(fit)
    assert ours.keys() == theirs.keys() and len(ours) == 7
    for path, array in ours.items():  # the same packed type, shapes, dtypes and static fields as the fit
      assert type(array) is type(theirs[path])
      assert jax.tree_util.tree_structure(array) == jax.tree_util.tree_structure(theirs[path]), path
      for a, b in zip(jax.tree_util.tree_leaves(array), jax.tree_util.tree_leaves(theirs[path])):
        assert (a.shape, a.dtype) == (b.shape, b.dtype), path
  kernel = result.model.layers[1].mlp.down_proj.kernel.get_value()
  if name.startswith("lutgemm"):
    assert isinstance(kernel, formats.BCQArray) and kernel.alpha.dtype == jnp.float16
    assert (kernel.offset is not None) == ("offset" in name) and kernel.k_group == min(96, int(re.search(r"-g(\d+)-", name).group(1)))
  else:
    assert isinstance(kernel, formats.QArray) and kernel.bits == 3 and kernel.k_group == 48
    assert np.array_equal(kernel.zero, np.round(kernel.zero))  # zero points stay integers
  assert tiny.layers[0].mlp.up_proj.kernel.get_value().dtype == jnp.float32  # the float model is untouched
  assert result.compilations == 1


def test_fixed_codes_keep_the_fits_planes_and_train_the_alphas(tiny, results):
  recipe = _recipe("lutgemm-bcq3-offset-g128-lkd", codes="fixed")
  result = _run(tiny, recipe)
  fit = _kernels(_fit(tiny, recipe, 0, _tokens()))
  for path, array in _kernels(result.model.layers[0]).items():
    assert np.array_equal(array.planes, fit[path].planes), path
  assert not np.array_equal(array.alpha, fit[path].alpha)
  assert result.blocks[0].mse_lkd < result.blocks[0].mse_rtn


def test_a_diverging_run_keeps_the_fit_and_names_the_block(tiny):
  recipe = _recipe("lutgemm-bcq3-offset-g128-lkd", learning_rate=1e4, steps=3)
  with pytest.warns(RuntimeWarning) as caught:
    result = _run(tiny, recipe)
  messages = " ".join(str(w.message) for w in caught)
  for index in range(CONFIG.n_layers):
    assert f"LKD of block layers.{index}:" in messages and "keeps its start (start='fit')" in messages
    assert result.blocks[index].status in ("nan", "fit-kept")
    assert _same(nnx.state(result.model.layers[index]), nnx.state(_fit(tiny, recipe, index, _tokens())))
  with pytest.raises(lkd.LKDError, match=r"LKD of block layers.0: the loss became .* stopping"):
    _run(tiny, _recipe("lutgemm-bcq3-offset-g128-lkd", learning_rate=1e30, steps=3, on_nan="raise"))


def test_resume_and_checkpoint_round_trip(tmp_path, tiny, results):
  name = "rtn-w3-g128-lkd-g48"
  recipe = lkd_formats.with_options(recipes.get_recipe(name), checkpoint_dir=str(tmp_path / "blocks"), **SMALL)
  first = _run(tiny, recipe)
  assert _same(nnx.state(first.model), nnx.state(results[name].model))  # a checkpoint_dir changes nothing
  again = _run(tiny, recipe)
  assert [b.resumed for b in again.blocks] == [True, True] and _same(nnx.state(again.model), nnx.state(first.model))
  other = lkd_formats.with_options(recipe, format_lr=2.0)  # another run: refused, naming what differs
  with pytest.raises(lkd.LKDError, match=r"different LKD run \(format differ\)"):
    _run(tiny, other)
  for model_name in ("rtn-w3-g128-lkd-g48", "lutgemm-bcq3-offset-g128-lkd"):
    model = results[model_name].model
    out = checkpoint.save(tmp_path / model_name, model, recipe_name=model_name,
                          source={"family": "llama", "name": "tiny", **recipe.procedure.settings()})
    restored = checkpoint.restore(out, recipes.restore_template(tiny, model_name))
    assert _same(nnx.state(restored), nnx.state(model))


def test_streamed_format_distillation_equals_the_loaded_models(tmp_path):
  name = "lutgemm-bcq3-offset-g128-lkd"
  recipe = _recipe(name, steps=2)
  streaming.check_streamable(recipe)
  with pytest.raises(streaming.StreamingError, match="samples its LKD data from the whole float model"):
    streaming.check_streamable(recipes.get_recipe("lutgemm-bcq3-offset-g128-lkd-datafree"))
  write_hf_llama(tmp_path / "hf", CONFIG, seed=3)
  report = streaming.stream_quantize(tmp_path / "hf", tmp_path / "q", recipe, calibration=[_tokens()],
                                     progress=False)
  reference = _run(load_model(tmp_path / "hf"), recipe)
  restored = checkpoint.restore(tmp_path / "q", abstract_llama(CONFIG))
  assert _same(nnx.state(restored), nnx.state(reference.model))
  assert [b["mse_lkd"] for b in report.lkd_blocks] == [b.mse_lkd for b in reference.blocks]
  assert checkpoint.load_metadata(tmp_path / "q")["source"]["lkd_format"]["codes"] == "ste"


def test_recipes_options_and_refusals():
  names = [r.name for r in lkd_formats.RECIPES]
  for q in (2, 3, 4):
    for g in (64, 128):
      for name in (f"lutgemm-bcq{q}-g{g}-lkd", f"lutgemm-bcq{q}-offset-g{g}-lkd", f"rtn-w{q}-g{g}-lkd"):
        assert name in names and recipes.get_recipe(name).uses_calibration and name in recipes.listing()
  recipe = cli._recipe("lutgemm-bcq3-offset-g128-lkd", None, lkd_steps=7, lkd_resume="/tmp/nowhere")
  assert isinstance(recipe.procedure, lkd_formats.FormatLKDProcedure)
  assert (recipe.procedure.config.steps, recipe.procedure.checkpoint_dir) == (7, "/tmp/nowhere")
  assert recipe.procedure.options == lkd_formats.OPTIONS
  assert not recipes.get_recipe("rtn-w3-g128-lkd-datafree").uses_calibration
  with pytest.raises(lkd.LKDError, match="trains BCQQuant and WeightQuant kernels, not UniformAsBCQ"):
    students.check_rules((rules.Rule(rules.BLOCK_LINEARS, UniformAsBCQ()),))
  with pytest.raises(lkd.LKDError, match="codes must be one of"):
    lkd_formats.with_options(recipes.get_recipe("rtn-w3-g128-lkd"), codes="learned")


def test_quantized_inputs_train_each_block_on_what_the_quantized_blocks_before_it_compute(tiny):
  """inputs="quantized": block 1 starts from and trains on block 0's quantized output, against the float target."""
  recipe = _recipe("lutgemm-bcq3-offset-g128-lkd", inputs="quantized")
  result, tokens = _run(tiny, recipe), _tokens()
  x, _ = blockwise.model_inputs(tiny, tokens, None, 4)
  student_input = blockwise.apply_block(result.model.layers[0], x, (), 4)
  target = blockwise.apply_block(tiny.layers[1], blockwise.apply_block(tiny.layers[0], x, (), 4), (), 4)
  fit = _fit(tiny, recipe, 1, tokens)  # the fit's row weights still come from the float stream
  report = result.blocks[1]
  assert report.mse_rtn == pytest.approx(blockwise.block_mse(fit, student_input, target, (), 4), rel=1e-4)
  assert report.mse_lkd == pytest.approx(blockwise.block_mse(result.model.layers[1], student_input, target, (), 4),
                                         rel=1e-4)
  assert report.mse_lkd < report.mse_rtn
  with pytest.raises(lkd.LKDError, match="inputs must be one of"):
    lkd_formats.with_options(recipes.get_recipe("rtn-w3-g128-lkd"), inputs="mixed")


@pytest.mark.parametrize("start", lkd_formats.STARTS)
def test_fit_inputs_quantized_makes_each_fit_on_what_the_quantized_blocks_before_it_compute(tiny, start):
  """fit_inputs="quantized": block 1's start (row weights, GPTQ Hessians) is recorded on block 0's quantized output,
  the input block 1 trains on and sees deployed, not on the float stream."""
  recipe = _recipe("lutgemm-bcq3-offset-g128-lkd", inputs="quantized", fit_inputs="quantized", start=start)
  result, tokens = _run(tiny, recipe), _tokens()
  x, _ = blockwise.model_inputs(tiny, tokens, None, 4)
  float_input = blockwise.apply_block(tiny.layers[0], x, (), 4)
  student_input = blockwise.apply_block(result.model.layers[0], x, (), 4)
  target, block = blockwise.apply_block(tiny.layers[1], float_input, (), 4), tiny.layers[1]
  damp = recipe.procedure.options.damp

  def start_on(inputs):
    if start == "gptq":
      _, recorded = blockwise.apply_recording(block, inputs, (), 4, *students.record_hessians(block))
      hessians = students.hessians(recorded)
      weights = students.row_weights_of(hessians, damp)
    else:
      _, recorded = blockwise.apply_recording(block, inputs, (), 4, *students.record_inputs(block))
      hessians, weights = None, students.mean_squares(recorded, damp)
    student = students.make_student(block, "layers.1.", recipe.rules, "ste", weights, hessians)
    return blockwise.block_mse(students.to_block(student, block), student_input, target, (), 4)

  on_quantized, on_float = start_on(student_input), start_on(float_input)
  assert result.blocks[1].mse_rtn == pytest.approx(on_quantized, rel=1e-4)
  assert on_quantized != pytest.approx(on_float, rel=1e-3)  # the two streams give different starts
  with pytest.raises(lkd.LKDError, match="only inputs='quantized' computes"):
    lkd_formats.with_options(recipes.get_recipe("rtn-w3-g128-lkd"), inputs="float", fit_inputs="quantized")
  with pytest.raises(lkd.LKDError, match="fit_inputs must be one of"):
    lkd_formats.with_options(recipes.get_recipe("rtn-w3-g128-lkd"), fit_inputs="student")


def test_train_kernels_leaves_norms_and_trains_the_formats_parameters(tiny):
  result = _run(tiny, _recipe("rtn-w3-g128-lkd-g48", train="kernels", steps=5, keep_best=False))
  block, float_block = result.model.layers[0], tiny.layers[0]
  assert np.array_equal(block.attn_norm.weight.get_value(), float_block.attn_norm.weight.get_value())
  fit = _kernels(_fit(tiny, _recipe("rtn-w3-g128-lkd-g48"), 0, _tokens()))
  assert any(not np.array_equal(a.scale, fit[path].scale) for path, a in _kernels(block).items())


def test_symmetric_int8_int4_with_token_activations(tiny):
  """ZeroQuant's W4/8A8 rules (symmetric int4 MLP, int8 attention, int8 token-wise activations) distilled as
  formats: the stored QArrays carry the activation scheme and the run lowers the error below round-to-nearest."""
  from jaxquant.methods.zeroquant import W48A8
  procedure = lkd_formats.FormatLKDProcedure(lkd.LKDConfig(**{**SMALL, "learning_rate": 3e-5}))
  result = lkd.lkd_quantize(tiny, W48A8, [_tokens()], progress=False, method=procedure)
  rtn = rules.quantize_tree(nnx.state(tiny), W48A8, progress=False)
  for path, array in _kernels(result.model).items():
    assert (array.bits, array.zero, array.activation.mode) == ((8 if ".attn." in path else 4), None, "token")
    assert array.packed.shape == _leaf(rtn, path).packed.shape
  assert all(b.status == "lkd" and b.mse_lkd < b.mse_rtn for b in result.blocks)


@pytest.mark.parametrize("name", ["lutgemm-bcq3-offset-g128-lkd", "rtn-w3-g128-lkd-g48"])
def test_a_gptq_start_is_gptq_on_each_linears_inputs_and_beats_the_fit(tiny, name):
  """start="gptq": each student linear starts as gptq_core on the Hessian of its inputs (latent = GPTQ's updated
  rows), the started block's output error is below the format's own fit's, and distillation goes on from it."""
  recipe, tokens = _recipe(name, start="gptq"), _tokens()
  x, _ = blockwise.model_inputs(tiny, tokens, None, 4)
  block = tiny.layers[0]
  _, recorded = blockwise.apply_recording(block, x, (), 4, *students.record_hessians(block))
  hessians = students.hessians(recorded)
  normed = block.mlp_norm(x + block.attn(block.attn_norm(x)))
  hidden = jax.nn.silu(block.mlp.gate_proj(normed)) * block.mlp.up_proj(normed)  # down_proj's input
  flat = np.asarray(hidden, np.float64).reshape(-1, CONFIG.ffn_dim)
  np.testing.assert_allclose(hessians["mlp.down_proj"], flat.T @ flat / len(flat), rtol=2e-4, atol=1e-6)
  student = students.make_student(block, "layers.0.", recipe.rules, "ste",
                                  students.row_weights_of(hessians, recipe.procedure.options.damp), hessians)
  config, kernel = recipe.rules[0].weight, block.mlp.down_proj.kernel.get_value()
  linear = student.mlp.down_proj
  if isinstance(config, BCQQuant):
    signs, alpha, offset, updated = gptq_core.bcq(kernel, hessians["mlp.down_proj"], students.GPTQ_DAMP, q=3,
                                                  k_group=config.k_group(CONFIG.ffn_dim), use_offset=True,
                                                  scale_dtype="float16")
    stored = linear.stored()
    assert np.array_equal(stored.planes, formats.pack_planes(signs)) and np.array_equal(stored.alpha, alpha)
  else:
    values, scale, zero, updated = gptq_core.uniform(kernel, hessians["mlp.down_proj"], students.GPTQ_DAMP, bits=3,
                                                     symmetric=False, k_group=48)
    assert np.array_equal(linear.stored().packed, formats.pack(values.T, 3))
  np.testing.assert_array_equal(linear.latent.get_value(), updated)
  y = blockwise.apply_block(block, x, (), 4)
  fit = _fit(tiny, _recipe(name), 0, tokens)
  start = students.to_block(student, block)
  assert blockwise.block_mse(start, x, y, (), 4) < 0.9 * blockwise.block_mse(fit, x, y, (), 4)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # a block whose training does not beat GPTQ keeps GPTQ's start
    result = _run(tiny, recipe)
  assert result.blocks[0].mse_rtn == pytest.approx(blockwise.block_mse(start, x, y, (), 4), rel=1e-4)
  assert blockwise.block_mse(result.model.layers[0], x, y, (), 4) <= result.blocks[0].mse_rtn * (1 + 1e-5)
  with pytest.raises(lkd.LKDError, match="start must be one of"):
    lkd_formats.with_options(recipes.get_recipe(name.removesuffix("-g48")), start="hqq")


def _leaf(state, path):
  return dict(((rules.path_str(p), leaf) for p, leaf in jax.tree_util.tree_leaves_with_path(
      state, is_leaf=formats.is_qarray)))[path]
