"""RepQuant's array math (after RepQ-ViT): per-channel dual clipping, scale reparameterization, fake-quant.

Notation (DESIGN.md). A post-norm activation x (..., C) gets per-channel bounds [lo_c, hi_c] and b-bit asymmetric
parameters s_c = (hi_c - lo_c) / (2^b - 1), z_c = round(-lo_c / s_c); its codes are
u = clip(round(x / s_c) + z_c, 0, 2^b - 1). Reparameterization to one layer-wise pair (s~, z~):

  s~ = mean_c(s_c), z~ = round(mean_c(z_c)), r1 = s / s~, r2 = z - z~ (integers);
  norm:   gamma' = gamma / r1, beta' = (beta + s * r2) / r1          (x' = (x + s * r2) / r1)
  linear: kernel'[c, :] = kernel[c, :] * r1_c, bias' = bias - (s * r2) @ kernel

so that x' / s~ = x / s_c + r2_c and round(x' / s~) + z~ = round(x / s_c) + z_c: the same integer codes with one
scale, and x' @ kernel' + bias' = x @ kernel + bias: the float model is unchanged.
Everything here is pure and traceable except the `check_*` functions, which raise on bad input.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax


class RepQuantError(ValueError):
  """Bad input to RepQuant: the message names what, where, and the fix."""


def levels(bits: int) -> float:
  return float((1 << bits) - 1)


def _channels(v: jax.Array, like: jax.Array) -> jax.Array:
  """A () or (C,) parameter shaped to broadcast against like (..., C) without implicit rank promotion."""
  v = jnp.asarray(v)
  return v if v.ndim == 0 else jnp.reshape(v, (1,) * (like.ndim - 1) + (-1,))


def check_finite_activations(x, where: str) -> None:
  """Raise naming `where` when calibration activations hold NaN/Inf (they would poison every bound)."""
  array = np.asarray(x)
  bad = ~np.isfinite(array)
  if bad.any():
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    raise RepQuantError(
        f"calibration activations at {where} hold {int(bad.sum())} NaN/Inf value(s) (first at index {first}); "
        "RepQuant cannot calibrate on them: check the float model (e.g. a checkpoint that does not load cleanly) "
        "or the calibration tokens")


def check_bounds(lo, hi, where: str) -> None:
  """Raise when clipping bounds cross (lo > hi) or are not finite, naming the channels."""
  lo, hi = np.asarray(lo), np.asarray(hi)
  if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
    raise RepQuantError(f"clipping bounds at {where} are not finite: recalibrate (lower the learning rate)")
  crossed = np.flatnonzero(np.reshape(lo > hi, -1))
  if crossed.size:
    c = int(crossed[0])
    raise RepQuantError(
        f"clipping bounds at {where} cross in {crossed.size} channel(s) (first: channel {c}, lower "
        f"{float(np.reshape(lo, -1)[c]):.6g} > upper {float(np.reshape(hi, -1)[c]):.6g}); a lower bound must not "
        "exceed its upper bound: recalibrate with a smaller learning rate or fewer steps")


def channel_qparams(lo: jax.Array, hi: jax.Array, bits: int) -> tuple[jax.Array, jax.Array]:
  """Per-channel (scale, zero) from bounds lo, hi (C,) (or () for one layer-wise pair).

  The grid must hold 0 exactly (zero is an integer code), so the range is widened to [min(lo, 0), max(hi, 0)].
  A channel of zero range (constantly 0 after widening) codes exactly with any scale: it gets the mean scale of
  the other channels (r1 = 1 there after reparameterization, no division by 0, no pull on s~), or 1 when every
  channel is degenerate. Bounds that cross are the caller's error: see check_bounds.
  """
  lo = jnp.minimum(lo.astype(jnp.float32), 0.0)
  hi = jnp.maximum(hi.astype(jnp.float32), 0.0)
  span = hi - lo
  live = span > 0
  n_live = jnp.maximum(jnp.sum(live.astype(jnp.float32)), 1.0)
  typical = jnp.sum(jnp.where(live, span, 0.0)) / n_live / levels(bits)
  scale = jnp.where(live, span / levels(bits), jnp.where(typical > 0, typical, jnp.float32(1.0)))
  zero = jnp.clip(jnp.round(-lo / scale), 0.0, levels(bits))
  return scale, zero


def channel_codes(x: jax.Array, scale: jax.Array, zero: jax.Array, bits: int) -> jax.Array:
  """Unsigned codes (float32, integer values) of x (..., C) with per-channel (or layer-wise) scale, zero."""
  return jnp.clip(jnp.round(x.astype(jnp.float32) / _channels(scale, x)) + _channels(zero, x), 0.0, levels(bits))


def fake_quant_bounds(x: jax.Array, lo: jax.Array, hi: jax.Array, bits: int) -> jax.Array:
  """Quantize-dequantize of x (..., C) with learnable bounds lo, hi (C,) or (): the forward value is exactly the
  deployed quantizer's (integer zero point, clipped codes); gradients reach lo and hi through the scale and the
  clipping (LSQ-style straight-through rounding)."""
  lo = _channels(jnp.minimum(lo, 0.0), x)
  hi = _channels(jnp.maximum(hi, 0.0), x)
  scale = jnp.maximum(hi - lo, 1e-8) / levels(bits)
  ste = lambda v: v + jax.lax.stop_gradient(jnp.round(v) - v)
  zero = ste(-lo / scale)
  q = jnp.clip(ste(x / scale) + zero, 0.0, levels(bits))
  return (q - zero) * scale


def layerwise_qparams(scale: jax.Array, zero: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(s~, z~): the mean scale and the rounded mean zero point of per-channel (C,) parameters."""
  return jnp.mean(scale), jnp.round(jnp.mean(zero))


