"""Quantized models on a device mesh: layouts (partition rules), shardings for QArray / BCQArray leaves, and
quantization that places each weight config's quantizer output straight onto the mesh.

Everything here is JAX's own SPMD machinery (`jax.sharding.Mesh`, `NamedSharding`, `jax.jit` with
`out_shardings`, `jax.shard_map`); on several hosts the same code runs after `jax.distributed.initialize()`
with a mesh over `jax.devices()` (all hosts' devices).

A float (K, N) kernel is split by a PartitionSpec (k_axis, n_axis) (either may be None). Its quantized form is
split along the same axes, field by field:

  QArray    packed (N, packed_len(K))        (n_axis, k_axis)
            scale, zero (groups_k, groups_n)  (k_axis if groups_k > 1, n_axis if groups_n > 1); a single group
                                              along an axis is replicated along it
            activation.scale ()               replicated
  BCQArray  planes (q, N, ceil(K/8))          (None, n_axis, k_axis)
            alpha (q, groups_k, N)            (None, k_axis if groups_k > 1, n_axis)
            offset (groups_k, N)              (k_axis if groups_k > 1, n_axis)

So each device holds whole packed bytes and whole groups: a K split must put a multiple of 8 rows on each
device when codes are packed below 8 bits (8 codes share `bits` bytes) and a multiple of k_group when there are
several K-groups; an N split a multiple of n_group. Anything else raises ShardingError naming the parameter,
the mesh axis, the sizes and the fix.

Layouts (PartitionRules, first match wins, unmatched leaves replicated):
  TENSOR_PARALLEL  Megatron style: q/k/v/gate/up column-parallel (N split), o/down row-parallel (K split);
                   the embedding table split over the vocabulary and lm_head over its output (vocabulary) columns
  COLUMN_PARALLEL  every block linear N split: works with any K grouping (no K-group constraint)
Data parallelism: token batches split over a "data" axis (`shard_batch`); the weights are replicated on it.

Running: under jax.jit a model from `shard_model` runs ops.qdot's XLA path SPMD (XLA inserts the collectives);
`use_sharded_kernels` swaps its Linear layers for ShardedKernelLinear, whose quantized matmuls run the Pallas
kernels on each device's shard (ops.sharded_qdot, given the weight's shardings from here).
Checkpoints restore onto a mesh with checkpoint.restore(..., shardings=leaf_shardings(mesh, rules)).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from jaxquant import ops
from jaxquant.formats import ActQuant, BCQArray, QArray, is_qarray
from jaxquant.mesh_axes import ShardingError, axis_size
from jaxquant.models import surgery
from jaxquant.models.layers import Linear
from jaxquant.rules import Rule, match, path_str

MODEL_AXIS = "model"
DATA_AXIS = "data"


@dataclasses.dataclass(frozen=True)
class PartitionRule:
  """Leaves whose path matches `pattern` (re.search) are split by `spec` (one mesh axis name or None per dim)."""

  pattern: str
  spec: tuple

  def __post_init__(self):
    re.compile(self.pattern)


_COLUMN = (
    # Vocabulary-parallel embedding and head: replicated they would be the largest arrays on every device.
    PartitionRule(r"(^|\.)embed\.embedding$", (MODEL_AXIS, None)),
    PartitionRule(r"(^|\.)lm_head\.kernel$", (None, MODEL_AXIS)),
    PartitionRule(r"(^|\.)layers\.\d+\.attn\.(q|k|v)_proj\.kernel$", (None, MODEL_AXIS)),
    PartitionRule(r"(^|\.)layers\.\d+\.attn\.(q|k|v)_proj\.bias$", (MODEL_AXIS,)),
    PartitionRule(r"(^|\.)layers\.\d+\.mlp\.(gate|up)_proj\.kernel$", (None, MODEL_AXIS)),
    PartitionRule(r"(^|\.)layers\.\d+\.mlp\.(gate|up)_proj\.bias$", (MODEL_AXIS,)),
)
# Row-parallel o/down: their inputs arrive already split by the column-parallel layers before them, so a block
# needs one all-reduce after attention and one after the MLP (XLA inserts them; the kernel path psums).
TENSOR_PARALLEL = _COLUMN + (
    PartitionRule(r"(^|\.)layers\.\d+\.attn\.o_proj\.kernel$", (MODEL_AXIS, None)),
    PartitionRule(r"(^|\.)layers\.\d+\.mlp\.down_proj\.kernel$", (MODEL_AXIS, None)),
)
COLUMN_PARALLEL = _COLUMN + (
    PartitionRule(r"(^|\.)layers\.\d+\.attn\.o_proj\.kernel$", (None, MODEL_AXIS)),
    PartitionRule(r"(^|\.)layers\.\d+\.attn\.o_proj\.bias$", (MODEL_AXIS,)),
    PartitionRule(r"(^|\.)layers\.\d+\.mlp\.down_proj\.kernel$", (None, MODEL_AXIS)),
    PartitionRule(r"(^|\.)layers\.\d+\.mlp\.down_proj\.bias$", (MODEL_AXIS,)),
)
LAYOUTS = {"tensor": TENSOR_PARALLEL, "column": COLUMN_PARALLEL, "replicated": ()}


def make_mesh(model: int = 1, data: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
  """A (data, model) mesh over the first data*model devices (default: jax.devices())."""
  devices = list(jax.devices() if devices is None else devices)
  if model < 1 or data < 1 or model * data > len(devices):
    raise ShardingError(f"a mesh of data={data} x model={model} needs {model * data} devices; "
                        f"{len(devices)} are available ({devices[0].platform}). On CPU, simulate more with "
                        f"jax.config.update('jax_num_cpu_devices', N) before jax starts")
  # Auto axes: GSPMD propagates shardings through unannotated code (the model and quantizers stay mesh-agnostic).
  return jax.make_mesh((data, model), (DATA_AXIS, MODEL_AXIS), axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=devices[:model * data])


def partition_spec(path: str, rules: Sequence[PartitionRule], ndim: int) -> tuple:
  """The float parameter's spec (a tuple of length ndim) from the first matching rule; replicated otherwise."""
  for rule in rules:
    if re.search(rule.pattern, path):
      if len(rule.spec) != ndim:
        raise ShardingError(f"parameter {path}: partition rule {rule.pattern!r} gives {len(rule.spec)} axes "
                            f"{rule.spec} for a {ndim}-D parameter")
      return tuple(rule.spec)
  return (None,) * ndim


