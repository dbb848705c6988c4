"""Sharded quantized arrays on 8 simulated CPU devices (tests/conftest.py): layouts, clear errors, sharded
quantization == unsharded, the Pallas kernels per shard, SmolLM2 logits, and checkpoints 8 -> 2 -> 1 devices.

Everything here asks for the CPU devices explicitly (jax.devices("cpu")), so a machine with one GPU runs these
tests too: meshes are built over them, arrays default to them, and backend "auto" takes the XLA path (ops picks
the Pallas kernels only on a Hopper GPU, which these arrays are not on)."""

import dataclasses
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxquant import checkpoint, ops, pipeline, recipes, rules, sharding
from jaxquant.checkpoint import CheckpointError
from jaxquant.formats import ActQuant, QArray
from jaxquant.methods import bcq
from jaxquant.quantizers import WeightQuant
from jaxquant.models.llama import LlamaConfig, random_llama, random_weights
from jaxquant.sharding import COLUMN_PARALLEL, TENSOR_PARALLEL, ShardingError

REPO = pathlib.Path(__file__).resolve().parents[1]
CPUS = jax.devices("cpu")
pytestmark = pytest.mark.skipif(len(CPUS) < 8, reason="needs 8 (simulated) CPU devices: see tests/conftest.py")


@pytest.fixture(scope="module", autouse=True)
def _on_cpu():
  with pytest.MonkeyPatch.context() as patch, jax.default_device(CPUS[0]):
    patch.setattr(ops, "_is_hopper", lambda: False)
    yield


def _mesh(model: int = 1, data: int = 1):
  return sharding.make_mesh(model=model, data=data, devices=CPUS)

# W8A8 with one scale per output column: K can be split anywhere a packed byte boundary falls (576/8 = 72 rows).
W8A8_CHANNEL = (rules.Rule(rules.BLOCK_LINEARS, WeightQuant(8, True, "channel"), activation="token"),)
W8_CHANNEL = (rules.Rule(rules.BLOCK_LINEARS, WeightQuant(8, True, "channel")),)


