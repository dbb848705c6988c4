"""Quantized checkpoints: bit-exact round trips, atomic saves, refusals, and clear errors on bad files."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from flax import nnx
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from jaxquant import checkpoint, formats, pipeline, recipes, rules
from jaxquant.checkpoint import CheckpointError
from jaxquant.formats import QArray, is_qarray
from jaxquant.models.layers import Linear, RMSNorm
from jaxquant.quantizers import WeightQuant

DIM, FFN, N_LAYERS = 36, 60, 2  # 36 rows: 4-bit packing pads K, and group 16 leaves a short last group
SOURCE = {"family": "toy", "name": "toy-36", "path": "/nowhere/toy.safetensors", "sha256": "0" * 64}
W4 = rules.Recipe("w4-asym-g16", "test: 4-bit asymmetric weight-only, groups of 16 along K",
                  (rules.Rule(rules.BLOCK_LINEARS, WeightQuant(4, False, "group", 16)),))


def _cpu_mesh(model: int):
  """A mesh over the simulated CPU devices (tests/conftest.py), also on a machine with a GPU."""
  from jaxquant import sharding
  return sharding.make_mesh(model=model, devices=jax.devices("cpu"))


def _linear(key, k, n, bias=False):
  kw, kb = jax.random.split(key)
  return Linear(jax.random.normal(kw, (k, n), jnp.float32) / np.sqrt(k),
                jax.random.normal(kb, (n,), jnp.float32) if bias else None)


class Attn(nnx.Module):
  def __init__(self, key, dim):
    k1, k2 = jax.random.split(key)
    self.q_proj = _linear(k1, dim, dim, bias=True)
    self.o_proj = _linear(k2, dim, dim)


class Mlp(nnx.Module):
  def __init__(self, key, dim, ffn):
    k1, k2 = jax.random.split(key)
    self.up_proj = _linear(k1, dim, ffn)
    self.down_proj = _linear(k2, ffn, dim)


class Block(nnx.Module):
  def __init__(self, key, dim, ffn):
    k1, k2 = jax.random.split(key)
    self.norm = RMSNorm(jnp.ones((dim,), jnp.float32), 1e-5)
    self.attn = Attn(k1, dim)
    self.mlp = Mlp(k2, dim, ffn)

  def __call__(self, x):
    x = x + self.attn.o_proj(self.attn.q_proj(self.norm(x)))
    return x + self.mlp.down_proj(jax.nn.gelu(self.mlp.up_proj(x)))


class Toy(nnx.Module):
  """x (B, T, dim) float -> (B, T, dim); lm_head is not a block linear, so it stays float."""

  def __init__(self, key, dim=DIM, ffn=FFN, n_layers=N_LAYERS):
    keys = jax.random.split(key, n_layers + 1)
    self.layers = nnx.List([Block(keys[i], dim, ffn) for i in range(n_layers)])
    self.lm_head = _linear(keys[-1], dim, dim)

  def __call__(self, x):
    for block in self.layers:
      x = block(x)
    return self.lm_head(x)


def _inputs(seed=0, dim=DIM):
  return np.asarray(jax.random.normal(jax.random.key(seed), (2, 5, dim), jnp.float32))


RECIPES = {"zeroquant-w8a8": recipes.get_recipe("zeroquant-w8a8"),
           "w8a8-per-tensor": recipes.get_recipe("w8a8-per-tensor"),
           "w4-asym-g16": W4}


@pytest.fixture(scope="module")
def float_model():
  return Toy(jax.random.key(0))


@pytest.fixture(scope="module")
def quantized(float_model):
  """recipe name -> quantized toy model."""
  return {name: pipeline.quantize_model(float_model, recipe, [_inputs(1)], progress=False)
          for name, recipe in RECIPES.items()}


@nnx.jit
def _forward(model, x):  # one compilation for a quantized model and its restored copy: same graph, same statics
  return model(x)


def _leaves(model):
  return jax.tree_util.tree_leaves_with_path(nnx.state(model))


def assert_bit_identical(a, b):
  sa, sb = nnx.state(a), nnx.state(b)
  assert jax.tree_util.tree_structure(sa) == jax.tree_util.tree_structure(sb)  # includes QArray static fields
  for (path, x), (_, y) in zip(_leaves(a), _leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape, rules.path_str(path)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=rules.path_str(path))


def _no_leftovers(parent: pathlib.Path):
  return [p.name for p in parent.iterdir() if "jaxquant-tmp" in p.name or "jaxquant-old" in p.name] == []


@pytest.mark.parametrize("name", list(RECIPES))
def test_round_trip_is_bit_identical(tmp_path, float_model, quantized, name):
  model = quantized[name]
  out = checkpoint.save(tmp_path / "ckpt", model, recipe_name=name, source=SOURCE)
  assert out == tmp_path / "ckpt" and (out / checkpoint.METADATA_FILE).is_file()
  restored = checkpoint.restore(out, float_model)
  assert_bit_identical(model, restored)
  x = _inputs(2)
  np.testing.assert_array_equal(np.asarray(_forward(restored, x)), np.asarray(_forward(model, x)))
  assert _no_leftovers(tmp_path)


def test_metadata_describes_every_leaf(tmp_path, quantized):
  checkpoint.save(tmp_path / "ckpt", quantized["w4-asym-g16"], recipe_name="w4-asym-g16", source=SOURCE)
  meta = checkpoint.load_metadata(tmp_path / "ckpt")
  assert meta["format_version"] == checkpoint.FORMAT_VERSION and meta["weight_format"] == 2
  assert meta["recipe"] == "w4-asym-g16" and meta["source"] == SOURCE
  leaves = meta["leaves"]
  up = leaves["layers.0.mlp.up_proj.kernel"]
  assert up["type"] == "QArray" and up["meta"] == {"shape": [DIM, FFN], "bits": 4, "k_group": 16, "n_group": 1}
  assert up["fields"]["activation"] is None
  packed, scale, zero = (up["fields"][name] for name in ("packed", "scale", "zero"))
  assert packed["dtype"] == "uint8" and packed["shape"] == [FFN, 20]  # (N, ceil(36/8) * 4 bytes): K contiguous
  assert zero["shape"] == scale["shape"] == [3, FFN] and len(zero["sha256"]) == 64  # groups 16, 16, 4
  head = leaves["lm_head.kernel"]
  assert (head["type"], head["shape"], head["dtype"]) == ("array", [DIM, DIM], "float32")
  assert leaves["layers.1.norm.weight"]["shape"] == [DIM]
  assert len(leaves) == N_LAYERS * 6 + 1  # norm, q kernel + bias, o, up, down; lm_head


def test_static_activation_scales_are_stored(tmp_path, quantized):
  checkpoint.save(tmp_path / "ckpt", quantized["w8a8-per-tensor"], recipe_name="w8a8-per-tensor", source=SOURCE)
  q = checkpoint.load_metadata(tmp_path / "ckpt")["leaves"]["layers.1.attn.q_proj.kernel"]
  activation = q["fields"]["activation"]
  assert activation["type"] == "ActQuant" and activation["meta"] == {"bits": 8, "mode": "tensor"}
  assert activation["fields"]["scale"]["shape"] == [] and q["fields"]["zero"] is None


def test_bcq_round_trip(tmp_path, float_model, quantized):
  """Other formats of jaxquant.formats (here BCQArray, from the exact 4-bit uniform conversion) round-trip too."""
  graphdef, state = nnx.split(quantized["w4-asym-g16"])
  model = nnx.merge(graphdef, jax.tree_util.tree_map(
      lambda x: formats.uniform_to_bcq(x) if isinstance(x, QArray) else x, state, is_leaf=is_qarray))
  checkpoint.save(tmp_path / "ckpt", model, recipe_name="bcq", source=SOURCE)
  entry = checkpoint.load_metadata(tmp_path / "ckpt")["leaves"]["layers.0.mlp.down_proj.kernel"]
  assert entry["type"] == "BCQArray" and entry["meta"] == {"shape": [FFN, DIM], "k_group": 16}
  restored = checkpoint.restore(tmp_path / "ckpt", float_model)
  assert isinstance(restored.layers[0].mlp.down_proj.kernel.get_value(), formats.BCQArray)
  assert_bit_identical(model, restored)
  x = _inputs(2)
  np.testing.assert_array_equal(np.asarray(_forward(restored, x)), np.asarray(_forward(model, x)))


def test_restore_into_abstract_template(tmp_path, quantized):
  model = quantized["zeroquant-w8a8"]
  checkpoint.save(tmp_path / "ckpt", model, recipe_name="zeroquant-w8a8", source=SOURCE)
  template = nnx.eval_shape(lambda: Toy(jax.random.key(0)))
  restored = checkpoint.restore(tmp_path / "ckpt", template)
  assert_bit_identical(model, restored)


@pytest.mark.parametrize("where", ["orbax", "metadata"])
def test_interrupted_save_keeps_previous_checkpoint(tmp_path, float_model, quantized, monkeypatch, where):
  directory = tmp_path / "ckpt"
  checkpoint.save(directory, quantized["zeroquant-w8a8"], recipe_name="zeroquant-w8a8", source=SOURCE)
  before = checkpoint.load_metadata(directory)

  def boom(*args, **kwargs):
    raise RuntimeError("simulated crash")

  if where == "orbax":
    monkeypatch.setattr(ocp.StandardCheckpointer, "save", boom)
  else:
    monkeypatch.setattr(checkpoint, "write_metadata", boom)
  with pytest.raises(RuntimeError, match="simulated crash"):
    checkpoint.save(directory, quantized["w4-asym-g16"], recipe_name="w4-asym-g16", source=SOURCE, overwrite=True)
  with pytest.raises(RuntimeError, match="simulated crash"):
    checkpoint.save(tmp_path / "fresh", quantized["w4-asym-g16"], recipe_name="w4-asym-g16", source=SOURCE)
  monkeypatch.undo()

  assert checkpoint.load_metadata(directory) == before
  assert_bit_identical(quantized["zeroquant-w8a8"], checkpoint.restore(directory, float_model))
  assert not (tmp_path / "fresh").exists()
  assert _no_leftovers(tmp_path)


def test_refuses_to_replace_a_different_checkpoint(tmp_path, float_model, quantized):
  directory = tmp_path / "ckpt"
  checkpoint.save(directory, quantized["zeroquant-w8a8"], recipe_name="zeroquant-w8a8", source=SOURCE)
  with pytest.raises(CheckpointError, match=r"different checkpoint.*zeroquant-w8a8.*w4-asym-g16.*overwrite=True"):
    checkpoint.save(directory, quantized["w4-asym-g16"], recipe_name="w4-asym-g16", source=SOURCE)
  other_source = dict(SOURCE, sha256="1" * 64)
  with pytest.raises(CheckpointError, match=r"different checkpoint.*--overwrite"):
    checkpoint.save(directory, quantized["zeroquant-w8a8"], recipe_name="zeroquant-w8a8", source=other_source)
  assert checkpoint.load_metadata(directory)["recipe"] == "zeroquant-w8a8"

  # The same recipe and source may be saved again; overwrite=True replaces a different one.
  checkpoint.save(directory, quantized["zeroquant-w8a8"], recipe_name="zeroquant-w8a8", source=SOURCE)
  checkpoint.save(directory, quantized["w4-asym-g16"], recipe_name="w4-asym-g16", source=SOURCE, overwrite=True)
  assert checkpoint.load_metadata(directory)["recipe"] == "w4-asym-g16"
  assert_bit_identical(quantized["w4-asym-g16"], checkpoint.restore(directory, float_model))
  assert _no_leftovers(tmp_path)


def test_refuses_a_directory_that_is_not_a_checkpoint(tmp_path, quantized):
  directory = tmp_path / "results"
  directory.mkdir()
  (directory / "notes.txt").write_text("keep me")
  for overwrite in (False, True):
    with pytest.raises(CheckpointError, match=r"results.*not a jaxquant checkpoint"):
      checkpoint.save(directory, quantized["zeroquant-w8a8"], recipe_name="zeroquant-w8a8", source=SOURCE,
                      overwrite=overwrite)
  assert (directory / "notes.txt").read_text() == "keep me"
  with pytest.raises(CheckpointError, match=r"results is not a jaxquant checkpoint: jaxquant.json is missing"):
    checkpoint.load_metadata(directory)
  (tmp_path / "file").write_text("x")
  with pytest.raises(CheckpointError, match=r"file: it exists and is a file"):
    checkpoint.save(tmp_path / "file", quantized["zeroquant-w8a8"], recipe_name="zeroquant-w8a8", source=SOURCE,
                    overwrite=True)
  # An empty directory is fine to save into.
  (tmp_path / "empty").mkdir()
  checkpoint.save(tmp_path / "empty", quantized["zeroquant-w8a8"], recipe_name="zeroquant-w8a8", source=SOURCE)
  assert checkpoint.load_metadata(tmp_path / "empty")["recipe"] == "zeroquant-w8a8"


def _saved(tmp_path, quantized, name="w4-asym-g16"):
  directory = tmp_path / "ckpt"
  checkpoint.save(directory, quantized[name], recipe_name=name, source=SOURCE)
  return directory


def _stored_values(directory):
  """orbax key -> (file, offset, length) of its stored zarr chunk, read from the OCDBT b-tree.

  Values over 1 KiB live in data files under state/ocdbt.process_0/d; smaller ones inline in the b-tree node.
  """
  state = directory / "state"
  kvstore = ts.KvStore.open({"driver": "file", "path": f"{state}/"}).result()
  (version,) = ts.ocdbt.dump(kvstore).result()["versions"]
  assert version["root_height"] == 0  # a single b-tree node: the model is tiny
  found = {}
  for entry in ts.ocdbt.dump(kvstore, version["root"]["location"]).result()["entries"]:
    key = entry["key"].decode()
    if "indirect_value" in entry and not key.endswith("/.zarray"):
      base, name, offset, length = entry["indirect_value"].removeprefix("value:").split(":")
      found[key.rsplit("/", 1)[0]] = (state / base / name, int(offset), int(length))
  return found


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_array_file_names_the_leaf(tmp_path, float_model, quantized, damage):
  directory = _saved(tmp_path, quantized)
  values = _stored_values(directory)
  file, offset, length = values["lm_head.kernel"]
  data = bytearray(file.read_bytes())
  if damage == "flip":  # zstd without checksums: decodes to wrong numbers (sha256 mismatch) or fails to decode
    for i in range(offset + length // 2, offset + length // 2 + 16):
      data[i] ^= 0xFF
    damaged = ["lm_head.kernel"]
  else:
    data = data[: offset + length // 2]
    damaged = [key for key, (f, o, n) in values.items() if f == file and o + n > len(data)]
  file.write_bytes(bytes(data))
  with pytest.raises(CheckpointError) as info:
    checkpoint.restore(directory, float_model)
  message = str(info.value)
  assert str(directory) in message and "corrupt" in message
  assert any(f"the array {key} of leaf {key.removesuffix('.packed')} " in message for key in damaged), message


def test_corrupt_btree_is_reported(tmp_path, float_model, quantized):
  directory = _saved(tmp_path, quantized)
  (node,) = (directory / "state" / "d").iterdir()  # orbax's merged OCDBT b-tree, small arrays inline
  node.write_bytes(node.read_bytes()[:100])
  with pytest.raises(CheckpointError, match=r"ckpt: orbax cannot read the array files in .*state; they are "
                                            r"truncated or corrupt"):
    checkpoint.restore(directory, float_model)


def test_mismatched_template_names_path_and_shapes(tmp_path, quantized):
  directory = _saved(tmp_path, quantized)
  wider = Toy(jax.random.key(0), dim=40)
  with pytest.raises(CheckpointError, match=r"layers\.0\.\S+ has shape \(36,?.*\) in the checkpoint but \(40,?.*\) "
                                            r"in the template.*different model"):
    checkpoint.restore(directory, wider)
  deeper = nnx.eval_shape(lambda: Toy(jax.random.key(0), n_layers=3))
  with pytest.raises(CheckpointError, match=r"template model has layers\.2\.\S+ .*which the checkpoint lacks.*"
                                            r"different model"):
    checkpoint.restore(directory, deeper)
  shallower = nnx.eval_shape(lambda: Toy(jax.random.key(0), n_layers=1))
  with pytest.raises(CheckpointError, match=r"checkpoint has layers\.1\.\S+ .*which the template model lacks"):
    checkpoint.restore(directory, shallower)


def test_bad_metadata_errors(tmp_path, float_model, quantized):
  with pytest.raises(CheckpointError, match=r"no checkpoint at .*missing.*does not exist"):
    checkpoint.restore(tmp_path / "missing", float_model)
  directory = _saved(tmp_path, quantized)
  meta_file = directory / checkpoint.METADATA_FILE
  meta = json.loads(meta_file.read_text())

  leaves = dict(meta["leaves"], **{"lm_head.kernel": dict(meta["leaves"]["layers.0.attn.o_proj.kernel"],
                                                            type="FancyArray")})
  meta_file.write_text(json.dumps(dict(meta, leaves=leaves)))
  with pytest.raises(CheckpointError, match=r"jaxquant.json: leaf lm_head.kernel has the unknown format 'FancyArray'"):
    checkpoint.restore(directory, float_model)
  meta_file.write_text(json.dumps(dict(meta, format_version=99)))
  with pytest.raises(CheckpointError, match=r"jaxquant.json has format version 99"):
    checkpoint.restore(directory, float_model)
  meta_file.write_text(meta_file.read_text()[:100])
  with pytest.raises(CheckpointError, match=r"jaxquant.json cannot be parsed"):
    checkpoint.load_metadata(directory)
  # An unreadable checkpoint of ours is replaced only with overwrite=True.
  with pytest.raises(CheckpointError, match=r"cannot be read.*overwrite=True"):
    checkpoint.save(directory, quantized["w4-asym-g16"], recipe_name="w4-asym-g16", source=SOURCE)
  checkpoint.save(directory, quantized["w4-asym-g16"], recipe_name="w4-asym-g16", source=SOURCE, overwrite=True)
  meta_file.unlink()
  with pytest.raises(CheckpointError, match=r"ckpt is not a jaxquant checkpoint: jaxquant.json is missing"):
    checkpoint.restore(directory, float_model)


def test_quantized_leaves_are_qarrays_after_restore(tmp_path, float_model, quantized):
  directory = _saved(tmp_path, quantized)
  restored = checkpoint.restore(directory, float_model)
  kernel = restored.layers[0].mlp.down_proj.kernel.get_value()
  assert isinstance(kernel, QArray) and kernel.bits == 4 and not kernel.symmetric
  assert not is_qarray(restored.lm_head.kernel.get_value())


def _to_v1(leaf):
  """A v2 QArray / BCQArray rewritten as weight format 1 stored it (numpy only): unsigned codes, K along axis 0."""
  import dataclasses
  if isinstance(leaf, formats.BCQArray):
    return dataclasses.replace(leaf, planes=jnp.swapaxes(leaf.planes, 1, 2))
  if not isinstance(leaf, QArray):
    return leaf
  half = 1 << (leaf.bits - 1)
  u = (np.asarray(leaf.values()).astype(np.int32) + half).astype(np.uint8)  # (N, K) unsigned codes
  if leaf.bits == 8:
    packed = u.T
  else:
    k = u.shape[1]
    bits = ((u[:, :, None] >> np.arange(leaf.bits)) & 1).reshape(u.shape[0], k * leaf.bits)
    bits = np.pad(bits, ((0, 0), (0, (-(-k // 8) * 8 - k) * leaf.bits)))
    packed = np.packbits(bits, axis=1, bitorder="little").T
  zero = None if leaf.zero is None else leaf.zero + half
  return dataclasses.replace(leaf, packed=jnp.asarray(packed), zero=zero)


@pytest.mark.parametrize("name", ["zeroquant-w8a8", "w4-asym-g16"])
def test_weight_format_1_checkpoint_is_converted_on_restore(tmp_path, float_model, quantized, name):
  """A checkpoint written before the (N, K) layout (no "weight_format" in its manifest) restores converted."""
  model = quantized[name]
  graphdef, state = nnx.split(model)
  old = nnx.merge(graphdef, jax.tree_util.tree_map(_to_v1, state, is_leaf=is_qarray))
  directory = checkpoint.save(tmp_path / "old", old, recipe_name=name, source=SOURCE)
  meta_file = directory / checkpoint.METADATA_FILE
  meta = json.loads(meta_file.read_text())
  del meta["weight_format"]
  meta_file.write_text(json.dumps(meta))
  assert_bit_identical(model, checkpoint.restore(directory, float_model))
  from jaxquant import sharding
  on_mesh = checkpoint.restore(directory, float_model,
                               shardings=sharding.leaf_shardings(_cpu_mesh(2), sharding.COLUMN_PARALLEL))
  up = nnx.state(on_mesh)["layers"][0]["mlp"]["up_proj"]["kernel"].get_value()
  assert len(up.packed.sharding.device_set) == 2
  assert_bit_identical(model, on_mesh)
  meta["weight_format"] = 3
  meta_file.write_text(json.dumps(meta))
  with pytest.raises(CheckpointError, match=r"stores weights in format 3; this jaxquant reads weight format\(s\) 1, 2"):
    checkpoint.restore(directory, float_model)


# ----------------------------------------------------------------------------------------------------------------
# property: quantize -> save -> restore is the identity, for any stored format


class _Bag(nnx.Module):
  def __init__(self, shapes):
    self.linears = nnx.List([Linear(jnp.zeros(shape, jnp.float32)) for shape in shapes])


@st.composite
def _quantized_kernels(draw):
  """1-3 float kernels of random shapes, each quantized by a random scheme: bits, symmetry, granularity, group
  size (short last groups included), activation mode; some converted to BCQ."""
  out = []
  for _ in range(draw(st.integers(1, 3))):
    k, n = draw(st.integers(1, 48)), draw(st.integers(1, 12))
    bcq = draw(st.integers(0, 2)) == 0  # a third of the kernels become BCQ (exact from uniform, with offset)
    config = WeightQuant(draw(st.sampled_from((2, 3, 4) if bcq else formats.SUPPORTED_BITS)), draw(st.booleans()),
                         draw(st.sampled_from(["channel", "group"] if bcq else ["tensor", "channel", "group",
                                                                                   "row_block"])),
                         draw(st.integers(1, 50)))
    w = jnp.asarray(draw(hnp.arrays(np.float32, (k, n), elements=st.floats(-4, 4, width=32))))
    mode = None if bcq else draw(st.sampled_from([None, "token", "token_group", "tensor"]))
    activation = None if mode is None else formats.ActQuant(
        8, mode, jnp.float32(draw(st.floats(1e-3, 1.0))) if mode == "tensor" else None)
    q = config.quantize(w, activation=activation)
    out.append(formats.uniform_to_bcq(q) if bcq else q)
  return out


@settings(max_examples=8, deadline=None)
@given(_quantized_kernels())
def test_any_quantized_model_round_trips_bit_identically(kernels):
  import tempfile
  graphdef, state = nnx.split(_Bag([q.shape for q in kernels]))
  for i, q in enumerate(kernels):
    state["linears"][i]["kernel"].set_value(q)
  model = nnx.merge(graphdef, state)
  with tempfile.TemporaryDirectory() as tmp:
    checkpoint.save(pathlib.Path(tmp) / "c", model, recipe_name="any", source={})
    restored = checkpoint.restore(pathlib.Path(tmp) / "c", _Bag([q.shape for q in kernels]))
  assert_bit_identical(model, restored)


# ----------------------------------------------------------------------------------------------------------------
# check_destination: what may be replaced, called before any work


def test_check_destination_refuses_all_but_the_same_checkpoint(tmp_path, quantized):
  check = checkpoint.check_destination
  check(tmp_path / "absent", "r", SOURCE, overwrite=False)  # nothing there: fine
  (tmp_path / "empty").mkdir()
  check(tmp_path / "empty", "r", SOURCE, overwrite=False)
  (tmp_path / "file").write_text("x")
  for overwrite in (False, True):
    with pytest.raises(CheckpointError, match=r"file: it exists and is a file"):
      check(tmp_path / "file", "r", SOURCE, overwrite=overwrite)
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "notes.txt").write_text("keep")
  for overwrite in (False, True):
    with pytest.raises(CheckpointError, match=r"other: it exists, is not empty and is not a jaxquant checkpoint"):
      check(tmp_path / "other", "r", SOURCE, overwrite=overwrite)
  directory = checkpoint.save(tmp_path / "ckpt", quantized["w4-asym-g16"], recipe_name="w4-asym-g16", source=SOURCE)
  check(directory, "w4-asym-g16", dict(SOURCE), overwrite=False)  # the same recipe and source: a rerun
  with pytest.raises(CheckpointError, match=r"different checkpoint \(recipe 'w4-asym-g16'.*saving recipe 'r'"):
    check(directory, "r", SOURCE, overwrite=False)
  with pytest.raises(CheckpointError, match=r"different checkpoint"):
    check(directory, "w4-asym-g16", dict(SOURCE, sha256="1" * 64), overwrite=False)
  check(directory, "r", SOURCE, overwrite=True)
  (directory / checkpoint.METADATA_FILE).write_text("{")
  with pytest.raises(CheckpointError, match=r"holds a jaxquant checkpoint that cannot be read .*overwrite=True"):
    check(directory, "w4-asym-g16", SOURCE, overwrite=False)
  check(directory, "w4-asym-g16", SOURCE, overwrite=True)
  assert (tmp_path / "other" / "notes.txt").read_text() == "keep" and not (tmp_path / "absent").exists()
