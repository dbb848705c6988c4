"""Binary-coding quantization (BCQ), the weight format of LUT-GEMM: pure array math, no Flax, no checks.

A (K, N) weight (Flax layout: inputs x outputs) is split along K into groups of `k_group` rows (the last group
may be shorter; k_group >= K is one group per column). In every (group, column) the g weights are approximated
by q binary planes

    w[k] ~ sum_i alpha_i * B_i[k]  (+ offset),      B_i[k] in {-1, +1},

i.e. by one of the 2^q code values v(c) = sum_i alpha_i * (2*bit_i(c) - 1) (+ offset). The fit, vectorised over
every group and column at once:

  1. start (`init`): the paper's greedy binary coding ("greedy": r = w - offset0, offset0 = the group mean when
     there is an offset, else 0; for each plane B_i = sign(r), alpha_i = mean |r|, r -= alpha_i * B_i), or the
     round-to-nearest uniform grid ("uniform": a uniform q-bit grid is a BCQ code, alpha_i = (s/2) 2^i, plus an
     offset for the asymmetric grid; without offset the symmetric grid +-s/2, +-3s/2, ...), or "both": the two
     starts refined side by side, and each (group, column) keeps the one that ends with the smaller error;
  2. `rounds` of alternating refinement:
     a. least-squares alphas (and offset, an extra all-ones column) for the fixed planes: the (q[+1])^2 normal
        equations of every group and column, with a tiny ridge so that a singular system (all-zero or constant
        group, two equal planes) still gives finite numbers;
     b. best planes for the fixed alphas: each weight takes the nearest of the 2^q code values (the values are
        sorted; a weight's rank among the midpoints of neighbouring values picks its value);
     an iterate replaces the kept one only in the (group, column) where its squared error is smaller, so the
     error never increases from round to round;
  3. alpha and offset are rounded to their stored dtype (float16 in the default config), and the planes are
     chosen once more for the rounded values.

Internally every array is laid out (N, G, g) (column, group, row in group): the sums over a group's rows are
contiguous reductions. Results come back in the BCQArray layout (q, G, N) / (G, N).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

# Ridge added to the normal equations, relative to the number of rows of the group: keeps a singular system
# finite while changing a well-posed solution by about one part in 10^6.
RIDGE = 1e-6
INITS = ("greedy", "uniform", "both")


def grouped(w: jax.Array, k_group: int, row_weight: jax.Array | None = None):
  """w (K, N) -> (w (N, G, g) zero-padded, mask (1, G, g), rows (1, G)).

  mask is 1 on real rows and 0 on padding; with row_weight (K,) > 0 it holds the weight of each row instead,
  and rows is the sum of the mask over each group (the row count when unweighted).
  """
  k, n = w.shape
  groups = math.ceil(k / k_group)
  padded = groups * k_group
  wg = jnp.pad(w.astype(jnp.float32).T, ((0, 0), (0, padded - k))).reshape(n, groups, k_group)
  if row_weight is None:
    mask = (jnp.arange(padded) < k).astype(jnp.float32)
  else:
    mask = jnp.pad(row_weight.astype(jnp.float32), (0, padded - k))
  mask = mask.reshape(1, groups, k_group)
  return wg, mask, jnp.sum(mask, axis=-1)


def ungrouped(x: jax.Array, k: int) -> jax.Array:
  """(..., N, G, g) -> (..., K, N): the inverse of `grouped` (padding rows dropped)."""
  *lead, n, groups, k_group = x.shape
  return jnp.swapaxes(x.reshape(*lead, n, groups * k_group)[..., :k], -1, -2)


def code_signs(q: int) -> jax.Array:
  """(2^q, q) float32: row c holds the signs 2*bit_i(c) - 1 of code c."""
  codes = jnp.arange(1 << q, dtype=jnp.int32)[:, None]
  return (((codes >> jnp.arange(q, dtype=jnp.int32)[None, :]) & 1) * 2 - 1).astype(jnp.float32)


def reconstruct(signs, alpha, offset) -> jax.Array:
  """signs (q, N, G, g) +-1, alpha (q, N, G), offset (N, G) or None -> (N, G, g)."""
  w = jnp.sum(alpha[..., None] * signs, axis=0)
  if offset is not None:
    w = w + offset[..., None]
  return w


def group_error(wg, mask, signs, alpha, offset) -> jax.Array:
  """Squared error of every (column, group) over the real rows (weighted by the mask): (N, G)."""
  return jnp.sum(mask * (wg - reconstruct(signs, alpha, offset)) ** 2, axis=-1)


def greedy_init(wg, mask, rows, q: int, use_offset: bool):
  """Greedy binary coding: (signs (q, N, G, g), alpha (q, N, G), offset (N, G) or None)."""
  offset = jnp.sum(wg * mask, axis=-1) / rows if use_offset else None
  r = wg - offset[..., None] if use_offset else wg
  signs, alphas = [], []
  for _ in range(q):
    b = jnp.where(r >= 0, 1.0, -1.0).astype(jnp.float32)
    a = jnp.sum(jnp.abs(r) * mask, axis=-1) / rows
    r = r - a[..., None] * b
    signs.append(b)
    alphas.append(a)
  return jnp.stack(signs), jnp.stack(alphas), offset


def uniform_init(wg, mask, q: int, use_offset: bool):
  """The round-to-nearest uniform q-bit grid of every group as a BCQ code (signs, alpha, offset).

  With offset: the asymmetric grid of quantizers.weight_values (range [min(w, 0), max(w, 0)], integer zero
  point), exactly as formats.uniform_to_bcq converts it. Without: the symmetric grid (2j+1) s/2, |j| < 2^(q-1).
  """
  levels = (1 << q) - 1
  big = jnp.float32(3e38)
  if use_offset:
    low = jnp.minimum(jnp.min(jnp.where(mask > 0, wg, big), axis=-1), 0.0)
    high = jnp.maximum(jnp.max(jnp.where(mask > 0, wg, -big), axis=-1), 0.0)
    scale = jnp.where(high > low, (high - low) / levels, jnp.float32(1.0))
    zero = jnp.clip(jnp.round(-low / scale), 0, levels)
    codes = jnp.clip(jnp.round(wg / scale[..., None]) + zero[..., None], 0, levels)
    offset = scale * (jnp.float32(levels / 2) - zero)
  else:
    absmax = jnp.max(jnp.where(mask > 0, jnp.abs(wg), 0.0), axis=-1)
    scale = jnp.where(absmax > 0, 2.0 * absmax / levels, jnp.float32(1.0))
    codes = jnp.clip(jnp.round(wg / scale[..., None] + levels / 2), 0, levels)  # nearest (2j+1) s/2
    offset = None
  codes = codes.astype(jnp.int32)
  signs = jnp.stack([((codes >> i) & 1) * 2 - 1 for i in range(q)]).astype(jnp.float32)
  alpha = jnp.stack([scale * (2.0 ** (i - 1)) for i in range(q)])
  return signs, alpha, offset


def least_squares(wg, mask, rows, signs, use_offset: bool):
  """Alphas (and offset) minimising the error for fixed planes: (alpha (q, N, G), offset (N, G) or None).

  Solves the normal equations X^T X a = X^T w of every (column, group), X = [B_0 .. B_{q-1} (, 1)], with a
  ridge of RIDGE * rows; where the solve still fails (non-finite), returns zeros, which the caller's
  keep-the-better step rejects.
  """
  q = signs.shape[0]
  weighted = [signs[i] * mask for i in range(q)]  # mask: 1 (or the row weight) on real rows, 0 on padding
  if use_offset:
    weighted.append(jnp.broadcast_to(mask, wg.shape))
  p = len(weighted)
  entries = {}
  for i in range(p):
    for j in range(i, p):
      if i == j:
        entries[i, j] = jnp.broadcast_to(rows, wg.shape[:2])  # (+-1)^2 = 1: the sum of the mask
      elif use_offset and j == q:
        entries[i, j] = jnp.sum(weighted[i], axis=-1)
      else:
        entries[i, j] = jnp.sum(weighted[i] * signs[j], axis=-1)
  ridge = RIDGE * rows
  gram = jnp.stack([jnp.stack([entries[min(i, j), max(i, j)] + (ridge if i == j else 0.0) for j in range(p)],
                              axis=-1) for i in range(p)], axis=-2)  # (N, G, p, p)
  rhs = jnp.stack([jnp.sum(c * wg, axis=-1) for c in weighted], axis=-1)  # (N, G, p)
  solution = jnp.linalg.solve(gram, rhs[..., None])[..., 0]
  solution = jnp.where(jnp.all(jnp.isfinite(solution), axis=-1, keepdims=True), solution, 0.0)
  alpha = jnp.moveaxis(solution[..., :q], -1, 0)
  return alpha, (solution[..., q] if use_offset else None)


def best_signs(wg, alpha, offset) -> jax.Array:
  """For fixed alphas (q, N, G) and offset (N, G) or None: every weight takes the nearest code value.

  The 2^q values of each (column, group) are sorted; the code of a weight is that of the sorted value at its
  rank among the midpoints, computed without a gather as
  code = order[0] + sum_j [w > midpoint_j] * (order[j+1] - order[j]). Returns signs (q, N, G, g) float32 +-1.
  """
  q = alpha.shape[0]
  values = jnp.einsum("cq,qng->ngc", code_signs(q), alpha)  # (N, G, C)
  if offset is not None:
    values = values + offset[..., None]
  order = jnp.argsort(values, axis=-1).astype(jnp.int32)
  ordered = jnp.take_along_axis(values, order, axis=-1)
  midpoints = 0.5 * (ordered[..., 1:] + ordered[..., :-1])  # (N, G, C-1)
  steps = order[..., 1:] - order[..., :-1]
  codes = order[..., :1] + jnp.sum(
      jnp.where(wg[..., None] > midpoints[..., None, :], steps[..., None, :], 0), axis=-1)  # (N, G, g)
  return jnp.stack([((codes >> i) & 1) * 2 - 1 for i in range(q)]).astype(jnp.float32)


def _pick(better, new, old):
  return None if new is None else jnp.where(better, new, old)


def _concat(a, b, axis):
  return None if a is None else jnp.concatenate([a, b], axis=axis)


@functools.partial(jax.jit, static_argnames=("q", "k_group", "rounds", "use_offset", "init", "scale_dtype"))
def fit(w: jax.Array, row_weight: jax.Array | None = None, *, q: int, k_group: int, rounds: int = 15,
        use_offset: bool = False, init: str = "both", scale_dtype: str = "float32"):
  """BCQ fit of w (K, N) float.

  row_weight: None (every weight counts alike: the plain squared error), or (K,) positive weights of the input
  rows: the fit then minimises sum_k row_weight[k] * (w[k, n] - w^[k, n])^2, which with row_weight = E[x_k^2]
  (the mean square of input feature k over calibration tokens) is the diagonal approximation of the output
  error E ||x (W - W^)||^2. The nearest-code step does not change (each weight still takes its nearest value).

  init: "greedy" (the paper's start), "uniform" (the round-to-nearest grid, see `uniform_init`) or "both"
  (refine from both starts at once and keep, per group and column, the one that ends with the smaller error).
  scale_dtype: the stored dtype of alpha and offset; after the refinement they are rounded to it and the
  planes are chosen once more for the rounded values (so the planes are the best for what is stored).

  Returns (signs (q, K, N) bool (True = +1), alpha (q, G, N) scale_dtype, offset (G, N) scale_dtype or None,
  errors (rounds + 1,) float32: the total squared error of the kept iterate after the start and after every
  round, before the final rounding; non-increasing).
  """
  if init not in INITS:
    raise ValueError(f"unknown init {init!r}: choose one of {INITS}")
  k, n = w.shape
  wg, mask, rows = grouped(w, k_group, row_weight)
  if init == "greedy":
    signs, alpha, offset = greedy_init(wg, mask, rows, q, use_offset)
  elif init == "uniform":
    signs, alpha, offset = uniform_init(wg, mask, q, use_offset)
  else:  # both starts side by side, as 2N independent columns
    g_signs, g_alpha, g_offset = greedy_init(wg, mask, rows, q, use_offset)
    u_signs, u_alpha, u_offset = uniform_init(wg, mask, q, use_offset)
    signs, alpha, offset = _concat(g_signs, u_signs, 1), _concat(g_alpha, u_alpha, 1), _concat(g_offset, u_offset, 0)
    wg = jnp.concatenate([wg, wg], axis=0)
  error = group_error(wg, mask, signs, alpha, offset)

  def total(error):
    return jnp.sum(jnp.minimum(error[:n], error[n:])) if init == "both" else jnp.sum(error)

  def round_(state, _):
    signs, alpha, offset, error = state
    new_alpha, new_offset = least_squares(wg, mask, rows, signs, use_offset)
    new_signs = best_signs(wg, new_alpha, new_offset)
    new_error = group_error(wg, mask, new_signs, new_alpha, new_offset)
    better = new_error < error  # (N, G)
    state = (jnp.where(better[..., None], new_signs, signs), jnp.where(better, new_alpha, alpha),
             _pick(better, new_offset, offset), jnp.minimum(new_error, error))
    return state, total(state[3])

  start = total(error)[None]
  (signs, alpha, offset, error), history = jax.lax.scan(
      round_, (signs, alpha, offset, error), None, length=rounds)
  errors = jnp.concatenate([start, history])
  if init == "both":
    better = error[n:] < error[:n]
    wg = wg[:n]
    alpha = jnp.where(better, alpha[:, n:], alpha[:, :n])
    offset = None if offset is None else jnp.where(better, offset[n:], offset[:n])
  dtype = jnp.dtype(scale_dtype)
  alpha = alpha.astype(dtype)
  offset = None if offset is None else offset.astype(dtype)
  signs = best_signs(wg, alpha.astype(jnp.float32), None if offset is None else offset.astype(jnp.float32))
  return (ungrouped(signs, k) > 0, jnp.swapaxes(alpha, -1, -2),
          None if offset is None else offset.T, errors)
