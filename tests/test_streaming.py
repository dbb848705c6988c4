"""Streaming quantization: block by block from safetensors / GGUF into a per-part checkpoint, equal to quantizing
the whole model; sharded streaming; and clear errors for bad sources, recipes and checkpoints."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

import numpy_ref
from fixtures_hf import write_hf_llama
from jaxquant import checkpoint, checkpoint_parts, formats, pipeline, recipes, rules, sharding, streaming
from jaxquant.checkpoint import CheckpointError
from jaxquant.models.llama import LlamaConfig, abstract_llama
from jaxquant.sources.base import SourceError
from jaxquant.sources.loading import load_model
from jaxquant.sources.safetensors import SafetensorsFile
from jaxquant.streaming import StreamingError

CONFIG = LlamaConfig(vocab_size=96, dim=128, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=32, ffn_dim=256)
RECIPE = recipes.get_recipe("zeroquant-w48a16-g32")  # int4 MLP / int8 attention, K groups of 32


def _cpu_mesh(model: int):
  """A mesh over the simulated CPU devices (tests/conftest.py), also on a machine with a GPU."""
  from jaxquant import sharding
  return sharding.make_mesh(model=model, devices=jax.devices("cpu"))


def _leaves_equal(a, b) -> bool:
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  directory = tmp_path_factory.mktemp("hf") / "tiny-llama"
  write_hf_llama(directory, CONFIG, seed=3)
  return directory


@pytest.fixture(scope="module")
def streamed(tmp_path_factory, source):
  out = tmp_path_factory.mktemp("out") / "q"
  report = streaming.stream_quantize(source, out, RECIPE, progress=False)
  return out, report


# ----------------------------------------------------------------------------------------------------------------
# An independent reference: a Hugging Face llama written here with the safetensors library (not write_hf_llama),
# every matrix non-square (q 48 -> 64, k/v 48 -> 32, o 64 -> 48, gate/up 48 -> 80, down 80 -> 48, lm_head 48 -> 40),
# non-default rope_theta and eps, checked against numpy_ref.llama_forward (HF's modeling_llama in float64): a
# swapped gate/up, a missing transpose or a wrong name table fails.

HF_CONFIG = {"model_type": "llama", "vocab_size": 40, "hidden_size": 48, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 80,
             "rope_theta": 500.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
HF_SHAPES = {"self_attn.q_proj": (64, 48), "self_attn.k_proj": (32, 48), "self_attn.v_proj": (32, 48),
             "self_attn.o_proj": (48, 64), "mlp.gate_proj": (80, 48), "mlp.up_proj": (80, 48),
             "mlp.down_proj": (48, 80)}
HF_VARIANTS = {"one-file-f32": dict(shards=False, tie=False, dtype=np.float32),
               "shards-bf16-tied": dict(shards=True, tie=True, dtype="bfloat16")}


def _write_hf_by_hand(directory, shards, tie, dtype, seed=7):
  """config.json + model.safetensors (or two shards and their index) with HF's names and (out, in) weights.
  Returns (config, tensors as stored, widened to float64)."""
  import ml_dtypes
  from safetensors.numpy import save_file
  rng = np.random.default_rng(seed)
  dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype
  tensors = {"model.embed_tokens.weight": rng.standard_normal((40, 48)),
             "model.norm.weight": 1 + 0.2 * rng.standard_normal(48)}
  if not tie:
    tensors["lm_head.weight"] = 0.2 * rng.standard_normal((40, 48))
  for i in range(2):
    p = f"model.layers.{i}."
    tensors[p + "input_layernorm.weight"] = 1 + 0.2 * rng.standard_normal(48)
    tensors[p + "post_attention_layernorm.weight"] = 1 + 0.2 * rng.standard_normal(48)
    for name, shape in HF_SHAPES.items():
      tensors[p + name + ".weight"] = 0.2 * rng.standard_normal(shape)
  tensors = {k: v.astype(np.float32).astype(dtype) for k, v in tensors.items()}
  directory.mkdir(parents=True)
  config = dict(HF_CONFIG, tie_word_embeddings=tie)
  (directory / "config.json").write_text(json.dumps(config))
  if shards:
    names = sorted(tensors)
    files = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in files.items():
      save_file({k: tensors[k] for k in part}, str(directory / file))
    index = {"weight_map": {k: file for file, part in files.items() for k in part}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
  else:
    save_file(tensors, str(directory / "model.safetensors"))
  return config, {k: v.astype(np.float64) for k, v in tensors.items()}


def _numpy_logits(config, tensors, tokens, linear=None):
  return np.stack([numpy_ref.llama_forward(tensors, config, row, linear) for row in tokens])


@pytest.mark.parametrize("variant", list(HF_VARIANTS))
def test_hf_llama_loads_as_the_numpy_forward_says(tmp_path, variant):
  config, tensors = _write_hf_by_hand(tmp_path / "hf", **HF_VARIANTS[variant])
  model = load_model(tmp_path / "hf")
  tokens = np.random.default_rng(1).integers(0, 40, (2, 11)).astype(np.int32)
  np.testing.assert_allclose(np.asarray(model(tokens)), _numpy_logits(config, tensors, tokens), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("variant", list(HF_VARIANTS))
def test_streamed_quantization_matches_numpy(tmp_path, variant):
  """Every stored kernel holds numpy_ref's round-to-nearest of the HF weight, transposed (scales, and codes read
  from the bytes by the numpy bit stream: equal up to float32 ties, which bfloat16 weights make common); norms and
  embeddings are the stored tensors; logits follow the numpy forward of the decoded weights. The recipe: int4 MLP,
  int8 attention, K groups of 32 (short last groups of 16 at K = 48 and 80)."""
  config, tensors = _write_hf_by_hand(tmp_path / "hf", **HF_VARIANTS[variant])
  streaming.stream_quantize(tmp_path / "hf", tmp_path / "q", RECIPE, progress=False)
  abstract = abstract_llama(LlamaConfig(40, 48, 2, 4, 2, 16, 80, 500.0, 1e-6, config["tie_word_embeddings"]))
  restored = checkpoint.restore(tmp_path / "q", abstract)
  decoded = dict(tensors)
  for i, block in enumerate(restored.layers):
    p = f"model.layers.{i}."
    for name in HF_SHAPES:
      part, short = name.split(".")
      q = getattr(getattr(block, "attn" if part == "self_attn" else "mlp"), short).kernel.get_value()
      bits, w = (4 if part == "mlp" else 8), tensors[p + name + ".weight"].T
      assert (q.bits, q.k_group, q.n_group, q.shape, q.zero) == (bits, 32, 1, w.shape, None), name
      _, scale, _ = numpy_ref.quantize(w, bits, True, 32, 1)
      np.testing.assert_allclose(np.asarray(q.scale), scale, rtol=1e-6, err_msg=p + name)
      codes = numpy_ref.unpack(np.asarray(q.packed), bits, w.shape[0]).T
      assert numpy_ref.code_mismatches(codes, w, bits, True, 32, 1).size == 0, p + name
      decoded[p + name + ".weight"] = numpy_ref.stored_dequantize(q).T
    np.testing.assert_array_equal(block.attn_norm.weight.get_value(), tensors[p + "input_layernorm.weight"])
    np.testing.assert_array_equal(block.mlp_norm.weight.get_value(), tensors[p + "post_attention_layernorm.weight"])
  np.testing.assert_array_equal(restored.embed.embedding.get_value(), tensors["model.embed_tokens.weight"])
  head = tensors["model.embed_tokens.weight" if config["tie_word_embeddings"] else "lm_head.weight"]
  np.testing.assert_array_equal(restored.lm_head.kernel.get_value(), head.T)
  tokens = np.random.default_rng(2).integers(0, 40, (2, 9)).astype(np.int32)
  np.testing.assert_allclose(np.asarray(restored(tokens)), _numpy_logits(config, decoded, tokens), rtol=1e-5,
                             atol=1e-4)


def test_the_synthetic_source_reads_the_same_through_independent_readers(source):
  """The directory write_hf_llama made for the tests below, read by the safetensors library and run by the numpy
  forward, gives the logits load_model's model gives."""
  from safetensors.numpy import load_file
  tensors = {k: v.astype(np.float64) for k, v in load_file(str(source / "model.safetensors")).items()}
  config = json.loads((source / "config.json").read_text())
  tokens = np.arange(20, dtype=np.int32).reshape(2, 10) * 4
  np.testing.assert_allclose(np.asarray(load_model(source)(tokens)), _numpy_logits(config, tensors, tokens),
                             rtol=1e-5, atol=1e-6)


