"""Small NNX layers shared by the model families.

Every matmul against a weight goes through `Linear`, and `Linear` goes through `ops.qdot`: that is the one
bridge between models and quantized arithmetic. A quantizer replaces `Linear.kernel.value` (a float array of
shape (in_features, out_features)) by a `formats.QArray`; the module code does not change.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxquant import ops


class Linear(nnx.Module):
  """y = x @ kernel (+ bias).

  kernel: (in_features, out_features), float32 or a QArray of that logical shape.
  bias:   (out_features,) float32, or None.
  x: (..., in_features) -> y: (..., out_features), float32.
  """

  # How quantized matmuls run (ops.BACKENDS); static, so changing it makes jit trace again.
  backend: str = "auto"

  def __init__(self, kernel: jax.Array, bias: jax.Array | None = None):
    self.kernel = nnx.Param(kernel)
    self.bias = nnx.Param(bias) if bias is not None else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = ops.qdot(x, self.kernel.get_value(), backend=self.backend)
    if self.bias is not None:
      y = y + _feature(self.bias.get_value().astype(y.dtype), y)
    return y


def _feature(v: jax.Array, like: jax.Array) -> jax.Array:
  """A (D,) parameter shaped (1, ..., 1, D) to broadcast against `like` without implicit rank promotion."""
  return jnp.reshape(v, (1,) * (like.ndim - 1) + (-1,))


class RMSNorm(nnx.Module):
  """x * rsqrt(mean(x^2) + eps) * weight. weight: (dim,)."""

  def __init__(self, weight: jax.Array, eps: float):
    self.weight = nnx.Param(weight)
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    variance = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(variance + self.eps) * _feature(self.weight.get_value(), x)


class LayerNorm(nnx.Module):
  """(x - mean) / sqrt(var + eps) * weight + bias. weight, bias: (dim,)."""

  def __init__(self, weight: jax.Array, bias: jax.Array, eps: float):
    self.weight = nnx.Param(weight)
    self.bias = nnx.Param(bias)
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    mean = jnp.mean(x, axis=-1, keepdims=True)
    variance = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    normalized = (x - mean) * jax.lax.rsqrt(variance + self.eps)
    return normalized * _feature(self.weight.get_value(), x) + _feature(self.bias.get_value(), x)