def _check_split(path: str, what: str, size: int, entry, mesh: Mesh, multiple: int = 1, why: str = "",
                 fix: str = "") -> int:
  """Devices along `entry`; raise unless they split `size` into equal shards that are multiples of `multiple`."""
  devices = axis_size(mesh, entry)
  if devices == 1:
    return 1
  if size % devices:
    raise ShardingError(f"parameter {path}: mesh axis {entry!r} of size {devices} does not divide {what}={size}; "
                        f"use an axis size that divides {size}, or replicate this dimension "
                        f"(a partition rule with None there)")
  shard = size // devices
  if shard % multiple:
    raise ShardingError(f"parameter {path}: mesh axis {entry!r} of size {devices} splits {what}={size} into "
                        f"shards of {shard}, not a multiple of {multiple} ({why}); {fix}")
  return devices


def format_shardings(leaf, spec: tuple, mesh: Mesh, path: str = "<unnamed>"):
  """NamedShardings for `leaf` (array, QArray or BCQArray; concrete or abstract) whose float parameter is split
  by `spec`: a pytree of the leaf's structure (an array's sharding for an array)."""
  named = lambda *entries: NamedSharding(mesh, P(*entries))
  if isinstance(leaf, QArray):
    k_entry, n_entry = _pad(spec, 2, path)
    k, n = leaf.shape
    groups_k, groups_n = leaf.scale.shape
    multiple, reasons = 1, []
    if leaf.bits < 8:
      multiple, reasons = 8, [f"{leaf.bits}-bit codes are packed 8 rows to {leaf.bits} bytes"]
    if groups_k > 1:
      multiple = math.lcm(multiple, leaf.k_group)
      reasons.append(f"k_group={leaf.k_group} rows share a scale")
    _check_split(path, "K (input features)", k, k_entry, mesh, multiple, " and ".join(reasons),
                 _fix_k(multiple, k_entry))
    if groups_n > 1:
      _check_split(path, "N (output features)", n, n_entry, mesh, leaf.n_group,
                   f"n_group={leaf.n_group} columns share a scale",
                   f"use an axis size giving shards of a multiple of {leaf.n_group} columns")
    else:
      _check_split(path, "N (output features)", n, n_entry, mesh)
    group_entries = (k_entry if groups_k > 1 else None, n_entry if groups_n > 1 else None)
    activation = leaf.activation
    if activation is not None:
      activation = dataclasses.replace(activation, scale=None if activation.scale is None else named())
    return dataclasses.replace(
        leaf, packed=named(n_entry, k_entry), scale=named(*group_entries),
        zero=None if leaf.zero is None else named(*group_entries), activation=activation)
  if isinstance(leaf, BCQArray):
    k_entry, n_entry = _pad(spec, 2, path)
    k, n = leaf.shape
    groups_k = leaf.alpha.shape[1]
    multiple = 8 if groups_k == 1 else math.lcm(8, leaf.k_group)
    why = "binary planes are packed 8 rows a byte" + (f" and k_group={leaf.k_group} rows share alphas"
                                                      if groups_k > 1 else "")
    _check_split(path, "K (input features)", k, k_entry, mesh, multiple, why, _fix_k(multiple, k_entry))
    _check_split(path, "N (output features)", n, n_entry, mesh)
    group_k = k_entry if groups_k > 1 else None
    return dataclasses.replace(
        leaf, planes=named(None, n_entry, k_entry), alpha=named(None, group_k, n_entry),
        offset=None if leaf.offset is None else named(group_k, n_entry))
  shape = tuple(np.shape(leaf))
  spec = _pad(spec, len(shape), path)
  for dim, (size, entry) in enumerate(zip(shape, spec)):
    _check_split(path, f"dimension {dim}", size, entry, mesh)
  return named(*spec)


