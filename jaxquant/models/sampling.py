"""Choosing the next token from logits: greedy, temperature, top-k; reproducible from a PRNG key.

`Sampler` is a frozen (hashable) description that the decoder compiles into its jitted step, so sampling runs
on the device and the token never has to visit the host between steps. `sample(logits, key, sampler)`:

  temperature == 0       argmax (greedy; the key is not used)
  temperature > 0        a draw from softmax(logits / temperature), restricted to the top_k largest logits
                         when top_k is set (ties at the k-th value are kept)

The same key gives the same tokens: the decoder derives one key a step by splitting (see decode.generate).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampler:
  """temperature: 0 for greedy, > 0 to sample; top_k: keep only the k most likely tokens (None: all)."""
  temperature: float = 0.0
  top_k: int | None = None

  def __post_init__(self):
    if not isinstance(self.temperature, (int, float)) or self.temperature < 0 or self.temperature != self.temperature:
      raise ValueError(f"temperature must be a number >= 0 (0 is greedy), got {self.temperature!r}")
    if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                   or self.top_k < 1):
      raise ValueError(f"top_k must be a positive integer (or None for no cut), got {self.top_k!r}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


GREEDY = Sampler()


def sample(logits: jax.Array, key: jax.Array, sampler: Sampler = GREEDY) -> jax.Array:
  """logits (B, V) -> tokens (B,) int32 as `sampler` says (see the module docstring)."""
  if sampler.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = logits.astype(jnp.float32) / sampler.temperature
  if sampler.top_k is not None and sampler.top_k < scaled.shape[-1]:
    kth = jax.lax.top_k(scaled, sampler.top_k)[0][..., -1:]
    scaled = jnp.where(scaled >= kth, scaled, -jnp.inf)
  return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
