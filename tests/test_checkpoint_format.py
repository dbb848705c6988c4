"""Committed checkpoints with known bytes (tests/testdata/checkpoint-*): today's code must restore them bit for
bit, and today's writer must write the same manifest, so any drift of the on-disk format fails here.

The expected contents are defined below with numpy alone (codes from a seeded generator, packed by
tests/numpy_ref.py's bit stream), covering every stored format: 8-bit W8A8 with a short last K-group, 4-bit
asymmetric per channel with K padded, 3-bit row blocks with a short last block, 2-bit per tensor with a static
activation scale, 6-bit groups, a static asymmetric activation (zero point), BCQ with float16 alphas and offset.

The two directories were written by this file (`.venv/bin/python tests/test_checkpoint_format.py`) with
checkpoint.save (format_version 1, one orbax item) and checkpoint_parts.PartWriter (format_version 2, per part), both
weight_format 2. A deliberate format change bumps those versions: keep these directories (restore must still
read them, converting if need be) and add new ones beside them.
"""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # run as a script too
import numpy_ref  # noqa: E402
from jaxquant import checkpoint, checkpoint_parts, formats  # noqa: E402
from jaxquant.formats import ActQuant, BCQArray, QArray  # noqa: E402
from jaxquant.models.layers import Linear, RMSNorm  # noqa: E402

TESTDATA = HERE / "testdata"
DIRECTORIES = {1: TESTDATA / "checkpoint-format1-state", 2: TESTDATA / "checkpoint-format2-parts"}
SOURCE = {"name": "tests/test_checkpoint_format.py", "seed": 2024}
# name -> (K, N): the logical shapes of the float kernels the template holds
SHAPES = {"w8a8": (40, 6), "w4_asym": (20, 5), "w3_rows": (16, 7), "w2_static": (9, 4), "w6_group": (12, 3),
          "act_zero": (8, 2), "bcq": (24, 4)}


class Frozen(nnx.Module):
  """The committed model: one Linear per stored format, a bias and a norm."""

  def __init__(self):
    for name, shape in SHAPES.items():
      setattr(self, name, Linear(jnp.zeros(shape, jnp.float32), jnp.zeros(shape[1]) if name == "w8a8" else None))
    self.norm = RMSNorm(jnp.ones(6, jnp.float32), 1e-6)


