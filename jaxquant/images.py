"""Images for the vision models: a PNG decoder (numpy + zlib; no imaging library), the sample photos' calibration
and evaluation crops, ImageNet normalization, and ONNX-Resize-style resampling matrices.

Photos come from assets (skimage.data's PNGs). The calibration and evaluation photos are disjoint sets
(CALIBRATION_PHOTOS, EVALUATION_PHOTOS): no evaluation pixel is ever seen while calibrating. A crop is a square
window of the photo resampled to the model's size (bilinear, half-pixel centres); `crops` draws them from a seed.
Model input: (N, S, S, 3) float32, channels last, normalized with the ImageNet mean and standard deviation.
"""

from __future__ import annotations

import math
import os
import struct
import zlib

import numpy as np

from jaxquant import assets

CALIBRATION_PHOTOS = ("astronaut", "coffee", "ihc", "brick", "gravel", "grass")
EVALUATION_PHOTOS = ("chelsea", "motorcycle_left", "motorcycle_right", "camera", "coins", "horse")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


class ImageError(ValueError):
  """An image this module cannot read or use; the message names the file or array and what was expected."""


# ----------------------------------------------------------------------------------------------------------------
# PNG


_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # PNG colour type -> samples per pixel (gray, RGB, gray+alpha, RGBA)


def _paeth(a: int, b: int, c: int) -> int:
  p = a + b - c
  pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
  return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def _unfilter(raw: bytes, height: int, stride: int, bpp: int, where: str) -> np.ndarray:
  """Undo the per-row PNG filters: (height, stride) uint8."""
  out = np.zeros((height, stride), np.uint8)
  prior = np.zeros(stride, np.int64)
  pos = 0
  for y in range(height):
    kind, line = raw[pos], np.frombuffer(raw, np.uint8, stride, pos + 1).astype(np.int64)
    pos += stride + 1
    if kind == 0:
      row = line
    elif kind == 1:  # Sub: a running sum along each channel
      row = np.cumsum(line.reshape(-1, bpp), axis=0).reshape(-1) % 256
    elif kind == 2:
      row = (line + prior) % 256
    elif kind in (3, 4):  # Average, Paeth: each byte depends on its decoded left neighbour
      row, up, cur = line.tolist(), prior.tolist(), [0] * stride
      for x in range(stride):
        left = cur[x - bpp] if x >= bpp else 0
        corner = up[x - bpp] if x >= bpp else 0
        pred = (left + up[x]) // 2 if kind == 3 else _paeth(left, up[x], corner)
        cur[x] = (row[x] + pred) & 255
      row = np.array(cur, np.int64)
    else:
      raise ImageError(f"{where}: row {y} has PNG filter type {kind} (0..4 expected): a corrupt file")
    out[y] = row
    prior = row
  return out


def read_png(path: str | os.PathLike) -> np.ndarray:
  """An 8-bit, non-interlaced PNG as (H, W, 3) uint8 RGB (gray replicated, alpha dropped)."""
  data = open(path, "rb").read()
  if data[:8] != b"\x89PNG\r\n\x1a\n":
    raise ImageError(f"{path}: not a PNG file")
  pos, header, chunks = 8, None, []
  while pos < len(data):
    length, kind = struct.unpack(">I4s", data[pos:pos + 8])
    body = data[pos + 8:pos + 8 + length]
    pos += 12 + length
    if kind == b"IHDR":
      header = struct.unpack(">IIBBBBB", body)
    elif kind == b"IDAT":
      chunks.append(body)
    elif kind == b"IEND":
      break
  if header is None:
    raise ImageError(f"{path}: PNG without an IHDR header")
  width, height, depth, colour, _, _, interlace = header
  if depth != 8 or colour not in _CHANNELS or interlace:
    raise ImageError(f"{path}: PNG with bit depth {depth}, colour type {colour}, interlace {interlace}; this "
                     "reader handles 8-bit gray/RGB/gray+alpha/RGBA, not interlaced")
  channels = _CHANNELS[colour]
  pixels = _unfilter(zlib.decompress(b"".join(chunks)), height, width * channels, channels, str(path))
  pixels = pixels.reshape(height, width, channels)
  if channels <= 2:
    return np.repeat(pixels[..., :1], 3, axis=-1)
  return np.ascontiguousarray(pixels[..., :3])