def test_streamed_checkpoint_equals_quantizing_the_whole_model(streamed, source):
  out, report = streamed
  meta = checkpoint.load_metadata(out)
  assert meta["format_version"] == checkpoint.PARTS_FORMAT_VERSION
  assert list(meta["parts"]) == ["embed", "layers.0", "layers.1", "layers.2", "head"] and report.parts == 5
  assert sorted(p.name for p in (out / checkpoint.PARTS_DIR).iterdir()) == sorted(meta["parts"])
  whole = load_model(source)
  reference = pipeline.quantize_model(whole, RECIPE, progress=False)
  restored = checkpoint.restore(out, abstract_llama(whole.config))
  assert _leaves_equal(nnx.state(restored), nnx.state(reference))
  tokens = np.arange(24, dtype=np.int32).reshape(2, 12)
  np.testing.assert_array_equal(np.asarray(restored(tokens)), np.asarray(reference(tokens)))
  assert report.read_bytes == sum(int(np.asarray(x).nbytes) for x in jax.tree_util.tree_leaves(nnx.state(whole)))


def test_streaming_on_a_mesh_equals_unsharded(tmp_path, streamed, source):
  mesh = _cpu_mesh(4)  # K splits of 128 / 4 = 32 rows: whole groups of 32
  streaming.stream_quantize(source, tmp_path / "q4", RECIPE, mesh=mesh, progress=False)
  template = abstract_llama(CONFIG)
  assert _leaves_equal(nnx.state(checkpoint.restore(tmp_path / "q4", template)),
                       nnx.state(checkpoint.restore(streamed[0], template)))
  on_two = checkpoint.restore(tmp_path / "q4", template, shardings=sharding.leaf_shardings(_cpu_mesh(2)))
  down = nnx.state(on_two)["layers"][2]["mlp"]["down_proj"]["kernel"].get_value()
  assert len(down.packed.sharding.device_set) == 2