def _leaves_equal(a, b) -> bool:
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def _random(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


@pytest.fixture
def interpreter_on_many_devices(monkeypatch):
  """JAX 0.11.2's Mosaic GPU interpreter checks at the end of each device's kernel that no device still holds a
  barrier: a global check that races with the other devices' kernels running concurrently in shard_map. It is the
  interpreter's own bookkeeping (our kernels' barrier use is checked by the one-device interpret tests, where it
  runs), so it is turned off for the tests that interpret kernels on several devices at once."""
  from jax._src.pallas.mosaic_gpu.interpret import shared_memory
  monkeypatch.setattr(shared_memory.GPUSharedMemory, "assert_no_barriers_allocated", lambda self: None)


# ----------------------------------------------------------------------------------------------------------------
# layouts and errors


def test_qarray_fields_follow_the_float_spec():
  mesh = _mesh(model=4, data=2)
  w = _random((256, 128))
  grouped = WeightQuant(4, False, "group", 32).quantize(w)  # packed (128, 128) = (N, K/2), scale/zero (8, 128)
  channel = WeightQuant(8, True, "channel").quantize(w, activation=ActQuant(8, "token"))  # scale (1, 128)
  specs = lambda q, spec: jax.tree_util.tree_map(lambda s: s.spec, sharding.format_shardings(q, spec, mesh, "w"))
  assert specs(grouped, ("model", None)) == QArray(P(None, "model"), P("model", None), P("model", None), None,
                                                    grouped.shape, 4, 32, 1)
  n_split = specs(grouped, (None, "model"))
  assert (n_split.packed, n_split.scale, n_split.zero) == (P("model", None),) + (P(None, "model"),) * 2
  k_split = specs(channel, ("model", None))
  assert (k_split.packed, k_split.scale) == (P(None, "model"), P(None, None))  # one K group: replicated on K
  planes = bcq.UniformAsBCQ(4, 64).quantize(w)
  b = specs(planes, ("model", None))
  assert (b.planes, b.alpha, b.offset) == (P(None, None, "model"), P(None, "model", None), P("model", None))


def test_bad_layouts_name_parameter_axis_sizes_and_fix():
  mesh = _mesh(model=8)
  grouped = WeightQuant(8, True, "group", 128).quantize(_random((576, 64)))
  with pytest.raises(ShardingError, match=r"layers\.0\.attn\.o_proj\.kernel: mesh axis 'model' of size 8 splits "
                                          r"K \(input features\)=576 into shards of 72, not a multiple of 128 "
                                          r"\(k_group=128 rows share a scale\).*COLUMN_PARALLEL"):
    sharding.format_shardings(grouped, ("model", None), mesh, "layers.0.attn.o_proj.kernel")
  four_bit = WeightQuant(4, True, "channel").quantize(_random((96, 64)))  # 96 / 8 = 12 rows: not whole bytes
  with pytest.raises(ShardingError, match=r"shards of 12, not a multiple of 8 \(4-bit codes are packed"):
    sharding.format_shardings(four_bit, ("model", None), mesh, "w4")
  with pytest.raises(ShardingError, match=r"p: mesh axis 'model' of size 8 does not divide dimension 1=60"):
    sharding.format_shardings(_random((64, 60)), (None, "model"), mesh, "p")
  with pytest.raises(ShardingError, match=r"batch of 5 sequences cannot be split over mesh axis 'data' of size 2"):
    sharding.shard_batch(np.zeros((5, 4), np.int32), _mesh(data=2))
  with pytest.raises(ShardingError, match=r"needs 16 devices; 8 are available"):
    _mesh(model=16)
  with pytest.raises(ShardingError, match=r"mesh axis 'tp' is not in the mesh"):
    sharding.format_shardings(_random((64, 64)), (None, "tp"), mesh, "p")


# ----------------------------------------------------------------------------------------------------------------
# sharded quantization and kernels


@pytest.mark.parametrize("config, activation, spec", [
    (WeightQuant(4, False, "group", 32), None, (None, "model")),
    (WeightQuant(4, False, "group", 32), None, ("model", None)),
    (WeightQuant(8, True, "group", 32), "token", ("model", None)),
    (bcq.BCQQuant(3, 32, rounds=2), None, ("model", None)),
], ids=["rtn-w4-asym-g32-N", "rtn-w4-asym-g32-K", "w8a8-g32-K", "bcq-q3-g32-K"])
def test_sharded_quantization_equals_unsharded(config, activation, spec):
  mesh = _mesh(model=4, data=2)
  w = _random((256, 64), seed=1)
  rule = rules.Rule("w", config, activation=activation)
  act = ActQuant(8, activation) if activation else None
  reference = config.quantize(w, path="w", activation=act)
  result = sharding.quantize_leaf(w, rule, "w", mesh, spec, act)
  assert _leaves_equal(result, reference)
  wanted = sharding.format_shardings(reference, spec, mesh, "w")
  for array, sharding_ in zip(jax.tree_util.tree_leaves(result), jax.tree_util.tree_leaves(wanted)):
    assert array.sharding.is_equivalent_to(sharding_, array.ndim)


@pytest.mark.parametrize("config, activation, spec, k", [
    (WeightQuant(8, True, "group", 64), "token", (None, "model"), 256),   # int8_matmul per column shard
    (WeightQuant(8, True, "channel"), "token", ("model", None), 256),     # act_quant per row shard, int8 K split + psum
    (bcq.UniformAsBCQ(3, 128), None, ("model", None), 512),              # weight-only kernel K split + psum
], ids=["int8-N", "int8-K", "weight-only-K"])
def test_pallas_kernels_per_shard_match_unsharded(config, activation, spec, k, interpreter_on_many_devices):
  mesh = _mesh(model=4, data=2)
  w = config.quantize(_random((k, 128), seed=2), activation=ActQuant(8, activation) if activation else None)
  x = _random((2, 4, k), seed=3)
  reference = ops.qdot(x, w, backend="interpret")
  y = jax.jit(lambda x, w: ops.sharded_qdot(x, w, sharding.format_shardings(w, spec, mesh, "w"), spec,
                                            batch_axis="data", backend="interpret"))(x, w)
  assert y.shape == reference.shape
  np.testing.assert_allclose(np.asarray(y), np.asarray(reference), rtol=1e-5, atol=1e-5)


def test_per_token_activations_refuse_a_k_split_without_the_int8_kernel():
  mesh = _mesh(model=4)
  w = WeightQuant(4, True, "channel").quantize(_random((256, 64)), activation=ActQuant(8, "token"))
  with pytest.raises(ShardingError, match=r"w4a8 quantizes activations per token over all of K"):
    ops.sharded_qdot(_random((4, 256)), w, sharding.format_shardings(w, ("model", None), mesh, "w4a8"),
                     ("model", None), backend="interpret", path="w4a8")


# ----------------------------------------------------------------------------------------------------------------
# SmolLM2 (2 blocks): sharded quantization and forward == unsharded; checkpoints across mesh sizes


@pytest.fixture(scope="module")
def smol():
  return pipeline.load("smollm2-135m", n_layers=2)


@pytest.fixture(scope="module")
def tokens(smol):
  from jaxquant import data
  text, _ = data.load_text("alice29")
  return np.asarray(data.tokenize(smol.tokenizer, text)[:128], np.int32).reshape(4, 32)


def _logits(model, tokens):
  return np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens))


