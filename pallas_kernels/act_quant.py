"""Token-wise dynamic int8 activation quantization, alone or fused with the norm before it (ZeroQuant).

  quantize_rows(x)                          -> (int8 (..., K), scale (..., 1) float32)
  rmsnorm_quantize(x, weight, eps=...)      -> quantize_rows(rmsnorm(x) * weight [+ bias])
  layernorm_quantize(x, weight, bias, ...)  -> quantize_rows(layernorm(x) * weight + bias)

One scale per row (token): absmax / (2^(bits-1) - 1), an all-zero row gets scale 1; codes are
round-half-to-even of y / scale clipped to +-(2^(bits-1) - 1), exactly `jaxquant.quantizers.quantize_tokens`.
The norm statistics are computed in float32 from the input (any float dtype).

Kernel: one program per block of `bm` rows. When a row fits in one power-of-two chunk (K <= 8192) the whole
row tile is read once and stays in registers (statistics, absmax, codes); longer rows loop over chunks of
`bk` columns (one pass per statistic, then absmax, then codes). Columns past K are masked.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import backend

NORMS = ("none", "rms", "layer")
MAX_SINGLE_CHUNK = 8192  # longest row (power of two) kept in registers in one piece
MULTI_CHUNK = 4096       # chunk length for longer rows


def block_sizes(m: int, k: int) -> tuple[int, int, int]:
  """(bm rows, bk columns, number of K chunks) for an (m, k) input."""
  kp = backend.pow2_ceil(k)
  if kp <= MAX_SINGLE_CHUNK:
    bk, nk = kp, 1
  else:
    bk, nk = MULTI_CHUNK, backend.cdiv(k, MULTI_CHUNK)
  bm = max(1, min(16, 4096 // bk, backend.pow2_ceil(m)))
  return bm, bk, nk


def _kernel(*refs, norm: str, has_w: bool, has_b: bool, m: int, k: int, bm: int, bk: int, nk: int,
            eps: float, qmax: int):
  x_ref = refs[0]
  i = 1
  w_ref = b_ref = None
  if has_w:
    w_ref, i = refs[i], i + 1
  if has_b:
    b_ref, i = refs[i], i + 1
  q_ref, s_ref = refs[i], refs[i + 1]

  m0 = pl.program_id(0) * bm
  rows = backend.lanes(m0, bm)
  row_ok = rows[:, None] < m  # (bm, 1)

  def chunk(c):
    cols = backend.lanes(c * bk, bk)
    col_ok = cols[None, :] < k  # (1, bk)
    x = backend.load(x_ref.at[pl.ds(m0, bm), pl.ds(c * bk, bk)], mask=row_ok & col_ok).astype(jnp.float32)
    return x, col_ok, cols

  def affine(y, c, col_ok):
    ok1 = backend.lanes(c * bk, bk) < k
    if has_w:
      w = backend.load(w_ref.at[pl.ds(c * bk, bk)], mask=ok1).astype(jnp.float32)
      y = y * w[None, :]
    if has_b:
      b = backend.load(b_ref.at[pl.ds(c * bk, bk)], mask=ok1).astype(jnp.float32)
      y = y + b[None, :]
    return jnp.where(col_ok, y, 0.0)

  inv_k = 1.0 / k

  def normalize(x, col_ok, stats):
    if norm == "none":
      return x
    if norm == "rms":
      (rstd,) = stats
      return x * rstd
    mean, rstd = stats
    return jnp.where(col_ok, x - mean, 0.0) * rstd

  def row_sum(fn):
    """Sum over all columns of fn(x_chunk, col_ok) -> (bm, 1)."""
    if nk == 1:
      x, col_ok, _ = chunk(0)
      return jnp.sum(fn(x, col_ok), axis=1, keepdims=True)
    def body(c, acc):
      x, col_ok, _ = chunk(c)
      return acc + jnp.sum(fn(x, col_ok), axis=1, keepdims=True)
    return jax.lax.fori_loop(0, nk, body, jnp.zeros((bm, 1), jnp.float32))

  # statistics
  if norm == "rms":
    ms = row_sum(lambda x, ok: x * x) * inv_k
    stats = (jax.lax.rsqrt(ms + eps),)
  elif norm == "layer":
    mean = row_sum(lambda x, ok: x) * inv_k
    var = row_sum(lambda x, ok: jnp.square(jnp.where(ok, x - mean, 0.0))) * inv_k
    stats = (mean, jax.lax.rsqrt(var + eps))
  else:
    stats = ()

  def y_of(c):
    x, col_ok, cols = chunk(c)
    return affine(normalize(x, col_ok, stats), c, col_ok), col_ok

  # absmax and scale
  if nk == 1:
    y, col_ok = y_of(0)
    absmax = jnp.max(jnp.abs(y), axis=1, keepdims=True)
  else:
    def amax_body(c, acc):
      y, _ = y_of(c)
      return jnp.maximum(acc, jnp.max(jnp.abs(y), axis=1, keepdims=True))
    absmax = jax.lax.fori_loop(0, nk, amax_body, jnp.zeros((bm, 1), jnp.float32))
  scale = jnp.where(absmax > 0, absmax / jnp.float32(qmax), jnp.float32(1.0))
  backend.store(s_ref.at[pl.ds(m0, bm), backend.whole(1)], scale, mask=row_ok)

  def write(c, y, col_ok):
    q = jnp.clip(backend.round_half_even(y / scale), -qmax, qmax).astype(jnp.int8)
    backend.store(q_ref.at[pl.ds(m0, bm), pl.ds(c * bk, bk)], q, mask=row_ok & col_ok)

  if nk == 1:
    write(0, y, col_ok)
  else:
    def write_body(c, carry):
      y, col_ok = y_of(c)
      write(c, y, col_ok)
      return carry
    jax.lax.fori_loop(0, nk, write_body, 0)


def _check(x, weight, bias, bits, eps, norm):
  if not hasattr(x, "shape") or x.ndim < 1:
    raise ValueError(f"x: expected an array of shape (..., K), got {getattr(x, 'shape', type(x))}")
  backend.float_dtype(x.dtype, "x")
  k = x.shape[-1]
  if k == 0 or x.size == 0:
    raise ValueError(f"x: empty input of shape {x.shape}")
  for name, v in (("weight", weight), ("bias", bias)):
    if v is None:
      continue
    if v.shape != (k,):
      raise ValueError(f"{name}: expected shape ({k},) to match x's last dimension, got {v.shape}")
    backend.float_dtype(v.dtype, name)
  if not isinstance(bits, int) or not 2 <= bits <= 8:
    raise ValueError(f"bits: unsupported value {bits!r}; choose an int in 2..8 (codes are stored as int8)")
  if norm != "none" and not (isinstance(eps, (int, float)) and eps > 0):
    raise ValueError(f"eps: must be a positive float, got {eps!r}")


def _launch(x, weight, bias, *, norm, eps, bits, interpret):
  _check(x, weight, bias, bits, eps, norm)
  lead, k = x.shape[:-1], x.shape[-1]
  x2 = x.reshape(-1, k)
  m = x2.shape[0]
  bm, bk, nk = block_sizes(m, k)
  args = [x2] + [v for v in (weight, bias) if v is not None]
  kernel = functools.partial(
      _kernel, norm=norm, has_w=weight is not None, has_b=bias is not None, m=m, k=k, bm=bm, bk=bk, nk=nk,
      eps=float(eps), qmax=(1 << (bits - 1)) - 1)
  q, s = backend.call(
      kernel, *args,
      out_shape=(jax.ShapeDtypeStruct((m, k), jnp.int8), jax.ShapeDtypeStruct((m, 1), jnp.float32)),
      grid=(backend.cdiv(m, bm),), interpret=interpret,
      num_warps=4 if bm * bk <= 2048 else 8, num_stages=1, name=f"act_quant_{norm}")
  return q.reshape(*lead, k), s.reshape(*lead, 1)


def quantize_rows(x: jax.Array, *, bits: int = 8, interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
  """Token-wise absmax quantization: x (..., K) float -> (int8 (..., K), scale (..., 1) float32)."""
  return _launch(x, None, None, norm="none", eps=0.0, bits=bits, interpret=interpret)


def rmsnorm_quantize(x: jax.Array, weight: jax.Array | None, *, bias: jax.Array | None = None,
                     eps: float = 1e-6, bits: int = 8, interpret: bool | None = None
                     ) -> tuple[jax.Array, jax.Array]:
  """Fused RMSNorm + token-wise quantization of y = x / sqrt(mean(x^2) + eps) * weight (+ bias)."""
  return _launch(x, weight, bias, norm="rms", eps=eps, bits=bits, interpret=interpret)


def layernorm_quantize(x: jax.Array, weight: jax.Array | None, bias: jax.Array | None, *,
                       eps: float = 1e-5, bits: int = 8, interpret: bool | None = None
                       ) -> tuple[jax.Array, jax.Array]:
  """Fused LayerNorm + token-wise quantization of y = (x - mean) / sqrt(var + eps) * weight + bias."""
  return _launch(x, weight, bias, norm="layer", eps=eps, bits=bits, interpret=interpret)


# ---- reference ----------------------------------------------------------------------------------------

def reference(x: jax.Array, weight: jax.Array | None = None, bias: jax.Array | None = None, *,
              norm: str = "none", eps: float = 1e-6, bits: int = 8, dtype: Any = jnp.float32
              ) -> tuple[jax.Array, jax.Array]:
  """Plain jnp: optional norm, then absmax quantization per row; `dtype` float64 needs jax x64 enabled."""
  if norm not in NORMS:
    raise ValueError(f"norm: unknown {norm!r}; choose one of {NORMS}")
  qmax = (1 << (bits - 1)) - 1
  y = x.astype(dtype)
  if norm == "rms":
    y = y * jax.lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + jnp.asarray(eps, dtype))
  elif norm == "layer":
    mean = jnp.mean(y, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(y - mean), axis=-1, keepdims=True)
    y = (y - mean) * jax.lax.rsqrt(var + jnp.asarray(eps, dtype))
  if weight is not None:
    y = y * weight.astype(dtype)
  if bias is not None:
    y = y + bias.astype(dtype)
  absmax = jnp.max(jnp.abs(y), axis=-1, keepdims=True)
  scale = jnp.where(absmax > 0, absmax / qmax, jnp.asarray(1.0, dtype))
  q = jnp.clip(jnp.round(y / scale), -qmax, qmax).astype(jnp.int8)
  return q, scale