def test_gguf_streaming_equals_the_loaded_smollm2(tmp_path):
  loaded = pipeline.load("smollm2-135m", n_layers=2)
  recipe = recipes.get_recipe("zeroquant-w48a16")
  streaming.stream_quantize(loaded.source["path"], tmp_path / "smol", recipe, n_layers=2, progress=False)
  restored = checkpoint.restore(tmp_path / "smol", loaded.model)
  assert _leaves_equal(nnx.state(restored), nnx.state(pipeline.quantize_model(loaded.model, recipe, progress=False)))


def test_recipes_that_need_the_whole_model_are_refused(tmp_path, source):
  with pytest.raises(StreamingError, match=r"recipe 'w8a8-per-tensor' learns from calibration data"):
    streaming.stream_quantize(source, tmp_path / "q", recipes.get_recipe("w8a8-per-tensor"), progress=False)
  with pytest.raises(StreamingError, match=r"'zeroquant-w48a16-lkd-datafree' samples its LKD data from the whole "
                                           r"float model"):
    streaming.stream_quantize(source, tmp_path / "q", recipes.get_recipe("zeroquant-w48a16-lkd-datafree"),
                              progress=False)
  with pytest.raises(StreamingError, match=r"distills on calibration text: pass calibration batches"):
    streaming.stream_quantize(source, tmp_path / "q", recipes.get_recipe("zeroquant-w48a16-lkd"), progress=False)
  with pytest.raises(StreamingError, match=r"streaming LKD runs on one device"):
    streaming.stream_quantize(source, tmp_path / "q", recipes.get_recipe("zeroquant-w48a16-lkd-random"),
                              mesh=_cpu_mesh(2), progress=False)
  with pytest.raises(StreamingError, match=r"calibration token 500 is outside the vocabulary .* \(96 tokens\)"):
    streaming.stream_quantize(source, tmp_path / "q", recipes.get_recipe("zeroquant-w48a16-lkd"),
                              calibration=[np.full((128, 128), 500, np.int32)], progress=False)
  assert not (tmp_path / "q").exists() and not list(tmp_path.glob(".q.jaxquant-tmp-*"))


