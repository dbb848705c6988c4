"""LUT-GEMM's BCQ quantizer (jaxquant.methods.bcq_core / bcq): refinement, degenerate groups, storage, recipes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant import data, formats, pipeline, recipes, rules
from jaxquant.formats import BCQArray, QArray
from jaxquant.methods import bcq_core
from jaxquant.methods.bcq import BCQQuant, UniformAsBCQ, bits_per_weight, input_mean_squares
from jaxquant.models import surgery
from jaxquant.models.layers import Linear
from jaxquant.quantizers import WeightQuant, quantize_weight


def _weight(k, n, seed=0):
  rng = np.random.default_rng(seed)
  # heavy-ish tails and a per-column scale, like real kernels
  return jnp.asarray(rng.standard_t(5, size=(k, n)) * rng.uniform(0.02, 0.1, size=(1, n)), jnp.float32)


def _sq_error(w, approx):
  return float(jnp.sum((jnp.asarray(w, jnp.float32) - approx) ** 2))


@pytest.mark.parametrize("q,offset,init", [(2, False, "greedy"), (3, True, "both"), (4, False, "uniform"),
                                           (3, False, "greedy")])
def test_error_never_increases_over_rounds(q, offset, init, strict_numerics):
  w = _weight(200, 24)  # groups of 64: the last group has 8 rows
  signs, alpha, off, errors = bcq_core.fit(w, q=q, k_group=64, rounds=12, use_offset=offset, init=init)
  errors = np.asarray(errors)
  assert errors.shape == (13,)
  assert np.all(np.diff(errors) <= 0), errors
  assert errors[-1] < errors[0]  # the refinement does something
  # the history is the error of what is returned (float32 alphas: no rounding at the end)
  bcq = BCQArray(planes=formats.pack_planes(signs), alpha=alpha, offset=off,
                 shape=w.shape, k_group=64)
  np.testing.assert_allclose(_sq_error(w, bcq.dequantize()), errors[-1], rtol=1e-4)


def test_least_squares_and_nearest_code_steps_are_optimal():
  """Each half-step is exact: LS alphas match numpy lstsq; nearest codes match a brute-force argmin."""
  w = _weight(64, 6, seed=2)
  wg, mask, rows = bcq_core.grouped(w, 64)
  signs, _, _ = bcq_core.greedy_init(wg, mask, rows, 3, True)
  alpha, offset = bcq_core.least_squares(wg, mask, rows, signs, True)
  for n in range(6):
    x = np.concatenate([np.asarray(signs[:, n, 0]).T, np.ones((64, 1))], axis=1)
    ref = np.linalg.lstsq(x, np.asarray(wg[n, 0], np.float64), rcond=None)[0]
    np.testing.assert_allclose(np.r_[np.asarray(alpha[:, n, 0]), float(offset[n, 0])], ref, rtol=1e-3, atol=1e-5)
  best = bcq_core.best_signs(wg, alpha, offset)
  values = np.einsum("cq,qn->nc", np.asarray(bcq_core.code_signs(3)), np.asarray(alpha[:, :, 0])) + \
      np.asarray(offset[:, :1])
  brute = np.min(np.abs(np.asarray(wg[:, 0])[:, :, None] - values[:, None, :]), axis=-1)
  chosen = np.abs(np.asarray(wg - bcq_core.reconstruct(best, alpha, offset))[:, 0])
  np.testing.assert_allclose(chosen, brute, atol=1e-6)


def test_row_weighted_least_squares_matches_numpy():
  w = _weight(48, 4, seed=7)
  h = jnp.asarray(np.random.default_rng(7).uniform(0.01, 10.0, size=48), jnp.float32)
  wg, mask, rows = bcq_core.grouped(w, 48, h)
  signs, _, _ = bcq_core.greedy_init(wg, mask, rows, 2, True)
  alpha, offset = bcq_core.least_squares(wg, mask, rows, signs, True)
  root = np.sqrt(np.asarray(h, np.float64))[:, None]
  for n in range(4):
    x = np.concatenate([np.asarray(signs[:, n, 0]).T, np.ones((48, 1))], axis=1)
    ref = np.linalg.lstsq(x * root, np.asarray(wg[n, 0], np.float64) * root[:, 0], rcond=None)[0]
    np.testing.assert_allclose(np.r_[np.asarray(alpha[:, n, 0]), float(offset[n, 0])], ref, rtol=1e-3, atol=1e-5)
  errors = np.asarray(bcq_core.fit(w, h, q=2, k_group=16, rounds=8, use_offset=True)[3])
  assert np.all(np.diff(errors) <= 0) and errors[-1] < errors[0]


@pytest.fixture(scope="module")
def smollm2_block():
  return pipeline.load("smollm2-135m", n_layers=1)


def _kernels(model):
  return {name: m.kernel.get_value() for name, m in surgery.modules(model).items()
          if name.startswith("layers.")}  # not the (tied) output head: it stays float


def test_plain_bcq_beats_rtn_on_real_smollm2_weights(smollm2_block):
  """Every block linear of a real SmolLM2 block, q=3 g=128, data-free fit: lower weight MSE and lower matmul
  error on random (isotropic) activations than RTN 3-bit (asymmetric, group 128)."""
  model = smollm2_block.model
  bcq = _kernels(pipeline.quantize_model(model, recipes.get_recipe("lutgemm-bcq3-mse-g128"), progress=False))
  rtn = _kernels(pipeline.quantize_model(model, recipes.get_recipe("rtn-w3-g128"), progress=False))
  fp = _kernels(model)
  assert len(fp) == 7 and all(isinstance(v, BCQArray) for v in bcq.values())
  assert all(isinstance(v, QArray) for v in rtn.values())
  rng = np.random.default_rng(0)
  for name, w in fp.items():
    x = jnp.asarray(rng.standard_normal((32, w.shape[0])), jnp.float32)
    w_bcq, w_rtn = bcq[name].dequantize(), rtn[name].dequantize()
    mse_bcq, mse_rtn = _sq_error(w, w_bcq), _sq_error(w, w_rtn)
    mm_bcq, mm_rtn = _sq_error(x @ w, x @ w_bcq), _sq_error(x @ w, x @ w_rtn)
    assert mse_bcq < 0.9 * mse_rtn, (name, mse_bcq, mse_rtn)
    assert mm_bcq < 0.9 * mm_rtn, (name, mm_bcq, mm_rtn)


def test_activation_aware_bcq_beats_rtn_and_plain_bcq_on_real_activations(smollm2_block):
  """The default recipe (rows weighted by calibration activations, lcet10) against RTN and the data-free fit:
  the error of the real block's output on other text (alice29) is the smallest."""
  loaded = smollm2_block
  model = loaded.model
  calib = [data.calibration_samples(data.tokenize(loaded.tokenizer, data.load_text("lcet10")[0]), 4, 128)]
  recipe = recipes.get_recipe("lutgemm-bcq3-g128")
  assert recipe.uses_calibration
  with pytest.raises(ValueError, match="calibration"):
    pipeline.quantize_model(model, recipe, None, progress=False)
  aware = pipeline.quantize_model(model, recipe, calib, progress=False)
  plain = pipeline.quantize_model(model, recipes.get_recipe("lutgemm-bcq3-mse-g128"), progress=False)
  rtn = pipeline.quantize_model(model, recipes.get_recipe("rtn-w3-g128"), progress=False)
  assert all(isinstance(v, BCQArray) for v in _kernels(aware).values())
  assert not isinstance(aware.embed.embedding.get_value(), BCQArray)  # embeddings stay float
  assert not isinstance(aware.lm_head.kernel.get_value(), BCQArray)
  tokens = jnp.asarray(data.tokenize(loaded.tokenizer, data.load_text("alice29")[0])[None, :256])
  h = model.embed_tokens(tokens)
  ref = model.layers[0](h)
  errors = {name: float(jnp.mean((m.layers[0](h) - ref) ** 2)) for name, m in
            (("aware", aware), ("plain", plain), ("rtn", rtn))}
  assert errors["aware"] < 0.8 * errors["rtn"] and errors["aware"] < errors["plain"], errors