def _qarray(rng, shape, bits, k_group, n_group, symmetric=True, activation=None):
  k, n = shape
  half = 1 << (bits - 1)
  low = -half if not symmetric else -(half - 1)
  codes = rng.integers(low, half, (n, k))  # stored (N, K)
  grid = (-(-k // k_group), -(-n // n_group))
  scale = rng.uniform(0.01, 0.1, grid).astype(np.float32)
  zero = None if symmetric else rng.integers(-half, half, grid).astype(np.float32)
  return QArray(packed=numpy_ref.pack(codes, bits), scale=scale, zero=zero, activation=activation, shape=shape,
                bits=bits, k_group=k_group, n_group=n_group), codes


def expected_leaves():
  """path -> (leaf with numpy arrays, its codes (N, K) or BCQ signs, for the numeric check)."""
  rng = np.random.default_rng(SOURCE["seed"])
  leaves = {
      "w8a8.kernel": _qarray(rng, SHAPES["w8a8"], 8, 16, 1, activation=ActQuant(8, "token")),
      "w4_asym.kernel": _qarray(rng, SHAPES["w4_asym"], 4, 20, 1, symmetric=False),
      "w3_rows.kernel": _qarray(rng, SHAPES["w3_rows"], 3, 16, 3),
      "w2_static.kernel": _qarray(rng, SHAPES["w2_static"], 2, 9, 4,
                                  activation=ActQuant(8, "tensor", np.float32(0.05))),
      "w6_group.kernel": _qarray(rng, SHAPES["w6_group"], 6, 5, 1),
      "act_zero.kernel": _qarray(rng, SHAPES["act_zero"], 8, 8, 1,
                                 activation=ActQuant(4, "tensor", np.float32(0.1), np.float32(3.0))),
  }
  signs = rng.random((3, 4, 24)) > 0.5  # (q, N, K)
  leaves["bcq.kernel"] = (BCQArray(planes=numpy_ref.pack(signs.astype(np.int64), 1),
                                   alpha=rng.uniform(0.01, 0.1, (3, 3, 4)).astype(np.float16),
                                   offset=rng.uniform(-0.1, 0.1, (3, 4)).astype(np.float16), shape=(24, 4),
                                   k_group=8), signs)
  leaves["w8a8.bias"] = (rng.standard_normal(6).astype(np.float32), None)
  leaves["norm.weight"] = (rng.standard_normal(6).astype(np.float32), None)
  return leaves


def _model(leaves) -> nnx.Module:
  graphdef, state = nnx.split(Frozen())
  flat = {".".join(str(k) for k in path): value for path, value in nnx.to_flat_state(state)}
  for path, (leaf, _) in leaves.items():
    flat[path].set_value(jax.tree_util.tree_map(jnp.asarray, leaf))
  return nnx.merge(graphdef, state)


def write(directory_by_version=DIRECTORIES) -> None:
  model = _model(expected_leaves())
  checkpoint.save(directory_by_version[1], model, recipe_name="committed", source=SOURCE, overwrite=True)
  state = checkpoint_parts.flat_leaves(nnx.state(model))
  with checkpoint_parts.PartWriter(directory_by_version[2], recipe_name="committed", source=SOURCE,
                             overwrite=True) as writer:
    writer.write("linears", {k: v for k, v in state.items() if k != "norm.weight"})
    writer.write("norm", {"norm.weight": state["norm.weight"]})


def _arrays(leaf):
  return jax.tree_util.tree_leaves_with_path(leaf)


@pytest.mark.parametrize("version", [1, 2])
def test_committed_checkpoint_restores_bit_identically(version):
  directory = DIRECTORIES[version]
  meta = json.loads((directory / checkpoint.METADATA_FILE).read_text())
  assert (meta["format_version"], meta["weight_format"]) == (version, 2)
  restored = checkpoint.restore(directory, Frozen())
  got = checkpoint_parts.flat_leaves(nnx.state(restored))
  expected = expected_leaves()
  assert set(got) == set(expected)
  for path, (leaf, codes) in expected.items():
    assert jax.tree_util.tree_structure(got[path]) == jax.tree_util.tree_structure(leaf), path  # statics too
    for (key, a), (_, b) in zip(_arrays(got[path]), _arrays(leaf)):
      assert np.asarray(a).dtype == np.asarray(b).dtype and np.shape(a) == np.shape(b), (path, key)
      assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), (path, key)
    # And the bytes mean what docs/formats.md says: codes along K per output channel, W = (v - zero) * scale.
    q = got[path]
    if isinstance(q, QArray):
      zero = None if q.zero is None else np.asarray(q.zero)
      want = numpy_ref.dequantize(codes.T, np.asarray(q.scale), zero, q.k_group, q.n_group)
      np.testing.assert_allclose(np.asarray(q.dequantize()), want, rtol=1e-6)
    elif isinstance(q, BCQArray):
      alpha = np.stack([numpy_ref.expand(a, q.shape, q.k_group, 1) for a in np.asarray(q.alpha, np.float64)])
      want = np.sum(alpha * np.where(codes, 1.0, -1.0).transpose(0, 2, 1), axis=0)
      want += numpy_ref.expand(np.asarray(q.offset, np.float64), q.shape, q.k_group, 1)
      np.testing.assert_allclose(np.asarray(q.dequantize()), want, rtol=1e-6)


def test_todays_writer_writes_the_committed_manifests(tmp_path):
  """The manifest (format, versions, every leaf's type, static fields, shapes, dtypes and sha256) written today
  for the same model equals the committed one, but for the creation time and the library versions."""
  write({1: tmp_path / "v1", 2: tmp_path / "v2"})
  for version, directory in DIRECTORIES.items():
    committed = json.loads((directory / checkpoint.METADATA_FILE).read_text())
    today = json.loads((tmp_path / f"v{version}" / checkpoint.METADATA_FILE).read_text())
    for meta in (committed, today):
      del meta["created"], meta["versions"]
    assert today == committed, version


if __name__ == "__main__":
  write()
  for directory in DIRECTORIES.values():
    print(directory, sum(f.stat().st_size for f in directory.rglob("*") if f.is_file()), "bytes")