@pytest.mark.parametrize("data", ["calibration", "random"])
def test_streamed_lkd_equals_lkd_of_the_loaded_model(tmp_path, source, data):
  """Reading one float block at a time from disk changes nothing: same blocks, same reports, bit for bit."""
  from jaxquant.methods import lkd
  name = "zeroquant-w48a16-lkd-g32" if data == "calibration" else "zeroquant-w48a16-lkd-random-g32"
  recipe = lkd.with_lkd_options(recipes.get_recipe(name), steps=3, batch_size=4, seq_len=16, n_samples=8,
                                keep_best=False)
  tokens = [np.random.default_rng(0).integers(0, CONFIG.vocab_size, (8, 16)).astype(np.int32)]
  calibration = tokens if data == "calibration" else None
  report = streaming.stream_quantize(source, tmp_path / "q", recipe, calibration=calibration, progress=False)
  reference = lkd.lkd_quantize(load_model(source), recipe.rules, calibration, recipe.procedure.config,
                               progress=False)
  restored = checkpoint.restore(tmp_path / "q", abstract_llama(CONFIG))
  assert _leaves_equal(nnx.state(restored), nnx.state(reference.model))
  assert [b["status"] for b in report.lkd_blocks] == [b.status for b in reference.blocks] == ["lkd"] * 3
  assert [b["mse_lkd"] for b in report.lkd_blocks] == [b.mse_lkd for b in reference.blocks]
  assert report.parts == CONFIG.n_layers + 2 and report.lkd_compilations == reference.compilations == 1
  assert report.stored_bytes == formats.tree_nbytes(nnx.state(reference.model))
  assert [report.part_bytes[f"layers.{i}"] for i in range(3)] == [
      formats.tree_nbytes(nnx.state(block)) for block in reference.model.layers]


def test_interrupted_streamed_lkd_resumes_from_the_last_finished_block(tmp_path, source):
  from jaxquant.methods import lkd
  recipe = lkd.with_lkd_options(recipes.get_recipe("zeroquant-w48a16-lkd-random-g32"), steps=2, batch_size=4,
                                seq_len=16, n_samples=8, checkpoint_dir=str(tmp_path / "blocks"))
  first = streaming.stream_quantize(source, tmp_path / "q", recipe, progress=False)
  # As if the run had stopped while distilling the last block: its finished-block directory never appeared.
  import shutil
  shutil.rmtree(tmp_path / "blocks" / "block_002")
  again = streaming.stream_quantize(source, tmp_path / "r", recipe, progress=False)
  assert [b["resumed"] for b in again.lkd_blocks] == [True, True, False]
  assert [b["status"] for b in again.lkd_blocks] == [b["status"] for b in first.lkd_blocks]
  template = abstract_llama(CONFIG)
  assert _leaves_equal(nnx.state(checkpoint.restore(tmp_path / "q", template)),
                       nnx.state(checkpoint.restore(tmp_path / "r", template)))
  # Blocks a loaded run finished serve a streamed run, and the other way round: the same teacher, data, settings.
  loaded = lkd.lkd_quantize(load_model(source), recipe.rules, None, recipe.procedure.config,
                            checkpoint_dir=tmp_path / "blocks", progress=False)
  assert all(b.resumed for b in loaded.blocks)
  assert _leaves_equal(nnx.state(loaded.model), nnx.state(checkpoint.restore(tmp_path / "q", template)))


