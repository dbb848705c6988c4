"""The array math of distilling a weight format's own parameters: traceable, no Flax, no checks.

Two formats, each with the same three pieces: `*_weight` is the differentiable dequantized (K, N) kernel the
student computes with, `*_codes` the format's codes for given parameters (what is stored), and the packing into
the stored array (jaxquant.formats) in lkd_formats.

BCQ (LUT-GEMM, methods/bcq_core.py): W^ = sum_i alpha_i B_i (+ offset), alpha (q, G, N), offset (G, N). The
gradient reaches alpha and offset exactly (W^ is linear in them). The signs B are either fixed (the fit's planes)
or re-derived every step from latent float weights as the nearest code value (bcq_core.best_signs, the fit's own
code step) with a straight-through gradient to the latent weights (dW^/dlatent taken as the identity).

Uniform (quantizers.weight_values): W^ = (v - z) s, v = clip(round(latent / s) + z, lo, hi). The gradient reaches
the latent weights straight through the rounding (zero outside the clipping range), the scale s as in LSQ (Esser et
al., 2020), and the zero point z, which stays an integer (QArray's contract), through a straight-through rounding
of a float parameter kept in weight units (z = round(zero_w / s0), s0 the start's scale) so that an optimizer step
of the size of a weight step can move it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxquant.formats import expand_groups
from jaxquant.methods import bcq_core

sg = jax.lax.stop_gradient


def round_ste(x: jax.Array) -> jax.Array:
  """round(x) forward, identity backward."""
  return x + sg(jnp.round(x) - x)


# ----------------------------------------------------------------------------------------------------------------
# BCQ


def bcq_signs(latent: jax.Array, alpha: jax.Array, offset: jax.Array | None, k_group: int) -> jax.Array:
  """The nearest-code signs of latent (K, N) for alpha (q, G, N) and offset (G, N) or None, in the grouped layout
  (q, N, G, g) float32 +-1 (bcq_core's), no gradient."""
  wg, _, _ = bcq_core.grouped(sg(latent), k_group)
  return bcq_core.best_signs(wg, sg(jnp.swapaxes(alpha, -1, -2)).astype(jnp.float32),
                             None if offset is None else sg(offset.T).astype(jnp.float32))


def bcq_weight(latent: jax.Array | None, alpha: jax.Array, offset: jax.Array | None, k_group: int,
               signs: jax.Array | None = None, shape: tuple[int, int] | None = None) -> jax.Array:
  """The dequantized (K, N) kernel. signs: fixed planes (q, N, G, g) +-1, or None to re-derive them from `latent`
  (K, N) with a straight-through gradient to it. shape: (K, N), needed when latent is None."""
  k = (latent.shape if latent is not None else shape)[0]
  if signs is None:
    signs = bcq_signs(latent, alpha, offset, k_group)
  w = bcq_core.ungrouped(bcq_core.reconstruct(signs, jnp.swapaxes(alpha, -1, -2),
                                              None if offset is None else offset.T), k)
  if latent is not None:
    w = w + (latent - sg(latent))  # straight through to the latent weights
  return w


def grouped_signs(signs: jax.Array, k_group: int) -> jax.Array:
  """Fit signs (q, K, N) bool (True = +1) -> (q, N, G, g) float32 +-1 (padding rows +1: they are cut off)."""
  q, k, n = signs.shape
  as_float = jnp.where(signs, 1.0, -1.0).astype(jnp.float32)
  return jnp.stack([bcq_core.grouped(as_float[i], k_group)[0] for i in range(q)])


def ungrouped_signs(signs: jax.Array, k: int) -> jax.Array:
  """(q, N, G, g) +-1 -> (q, K, N) bool, the layout formats.pack_planes takes."""
  return bcq_core.ungrouped(signs, k) > 0


# ----------------------------------------------------------------------------------------------------------------
# uniform


def uniform_bounds(bits: int, symmetric: bool) -> tuple[int, int]:
  """The signed code range quantizers.weight_values uses."""
  half = 1 << (bits - 1)
  return (-(half - 1), half - 1) if symmetric else (-half, half - 1)


def uniform_zero(zero_w: jax.Array | None, scale0: jax.Array | None) -> jax.Array | None:
  """The integer zero point (groups_k, groups_n) float32 of a zero parameter in weight units."""
  return None if zero_w is None else round_ste(zero_w / scale0)


def uniform_codes(latent: jax.Array, scale: jax.Array, zero: jax.Array | None, bits: int, symmetric: bool,
                  k_group: int, n_group: int) -> jax.Array:
  """v = clip(round(latent / s) + z, lo, hi), (K, N) float32 holding integers, straight-through to latent and s."""
  shape = latent.shape
  s = expand_groups(scale, shape, k_group, n_group)
  z = 0.0 if zero is None else expand_groups(zero, shape, k_group, n_group)
  lo, hi = uniform_bounds(bits, symmetric)
  return jnp.clip(round_ste(latent / s) + z, lo, hi)


def uniform_weight(latent: jax.Array | None, scale: jax.Array, zero: jax.Array | None, bits: int,
                   symmetric: bool, k_group: int, n_group: int, codes: jax.Array | None = None) -> jax.Array:
  """The dequantized (K, N) kernel (v - z) s; codes: fixed (K, N) values, or None to derive them from latent."""
  if codes is None:
    codes = uniform_codes(latent, scale, zero, bits, symmetric, k_group, n_group)
  shape = codes.shape
  s = expand_groups(scale, shape, k_group, n_group)
  z = 0.0 if zero is None else expand_groups(zero, shape, k_group, n_group)
  return (codes - z) * s