def reparam_factors(scale, zero, layer_scale, layer_zero) -> tuple[jax.Array, jax.Array]:
  """r1 = s / s~ (C,) and r2 = z - z~ (C,) (integers)."""
  return scale / layer_scale, zero - layer_zero


def fold_norm(gamma: jax.Array, beta: jax.Array | None, scale, r1, r2) -> tuple[jax.Array, jax.Array]:
  """gamma' = gamma / r1, beta' = (beta + s * r2) / r1; beta None (RMSNorm) counts as 0 and gives a beta'."""
  beta = jnp.zeros_like(gamma) if beta is None else beta
  return gamma / r1, (beta + scale * r2) / r1


def fold_linear(kernel: jax.Array, bias: jax.Array | None, scale, r1, r2) -> tuple[jax.Array, jax.Array]:
  """kernel (C, N) Flax layout: kernel' = kernel * r1[:, None], bias' = bias - (s * r2) @ kernel (N,)."""
  shift = jnp.dot(scale * r2, kernel, precision=jax.lax.Precision.HIGHEST)
  bias = jnp.zeros(kernel.shape[1], kernel.dtype) if bias is None else bias
  return kernel * r1[:, None], bias - shift


def unfold_input(x_folded: jax.Array, scale, r1, r2) -> jax.Array:
  """x = r1 * x' - s * r2: the original activation from the reparameterized one (post-LN residual streams)."""
  return x_folded * _channels(r1, x_folded) - _channels(scale * r2, x_folded)


def fold_input(x: jax.Array, scale, r1, r2) -> jax.Array:
  """x' = (x + s * r2) / r1 (the reparameterized norm's output, computed from the original one)."""
  return (x + _channels(scale * r2, x)) / _channels(r1, x)


def init_bounds(x: jax.Array, per_channel: bool, quantile: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """Initial bounds: per-channel (C,) or layer-wise () min/max (or the given quantile) of x (..., C)."""
  flat = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  axis = 0 if per_channel else None
  if quantile >= 1.0:
    return jnp.min(flat, axis=axis), jnp.max(flat, axis=axis)
  return jnp.quantile(flat, 1.0 - quantile, axis=axis), jnp.quantile(flat, quantile, axis=axis)


def clip_loss(bounds: tuple[jax.Array, jax.Array], x: jax.Array, kernel: jax.Array, target: jax.Array,
              bits: int) -> jax.Array:
  """mean((fq(x; lo, hi) @ kernel - x @ kernel)^2): the next layer's output error of the clipped quantizer.
  x (M, C), kernel (C, N) (the consumers' kernels side by side), target = x @ kernel (M, N)."""
  lo, hi = bounds
  xq = fake_quant_bounds(x, lo, hi, bits)
  return jnp.mean(jnp.square(jnp.dot(xq, kernel) - target))


@functools.partial(jax.jit, static_argnames=("bits", "steps", "lr"))
def learn_bounds(x, kernel, lo0, hi0, *, bits: int, steps: int, lr: float):
  """Adam on (lo, hi) in units of the initial absmax per channel; returns the best bounds seen and losses."""
  unit = jnp.maximum(jnp.maximum(jnp.abs(lo0), jnp.abs(hi0)), 1e-8)
  target = jnp.dot(x, kernel)
  optimizer = optax.adam(lr)

  def loss_fn(params):
    return clip_loss((params[0] * unit, params[1] * unit), x, kernel, target, bits)

  params = (lo0 / unit, hi0 / unit)
  state = optimizer.init(params)
  first = loss_fn(params)

  def body(carry, _):
    params, state, best, best_loss = carry
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = optimizer.update(grads, state, params)
    better = loss < best_loss
    best = jax.tree_util.tree_map(lambda b, p: jnp.where(better, p, b), best, params)
    best_loss = jnp.minimum(loss, best_loss)
    params = optax.apply_updates(params, updates)
    return (params, state, best, best_loss), loss

  (params, _, best, best_loss), losses = jax.lax.scan(body, (params, state, params, first), None, length=steps)
  final = loss_fn(params)
  take_final = final < best_loss
  best = jax.tree_util.tree_map(lambda b, p: jnp.where(take_final, p, b), best, params)
  return best[0] * unit, best[1] * unit, first, jnp.minimum(final, best_loss)


def weights_and_rest_adam(learning_rate: float, weight_learning_rate: float, steps: int
                          ) -> optax.GradientTransformation:
  """Adam with a cosine decay over `steps`: leaves named "kernel" (latent weights) at weight_learning_rate, every
  other leaf (scales, biases, activation scales) at learning_rate. What reconstruction and the finishing pass use."""
  is_kernel = lambda path: any(getattr(key, "key", None) == "kernel" for key in path)
  labels = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: "kernel" if is_kernel(path) else "rest", params)
  return optax.multi_transform(
      {"rest": optax.adam(optax.cosine_decay_schedule(learning_rate, steps)),
       "kernel": optax.adam(optax.cosine_decay_schedule(weight_learning_rate, steps))}, labels)