def _poison(source, directory, tensor: str):
  """A copy of the source with a NaN written into one tensor."""
  poisoned = _copy_source(source, directory)
  file = SafetensorsFile(poisoned / "model.safetensors")
  _, _, begin, _ = file.tensors[tensor]
  offset = file._data_start + begin  # noqa: SLF001 - the test writes a NaN into one tensor
  file.close()
  with open(poisoned / "model.safetensors", "r+b") as f:
    f.seek(offset)
    f.write(np.array([np.nan], np.float32).tobytes())
  return poisoned


def test_a_streamed_lkd_that_stops_leaves_no_output_and_keeps_finished_blocks(tmp_path, source):
  from jaxquant.methods import lkd
  recipe = lkd.with_lkd_options(recipes.get_recipe("zeroquant-w48a16-lkd-random-g32"), steps=2, batch_size=4,
                                seq_len=16, n_samples=8, checkpoint_dir=str(tmp_path / "blocks"))
  poisoned = _poison(source, tmp_path / "poisoned", "model.layers.2.mlp.up_proj.weight")
  with pytest.raises(SourceError, match=r"tensor 'model.layers.2.mlp.up_proj.weight' contains NaN"):
    streaming.stream_quantize(poisoned, tmp_path / "q", recipe, progress=False)
  assert not (tmp_path / "q").exists() and not list(tmp_path.glob(".q.jaxquant-tmp-*"))
  assert sorted(p.name for p in (tmp_path / "blocks").iterdir()) == ["block_000", "block_001"]
  with pytest.raises(lkd.LKDError, match=r"LKD of block layers\.0: the loss became .* stopping"):
    diverging = lkd.with_lkd_options(recipe, learning_rate=1e30, on_nan="raise", checkpoint_dir=str(tmp_path / "b2"))
    streaming.stream_quantize(source, tmp_path / "q", diverging, progress=False)
  assert not (tmp_path / "q").exists() and not list((tmp_path / "b2").iterdir())


def _copy_source(source, directory):
  directory.mkdir()
  for file in source.iterdir():
    (directory / file.name).write_bytes(file.read_bytes())
  return directory


def test_bad_sources_name_file_and_tensor(tmp_path, source):
  truncated = _copy_source(source, tmp_path / "truncated")
  data = (truncated / "model.safetensors").read_bytes()
  (truncated / "model.safetensors").write_bytes(data[: len(data) - 1000])
  with pytest.raises(SourceError, match=r"truncated/model.safetensors: tensor '.*' .* do not fit .*truncated"):
    streaming.open_llama(truncated)

  deeper = _copy_source(source, tmp_path / "deeper")
  config = json.loads((deeper / "config.json").read_text())
  (deeper / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 4}))
  with pytest.raises(SourceError, match=r"deeper/model.safetensors: missing tensor "
                                       r"'model.layers.3.input_layernorm.weight'"):
    streaming.stream_quantize(deeper, tmp_path / "q", RECIPE, progress=False)
  assert not (tmp_path / "q").exists() and not list(tmp_path.glob(".q.jaxquant-tmp-*"))  # nothing half-written

  (deeper / "config.json").write_text(json.dumps(config | {"model_type": "bert"}))
  with pytest.raises(StreamingError, match=r"config.json: model_type 'bert'; streaming reads llama-family"):
    streaming.open_llama(deeper)
  with pytest.raises(SourceError, match=r"no model at .*nowhere"):
    streaming.open_llama(tmp_path / "nowhere")