def _sharded_and_reference(smol, recipe_rules, layout, mesh):
  model = getattr(smol, "model", smol)
  graphdef, state = nnx.split(model)
  reference = nnx.merge(graphdef, rules.quantize_tree(state, recipe_rules, progress=False))
  sharded = sharding.quantize_model_sharded(model, recipe_rules, mesh, layout, progress=False)
  assert _leaves_equal(nnx.state(sharded), nnx.state(reference))  # the stored bytes do not depend on the layout
  down = nnx.state(sharded)["layers"][0]["mlp"]["down_proj"]["kernel"].get_value()
  assert len(down.packed.sharding.device_set) == len(mesh.devices.flat)
  return sharded, reference


def test_smollm2_sharded_logits_match_unsharded(smol, tokens):
  """Weight-only W4/8 (groups of 128), column-parallel on model=4 x data=2: only float summation order differs."""
  mesh = _mesh(model=4, data=2)
  sharded, reference = _sharded_and_reference(smol, recipes.get_recipe("zeroquant-w48a16").rules, COLUMN_PARALLEL,
                                              mesh)
  expected = _logits(reference, tokens)
  got = _logits(sharded, sharding.shard_batch(tokens, mesh))
  print(f"max |sharded - unsharded| logit difference {np.abs(got - expected).max():.3g} "
        f"(logits up to {np.abs(expected).max():.1f})")
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3)


def test_a_model_runs_the_pallas_kernels_per_shard(interpreter_on_many_devices):
  """W4/8 weight-only, column-parallel on model=4 x data=2: the 4-bit MLP runs the weight-only kernel (interpret mode) on each
  device's shard inside shard_map; logits match the unsharded kernel path. A random llama with SmolLM2's head count
  and group size at a quarter of its width (interpret mode costs seconds a kernel call: SmolLM2 took 42 s here)."""
  config = LlamaConfig(vocab_size=128, dim=192, n_layers=1, n_heads=3, n_kv_heads=1, head_dim=64, ffn_dim=512)
  quantized = pipeline.quantize_model(random_llama(config, seed=5), recipes.get_recipe("zeroquant-w48a16"),
                                      progress=False)
  mesh = _mesh(model=4, data=2)
  per_shard = sharding.use_sharded_kernels(quantized, mesh, COLUMN_PARALLEL, backend="interpret", batch_axis="data")
  assert isinstance(per_shard.layers[0].mlp.down_proj, sharding.ShardedKernelLinear)
  assert _leaves_equal(nnx.state(per_shard), nnx.state(quantized))
  batch = np.random.default_rng(6).integers(0, config.vocab_size, (2, 16)).astype(np.int32)
  expected = _logits(pipeline.set_backend(quantized, "interpret"), batch)
  # The weight-only kernel picks its split-K and tiles from the shard's N, so float32 sums run in another order on
  # a shard than on the whole weight: logits agree to float32 rounding of the sums' order; a wrong shard, scale or
  # psum is off by a large fraction of the logits' size.
  got = _logits(per_shard, sharding.shard_batch(batch, mesh))
  print(f"max |per shard - whole| {np.abs(got - expected).max():.3g} (logits up to {np.abs(expected).max():.3g})")
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3 * np.abs(expected).max())
  assert np.mean(np.argmax(got, -1) == np.argmax(expected, -1)) >= 0.99