def _fix_k(multiple: int, entry) -> str:
  return (f"use a mesh axis {entry!r} whose size gives shards of a multiple of {multiple} rows, a group size "
          f"dividing the shard, or split this parameter on N instead (sharding.COLUMN_PARALLEL)")


def _pad(spec: tuple, ndim: int, path: str) -> tuple:
  spec = tuple(spec)
  if len(spec) > ndim:
    raise ShardingError(f"parameter {path}: spec {spec} has more entries than its {ndim} dimensions")
  return spec + (None,) * (ndim - len(spec))


def leaf_shardings(mesh: Mesh, rules: Sequence[PartitionRule] = TENSOR_PARALLEL):
  """The function (path, leaf) -> the leaf's NamedShardings (format_shardings of its partition rule's spec), for a
  leaf that is an array, QArray or BCQArray, concrete or abstract (e.g. checkpoint.restore's `shardings`)."""
  def shardings(path: str, leaf):
    return format_shardings(leaf, partition_spec(path, rules, 2 if is_qarray(leaf) else np.ndim(leaf)), mesh, path)

  return shardings


def state_shardings(state, mesh: Mesh, rules: Sequence[PartitionRule] = TENSOR_PARALLEL):
  """A pytree like `state` (an nnx.State or any pytree of arrays / QArrays) holding each leaf's NamedShardings."""
  shardings = leaf_shardings(mesh, rules)
  return jax.tree_util.tree_map_with_path(lambda key_path, leaf: shardings(path_str(key_path), leaf), state,
                                          is_leaf=is_qarray)


def shard_state(state, mesh: Mesh, rules: Sequence[PartitionRule] = TENSOR_PARALLEL):
  """`state` with every leaf placed on the mesh (QArray fields split consistently with their float spec)."""
  return jax.device_put(state, state_shardings(state, mesh, rules))


def shard_model(model: nnx.Module, mesh: Mesh, rules: Sequence[PartitionRule] = TENSOR_PARALLEL) -> nnx.Module:
  """A copy of `model` whose parameters (float or quantized) live on the mesh. Its forward pass runs SPMD under
  jax.jit (XLA inserts the collectives)."""
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, shard_state(state, mesh, rules))


def shard_batch(batch, mesh: Mesh, axis: str = DATA_AXIS) -> jax.Array:
  """Token batch (B, ...) split over `axis` along B (data parallelism); replicated over the other mesh axes."""
  batch = np.asarray(batch) if not isinstance(batch, jax.Array) else batch
  devices = axis_size(mesh, axis)
  if batch.shape[0] % devices:
    raise ShardingError(f"batch of {batch.shape[0]} sequences cannot be split over mesh axis {axis!r} of size "
                        f"{devices}; use a batch size that is a multiple of {devices}")
  return jax.device_put(batch, NamedSharding(mesh, P(axis, *(None,) * (batch.ndim - 1))))


# ----------------------------------------------------------------------------------------------------------------
# sharded quantization


@functools.lru_cache(maxsize=512)
def _abstract_output(quantizer, shape: tuple, dtype, activation_key):
  """The stored format's structure and shapes for a (shape, dtype) weight (cached: traced once per shape)."""
  activation = None
  if activation_key is not None:
    bits, mode, has_scale = activation_key
    activation = ActQuant(bits=bits, mode=mode, scale=jax.ShapeDtypeStruct((), jnp.float32) if has_scale else None)
  return jax.eval_shape(quantizer, jax.ShapeDtypeStruct(shape, dtype), activation)


@functools.lru_cache(maxsize=512)
def _jitted(quantizer, out_shardings):
  """jax.jit of a weight config's quantizer with its output placed by `out_shardings` (cached: compiled once per
  quantizer, shape and layout, so a deep model's identical blocks reuse one executable)."""
  return jax.jit(quantizer, out_shardings=out_shardings)


