"""qdot: the one place that chooses how a (possibly quantized) matmul runs."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def qdot(x: jax.Array, w) -> jax.Array:
  """x: (..., K) float; w: (K, N) float array or QArray. Returns (..., N) float32."""
  if isinstance(w, jax.Array) or hasattr(w, "dtype") and not hasattr(w, "bits"):
    return jnp.dot(x, w, preferred_element_type=jnp.float32)
  raise NotImplementedError("quantized path lands with formats.py")