@pytest.mark.slow
def test_smollm2_w8a8_tensor_parallel_logits_differ_by_rounding_only(smol, tokens):
  """W8A8 tensor-parallel on 8 devices. Dynamic int8 activations turn float rounding differences (sharded dots
  sum in another order) into occasional one-step code flips: the sharded model must differ from the unsharded one
  no more than the unsharded one differs from itself after a one-ulp change of its embedding table."""
  sharded, reference = _sharded_and_reference(smol, W8A8_CHANNEL, TENSOR_PARALLEL, _mesh(model=8))
  expected = _logits(reference, tokens)
  difference = np.abs(_logits(sharded, tokens) - expected)
  graphdef, state = nnx.split(reference)
  embedding = state["embed"]["embedding"]
  embedding.set_value(jnp.nextafter(embedding.get_value(), jnp.float32(np.inf)))
  one_ulp = np.abs(_logits(nnx.merge(graphdef, state), tokens) - expected)
  print(f"W8A8 sharded - unsharded: max {difference.max():.3g}, mean {difference.mean():.3g}; one-ulp embedding "
        f"change: max {one_ulp.max():.3g}, mean {one_ulp.mean():.3g}")
  assert difference.mean() <= 2 * one_ulp.mean()


# Tiny random llama, every dimension split whole over 8 devices: the slow SmolLM2 properties, run by default.
TINY = LlamaConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128)
TINY_HF = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
           "num_hidden_layers": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True}
TINY_TOKENS = np.random.default_rng(5).integers(0, 64, (2, 12)).astype(np.int32)


def test_w8a8_tensor_parallel_follows_the_numpy_w8a8_forward():
  """W8A8 (int8 per-channel weights, int8 per-token activations) tensor-parallel on 8 devices: the sharded and the
  unsharded model both follow numpy_ref's W8A8 forward (from the float weights) to float rounding, far closer than
  the float model is to it."""
  import numpy_ref
  model = random_llama(TINY, seed=3)
  sharded, reference = _sharded_and_reference(model, W8A8_CHANNEL, TENSOR_PARALLEL, _mesh(model=8))
  hf = numpy_ref.hf_from_weights(random_weights(TINY, seed=3), 2, tie=True)
  w8a8 = lambda name, x, w: numpy_ref.quantize_rows(x) @ numpy_ref.fake_quant(w.T, 8, True, "channel", 0)
  expected = np.stack([numpy_ref.llama_forward(hf, TINY_HF, row, w8a8) for row in TINY_TOKENS])
  effect = np.abs(expected - np.stack([numpy_ref.llama_forward(hf, TINY_HF, row) for row in TINY_TOKENS])).max()
  for name, got in (("sharded", _logits(sharded, TINY_TOKENS)), ("unsharded", _logits(reference, TINY_TOKENS))):
    error = np.abs(got - expected).max()
    print(f"{name}: max |jaxquant - numpy W8A8| {error:.3g}; W8A8 - float {effect:.3g}")
    assert error < 0.02 * effect, (name, error, effect)


TINY_RESTORE = """
import sys, jax, numpy as np
from flax import nnx
from jaxquant import checkpoint
from jaxquant.models.llama import LlamaConfig, random_llama
assert len(jax.devices()) == 1, jax.devices()
model = checkpoint.restore(sys.argv[1], random_llama(LlamaConfig(**eval(sys.argv[4]))))
np.save(sys.argv[2], np.asarray(nnx.jit(lambda m, t: m(t))(model, np.load(sys.argv[3]))))
"""