def photo(name: str) -> np.ndarray:
  """A sample photo (assets.PHOTOS) as (H, W, 3) uint8 RGB."""
  return read_png(assets.photo_path(name))


# ----------------------------------------------------------------------------------------------------------------
# resampling, crops, normalization


def resize_matrix(n_in: int, n_out: int, mode: str, cubic_a: float = -0.75) -> np.ndarray:
  """(n_out, n_in) float64: ONNX Resize along one axis with half-pixel centres and clamped edges (as PyTorch's
  interpolate without antialiasing); mode "cubic" (Keys kernel, coefficient a) or "linear". out = M @ in."""
  def keys(d):
    if d <= 1:
      return ((cubic_a + 2) * d - (cubic_a + 3)) * d * d + 1
    return ((cubic_a * d - 5 * cubic_a) * d + 8 * cubic_a) * d - 4 * cubic_a

  m = np.zeros((n_out, n_in))
  for i in range(n_out):
    x = (i + 0.5) * n_in / n_out - 0.5
    base = math.floor(x)
    t = x - base
    if mode == "cubic":
      weights = {-1: keys(t + 1), 0: keys(t), 1: keys(1 - t), 2: keys(2 - t)}
    elif mode == "linear":
      weights = {0: 1 - t, 1: t}
    else:
      raise ValueError(f"resize mode must be 'cubic' or 'linear', got {mode!r}")
    for offset, w in weights.items():
      m[i, min(max(base + offset, 0), n_in - 1)] += w
  return m


def crop(image: np.ndarray, top: int, left: int, side: int, size: int) -> np.ndarray:
  """The square window image[top:top+side, left:left+side] resampled (bilinear) to (size, size, 3) float32 in
  [0, 1]."""
  window = image[top:top + side, left:left + side].astype(np.float64) / 255.0
  if side == size:
    return window.astype(np.float32)
  r = resize_matrix(side, size, "linear")
  return np.einsum("ih,hwc,jw->ijc", r, window, r, optimize=True).astype(np.float32)


def crops(names: tuple[str, ...], n: int, size: int = 224, seed: int = 0) -> np.ndarray:
  """n crops (n, size, size, 3) float32 in [0, 1], spread evenly over the photos `names`: each a square window of
  side uniform in [size, the photo's shorter side] at a uniform position, from the seed."""
  rng = np.random.default_rng([seed, 7])
  images = [photo(name) for name in names]
  for name, image in zip(names, images):
    if min(image.shape[:2]) < size:
      raise ImageError(f"photo {name!r} is {image.shape[1]} x {image.shape[0]}, smaller than a {size}-pixel crop")
  out = []
  for j in range(n):
    image = images[j % len(images)]
    h, w = image.shape[:2]
    side = int(rng.integers(size, min(h, w) + 1))
    out.append(crop(image, int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1)), side, size))
  return np.stack(out)


def normalize(pixels: np.ndarray) -> np.ndarray:
  """RGB in [0, 1] (..., 3) -> the model's input: (pixels - ImageNet mean) / ImageNet std, float32."""
  pixels = np.asarray(pixels, np.float32)
  if pixels.shape[-1] != 3:
    raise ImageError(f"images must be RGB with channels last (..., 3); got shape {pixels.shape}")
  return (pixels - IMAGENET_MEAN) / IMAGENET_STD


def calibration_images(n: int, size: int = 224, seed: int = 0) -> np.ndarray:
  """n normalized crops of the calibration photos (never of an evaluation photo)."""
  return normalize(crops(CALIBRATION_PHOTOS, n, size, seed))


def evaluation_images(n: int, size: int = 224, seed: int = 1) -> np.ndarray:
  """n normalized crops of the evaluation photos (never of a calibration photo)."""
  return normalize(crops(EVALUATION_PHOTOS, n, size, seed))