def test_nan_in_a_block_names_the_tensor_and_keeps_the_old_checkpoint(tmp_path, source, streamed):
  poisoned = _poison(source, tmp_path / "poisoned", "model.layers.1.mlp.up_proj.weight")
  out = tmp_path / "q"
  checkpoint.save(out, load_model(source), recipe_name="fp", source={"name": "old"})
  with pytest.raises(SourceError, match=r"tensor 'model.layers.1.mlp.up_proj.weight' contains NaN"):
    streaming.stream_quantize(poisoned, out, RECIPE, overwrite=True, progress=False)
  assert checkpoint.load_metadata(out)["recipe"] == "fp"  # the previous checkpoint is intact
  assert not list(tmp_path.glob(".q.jaxquant-tmp-*"))


def test_part_writer_refusals_and_corruption(tmp_path, streamed):
  with checkpoint_parts.PartWriter(tmp_path / "p", recipe_name="r", source={}) as writer:
    writer.write("a", {"x": np.zeros((2, 2), np.float32)})
    with pytest.raises(CheckpointError, match=r"part 'a' .* already written"):
      writer.write("a", {"y": np.zeros(2, np.float32)})
    with pytest.raises(CheckpointError, match=r"leaf x was already written"):
      writer.write("b", {"x": np.zeros(2, np.float32)})
    with pytest.raises(CheckpointError, match=r"part names are letters"):
      writer.write("../c", {"z": np.zeros(2, np.float32)})

  out = streamed[0]
  meta = json.loads((out / checkpoint.METADATA_FILE).read_text())
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / checkpoint.PARTS_DIR).symlink_to(out / checkpoint.PARTS_DIR)
  entry = meta["leaves"]["layers.1.mlp.up_proj.kernel"]["fields"]["packed"]
  entry["sha256"] = "0" * 64
  (bad / checkpoint.METADATA_FILE).write_text(json.dumps(meta))
  with pytest.raises(CheckpointError, match=r"layers.1.mlp.up_proj.kernel.packed of leaf layers.1.mlp.up_proj.kernel "
                                            r"does not match its sha256"):
    checkpoint.restore(bad, abstract_llama(CONFIG))
  meta["parts"]["layers.1"] = meta["parts"]["layers.1"][1:]
  (bad / checkpoint.METADATA_FILE).write_text(json.dumps(meta))
  with pytest.raises(CheckpointError, match=r"the parts do not list exactly the manifest's arrays"):
    checkpoint.load_metadata(bad)


def test_cli_quantize_stream(tmp_path, source, streamed, capsys):
  from jaxquant import cli
  code = cli.main(["quantize", str(source), "--recipe", RECIPE.name, "--out", str(tmp_path / "q"), "--stream",
                   "--json", "--quiet"])
  assert code == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["parts"] == 5 and result["weight_bytes"] == streamed[1].stored_bytes
  template = abstract_llama(CONFIG)
  assert _leaves_equal(nnx.state(checkpoint.restore(tmp_path / "q", template)),
                       nnx.state(checkpoint.restore(streamed[0], template)))
  code = cli.main(["quantize", str(source), "--recipe", "zeroquant-w48a16-lkd", "--out", str(tmp_path / "r"),
                   "--stream", "--quiet"])
  assert code == 2 and "has no tokenizer.json to tokenize calibration text" in capsys.readouterr().err
  code = cli.main(["quantize", str(source), "--recipe", "w8a8-per-tensor", "--out", str(tmp_path / "r"),
                   "--stream", "--quiet"])
  assert code == 2 and "learns from calibration data" in capsys.readouterr().err
  assert not (tmp_path / "r").exists()


def test_a_mesh_that_cannot_split_a_block_stops_before_writing(tmp_path, source):
  mesh = _cpu_mesh(8)  # o_proj: K = 128 over 8 devices = 16 rows, not whole groups of 32
  with pytest.raises(sharding.ShardingError, match=r"layers\.0\.attn\.o_proj\.kernel: mesh axis 'model' of size 8 "
                                                   r"splits K \(input features\)=128 into shards of 16"):
    streaming.stream_quantize(source, tmp_path / "q", RECIPE, mesh=mesh, progress=False)
  assert not (tmp_path / "q").exists() and not list(tmp_path.glob(".q.jaxquant-tmp-*"))