def quantize_leaf(w, rule: Rule, path: str, mesh: Mesh, spec: tuple, activation: ActQuant | None = None):
  """Quantize one float (K, N) parameter on the mesh: the float weight is split by `spec`, the weight config's
  quantizer runs under jax.jit with out_shardings = format_shardings(...), so each device computes and keeps its
  own shard. The config's checks run before and after, as in its quantize()."""
  w = jax.device_put(w, format_shardings(w, spec, mesh, path))
  config = rule.weight
  config.check(w, path, activation)
  quantizer = config.quantizer(path)
  activation_key = None if activation is None else (activation.bits, activation.mode, activation.scale is not None)
  abstract = _abstract_output(quantizer, tuple(w.shape), w.dtype, activation_key)
  out = format_shardings(abstract, spec, mesh, path)  # raises before any work when the split is impossible
  result = _jitted(quantizer, out)(w, activation)
  config.check_quantized(result, w, path)
  return result


def quantize_tree_sharded(tree, rules: Sequence[Rule], mesh: Mesh,
                          partition_rules: Sequence[PartitionRule] = TENSOR_PARALLEL,
                          act_absmax: Mapping[str, float] | None = None, progress: bool = True):
  """rules.quantize_tree on a mesh: every leaf (quantized or not) ends up split by its partition rule; matching
  float kernels are quantized shard by shard (see quantize_leaf). Leaf by leaf, so at most one float weight
  besides the outputs is alive at a time."""
  leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_qarray)
  todo = {path_str(p) for p, leaf in leaves if not is_qarray(leaf) and match(rules, path_str(p))}
  bar = tqdm(total=len(todo), desc="quantize (sharded)", unit="w", disable=not progress or not todo, leave=False)

  def convert(key_path, leaf):
    path = path_str(key_path)
    spec = partition_spec(path, partition_rules, 2 if is_qarray(leaf) else np.ndim(leaf))
    if path not in todo:
      return jax.device_put(leaf, format_shardings(leaf, spec, mesh, path))
    rule = match(rules, path)
    result = quantize_leaf(leaf, rule, path, mesh, spec, rule.activation_quant(path, act_absmax))
    bar.update(1)
    return result

  try:
    return jax.tree_util.tree_map_with_path(convert, tree, is_leaf=is_qarray)
  finally:
    bar.close()


def quantize_model_sharded(model: nnx.Module, rules: Sequence[Rule], mesh: Mesh,
                           partition_rules: Sequence[PartitionRule] = TENSOR_PARALLEL,
                           act_absmax: Mapping[str, float] | None = None, progress: bool = True) -> nnx.Module:
  """pipeline.quantize_model for rule recipes, on a mesh: a new model whose parameters are split over it."""
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, quantize_tree_sharded(state, rules, mesh, partition_rules, act_absmax, progress))


# ----------------------------------------------------------------------------------------------------------------
# Linear layers running the kernels per shard


class ShardedKernelLinear(Linear):
  """A Linear whose quantized kernel runs through ops.sharded_qdot on `mesh` (the Pallas kernels per shard), its
  weight split by `spec`; float kernels and a missing mesh take ops.qdot as usual. x: (..., K) -> (..., N)."""

  mesh: Mesh | None = None
  spec: tuple = (None, None)
  batch_axis: str | None = None
  path: str = "<weight>"

  def __call__(self, x: jax.Array) -> jax.Array:
    w = self.kernel.get_value()
    if self.mesh is None or not is_qarray(w):
      return super().__call__(x)
    y = ops.sharded_qdot(x, w, format_shardings(w, self.spec, self.mesh, self.path), self.spec,
                         batch_axis=self.batch_axis, backend=self.backend, path=self.path)
    if self.bias is not None:
      y = y + jnp.reshape(self.bias.get_value().astype(y.dtype), (1,) * (y.ndim - 1) + (-1,))
    return y


def use_sharded_kernels(model: nnx.Module, mesh: Mesh, rules: Sequence[PartitionRule] = TENSOR_PARALLEL,
                        backend: str = "auto", batch_axis: str | None = None) -> nnx.Module:
  """A copy of a quantized model placed on the mesh whose Linear layers run the Pallas kernels per shard
  (ShardedKernelLinear; backend "interpret" on CPU, "pallas" on GPU). Same parameters, same state paths."""
  ops.resolve_backend(backend)

  def sharded(module_path: str, linear: Linear) -> ShardedKernelLinear:
    path = f"{module_path}.kernel"
    replacement = ShardedKernelLinear(linear.kernel.get_value(),
                                      None if linear.bias is None else linear.bias.get_value())
    replacement.backend = backend
    replacement.mesh, replacement.batch_axis, replacement.path = mesh, batch_axis, path
    replacement.spec = partition_spec(path, rules, 2)
    return replacement

  return surgery.replace_linears(shard_model(model, mesh, rules), lambda path: True, sharded)