def test_tiny_checkpoint_from_8_devices_restores_in_a_fresh_one_device_process(tmp_path):
  """Quantized tensor-parallel and saved from 8 devices; restored in a new process that has one CPU device:
  the same logits, bit for bit, as the model quantized on one device here."""
  import dataclasses as dc
  model = random_llama(TINY, seed=4)
  sharded = sharding.quantize_model_sharded(model, W8_CHANNEL, _mesh(model=8), TENSOR_PARALLEL, progress=False)
  assert len(nnx.state(sharded)["layers"][0]["mlp"]["down_proj"]["kernel"].get_value().packed.sharding.device_set) == 8
  directory = checkpoint.save(tmp_path / "ckpt", sharded, recipe_name="w8-channel", source={"name": "tiny"})
  reference = pipeline.quantize_model(model, rules.Recipe("w8-channel", "test", W8_CHANNEL), progress=False)
  np.save(tmp_path / "tokens.npy", TINY_TOKENS)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1"}
  subprocess.run([sys.executable, "-c", TINY_RESTORE, str(directory), str(tmp_path / "logits.npy"),
                  str(tmp_path / "tokens.npy"), repr(dc.asdict(TINY))], check=True, cwd=REPO, env=env)
  np.testing.assert_array_equal(np.load(tmp_path / "logits.npy"), _logits(reference, TINY_TOKENS))


def test_quantize_tree_sharded_places_every_leaf_and_quantizes_like_quantize_tree():
  """Float kernels quantized shard by shard equal rules.quantize_tree's; a leaf already quantized is placed on the
  mesh as it is (not quantized again); other leaves are split by their partition rule or replicated; static
  activation scales come from act_absmax."""
  rng = np.random.default_rng(6)
  done = WeightQuant(4, True, "group", 16).quantize(jnp.asarray(rng.standard_normal((64, 32)), jnp.float32))
  tree = {"layers": {"0": {"attn": {"q_proj": {"kernel": jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)},
                               "o_proj": {"kernel": jnp.asarray(rng.standard_normal((32, 64)), jnp.float32)}},
                      "mlp": {"up_proj": {"kernel": done}}}},
          "embed": {"embedding": jnp.asarray(rng.standard_normal((16, 64)), jnp.float32)},
          "norm": {"weight": jnp.ones(64, jnp.float32)}}
  recipe = (rules.Rule(r"attn\.q_proj", WeightQuant(8, True, "group", 16), activation="tensor"),
            rules.Rule(rules.BLOCK_LINEARS, WeightQuant(4, False, "group", 8)))
  absmax = {"layers.0.attn.q_proj.kernel": 2.54}
  mesh = _mesh(model=4, data=2)
  out = sharding.quantize_tree_sharded(tree, recipe, mesh, TENSOR_PARALLEL, absmax, progress=False)
  assert _leaves_equal(out, rules.quantize_tree(tree, recipe, absmax, progress=False))
  up = out["layers"]["0"]["mlp"]["up_proj"]["kernel"]
  assert _leaves_equal(up, done) and up.packed.sharding.spec == P("model", None)  # (N, K) split on N
  q = out["layers"]["0"]["attn"]["q_proj"]["kernel"]
  assert float(q.activation.scale) == pytest.approx(0.02, rel=1e-6) and q.packed.sharding.spec == P("model", None)
  o = out["layers"]["0"]["attn"]["o_proj"]["kernel"]
  assert (o.bits, o.symmetric, o.packed.sharding.spec, o.scale.sharding.spec) == (4, False, P(None, "model"),
                                                                                 P("model", None))
  assert out["embed"]["embedding"].sharding.spec == P("model", None)
  assert out["norm"]["weight"].sharding.is_fully_replicated and len(out["norm"]["weight"].sharding.device_set) == 8
  with pytest.raises(ValueError, match=r"layers\.0\.attn\.q_proj\.kernel: static activation quantization needs "
                                       r"calibration"):
    sharding.quantize_tree_sharded(tree, recipe, mesh, TENSOR_PARALLEL, progress=False)


@pytest.fixture(scope="module")
def saved_on_8(tmp_path_factory, smol):
  """SmolLM2 (2 blocks), 8-bit per-channel weights, quantized tensor-parallel on 8 devices and saved from them;
  with the same model quantized on one device."""
  sharded = sharding.quantize_model_sharded(smol.model, W8_CHANNEL, _mesh(model=8), TENSOR_PARALLEL,
                                            progress=False)
  directory = checkpoint.save(tmp_path_factory.mktemp("on8") / "ckpt", sharded, recipe_name="w8-channel",
                              source=smol.source)
  reference = pipeline.quantize_model(smol.model, rules.Recipe("w8-channel", "test", W8_CHANNEL), progress=False)
  return directory, reference


