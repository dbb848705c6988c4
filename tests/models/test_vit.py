"""ViT (models.vit) on tiny random weights: shapes, the protocol, refusals of wrongly shaped images; the PNG reader
and the photo crops (images.py); the block-wise harness taking images as samples. The real DINOv2 ViT-S/14 against
onnxruntime is in tests/sources/test_onnx.py."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant import images, recipes
from jaxquant.methods import blockwise, lkd
from jaxquant.models import protocol, vit

TINY = vit.ViTConfig(dim=16, n_layers=2, n_heads=2, ffn_dim=32, patch=4, image_size=16)


def _images(n=4, seed=0):
  return np.random.default_rng(seed).standard_normal((n, 16, 16, 3)).astype(np.float32)


def test_forward_is_embed_then_blocks_then_head():
  model = vit.random_vit(TINY, seed=0)
  assert isinstance(model, protocol.BlockModel) and not model.can_generate and model.input_shape == (16, 16, 3)
  x = jnp.asarray(_images())
  h = model.embed_tokens(x)
  assert h.shape == (4, TINY.n_tokens, 16) and model.block_extras(x, None) == ()
  for block in model.layers:
    h = block(h)
  np.testing.assert_allclose(np.asarray(model.head(h)), np.asarray(model(x)), rtol=1e-6, atol=1e-6)


def test_wrongly_shaped_images_are_refused_with_the_expected_shape():
  model = vit.random_vit(TINY)
  with pytest.raises(ValueError, match=r"channels-first: transpose them to \(B, H, W, C\)"):
    model(jnp.zeros((1, 3, 16, 16)))
  with pytest.raises(ValueError, match=r"images of shape \(batch, 16, 16, 3\).*got shape \(1, 20, 20, 3\)"):
    model(jnp.zeros((1, 20, 20, 3)))
  with pytest.raises(ValueError, match=r"got shape \(1, 16, 16, 1\)"):
    model(jnp.zeros((1, 16, 16, 1)))
  with pytest.raises(images.ImageError, match=r"RGB with channels last .* got shape \(2, 2, 4\)"):
    images.normalize(np.zeros((2, 2, 4)))


def test_png_reader_refusals_and_photo_crops(tmp_path):
  (tmp_path / "x.png").write_bytes(b"GIF89a....")
  with pytest.raises(images.ImageError, match="x.png: not a PNG file"):
    images.read_png(tmp_path / "x.png")
  astronaut = images.photo("astronaut")
  assert astronaut.shape == (512, 512, 3) and astronaut.dtype == np.uint8
  assert astronaut[0, 0].tolist() == [154, 147, 151]  # skimage.data.astronaut()[0, 0]
  assert images.photo("camera").shape == (512, 512, 3)  # gray, replicated
  crops = images.crops(("chelsea",), 3, size=224, seed=0)
  assert crops.shape == (3, 224, 224, 3) and 0.0 <= crops.min() and crops.max() <= 1.0
  np.testing.assert_array_equal(crops, images.crops(("chelsea",), 3, size=224, seed=0))
  assert not set(images.CALIBRATION_PHOTOS) & set(images.EVALUATION_PHOTOS)


def test_block_harness_takes_images_as_samples():
  ids, mask = blockwise.samples_from_batches([_images(3), _images(2, seed=1)], seq_len=8, n_samples=4)
  assert ids.shape == (4, 16, 16, 3) and ids.dtype == np.float32 and mask is None
  with pytest.raises(blockwise.BlockwiseError, match=r"given 2|gives 2 image\(s\) of shape \(16, 16, 3\): give more"):
    blockwise.samples_from_batches([_images(2)], None, None, min_samples=4)
  assert blockwise.random_inputs(vit.random_vit(TINY), 2, 8, 0).shape == (2, 16, 16, 3)
  # token models keep their behaviour
  tokens, _ = blockwise.samples_from_batches([np.arange(24, dtype=np.int64).reshape(2, 12)], seq_len=4, n_samples=None)
  assert tokens.shape == (6, 4) and tokens.dtype == np.int32


@pytest.mark.parametrize("data", ["calibration", "random"])
def test_lkd_distills_an_image_model_on_images_or_random_images(data):
  """LKD on a ViT: calibration images, or standard normal images for data-free "random"; each block ends no
  worse than its round-to-nearest start."""
  model = vit.random_vit(TINY, seed=1)
  recipe = recipes.get_recipe("zeroquant-w48a16-lkd")
  config = lkd.LKDConfig(steps=4, batch_size=4, seq_len=8, n_samples=8, data=data)
  result = lkd.lkd_quantize(model, recipe.rules, [_images(8)] if data == "calibration" else None, config,
                            progress=False)
  assert result.samples == (8, 16, 16, 3) and result.data == data
  assert all(b.status == "rtn-kept" or b.mse_lkd <= b.mse_rtn for b in result.blocks)
  out = np.asarray(result.model(jnp.asarray(_images(2, seed=3))))
  assert out.shape == (2, TINY.n_tokens, 16) and np.isfinite(out).all()
