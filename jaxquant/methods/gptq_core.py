"""GPTQ (Frantar et al., ICLR 2023) for group-wise weight formats: pure array math, no Flax, no checks.

A (K, N) weight (Flax layout: inputs x outputs) and the Hessian H = X^T X / n of the layer's inputs X (n, K). The
rows (input features) are rounded in order; each row's rounding error is carried onto the rows not yet rounded
through the inverse Hessian, so what shrinks is the layer's output error ||X (W - Q)||^2, not the weight error.

  1. H += damp * mean(diag H) * I; an input that never fires (diag 0) gets H_kk = 1 and its weight row 0.
  2. U = the upper Cholesky factor of H^-1 (H^-1 = U^T U).
  3. For each group of `k_group` rows (a shorter last group where it does not divide K; k_group >= K: one group,
     rounded in blocks of 128 rows): the format's parameters are fitted to the group's rows *as updated so far*
     (GPTQ's "dynamic groups"), weighted by diag(H); then row by row, q_i = the format's nearest value of w_i,
     e_i = (w_i - q_i) / U_ii, and w_j -= U_ij e_i for the later rows j of the block; after the block, the rows
     below it take U[block, rest]^T e at once.

`updated` is each row as it was when rounded: the format's nearest value of `updated` is exactly the returned code,
which is what a straight-through student (lkd_formats) starts from. Formats: `bcq` (binary coding, bcq_core's fit
per group) and `uniform` (quantizers.weight_values' asymmetric or symmetric grid per group and column).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

from jaxquant.methods import bcq_core
from jaxquant.quantizers import weight_values

LAZY_BLOCK = 128  # rows rounded between two updates of the rest when one group holds every row


def inverse_factor(hessian: jax.Array, damp: float) -> tuple[jax.Array, jax.Array]:
  """(U upper (K, K) with (H + damping)^-1 = U^T U, dead (K,) bool: inputs whose H_kk is 0)."""
  h = hessian.astype(jnp.float32)
  k = h.shape[0]
  dead = jnp.diag(h) <= 0
  h = h + jnp.diag(dead.astype(jnp.float32))
  h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(k, dtype=jnp.float32)
  lower = jnp.linalg.cholesky(h)
  inverse = jax.scipy.linalg.cho_solve((lower, True), jnp.eye(k, dtype=jnp.float32))
  return jnp.linalg.cholesky(inverse).T, dead


def gptq(w: jax.Array, hessian: jax.Array, *, k_group: int, fit_group: Callable, round_row: Callable,
         damp: float = 0.01):
  """GPTQ of w (K, N) with any group-wise format (call under jit; the loop over groups unrolls).

  fit_group(rows (g, N), row_weight (g,)) -> params of one group (a pytree);
  round_row(row (N,), params) -> (N,) the format's nearest value of every entry.
  Returns (q (K, N) the rounded weights, updated (K, N), [params of each group]).
  """
  k, n = w.shape
  u, dead = inverse_factor(hessian, damp)
  w = jnp.where(dead[:, None], 0.0, w.astype(jnp.float32))
  diag = jnp.diag(hessian).astype(jnp.float32)
  block = k_group if k_group < k else LAZY_BLOCK
  rounded, params = [], []
  for start in range(0, k, block):
    end = min(start + block, k)
    size = end - start
    if start % k_group == 0:  # a group begins: fit its parameters on its rows as updated so far
      rows = w[start:min(start + k_group, k)]
      params.append(fit_group(rows, diag[start:start + rows.shape[0]]))
    group_params = params[-1]
    u_block = u[start:end, start:end]

    def body(i, carry, u_block=u_block, group_params=group_params, size=size):
      rows, q, err = carry
      row = rows[i]
      q_row = round_row(row, group_params)
      e = (row - q_row) / u_block[i, i]
      later = jnp.where(jnp.arange(size) > i, u_block[i], 0.0)
      return rows - later[:, None] * e[None, :], q.at[i].set(q_row), err.at[i].set(e)

    zeros = jnp.zeros((size, n), jnp.float32)
    rows, q, err = jax.lax.fori_loop(0, size, body, (w[start:end], zeros, zeros))
    w = w.at[start:end].set(rows)
    if end < k:
      w = w.at[end:].add(-(u[start:end, end:].T @ err))
    rounded.append(q)
  return jnp.concatenate(rounded), w, params


# ----------------------------------------------------------------------------------------------------------------
# formats


def _bcq_round_row(row, params):
  alpha, offset = params  # (q, N), (N,) or None
  a = alpha[:, :, None]
  off = None if offset is None else offset[:, None]
  signs = bcq_core.best_signs(row[:, None, None], a, off)
  return bcq_core.reconstruct(signs, a, off)[:, 0, 0]


@functools.partial(jax.jit, static_argnames=("q", "k_group", "rounds", "use_offset", "init", "scale_dtype"))
def bcq(w: jax.Array, hessian: jax.Array, damp: float = 0.01, *, q: int, k_group: int, rounds: int = 15,
        use_offset: bool = False, init: str = "both", scale_dtype: str = "float16"):
  """GPTQ with BCQ codes: each group's alphas (and offset) are bcq_core.fit's on its updated rows, weighted by
  diag(H), rounded to scale_dtype; every weight then takes the nearest of the group's 2^q values.

  Returns (signs (q, K, N) bool, alpha (q, G, N) scale_dtype, offset (G, N) or None, updated (K, N) float32), the
  first three in bcq_core.fit's layout."""
  k, n = w.shape

  def fit_group(rows, row_weight):
    _, alpha, offset, _ = bcq_core.fit(rows, jnp.maximum(row_weight, 1e-12), q=q, k_group=rows.shape[0],
                                       rounds=rounds, use_offset=use_offset, init=init, scale_dtype=scale_dtype)
    return alpha[:, 0, :], None if offset is None else offset[0]

  as_f32 = lambda p: (p[0].astype(jnp.float32), None if p[1] is None else p[1].astype(jnp.float32))
  _, updated, params = gptq(w, hessian, k_group=k_group, fit_group=fit_group,
                            round_row=lambda row, p: _bcq_round_row(row, as_f32(p)), damp=damp)
  alpha = jnp.stack([p[0] for p in params], axis=1)  # (q, G, N)
  offset = None if not use_offset else jnp.stack([p[1] for p in params])  # (G, N)
  wg, _, _ = bcq_core.grouped(updated, min(k_group, k))
  signs = bcq_core.best_signs(wg, jnp.swapaxes(alpha, -1, -2).astype(jnp.float32),
                              None if offset is None else offset.T.astype(jnp.float32))
  return bcq_core.ungrouped(signs, k) > 0, alpha, offset, updated


