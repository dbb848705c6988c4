"""The modules of RepQuant's blocks: a norm carrying the folded bias, the reparameterized affine of a post-LN
branch, the fake-quantized linear that reconstruction trains (whose forward value equals the integer linear's),
and a softmax quantizer whose step was calibrated (an array saved with the model); the calibration of that step
and the conversion of a fake-quantized block to its inference form.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxquant.formats import ActQuant, QArray, pack
from jaxquant.methods import blockwise
from jaxquant.models import surgery
from jaxquant.models.layers import Linear, _feature
from jaxquant.quantizers import SoftmaxQuant


class RMSNormWithBias(nnx.Module):
  """x * rsqrt(mean(x^2) + eps) * weight + bias: an RMSNorm carrying RepQuant's folded beta'. weight, bias (dim,)."""

  def __init__(self, weight: jax.Array, bias: jax.Array, eps: float):
    self.weight = nnx.Param(weight)
    self.bias = nnx.Param(bias)
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    variance = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    normalized = x * jax.lax.rsqrt(variance + self.eps)
    return normalized * _feature(self.weight.get_value(), x) + _feature(self.bias.get_value(), x)


class BranchAffine(nnx.Module):
  """x' = x * inv_r1 + shift (x (..., C) a post-LN output): the reparameterized LayerNorm affine for the quantized
  branch only, inv_r1 = 1 / r1, shift = s * r2 / r1 (C,); equal to n * gamma' + beta' of the LayerNorm."""

  def __init__(self, inv_r1: jax.Array, shift: jax.Array):
    self.inv_r1 = nnx.Param(inv_r1)
    self.shift = nnx.Param(shift)

  def __call__(self, x: jax.Array) -> jax.Array:
    return x * _feature(self.inv_r1.get_value(), x) + _feature(self.shift.get_value(), x)


def _ste_round(v: jax.Array) -> jax.Array:
  return v + jax.lax.stop_gradient(jnp.round(v) - v)


class RQLinear(nnx.Module):
  """The fake-quantized form of a RepQuant linear, for reconstruction; its forward value is what the integer
  linear computes (same codes, same scales). kernel (K, N) float (already folded), bias (N,),
  log_scale (N,) learned offsets of the per-channel weight scales w_scale0 (N,), act_scale / act_zero () the
  layer-wise activation quantizer. x (..., K) -> (..., N)."""

  def __init__(self, kernel: jax.Array, bias: jax.Array | None, weight_bits: int, act_scale, act_zero,
               act_bits: int):
    qmax = (1 << (weight_bits - 1)) - 1
    absmax = jnp.max(jnp.abs(kernel), axis=0)
    self.kernel = nnx.Param(kernel)  # latent weights: trained only with RepQuantConfig.recon_weights
    self.w_scale0 = nnx.Variable(jnp.where(absmax > 0, absmax / qmax, 1.0).astype(jnp.float32))
    self.log_scale = nnx.Param(jnp.zeros(kernel.shape[1], jnp.float32))
    self.bias = nnx.Param(jnp.zeros(kernel.shape[1], jnp.float32) if bias is None else bias)
    self.act_scale = nnx.Param(jnp.asarray(act_scale, jnp.float32))  # trained with recon_act_scales
    self.act_zero = nnx.Variable(jnp.asarray(act_zero, jnp.float32))
    self.weight_bits, self.act_bits = weight_bits, act_bits

  def weight_scale(self) -> jax.Array:
    return self.w_scale0.get_value() * jnp.exp(self.log_scale.get_value())

  def weight_codes(self) -> jax.Array:
    """Signed integer weight values (K, N) float32 in [-(2^(b-1) - 1), 2^(b-1) - 1] (straight-through)."""
    qmax = (1 << (self.weight_bits - 1)) - 1
    return jnp.clip(_ste_round(self.kernel.get_value() / self.weight_scale()[None, :]), -qmax, qmax)

  def __call__(self, x: jax.Array) -> jax.Array:
    scale, zero = self.act_scale.get_value(), self.act_zero.get_value()
    levels = float((1 << self.act_bits) - 1)
    codes = jnp.clip(_ste_round(x.astype(jnp.float32) / scale) + zero, 0.0, levels)
    xq = (codes - zero) * scale
    w = self.weight_codes() * self.weight_scale()[None, :]
    y = jnp.dot(xq, w, preferred_element_type=jnp.float32)
    return y + _feature(self.bias.get_value(), y)

  def to_linear(self) -> Linear:
    """The real linear: packed b-bit codes (per-channel symmetric), static asymmetric int activations."""
    qmax = (1 << (self.weight_bits - 1)) - 1
    kernel = self.kernel.get_value()
    scale = self.weight_scale()
    values = jnp.clip(jnp.round(kernel / scale[None, :]), -qmax, qmax).astype(jnp.int32)
    activation = ActQuant(bits=self.act_bits, mode="tensor", scale=self.act_scale.get_value(),
                          zero=self.act_zero.get_value())
    qarray = QArray(packed=pack(values.T, self.weight_bits), scale=scale[None, :], zero=None,
                    activation=activation, shape=tuple(int(d) for d in kernel.shape), bits=self.weight_bits,
                    k_group=int(kernel.shape[0]), n_group=1)
    return Linear(qarray, self.bias.get_value())


class CalibratedSoftmax(nnx.Module):
  """quantizers.SoftmaxQuant with its step a calibrated scalar (saved with the model) instead of a static 1: the
  attention's probs_quant. P is quantized as P / scale with step 1 and P^ @ V multiplied by scale, which is exactly
  `quant` with step `scale` (the log forms' codes are round(-2 log2(P / scale))): probabilities above `scale` take
  the top level, and the smallest level moves down with it. quant: the static quantizer (its own scale unused);
  scale: () float32."""

  def __init__(self, quant: SoftmaxQuant, scale):
    self.quant = dataclasses.replace(quant, scale=None)
    self.scale = nnx.Param(jnp.asarray(scale, jnp.float32))

  @property
  def form(self) -> str:
    return self.quant.form

  @property
  def bits(self) -> int:
    return self.quant.bits

  def attend(self, probs: jax.Array, v: jax.Array, spec: str) -> jax.Array:
    scale = self.scale.get_value()
    return scale * self.quant.attend(probs / scale, v, spec)


SOFTMAX_STEPS = 12  # calibrate_softmax tries steps sqrt2^0 .. sqrt2^-12 = 1 .. 1/64


def calibrate_softmax(fake: nnx.Module, x, y, extra, chunk: int) -> tuple[float, float]:
  """Set fake.attn.probs_quant to the CalibratedSoftmax whose step sqrt2^-k (k = 0..SOFTMAX_STEPS) gives the
  smallest block output MSE on (x, y). A b-bit log quantizer spans only sqrt2^-(2^b - 2) below its step (2^-7 at
  4 bits), below the 1 / T of diffuse attention over T tokens; a lower step keeps those probabilities and clips
  the few above it. Returns (step, MSE)."""
  quant = fake.attn.probs_quant
  best = (1.0, math.inf)
  for k in range(SOFTMAX_STEPS + 1):
    step = math.sqrt(2.0) ** -k
    fake.attn.probs_quant = nnx.data(CalibratedSoftmax(quant, step))  # a sub-module: its step is saved
    mse = blockwise.block_mse(fake, x, y, extra, chunk)
    if mse < best[1]:
      best = (step, mse)
  fake.attn.probs_quant = nnx.data(CalibratedSoftmax(quant, best[0]))
  return best


def to_real_block(fake: nnx.Module) -> nnx.Module:
  """The inference block: RQLinears become packed integer Linears, the softmax quantizer its log2 form."""
  real = surgery.replace(fake, lambda path, linear: linear.to_linear(), RQLinear)
  sq = real.attn.probs_quant
  if isinstance(sq, CalibratedSoftmax):
    if sq.form == "log_sqrt2":
      sq.quant = dataclasses.replace(sq.quant, form="log2")
  elif sq is not None and sq.form == "log_sqrt2":
    real.attn.probs_quant = dataclasses.replace(sq, form="log2")
  return real