def test_input_mean_squares_are_those_of_the_linear_inputs(smollm2_block):
  model = smollm2_block.model
  tokens = np.arange(2 * 24, dtype=np.int32).reshape(2, 24) * 7
  stats = input_mean_squares(model, [tokens], ["layers.0.attn.q_proj.kernel", "layers.0.mlp.down_proj.kernel"],
                             progress=False)
  x = model.layers[0].attn_norm(model.embed_tokens(jnp.asarray(tokens)))
  np.testing.assert_allclose(stats["layers.0.attn.q_proj.kernel"], np.mean(np.asarray(x) ** 2, axis=(0, 1)),
                             rtol=1e-4, atol=1e-7)
  assert stats["layers.0.mlp.down_proj.kernel"].shape == (1536,)
  assert isinstance(model.layers[0].attn.q_proj, Linear) and type(model.layers[0].attn.q_proj) is Linear


def test_row_weight_must_be_positive_per_row():
  w = _weight(64, 8)
  with pytest.raises(ValueError, match="row_weight"):
    BCQQuant().quantize(w, path="p", row_weight=np.ones(63))
  with pytest.raises(ValueError, match="row_weight"):
    BCQQuant().quantize(w, path="p", row_weight=np.zeros(64))


def test_uniform_as_bcq_is_exact():
  w = _weight(576, 40, seed=3)
  for bits in (3, 4):
    bcq = UniformAsBCQ(bits=bits, group_size=128).quantize(w, path="w")
    ref = quantize_weight(w, WeightQuant(bits=bits, symmetric=False, granularity="group", group_size=128))
    assert isinstance(bcq, BCQArray) and bcq.bits == bits and bcq.alpha.shape == (bits, 5, 40)
    np.testing.assert_allclose(np.asarray(bcq.dequantize()), np.asarray(ref.dequantize()), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("offset,bit_choices", [(False, (1, 3)), (True, (2, 4))])
def test_all_zero_and_constant_groups_stay_finite(offset, bit_choices):
  w = np.asarray(_weight(96, 5, seed=4)).copy()
  w[:32, 0] = 0.0       # an all-zero group
  w[32:64, 1] = 0.37    # a constant group
  w[64:, 2] = -1.5      # a constant (short) last group
  w[:, 3] = 0.0         # an all-zero column
  w = jnp.asarray(w)
  for q in bit_choices:
    bcq = BCQQuant(bits=q, group_size=32, offset=offset, scale_dtype="float32").quantize(w)
    deq = np.asarray(bcq.dequantize())
    assert np.all(np.isfinite(np.asarray(bcq.alpha))) and np.all(np.isfinite(deq))
    np.testing.assert_allclose(deq[:32, 0], 0.0, atol=1e-6)
    np.testing.assert_allclose(deq[:, 3], 0.0, atol=1e-6)
    np.testing.assert_allclose(deq[32:64, 1], 0.37, rtol=1e-5)
    np.testing.assert_allclose(deq[64:, 2], -1.5, rtol=1e-5)


def test_nan_weight_names_the_parameter():
  w = np.asarray(_weight(64, 8)).copy()
  w[5, 3] = np.nan
  with pytest.raises(ValueError, match=r"layers\.0\.mlp\.up_proj\.kernel.*NaN"):
    BCQQuant().quantize(jnp.asarray(w), path="layers.0.mlp.up_proj.kernel")
  with pytest.raises(ValueError, match=r"layers\.1\.attn\.q_proj\.kernel"):
    UniformAsBCQ().quantize(jnp.asarray(w), path="layers.1.attn.q_proj.kernel")


@pytest.mark.parametrize("bits", [0, 5, 8, True])
def test_unsupported_bits_name_the_choice(bits):
  with pytest.raises(ValueError, match=f"bits={bits!r}"):
    BCQQuant(bits=bits)


@pytest.mark.parametrize("group_size", [0, -128, 1.5, None])
def test_group_size_must_be_positive(group_size):
  with pytest.raises(ValueError, match="group_size"):
    BCQQuant(bits=3, group_size=group_size)
  with pytest.raises(ValueError, match="group_size"):
    UniformAsBCQ(bits=3, group_size=group_size)


def test_other_bad_configs_and_activation_refused():
  with pytest.raises(ValueError, match="bits=8"):
    UniformAsBCQ(bits=8)
  with pytest.raises(ValueError, match="rounds"):
    BCQQuant(rounds=-1)
  with pytest.raises(ValueError, match="init"):
    BCQQuant(init="random")
  with pytest.raises(ValueError, match="scale_dtype"):
    BCQQuant(scale_dtype="int8")
  with pytest.raises(ValueError, match=r"p\.kernel.*weight-only"):
    BCQQuant().quantize(_weight(64, 8), path="p.kernel", activation=formats.ActQuant(bits=8, mode="token"))
  with pytest.raises(ValueError, match="2-D"):
    BCQQuant().quantize(jnp.ones((4, 4, 4)), path="p")


def test_stored_bits_q3_g128_at_most_3_5_and_float16_alphas_cost_nothing():
  w = _weight(576, 1536, seed=5)
  bcq = BCQQuant(bits=3, group_size=128).quantize(w)
  assert bcq.planes.shape == (3, 1536, 72) and bcq.planes.dtype == jnp.uint8
  assert bcq.alpha.shape == (3, 5, 1536) and bcq.alpha.dtype == jnp.float16 and bcq.offset is None
  bits = bcq.nbytes * 8 / (576 * 1536)
  assert bits == bits_per_weight(bcq) and bits <= 3.5, bits
  exact = BCQQuant(bits=3, group_size=128, scale_dtype="float32").quantize(w)
  assert exact.alpha.dtype == jnp.float32 and bits_per_weight(exact) > bits
  err16, err32 = _sq_error(w, bcq.dequantize()), _sq_error(w, exact.dequantize())
  assert err16 <= 1.001 * err32, (err16, err32)


def test_group_shapes_short_last_group_whole_rows_and_odd_k(strict_numerics):
  w = _weight(100, 12, seed=6)  # K not a multiple of 8 or of the group
  errors = {}
  for group_size, groups in ((32, 4), (1000, 1)):  # short last group of 4 rows; whole rows
    bcq = BCQQuant(bits=2, group_size=group_size, offset=True).quantize(w)
    assert bcq.k_group == min(group_size, 100)
    assert bcq.planes.shape == (2, 12, 13) and bcq.alpha.shape == (2, groups, 12) and bcq.offset.shape == (groups, 12)
    assert bcq.dequantize().shape == (100, 12)
    errors[group_size] = _sq_error(w, bcq.dequantize())
  assert errors[32] < errors[1000]


def test_recipes_registered_with_descriptions():
  names = ([f"lutgemm-bcq{q}{kind}-g{g}" for q in (2, 3, 4) for g in (64, 128) for kind in ("", "-offset", "-mse")]
           + [f"lutgemm-uniform{q}-g{g}" for q in (3, 4) for g in (64, 128)]
           + [f"rtn-w{q}-g{g}" for q in (2, 3, 4) for g in (64, 128)])
  for name in names:
    recipe = recipes.get_recipe(name)
    assert recipe.description and len(recipe.rules) == 1 and recipe.rules[0].activation is None
    assert recipe.rules[0].pattern == rules.BLOCK_LINEARS
    assert recipe.uses_calibration == (name.startswith("lutgemm-bcq") and "-mse-" not in name)
  assert "binary planes" in recipes.get_recipe("lutgemm-bcq3-g128").description
  regrouped = rules.with_group_size(recipes.get_recipe("lutgemm-bcq3-g128"), 64)
  assert regrouped.rules[0].weight == dataclasses.replace(BCQQuant(bits=3), group_size=64)
  assert regrouped.procedure is not None
  assert "lutgemm-bcq3-g128" in recipes.listing()


@pytest.mark.parametrize("offset", [False, True])
def test_bcq_weights_run_through_the_weight_only_kernel(offset, caplog):
  """The quantizer's BCQArray (float16 alphas, a short last group, K not a multiple of 8) through ops.qdot's kernel
  path in interpret mode matches a float64 matmul with the weight decoded by numpy from the stored sign planes,
  alphas and offset, to bf16 rounding (the kernel multiplies in bf16)."""
  import numpy_ref
  from jaxquant import ops
  k = 300
  w = _weight(k, 24, seed=8)
  bcq = BCQQuant(bits=3, group_size=128, offset=offset).quantize(w)
  signs = numpy_ref.unpack(np.asarray(bcq.planes), 1, k, signed=False).transpose(0, 2, 1) * 2.0 - 1  # (q, K, N)
  alpha = np.stack([numpy_ref.expand(a, (k, 24), 128, 1) for a in np.asarray(bcq.alpha, np.float64)])
  decoded = np.sum(alpha * signs, axis=0)
  if offset:
    decoded += numpy_ref.expand(np.asarray(bcq.offset, np.float64), (k, 24), 128, 1)
  x = np.random.default_rng(9).standard_normal((3, k)).astype(np.float32)
  with caplog.at_level("WARNING", logger="jaxquant.ops"):
    y = np.asarray(ops.qdot(jnp.asarray(x), bcq, backend="interpret"))
  assert "XLA" not in caplog.text  # the kernel ran, no fallback
  want = x @ decoded
  np.testing.assert_allclose(y, want, rtol=0, atol=1e-2 * np.abs(want).max())