def test_checkpoint_saved_on_8_devices_restores_on_2_and_1(saved_on_8, smol, tokens):
  directory, reference = saved_on_8
  on_one = checkpoint.restore(directory, smol.model)
  assert all(len(leaf.sharding.device_set) == 1 for leaf in jax.tree_util.tree_leaves(nnx.state(on_one)))
  assert _leaves_equal(nnx.state(on_one), nnx.state(reference))
  np.testing.assert_array_equal(_logits(on_one, tokens), _logits(reference, tokens))  # identical logits

  on_two = checkpoint.restore(directory, smol.model, shardings=sharding.leaf_shardings(_mesh(model=2)))
  up = nnx.state(on_two)["layers"][1]["mlp"]["up_proj"]["kernel"].get_value()
  assert up.packed.sharding.spec == P("model", None) and len(up.packed.sharding.device_set) == 2  # (N, K): N split
  down = nnx.state(on_two)["layers"][1]["mlp"]["down_proj"]["kernel"].get_value()
  assert down.packed.sharding.spec == P(None, "model")
  assert _leaves_equal(nnx.state(on_two), nnx.state(reference))


def test_restore_onto_an_incompatible_mesh_or_model_is_refused(tmp_path, saved_on_8, smol):
  from jaxquant.models.llama import LlamaConfig, abstract_llama, random_llama

  one_block = abstract_llama(dataclasses.replace(smol.model.config, n_layers=1))
  with pytest.raises(CheckpointError, match=r"the checkpoint has layers\.1\..* which the template model lacks"):
    checkpoint.restore(saved_on_8[0], one_block, shardings=sharding.leaf_shardings(_mesh(model=2)))
  config = LlamaConfig(vocab_size=64, dim=96, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=24, ffn_dim=128)
  toy = random_llama(config)
  recipe = recipes.get_recipe("zeroquant-w8a8-g32")  # K groups of 32
  checkpoint.save(tmp_path / "toy", pipeline.quantize_model(toy, recipe, progress=False), recipe_name=recipe.name,
                  source={"name": "toy"})
  with pytest.raises(ShardingError, match=r"layers\.0\.attn\.o_proj\.kernel: mesh axis 'model' of size 8 splits "
                                          r"K \(input features\)=96 into shards of 12, not a multiple of 32"):
    checkpoint.restore(tmp_path / "toy", toy, shardings=sharding.leaf_shardings(_mesh(model=8)))  # row-parallel
  restored = checkpoint.restore(tmp_path / "toy", toy, shardings=sharding.leaf_shardings(_mesh(model=8),
                                                                                         COLUMN_PARALLEL))
  assert nnx.state(restored)["layers"][0]["attn"]["o_proj"]["kernel"].get_value().packed.sharding.spec == \
      P("model", None)


RESTORE_ON_ONE_DEVICE = """
import sys, jax, numpy as np
from flax import nnx
from jaxquant import checkpoint, pipeline
assert len(jax.devices()) == 1, jax.devices()
loaded = pipeline.load("smollm2-135m", n_layers=2)
model = checkpoint.restore(sys.argv[1], loaded.model)
np.save(sys.argv[2], np.asarray(nnx.jit(lambda m, t: m(t))(model, np.load(sys.argv[3]))))
"""