def uniform_bounds(bits: int, symmetric: bool) -> tuple[int, int]:
  """The signed code range of quantizers.weight_values."""
  half = 1 << (bits - 1)
  return (-(half - 1), half - 1) if symmetric else (-half, half - 1)


@functools.partial(jax.jit, static_argnames=("bits", "symmetric", "k_group"))
def uniform(w: jax.Array, hessian: jax.Array, damp: float = 0.01, *, bits: int, symmetric: bool, k_group: int):
  """GPTQ with uniform codes, one scale (and zero point) per group of k_group rows and column, fitted as
  quantizers.weight_values fits them (range of the group's updated rows).

  Returns (values (K, N) int32, scale (G, N) float32, zero (G, N) float32 or None, updated (K, N) float32), the
  first three as weight_values(..., k_group, n_group=1) lays them out: w ~ (values - zero) * scale."""
  lo, hi = uniform_bounds(bits, symmetric)

  def fit_group(rows, _):
    _, scale, zero = weight_values(rows, bits=bits, symmetric=symmetric, k_group=rows.shape[0], n_group=1)
    return scale[0], None if zero is None else zero[0]

  def codes(row, params):
    scale, zero = params
    return jnp.clip(jnp.round(row / scale) + (0.0 if zero is None else zero), lo, hi)

  def round_row(row, params):
    scale, zero = params
    return (codes(row, params) - (0.0 if zero is None else zero)) * scale

  _, updated, params = gptq(w, hessian, k_group=k_group, fit_group=fit_group, round_row=round_row, damp=damp)
  groups = math.ceil(w.shape[0] / k_group)
  scale = jnp.stack([p[0] for p in params])
  zero = None if symmetric else jnp.stack([p[1] for p in params])
  rows = jnp.repeat(jnp.arange(groups), k_group)[:w.shape[0]]
  values = codes(updated, (scale[rows], None if zero is None else zero[rows]))
  return values.astype(jnp.int32), scale, zero, updated