@pytest.mark.slow
def test_checkpoint_from_8_devices_restores_in_a_one_device_process(tmp_path, saved_on_8, tokens):
  directory, reference = saved_on_8
  np.save(tmp_path / "tokens.npy", tokens)
  subprocess.run([sys.executable, "-c", RESTORE_ON_ONE_DEVICE, str(directory), str(tmp_path / "logits.npy"),
                  str(tmp_path / "tokens.npy")], check=True, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  np.testing.assert_array_equal(np.load(tmp_path / "logits.npy"), _logits(reference, tokens))


def test_lkd_runs_on_a_tensor_parallel_model():
  """LKD (methods/lkd.py, unchanged) on a model whose parameters are split over a mesh: training steps run SPMD,
  the per-block MSEs match the one-device run to rounding and the quantized kernels come back split."""
  from jaxquant.methods import lkd

  model = random_llama(TINY)  # K splits of 64 / 4 = 16 rows: whole groups of 16 and whole packed bytes
  lkd_config = lkd.LKDConfig(steps=3, batch_size=8, seq_len=8, n_samples=16, data="random", learning_rate=1e-4,
                             keep_best=False)
  recipe_rules = recipes.get_recipe("zeroquant-w48a16-g16").rules
  alone = lkd.lkd_quantize(model, recipe_rules, None, lkd_config, progress=False)
  mesh = _mesh(model=4, data=2)
  split = lkd.lkd_quantize(sharding.shard_model(model, mesh, TENSOR_PARALLEL), recipe_rules, None, lkd_config,
                           progress=False)
  for a, b in zip(alone.blocks, split.blocks):
    assert a.status == b.status == "lkd"
    np.testing.assert_allclose([b.mse_rtn, b.mse_lkd], [a.mse_rtn, a.mse_lkd], rtol=1e-3)
  down = nnx.state(split.model)["layers"][0]["mlp"]["down_proj"]["kernel"].get_value()
  assert len(down.packed.sharding.device_set) == 8
  tokens = np.arange(32, dtype=np.int32).reshape(2, 16)
  np.testing.assert_allclose(_logits(split.model, tokens), _logits(alone.model, tokens), rtol=0, atol=1e-4)


def test_lkd_runs_data_parallel_over_a_data_axis():
  """LKD with its samples and training batches split over a data axis (lkd_quantize(data_sharding=...)): the
  same blocks as on one device, to rounding; a batch the axis does not divide is refused."""
  from jaxquant.methods import lkd
  from jaxquant.models.llama import LlamaConfig, random_llama

  config = LlamaConfig(vocab_size=64, dim=64, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=32, ffn_dim=128)
  model = random_llama(config)
  lkd_config = lkd.LKDConfig(steps=3, batch_size=8, seq_len=8, n_samples=16, data="random", learning_rate=1e-4,
                             keep_best=False)
  recipe_rules = recipes.get_recipe("zeroquant-w48a16-g32").rules
  alone = lkd.lkd_quantize(model, recipe_rules, None, lkd_config, progress=False)
  data = jax.sharding.NamedSharding(_mesh(data=8), P("data"))
  split = lkd.lkd_quantize(model, recipe_rules, None, lkd_config, progress=False, data_sharding=data)
  for a, b in zip(alone.blocks, split.blocks):
    np.testing.assert_allclose([b.mse_rtn, b.mse_lkd], [a.mse_rtn, a.mse_lkd], rtol=1e-3)
  with pytest.raises(lkd.LKDError, match="batch_size=4 cannot be split over the 8 devices"):
    lkd.lkd_quantize(model, recipe_rules, None, dataclasses.replace(lkd_config, batch_size=4), progress=False,
                     data_sharding=data)


def test_repquant_runs_on_a_column_parallel_model():
  """RepQuant (methods/repquant.py, unchanged) on a model split over a 4 x 2 mesh: the same clipping bounds,
  block errors and logits as on one device, to rounding."""
  from jaxquant.methods import repquant

  config = LlamaConfig(vocab_size=96, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96)
  model = random_llama(config, seed=2)
  fast = repquant.RepQuantConfig(weight_bits=4, act_bits=4, n_samples=8, seq_len=16, clip_steps=4, recon_steps=3,
                                 recon_batch=4)
  tokens = np.random.default_rng(0).integers(0, 96, (8, 16)).astype(np.int32)
  alone = repquant.repquant_quantize(model, [tokens], fast, progress=False)
  mesh = _mesh(model=4, data=2)
  split = repquant.repquant_quantize(sharding.shard_model(model, mesh, COLUMN_PARALLEL), [tokens], fast,
                                     progress=False)
  for a, b in zip(alone.blocks, split.blocks):
    assert a.status == b.status
    np.testing.assert_allclose([b.mse_before, b.mse_after], [a.mse_before, a.mse_after], rtol=1e-4)
    for ga, gb in zip(a.groups, b.groups):
      np.testing.assert_allclose([gb.layer_scale, gb.layer_zero], [ga.layer_scale, ga.layer_zero], rtol=1e-5)
  np.testing.assert_allclose(_logits(split.model, tokens[:2]), _logits(alone.model, tokens[:2]), rtol=0, atol=1e-4)
